"""pipeline/report/budgets.py: one verdict per artifact and budget, shared by recommend, gate and the renderings.

The crafted reports below are ones on which the old recommend (fastest p50, p95 without the noise margin, no
energy, the fastest row's accuracy) and the gate (p95 + margin, energy, the worst accuracy) disagreed.
"""
from __future__ import annotations

import random

from pipeline.report import budgets, html
from pipeline.report.build import render_md
from pipeline.report.gate import gate
from pipeline.config import load_profile
from tests.report.test_gate import crafted_report, profile_file, row, two_head_report, write


def _report(rows, **b):
    """A report whose recommendation and nearest miss come from budgets.recommendation, as build() writes them."""
    report = crafted_report(rows=rows, recommended=None, **b)
    report["recommended"], report["nearest_miss"] = budgets.recommendation(report)
    return report


def _agree(tmp_path, report) -> str | None:
    """Gate the report as written; the recommended artifact must be the one gated, and pass."""
    v = gate(write(tmp_path, report), report["profile"]["name"])
    rec = (report["recommended"] or {}).get("artifact")
    assert v.artifact == rec and v.code == 0, v.text()
    return rec


def test_a_fast_artifact_whose_energy_misses_is_not_recommended(tmp_path):
    """Old recommend ignored energy and picked the fast one; the gate then failed it on max_energy_mj."""
    rows = [row("t.onnx", "teacher", p95=1.0, acc=0.97),
            row("fast.onnx", "student-int8", p95=0.3, acc=0.95, energy=9.0),
            row("slow.onnx", "student", p95=0.8, acc=0.95, energy=0.5)]
    report = _report(rows, max_energy_mj=1.0)
    assert _agree(tmp_path, report) == "slow.onnx"
    standing = budgets.evaluate(report)["fast.onnx"]
    assert standing.checks["max_energy_mj"].status == "missed" and standing.checks["max_energy_mj"].margin == -8.0


def test_a_p95_under_budget_only_without_the_noise_margin_is_not_recommended(tmp_path):
    """Old recommend compared the bare p95 (1.99 < 2) of the best-p50 row; the gate added the margin and failed."""
    tail = row("tail.onnx", "student-int8", p95=1.99, acc=0.95)
    tail["latency_ms"].update(p50=0.2, std=0.5)  # fastest median, heavy tail
    rows = [row("t.onnx", "teacher", p95=1.0, acc=0.97), tail, row("steady.onnx", "student", p95=1.0, acc=0.95)]
    report = _report(rows)
    assert _agree(tmp_path, report) == "steady.onnx"
    lat = budgets.evaluate(report)["tail.onnx"].checks["p95_latency_ms"]
    assert lat.status == "missed" and lat.value == 1.99 + lat.noise_ms


def test_the_worst_providers_accuracy_is_judged_not_the_fastest_rows(tmp_path):
    """Old recommend read accuracy from the fastest row (0.95); the gate took the worst provider's (0.92)."""
    rows = [row("t.onnx", "teacher", p95=1.0, acc=0.96),
            row("q.onnx", "student-int8", p95=0.3, acc=0.95),
            row("q.onnx", "student-int8", p95=0.4, acc=0.92, provider="DnnlExecutionProvider"),
            row("s.onnx", "student", p95=0.8, acc=0.94)]
    report = _report(rows)
    assert _agree(tmp_path, report) == "s.onnx"
    assert budgets.evaluate(report)["q.onnx"].accuracy == 0.92


def test_latency_within_the_noise_margin_goes_to_accuracy_then_size(tmp_path):
    rows = [row("t.onnx", "teacher", p95=1.0, acc=0.97),
            row("a.onnx", "student-int8", p95=0.500, acc=0.94, size=5_000),
            row("b.onnx", "student", p95=0.505, acc=0.95, size=20_000)]
    assert _agree(tmp_path, _report(rows)) == "b.onnx"  # old recommend: a.onnx, faster by less than the noise
    rows[1]["accuracy"] = 0.95  # equal accuracy, latencies tied within the margin: the smaller file
    assert _agree(tmp_path, _report(rows)) == "a.onnx"
    rows[1].update(size=50_000)
    rows[2]["latency_ms"].update(p95=2.0 * 0.5)  # equal accuracy, b clearly slower: the faster wins over size
    assert _agree(tmp_path, _report(rows, p95_latency_ms=5.0)) == "a.onnx"


def test_the_more_accurate_artifact_wins_even_when_slower(tmp_path):
    rows = [row("t.onnx", "teacher", p95=1.0, acc=0.97),
            row("fast.onnx", "student-pruned-int8", p95=0.2, acc=0.94),
            row("acc.onnx", "student", p95=1.2, acc=0.96)]
    assert _agree(tmp_path, _report(rows)) == "acc.onnx"


