"""Benchmark rows for a set of ONNX models: the same code on the host and on the device (runner.py).

A row is a dict (see pipeline/schema/report.schema.json, `row`): one artifact on one provider on one machine,
with `status` measured / estimated / skipped and, for every figure, how it was obtained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import energy as energy_mod
from .ortbench import CPU, Skip, Timed, feed, logits, open_session, stats, throughput, time_interleaved


@dataclass
class ModelEntry:
    name: str                 # artifact name, e.g. "student.int8.onnx"
    path: Path
    precision: str            # fp32 / fp16 / int8
    meta: dict[str, Any] = field(default_factory=dict)  # params, macs, size_bytes, role, stage ...


@dataclass
class BenchSettings:
    warmup: int = 20
    min_runs: int = 200
    min_duration_s: float = 1.0
    max_duration_s: float = 60.0  # the one default: stages/benchmark.Config uses it
    throughput_duration_s: float = 0.3
    energy_window_s: float = 1.0
    threads: list[int] = field(default_factory=lambda: [1])
    batch_sizes: list[int] = field(default_factory=lambda: [1])


def base_row(e: ModelEntry, provider: str, where: dict, backend: str = "onnxruntime") -> dict[str, Any]:
    return {"artifact": e.name, "role": e.meta.get("role"), "stage": e.meta.get("stage"), "format": "onnx",
            "precision": e.precision, "backend": backend, "provider": provider, "where": where,
            "size_bytes": e.meta.get("size_bytes"), "params": e.meta.get("params"), "macs": e.meta.get("macs"),
            "status": "skipped", "reason": None}


def skipped(e: ModelEntry, provider: str, where: dict, reason: str, backend: str = "onnxruntime") -> dict:
    return {**base_row(e, provider, where, backend), "status": "skipped", "reason": reason}


def measure(entries: list[ModelEntry], providers: list[str], s: BenchSettings, x: np.ndarray, y: np.ndarray,
            ref_preds: dict[str, np.ndarray], where: dict, *, meter=None, no_meter_energy=None,
            cache_dir: Path | None = None, log=print, evaluate=None, tasks: list[str] | None = None) -> list[dict]:
    """Open every (model, provider, threads) session, time them interleaved, then fill one row per
    (model, provider) from its fastest thread count.

    ref_preds: name -> predictions to report agreement with ("teacher", and the FP32 source of a quantized model).
    evaluate(sess) -> predictions over the whole test split, whose labels are y (the host streams a split too
    large to hold; x is then a small batch for timing); default: the predictions on x.
    no_meter_energy(latency_ms) -> (mj | None, source) is called when no meter is usable.
    tasks (a multi-task model's heads): y, the references and evaluate's predictions are (N, tasks), one column
    per task (`task_columns`); each row then has `heads`, and its accuracy and agreement are the first task's.
    """
    rows: list[dict] = []
    groups: dict[tuple[str, str], list[Timed]] = {}
    by_name = {e.name: e for e in entries}
    for e in entries:
        for prov in providers:
            if e.precision == "fp16" and prov == CPU:
                rows.append(skipped(e, prov, where, "FP16 on CPU is not a deployment target: onnxruntime's CPU "
                                    "provider runs most FP16 ops through casts; the artifact was built and checked"))
                continue
            timed: list[Timed] = []
            for t in (s.threads if prov == CPU else [1]):
                cache = cache_dir / f"{Path(e.name).stem}-{e.precision}" if cache_dir else None
                try:
                    sess = open_session(e.path, prov, t, e.precision, cache)
                except Skip as why:
                    rows.append(skipped(e, prov, where, str(why)))
                    timed = []
                    break
                timed.append(Timed(f"{e.name}|{prov}|{t}", sess, feed(sess, x[:1]), threads=t))
            if timed:
                groups[(e.name, prov)] = timed
    live = [t for ts in groups.values() for t in ts]
    if live:
        log(f"  timing {len(live)} sessions interleaved (batch 1)")
        time_interleaved(live, s.warmup, s.min_runs, s.min_duration_s, s.max_duration_s)
    for (name, prov), timed in groups.items():
        e = by_name[name]
        best = min(timed, key=lambda t: float(np.median(t.samples)))
        row = {**base_row(e, prov, where), "status": "measured", "batch": 1, "threads": best.threads,
               "latency_ms": stats(best.samples), "first_run_ms": best.first_run_ms,
               "p50_by_threads": {str(t.threads): float(np.median(t.samples)) for t in timed},
               "latency_source": f"measured: onnxruntime {prov}, {len(best.samples)} timed runs, interleaved"}
        if prov == "TensorrtExecutionProvider":  # the first run built the engine: build time, not latency
            row["build_time_s"] = best.first_run_ms / 1e3
        pred = evaluate(best.sess) if evaluate is not None else logits(best.sess, x).argmax(1)
        if tasks:
            row["heads"] = _heads(pred, y, tasks, {k: v for k, v in ref_preds.items() if k != name})
        first = (lambda a: a[:, 0] if a.ndim == 2 else a) if tasks else (lambda a: a)
        pred, y1 = first(pred), first(y)
        row["accuracy"] = float((pred == y1).mean())
        row["accuracy_n"] = len(y)  # images behind the figure: one of them is 1/n of accuracy
        row["accuracy_source"] = f"measured: this artifact through onnxruntime {prov} on the test split (n={len(y)})"
        row["agreement"] = {k: float((pred == first(v)).mean()) for k, v in ref_preds.items() if k != name}
        row["throughput"] = {str(b): throughput(best.sess, x, b, s.throughput_duration_s) for b in s.batch_sizes}
        row.update(_energy(best, meter, no_meter_energy, row["latency_ms"]["p50"], s))
        rows.append(row)
    return rows


def task_columns(pred: np.ndarray, names: list[str], tasks: list[str]) -> np.ndarray:
    """Predictions (N, outputs) of a model whose outputs are named after tasks, as (N, tasks): each output in its
    task's column, -1 where the model has no head for the task (a teacher of some tasks only)."""
    out = np.full((len(pred), len(tasks)), -1, np.int64)
    for k, n in enumerate(names):
        if n in tasks:
            out[:, tasks.index(n)] = pred[:, k]
    return out


def _heads(pred: np.ndarray, y: np.ndarray, tasks: list[str], refs: dict[str, np.ndarray]) -> dict:
    """Accuracy and agreement per head the model has (columns of task_columns)."""
    out = {}
    for c, t in enumerate(tasks):
        if (pred[:, c] < 0).any():
            continue
        agree = {k: float((pred[:, c] == v[:, c]).mean()) for k, v in refs.items() if (v[:, c] >= 0).all()}
        out[t] = {"accuracy": float((pred[:, c] == y[:, c]).mean()), "accuracy_n": len(y), "agreement": agree}
    return out


def _energy(t: Timed, meter, no_meter_energy, p50_ms: float, s: BenchSettings) -> dict:
    if meter is not None:
        r = energy_mod.measure_energy(lambda: t.sess.run(None, t.inputs), meter, s.energy_window_s)
        return {"energy_mj": r["mj_per_call"], "energy_how": "measured",
                "energy_source": f"measured: {r['meter']}, {r['calls']} inferences over {r['seconds']:.2f} s "
                                 f"(whole-package energy, not the model alone)"}
    if no_meter_energy is None:
        return {"energy_mj": None, "energy_how": "skipped",
                "energy_source": "skipped: no energy meter and no power figure"}
    mj, source = no_meter_energy(p50_ms)  # without a meter a figure is a formula, never a measurement
    return {"energy_mj": mj, "energy_how": "skipped" if mj is None else "estimated", "energy_source": source}


def meter_kinds(where: dict) -> tuple[str, ...]:
    """The meter closest to where the model runs: a Jetson's input rail, a GPU's counter, else the CPU package."""
    if where.get("board") and "jetson" in where["board"].lower():
        return ("tegrastats", "rapl")
    if any(p in where.get("ort_providers", []) for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")):
        return ("nvml", "rapl")
    return ("rapl", "nvml", "tegrastats")


def predictions(path: Path, x: np.ndarray) -> np.ndarray:
    """Argmax predictions of a model on CPU (reference for agreement)."""
    return logits(open_session(path, CPU, threads=0), x).argmax(1)
