"""Datasets a recipe can name, split once (stratified, seeded) and preprocessed the same way for every stage.

Preprocessing is: scale pixels to [0, 1], resize to `image_size`, subtract mean and divide by std per channel,
with mean and std fitted on the training split only. The same numbers go into the bundle manifest, so the
device preprocesses exactly as calibration and evaluation did.

Nothing holds a dataset in memory as float32. A split keeps its labels and file names; images are read when a
batch asks for them:
- `digits` (1,797 images of 8x8) stays in memory, preprocessed once;
- an ImageFolder is decoded per batch by a torch DataLoader with `data.workers` processes: each worker reads,
  decodes and resizes with PIL (what torchvision's ImageFolder does) and hands over uint8, four times smaller
  than float32; the main process normalises the batch (and augments it, on the GPU when there is one);
- with `data.cache: true` the images are decoded once into a uint8 memory-mapped file keyed by the file list
  and the preprocessing, and batches are sliced out of it (the page cache, not the process, holds it).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.errors import ConfigError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
CACHE_VERSION = 1       # bump when the decoded bytes for the same files and settings would change
MEAN_STD_SAMPLE = 5000  # images the mean and std are fitted on when the recipe gives none (seeded sample of train)
MAX_IMAGE_PIXELS = 16_000 * 16_000  # larger is refused as a decompression bomb, not decoded


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# ---------------------------------------------------------------- where a split's images come from
class MemoryImages:
    """Images already preprocessed up to normalisation (float32 in [0, 1], resized): small built-in data."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]


class CachedImages:
    """uint8 images in a memory-mapped .npy file, decoded once (see `_cache`)."""

    def __init__(self, path: Path, bad: list[int]):
        self.path, self.bad = path, set(bad)  # images that did not decode when the cache was built
        self.mm = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.mm)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.mm[idx.numpy()]))


class FileImages(torch.utils.data.Dataset):
    """One decoded, resized uint8 image (C, H, W) per index; a file that does not decode comes back as its error."""

    def __init__(self, paths: list[Path], size: int, channels: int):
        self.paths, self.size, self.mode = paths, size, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, decode(self.paths[i], self.size, self.mode), None
        except Exception as e:  # reported by the main process with the file named (a worker cannot raise nicely)
            return i, None, first_line(e)


def decode(path: Path, size: int, mode: str) -> torch.Tensor:
    """Read, convert and resize one image with PIL (bilinear), as torchvision's ImageFolder loader does."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, do not just warn
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with Image.open(path) as im:
            if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when that is still >= size: 2-8x faster
                im.draft(mode, (size, size))
            im = im.convert(mode).resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def _collate(items):
    """Stack the images that decoded; return the indices in batch order and the failures beside them."""
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _x, err in items if err is not None]
    x = torch.stack([x for _, x in good]) if good else torch.empty(0, dtype=torch.uint8)
    return torch.tensor([i for i, _ in good], dtype=torch.int64), x, bad


class _Batches(torch.utils.data.Sampler):
    """The index batches of the current pass, set by Split before each iteration (one loader, many epochs)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ---------------------------------------------------------------- a split
