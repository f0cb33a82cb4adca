"""Datasets a recipe can name, split once (stratified, seeded) and preprocessed the same way for every stage.

Preprocessing is: scale pixels to [0, 1], resize to `image_size`, subtract mean and divide by std per channel,
with mean and std fitted on the training split only. The same numbers go into the bundle manifest, so the
device preprocesses exactly as calibration and evaluation did.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Splits:
    x_train: np.ndarray  # float32 N x C x H x W, preprocessed
    y_train: np.ndarray  # int64
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    preprocessing: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _stratified(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices kept and held out, each class in the same proportion in both, reproducible from the seed."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    try:
        keep, held = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
    except ValueError as e:  # e.g. a class with a single image cannot be in both parts
        raise ConfigError(f"data: cannot split {len(y)} images into a stratified {fraction:.0%} hold-out ({e}). "
                          f"Add images to the small classes, or give train/ and test/ (and val/) folders.") from None
    return np.sort(keep), np.sort(held)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    import torch
    import torch.nn.functional as F
    t = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
    return t.numpy()


def _digits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # 8x8, values 0..16
    if cfg.channels == 3:
        x = np.repeat(x, 3, axis=1)
    ids = [f"digits:{i}" for i in range(len(x))]
    return x, d.target.astype(np.int64), [str(c) for c in range(10)], ids


def _list_folder(root: Path) -> tuple[list[Path], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"data.root: {root} has no class sub-folders (expected e.g. {root}/cat/*.png).")
    paths = [p for c in classes for p in sorted((root / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return paths, classes


def _load_images(paths: list[Path], cfg: DataConfig) -> np.ndarray:
    from PIL import Image
    mode = "L" if cfg.channels == 1 else "RGB"
    out = np.empty((len(paths), cfg.channels, cfg.image_size, cfg.image_size), np.float32)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert(mode).resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def _imagefolder(cfg: DataConfig) -> tuple[dict[str, tuple[list[Path], np.ndarray]], list[str]]:
    """File lists and labels per part found on disk: train/val/test folders, or one folder ("all")."""
    root = cfg.root
    assert root is not None
    if (root / "train").is_dir():
        train, classes = _list_folder(root / "train")
        parts = {"train": train}
        for name in ("val", "test"):
            if (root / name).is_dir():
                found, cls = _list_folder(root / name)
                if cls != classes:
                    raise ConfigError(f"data.root: {root / name} has classes {cls}, train has {classes}.")
                parts[name] = found
    else:
        found, classes = _list_folder(root)
        parts = {"all": found}
    labelled = {k: (v, np.array([classes.index(p.parent.name) for p in v], np.int64)) for k, v in parts.items()}
    return labelled, classes


def load_splits(cfg: DataConfig, seed: int, run_dir: Path | None = None) -> Splits:
    """Load, split and preprocess; write the split file lists to run_dir/splits.json when given."""
    if cfg.kind == "digits":
        x, y, classes, ids = _digits(cfg)
        rest, test = _stratified(y, cfg.test_fraction, seed)
        tr, va = _stratified(y[rest], cfg.val_fraction, seed)
        train, val = rest[tr], rest[va]
        parts = {"train": (x[train], y[train], [ids[i] for i in train]),
                 "val": (x[val], y[val], [ids[i] for i in val]),
                 "test": (x[test], y[test], [ids[i] for i in test])}
    else:
        labelled, classes = _imagefolder(cfg)
        if "all" in labelled:
            labelled["train"] = labelled.pop("all")
        for part, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):  # what the disk lacks
            if part not in labelled:
                paths, y = labelled["train"]
                keep, held = _stratified(y, fraction, seed)
                labelled[part] = ([paths[i] for i in held], y[held])
                labelled["train"] = ([paths[i] for i in keep], y[keep])
        parts = {k: (_load_images(p, cfg), y, [q.relative_to(cfg.root).as_posix() for q in p])
                 for k, (p, y) in labelled.items()}

    parts = {k: (_resize(x, cfg.image_size), y, ids) for k, (x, y, ids) in parts.items()}
    x_train = parts["train"][0]
    mean = np.array(cfg.mean if cfg.mean else x_train.mean(axis=(0, 2, 3)), np.float32)
    std = np.array(cfg.std if cfg.std else x_train.std(axis=(0, 2, 3)) + 1e-8, np.float32)
    if len(mean) != cfg.channels or len(std) != cfg.channels:
        raise ConfigError(f"data.mean/std: need {cfg.channels} value(s) per list, one per channel.")
    norm = {k: ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
            for k, (x, _, _) in parts.items()}
    pre = {"image_size": cfg.image_size, "channels": cfg.channels, "layout": "NCHW", "dtype": "float32",
           "scale": "1/16 (digits 0..16)" if cfg.kind == "digits" else "1/255",
           "mean": [float(m) for m in mean], "std": [float(s) for s in std], "resize": "bilinear",
           "mean_std_from": "recipe" if cfg.mean and cfg.std else "train split"}
    if run_dir is not None and not (run_dir / "splits.json").exists():
        # atomic: under torchrun every rank gets here; file lists are relative to data.root
        from pipeline.artifacts import atomic_write_text
        atomic_write_text(run_dir / "splits.json", json.dumps(
            {"seed": seed, "root": str(cfg.root) if cfg.root else None, "classes": classes, "preprocessing": pre,
             **{k: ids for k, (_, _, ids) in parts.items()}}, indent=1))
    return Splits(norm["train"], parts["train"][1], norm["val"], parts["val"][1], norm["test"], parts["test"][1],
                  classes, pre)
