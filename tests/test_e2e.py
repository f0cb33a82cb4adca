"""End to end through the CLI, as `make pipeline` runs it, with few epochs."""
from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import DEFAULT_RECIPE
from tests.conftest import FAST


def _fast_recipe(tmp_path):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    for stage, values in FAST.items():
        data[stage] = {**(data.get(stage) or {}), **values}
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_pipeline_through_the_cli(tmp_path):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["run", "--recipe", str(_fast_recipe(tmp_path)), "--runs-dir", str(runs)])
    assert res.exit_code == 0, res.stdout + res.stderr
    run_dir = (runs / "latest").resolve()
    assert f"report: {run_dir / 'report.md'}" in res.stdout.replace("\n", "")
    record = json.loads((run_dir / "run.json").read_text())
    for name, stage in record["stages"].items():
        assert stage["status"] in ("ok", "disabled"), name
        if stage["status"] == "ok":
            assert isinstance(stage["duration_s"], float)
    report = json.loads((run_dir / "report.json").read_text())
    measured = {r["artifact"]: r for r in report["rows"] if r["status"] == "measured"}
    assert {"teacher.onnx", "student.onnx", "student-scratch.onnx"} <= set(measured)
    for r in measured.values():
        assert r["provider"] == "CPUExecutionProvider" and r["on_target"]
        assert r["latency_ms"]["p50"] > 0 and 0 <= r["accuracy"] <= 1
        assert r["energy_source"].startswith("estimated: 15")  # no RAPL here: estimate, labelled
    md = (run_dir / "report.md").read_text()
    assert "student-scratch.onnx" in md and "estimated" in md.lower()


def test_gpu_profiles_finish_on_a_cpu_host_with_honest_rows(tmp_path):
    import onnxruntime as ort
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["run", "--profile", "server-gpu", "--recipe", str(_fast_recipe(tmp_path)),
                                   "--runs-dir", str(runs)])
    assert res.exit_code == 0, res.stdout + res.stderr
    report = json.loads(((runs / "latest").resolve() / "report.json").read_text())
    gpu_here = "CUDAExecutionProvider" in ort.get_available_providers()
    for r in report["rows"]:
        if r["provider"] != "CPUExecutionProvider" and r["where"]["kind"] == "host" and not gpu_here:
            assert r["status"] == "skipped" and r["reason"]
        if r["where"]["kind"] == "host" and r["provider"] == "CPUExecutionProvider" and r["status"] == "measured":
            assert not r["on_target"], "a host CPU number is never a GPU number"
            assert r["energy_mj"] is None and "not this machine" in r["energy_source"]
    assert any(r["status"] == "estimated" for r in report["rows"])
