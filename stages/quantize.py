"""quantize: ONNX-to-ONNX INT8 (static, calibrated) and FP16 transforms with onnxruntime. Off by default.

Works on the exported FP32 ONNX of the deploy candidate (student-pruned.onnx when pruning ran, else
student.onnx). Which precisions are built comes from the profile (target.precisions); how INT8 is laid out
comes from a preset the profile picks: `ort-cpu` (QDQ, U8 activations / S8 weights, per-channel) or
`tensorrt` (S8/S8 symmetric, dedicated QDQ pairs, which is what TensorRT's explicit quantization expects).

INT8 keeps its accuracy three ways, every choice made on the validation split (the test split is read only
to report): one model per calibration method, the most accurate kept; with `exclude_sensitive`, the nodes
whose quantization costs most stay in float until the drop fits the recipe's max_accuracy_drop_per_stage;
with `qat`, a fake-quantized copy of the torch student is fine-tuned against the teacher first.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pipeline.artifacts import Artifact, Artifacts, files
from pipeline.context import Context
from pipeline.errors import StageError
from pipeline.settings import Strict

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
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the nodes sensitivity analysis may keep in float
Method = Literal["minmax", "entropy", "percentile"]


class QAT(Strict):
    epochs: int = Field(3, gt=0, description="fine-tuning passes over the training split with fake quantization")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate: small, the weights only adapt to the INT8 grid")
    temperature: float = Field(4.0, gt=0, description="KD temperature against the teacher")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; 1 - alpha goes to the labels")
    batch_size: int = Field(64, gt=0, description="images per step")


class Config(Strict):
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
    calibrate_methods: list[Method] = Field(["minmax"], min_length=1, description="activation range estimators "
                                            "tried; the most accurate on validation is kept (ties: the first)")
    calibrate_method: Method | None = Field(None, description="one estimator: the same as calibrate_methods: [it]")
    percentile: float = Field(99.999, gt=90, le=100, description="percentile method only")
    # onnxruntime's own entropy defaults (128 bins, 128 quantized bins) leave a single candidate threshold, the
    # full range, so 'entropy' would be MinMax again; TensorRT's entropy calibrator uses 2048 and 128
    entropy_bins: int = Field(2048, ge=128, description="entropy method only: histogram bins")
    entropy_quantized_bins: int = Field(128, ge=2, description="entropy method only: bins of the quantized range")
    exclude_sensitive: bool = Field(False, description="keep the most sensitive Conv/Gemm/MatMul nodes in float "
                                                       "until the validation drop fits max_accuracy_drop_per_stage")
    max_excluded: int = Field(3, ge=1, description="at most this many nodes kept in float")
    eval_batch: int = Field(256, gt=0, description="images per onnxruntime call when measuring accuracy")
    qat: QAT | None = Field(None, description="also build <src>.qat.int8.onnx: fake-quantized KD fine-tuning first")
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

    @model_validator(mode="after")
    def _one_list_of_methods(self) -> Config:
        if self.calibrate_method is not None:
            if "calibrate_methods" in self.model_fields_set:
                raise ValueError("give calibrate_methods (a list) or calibrate_method (one), not both")
            # folded into the list, so a dumped config (run.json, recipe.json) validates again as it is
            self.calibrate_methods, self.calibrate_method = [self.calibrate_method], None
        if len(set(self.calibrate_methods)) != len(self.calibrate_methods):
            raise ValueError("calibrate_methods lists a method twice")
        return self


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Build INT8 and/or FP16 models of each source, choosing on validation; report each against its FP32 source
    on the test split."""
    # 1) what to build, from what
    precisions = cfg.precisions if cfg.precisions is not None else \
        [p for p in ctx.profile.target.precisions if p != "fp32"]
    if not precisions:
        ctx.log(f"  profile '{ctx.profile.name}' asks for fp32 only: nothing to quantize")
        ctx.results["quantize"] = {"precisions": [], "artifacts": {}}
        return {}
    sources = _sources(inputs, cfg)
    settings = resolve(cfg)
    out: Artifacts = {}
    results: dict[str, Any] = {"settings": settings, "sources": sources, "precisions": precisions, "artifacts": {}}
    for src in sources:
        src_art, src_path = inputs[src], ctx.path(src)
        stem = src.removesuffix(".onnx")
        ref = _Reference(src_path, ctx, cfg.eval_batch)
        builds = [(f"{stem}.{p}.onnx", p) for p in precisions]
        if cfg.qat is not None and "int8" in precisions:
            builds.append((f"{stem}.qat.int8.onnx", "qat"))
        for name, how in builds:
            path = ctx.path(name)
            # 2) convert; every INT8 choice (method, nodes kept in float) is made on the validation split
            if how == "fp16":
                quant = _fp16(src_path, path)
            elif how == "int8":
                quant = _int8(src_path, path, cfg, settings, ctx, ref)
            else:
                quant = _qat(inputs, src, path, cfg, settings, ctx, ref)
            # 3) check: accuracy on the test split, agreement and output difference vs the FP32 source (run
            # after the first conversion, which is what reports an unreadable source clearly)
            check = evaluate(_predict(path, ctx, "test", cfg.eval_batch)[0], *ref("test"))
            precision = "int8" if how == "qat" else how
            chosen = {"calibrate_method": quant.get("calibration", {}).get("method"),
                      "excluded_nodes": quant.get("excluded_nodes", [])} if precision == "int8" else {}
            role = src_art.meta.get("role", stem) + ("-qat" if how == "qat" else "")
            meta = {"role": f"{role}-{precision}", "precision": precision, "source_onnx": src, "predecessor": src,
                    **chosen, "quant": quant, **check,
                    **{k: src_art.meta[k] for k in ("params", "macs") if k in src_art.meta}}
            out[name] = Artifact(name=name, kind="onnx", stage="quantize", meta=meta)
            results["artifacts"][name] = {"source": src, **chosen, **check, "nodes": quant.get("nodes"),
                                          **({"validation": quant["validation"]} if "validation" in quant else {})}
            ctx.log(f"  {name}: test acc {check['test_acc']:.4f} (FP32 {check['source_test_acc']:.4f}), agreement "
                    f"{check['agreement_vs_source']:.4f}, max |diff| {check['output_diff_vs_source']['max_abs']:.3g}"
                    + (f"; calibration {chosen['calibrate_method'] or 'none (dynamic)'}, "
                       f"{len(chosen['excluded_nodes'])} node(s) kept in float" if chosen else ""))
    ctx.results["quantize"] = results
    return out


