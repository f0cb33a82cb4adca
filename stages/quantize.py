"""quantize: ONNX-to-ONNX INT8 (static, calibrated) and FP16 transforms with onnxruntime. Off by default.

Works on the exported FP32 ONNX of the deploy candidate (student-pruned.onnx when pruning ran, else
student.onnx). Which precisions are built comes from the profile (target.precisions); how INT8 is laid out
comes from a preset the profile picks: `ort-cpu` (QDQ, U8 activations / S8 weights, per-channel) or
`tensorrt` (S8/S8 symmetric, dedicated QDQ pairs, which is what TensorRT's explicit quantization expects).
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from pipeline.artifacts import Artifact, Artifacts, files
from pipeline.context import Context
from pipeline.errors import StageError

USES_PROFILE = True

PRESETS: dict[str, dict[str, Any]] = {
    # reduce_range None = decided from the CPU flags: U8xS8 without VNNI (AVX2 vpmaddubsw) can saturate
    "ort-cpu": {"format": "qdq", "activation_type": "u8", "weight_type": "s8", "per_channel": True,
                "reduce_range": None, "symmetric_activations": False, "symmetric_weights": True,
                "dedicated_qdq_pair": False},
    # TensorRT takes explicit Q/DQ with zero-point 0 (symmetric) in S8 only, one pair per consumer
    "tensorrt": {"format": "qdq", "activation_type": "s8", "weight_type": "s8", "per_channel": True,
                 "reduce_range": False, "symmetric_activations": True, "symmetric_weights": True,
                 "dedicated_qdq_pair": True},
}
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
CONV_OPS = ("Conv", "ConvTranspose")


class Config(BaseModel, extra="forbid"):
    enabled: bool = Field(False, description="off unless the recipe or profile asks for it")
    preset: Literal["ort-cpu", "tensorrt"] = Field("ort-cpu", description="INT8 layout for the runtime; the "
                                                                         "profile's overrides choose it")
    precisions: list[Literal["int8", "fp16"]] | None = Field(None, description="artifacts to build; null = the "
                                                                               "profile's target.precisions")
    sources: list[str] = Field([], description="FP32 ONNX artifacts to quantize; empty = the deploy candidate "
                                               "(student-pruned.onnx if present, else student.onnx)")
    mode: Literal["static", "dynamic"] = Field("static", description="static = calibrated activations; dynamic "
                                                                     "only for MatMul/Gemm-only models")
    calibration_samples: int = Field(256, gt=0, description="training-split images for calibration (never test)")
    min_calibration_samples: int = Field(64, gt=0, description="fewer than this gives unreliable ranges: refused")
    calibration_batch: int = Field(32, gt=0, description="images per calibration run (the batch dim is dynamic)")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="activation range "
                                                                                              "estimator")
    percentile: float = Field(99.999, gt=90, le=100, description="percentile method only")
    # null = the preset's value
    format: Literal["qdq", "qoperator"] | None = Field(None, description="QDQ (Q/DQ around float ops, fused by "
                                                                         "the runtime) or QOperator (QLinearConv)")
    activation_type: Literal["u8", "s8"] | None = Field(None, description="activation integer type")
    weight_type: Literal["u8", "s8"] | None = Field(None, description="weight integer type")
    per_channel: bool | None = Field(None, description="one weight scale per output channel")
    reduce_range: bool | None = Field(None, description="7-bit weights; null with ort-cpu = on only without VNNI")
    symmetric_activations: bool | None = Field(None, description="activation zero-point 0")
    symmetric_weights: bool | None = Field(None, description="weight zero-point 0")
    dedicated_qdq_pair: bool | None = Field(None, description="one Q/DQ pair per consumer (TensorRT)")


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Build INT8 and/or FP16 models of each source; measure each against its FP32 source on the test split."""
    # 1) what to build, from what
    precisions = cfg.precisions if cfg.precisions is not None else \
        [p for p in ctx.profile.target.precisions if p != "fp32"]
    if not precisions:
        ctx.log(f"  profile '{ctx.profile.name}' asks for fp32 only: nothing to quantize")
        ctx.results["quantize"] = {"precisions": [], "artifacts": {}}
        return {}
    sources = _sources(inputs, cfg)
    settings = resolve(cfg)
    data = ctx.data()
    out: Artifacts = {}
    results: dict[str, Any] = {"settings": settings, "sources": sources, "precisions": precisions, "artifacts": {}}
    for src in sources:
        src_art, src_path = inputs[src], ctx.path(src)
        stem = src.removesuffix(".onnx")
        ref = None  # the FP32 source's test outputs, shared by its INT8 and FP16 checks
        for precision in precisions:
            name = f"{stem}.{precision}.onnx"
            path = ctx.path(name)
            # 2) convert
            if precision == "int8":
                quant = _int8(src_path, path, cfg, settings, data.x_train, ctx)
            else:
                quant = _fp16(src_path, path)
            # 3) check: accuracy on the test split, agreement and output difference vs the FP32 source (run
            # after the first conversion, which is what reports an unreadable source clearly)
            ref = _logits(src_path, data.x_test) if ref is None else ref
            check = evaluate(path, ref, data.x_test, data.y_test)
            meta = {"role": f"{src_art.meta.get('role', stem)}-{precision}", "precision": precision,
                    "source_onnx": src, "predecessor": src, "quant": quant, **check,
                    **{k: src_art.meta[k] for k in ("params", "macs") if k in src_art.meta}}
            out[name] = Artifact(name=name, kind="onnx", stage="quantize", meta=meta)
            results["artifacts"][name] = {"source": src, **check, "nodes": quant.get("nodes")}
            ctx.log(f"  {name}: test acc {check['test_acc']:.4f} (FP32 {check['source_test_acc']:.4f}), agreement "
                    f"{check['agreement_vs_source']:.4f}, max |diff| {check['output_diff_vs_source']['max_abs']:.3g}")
    ctx.results["quantize"] = results
    return out


