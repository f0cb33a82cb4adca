"""`make bench`: the digits-64 recipe through the real pipeline, then issue 3's target ratios from its rows.

Every figure is a ratio of two measured benchmark rows of the same run (onnxruntime, batch 1, each artifact
at its fastest thread count, all timed interleaved in one process) or of counted MACs and file sizes; each
says which rows it comes from. Results go to bench-results/<run id>.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import is_candidate
from pipeline.config import RECIPES_DIR, load_profile, load_recipe
from pipeline.errors import ConfigError, StageError
from pipeline.report.budgets import noise_margin_ms
from pipeline.report.build import best_row

BENCH_RECIPE = RECIPES_DIR / "digits-64.yaml"
# issue 3, "Targets on this machine"
TARGETS = {"int8_speedup": 2.5, "max_drop": 0.01, "prune_efficiency": 0.7, "vs_teacher": 10.0}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console() if sys.stdout.isatty() else Console(width=150)  # make/CI logs: keep the table readable


@app.command()
def main(profile: Annotated[str, typer.Option(help="a name from profiles/ or a YAML path")] = "edge-cpu",
         recipe: Annotated[Path, typer.Option(help="what to compress")] = BENCH_RECIPE,
         runs_dir: Annotated[Path, typer.Option(help="where the run directory goes")] = Path("runs"),
         out_dir: Annotated[Path, typer.Option(help="where <run id>.json goes")] = Path("bench-results"),
         run: Annotated[Optional[Path], typer.Option(help="score this finished run instead of running")] = None,
         check: Annotated[bool, typer.Option(help="exit 1 when a target is missed")] = False) -> None:
    """Run the bench recipe, print the target ratios, write them as JSON."""
    load_before, t0, ran = os.getloadavg(), time.perf_counter(), run is None
    if run is None:
        from pipeline.runner import run_pipeline
        try:
            prof = load_profile(profile)
            run = run_pipeline(load_recipe(recipe, prof), prof, recipe_path=recipe, runs_dir=runs_dir,
                               console=console)
        except (ConfigError, StageError) as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2 if isinstance(e, ConfigError) else 1) from None
    result = score(run)
    if ran:  # how busy the machine was while this run was timed: the figures are only as quiet as the host
        import resource
        use = resource.getrusage(resource.RUSAGE_SELF)
        result.update(wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(use.ru_utime + use.ru_stime, 1),
                      load_avg={"before": load_before, "after": os.getloadavg(), "cores": os.cpu_count(),
                                "note": "1/5/15-min load averages; above the core count, other work shared "
                                        "the CPUs"})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['run_id']}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    _print(result, path)
    if check and not result["all_met"]:
        raise typer.Exit(1)


def score(run_dir: Path) -> dict[str, Any]:
    """The target ratios from a finished run's report.json and run.json."""
    run_dir = Path(run_dir).resolve()
    report = json.loads((run_dir / "report.json").read_text())
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    meta = {n: o.get("meta", {}) for s in stages.values() for n, o in s.get("outputs", {}).items()}
    rows = report["rows"]
    lat = {a: best_row(rows, a, True) or best_row(rows, a, False) for a in {r["artifact"] for r in rows}}
    figs: list[dict] = []
    # 1) INT8 vs its FP32 source; the target is on the student, the pruned student's is shown for information
    for art, m in sorted(meta.items(), key=lambda kv: kv[1].get("source_onnx") != "student.onnx"):
        if m.get("precision") == "int8" and m.get("source_onnx"):
            gate = m["source_onnx"] == "student.onnx"
            figs += _pair(lat, art, m["source_onnx"], "INT8 vs FP32", TARGETS["int8_speedup"] if gate else None)
            figs += _per_thread(lat, art, m["source_onnx"], "INT8 vs FP32")
    if not any(m.get("precision") == "int8" and m.get("source_onnx") == "student.onnx" for m in meta.values()):
        figs.append(_fig("INT8 vs FP32", "student.int8.onnx", "student.onnx", "p50 speedup", None, "measured",
                         False, "—", "not built: add student.onnx to quantize.sources (the target is on the "
                                     "student itself)"))
    # 2) pruned vs unpruned: real speedup against the counted MAC reduction
    figs += _prune(lat, "student-pruned.onnx", "student.onnx")
    figs += _per_thread(lat, "student-pruned.onnx", "student.onnx", "pruned vs unpruned")
    # 3) the recommended artifact vs the teacher
    rec = (report.get("recommended") or {}).get("artifact")
    if rec:
        figs += _pair(lat, rec, "teacher.onnx", "recommended vs teacher", TARGETS["vs_teacher"], size=True)
    else:
        figs.append(_fig("recommended vs teacher", "—", "teacher.onnx", "recommended artifact", None, None, False,
                         "none", "report.json: no artifact meets the profile's budgets; flags: " +
                         ", ".join(f"{f['artifact']} {f['kind']}" for f in report["flags"])))
        # still show how far the fastest student artifact got, labelled as not recommended
        cands = [a for a, r in lat.items() if r and is_candidate(r.get("role"))]
        if cands:
            best = min(cands, key=lambda a: lat[a]["latency_ms"]["p50"])
            figs += _pair(lat, best, "teacher.onnx", "fastest student (not recommended) vs teacher", None, size=True)
    checked = [f for f in figs if f["met"] is not None]
    n = _n(rows)
    return {"run_id": report["run_id"], "run_dir": str(run_dir), "profile": report["profile"]["name"],
            "recipe": report["recipe"]["name"],
            "host": {k: report["environment"].get(k) for k in ("hostname", "cpu", "onnxruntime")},
            "recommended": report.get("recommended"), "flags": report["flags"], "figures": figs,
            "met": sum(bool(f["met"]) for f in checked), "checked": len(checked),
            "all_met": all(f["met"] for f in checked),
            "stage_durations_s": {k: v.get("duration_s") for k, v in stages.items()},
            "accuracy_note": f"test split, n={n}: one image is {100 / max(n, 1):.2f} points"}