# ---------------------------------------------------------------- data: the only places that read splits
def _calibration_images(ctx: Context, n: int, seed: int) -> np.ndarray:
    """A seeded sample of n training images (fewer if the split is smaller), float32 NCHW, preprocessed."""
    return ctx.data().train.sample(n, seed)[0]


def _train_batches(ctx: Context, batch: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) batches of the whole training split in a seeded random order (QAT fine-tuning)."""
    import torch
    train = ctx.data().train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).split(batch)
    for x, y, _ in train.batches(order=list(order)):
        yield x.numpy(), y.numpy()


def _split_batches(ctx: Context, split: Literal["val", "test"], batch: int) -> Iterator[tuple[np.ndarray,
                                                                                             np.ndarray]]:
    """(x float32 NCHW preprocessed, y) batches of the validation or test split, in order. With tasks y is the
    first task's labels: every choice is judged on the first output, the first task's head."""
    for x, y, _ in getattr(ctx.data(), split).batches(batch):
        yield x.numpy(), (y[:, 0] if y.dim() == 2 else y).numpy()


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
    return {"preset": cfg.preset, "mode": cfg.mode, **s, "calibrate_methods": list(cfg.calibrate_methods),
            **({"percentile": cfg.percentile} if "percentile" in cfg.calibrate_methods else {}),
            **({"entropy_bins": [cfg.entropy_bins, cfg.entropy_quantized_bins]} if "entropy" in cfg.calibrate_methods
               else {}),
            "exclude_sensitive": cfg.exclude_sensitive, "max_excluded": cfg.max_excluded}


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
Build = Callable[[Any, list[str], Path], Path]  # (calibration method, nodes kept in float, output) -> output
Score = Callable[[Path], dict[str, float]]      # a model's accuracy, agreement and output MSE on validation


def _int8(src: Path, dst: Path, cfg: Config, s: dict, ctx: Context, reference: _Reference) -> dict:
    """Quantize src into dst: one model per calibration method, the best on validation kept; then, when it is
    over budget and exclude_sensitive is on, its most sensitive nodes kept in float."""
    import onnx
    where = f"quantize: {src.name} (preset {cfg.preset}, mode {cfg.mode}, format {s['format']})"
    try:
        graph = onnx.load(str(src), load_external_data=False).graph
        external = len(files(src)) > 1
    except Exception as e:
        raise StageError(f"{where}: onnxruntime could not quantize it: not a readable ONNX model "
                         f"({type(e).__name__}: {e}). Re-run the export stage.") from e
    ops = Counter(n.op_type for n in graph.node)
    if cfg.mode == "dynamic" and set(ops) & set(CONV_OPS):
        raise StageError(
            f"quantize.mode: 'dynamic' refused for {src.name}: it has {ops['Conv'] + ops['ConvTranspose']} Conv "
            f"node(s), and onnxruntime has no ConvInteger kernel for dynamically quantized Conv with S8 weights "
            f"(the model would not load). Use mode: static (calibrated); dynamic is for MatMul/Gemm-only models.")
    info: dict[str, Any] = {**s}
    budget = ctx.recipe.max_accuracy_drop_per_stage
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp_name:
        tmp = Path(tmp_name)
        pre = tmp / "pre.onnx"
        # shape inference and graph cleanup first, as onnxruntime's quantization docs ask
        _guard(where, lambda: _pre_process(src, pre, external))
        reader = None
        if cfg.mode == "static":
            reader = _reader(cfg, _calibration_images(ctx, cfg.calibration_samples, ctx.recipe.seed),
                             _input_name(graph))
            info["calibration"] = {"split": "train", "samples": reader.n, "batch": cfg.calibration_batch,
                                   "seed": ctx.recipe.seed, "tried": list(cfg.calibrate_methods)}
        build = _builder(pre, cfg, s, reader, tmp, external, where)
        ref, y = reference("val")
        ref_acc = float((ref.argmax(1) == y).mean())
        score: Score = lambda path: _score(_predict(path, ctx, "val", cfg.eval_batch)[0], ref, y)
        # a) one model per calibration method; max() keeps the first listed of equals
        methods = list(cfg.calibrate_methods) if cfg.mode == "static" else [None]
        tried = {m: score(build(m, [], tmp / f"{m}.onnx")) for m in methods}
        chosen = max(methods, key=lambda m: tried[m]["val_acc"])
        validation = {"split": "val", "samples": len(y), "source_val_acc": ref_acc, "budget": budget,
                      "by_method": {str(m): tried[m] for m in methods} if cfg.mode == "static" else {}}
        # b) over budget: keep the most sensitive nodes in float, one more at a time
        excluded: list[str] = []
        if cfg.exclude_sensitive and ref_acc - tried[chosen]["val_acc"] > budget + 1e-9:
            excluded, info["sensitivity"], info["fallback_steps"] = _fallback(
                build, score, chosen, pre, tried[chosen], ref_acc, budget, cfg.max_excluded, tmp)
        # c) the chosen model where it belongs (calibration is cached: nothing is measured again)
        build(chosen, excluded, dst)
    final = score(dst)
    if cfg.mode == "static":
        info["calibration"]["method"] = chosen
    info["excluded_nodes"] = excluded
    info["validation"] = {**validation, **{f"chosen_{k}": v for k, v in final.items()},
                          "within_budget": ref_acc - final["val_acc"] <= budget + 1e-9}
    info["nodes"] = quant_nodes(dst)
    if not info["nodes"]:
        raise StageError(f"{where}: the output has no QuantizeLinear/DequantizeLinear or QLinear/Integer nodes: "
                         f"nothing was quantized, so it is not an INT8 model.")
    return info


def _pre_process(src: Path, pre: Path, external: bool) -> None:
    from onnxruntime.quantization import quant_pre_process
    quant_pre_process(str(src), str(pre), save_as_external_data=external)


def _guard(where: str, fn: Callable[[], Any]) -> Any:
    """onnxruntime and onnx raise many types; the message is what helps."""
    try:
        return fn()
    except StageError:
        raise
    except Exception as e:
        raise StageError(f"{where}: onnxruntime could not quantize it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Check quantize.preset/format, or set "
                         f"quantize.enabled: false; the FP32 artifacts are intact.") from e


def _builder(pre: Path, cfg: Config, s: dict, reader, tmp: Path, external: bool, where: str) -> Build:
    """A function that writes the INT8 model of `pre` for a calibration method and a list of nodes kept in float.
    Each method calibrates once (its ranges go to a cache file); every later build with it reuses them."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    qtype = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}

    def build(method, exclude: list[str], dst: Path) -> Path:
        cache = tmp / f"{method}.calibration.json"
        if cfg.mode == "static" and not cache.exists():
            _guard(where, lambda: _calibrate(pre, method, cfg, reader, cache, external))
        if cfg.mode == "dynamic":
            _guard(where, lambda: quantize_dynamic(
                str(pre), str(dst), op_types_to_quantize=["MatMul", "Gemm"], per_channel=s["per_channel"],
                reduce_range=s["reduce_range"], weight_type=qtype[s["weight_type"]], nodes_to_exclude=exclude,
                use_external_data_format=external))
            return dst
        _guard(where, lambda: quantize_static(
            str(pre), str(dst), None, quant_format=QuantFormat.QDQ if s["format"] == "qdq" else
            QuantFormat.QOperator, per_channel=s["per_channel"], reduce_range=s["reduce_range"],
            activation_type=qtype[s["activation_type"]], weight_type=qtype[s["weight_type"]],
            nodes_to_exclude=exclude, calibrate_method=_method(method), use_external_data_format=external,
            calibration_cache_path=str(cache),
            extra_options={"ActivationSymmetric": s["symmetric_activations"],
                           "WeightSymmetric": s["symmetric_weights"], "DedicatedQDQPair": s["dedicated_qdq_pair"]}))
        return dst
    return build


