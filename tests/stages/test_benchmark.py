"""benchmark: fail closed on missing providers, honest labels, and accuracy measured on the artifact itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.device.ortbench import CPU, CUDA, TRT, Skip, Timed, feed, open_session, stats, time_interleaved
from pipeline.train import models
from pipeline.train.data import load_splits
from pipeline.train.loop import accuracy


def _onnx(real_run, name="student.onnx"):
    return real_run / name


@pytest.mark.parametrize("provider", [CUDA, TRT])
def test_gpu_provider_on_this_host_is_a_skip_with_reason(real_run, provider):
    import onnxruntime as ort
    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is available here; the fail-closed path needs a host without it")
    with pytest.raises(Skip, match=f"{provider} requested, but this onnxruntime"):
        open_session(_onnx(real_run), provider, threads=1)


def test_report_never_shows_a_number_under_a_missing_provider(real_run, tmp_path):
    """A profile asking for CUDA on this host gets a skipped row with the reason, never a number."""
    import shutil

    from rich.console import Console

    from pipeline.config import DEFAULT_RECIPE, load_profile
    from pipeline.runner import Runner
    from tests.conftest import fast_recipe
    run_dir = tmp_path / "run"
    shutil.copytree(real_run, run_dir)
    profile = load_profile("edge-cpu")
    profile.target.providers = [CUDA, CPU]
    Runner(run_dir, fast_recipe(profile), profile, recipe_path=DEFAULT_RECIPE,
           console=Console(quiet=True)).run(resume=True)
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    cuda = [r for r in rows if r["provider"] == CUDA]
    assert cuda and all(r["status"] == "skipped" and "latency_ms" not in r and CUDA in r["reason"] for r in cuda)


def test_ort_accuracy_equals_pytorch_accuracy(real_run):
    """The accuracy in the report is the artifact's own, and the same as the PyTorch model's on the same data."""
    report = json.loads((real_run / "report.json").read_text())
    recipe = json.loads((real_run / "recipe.json").read_text())
    splits = load_splits(DataConfig.model_validate(recipe["data"]), recipe["seed"])
    record = json.loads((real_run / "run.json").read_text())["stages"]
    for name, stage in (("teacher", "teacher"), ("student", "distill"), ("student-scratch", "distill")):
        model = models.load(real_run / f"{name}.pt", record[stage]["outputs"][f"{name}.pt"]["meta"])
        row = next(r for r in report["rows"] if r["artifact"] == f"{name}.onnx" and r["status"] == "measured")
        assert row["accuracy"] == pytest.approx(accuracy(model, splits.test), abs=1e-9)
        assert "onnxruntime" in row["accuracy_source"]


def test_rows_say_how_each_figure_was_obtained(real_run):
    report = json.loads((real_run / "report.json").read_text())
    measured = [r for r in report["rows"] if r["status"] == "measured"]
    assert {r["artifact"] for r in measured} >= {"teacher.onnx", "student.onnx", "student-scratch.onnx"}
    for r in measured:
        assert r["latency_source"].startswith("measured") and r["provider"] == CPU
        assert r["latency_ms"]["n"] >= 20 and r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
        assert r["energy_source"].split(":")[0] in ("measured", "estimated")
        if r["energy_source"].startswith("estimated"):
            assert "W (profile power_w)" in r["energy_source"]
        assert set(r["throughput"]) == {"1", "8", "32"} and all(v > 0 for v in r["throughput"].values())
        assert r["where"]["kind"] == "host" and r["where"]["cpu"]["model"]


def test_interleaved_timing_meets_count_and_duration(real_run):
    sessions = [open_session(_onnx(real_run, n), CPU, threads=1) for n in ("student.onnx", "teacher.onnx")]
    x = np.zeros((1, 1, 8, 8), np.float32)
    entries = [Timed(str(i), s, feed(s, x)) for i, s in enumerate(sessions)]
    time_interleaved(entries, warmup=2, min_runs=30, min_duration_s=0.02, max_duration_s=10)
    for e in entries:
        assert len(e.samples) >= 30 and e.busy_s >= 0.02 and e.first_run_ms > 0


def test_stats_percentiles():
    s = stats(list(range(1, 101)))
    assert s["n"] == 100 and s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    assert s["min"] == 1 and s["max"] == 100 and s["cv"] == pytest.approx(np.std(range(1, 101)) / 50.5)