@dataclass
class Split:
    """One part of the data: labels and ids in memory, images read by batch and normalised on the way out."""
    name: str
    labels: np.ndarray  # int64
    ids: list[str]      # file paths relative to data.root, or digits:<i>
    images: object      # MemoryImages | CachedImages | FileImages
    mean: torch.Tensor  # (1, C, 1, 1)
    std: torch.Tensor
    workers: int = 0
    heads: list = field(default_factory=list)  # tasks.Head per column of labels (N, tasks); [] for one task
    skip_bad: bool = False
    skipped: set[int] = field(default_factory=set)  # indices of images that did not decode (data.skip_bad)
    _loader: object = None
    _sampler: _Batches | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.dtype == torch.uint8:  # one multiply-add in place: (x / 255 - mean) / std, within float rounding
            return raw.float().mul_(self._scale).sub_(self._shift)
        return (raw - self.mean) / self.std

    @property
    def _scale(self) -> torch.Tensor:
        return 1 / (255 * self.std)

    @property
    def _shift(self) -> torch.Tensor:
        return self.mean / self.std

    def batches(self, batch_size: int = 256, order: list[torch.Tensor] | None = None, *, pin: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(x normalised float32 NCHW, y, indices) per batch, in `order` (index batches) or sequentially."""
        if order is None:
            order = [torch.arange(i, min(i + batch_size, len(self))) for i in range(0, len(self), batch_size)]
        labels = torch.from_numpy(self.labels)
        for idx, raw, bad in self._raw(order, pin):
            if bad:
                self._bad(bad)
            if len(idx):
                yield self.normalize(raw), labels[idx], idx

    def arrays(self, limit: int | None = None, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A small part as numpy (the first `limit`, or `indices`): parity batches, calibration, test batches."""
        idx = torch.as_tensor(indices if indices is not None else np.arange(min(limit or len(self), len(self))))
        xs, ys = [], []
        for x, y, _ in self.batches(order=list(torch.split(idx, 256))):
            xs.append(x.numpy())
            ys.append(y.numpy())
        if not xs:
            return np.zeros((0, *self.input_shape), np.float32), np.zeros((0, *self.labels.shape[1:]), np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """n images drawn without replacement, reproducibly from the seed, in index order."""
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return self.arrays(indices=idx)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.mean.shape[1], *self._hw())

    def _hw(self) -> tuple[int, int]:
        if isinstance(self.images, FileImages):
            return self.images.size, self.images.size
        x = self.images.x if isinstance(self.images, MemoryImages) else self.images.mm
        return tuple(x.shape[-2:])

    def _raw(self, order: list[torch.Tensor], pin: bool):
        """(indices, raw images, failures) per index batch: sliced from memory or the cache, or decoded."""
        if not isinstance(self.images, FileImages):
            known_bad = getattr(self.images, "bad", None)
            for idx in order:
                bad = []
                if known_bad:
                    bad = [(i, "it did not decode when data.cache was built") for i in idx.tolist() if i in known_bad]
                    idx = idx[torch.tensor([i not in known_bad for i in idx.tolist()], dtype=torch.bool)]
                yield idx, self.images.take(idx), bad
            return
        if self._loader is None:
            self._sampler = _Batches()
            # a generator of its own: iterating a DataLoader draws its base seed from the global RNG otherwise,
            # which would move every later random draw (augmentation, dropout) and break resume's bit equality
            self._loader = torch.utils.data.DataLoader(
                self.images, batch_sampler=self._sampler, num_workers=self.workers, collate_fn=_collate,
                pin_memory=pin, persistent_workers=self.workers > 0, generator=torch.Generator(),
                prefetch_factor=4 if self.workers else None)
        self._sampler.batches = [i.tolist() for i in order]
        yield from self._loader

    def _bad(self, bad: list[tuple[int, str]]) -> None:
        if not self.skip_bad:
            i, err = bad[0]
            raise ConfigError(f"{self.ids[i]} (data.root): cannot read this image ({err}). Remove or replace the "
                              f"file, or set data.skip_bad: true to skip unreadable images (they are counted).")
        self.skipped.update(i for i, _ in bad)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    preprocessing: dict = field(default_factory=dict)
    heads: list = field(default_factory=list)  # tasks.Head per output head (recipe tasks:); [] for one task

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.input_shape

    @property
    def num_classes(self) -> int:
        """The scores a model of this data gives: its classes, or every head's classes."""
        return sum(len(h.classes) for h in self.heads) if self.heads else len(self.classes)

    def skipped(self) -> dict[str, list[str]]:
        """Images that did not decode and were skipped (data.skip_bad), per split, as file names."""
        return {s.name: sorted(s.ids[i] for i in s.skipped) for s in (self.train, self.val, self.test) if s.skipped}


# ---------------------------------------------------------------- loading
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
    import torch.nn.functional as F
    return F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False).numpy()


