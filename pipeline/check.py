"""`pipeline check`: everything a run needs, checked in seconds, one line per check (ok, or the sentence to act on).

A run finds a bad file, a model that does not fit the data or an unreachable device only when it gets there;
this finds them first: `make pipeline` runs it before `pipeline run`. It reads, builds and runs nothing that a
run would keep (no run directory).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import (DataConfig, Profile, RecipeBase, check_model, check_paths, load_profile, model_specs,
                             model_outputs, num_classes, parse_recipe)
from pipeline.errors import ConfigError, first_line

BATCH = 16  # images read and run through the teacher: enough to show the shapes, few enough to take no time
SSH_TIMEOUT_S = 20  # the whole `ssh ... true`; ssh's own connect timeout is 10 s (pipeline/ship/ssh.py)


class _Checks:
    """Runs checks in order; each prints one line, and a failed one marks the checks that need it skipped."""

    def __init__(self, echo: Callable[[str], None], debug: bool):
        self.echo, self.debug, self.failed = echo, debug, False

    def __call__(self, name: str, fn: Callable[[], tuple[str, Any]], needs: bool = True) -> Any:
        """Run fn -> (detail, value); print `ok name: detail` or `FAIL name: sentence`; return value or None."""
        if not needs:
            self.echo(f"skip  {name}: needs the checks above")
            return None
        try:
            detail, value = fn()
        except ConfigError as e:
            self._fail(name, str(e))
            return None
        except Exception as e:  # a check that crashes is a bug of ours: say so, keep checking the rest
            if self.debug:
                raise
            self._fail(name, f"unexpected {first_line(e)} (a bug in the check: rerun with --debug for the "
                             f"traceback and report it)")
            return None
        self.echo(f"ok    {name}: {detail}")
        return value

    def _fail(self, name: str, msg: str) -> None:
        self.failed = True
        self.echo(f"FAIL  {name}: {msg}".replace("\n", "\n      "))


def run_checks(recipe_path: Path, profile_name: str, echo: Callable[[str], None], debug: bool = False,
               sets: list[str] = ()) -> bool:
    """Check configs, paths, models, data, the teacher on a real batch and the device; True when all pass."""
    t0 = time.perf_counter()
    check = _Checks(echo, debug)
    recipe_path = Path(recipe_path)
    prof = check("profile", lambda: _profile(profile_name))
    rec = check("recipe", lambda: _recipe(recipe_path, prof, sets))
    paths = check("paths", lambda: _paths(recipe_path, rec), needs=rec is not None)
    data = check("data", lambda: _data(recipe_path, rec), needs=paths is not None)
    models_ok = []
    for field, spec in (model_specs(rec).items() if paths is not None else []):
        models_ok.append(check(field, lambda f=field, s=spec: _model(recipe_path, f, s, rec, data),
                               needs=data is not None))
    if paths is None:
        check("models", lambda: ("", None), needs=False)
    check("teacher on a batch", lambda: _teacher_batch(rec, data),
          needs=data is not None and bool(models_ok) and models_ok[0] is not None)
    check("device", lambda: _device(prof), needs=prof is not None)
    echo(f"{'not ready' if check.failed else 'ready'}: checked in {time.perf_counter() - t0:.1f} s")
    return not check.failed


# ---------------------------------------------------------------- the checks: each returns (detail, value)
def _profile(name: str) -> tuple[str, Profile]:
    p = load_profile(name)
    return f"{p.name}, {p.target.kind}: {p.target.name} ({p.where})", p


def _recipe(path: Path, prof: Profile | None, sets: list[str] = ()) -> tuple[str, RecipeBase]:
    rec = parse_recipe(path, prof, sets)
    note = "" if prof is not None else " (without the profile's overrides: the profile did not load)"
    note += f" (with {len(sets)} --set)" if sets else ""
    return f"{rec.name}, every setting valid{note}", rec


def _paths(path: Path, rec: RecipeBase) -> tuple[str, bool]:
    check_paths(path, rec)
    named = [f"{f}.{a}" for f, s in model_specs(rec).items() for a in ("checkpoint", "onnx") if getattr(s, a)]
    named += ["data.root"] if rec.data.root is not None else []
    return (f"{', '.join(named)} found" if named else "no files named: models train from scratch on "
            f"{rec.data.kind}"), True


def _data(path: Path, rec: RecipeBase) -> tuple[str, tuple[np.ndarray, int]]:
    """The class count and a first batch of real images, preprocessed as the run will."""
    classes = num_classes(rec.data, path)
    if rec.data.kind == "digits":
        from pipeline.train.data import load_splits
        splits = load_splits(rec.data, rec.seed)
        x, _ = splits.train.arrays(_batch(rec.data))
        total = sum(len(s) for s in (splits.train, splits.val, splits.test))
        return f"digits: {total:,} images, {classes} classes, a batch of {len(x)} read", (x, classes)
    x, listed = _imagefolder_batch(rec.data)
    labelled = f", every image labelled for {len(rec.tasks)} tasks" if rec.tasks and _task_labels(rec) else ""
    return (f"imagefolder {rec.data.root}: {classes} classes, {listed:,} images listed, {len(x)} decoded"
            f"{labelled}", (x, classes))


def _task_labels(rec: RecipeBase) -> bool:
    """Every image of the folder has a row in every tasks CSV (the first one missing is named), as the run needs."""
    from pipeline.train.data import _imagefolder
    from pipeline.train.tasks import head_labels, make_heads, read_csvs
    parts, classes = _imagefolder(rec.data)
    heads = make_heads(rec.tasks, classes)
    csvs = read_csvs(heads)
    for paths, y in parts.values():
        head_labels(heads, y, [p.relative_to(rec.data.root).as_posix() for p in paths], csvs)
    return True


def _model(path: Path, field: str, spec, rec: RecipeBase, data: tuple[np.ndarray, int]) -> tuple[str, bool]:
    outputs = model_outputs(rec, spec, data[1], path)
    check_model(path, field, spec, rec.data, outputs)
    what = f"ONNX {spec.onnx.name}" if spec.onnx else f"arch {spec.arch}" + (
        f" with checkpoint {spec.checkpoint.name}" if spec.checkpoint else "")
    return f"{what}: builds, gives {outputs} class scores", True


def _teacher_batch(rec: RecipeBase, data: tuple[np.ndarray, int]) -> tuple[str, bool]:
    """The real teacher (checkpoint loaded, or the ONNX file in onnxruntime) on the first batch of real data."""
    import torch

    from pipeline.train import models
    x, classes = data
    spec = rec.models.teacher
    classes = model_outputs(rec, spec, classes)
    with torch.random.fork_rng(devices=[]):  # a check must not move a seeded draw
        if spec.onnx is not None:
            teacher = models.OnnxModule(spec.onnx)
        else:
            teacher = models.build(spec, x.shape[1], classes, x.shape[-1], field="models.teacher").eval()
        with torch.no_grad():
            y = teacher(torch.from_numpy(x))
    if tuple(y.shape) != (len(x), classes):
        raise ConfigError(f"models.teacher: gives {tuple(y.shape)} for a batch of {len(x)} real images; the data "
                          f"needs ({len(x)}, {classes}).")
    if not bool(torch.isfinite(y).all()):
        raise ConfigError("models.teacher: gives NaN or infinite scores on real images; check its checkpoint and "
                          "data.mean/std.")
    return f"a batch of {len(x)} real images gives {tuple(y.shape)} finite scores", True


def _device(prof: Profile | None) -> tuple[str, bool]:
    from pipeline.ship import kit, ssh
    named = os.environ.get("PIPELINE_DEVICE")
    device = named or (prof.device if prof is not None else None)
    if not device:
        return "none named: this host's numbers are labelled host (set PIPELINE_DEVICE or the profile's device)", True
    try:
        remote = kit.resolve(device, prof.device if prof is not None else None)
    except ValueError as e:
        raise ConfigError(f"{f'PIPELINE_DEVICE={named!r}' if named else f'{prof.where}: device'}: {e}") from None
    try:
        ssh.run(remote, ["true"], timeout=SSH_TIMEOUT_S)
    except ssh.RemoteError as e:
        raise ConfigError(str(e)) from None
    return f"{remote.destination} port {remote.port} answers `ssh ... true`", True


def _batch(cfg: DataConfig) -> int:
    """BATCH images, fewer when they are large: at most 16 M floats (64 MB), and at least 2."""
    return max(2, min(BATCH, 2 ** 24 // (cfg.channels * cfg.image_size ** 2)))


# ---------------------------------------------------------------- a few images of an image folder
def _imagefolder_batch(cfg: DataConfig) -> tuple[np.ndarray, int]:
    """List every class folder (train/, val/, test/ or the root) and decode at most BATCH images, a few per class:
    load_splits would fit mean and std on thousands of images, which is the run's work, not a check's."""
    from PIL import Image
    suffixes = set(Image.registered_extensions())
    root = cfg.root
    assert root is not None
    parts = [root / p for p in ("train", "val", "test") if (root / p).is_dir()] or [root]
    per_class: dict[str, list[Path]] = {}
    listed = 0
    for part in parts:
        classes = sorted(d.name for d in os.scandir(part) if d.is_dir())
        if part != parts[0] and classes != sorted(per_class):
            raise ConfigError(f"data.root: {part} has classes {classes}, {parts[0]} has {sorted(per_class)}.")
        for c in classes:
            found = sorted(p for p in (part / c).iterdir() if p.suffix.lower() in suffixes and p.is_file())
            if not found:
                raise ConfigError(f"data.root: class folder {part / c} has no images; add images or remove it.")
            listed += len(found)
            per_class.setdefault(c, []).extend(found[:BATCH])
    n = _batch(cfg)
    sample = [p for i in range(n) for files in per_class.values() if i < len(files) for p in [files[i]]][:n]
    mode = "L" if cfg.channels == 1 else "RGB"
    x = np.empty((len(sample), cfg.channels, cfg.image_size, cfg.image_size), np.float32)
    for i, p in enumerate(sample):
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert(mode).resize((cfg.image_size, cfg.image_size), Image.BILINEAR),
                               np.float32) / 255.0
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, DecompressionBombError ...
            raise ConfigError(f"{p} (data.root): cannot read this image ({first_line(e)}). Remove or replace "
                              f"it, or set data.skip_bad: true.") from None
        x[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    mean = np.array(cfg.mean if cfg.mean else x.mean(axis=(0, 2, 3)), np.float32)[None, :, None, None]
    std = np.array(cfg.std if cfg.std else x.std(axis=(0, 2, 3)) + 1e-8, np.float32)[None, :, None, None]
    if mean.shape[1] != cfg.channels or std.shape[1] != cfg.channels:
        raise ConfigError(f"data.mean/std: need {cfg.channels} value(s) per list, one per channel.")
    return (x - mean) / std, listed
