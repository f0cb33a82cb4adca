"""benchmark: every ONNX artifact on every provider the profile asks for, on the host and on the target.

Rows are measured, estimated or skipped, each figure with how it was obtained. A provider that is missing
or falls back to CPU gives a skipped row with the reason, never a CPU number under a GPU label.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
from pydantic import Field

from pipeline.artifacts import Artifact, Artifacts, atomic_write_text
from pipeline.config import Target
from pipeline.context import Context
from pipeline.device import energy as energy_mod
from pipeline.device import envinfo, trtbench
from pipeline.device.measure import BenchSettings, ModelEntry, measure, meter_kinds, task_columns
from pipeline.device.ortbench import CPU, head_outputs, logits, open_session
from pipeline.report import estimate
from pipeline.settings import Strict
from pipeline.train.data import Split

USES_PROFILE = True
TIMING_IMAGES = 64  # test images timing and throughput batches are tiled from (accuracy uses the whole split)
NOT_ON_TARGET = "not measured on the target: set PIPELINE_DEVICE to benchmark on the device"


class Config(Strict):
    warmup: int = Field(20, ge=1, description="untimed runs first; the first one is reported as first_run_ms")
    min_runs: int = Field(200, ge=10, description="timed runs per session at least")
    min_duration_s: float = Field(1.0, ge=0, description="timed work per session at least")
    max_duration_s: float = Field(BenchSettings.max_duration_s, gt=0, description="cap on the interleaved timing loop")
    throughput_duration_s: float = Field(0.3, gt=0)
    energy_window_s: float = Field(1.0, gt=0, description="meters update slowly; a shorter window is noise")
    host_reference: bool = Field(True, description="also time on this host's CPU, labelled host, when the "
                                                   "profile targets something else")


def settings(cfg: Config, t: Target) -> BenchSettings:
    """What the timing loop needs: the stage's settings and the target's thread counts and batch sizes."""
    return BenchSettings(cfg.warmup, cfg.min_runs, cfg.min_duration_s, cfg.max_duration_s,
                         cfg.throughput_duration_s, cfg.energy_window_s, list(t.threads), list(t.batch_sizes))


def entries(inputs: Artifacts, ctx: Context) -> list[ModelEntry]:
    return [ModelEntry(a.name, ctx.path(a.name), a.meta.get("precision", "fp32"),
                       {**a.meta, "size_bytes": a.size_bytes, "stage": a.stage})
            for a in inputs.values() if a.kind == "onnx" and (a.meta.get("role") != "extra-teacher"
                                                             or a.meta.get("heads"))]  # a teacher of tasks


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Measure on the host, on the device if one is named, estimate the target where nothing measured it."""
    # 1) what to measure, and the references for agreement
    data, profile = ctx.data(), ctx.profile
    models = entries(inputs, ctx)
    teacher = next((m for m in models if m.meta.get("role") == "teacher"), None)
    tasks = [h.name for h in data.heads] or None  # with tasks: predictions and labels are (N, tasks)
    refs = {"teacher": _teacher_predictions(models, data.test, tasks)} if teacher else {}
    x_time, _ = data.test.arrays(limit=TIMING_IMAGES)  # inputs for timing and throughput, not for accuracy
    # 2) host rows: the profile's providers, plus this CPU as a labelled reference
    providers = list(profile.target.providers)
    if cfg.host_reference and CPU not in providers:
        providers.append(CPU)
    where = envinfo.describe("host")
    meter, meter_reasons = energy_mod.pick_meter(kinds=meter_kinds(where))
    timing = settings(cfg, profile.target)
    rows = measure(models, providers, timing, x_time, data.test.labels, refs, where, meter=meter,
                   no_meter_energy=_host_energy(ctx), cache_dir=ctx.path("trt-cache"), log=ctx.log,
                   evaluate=lambda sess: _predictions(sess, data.test, tasks=tasks), tasks=tasks)
    _add_source_agreement(rows, models, data.test)
    # 3) native TensorRT (trtexec) where the profile wants it
    if profile.target.tensorrt:
        rows += trtbench.rows(models, where, "input", list(data.input_shape), ctx.path("trt-cache"), log=ctx.log)
    # 4) the device over SSH, when one is named
    notes: list[str] = []
    device = os.environ.get("PIPELINE_DEVICE") or profile.device
    if device:
        from pipeline.ship.kit import remote_rows
        rows += remote_rows(device, models, data, refs, timing, ctx)
    for r in rows:
        r["on_target"] = _on_target(r, profile.target, device_named=bool(device))
    # 5) estimates where the target has no measurement
    measured_on_target = {r["artifact"] for r in rows if r["on_target"] and r["status"] == "measured"}
    if profile.target.kind != "cpu":
        for m in models:
            if m.name not in measured_on_target:
                rows.append(_estimate_row(m, ctx))
        if not device:
            notes.append(NOT_ON_TARGET)
    if meter is None:
        notes.append("no energy meter on this host: " + "; ".join(meter_reasons))
    # 6) write
    out = {"where_host": where, "meter": getattr(meter, "name", None), "notes": notes, "rows": rows,
           "tasks": [h.describe() for h in data.heads],
           "settings": cfg.model_dump(), "timing": asdict(timing), "profile": profile.name}
    atomic_write_text(ctx.path("benchmark.json"), json.dumps(out, indent=2, default=float))
    ctx.results["benchmark"] = {"rows": len(rows), "notes": notes}
    return {"benchmark.json": Artifact(name="benchmark.json", kind="json", stage="benchmark")}


