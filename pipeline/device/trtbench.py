"""Native TensorRT rows through trtexec (or, without it, TensorRT's Python API): build or reuse, time, parse.

Runs where TensorRT is (the device, or a GPU host); stdlib only for trtexec (trt_api, used where there is no
trtexec, needs numpy and torch). Engines are keyed by the ONNX sha256, precision, TensorRT version and compute
capability (trtexec.EngineCache), and built on the machine that times them: an engine from another TensorRT or
GPU is refused, never reused.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from . import trtexec as tx
from .envinfo import compute_capability


def trt_version(exe: str) -> tx.TrtVersion:
    """Ask trtexec itself: every run, --help included, prints `&&&& RUNNING TensorRT.trtexec [TensorRT vNNNN]`."""
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    return tx.TrtVersion.parse(out.stdout + out.stderr)


def gpu_capability() -> str:
    """envinfo.compute_capability(), or RuntimeError (a skipped row's reason) where no GPU answers."""
    cc = compute_capability()
    if cc is None:
        raise RuntimeError("no CUDA GPU answered here (libcuda.so.1 missing, or no device 0): TensorRT engines are "
                           "built and keyed per GPU")
    return cc


def _stats_row(res: tx.TrtexecResult, batch: int) -> dict:
    lat = res.stats.get("latency")
    gpu = res.stats.get("gpu_compute")
    if lat is None:
        raise ValueError("trtexec printed no latency summary")
    n = int((res.total_host_walltime_s or 0) * (res.throughput_qps or 0)) or 1
    cv = (res.gpu_compute_cv_percent or 0.0) / 100
    out = {"n": n, "mean": lat.mean, "min": lat.min, "max": lat.max, "p50": lat.median,
           "std": cv * lat.mean, "cv": cv,
           **{k: lat.percentiles.get(k) for k in ("p90", "p95", "p99")}}
    return {"latency_ms": out, "gpu_compute_ms": gpu.__dict__ if gpu else None,
            "h2d_ms": res.stats["h2d"].__dict__ if "h2d" in res.stats else None,
            "d2h_ms": res.stats["d2h"].__dict__ if "d2h" in res.stats else None,
            "throughput": {str(batch): (res.throughput_qps or 0) * batch}}


def time_model(onnx: Path, precision: str, input_name: str, input_shape: list[int], cache_dir: Path,
               *, duration_s: int = 3, warmup_ms: int = 500, timeout_s: float = 1800) -> dict:
    """One row's figures for an ONNX model at batch 1; raises RuntimeError with the log's summary on failure."""
    exe = tx.find_trtexec()
    if exe is None:
        raise RuntimeError(tx.trt_status()[1])
    version, cc = trt_version(exe), gpu_capability()
    cache = tx.EngineCache(cache_dir)
    shapes = {input_name: [1, *input_shape]}
    sha = tx.sha256_file(onnx)
    engine = cache.lookup(onnx_sha256=sha, precision=precision, trt_version=version, compute_capability=cc,
                          extra={"shapes": shapes})
    common = dict(shapes=shapes, warmup_ms=warmup_ms, duration_s=duration_s, use_spin_wait=True, trtexec=exe)
    if engine is not None:
        argv = tx.build_command(version, load_engine=engine, **common)
    else:
        tmp = cache_dir / f"building-{sha[:16]}-{precision}.engine"
        cache_dir.mkdir(parents=True, exist_ok=True)
        argv = tx.build_command(version, onnx=onnx, save_engine=tmp, precision=precision, **common)
    log = cache_dir / f"{onnx.stem}-{precision}.trtexec.log"
    res = tx.run_trtexec(argv, timeout=timeout_s, log_path=log)
    if not res.passed:
        raise RuntimeError(f"trtexec {res.status}: {res.error_summary or 'see ' + str(log)}")
    if engine is None:
        if res.compute_capability not in (None, cc):  # trtexec built on another GPU than device 0 (--device?)
            raise RuntimeError(f"trtexec built for compute capability {res.compute_capability}, CUDA device 0 "
                               f"is {cc}: the engine cannot be keyed; see {log}")
        cache.store(tmp, onnx_sha256=sha, precision=precision, trt_version=version, compute_capability=cc,
                    extra={"shapes": shapes})
        tmp.unlink(missing_ok=True)
    return {**_stats_row(res, 1), "build_time_s": res.engine_build_s, "trt_version": str(version),
            "gpu": res.device, "compute_capability": cc, "engine_reused": engine is not None,
            "command": " ".join(argv), "log": log.name}


def time_model_api(onnx: Path, precision: str, input_name: str, input_shape: list[int], cache_dir: Path) -> dict:
    """time_model's figures through the TensorRT Python API (trt_api), for a device with `tensorrt` and no trtexec:
    GPU time per inference from CUDA events, no host copies (time_engine needs torch with CUDA for buffers)."""
    from . import trt_api
    engine = trt_api.build_engine(onnx, tx.EngineCache(cache_dir), precision=precision, batch=(1, 1, 1))
    t = trt_api.time_engine(engine, shapes={input_name: [1, *input_shape]})
    side = json.loads(engine.with_suffix(".json").read_text())  # the cache's sidecar: what it was built for
    lat = {"n": t["n"], "mean": t["mean"], "min": t["min"], "max": t["max"], "p50": t["median"], "std": t["std"],
           "cv": t["std"] / t["mean"], **{k: t[k] for k in ("p90", "p95", "p99")}}
    return {"latency_ms": lat, "throughput": {"1": 1e3 / t["mean"]}, "trt_version": side["trt_version"],
            "compute_capability": side["compute_capability"], "gpu": None}


def rows(models: list, where: dict, input_name: str, input_shape: list[int], cache_dir: Path, log=print) -> list:
    """One 'tensorrt' row per model, timed by trtexec or else TensorRT's Python API; or skipped with the reason
    (TensorRT missing, build failed)."""
    from .measure import base_row, skipped
    ok, reason = tx.trt_status()
    if not ok:
        return [skipped(m, "trtexec", where, reason, backend="tensorrt") for m in models]
    api = tx.find_trtexec() is None  # trt_status found the `tensorrt` module, and no trtexec
    provider = "tensorrt-python-api" if api else "trtexec"
    out = []
    for m in models:
        try:
            log(f"  {provider}: {m.name} ({m.precision})")
            fig = (time_model_api if api else time_model)(m.path, m.precision, input_name, input_shape, cache_dir)
        except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as e:
            out.append(skipped(m, provider, where, f"TensorRT: {e}", backend="tensorrt"))
            continue
        how = (f"TensorRT {fig['trt_version']} Python API, GPU time per inference (CUDA events, no host copies)"
               if api else f"trtexec {fig['trt_version']} on {fig['gpu']}, host latency (H2D + compute + D2H), "
                           f"percentiles as printed")
        out.append({**base_row(m, provider, where, backend="tensorrt"), **fig, "status": "measured", "batch": 1,
                    "threads": None, "accuracy": None,
                    "accuracy_source": "not measured: TensorRT is timed on random inputs; see this artifact's "
                                       "onnxruntime rows",
                    "latency_source": f"measured: {how}",
                    "energy_mj": None, "energy_how": "skipped",
                    "energy_source": "skipped: energy is measured on onnxruntime rows"})
    return out
