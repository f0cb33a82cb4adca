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


# a short run of the default recipe, set from the command line only (prune and quantize off: not what is tested)
SHORT = ["teacher.epochs=3", "distill.epochs=2", "prune.enabled=false", "quantize.enabled=false",
         "benchmark={warmup: 2, min_runs: 10, min_duration_s: 0.02, throughput_duration_s: 0.02, "
         "energy_window_s: 0.05}"]


def test_set_changes_one_run_of_the_default_recipe_from_the_cli(tmp_path):
    import json
    for method in ("dkd",):  # tests/train/test_kd.py runs dkd and dist from recipe files
        sets = [a for s in [*SHORT, f"distill.method={method}"] for a in ("--set", s)]
        res = runner.invoke(app, ["run", "--runs-dir", str(tmp_path / method), *sets])
        assert res.exit_code == 0, res.stdout + res.stderr
        run = next(p for p in (tmp_path / method).iterdir() if p.is_dir() and not p.is_symlink())
        report = json.loads((run / "report.json").read_text())
        assert report["distill"]["method"] == method
        assert json.loads((run / "recipe.json").read_text())["distill"]["method"] == method  # what ranks reread
        assert 0 <= report["distill"]["acc_kd"] <= 1


def test_nproc_below_one_is_refused_before_any_run(tmp_path):
    for n in ("0", "-3"):
        res = runner.invoke(app, ["run", "--runs-dir", str(tmp_path), "--nproc", n])
        assert res.exit_code == 2 and "--nproc" in res.output and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())


def test_a_bad_set_exits_2_naming_the_assignment_before_any_run(tmp_path):
    for sets, says in ((["distill.method=dk"], "--set: 1 invalid setting(s):\n  distill.method:"),
                       (["distill.methd=dkd"], "--set: 1 invalid setting(s):\n  distill.methd: unknown key"),
                       (["typo.deep.key=1"], "--set: 1 invalid setting(s):\n  typo: unknown key"),
                       (["distill"], "--set 'distill': expected KEY=VALUE"),
                       (["seed.x=1"], "seed is a int in the recipe, not a section")):
        res = runner.invoke(app, ["run", "--runs-dir", str(tmp_path), *(a for s in sets for a in ("--set", s))])
        assert res.exit_code == 2 and says in res.stderr, res.stderr
        assert "Traceback" not in res.stderr + res.stdout
        check = runner.invoke(app, ["check", *(a for s in sets for a in ("--set", s))])
        assert check.exit_code == 2 and "FAIL  recipe: " in check.stdout
    assert not any(tmp_path.iterdir()), "a bad --set must not create a run"