def resolve(cfg: Config) -> dict[str, Any]:
    """The preset with the recipe's explicit settings on top; reduce_range decided from the CPU flags."""
    s = dict(PRESETS[cfg.preset])
    for k in s:
        if getattr(cfg, k) is not None:
            s[k] = getattr(cfg, k)
    if s["reduce_range"] is None:
        from pipeline.device.envinfo import cpu_info
        vnni = cpu_info()["vnni"]
        s["reduce_range"] = not vnni
        s["reduce_range_reason"] = f"CPU {'has' if vnni else 'lacks'} VNNI (read from /proc/cpuinfo flags)"
    return {"preset": cfg.preset, "mode": cfg.mode, **s, "calibrate_method": cfg.calibrate_method,
            **({"percentile": cfg.percentile} if cfg.calibrate_method == "percentile" else {})}


def _sources(inputs: Artifacts, cfg: Config) -> list[str]:
    fp32 = [n for n, a in inputs.items() if a.kind == "onnx" and a.meta.get("precision", "fp32") == "fp32"]
    if cfg.sources:
        for s in cfg.sources:
            if s not in fp32:
                raise StageError(f"quantize.sources: '{s}' is not an FP32 ONNX artifact of this run. Available: "
                                 f"{', '.join(sorted(fp32)) or 'none (is export enabled?)'}.")
        return list(cfg.sources)
    for candidate in ("student-pruned.onnx", "student.onnx"):
        if candidate in fp32:
            return [candidate]
    raise StageError("quantize: no student-pruned.onnx or student.onnx to quantize: enable the export stage, "
                     "or name FP32 ONNX artifacts in quantize.sources.")


# ---------------------------------------------------------------- INT8
def _int8(src: Path, dst: Path, cfg: Config, s: dict, x_train: np.ndarray, ctx: Context) -> dict:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static
    qtype = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    where = f"quantize: {src.name} (preset {cfg.preset}, mode {cfg.mode}, format {s['format']})"
    try:
        graph = onnx.load(str(src), load_external_data=False).graph
        external = len(files(src)) > 1
    except Exception as e:
        raise StageError(f"{where}: onnxruntime could not quantize it: not a readable ONNX model "
                         f"({type(e).__name__}: {e}). Re-run the export stage.") from e
    ops = Counter(n.op_type for n in graph.node)
    info: dict[str, Any] = {**s}
    if cfg.mode == "dynamic" and set(ops) & set(CONV_OPS):
        raise StageError(
            f"quantize.mode: 'dynamic' refused for {src.name}: it has {ops['Conv'] + ops['ConvTranspose']} Conv "
            f"node(s), and onnxruntime has no ConvInteger kernel for dynamically quantized Conv with S8 weights "
            f"(the model would not load). Use mode: static (calibrated); dynamic is for MatMul/Gemm-only models.")
    reader = _reader(cfg, x_train, _input_name(graph), ctx.recipe.seed) if cfg.mode == "static" else None
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            # shape inference and graph cleanup first, as onnxruntime's quantization docs ask
            quant_pre_process(str(src), str(pre), save_as_external_data=external)
            if cfg.mode == "dynamic":
                quantize_dynamic(str(pre), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                                 per_channel=s["per_channel"], reduce_range=s["reduce_range"],
                                 weight_type=qtype[s["weight_type"]], use_external_data_format=external)
            else:
                info["calibration"] = {"split": "train", "samples": reader.n, "batch": cfg.calibration_batch,
                                       "method": cfg.calibrate_method, "seed": ctx.recipe.seed}
                quantize_static(
                    str(pre), str(dst), reader, quant_format=QuantFormat.QDQ if s["format"] == "qdq" else
                    QuantFormat.QOperator, per_channel=s["per_channel"], reduce_range=s["reduce_range"],
                    activation_type=qtype[s["activation_type"]], weight_type=qtype[s["weight_type"]],
                    calibrate_method=_method(cfg.calibrate_method), use_external_data_format=external,
                    extra_options={"ActivationSymmetric": s["symmetric_activations"],
                                   "WeightSymmetric": s["symmetric_weights"],
                                   "DedicatedQDQPair": s["dedicated_qdq_pair"],
                                   **({"CalibPercentile": cfg.percentile}
                                      if cfg.calibrate_method == "percentile" else {})})
        except Exception as e:  # onnxruntime and onnx raise many types; the message is what helps
            raise StageError(f"{where}: onnxruntime could not quantize it ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}). Check quantize.preset/format, or set "
                             f"quantize.enabled: false; the FP32 artifacts are intact.") from e
    info["nodes"] = quant_nodes(dst)
    if not info["nodes"]:
        raise StageError(f"{where}: the output has no QuantizeLinear/DequantizeLinear or QLinear/Integer nodes: "
                         f"nothing was quantized, so it is not an INT8 model.")
    return info


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _input_name(g) -> str:
    inits = {i.name for i in g.initializer}
    return next(i.name for i in g.input if i.name not in inits)