def test_nothing_meets_the_budgets_names_the_nearest_miss_and_by_how_much(tmp_path):
    rows = [row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", p95=2.5, acc=0.96),
            row("q.onnx", "student-int8", p95=3.0, acc=0.90)]
    report = _report(rows)
    near = report["nearest_miss"]
    assert report["recommended"] is None
    assert near["artifact"] == "s.onnx" and near["budget"] == "p95_latency_ms" and near["status"] == "missed"
    assert near["by"] > 0.5 and near["value"] - near["limit"] == near["by"]
    line = budgets.verdict_line(report)
    assert "none meets every budget" in line and "s.onnx misses p95_latency_ms" in line and "missed by" in line
    assert line in render_md(report) and "MISSED" in render_md(report)
    assert "Nearest miss: s.onnx" in html.render(report)
    v = gate(write(tmp_path, report), "edge-cpu")
    assert v.code == 1 and v.artifact == "s.onnx" and any("nearest miss: s.onnx" in n for n in v.notes)


def test_host_only_rows_never_meet_a_target_budget(tmp_path):
    """A Jetson run measured on this host only: the recommendation says its basis is estimates; gate exits 2."""
    rows = [row("t.onnx", "teacher", acc=0.97, on_target=False), row("s.onnx", "student", on_target=False),
            row("s.onnx", "student", status="estimated", lower_bound=0.01)]
    report = crafted_report("jetson", rows=rows, recommended=None)
    report["recommended"], report["nearest_miss"] = budgets.recommendation(report)
    strict = budgets.evaluate(report)["s.onnx"]
    assert strict.checks["p95_latency_ms"].status == "unmeasured" and strict.accuracy is None
    assert report["recommended"]["artifact"] == "s.onnx" and "estimates" in report["recommended"]["basis"]
    run = write(tmp_path, report)
    assert gate(run, "jetson").code == 2
    assert gate(run, "jetson", allow_estimates=True).code == 0


def test_recommended_passes_the_gate_whenever_any_artifact_does(tmp_path):
    """120 random reports: gate each candidate as if it were recommended; if any passes, the real one does."""
    rng = random.Random(0)
    prof = load_profile(str(profile_file(tmp_path, max_energy_mj=1.0)))  # the budgets the reports carry
    checked = 0
    for i in range(120):
        rows = [row("t.onnx", "teacher", p95=rng.uniform(0.5, 3), acc=0.97)]
        for j, role in enumerate(("student", "student-int8", "student-pruned", "student-pruned-int8")):
            r = row(f"a{j}.onnx", role, p95=rng.uniform(0.5, 3), acc=rng.choice([0.93, 0.94, 0.95, 0.96]),
                    size=rng.choice([300_000, 900_000, 1_200_000]), energy=rng.uniform(0.1, 2.0))
            r["latency_ms"].update(p50=r["latency_ms"]["p95"] * rng.uniform(0.3, 0.95), std=rng.uniform(0, 0.3))
            rows.append(r)
        report = _report(rows, max_energy_mj=1.0)
        passing = []
        for cand in (r["artifact"] for r in rows[1:]):
            forced = {**report, "recommended": {"artifact": cand, "basis": "target", "p50_ms": None,
                                                "accuracy": 0.9, "size_bytes": None}}
            if gate(write(tmp_path, forced), prof).code == 0:
                passing.append(cand)
        v = gate(write(tmp_path, report), prof)
        assert (v.code == 0) == bool(passing), (i, passing, v.text())
        if passing:
            checked += 1
            assert v.artifact in passing
    assert checked > 12  # the property was exercised, not vacuously true