def _fig(comparison: str, new: str, base: str, figure: str, value: float | None, target: str | None,
         met: bool | None, short: str, source: str) -> dict:
    return {"comparison": comparison, "new": new, "base": base, "figure": figure, "value": value,
            "target": target, "met": met, "short": short, "source": source}


def _n(rows: list[dict]) -> int:
    """Test images behind the measured accuracies (0 for a report written before rows carried accuracy_n)."""
    return next((r["accuracy_n"] for r in rows if r.get("accuracy_n")), 0)


def _rowname(r: dict) -> str:
    return (f"{r['artifact']} ({r['provider'].replace('ExecutionProvider', '')}, {r['where'].get('kind')}, "
            f"{r.get('threads')} thread(s), batch 1)")


def _speedup(a: dict, b: dict, label: str, target: float | None) -> dict:
    pa, pb = a["latency_ms"]["p50"], b["latency_ms"]["p50"]
    margin = noise_margin_ms(a["latency_ms"], b["latency_ms"])
    return _fig(label, a["artifact"], b["artifact"], "p50 speedup", pb / pa, f">= {target}" if target else None,
                pb / pa >= target if target else None,
                f"{pb:.3f} / {pa:.3f} ms ({b.get('threads')}/{a.get('threads')} thr)",
                f"measured rows {_rowname(b)} and {_rowname(a)}: p50 {pb:.4f} / {pa:.4f} ms, timed interleaved; "
                f"noise margin {margin:.4f} ms")


def _drop(a: dict, b: dict, label: str, gate: bool) -> dict:
    drop = b["accuracy"] - a["accuracy"]
    return _fig(label, a["artifact"], b["artifact"], "accuracy drop (points)", 100 * drop,
                f"<= {100 * TARGETS['max_drop']:g}" if gate else None, drop <= TARGETS["max_drop"] + 1e-9 if gate
                else None, f"{b['accuracy']:.4f} - {a['accuracy']:.4f}",
                f"measured: onnxruntime test-split accuracy of rows {_rowname(b)} minus {_rowname(a)}")


def _missing(lat: dict, new: str, base: str, label: str, gate: bool) -> list[dict]:
    gone = [x for x in (new, base) if lat.get(x) is None]
    if not gone:
        return []
    return [_fig(label, new, base, "p50 speedup", None, "measured" if gate else None, False if gate else None,
                 "—", f"skipped: no measured batch-1 row for {', '.join(gone)}")]


