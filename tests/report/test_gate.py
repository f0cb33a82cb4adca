"""The gate: exit codes 0/1/2/3 on crafted reports and on real runs, JUnit XML, JSON, --allow-estimates."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import PROFILES_DIR, load_profile
from pipeline.report.build import SCHEMA_VERSION
from pipeline.report.gate import BUDGETS, gate

cli = CliRunner()


# ---------------------------------------------------------------- crafted reports
def row(artifact: str, role: str, *, p95: float | None = 0.5, acc: float | None = 0.95, on_target: bool = True,
        status: str = "measured", size: int = 20_000, energy: float | None = None, energy_source: str = "",
        energy_how: str = "measured", lower_bound: float | None = None, provider: str = "CPUExecutionProvider",
        heads: dict[str, float] | None = None) -> dict:
    """One benchmark row in the shape stages/benchmark.py writes; heads {task: accuracy}: a multi-head artifact's
    measured row, its accuracy the first head's."""
    where = {"kind": "estimate", "target": "T"} if status == "estimated" else {"kind": "host", "hostname": "ci"}
    r = {"artifact": artifact, "role": role, "stage": "export", "format": "onnx", "precision": "fp32",
         "backend": "onnxruntime", "provider": provider, "where": where, "size_bytes": size, "params": 1000,
         "macs": 20_000, "status": status, "reason": None, "on_target": on_target and status == "measured",
         "predecessor": None}
    if status == "measured":
        r.update(batch=1, latency_ms={"n": 1000, "mean": p95 * 0.8, "std": p95 * 0.05, "p50": p95 * 0.8,
                                      "p90": p95 * 0.95, "p95": p95, "p99": p95 * 1.2},
                 latency_source="measured: onnxruntime CPUExecutionProvider, 1000 timed runs, interleaved",
                 accuracy=acc, accuracy_source="measured: on the test split", throughput={"1": 1000 / p95})
    elif status == "estimated":
        r.update(batch=1, latency_ms={"lower_bound": lower_bound}, accuracy=None,
                 latency_source="estimated lower bound: max(...)", accuracy_source="see the measured rows")
    else:
        r["reason"] = "provider missing"
    if energy is not None:
        r.update(energy_mj=energy, energy_how=energy_how, energy_source=energy_source or "measured: rapl, 100 inferences")
    if heads and status == "measured":
        r["heads"] = {t: {"accuracy": a, "accuracy_n": 500, "agreement": {"teacher": 0.97}} for t, a in heads.items()}
        r["accuracy"] = next(iter(heads.values()))
    return r


TASKS = [{"name": "digit", "classes": [str(i) for i in range(10)], "weight": 1.0, "labels": "class"},
         {"name": "parity", "classes": ["even", "odd"], "weight": 0.5, "labels": "parity"}]


def two_head_report(student: dict[str, float] | None = None, teacher: dict[str, float] | None = None,
                    **budgets) -> dict:
    """A schema-valid report of a two-head student (digit, parity) and its two-head teacher."""
    rows = [row("t.onnx", "teacher", p95=1.0, heads=teacher or {"digit": 0.97, "parity": 0.995}),
            row("s.onnx", "student", heads=student or {"digit": 0.95, "parity": 0.97}),
            row("s.onnx", "student", status="estimated", lower_bound=0.01)]
    report = crafted_report(rows=rows, **budgets)
    report["tasks"] = copy.deepcopy(TASKS)
    return report


def crafted_report(profile: str = "edge-cpu", rows: list[dict] | None = None, recommended: str | None = "s.onnx",
                   **budgets) -> dict:
    """A schema-valid report for `profile` (its target), with budgets overridden as given."""
    prof = load_profile(profile)
    rows = rows if rows is not None else [row("t.onnx", "teacher", p95=1.0, acc=0.97), row("s.onnx", "student")]
    teacher = next((r["accuracy"] for r in rows if r["role"] == "teacher" and r.get("accuracy") is not None), None)
    for r in rows:
        if r.get("accuracy") is not None and teacher is not None:
            r["delta_vs_teacher"] = r["accuracy"] - teacher
    rec = None if recommended is None else {"artifact": recommended, "basis": "target", "p50_ms": 0.4,
                                            "accuracy": 0.95, "size_bytes": 20_000}
    return {"schema_version": SCHEMA_VERSION, "run_id": "20260101-000000-digits-x", "created": "2026-01-01T00:00:00+00:00",
            "recipe": {"name": "digits", "path": None},
            "profile": {"name": prof.name, "description": "", "target": prof.target.model_dump(mode="json"),
                        "hardware": prof.hardware.model_dump(mode="json"),
                        "budgets": {**prof.budgets.model_dump(), **budgets}},
            "environment": {"kind": "host", "hostname": "ci", "versions": {"onnxruntime": "1.20.0"}},
            "teacher": {}, "distill": {}, "prune": {}, "quantize": {}, "stages": [], "rows": rows, "notes": [],
            "meter": None, "allowance": 0.01, "flags": [], "recommended": rec,
            "nearest_miss": None}