def _digits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # 8x8, values 0..16
    if cfg.channels == 3:
        x = np.repeat(x, 3, axis=1)
    ids = [f"digits:{i}" for i in range(len(x))]
    return x, d.target.astype(np.int64), [str(c) for c in range(10)], ids


def _is_image(path: str) -> bool:
    """A regular file (after symlinks) with an image suffix: FIFOs, sockets and devices are never opened."""
    try:
        return Path(path).suffix.lower() in IMAGE_SUFFIXES and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _list_folder(root: Path) -> tuple[list[Path], list[str]]:
    """Class folders and their images, as torchvision's ImageFolder finds them (sorted, one class per folder)."""
    from torchvision.datasets.folder import find_classes, make_dataset
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise ConfigError(f"data.root: {root} has no class sub-folders (expected e.g. {root}/cat/*.png).") from None
    found = make_dataset(str(root), class_to_idx, is_valid_file=_is_image, allow_empty=True)
    counts = np.bincount([c for _, c in found], minlength=len(classes))
    if (counts == 0).any():
        empty = [str(root / classes[i]) for i in np.flatnonzero(counts == 0)]
        raise ConfigError(f"data.root: class folder {empty[0]} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                          f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}. Add images, or remove "
                          f"the folder: an empty class would give a model that can never predict it.")
    return [Path(p) for p, _ in found], classes


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


def load_splits(cfg: DataConfig, seed: int, run_dir: Path | None = None, tasks: list | None = None) -> Splits:
    """List, split and describe the data; write the split file lists to run_dir/splits.json when given.

    `tasks` (the recipe's): labels become (N, tasks), one column per task, split as the class is (stratified)."""
    if cfg.kind == "digits":
        x, y, classes, ids = _digits(cfg)
        rest, test = _stratified(y, cfg.test_fraction, seed)
        tr, va = _stratified(y[rest], cfg.val_fraction, seed)
        train, val = rest[tr], rest[va]
        x = _resize(x, cfg.image_size)
        parts = {k: (MemoryImages(torch.from_numpy(np.ascontiguousarray(x[i]))), y[i], [ids[j] for j in i])
                 for k, i in (("train", train), ("val", val), ("test", test))}
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
        cache_dir = cfg.cache_dir or (run_dir.parent / ".data-cache" if run_dir is not None else None)
        parts = {k: (_images(p, cfg, cache_dir), y, [q.relative_to(cfg.root).as_posix() for q in p])
                 for k, (p, y) in labelled.items()}

    heads = _heads(tasks or [], classes)
    if heads:
        from pipeline.train.tasks import head_labels, read_csvs
        csvs = read_csvs(heads)
        parts = {k: (images, head_labels(heads, y, ids, csvs), ids) for k, (images, y, ids) in parts.items()}
    workers = usable_cores() if cfg.workers is None else cfg.workers
    mean, std, source = _mean_std(cfg, parts["train"][0], seed, workers)
    if len(mean) != cfg.channels or len(std) != cfg.channels:
        raise ConfigError(f"data.mean/std: need {cfg.channels} value(s) per list, one per channel.")
    m, s = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    splits = {k: Split(k, y, ids, images, m, s, workers=workers if isinstance(images, FileImages) else 0,
                       skip_bad=cfg.skip_bad, heads=heads) for k, (images, y, ids) in parts.items()}
    pre = {"image_size": cfg.image_size, "channels": cfg.channels, "layout": "NCHW", "dtype": "float32",
           "scale": "1/16 (digits 0..16)" if cfg.kind == "digits" else "1/255",
           "mean": [float(v) for v in mean], "std": [float(v) for v in std], "resize": "bilinear",
           "mean_std_from": source}
    if run_dir is not None and not (run_dir / "splits.json").exists():
        # atomic: under torchrun every rank gets here; file lists are relative to data.root
        from pipeline.artifacts import atomic_write_text
        atomic_write_text(run_dir / "splits.json", json.dumps(
            {"seed": seed, "root": str(cfg.root) if cfg.root else None, "classes": classes, "preprocessing": pre,
             **({"tasks": [h.describe() for h in heads]} if heads else {}),
             **{k: ids for k, (_, _, ids) in parts.items()}}, indent=1))
    return Splits(splits["train"], splits["val"], splits["test"], classes, pre, heads)


