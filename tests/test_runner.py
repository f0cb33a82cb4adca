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
