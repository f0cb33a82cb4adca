"""pipeline/device/measure.py on a tiny real ONNX model: the facts a row carries come from fields, not text."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.device.measure import BenchSettings, ModelEntry, measure
from pipeline.device.ortbench import CPU
from stages.benchmark import Config, settings


def _linear_onnx(path: Path) -> Path:
    """input [N,1,8,8] -> flatten -> x @ W: ten logits, real weights, opset 18."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


class _Target:
    threads, batch_sizes = [1], [1]


def test_the_timing_cap_has_one_default():
    assert BenchSettings().max_duration_s == Config().max_duration_s == 60.0
    assert settings(Config(), _Target()).max_duration_s == 60.0


def test_a_row_reports_its_fastest_thread_count_from_a_field(tmp_path):
    entry = ModelEntry("m.onnx", _linear_onnx(tmp_path / "m.onnx"), "fp32", {})
    x = np.random.default_rng(1).normal(size=(16, 1, 8, 8)).astype(np.float32)
    y = np.zeros(16, dtype=np.int64)
    s = BenchSettings(warmup=2, min_runs=10, min_duration_s=0.0, max_duration_s=2.0, throughput_duration_s=0.05,
                      threads=[1, 2], batch_sizes=[1])
    (row,) = measure([entry], [CPU], s, x, y, {}, {"kind": "host"})
    assert row["status"] == "measured" and set(row["p50_by_threads"]) == {"1", "2"}
    fastest = min(row["p50_by_threads"], key=row["p50_by_threads"].get)
    assert row["threads"] == int(fastest)
