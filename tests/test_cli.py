"""The CLI through typer's CliRunner: listings, and bad input as exit code 2 with one clear paragraph."""
from __future__ import annotations

import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import DEFAULT_RECIPE
from stages import STAGES

runner = CliRunner()


def test_stages_lists_the_order():
    res = runner.invoke(app, ["stages"])
    assert res.exit_code == 0
    positions = [res.stdout.index(f"{i}. {name}") for i, name in enumerate(STAGES, 1)]
    assert positions == sorted(positions)


def test_profiles_lists_targets_and_budgets():
    res = runner.invoke(app, ["profiles"], env={"COLUMNS": "250"})
    assert res.exit_code == 0
    for name in ("edge-cpu", "server-gpu", "jetson"):
        assert name in res.stdout
    assert "p95_latency_ms" in res.stdout and "Jetson Orin Nano" in res.stdout


def test_unknown_profile_exits_2_without_traceback(tmp_path):
    res = runner.invoke(app, ["run", "--profile", "jetsn", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "Unknown profile 'jetsn'" in res.stderr and "Traceback" not in res.stderr + res.stdout
    assert not any(tmp_path.iterdir()), "a bad profile must not create a run"


def test_bad_recipe_exits_2_naming_file_and_field(tmp_path):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["distill"]["alpah"] = 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["run", "--recipe", str(bad), "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2
    assert str(bad) in res.stderr and "distill.alpah: unknown key" in res.stderr


def test_debug_shows_the_traceback(tmp_path):
    res = runner.invoke(app, ["--debug", "run", "--profile", "jetsn", "--runs-dir", str(tmp_path)])
    assert res.exit_code != 0 and res.exception is not None


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["run", "--resume", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2 and "No run to resume" in res.stderr


def test_check_lists_every_check_and_exits_2_on_a_bad_recipe(tmp_path):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["models"]["student"]["kwargs"] = {"nonsense": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["check", "--recipe", str(bad)], env={"PIPELINE_DEVICE": ""})
    assert res.exit_code == 2
    assert f"FAIL  models.student: {bad}: models.student.kwargs: arch 'mlp'" in res.stdout
    assert "ok    models.teacher:" in res.stdout and "Traceback" not in res.stdout + res.stderr
