"""onnxruntime sessions that fail closed, interleaved latency timing, throughput and accuracy.

Runs on the host (benchmark stage) and on the device (runner.py): stdlib, numpy and onnxruntime only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


class Skip(Exception):
    """This row cannot be measured here; the message is the reason shown as 'skipped: <reason>'."""


def provider_options(provider: str, precision: str, cache_dir: Path | None, device_id: int = 0) -> dict[str, Any]:
    if provider == CUDA:
        return {"device_id": device_id}
    if provider == TRT:
        opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": precision in ("fp16", "int8"),
                                "trt_int8_enable": precision == "int8"}
        if cache_dir is not None:  # one cache folder per model and precision: engines are not interchangeable
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                        trt_timing_cache_enable=True)
        return opts
    return {}


def open_session(path: Path, provider: str, threads: int, precision: str = "fp32",
                 cache_dir: Path | None = None):
    """An InferenceSession on exactly the asked provider, or Skip with the reason. Never a silent CPU fallback."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    if provider not in available:
        hint = "install onnxruntime-gpu (`pip install '.[gpu]'`) on a CUDA host" if provider != CPU else ""
        raise Skip(f"{provider} requested, but this onnxruntime {ort.__version__} offers only "
                   f"{', '.join(available)}{': ' + hint if hint else ''}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Workers spin after Run() returns; with several sessions timed in one process the idle one steals a core.
    so.add_session_config_entry("session.force_spinning_stop", "1")
    chain: list[Any] = [(provider, provider_options(provider, precision, cache_dir))]
    if provider == TRT:
        chain.append((CUDA, provider_options(CUDA, precision, None)))
    if provider != CPU:
        chain.append(CPU)  # for nodes the GPU provider does not support; checked below that it is not the only one
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=chain)
    except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
        raise Skip(f"{provider}: onnxruntime could not create a session: {first_line(e)}") from None
    used = sess.get_providers()
    if used[0] != provider:
        raise Skip(f"{provider} requested, onnxruntime fell back to {used[0]}: the provider failed to initialise "
                   f"(missing CUDA/cuDNN/TensorRT libraries or no GPU visible); providers in use: {used}")
    return sess


def input_spec(sess) -> tuple[str, list, str]:
    i = sess.get_inputs()[0]
    return i.name, i.shape, i.type


def feed(sess, x: np.ndarray) -> dict[str, np.ndarray]:
    name, _, typ = input_spec(sess)
    return {name: x.astype(np.float16 if "float16" in typ else np.float32)}


def stats(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    mean = float(a.mean())
    return {"n": int(a.size), "mean": mean, "std": float(a.std()), "cv": float(a.std() / mean) if mean else 0.0,
            "min": float(a.min()), "max": float(a.max()),
            **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)}}


@dataclass
class Timed:
    key: str                  # a label for logs
    sess: Any
    inputs: dict[str, np.ndarray]
    samples: list[float] = field(default_factory=list)
    first_run_ms: float = 0.0
    busy_s: float = 0.0
    threads: int = 1          # the session's intra-op threads: the row reports the fastest


def time_interleaved(entries: list[Timed], warmup: int, min_runs: int, min_duration_s: float,
                     max_duration_s: float, block: int = 10) -> None:
    """Time every entry in rounds of `block` runs each, so they share the machine's noise.

    The first run is timed apart: a TensorRT provider builds its engine there, and that is build time,
    not latency. Stops once every entry has min_runs samples and min_duration_s of timed work, or at
    max_duration_s in all.
    """
    for e in entries:
        t0 = time.perf_counter()
        e.sess.run(None, e.inputs)
        e.first_run_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(max(warmup - 1, 0)):
            e.sess.run(None, e.inputs)
    start = time.perf_counter()
    while True:
        for e in entries:
            for _ in range(block):
                t0 = time.perf_counter_ns()
                e.sess.run(None, e.inputs)
                dt = time.perf_counter_ns() - t0
                e.samples.append(dt / 1e6)
                e.busy_s += dt / 1e9
        done = all(len(e.samples) >= min_runs and e.busy_s >= min_duration_s for e in entries)
        if done or time.perf_counter() - start > max_duration_s:
            return


def throughput(sess, x: np.ndarray, batch: int, min_duration_s: float = 0.3, min_runs: int = 5) -> float:
    """Images per second at a batch size (inputs tiled from x)."""
    reps = -(-batch // len(x))
    inputs = feed(sess, np.concatenate([x] * reps)[:batch])
    sess.run(None, inputs)
    n, t0 = 0, time.perf_counter()
    while n < min_runs or time.perf_counter() - t0 < min_duration_s:
        sess.run(None, inputs)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def logits(sess, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Outputs of the artifact itself on a preprocessed set, in batches (the batch dim is dynamic)."""
    outs = [sess.run(None, feed(sess, x[i:i + batch]))[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32)


def head_outputs(sess, x: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """Every output of the artifact (one per head of a multi-task model) on a preprocessed set, in batches."""
    parts = [sess.run(None, feed(sess, x[i:i + batch])) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]).astype(np.float32) for k in range(len(sess.get_outputs()))]


def first_line(e: BaseException) -> str:
    """'Type: first non-empty line' (the device side's copy of pipeline.errors.first_line: this folder is
    copied alone onto devices and imports nothing of ours)."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
