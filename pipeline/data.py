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

from .config import ConfigError, DataConfig

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
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    keep, held = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
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


def _imagefolder(cfg: DataConfig, seed: int) -> dict[str, tuple[list[Path], np.ndarray]] | None:
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
        parts, classes = {"all": _list_folder(root)[0]}, _list_folder(root)[1]
    labelled = {k: (v, np.array([classes.index(p.parent.name) for p in v], np.int64)) for k, v in parts.items()}
    return labelled, classes  # type: ignore[return-value]


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
        labelled, classes = _imagefolder(cfg, seed)
        if "all" in labelled:
            paths, y = labelled.pop("all")
            rest, test = _stratified(y, cfg.test_fraction, seed)
            labelled["test"] = ([paths[i] for i in test], y[test])
            labelled["train"] = ([paths[i] for i in rest], y[rest])
        if "val" not in labelled:
            paths, y = labelled["train"]
            tr, va = _stratified(y, cfg.val_fraction, seed)
            labelled["val"] = ([paths[i] for i in va], y[va])
            labelled["train"] = ([paths[i] for i in tr], y[tr])
        parts = {k: (_load_images(p, cfg), y, [str(q) for q in p]) for k, (p, y) in labelled.items()}

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
           "mean": [float(m) for m in mean], "std": [float(s) for s in std], "resize": "bilinear"}
    if run_dir is not None and not (run_dir / "splits.json").exists():
        (run_dir / "splits.json").write_text(json.dumps(
            {"seed": seed, "classes": classes, "preprocessing": pre,
             **{k: ids for k, (_, _, ids) in parts.items()}}, indent=1))
    return Splits(norm["train"], parts["train"][1], norm["val"], parts["val"][1], norm["test"], parts["test"][1],
                  classes, pre)