def _calibrate(pre: Path, method: str, cfg: Config, reader, cache: Path, external: bool) -> None:
    """Activation ranges of one method into a calibration cache that quantize_static then reads. Done here, not
    inside quantize_static, because quantize_static cannot pass the entropy histogram's bin counts."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    options = {"percentile": {"percentile": cfg.percentile},
               "entropy": {"num_bins": cfg.entropy_bins, "num_quantized_bins": cfg.entropy_quantized_bins}}
    # the tensors quantize_static itself calibrates: the inputs and outputs of every op type it can quantize
    calibrator = create_calibrator(pre, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                   augmented_model_path=str(cache.with_suffix(".augmented.onnx")),
                                   calibrate_method=_method(method), use_external_data_format=external,
                                   extra_options=options.get(method, {}))
    reader.rewind()  # every method reads the whole set from the start
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def _fallback(build: Build, score: Score, method, pre: Path, start: dict, ref_acc: float, budget: float,
              max_excluded: int, tmp: Path) -> tuple[list[str], list[dict], list[dict]]:
    """(nodes kept in float, every weighted node's sensitivity, the steps tried).

    A node's sensitivity is the model with only that node in float: its validation accuracy (higher = the node
    costs more when quantized), then its output MSE vs FP32 to break ties. Nodes are kept in float in that order
    until the drop fits the budget or max_excluded is reached; the most accurate step wins (the first of equals,
    so the fewest nodes in float)."""
    import onnx
    graph = onnx.load(str(pre), load_external_data=False).graph
    nodes = [(n.name, n.op_type) for n in graph.node if n.op_type in WEIGHTED_OPS and n.name]
    sens = [{"node": n, "op": op, **score(build(method, [n], tmp / f"alone-{i}.onnx"))}
            for i, (n, op) in enumerate(nodes)]
    ranked = sorted(sens, key=lambda r: (-r["val_acc"], r["val_mse"]))
    steps = [{"excluded": [], **start}]
    # at least one weighted node stays quantized, or the artifact would not be INT8
    for k in range(1, min(max_excluded, len(nodes) - 1) + 1):
        excl = [r["node"] for r in ranked[:k]]
        got = {kk: v for kk, v in ranked[0].items() if kk.startswith("val_")} if k == 1 else \
            score(build(method, excl, tmp / f"excluded-{k}.onnx"))
        steps.append({"excluded": excl, **got})
        if ref_acc - got["val_acc"] <= budget + 1e-9:
            break
    best = max(steps, key=lambda st: st["val_acc"])
    return best["excluded"], ranked, steps


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _input_name(g) -> str:
    inits = {i.name for i in g.initializer}
    return next(i.name for i in g.input if i.name not in inits)


def _reader(cfg: Config, x: np.ndarray, input_name: str):
    """Calibration batches from the training sample, already preprocessed exactly like inference."""
    from onnxruntime.quantization import CalibrationDataReader
    n = len(x)
    if n < cfg.min_calibration_samples:
        raise StageError(f"quantize.calibration_samples: the calibration set has {n} training images "
                         f"(asked for {cfg.calibration_samples}), fewer than quantize.min_calibration_samples="
                         f"{cfg.min_calibration_samples}: ranges from so few are unreliable. Use a larger "
                         f"training split or lower the minimum knowingly.")

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


# ---------------------------------------------------------------- QAT
def _qat(inputs: Artifacts, src: str, dst: Path, cfg: Config, s: dict, ctx: Context, reference: _Reference) -> dict:
    """Fine-tune a fake-quantized copy of the torch student against the teacher, export it, then quantize it the
    same way as the source (methods, choice and fallback on validation, scored against the FP32 source)."""
    import onnx

    from pipeline.train import models, qat
    from stages._common import load_teachers, torch2onnx
    # 1) the torch student behind the FP32 ONNX source, and the teacher
    pt = inputs[src].meta.get("source")
    if cfg.mode != "static" or s["format"] != "qdq":
        raise StageError("quantize.qat: needs mode: static and format: qdq (the QAT model is exported as QDQ).")
    if not pt or pt not in inputs or inputs[pt].kind != "torch":
        raise StageError(f"quantize.qat: {src} was not exported from a PyTorch artifact of this run, and QAT "
                         f"fine-tunes the PyTorch student. Name a source with one, or remove quantize.qat.")
    teacher = load_teachers(inputs, ctx)[0]
    # 2) BatchNorm folded into the convs (as the ONNX export does), then Conv/Linear fake-quantized
    student = models.load(ctx.path(pt), inputs[pt].meta)
    try:
        from torch.fx.experimental.optimization import fuse
        model = fuse(student.eval())
    except Exception as e:  # torch.fx raises TraceError and others on dynamic control flow
        raise StageError(f"quantize.qat: {pt} cannot be traced by torch.fx to fold its BatchNorms "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); remove quantize.qat."
                         ) from e
    wrapped = qat.wrap(model, s)
    # input ranges first, from the calibration images (what MinMax calibration sees): epoch 0 is then the PTQ model
    qat.observe(model, wrapped, torch.from_numpy(_calibration_images(ctx, cfg.calibration_samples, ctx.recipe.seed)))
    # 3) KD fine-tuning, then the float weights (which now sit on the INT8 grid) exported and quantized
    q, seed = cfg.qat, ctx.recipe.seed
    history, kept = qat.kd_finetune(
        model, teacher, lambda epoch: _train_batches(ctx, q.batch_size, seed + epoch), lambda m: _val_acc(m, ctx),
        epochs=q.epochs, lr=q.lr, temperature=q.temperature, alpha=q.alpha, seed=seed, log=ctx.log)
    qat.unwrap(wrapped)
    opset = next(o.version for o in onnx.load(str(ctx.path(src)), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".qat-") as tmp:
        fp32 = Path(tmp) / f"{dst.name.removesuffix('.int8.onnx')}.onnx"
        torch2onnx(model.eval(), fp32, ctx.data().input_shape, opset, what="quantize.qat")
        info = _int8(fp32, dst, cfg, s, ctx, reference)
    info["qat"] = {**cfg.qat.model_dump(), "from": pt, "fake_quantized_layers": len(wrapped), "history": history,
                   "kept_epoch": kept,
                   "weights": "per output channel, symmetric, the INT8 grid onnxruntime uses (STE)",
                   "activations": "per tensor at every Conv/Linear input, EMA min/max ranges (STE)",
                   "export": "float weights after fine-tuning, then calibrated and quantized like the source"}
    return info


@torch.no_grad()
def _val_acc(model, ctx: Context) -> float:
    model.eval()
    hits = n = 0
    for x, y in _split_batches(ctx, "val", 256):
        hits += int((model(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
        n += len(y)
    return hits / max(n, 1)


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
class _Reference:
    """The FP32 source's outputs and the labels per split, computed on first use and shared by its variants."""

    def __init__(self, path: Path, ctx: Context, batch: int):
        self.path, self.ctx, self.batch = path, ctx, batch
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, split: Literal["val", "test"]) -> tuple[np.ndarray, np.ndarray]:
        if split not in self.cache:
            self.cache[split] = _predict(self.path, self.ctx, split, self.batch)
        return self.cache[split]