def _on_target(row: dict, target, device_named: bool) -> bool:
    """Does this row measure the profile's target? A host CPU row is never a Jetson or GPU number.

    It must be measured, with a provider the profile asks for (or native TensorRT when it asks for that),
    and on the device itself when one is named (always, for a Jetson).
    """
    if row["status"] != "measured":
        return False
    asked = row["provider"] in target.providers or (row["backend"] == "tensorrt" and target.tensorrt)
    if target.kind == "jetson" or device_named:
        return asked and row["where"]["kind"] == "device"
    return asked


def _host_energy(ctx: Context):
    kind, power = ctx.profile.target.kind, ctx.profile.hardware.power_w

    def fallback(p50_ms: float) -> tuple[float | None, str]:
        if kind == "cpu":
            return estimate.energy(power, p50_ms, "measured p50 latency on this host")
        return None, (f"skipped: no energy meter on this host, and the profile's {power} W describes the "
                      f"{ctx.profile.target.name}, not this machine")
    return fallback


def _add_source_agreement(rows: list[dict], models: list[ModelEntry], split: Split) -> None:
    """A quantized model's agreement with its FP32 source, and the max/mean |diff| of their outputs."""
    by = {m.name: m for m in models}
    for r in rows:
        src = by[r["artifact"]].meta.get("source_onnx")
        if r["status"] != "measured" or not src or src not in by or r["provider"] != CPU:
            continue
        a_sess, b_sess = (open_session(by[n].path, CPU, threads=0) for n in (src, r["artifact"]))
        agree = seen = elements = 0
        max_abs = sum_abs = 0.0
        for x, _, _ in split.batches(256):
            a, b = logits(a_sess, x.numpy()), logits(b_sess, x.numpy())
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            seen, elements = seen + len(a), elements + a.size
            max_abs, sum_abs = max(max_abs, float(abs(a - b).max())), sum_abs + float(abs(a - b).sum())
        r["agreement"]["source"] = agree / max(seen, 1)
        r["output_diff_vs_source"] = {"source": src, "max_abs": max_abs, "mean_abs": sum_abs / max(elements, 1)}


def _teacher_predictions(models: list[ModelEntry], split: Split, tasks: list[str] | None) -> np.ndarray:
    """The teacher's predictions; with tasks, each task's column from its teacher (the teacher's heads first,
    then each teacher of tasks'), the reference every head's agreement is measured against."""
    roles = ("teacher", "extra-teacher") if tasks else ("teacher",)
    out = None
    for m in sorted((m for m in models if m.meta.get("role") in roles), key=lambda m: m.meta["role"] != "teacher"):
        p = _predictions(open_session(m.path, CPU, threads=0), split, tasks=tasks)
        out = p if out is None else np.where(out < 0, p, out)  # -1: this teacher has no head for the task
    return out


def _predictions(sess, split: Split, batch: int = 256, tasks: list[str] | None = None) -> np.ndarray:
    """Argmax predictions of one benchmark session over the whole split, streamed; with tasks (N, tasks), every
    output (head) in its task's column (measure.task_columns)."""
    if tasks:
        names = [o.name for o in sess.get_outputs()]
        preds = [task_columns(np.stack([o.argmax(1) for o in head_outputs(sess, x.numpy(), batch)], 1), names, tasks)
                 for x, _, _ in split.batches(batch)]
        return np.concatenate(preds) if preds else np.zeros((0, len(tasks)), np.int64)
    preds = [logits(sess, x.numpy(), batch).argmax(1) for x, _, _ in split.batches(batch)]
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)



def _estimate_row(m: ModelEntry, ctx: Context) -> dict:
    from pipeline.device.measure import base_row
    hw, shape = ctx.profile.hardware, ctx.data().input_shape
    io = 4 * (int.__mul__(*shape[1:]) * shape[0] + ctx.data().num_classes)
    ms, formula = estimate.roofline(m.meta.get("macs") or 0, m.meta["size_bytes"], io, m.precision, hw)
    mj, eformula = estimate.energy(hw.power_w, ms, "roofline lower bound")
    return {**base_row(m, ctx.profile.target.providers[0], {"kind": "estimate", "target": ctx.profile.target.name}),
            "status": "estimated", "on_target": False, "batch": 1, "latency_ms": {"lower_bound": ms},
            "latency_source": formula,
            "energy_mj": mj, "energy_how": "estimated", "energy_source": eformula, "accuracy": None,
            "accuracy_source": "see the measured rows of this artifact: accuracy does not depend on the device "
                               "for FP32, but was not measured on the target"}