def _reader(cfg: Config, x_train: np.ndarray, input_name: str, seed: int):
    """Calibration batches from the training split, already preprocessed exactly like inference."""
    from onnxruntime.quantization import CalibrationDataReader
    n = min(cfg.calibration_samples, len(x_train))
    if n < cfg.min_calibration_samples:
        raise StageError(f"quantize.calibration_samples: the calibration set has {n} training images "
                         f"(training split: {len(x_train)}), fewer than quantize.min_calibration_samples="
                         f"{cfg.min_calibration_samples}: ranges from so few are unreliable. Use a larger "
                         f"training split or lower the minimum knowingly.")
    idx = np.random.default_rng(seed).permutation(len(x_train))[:n]
    x = x_train[np.sort(idx)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.n = n
            self.rewind()

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

        def rewind(self):
            self.batches = iter([x[i:i + cfg.calibration_batch] for i in range(0, n, cfg.calibration_batch)])
    return Reader()


def quant_nodes(path: Path) -> dict[str, int]:
    """Counts of the quantization ops in a model: Q/DQ pairs, QLinear* and *Integer ops."""
    import onnx
    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {k: v for k, v in sorted(ops.items())
            if k in QUANT_OPS or k.startswith("QLinear") or k.endswith("Integer")}


# ---------------------------------------------------------------- FP16
def _fp16(src: Path, dst: Path) -> dict:
    """FP16 weights and compute, FP32 inputs and outputs (keep_io_types), so callers feed what they always fed."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel
    model = onnx.load(str(src))
    try:
        half = convert_float_to_float16(model, keep_io_types=True)
        # the converter appends the input Casts at the end of the node list (onnxconverter-common issue #208)
        OnnxModel.graph_topological_sort(half.graph, is_deterministic=True)
        external = len(files(src)) > 1
        onnx.save(half, str(dst), save_as_external_data=external, location=f"{dst.name}.data")
        onnx.checker.check_model(str(dst), full_check=True)
    except Exception as e:
        raise StageError(f"quantize: FP16 conversion of {src.name} failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Drop fp16 from quantize.precisions.") from e
    return {"keep_io_types": True, "converter": "onnxruntime.transformers.float16.convert_float_to_float16",
            "checked": "onnx.checker full_check, and run through onnxruntime CPU on the test split"}


# ---------------------------------------------------------------- checks
def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    from pipeline.device.ortbench import CPU, logits, open_session  # onnxruntime: only when the stage runs
    return logits(open_session(path, CPU, threads=0), x)


def evaluate(path: Path, ref: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Test-split accuracy through onnxruntime, and agreement / output difference with the FP32 source's
    outputs `ref` on the same inputs."""
    from pipeline.device.ortbench import Skip
    try:
        got = _logits(path, x)
    except Skip as e:
        raise StageError(f"quantize: {path.name} does not load in onnxruntime: {e}") from None
    diff = np.abs(got - ref)
    return {"test_acc": float((got.argmax(1) == y).mean()), "source_test_acc": float((ref.argmax(1) == y).mean()),
            "agreement_vs_source": float((got.argmax(1) == ref.argmax(1)).mean()),
            "output_diff_vs_source": {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())},
            "test_samples": int(len(y)), "accuracy_source": "onnxruntime CPU on the test split"}