def _pair(lat: dict, new: str, base: str, label: str, target: float | None, size: bool = False) -> list[dict]:
    if miss := _missing(lat, new, base, label, bool(target)):
        return miss
    a, b = lat[new], lat[base]
    out = [_speedup(a, b, label, target)]
    if size:
        ratio = b["size_bytes"] / a["size_bytes"]
        out.append(_fig(label, new, base, "file size ratio", ratio, f">= {target}" if target else None,
                        ratio >= target if target else None,
                        f"{b['size_bytes'] / 1e6:.2f} / {a['size_bytes'] / 1e6:.3f} MB",
                        f"artifact bytes with sidecars: {b['size_bytes']:,} / {a['size_bytes']:,}"))
    return out + [_drop(a, b, label, gate=bool(target))]


def _per_thread(lat: dict, new: str, base: str, label: str) -> list[dict]:
    """The same speedup at each thread count both were timed with (the rows' p50_by_threads), for information:
    INT8 kernels barely use a second thread, so the fastest count, and the ratio, depend on the count and on
    the machine's load."""
    a, b = lat.get(new), lat.get(base)
    if a is None or b is None:
        return []
    pa, pb = a.get("p50_by_threads") or {}, b.get("p50_by_threads") or {}
    return [_fig(f"{label} (info)", new, base, f"p50 speedup at {t} thread(s)", pb[t] / pa[t], None, None,
                 f"{pb[t]:.3f} / {pa[t]:.3f} ms", f"measured rows {_rowname(b)} and {_rowname(a)}, their p50 at "
                 f"{t} thread(s): {pb[t]:.4f} / {pa[t]:.4f} ms, timed interleaved")
            for t in sorted(set(pa) & set(pb), key=int)]


def _prune(lat: dict, new: str, base: str) -> list[dict]:
    label = "pruned vs unpruned"
    if miss := _missing(lat, new, base, label, True):
        return miss
    a, b = lat[new], lat[base]
    speed = _speedup(a, b, label, None)
    macs = b["macs"] / a["macs"]
    eff = speed["value"] / macs
    return [_fig(label, new, base, "MAC reduction", macs, None, None,
                 f"{b['macs'] / 1e6:.2f} / {a['macs'] / 1e6:.2f} M",
                 f"counted (torch-pruning op counter, batch 1): {b['macs']:,} / {a['macs']:,} MACs"),
            speed,
            _fig(label, new, base, "speedup / MAC reduction", eff, f">= {TARGETS['prune_efficiency']}",
                 eff >= TARGETS["prune_efficiency"], f"{speed['value']:.2f} / {macs:.2f}", "the two figures above"),
            _drop(a, b, label, gate=True)]


def _print(result: dict, path: Path) -> None:
    table = Table(title=f"bench: {result['recipe']} on {result['profile']} ({result['run_id']})")
    for h in ("comparison", "base / new", "figure", "measured", "target", "met", "base / new figures"):
        table.add_column(h, overflow="fold")
    for f in result["figures"]:
        v = "—" if f["value"] is None else f"{f['value']:.2f}"
        met = "—" if f["met"] is None else ("[green]yes[/]" if f["met"] else "[red]NO[/]")
        pair = f"{f['base'].removesuffix('.onnx')} / {f['new'].removesuffix('.onnx')}"
        table.add_row(f["comparison"], pair, f["figure"], v, f["target"] or "info", met, f["short"])
    console.print(table)
    rec, load = result["recommended"], result.get("load_avg")
    console.print(f"recommended: {rec['artifact'] if rec else 'none'}; targets met {result['met']}/"
                  f"{result['checked']}; {result['accuracy_note']}")
    took = (f"the run took {result['wall_s']} s ({result['cpu_s']} CPU s); load average {load['before'][0]:.1f} "
            f"before, {load['after'][0]:.1f} after, on {load['cores']} cores" if load else "scored an existing run")
    console.print(f"latency: onnxruntime CPU, batch 1, p50 of each artifact at its fastest thread count; {took}.")
    console.print(f"each figure's rows and sources: {path}")


if __name__ == "__main__":
    app()