def write(tmp_path: Path, report: dict) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "report.json").write_text(json.dumps(report))
    return run


def profile_file(tmp_path: Path, base: str = "edge-cpu", name: str | None = None, **budgets) -> Path:
    """A copy of a profile (same target) with other budgets: what `--profile path.yaml` accepts."""
    data = yaml.safe_load((PROFILES_DIR / f"{base}.yaml").read_text())
    data["name"] = name or f"{base}-custom"
    data["budgets"] = {**data.get("budgets", {}), **budgets}
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_all_budgets_met_exit_0(tmp_path):
    v = gate(write(tmp_path, crafted_report()), "edge-cpu")
    assert v.code == 0, v.text()
    assert {c.budget: c.status for c in v.cases} == {"p95_latency_ms": "passed", "min_accuracy": "passed",
                                                     "max_accuracy_drop": "passed", "max_size_mb": "passed",
                                                     "max_energy_mj": "not_set"}


def test_missed_latency_exit_1_says_by_how_much(tmp_path):
    rows = [row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", p95=3.0)]
    v = gate(write(tmp_path, crafted_report(rows=rows)), "edge-cpu")
    assert v.code == 1
    lat = next(c for c in v.cases if c.budget == "p95_latency_ms")
    assert lat.status == "failed" and "missed by" in lat.message and "noise margin" in lat.message


def test_a_tie_within_the_noise_margin_does_not_pass(tmp_path):
    """p95 1.99 ms under a 2 ms budget, but p95 + margin is over it: not a pass on a noisy runner."""
    rows = [row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", p95=1.99)]
    v = gate(write(tmp_path, crafted_report(rows=rows)), "edge-cpu")
    lat = next(c for c in v.cases if c.budget == "p95_latency_ms")
    assert v.code == 1 and lat.value > 2.0 > 1.99


def test_missed_accuracy_drop_exit_1(tmp_path):
    rows = [row("t.onnx", "teacher", acc=0.99), row("s.onnx", "student", acc=0.94)]
    v = gate(write(tmp_path, crafted_report(rows=rows)), "edge-cpu")
    assert v.code == 1
    assert [c.budget for c in v.cases if c.status == "failed"] == ["max_accuracy_drop"]


def test_no_recommendation_checks_the_best_student_and_fails(tmp_path):
    v = gate(write(tmp_path, crafted_report(recommended=None)), "edge-cpu")
    assert v.code == 1 and v.artifact == "s.onnx" and not v.recommended
    assert all(c.status in ("passed", "not_set") for c in v.cases)  # it fails for the missing recommendation


def test_no_measurement_on_the_target_exit_2_unless_estimates_allowed(tmp_path):
    rows = [row("t.onnx", "teacher", acc=0.97, on_target=False), row("s.onnx", "student", on_target=False),
            row("s.onnx", "student", status="estimated", lower_bound=0.01)]
    run = write(tmp_path, crafted_report("jetson", rows=rows))
    v = gate(run, "jetson")
    assert v.code == 2, v.text()
    allowed = gate(run, "jetson", allow_estimates=True)
    assert allowed.code == 0, allowed.text()
    assert any("--allow-estimates" in n for n in allowed.notes)
    assert next(c for c in allowed.cases if c.budget == "p95_latency_ms").estimated


def test_an_estimate_over_budget_fails_even_when_allowed(tmp_path):
    rows = [row("t.onnx", "teacher", acc=0.97, on_target=False), row("s.onnx", "student", on_target=False),
            row("s.onnx", "student", status="estimated", lower_bound=9.0)]
    assert gate(write(tmp_path, crafted_report("jetson", rows=rows)), "jetson", allow_estimates=True).code == 1


def test_a_miss_outranks_a_missing_measurement(tmp_path):
    rows = [row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", size=9_000_000)]
    v = gate(write(tmp_path, crafted_report(rows=rows)), load_profile(str(profile_file(tmp_path, max_energy_mj=1.0))))
    assert {c.budget: c.status for c in v.cases}["max_energy_mj"] == "no_measurement"
    assert v.code == 1


def test_estimated_energy_needs_allow_estimates(tmp_path):
    est = "estimated: 15 W x 0.5 ms = 7.5 mJ"
    rows = [row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", energy=0.5, energy_source=est,
                                                    energy_how="estimated")]
    run = write(tmp_path, crafted_report(rows=rows))
    path = profile_file(tmp_path, max_energy_mj=1.0)
    assert gate(run, load_profile(str(path))).code == 2
    assert gate(run, load_profile(str(path)), allow_estimates=True).code == 0


@pytest.mark.parametrize("break_it", ["missing_dir", "schema_version", "not_json", "other_target", "bad_profile"])
def test_unusable_input_exit_3(tmp_path, break_it):
    run, profile = write(tmp_path, crafted_report()), "edge-cpu"
    if break_it == "missing_dir":
        run = tmp_path / "nope"
    elif break_it == "schema_version":
        (run / "report.json").write_text(json.dumps({**crafted_report(), "schema_version": 99}))
    elif break_it == "not_json":
        (run / "report.json").write_text("{")
    elif break_it == "other_target":
        profile = "jetson"
    else:
        profile = "jetsn"
    v = gate(run, profile)
    assert v.code == 3 and v.notes and v.cases == []


def test_junit_has_one_case_per_budget(tmp_path):
    rows = [row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", p95=3.0)]
    xml = gate(write(tmp_path, crafted_report(rows=rows)), "edge-cpu").junit()
    suite = ET.fromstring(xml)
    cases = {tc.get("name"): tc for tc in suite.iter("testcase")}
    assert list(cases) == [*BUDGETS, "recommended_artifact"]
    assert cases["p95_latency_ms"].find("failure").get("message").count("missed by") == 1
    assert cases["max_energy_mj"].find("skipped") is not None  # not set: skipped, never passed
    assert cases["min_accuracy"].find("failure") is None and cases["min_accuracy"].find("skipped") is None
    assert suite.get("failures") == "1" and suite.get("skipped") == "1"


def test_cli_exit_codes_json_and_junit(tmp_path):
    run = write(tmp_path, crafted_report())
    junit = tmp_path / "out" / "gate.xml"
    res = cli.invoke(app, ["gate", str(run), "--profile", "edge-cpu", "--json", "--junit", str(junit)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verdict"] == "met"
    assert len(list(ET.parse(junit).getroot().iter("testcase"))) == len(BUDGETS) + 1
    assert cli.invoke(app, ["gate", str(tmp_path / "none"), "--profile", "edge-cpu"]).exit_code == 3
    res = cli.invoke(app, ["gate", str(run)])  # the run's profile by default
    assert res.exit_code == 0 and "noise margin" in res.stdout


# ---------------------------------------------------------------- real runs
def rerun(real_run: Path, dest: Path, profile_path: Path) -> Path:
    """A copy of the real run, its benchmark and report redone for another profile (training is reused)."""
    from rich.console import Console

    from pipeline.config import DEFAULT_RECIPE
    from pipeline.runner import Runner
    from tests.conftest import fast_recipe
    run_dir = dest / real_run.name
    shutil.copytree(real_run, run_dir)
    prof = load_profile(str(profile_path))
    Runner(run_dir, fast_recipe(prof), prof, recipe_path=DEFAULT_RECIPE, console=Console(quiet=True)).run(resume=True)
    return run_dir


LOOSE = {"min_accuracy": 0.5, "max_accuracy_drop": 0.5}  # a few-epoch student meets these; latency stays 2 ms


@pytest.fixture(scope="module")
def loose_runs(real_run, tmp_path_factory):
    """The real run re-benchmarked for edge-cpu and jetson copies whose accuracy budgets a short run meets."""
    tmp = tmp_path_factory.mktemp("gate-real")
    cpu = profile_file(tmp, "edge-cpu", "edge-cpu-loose", **LOOSE)
    jet = profile_file(tmp, "jetson", "jetson-loose", **LOOSE)
    return {"cpu": (rerun(real_run, tmp / "cpu", cpu), cpu), "jetson": (rerun(real_run, tmp / "jet", jet), jet)}


def test_real_run_gate_agrees_with_its_recommendation(real_run):
    report = json.loads((real_run / "report.json").read_text())
    v = gate(real_run, "edge-cpu")
    assert v.code in (0, 1), v.text()
    assert (v.code == 0) == (report["recommended"] is not None), v.text()


def test_real_run_exit_0_and_1(loose_runs, tmp_path):
    run, prof = loose_runs["cpu"]
    ok = gate(run, str(prof))
    assert ok.code == 0 and ok.recommended, ok.text()
    strict = profile_file(tmp_path, "edge-cpu", "edge-cpu-strict", **LOOSE, p95_latency_ms=1e-6)
    missed = gate(run, str(strict))
    assert missed.code == 1
    assert [c.budget for c in missed.cases if c.status == "failed"] == ["p95_latency_ms"]


def test_real_run_without_a_device_exit_2_and_allow_estimates(loose_runs):
    run, prof = loose_runs["jetson"]
    v = gate(run, str(prof))
    assert v.code == 2, v.text()
    res = cli.invoke(app, ["gate", str(run), "--profile", str(prof), "--allow-estimates"])
    assert res.exit_code == 0, res.output
    assert "--allow-estimates" in res.stdout and "estimated" in res.stdout


def test_real_run_of_another_schema_version_exit_3(real_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    report = json.loads((run / "report.json").read_text())
    (run / "report.json").write_text(json.dumps({**copy.deepcopy(report), "schema_version": 99}))
    res = cli.invoke(app, ["gate", str(run), "--profile", "edge-cpu"])
    assert res.exit_code == 3 and "schema_version 99" in res.stdout


def test_energy_provenance_is_the_energy_how_field_not_the_text(tmp_path):
    """A source sentence that reads 'measured' does not make an estimate count: energy_how decides."""
    rows = [row("t.onnx", "teacher", acc=0.97),
            row("s.onnx", "student", energy=0.5, energy_source="measured-looking text", energy_how="estimated")]
    run = write(tmp_path, crafted_report(rows=rows))
    path = profile_file(tmp_path, max_energy_mj=1.0)
    assert gate(run, load_profile(str(path))).code == 2
    rows[1].update(energy_how="measured", energy_source="estimated-looking text")
    run = write(tmp_path, crafted_report(rows=rows))
    assert gate(run, load_profile(str(path))).code == 0


# ---------------------------------------------------------------- hardening: unusable input is exit 3, in one sentence
def test_a_row_without_latency_std_is_unusable_not_missed(tmp_path):
    """The noise margin needs std: without it the gate raised KeyError (exit 1, read as 'missed')."""
    report = crafted_report()
    del report["rows"][1]["latency_ms"]["std"]
    run = write(tmp_path, report)
    v = gate(run, "edge-cpu")
    assert v.code == 3 and "'std' is a required property" in v.notes[0] and "pipeline run" in v.notes[0]
    res = cli.invoke(app, ["gate", str(run), "--profile", "edge-cpu"])
    assert res.exit_code == 3 and "Traceback" not in res.output


def _failed_record(run: Path, **top) -> None:
    stages = {"teacher": {"status": "ok"}, "quantize": {"status": "failed", "error": "RuntimeError: boom"}}
    (run / "run.json").write_text(json.dumps({"run_id": run.name, **top, "stages": stages}))


@pytest.mark.parametrize("top", [{"status": "failed", "failed_stage": "quantize"}, {}])
def test_a_failed_run_is_refused_though_its_old_report_passes(tmp_path, top):
    run = write(tmp_path, crafted_report())
    assert gate(run, "edge-cpu").code == 0  # the old report.json on its own passes
    _failed_record(run, **top)
    v = gate(run, "edge-cpu")
    assert v.code == 3 and "failed at stage 'quantize'" in v.notes[0] and "pipeline run --resume" in v.notes[0]
    res = cli.invoke(app, ["gate", str(run), "--profile", "edge-cpu"])
    assert res.exit_code == 3 and "failed at stage 'quantize'" in res.stdout
    res = cli.invoke(app, ["report", str(run)])
    assert res.exit_code == 3 and "failed at stage 'quantize'" in res.stderr
    assert not (run / "report.md").exists()
    res = cli.invoke(app, ["ship", str(run), "--profile", "edge-cpu", "--out", str(tmp_path / "dist")])
    assert res.exit_code == 3 and "failed at stage 'quantize'" in res.stderr  # ship reads through the same check


def test_a_report_moved_aside_is_missing_and_says_so(tmp_path):
    run = write(tmp_path, crafted_report())
    (run / "report.json").rename(run / "report.stale.json")
    (run / "run.json").write_text(json.dumps({"status": "ok", "stages": {}}))
    v = gate(run, "edge-cpu")
    assert v.code == 3 and "report.stale.json" in v.notes[0] and "--resume" in v.notes[0]


def test_gate_without_profile_uses_the_profile_stored_in_the_run(tmp_path):
    """A run made with --profile some/path.yaml: its name is no profile in profiles/, its profile.json is."""
    path = profile_file(tmp_path, name="edge-cpu-energy", max_energy_mj=1.0)
    prof = load_profile(str(path))
    rows = [row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", energy=0.5)]
    report = crafted_report(rows=rows)
    report["profile"].update(name=prof.name, budgets=prof.budgets.model_dump())
    run = write(tmp_path, report)
    (run / "profile.json").write_text(prof.model_dump_json())
    res = cli.invoke(app, ["gate", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["profile"] == "edge-cpu-energy"
    assert {c["budget"]: c["status"] for c in out["cases"]}["max_energy_mj"] == "passed"  # edge-cpu: not set


def test_junit_to_an_unwritable_path_is_exit_3_in_one_sentence(tmp_path):
    run = write(tmp_path, crafted_report())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = cli.invoke(app, ["gate", str(run), "--profile", "edge-cpu", "--junit", str(blocker / "gate.xml")])
    assert res.exit_code == 3, res.output
    assert f"--junit {blocker / 'gate.xml'}: cannot write it" in res.stderr and "Traceback" not in res.output
    assert "exit 3 when it cannot be written" in cli.invoke(app, ["gate", "--help"], env={"COLUMNS": "300"}).stdout


# ---------------------------------------------------------------- multi-task: budgets per head
def test_one_head_missing_its_budget_fails_the_gate_and_both_meeting_passes(tmp_path):
    """min_accuracy {digit: 0.9, parity: 0.99}: parity (0.97) misses, digit (0.95) meets: exit 1; both met: 0."""
    run = write(tmp_path, two_head_report())  # recommends s.onnx, so a head's budget is the only thing failing
    strict = profile_file(tmp_path, name="edge-cpu-heads", min_accuracy={"digit": 0.9, "parity": 0.99})
    junit = tmp_path / "gate.xml"
    res = cli.invoke(app, ["gate", str(run), "--profile", str(strict), "--json", "--junit", str(junit)])
    assert res.exit_code == 1, res.output
    cases = {c["budget"]: c for c in json.loads(res.stdout)["cases"]}
    assert cases["min_accuracy[parity]"]["status"] == "failed" and cases["min_accuracy[digit]"]["status"] == "passed"
    assert [b for b, c in cases.items() if c["status"] == "failed"] == ["min_accuracy[parity]"]
    assert "min_accuracy" not in cases and cases["min_accuracy[parity]"]["value"] == 0.97
    assert "parity 0.97 < 0.99: missed by 0.02" in cases["min_accuracy[parity]"]["message"]
    names = [tc.get("name") for tc in ET.parse(junit).getroot().iter("testcase")]
    assert names == ["p95_latency_ms", "min_accuracy[digit]", "min_accuracy[parity]", "max_accuracy_drop",
                     "max_size_mb", "max_energy_mj", "recommended_artifact"]
    assert ET.parse(junit).getroot().get("tests") == str(len(names))
    met = profile_file(tmp_path, name="edge-cpu-heads-met", min_accuracy={"digit": 0.9, "parity": 0.96})
    res = cli.invoke(app, ["gate", str(run), "--profile", str(met)])
    assert res.exit_code == 0, res.output
    assert "min_accuracy[parity]" in res.stdout and "parity 0.97 ≥ 0.96" in res.stdout


def test_max_accuracy_drop_per_head_compares_with_the_teachers_head(tmp_path):
    """parity drops 0.995 - 0.97 = 0.025 from the teacher's parity head: over 0.02, while digit's 0.02 is under 0.03."""
    run = write(tmp_path, two_head_report())
    prof = profile_file(tmp_path, name="edge-cpu-drop", max_accuracy_drop={"digit": 0.03, "parity": 0.02})
    v = gate(run, str(prof))
    assert v.code == 1, v.text()
    cases = {c.budget: c for c in v.cases}
    assert cases["max_accuracy_drop[parity]"].status == "failed"
    assert abs(cases["max_accuracy_drop[parity]"].value - 0.025) < 1e-9
    assert cases["max_accuracy_drop[digit]"].status == "passed"
    assert "parity drop 0.0250 (teacher 0.9950 - 0.9700)" in cases["max_accuracy_drop[parity]"].message


def test_a_budget_for_a_head_the_model_lacks_is_no_measurement(tmp_path):
    run = write(tmp_path, two_head_report())
    prof = profile_file(tmp_path, name="edge-cpu-ge5", min_accuracy={"digit": 0.9, "ge5": 0.9})
    v = gate(run, str(prof))
    assert v.code == 2, v.text()
    case = next(c for c in v.cases if c.budget == "min_accuracy[ge5]")
    assert case.status == "no_measurement" and "no head 'ge5'" in case.message and "digit, parity" in case.message
