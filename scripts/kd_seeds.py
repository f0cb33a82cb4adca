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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from pipeline.config import DEFAULT_RECIPE, apply_sets, load_profile, recipe_model
from pipeline.context import Context
from pipeline.runner import Runner
from stages import distill

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or imported as scripts.kd_seeds
from digit_images import write_digits32


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


if __name__ == "__main__":
    main()