def _predict(path: Path, ctx: Context, split: Literal["val", "test"], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, labels) of a model on a split through onnxruntime CPU, batch by batch (the batch dim is dynamic)."""
    from pipeline.device.ortbench import CPU, Skip, feed, open_session  # onnxruntime: only when the stage runs
    try:
        sess = open_session(path, CPU, threads=0)
    except Skip as e:
        raise StageError(f"quantize: {path.name} does not load in onnxruntime: {e}") from None
    outs, ys = [], []
    for x, y in _split_batches(ctx, split, batch):
        outs.append(sess.run(None, feed(sess, x))[0])
        ys.append(y)
    return np.concatenate(outs).astype(np.float32), np.concatenate(ys)


def _score(got: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Validation accuracy, agreement with the FP32 source and output MSE vs it: what every choice compares."""
    return {"val_acc": float((got.argmax(1) == y).mean()),
            "val_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "val_mse": float(((got - ref) ** 2).mean())}


def evaluate(got: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Test-split accuracy of outputs `got`, and their agreement / difference with the FP32 source's `ref`."""
    diff = np.abs(got - ref)
    return {"test_acc": float((got.argmax(1) == y).mean()), "source_test_acc": float((ref.argmax(1) == y).mean()),
            "agreement_vs_source": float((got.argmax(1) == ref.argmax(1)).mean()),
            "output_diff_vs_source": {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())},
            "test_samples": len(y), "accuracy_source": "onnxruntime CPU on the test split"}


