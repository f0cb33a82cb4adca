"""The runner: a failed stage keeps every earlier artifact and records the error; --resume skips what is unchanged."""
from __future__ import annotations

import json
import os

import pytest
from rich.console import Console

from pipeline.artifacts import fingerprint
from pipeline.config import DEFAULT_RECIPE, load_profile
from pipeline.errors import StageError
from pipeline.runner import latest_run, run_pipeline
from tests.conftest import fast_recipe

TINY = {"teacher": {"epochs": 2}, "distill": {"epochs": 1}}


def test_failure_keeps_artifacts_and_resume_continues(tmp_path):
    profile = load_profile("edge-cpu")
    runs = tmp_path / "runs"
    # export's parity tolerance set impossibly tight: the export stage fails after teacher and distill
    broken = fast_recipe(profile, **TINY, export={"atol": 1e-30, "rtol": 0})
    with pytest.raises(StageError, match="differs from PyTorch"):
        run_pipeline(broken, profile, recipe_path=DEFAULT_RECIPE, runs_dir=runs, console=Console(quiet=True))
    run_dir = latest_run(runs)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stages"]["export"]["status"] == "failed"
    assert "differs from PyTorch" in record["stages"]["export"]["error"]
    kept = {n: o["sha256"] for s in ("teacher", "distill") for n, o in record["stages"][s]["outputs"].items()}
    assert set(kept) == {"teacher.pt", "student.pt", "student-scratch.pt"}
    assert all(fingerprint(run_dir / n)[0] == h for n, h in kept.items())
    mtimes = {n: os.stat(run_dir / n).st_mtime_ns for n in kept}

    fixed = fast_recipe(profile, **TINY)
    run_pipeline(fixed, profile, recipe_path=DEFAULT_RECIPE, runs_dir=runs, resume=True, console=Console(quiet=True))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stages"]["teacher"]["reused"] and record["stages"]["distill"]["reused"]
    assert record["stages"]["export"]["status"] == "ok" and not record["stages"]["export"].get("reused")
    assert {n: os.stat(run_dir / n).st_mtime_ns for n in kept} == mtimes, "reused artifacts were rewritten"
    assert (run_dir / "report.md").exists()

    # a changed stage config reruns that stage and everything after it, nothing before
    changed = fast_recipe(profile, teacher={"epochs": 2}, distill={"epochs": 1, "alpha": 0.5})
    run_pipeline(changed, profile, recipe_path=DEFAULT_RECIPE, runs_dir=runs, resume=True, console=Console(quiet=True))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stages"]["teacher"].get("reused")
    assert not record["stages"]["distill"].get("reused") and not record["stages"]["export"].get("reused")


def test_a_changed_artifact_on_disk_is_not_reused(real_run, tmp_path):
    import shutil
    run_dir = tmp_path / real_run.name
    shutil.copytree(real_run, run_dir)
    (tmp_path / "latest").symlink_to(run_dir.name)
    (run_dir / "student.pt").write_bytes(b"not the file that was recorded")
    profile = load_profile("edge-cpu")
    run_pipeline(fast_recipe(profile), profile, recipe_path=DEFAULT_RECIPE, runs_dir=tmp_path, resume=True,
                 console=Console(quiet=True))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stages"]["teacher"].get("reused")
    assert not record["stages"]["distill"].get("reused"), "a stage whose output changed on disk must rerun"
    recorded = record["stages"]["distill"]["outputs"]["student.pt"]["sha256"]
    assert fingerprint(run_dir / "student.pt")[0] == recorded


# ---------------------------------------------------------------- hardening of the run directory
def _quiet(**kw):
    return dict(recipe_path=DEFAULT_RECIPE, console=Console(quiet=True), **kw)


