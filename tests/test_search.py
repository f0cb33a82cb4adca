"""pipeline search: a real search of two trials on the tiny digits recipe, killed after its first run and resumed.

The fixture runs `pipeline search` as a process, SIGKILLs it once the first trial's run is finished and the second
one has started, then runs `pipeline search --resume` to the end. The tests read what that left on disk.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import PROFILES_DIR, load_profile, parse_recipe
from pipeline.errors import ConfigError
from pipeline.report import budgets, schema
from pipeline.report.build import pareto

ROOT = Path(__file__).resolve().parent.parent

TINY = """
name: tiny
seed: 0
data: {kind: digits, image_size: 8, channels: 1}
models:
  teacher: {arch: cnn, kwargs: {channels: [16, 32], hidden: 32}}
  student: {arch: mlp, kwargs: {hidden: [32]}}
teacher: {epochs: 4, lr: 0.01}
distill: {epochs: 1, lr: 0.01}
prune: {enabled: true, ratio: 0.5, epochs: 1, lr: 0.01}
quantize: {enabled: true, calibration_samples: 128}
benchmark: {warmup: 3, min_runs: 20, min_duration_s: 0.05, throughput_duration_s: 0.05, energy_window_s: 0.1}
search:
  width_multipliers: [0.5, 1.0]
  prune_ratios: [0.5]
  epochs: [1, 3]
  keep: 0.5
