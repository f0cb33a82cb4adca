"""Build and time TensorRT engines through the `tensorrt` Python API (8.x, 10.x, 11.x; timing 8.5+).

The device runner's TensorRT rows use it where `tensorrt` imports but there is no trtexec (trtbench.rows).

`tensorrt`, `torch` and `cuda` are imported inside the functions: this folder is copied to
Jetsons on its own and must import with only the stdlib and numpy present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .trtbench import gpu_capability
from .trtexec import EngineCache, TrtVersion, precision_flags, sha256_file, supports_mem_pool_size

_INSTALL_HINT = ("Install TensorRT's Python bindings: on a Jetson they come with JetPack "
                 "(python3-libnvinfer), elsewhere `pip install tensorrt` on an NVIDIA GPU host. "
                 "Or benchmark with trtexec (pipeline.device.trtexec).")


def build_engine(onnx_path: str | Path, cache: EngineCache, *, precision: str = "fp16",
                 strongly_typed: bool = False, batch: tuple[int, int, int] | None = None,
                 workspace_mib: int | None = None, timing_cache: str | Path | None = None,
                 compute_capability: str | None = None) -> Path:
    """Return a cached engine for this ONNX/precision/TensorRT/GPU, building it on a miss.

    `batch` = (min, opt, max) for inputs whose first dim is dynamic; other dims must be static.
    """
    trt = _import_tensorrt()
    version = TrtVersion.parse(trt.__version__)
    cc = compute_capability or gpu_capability()
    key = dict(onnx_sha256=sha256_file(onnx_path), precision=precision, trt_version=version,
               compute_capability=cc, extra={"batch": list(batch) if batch else None,
                                             "strongly_typed": strongly_typed})
    # 1) reuse a matching engine (lookup raises on a mismatching one, never reuses it)
    found = cache.lookup(**key)
    if found is not None:
        return found
    # 2) network: explicit batch is the only mode from 10.0 on, and the flag was deprecated there
    flags = precision_flags(version, precision, strongly_typed=strongly_typed)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net_flags = 0
    if version.major < 10:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if "--stronglyTyped" in flags:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT {version} could not parse {onnx_path}: {errors}")
    # 3) config: precision (only < 11; 11 takes it from the ONNX), workspace, profile, timing cache
    config = builder.create_builder_config()
    if "--fp16" in flags:
        config.set_flag(trt.BuilderFlag.FP16)
    if "--int8" in flags:
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ ONNX: scales come from the graph, no calibrator
    if workspace_mib and supports_mem_pool_size(version):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    elif workspace_mib:
        config.max_workspace_size = workspace_mib << 20  # 8.2 (Jetson Nano) predates memory pools
    _add_batch_profile(trt, builder, network, config, batch)
    cache_file = Path(timing_cache) if timing_cache else None
    if cache_file is not None:
        data = cache_file.read_bytes() if cache_file.exists() else b""
        if not config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
            raise RuntimeError(f"Timing cache {cache_file} was made by another TensorRT or GPU; delete it.")
    # 4) build, save the timing cache for the next build, store with its sidecar
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT {version} failed to build {onnx_path}; rerun with trtexec "
                           "--verbose to see which layer has no implementation.")
    if cache_file is not None:
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return cache.store(bytes(plan), **key)


def time_engine(engine_path: str | Path, *, shapes: Mapping[str, Sequence[int]] | None = None,
                warmup: int = 50, iterations: int = 200) -> dict[str, float]:
    """GPU time per inference in ms (CUDA events around execute_async_v3; no host copies)."""
    trt = _import_tensorrt()
    if TrtVersion.parse(trt.__version__) < TrtVersion(8, 5):
        raise RuntimeError(f"time_engine needs TensorRT 8.5+ (execute_async_v3), found {trt.__version__}. "
                           "Use trtexec --loadEngine instead.")
    try:
        import torch  # buffers and CUDA events; torch ships on every target where we build
    except ImportError as e:
        raise RuntimeError(f"time_engine needs torch with CUDA for buffers ({e}). "
                           "Use trtexec --loadEngine instead.") from e
    if not torch.cuda.is_available():
        raise RuntimeError("time_engine needs a CUDA GPU; torch.cuda.is_available() is False.")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"Could not load {engine_path}: built by another TensorRT or GPU? Rebuild it.")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    for name in inputs:
        shape = (shapes or {}).get(name) or tuple(engine.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise ValueError(f"Input {name!r} is dynamic {tuple(shape)}; pass shapes={{{name!r}: (...)}}.")
        context.set_input_shape(name, tuple(shape))
    buffers: list[Any] = []
    for name in names:  # output shapes are known once every input shape is set
        dtype = torch.from_numpy(np.zeros(1, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buf = torch.randn if dtype.is_floating_point else torch.zeros
        buffers.append(buf(tuple(context.get_tensor_shape(name)), device="cuda").to(dtype))
        context.set_tensor_address(name, buffers[-1].data_ptr())
    torch.cuda.synchronize()  # the buffers were filled on the default stream
    stream = torch.cuda.Stream()
    times = []
    with torch.cuda.stream(stream):
        for i in range(warmup + iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"execute_async_v3 failed on {engine_path}")
            end.record(stream)
            end.synchronize()
            if i >= warmup:  # warm up first: clocks ramp and lazy allocations happen on early runs
                times.append(start.elapsed_time(end))
    t = np.asarray(times)
    return {"n": len(t), "mean": float(t.mean()), "std": float(t.std()), "median": float(np.median(t)),
            "min": float(t.min()), "max": float(t.max()),
            **{f"p{q}": float(np.percentile(t, q)) for q in (90, 95, 99)}}


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing
        raise RuntimeError(f"TensorRT Python API unavailable ({type(e).__name__}: {e}). {_INSTALL_HINT}") from e
    return trt


def _add_batch_profile(trt: Any, builder: Any, network: Any, config: Any,
                       batch: tuple[int, int, int] | None) -> None:
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        if any(d < 0 for d in shape[1:]):
            raise ValueError(f"Input {tensor.name!r} {shape} has dynamic dims besides batch; "
                             "export it with static C/H/W.")
        if batch is None:
            raise ValueError(f"Input {tensor.name!r} has a dynamic batch; pass batch=(min, opt, max).")
        profile.set_shape(tensor.name, *[(b, *shape[1:]) for b in batch])
        dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