def test_a_failed_resume_leaves_no_report_that_gate_or_ship_could_pass(tmp_path, real_run):
    """report.json of a finished run is moved aside when a --resume fails, and run.json says failed."""
    import shutil

    from typer.testing import CliRunner

    from pipeline.cli import app
    runs = tmp_path / "runs"
    run_dir = runs / real_run.name
    shutil.copytree(real_run, run_dir)
    (runs / "latest").symlink_to(run_dir.name)
    profile = load_profile("edge-cpu")
    broken = fast_recipe(profile, export={"atol": 1e-30, "rtol": 0})
    with pytest.raises(StageError):
        run_pipeline(broken, profile, runs_dir=runs, resume=True, **_quiet())
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["failed_stage"] == "export"
    assert not (run_dir / "report.json").exists() and (run_dir / "report.stale.json").exists()
    gate = CliRunner().invoke(app, ["gate", str(run_dir)])
    assert gate.exit_code == 3 and "export" in gate.output
    ship = CliRunner().invoke(app, ["ship", str(run_dir), "--out", str(tmp_path / "dist")])
    assert ship.exit_code == 3 and not (tmp_path / "dist").exists()


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_holds_it(tmp_path):
    import fcntl

    from pipeline.errors import ConfigError
    profile = load_profile("edge-cpu")
    runs = tmp_path / "runs"
    run_dir = run_pipeline(fast_recipe(profile, **TINY, prune={"enabled": False}, quantize={"enabled": False}),
                           profile, runs_dir=runs, **_quiet())
    fd = os.open(run_dir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running pipeline holds it
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"4242", 0)
    try:
        with pytest.raises(ConfigError, match=r"in use by pipeline run \(pid 4242\)"):
            run_pipeline(fast_recipe(profile, **TINY), profile, runs_dir=runs, resume=True, **_quiet())
    finally:
        os.close(fd)
    run_pipeline(fast_recipe(profile, **TINY, prune={"enabled": False}, quantize={"enabled": False}), profile,
                 runs_dir=runs, resume=True, **_quiet())  # released: the resume goes through


def test_parallel_starts_in_the_same_second_each_get_their_own_directory(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.config import load_recipe
    from pipeline.runner import new_run_dir
    profile, recipe = load_profile("edge-cpu"), load_recipe(DEFAULT_RECIPE)
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: new_run_dir(tmp_path, profile, recipe), range(24)))
    assert len(set(made)) == 24 and all(p.is_dir() for p in made)


def test_runs_dir_that_is_a_file_is_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    (tmp_path / "runs").write_text("not a folder")
    res = CliRunner().invoke(app, ["run", "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "is a file, not a directory" in res.output and "Traceback" not in res.output


def test_where_rows_are_measured_is_in_the_benchmark_stage_key(monkeypatch):
    from pipeline.runner import _key
    profile = load_profile("edge-cpu")
    recipe = fast_recipe(profile)
    monkeypatch.delenv("PIPELINE_DEVICE", raising=False)
    host = _key("benchmark", recipe.benchmark, recipe, profile, {})
    monkeypatch.setenv("PIPELINE_DEVICE", "nvidia@jetson.local:22")
    assert _key("benchmark", recipe.benchmark, recipe, profile, {}) != host
    assert _key("teacher", recipe.teacher, recipe, profile, {}) == _key("teacher", recipe.teacher, recipe, profile, {})


def test_another_student_keeps_the_teacher_key_and_changes_the_distill_key():
    """The teacher stage never reads models.student (stages/teacher.py NOT_READ): trying a student architecture
    must not retrain the teacher; every other stage keeps the whole recipe's models in its key."""
    from pipeline.runner import _key
    profile = load_profile("edge-cpu")
    a = fast_recipe(profile)
    b = a.model_copy(update={"models": a.models.model_copy(update={
        "student": a.models.student.model_copy(update={"arch": "cnn", "kwargs": {"channels": [4, 8]}})})})
    teacher_changed = a.model_copy(update={"models": a.models.model_copy(update={
        "teacher": a.models.teacher.model_copy(update={"kwargs": {"channels": [4, 8]}})})})
    assert a.models.student != b.models.student
    assert _key("teacher", a.teacher, a, profile, {}) == _key("teacher", b.teacher, b, profile, {})
    assert _key("teacher", a.teacher, a, profile, {}) != _key("teacher", a.teacher, teacher_changed, profile, {})
    assert _key("distill", a.distill, a, profile, {}) != _key("distill", b.distill, b, profile, {})


def test_a_full_disk_is_one_sentence_and_recorded(tmp_path, monkeypatch):
    import errno

    from stages import export
    profile = load_profile("edge-cpu")
    runs = tmp_path / "runs"

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "student.onnx"))
    monkeypatch.setattr(export, "run", full)
    with pytest.raises(StageError, match=r"student.onnx: no space left on the device \(\d+ MiB free"):
        run_pipeline(fast_recipe(profile, **TINY), profile, runs_dir=runs, **_quiet())
    record = json.loads((latest_run(runs) / "run.json").read_text())
    assert record["status"] == "failed" and "no space left" in record["stages"]["export"]["error"]
    assert not list(latest_run(runs).glob(".*.tmp-*"))  # no temp files left behind