def _heads(tasks: list, classes: list[str]) -> list:
    if not tasks:
        return []
    from pipeline.train.tasks import make_heads
    return make_heads(tasks, classes)


def _images(paths: list[Path], cfg: DataConfig, cache_dir: Path | None):
    files = FileImages(paths, cfg.image_size, cfg.channels)
    if not cfg.cache or cache_dir is None:  # no run directory (ship's test batch): a few images, read directly
        return files
    return _cache(files, cfg, cache_dir)


def _cache(files: FileImages, cfg: DataConfig, cache_dir: Path) -> CachedImages:
    """Decode every image once into <cache_dir>/<key>.npy (uint8 N x C x H x W), keyed by what decides its bytes."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "size": cfg.image_size, "channels": cfg.channels,
                                   "resize": "PIL bilinear"}).encode())
    for p in files.paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = h.hexdigest()[:24]
    path, bad_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.bad.json"
    if path.exists() and bad_path.exists():
        return CachedImages(path, json.loads(bad_path.read_text())["bad"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(len(files), cfg.channels, cfg.image_size, cfg.image_size))
    workers = usable_cores() if cfg.workers is None else cfg.workers
    loader = torch.utils.data.DataLoader(files, batch_size=256, num_workers=workers, collate_fn=_collate,
                                         generator=torch.Generator())
    bad: list[int] = []
    for idx, x, failed in loader:
        if failed and not cfg.skip_bad:
            i, err = failed[0]
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"{files.paths[i]} (data.root): cannot read this image ({err}). Remove or replace "
                              f"the file, or set data.skip_bad: true to skip unreadable images (they are counted).")
        bad += [i for i, _ in failed]
        out[idx.numpy()] = x.numpy()
    out.flush()
    del out
    os.replace(tmp, path)
    (cache_dir / f"{key}.bad.json").write_text(json.dumps({"bad": bad}))
    return CachedImages(path, bad)


def _mean_std(cfg: DataConfig, train, seed: int, workers: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The recipe's mean and std, or fitted on the training split (a seeded sample of it when it is large)."""
    if cfg.mean and cfg.std:
        return np.array(cfg.mean, np.float32), np.array(cfg.std, np.float32), "recipe"
    if isinstance(train, MemoryImages):  # exactly as before streaming: numpy float32 over the whole split
        x = train.x.numpy()
        return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3)) + 1e-8, "train split"
    n = len(train)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:MEAN_STD_SAMPLE])
    probe = Split("train", np.zeros(n, np.int64), [str(p) for p in getattr(train, "paths", [])] or [""] * n, train,
                  torch.zeros(1, cfg.channels, 1, 1), torch.ones(1, cfg.channels, 1, 1),
                  workers=workers if isinstance(train, FileImages) else 0, skip_bad=cfg.skip_bad)
    total = torch.zeros(cfg.channels, dtype=torch.float64)
    sq = torch.zeros(cfg.channels, dtype=torch.float64)
    count = 0
    for x, _, _ in probe.batches(order=list(torch.split(torch.from_numpy(idx), 256))):
        x = x.double()
        total += x.sum(dim=(0, 2, 3))
        sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(count, 1)
    std = (sq / max(count, 1) - mean ** 2).clamp_min(0).sqrt() + 1e-8
    src = "train split" if len(idx) == n else f"train split ({len(idx)}-image seeded sample)"
    return mean.float().numpy(), std.float().numpy(), src