def test_a_drop_of_exactly_the_budget_is_met_despite_float_representation():
    rows = [row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", acc=0.94)]  # 0.97 - 0.94 > 0.03 in floats
    check = budgets.evaluate(crafted_report(rows=rows))["s.onnx"].checks["max_accuracy_drop"]
    assert check.status == "met", check.message


# ---------------------------------------------------------------- multi-task: one check per head
def test_a_per_head_budget_is_one_check_per_head_and_one_miss_fails_the_artifact():
    report = two_head_report(min_accuracy={"digit": 0.9, "parity": 0.99})
    s = budgets.evaluate(report)["s.onnx"]
    assert "min_accuracy" not in s.checks
    digit, parity = s.checks["min_accuracy[digit]"], s.checks["min_accuracy[parity]"]
    assert digit.status == "met" and digit.value == 0.95 and digit.budget == "min_accuracy[digit]"
    assert parity.status == "missed" and abs(parity.margin + 0.02) < 1e-9 and "parity 0.97 < 0.99" in parity.message
    assert not s.meets_all and s.accuracy == 0.95  # the choice still ranks by the first head
    rec, near = budgets.recommendation(report)
    assert rec is None and near["budget"] == "min_accuracy[parity]" and abs(near["by"] - 0.02) < 1e-9
    assert list(budgets.limits(report))[1:3] == ["min_accuracy[digit]", "min_accuracy[parity]"]
    assert budgets.limits(report)["min_accuracy[parity]"] == "min_accuracy[parity] ≥ 0.99"


def test_a_number_still_judges_the_first_head_under_its_plain_key():
    report = two_head_report(min_accuracy=0.96)  # digit 0.95 misses, parity 0.97 would meet
    check = budgets.evaluate(report)["s.onnx"].checks["min_accuracy"]
    assert check.status == "missed" and check.value == 0.95 and check.message.startswith("0.95 < 0.96")
    assert list(budgets.evaluate(report)["s.onnx"].checks) == list(budgets.BUDGETS)


def test_a_head_is_judged_on_its_worst_provider_on_the_target_and_on_the_host_only_with_allow_estimates():
    report = two_head_report(min_accuracy={"parity": 0.95})
    report["rows"].insert(2, row("s.onnx", "student", provider="DnnlExecutionProvider",
                                 heads={"digit": 0.96, "parity": 0.94}))
    check = budgets.evaluate(report)["s.onnx"].checks["min_accuracy[parity]"]
    assert check.status == "missed" and check.value == 0.94  # the worst provider's parity head, not the first row's
    for r in report["rows"]:
        r["on_target"] = False
    assert budgets.evaluate(report)["s.onnx"].checks["min_accuracy[parity]"].status == "unmeasured"
    est = budgets.evaluate(report, allow_estimates=True)["s.onnx"].checks["min_accuracy[parity]"]
    assert est.status == "missed" and est.estimated and est.value == 0.94 and "on the host" in est.source


def test_a_heads_drop_is_against_the_teacher_head_on_the_same_provider_else_the_extra_teacher_that_has_it():
    report = two_head_report(max_accuracy_drop={"parity": 0.02})
    report["rows"].insert(1, row("t.onnx", "teacher", provider="DnnlExecutionProvider",
                                 heads={"digit": 0.97, "parity": 0.98}))
    report["rows"][2]["provider"] = "DnnlExecutionProvider"  # the student, measured on Dnnl only
    check = budgets.evaluate(report)["s.onnx"].checks["max_accuracy_drop[parity]"]
    assert check.status == "met" and abs(check.value - 0.01) < 1e-9, check.message  # 0.98 - 0.97, not 0.995 - 0.97
    for r in report["rows"]:  # the teacher predicts digits only; parity has its own extra teacher
        if r["role"] == "teacher":
            del r["heads"]["parity"]
    check = budgets.evaluate(report)["s.onnx"].checks["max_accuracy_drop[parity]"]
    assert check.status == "unmeasured" and "head 'parity'" in check.message
    report["rows"].append(row("p.onnx", "extra-teacher", heads={"parity": 1.0}))
    check = budgets.evaluate(report)["s.onnx"].checks["max_accuracy_drop[parity]"]
    assert check.status == "missed" and abs(check.value - 0.03) < 1e-9


def test_a_per_head_budget_on_a_single_head_model_is_unmeasured_and_says_why():
    report = crafted_report(min_accuracy={"digit": 0.9})  # rows without heads
    check = budgets.evaluate(report)["s.onnx"].checks["min_accuracy[digit]"]
    assert check.status == "unmeasured" and "no head 'digit'" in check.message and "a number" in check.message
    assert budgets.evaluate(crafted_report(min_accuracy={}))["s.onnx"].checks["min_accuracy"].status == "not_set"


def test_single_task_reports_render_as_before():
    """Keys, headings and messages of a report without tasks do not change (byte-identical renderings)."""
    report = _report([row("t.onnx", "teacher", acc=0.97), row("s.onnx", "student", acc=0.95)])
    assert budgets.keys(report["profile"]["budgets"]) == list(budgets.BUDGETS)
    assert budgets.limits(report) == {"p95_latency_ms": "p95_latency_ms ≤ 2 ms", "min_accuracy": "min_accuracy ≥ 0.93",
                                      "max_accuracy_drop": "max_accuracy_drop ≤ 0.03",
                                      "max_size_mb": "max_size_mb ≤ 1 MB", "max_energy_mj": "max_energy_mj (not set)"}
    checks = budgets.evaluate(report)["s.onnx"].checks
    assert checks["min_accuracy"].message == "0.95 ≥ 0.93"
    assert checks["max_accuracy_drop"].message == "drop 0.0200 (teacher 0.9700 - 0.9500) ≤ 0.03"
