"""quantize: a real INT8 QDQ model within the accuracy allowance on the digits test split; refusals; FP16 valid."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from pipeline.artifacts import Artifact
from pipeline.config import ModelSpec, load_profile
from pipeline.context import Context
from pipeline.errors import StageError
from pipeline.train import models
from pipeline.train.loop import TrainConfig, fit
from stages import quantize
from stages._common import build_info
from stages.export import Config as ExportConfig
from stages.export import torch2onnx
from tests.conftest import fast_recipe

STUDENT = ModelSpec(arch="cnn", kwargs={"channels": [16, 32]})


def _ctx(run_dir, **quantize_over) -> Context:
    profile = load_profile("edge-cpu")
    recipe = fast_recipe(profile, quantize={"enabled": True, **quantize_over})
    return Context(run_dir=run_dir, recipe=recipe, profile=profile, console=Console(quiet=True))


def _onnx_artifact(ctx: Context, model: nn.Module, name: str, role: str) -> Artifact:
    torch2onnx(model, ctx.path(name), ctx.data().input_shape, ExportConfig())
    params, macs = models.count(model, ctx.data().input_shape)
    return Artifact(name=name, kind="onnx", stage="export",
                    meta={"role": role, "precision": "fp32", "params": params, "macs": macs})


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Context, dict[str, Artifact]]:
    """A trained small CNN on the 8x8 digits, exported to student.onnx in a run directory."""
    ctx = _ctx(tmp_path_factory.mktemp("run"))
    d = ctx.data()
    model = models.build(STUDENT, *build_info(d))
    fit(model, lambda m, x, y, _: F.cross_entropy(m(x), y), d.x_train, d.y_train, d.x_val, d.y_val,
        TrainConfig(epochs=10, lr=0.01), seed=0, desc="student")
    return ctx, {"student.onnx": _onnx_artifact(ctx, model, "student.onnx", "student")}


@pytest.fixture(scope="module")
def int8(source):
    ctx, inputs = source
    return quantize.run(dict(inputs), ctx.recipe.quantize, ctx)


def _elsewhere(source, tmp_path) -> tuple[Context, dict[str, Artifact]]:
    """The same source in a run directory of its own, so a variant never overwrites the shared INT8 model."""
    import shutil
    ctx, inputs = source
    shutil.copy2(ctx.path("student.onnx"), tmp_path / "student.onnx")
    return Context(run_dir=tmp_path, recipe=ctx.recipe, profile=ctx.profile, console=ctx.console), inputs


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_has_qdq_nodes_and_accuracy_within_allowance(source, int8):
    ctx, _ = source
    art = int8["student.int8.onnx"]
    ops = _ops(ctx.path(art.name))
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert art.meta["quant"]["nodes"]["DequantizeLinear"] >= 3  # weights of 2 convs and the classifier at least
    meta = art.meta
    assert meta["precision"] == "int8" and meta["source_onnx"] == meta["predecessor"] == "student.onnx"
    assert meta["role"] == "student-int8" and meta["params"] > 0 and meta["macs"] > 0
    assert meta["quant"]["calibration"] == {"split": "train", "samples": 256, "batch": 32, "method": "minmax",
                                            "seed": 0}
    assert meta["source_test_acc"] > 0.9  # a real model, so the allowance below means something
    assert meta["source_test_acc"] - meta["test_acc"] <= ctx.recipe.max_accuracy_drop_per_stage
    assert meta["agreement_vs_source"] >= 0.97
    assert 0 < meta["output_diff_vs_source"]["mean_abs"] <= meta["output_diff_vs_source"]["max_abs"]
    assert ctx.recipe.quantize.preset == "ort-cpu"  # from the edge-cpu profile's overrides
    assert ctx.results["quantize"]["artifacts"]["student.int8.onnx"]["test_acc"] == meta["test_acc"]


def test_ort_cpu_preset_u8_activations_s8_weights(source, int8):
    ctx, _ = source
    s = int8["student.int8.onnx"].meta["quant"]
    assert (s["format"], s["activation_type"], s["weight_type"], s["per_channel"]) == ("qdq", "u8", "s8", True)
    from pipeline.device.envinfo import cpu_info
    assert s["reduce_range"] is (not cpu_info()["vnni"])
    zero_points = _zero_point_types(ctx.path("student.int8.onnx"))
    assert onnx.TensorProto.UINT8 in zero_points and onnx.TensorProto.INT8 in zero_points


def test_tensorrt_preset_is_symmetric_s8_with_dedicated_pairs(source, tmp_path):
    ctx, _ = source
    ctx = Context(run_dir=tmp_path, recipe=ctx.recipe, profile=ctx.profile, console=ctx.console)
    # a residual net: the block input feeds both the conv and the skip add, so Q/DQ pairs can be shared
    resnet = models.build(ModelSpec(arch="resnet", kwargs={"widths": [8, 16], "blocks": [1, 1]}),
                          *build_info(ctx.data())).eval()
    inputs = {"res.onnx": _onnx_artifact(ctx, resnet, "res.onnx", "student")}
    shared = {}
    for preset in ("ort-cpu", "tensorrt"):
        cfg = quantize.Config(enabled=True, preset=preset, precisions=["int8"], sources=["res.onnx"])
        out = quantize.run(dict(inputs), cfg, ctx)
        shared[preset] = _shared_dequantize(ctx.path("res.int8.onnx"))
    path = ctx.path("res.int8.onnx")  # the tensorrt one, written last
    assert out["res.int8.onnx"].meta["quant"]["dedicated_qdq_pair"] is True
    assert shared["ort-cpu"] and not shared["tensorrt"], shared  # one DQ per consumer only with dedicated pairs
    assert _zero_point_types(path) == {onnx.TensorProto.INT8}
    m = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps and all((z == 0).all() for z in zps)  # symmetric: zero-point 0 everywhere


@pytest.mark.parametrize("over, op", [({"calibrate_method": "entropy"}, "QuantizeLinear"),
                                      ({"calibrate_method": "percentile"}, "QuantizeLinear"),
                                      ({"format": "qoperator"}, "QLinearConv")])
def test_calibration_methods_and_formats(source, over, op, tmp_path):
    ctx, inputs = _elsewhere(source, tmp_path)
    cfg = quantize.Config(enabled=True, precisions=["int8"], **over)
    meta = quantize.run(dict(inputs), cfg, ctx)["student.int8.onnx"].meta
    assert op in _ops(ctx.path("student.int8.onnx"))
    assert meta["quant"]["calibrate_method"] == cfg.calibrate_method
    assert meta["source_test_acc"] - meta["test_acc"] <= ctx.recipe.max_accuracy_drop_per_stage


def _shared_dequantize(path) -> list[str]:
    """DequantizeLinear outputs read by more than one node."""
    from collections import Counter
    g = onnx.load(str(path)).graph
    reads = Counter(i for n in g.node for i in n.input)
    return [n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and reads[n.output[0]] > 1]


def _zero_point_types(path) -> set[int]:
    """Integer types of the activation and weight zero-points (biases are INT32 by design, left out)."""
    m = onnx.load(str(path))
    inits = {i.name: i.data_type for i in m.graph.initializer}
    return {inits[n.input[2]] for n in m.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits
            and inits[n.input[2]] != onnx.TensorProto.INT32}


def test_dynamic_quantization_of_conv_model_is_refused(source):
    ctx, inputs = source
    with pytest.raises(StageError, match=r"quantize.mode: 'dynamic' refused.*Conv.*no ConvInteger kernel"):
        quantize.run(dict(inputs), quantize.Config(enabled=True, mode="dynamic", precisions=["int8"]), ctx)


def test_dynamic_quantization_of_matmul_only_model(source):
    ctx, _ = source
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    d = ctx.data()
    fit(mlp, lambda m, x, y, _: F.cross_entropy(m(x), y), d.x_train, d.y_train, d.x_val, d.y_val,
        TrainConfig(epochs=5, lr=0.01), seed=0, desc="mlp")
    inputs = {"mlp.onnx": _onnx_artifact(ctx, mlp, "mlp.onnx", "student")}
    cfg = quantize.Config(enabled=True, mode="dynamic", precisions=["int8"], sources=["mlp.onnx"])
    art = quantize.run(inputs, cfg, ctx)["mlp.int8.onnx"]
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & _ops(ctx.path("mlp.int8.onnx"))
    assert art.meta["source_test_acc"] - art.meta["test_acc"] <= ctx.recipe.max_accuracy_drop_per_stage


def test_calibration_below_minimum_is_refused(source):
    ctx, inputs = source
    cfg = quantize.Config(enabled=True, precisions=["int8"], calibration_samples=32, min_calibration_samples=64)
    with pytest.raises(StageError, match=r"quantize.calibration_samples: .* 32 training images.*minimum"):
        quantize.run(dict(inputs), cfg, ctx)


def test_model_onnxruntime_cannot_quantize_is_a_stage_error(source):
    ctx, _ = source
    ctx.path("broken.onnx").write_bytes(b"not an onnx model")
    inputs = {"broken.onnx": Artifact(name="broken.onnx", kind="onnx", stage="export", meta={"precision": "fp32"})}
    cfg = quantize.Config(enabled=True, precisions=["int8"], sources=["broken.onnx"])
    with pytest.raises(StageError, match=r"quantize: broken.onnx .*could not quantize"):
        quantize.run(inputs, cfg, ctx)


def test_unknown_source_is_refused(source):
    ctx, inputs = source
    with pytest.raises(StageError, match=r"quantize.sources: 'student-pruned.onnx' .* Available: student.onnx"):
        quantize.run(dict(inputs), quantize.Config(enabled=True, sources=["student-pruned.onnx"]), ctx)


def test_fp16_artifact_valid_with_fp32_io(source, tmp_path):
    ctx, inputs = _elsewhere(source, tmp_path)
    art = quantize.run(dict(inputs), quantize.Config(enabled=True, precisions=["fp16"]), ctx)["student.fp16.onnx"]
    path = ctx.path(art.name)
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    f32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [f32]
    assert {i.data_type for i in m.graph.initializer if i.data_type in (f32, onnx.TensorProto.FLOAT16)} == \
        {onnx.TensorProto.FLOAT16}
    assert art.meta["precision"] == "fp16" and art.meta["agreement_vs_source"] >= 0.99
    assert art.meta["output_diff_vs_source"]["max_abs"] < 0.05
    assert np.isclose(art.meta["test_acc"], art.meta["source_test_acc"], atol=0.01)
