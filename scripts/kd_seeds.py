"""Teacher / KD / scratch test accuracy and gap closed per seed, through the real teacher and distill stages.

    .venv/bin/python scripts/kd_seeds.py [--recipe recipes/digits.yaml] [--seeds 0,1,2] [--set KEY=VALUE ...]
                                         [--variant 'KEY=VALUE;KEY=VALUE' ...] [--make-data]

KEY is a dotted recipe path, VALUE is YAML: --set teacher.epochs=60 --set 'models.student.kwargs={channels: [6, 12]}'.
`--set` changes the recipe for everything; each `--variant` (default: the recipe as it is) is a separate distill
run from the same teacher (trained once per seed), so it may change only distill.* and models.student. Prints one
row per seed and variant, then per variant the means over seeds, their standard errors and standard deviations.
`--make-data` first writes scikit-learn's digits as a 32x32 colour ImageFolder at the recipe's data.root
(recipes/imagefolder-32.yaml points there), or reuses the one an earlier call wrote.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from rich.console import Console

from pipeline.config import DEFAULT_RECIPE, apply_sets, load_profile, recipe_model
from pipeline.context import Context
from pipeline.runner import Runner
from stages import distill

# --make-data: each of scikit-learn's 1,797 8x8 digits drawn once into a 32x32 RGB image, at a seeded random size,
# angle and place, in two random colours with Gaussian pixel noise: a task a small net does not solve in a few
# steps, so a teacher has something to pass on (README: Distillation). Stronger noise (16) and rotation (15 deg)
# kept the nets at chance for longer than this host affords. The drawing is fixed (its own seed); the --seeds vary
# the training, the val split and the teacher.
DIGITS32 = {"version": 1, "image_size": 32, "seed": 0, "test_fraction": 0.2, "glyph_px": [18, 26],
            "rotation_deg": 10.0, "min_luma_contrast": 80.0, "noise_std": 10.0}
MARKER = "digits32.json"  # written last: a folder without it (or with other settings) is not one of ours, or partial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for the whole run (YAML value)")
    ap.add_argument("--variant", action="append", default=[], help="'KEY=VALUE;KEY=VALUE': one distill run each")
    ap.add_argument("--verbose", action="store_true", help="show the stages' progress bars")
    ap.add_argument("--make-data", action="store_true", help="write the 32x32 digits ImageFolder at data.root first")
    args = ap.parse_args()
    profile, console = load_profile("edge-cpu"), Console(quiet=not args.verbose)
    base = yaml.safe_load(args.recipe.read_text())
    if (base.get("data") or {}).get("root") is not None:  # relative to the recipe file, as `pipeline run` reads it
        base["data"]["root"] = str((args.recipe.resolve().parent / base["data"]["root"]).resolve())
    apply_sets(base, args.set)  # the same KEY=VALUE as `pipeline run --set`
    if args.make_data:
        if not (base.get("data") or {}).get("root"):
            ap.error(f"--make-data writes the images at data.root, and {args.recipe} has none: use "
                     f"--recipe recipes/imagefolder-32.yaml or --set data.root=DIR.")
        print(f"{write_digits32(Path(base['data']['root']))} {base['data']['root']}")
    variants = args.variant or [""]
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    print(f"{'seed':>4} {'teacher':>8} {'KD':>8} {'scratch':>8} {'gap closed':>10} {'s':>5}  variant")
    top = tempfile.TemporaryDirectory()  # seeds' run directories and their shared data.cache (<top>/.data-cache)
    for seed in [int(s) for s in args.seeds.split(",")]:
        with tempfile.TemporaryDirectory(dir=top.name) as tmp:
            recipe = recipe_model().model_validate({**base, "seed": seed})
            runner = Runner(Path(tmp), recipe, profile, recipe_path=args.recipe, console=console)
            teacher_out = runner.run(until="teacher")
            for v in variants:
                data = copy.deepcopy({**base, "seed": seed})
                apply_sets(data, [a for a in v.split(";") if a])
                rec = recipe_model().model_validate(data)
                ctx = Context(run_dir=Path(tmp), recipe=rec, profile=profile, console=console)
                t0 = time.perf_counter()
                distill.run(teacher_out, rec.distill, ctx)
                d = ctx.results["distill"]
                rows[v].append(d)
                gap = "n/a" if d["gap_closed"] is None else f"{d['gap_closed']:.3f}"
                print(f"{seed:>4} {d['acc_teacher']:>8.4f} {d['acc_kd']:>8.4f} {d['acc_scratch']:>8.4f} {gap:>10} "
                      f"{time.perf_counter() - t0:>5.0f}  {v}", flush=True)
    for v, rs in rows.items():
        mean = {k: statistics.mean(r[k] for r in rs) for k in ("acc_teacher", "acc_kd", "acc_scratch")}
        gaps = [r["gap_closed"] for r in rs if r["gap_closed"] is not None]
        of_means = (mean["acc_kd"] - mean["acc_scratch"]) / (mean["acc_teacher"] - mean["acc_scratch"])
        print(f"mean {mean['acc_teacher']:>8.4f} {mean['acc_kd']:>8.4f} {mean['acc_scratch']:>8.4f} "
              f"{statistics.mean(gaps) if gaps else float('nan'):>10.3f}        {v}  (gap closed: mean over "
              f"{len(gaps)} seeds with teacher > scratch; of the mean accuracies: {of_means:.3f})")
        se = {k: _se([r[k] for r in rs]) for k in ("acc_teacher", "acc_kd", "acc_scratch")}
        diff = [r["acc_kd"] - r["acc_scratch"] for r in rs]
        print(f"  se {se['acc_teacher']:>8.4f} {se['acc_kd']:>8.4f} {se['acc_scratch']:>8.4f} {_se(gaps):>10.3f}"
              f"        {v}  (standard error over seeds; KD - scratch per seed: {statistics.mean(diff):+.4f} "
              f"+- {_se(diff):.4f}, better/equal/worse {sum(d > 0 for d in diff)}/{sum(d == 0 for d in diff)}/"
              f"{sum(d < 0 for d in diff)})")
        sd = {k: _sd([r[k] for r in rs]) for k in ("acc_teacher", "acc_kd", "acc_scratch")}
        print(f"  sd {sd['acc_teacher']:>8.4f} {sd['acc_kd']:>8.4f} {sd['acc_scratch']:>8.4f} {_sd(gaps):>10.3f}"
              f"        {v}  (standard deviation over seeds; KD - scratch per seed: {statistics.mean(diff):+.4f} "
              f"+- {_sd(diff):.4f})")
    top.cleanup()


def _sd(values: list[float]) -> float:
    """Sample standard deviation; nan below two values."""
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _se(values: list[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); nan below two values."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def write_digits32(root: Path) -> str:
    """scikit-learn's digits as root/{train,test}/<digit>/<index>.png, drawn as DIGITS32 says: 'written' or
    'reused' (the marker holds the same settings). Refuses a non-empty folder it did not write."""
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == DIGITS32:
            return "reused"
        shutil.rmtree(root)  # ours, drawn with other settings: redraw
    elif root.is_dir() and any(root.iterdir()):
        raise SystemExit(f"--make-data: {root} is not empty and has no {MARKER}: it is not a folder this script "
                         f"wrote. Point data.root elsewhere (--set data.root=DIR), or empty it.")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits, p = load_digits(), DIGITS32
    rng = np.random.default_rng(p["seed"])
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=p["test_fraction"], stratify=digits.target,
                                   random_state=p["seed"])
    for part, ids in (("train", train), ("test", test)):
        for i in sorted(ids):
            folder = root / part / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_draw(digits.images[i] / 16.0, rng)).save(folder / f"{i:04d}.png")
    marker.write_text(json.dumps(DIGITS32))
    return "written"


def _draw(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 8x8 digit (0..1) as a size x size uint8 RGB image."""
    p, size = DIGITS32, DIGITS32["image_size"]
    side = int(rng.integers(p["glyph_px"][0], p["glyph_px"][1] + 1))
    glyph = Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    glyph = glyph.rotate(float(rng.uniform(-p["rotation_deg"], p["rotation_deg"])), Image.BILINEAR)
    canvas = Image.new("L", (size, size))
    canvas.paste(glyph, (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))))
    ink = np.asarray(canvas, np.float32)[..., None] / 255
    luma = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601: the digit must stand out in brightness, either way
    while True:
        back, fore = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs((fore - back) @ luma) >= p["min_luma_contrast"]:
            break
    image = back * (1 - ink) + fore * ink + rng.normal(0, p["noise_std"], (size, size, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


if __name__ == "__main__":
    main()