"""


def _write(tmp: Path, recipe: str = TINY, **budgets_: float | None) -> tuple[Path, Path]:
    """The tiny recipe and an edge-cpu profile with these budgets (the rest null), as files."""
    (tmp / "tiny.yaml").write_text(recipe)
    prof = yaml.safe_load((PROFILES_DIR / "edge-cpu.yaml").read_text())
    prof["budgets"] = budgets_
    (tmp / "lenient.yaml").write_text(yaml.safe_dump(prof))
    return tmp / "tiny.yaml", tmp / "lenient.yaml"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "search", *args]


def _state(search_dir: Path) -> dict:
    try:
        return json.loads((search_dir / "search.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """(search directory, the resumed command's output, t00's run.json bytes before the resume)."""
    tmp = tmp_path_factory.mktemp("search")
    recipe, profile = _write(tmp, p95_latency_ms=50.0, max_accuracy_drop=1.0, max_size_mb=1.0)
    runs = tmp / "runs"
    args = ["--recipe", str(recipe), "--profile", str(profile), "--runs-dir", str(runs)]
    proc = subprocess.Popen(_cli(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            trials = _state(runs / "search-latest").get("trials", [])
            if len(trials) == 2 and [r["status"] for r in trials[0]["runs"]] == ["ok"] and trials[1]["runs"]:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the search ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    search_dir = (runs / "search-latest").resolve()
    before = (search_dir / "t00-e1" / "run.json").read_bytes()
    done = subprocess.run(_cli("--resume", "--runs-dir", str(runs)), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return search_dir, done.stdout, before


def test_every_candidate_is_in_the_report_and_the_report_follows_the_schema(resumed):
    search_dir, out, _ = resumed
    report = schema.load(search_dir)  # the run kind's schema, with its search section
    s = report["search"]
    state = json.loads((search_dir / "search.json").read_text())
    # 2 trials x 2 precisions: each trial's deployed artifact (pruned at 0.5) of its last run, named by that run
    last = [max(t["runs"], key=lambda r: r["rung"])["run_dir"] for t in state["trials"]]
    want = {f"{d}/student-pruned{p}.onnx" for d in last for p in ("", ".int8")}
    assert all((search_dir / w).is_file() for w in want)  # the names are paths from the search directory
    assert {c["artifact"] for c in s["candidates"]} == want
    assert want <= {r["artifact"] for r in report["rows"]}
    assert s["trials"] == 2 and state["status"] == "done"
    # successive halving: both trials ran 1 epoch, one of them (keep 0.5) 3 more
    assert [r["trials"] for r in state["rungs"]] == [["t00", "t01"], state["rungs"][0]["promoted"]]
    assert len(state["rungs"][0]["promoted"]) == 1 and s["runs"] == 3
    finals = {c["trial"]: c["epochs"] for c in s["candidates"]}
    assert sorted(finals.values()) == [1, 3]
    for c in s["candidates"]:  # measured on the target (edge-cpu: this host), with a cost
        assert c["provenance"] == "measured" and c["p95_ms"] > 0 and c["cost_min"] > 0 and c["size_bytes"] > 0
    assert "trials: 2 (3 runs, 0 failed)" in out and "wall time" in out
    assert (search_dir / "report.md").read_text().count("student-pruned") >= 4
    page = (search_dir / "report.html").read_text()
    search_part = page[page.index("<h2>Search <code>"):page.index("<h2>Budgets")]
    assert "<svg" in search_part and "are the Pareto front" in search_part  # the plot, inline
    assert all(c["artifact"] in search_part for c in s["candidates"])


def test_the_front_is_non_dominated_and_complete(resumed):
    report = schema.load(resumed[0])
    cands = report["search"]["candidates"]
    front = [c for c in cands if c["on_front"]]
    assert front and [c["artifact"] for c in sorted(front, key=lambda c: c["p95_ms"])] == report["search"]["front"]

    def beats(a: dict, b: dict) -> bool:
        return a["p95_ms"] <= b["p95_ms"] and a["accuracy"] >= b["accuracy"] and \
            (a["p95_ms"] < b["p95_ms"] or a["accuracy"] > b["accuracy"])
    for c in front:
        assert not any(beats(o, c) for o in cands), c["artifact"]
    for c in cands:
        if not c["on_front"]:
            assert any(beats(f, c) for f in front), c["artifact"]


def test_a_killed_search_resumes_without_redoing_finished_runs(resumed):
    search_dir, out, before = resumed
    state = json.loads((search_dir / "search.json").read_text())
    t00, t01 = state["trials"]
    assert (search_dir / "t00-e1" / "run.json").read_bytes() == before  # not run again
    assert t00["runs"][0]["attempts"] == 1 and "t00 e1: ok earlier, kept" in out
    assert t01["runs"][0]["attempts"] == 2  # the killed run, continued by the runner's --resume
    assert state["sessions"] == 2 and state["teacher"]["reused"]  # the resumed session loaded the teacher
    assert all(r["status"] == "ok" for t in state["trials"] for r in t["runs"])


def test_the_recommendation_is_the_most_accurate_candidate_meeting_every_budget(resumed):
    report = schema.load(resumed[0])
    cands = report["search"]["candidates"]
    ok = [c for c in cands if c["meets_all"]]
    assert ok, "the lenient budgets should be met by some candidate"
    rec = report["recommended"]
    assert rec is not None and rec["basis"] == "target"
    assert rec["accuracy"] == max(c["accuracy"] for c in ok)
    assert budgets.evaluate(report)[rec["artifact"]].meets_all


def test_gate_and_ship_read_a_search_like_a_run(resumed, tmp_path):
    """The gate judges the search's own budgets (profile.json; edge-cpu's file would fail these tiny students), and
    ship bundles the recommended candidate, which verifies."""
    search_dir = resumed[0]
    gate = subprocess.run([sys.executable, "-m", "pipeline", "gate", str(search_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert gate.returncode == 0 and "≤ 50 ms" in gate.stdout, gate.stdout + gate.stderr
    ship = subprocess.run([sys.executable, "-m", "pipeline", "ship", str(search_dir), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ship.returncode == 0, ship.stdout + ship.stderr
    bundle = next(tmp_path.glob("bundle-*.tar.gz"))
    verify = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(bundle)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0 and "verified" in verify.stdout, verify.stdout + verify.stderr


def test_with_no_candidate_meeting_the_budgets_the_nearest_miss_is_named(resumed):
    """The same trials judged against a p95 budget none can meet: the search's merge names the miss."""
    from pipeline.search import candidates, merge, _read_report
    search_dir = resumed[0]
    state = json.loads((search_dir / "search.json").read_text())
    state["profile"]["budgets"].update(p95_latency_ms=1e-6)
    profile = {k: state["profile"][k] for k in ("name", "description", "target", "hardware", "budgets")}
    parts = []
    for t in state["trials"]:
        run = max(t["runs"], key=lambda r: r["rung"])
        parts.append((t, run, _read_report(search_dir / run["run_dir"])))
    report = merge(profile, parts, state["precisions"], state)
    assert report["recommended"] is None
    near = report["nearest_miss"]
    assert near["budget"] == "p95_latency_ms" and near["status"] == "missed" and near["by"] > 0
    assert near["artifact"] in {c["artifact"] for c in candidates(report, parts, state["precisions"])}
    assert "misses p95_latency_ms" in near["message"]


def test_a_second_search_reuses_the_teacher_and_max_minutes_stops_it(resumed, tmp_path):
    """Same teacher settings, same runs directory: the teacher is loaded, not trained; a spent max_minutes starts
    no run, and the report says why and lists no candidate."""
    search_dir = resumed[0]
    runs = search_dir.parent
    recipe = TINY.replace("keep: 0.5", "keep: 0.5\n  max_minutes: 0.000001")
    r, p = _write(tmp_path, recipe, p95_latency_ms=50.0)
    done = subprocess.run(_cli("--recipe", str(r), "--profile", str(p), "--runs-dir", str(runs)), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    new = (runs / "search-latest").resolve()
    assert new != search_dir
    report = schema.load(new)
    assert report["search"]["teacher"]["reused"] is True
    teacher_run = json.loads((Path(report["search"]["teacher"]["run_dir"]) / "run.json").read_text())
    assert list(teacher_run["stages"]) == ["teacher"]  # the runner stops at `until` when the stage is reused too
    assert report["search"]["stopped"].startswith("search.max_minutes") and report["search"]["candidates"] == []
    assert report["recommended"] is None and report["nearest_miss"] is None
    assert not any(p.name.startswith("t0") for p in new.iterdir())


# ---------------------------------------------------------------- the space, without running anything
def _recipe(tmp_path: Path, search: dict, student: dict | None = None):
    data = yaml.safe_load(TINY)
    data["search"] = search
    if student:
        data["models"]["student"] = student
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    return parse_recipe(tmp_path / "r.yaml", load_profile("edge-cpu"))


def test_the_space_scales_widths_and_is_sampled_to_max_trials(tmp_path):
    from pipeline.search import plan
    prof = load_profile("edge-cpu")
    r = _recipe(tmp_path, {"width_multipliers": [0.5, 1.0], "prune_ratios": [0, 0.5, 0.75], "temperatures": [2, 4]},
                {"arch": "resnet", "kwargs": {"widths": [24, 48, 96, 192], "blocks": [1, 1, 1, 1]}})
    trials = plan(r, prof)
    assert len(trials) == 12 and [t["id"] for t in trials] == [f"t{i:02d}" for i in range(12)]
    assert trials[0]["student"]["kwargs"] == {"widths": [12, 24, 48, 96], "blocks": [1, 1, 1, 1]}
    assert trials[-1]["student"]["kwargs"]["widths"] == [24, 48, 96, 192]
    assert {(t["prune_ratio"], t["temperature"]) for t in trials} == {(a, b) for a in (0, 0.5, 0.75) for b in (2, 4)}
    r.search.max_trials = 5
    sampled = plan(r, prof)
    assert len(sampled) == 5 and sampled == plan(r, prof)  # seeded
    assert len({json.dumps({k: t[k] for k in ("student", "prune_ratio", "temperature")}) for t in sampled}) == 5
    # the recipe's student (no default width given: the class default is scaled)
    r2 = _recipe(tmp_path, {"width_multipliers": [2.0]}, {"arch": "resnet"})
    assert plan(r2, prof)[0]["student"]["kwargs"]["widths"] == [32, 64, 128, 256]


def test_bad_search_settings_fail_at_load_naming_the_field(tmp_path):
    from pipeline.search import plan, precisions
    prof = load_profile("edge-cpu")
    with pytest.raises(ConfigError, match=r"search\.epochs: .*must increase"):
        _recipe(tmp_path, {"epochs": [3, 3]})
    with pytest.raises(ConfigError, match=r"search\.prune_ratios"):
        _recipe(tmp_path, {"prune_ratios": [1.0]})
    with pytest.raises(ConfigError, match=r"search\.bogus: unknown key"):
        _recipe(tmp_path, {"bogus": 1})
    r = _recipe(tmp_path, {"width_multipliers": [0.5]}, {"arch": "resnet18"})
    with pytest.raises(ConfigError, match=r"search\.width_multipliers: models\.student \(arch 'resnet18'\)"):
        plan(r, prof)
    gpu = load_profile("server-gpu")
    if "int8" not in gpu.target.precisions:
        with pytest.raises(ConfigError, match=r"search\.precisions: int8 not among"):
            precisions(_recipe(tmp_path, {"precisions": ["int8"]}), gpu, "r.yaml")
    assert precisions(_recipe(tmp_path, {}), prof) == ["fp32", "int8"]


def test_pareto_marks_the_non_dominated_points():
    pts = [(1.0, 0.90), (2.0, 0.95), (2.0, 0.93), (3.0, 0.95), (0.5, 0.80), None, (1.0, 0.90)]
    assert pareto(pts) == [True, True, False, False, True, False, True]  # equal points are both on it
    assert pareto([]) == [] and pareto([None]) == [False]


def test_cli_refuses_budgets_on_resume_and_a_missing_search(tmp_path):
    done = subprocess.run(_cli("--resume", "--p95", "1", "--runs-dir", str(tmp_path)), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "keeps the recipe and budgets it started with" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run(_cli("--resume", "--runs-dir", str(tmp_path)), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "No search to resume" in done.stderr
    done = subprocess.run(_cli("--p95", "-1", "--runs-dir", str(tmp_path)), cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 2 and "--p95 -1.0: input should be greater than 0" in done.stderr
