"""pipeline/bench.py: the target figures scored from a finished run (the default recipe's, few epochs)."""
from __future__ import annotations

import json

import pytest

from scripts.bench import TARGETS, score


def test_bench_scores_a_real_run_with_every_figure_sourced(real_run):
    result = score(real_run)
    figs, rows = result["figures"], json.loads((real_run / "report.json").read_text())["rows"]
    assert result["checked"] == sum(f["met"] is not None for f in figs)
    assert result["met"] == sum(bool(f["met"]) for f in figs) and result["all_met"] == (result["met"] ==
                                                                                         result["checked"])
    assert all(f["source"] for f in figs)
    # the default recipe quantizes only the pruned student: the gated INT8 figure says it was not built
    missing = next(f for f in figs if f["new"] == "student.int8.onnx")
    assert missing["met"] is False and "not built" in missing["source"]
    # pruned vs unpruned: MACs as counted in the rows, speedup from their p50s
    row = {r["artifact"]: r for r in rows if r["status"] == "measured" and r.get("batch") == 1}
    macs = next(f for f in figs if f["figure"] == "MAC reduction")
    assert macs["value"] == pytest.approx(row["student.onnx"]["macs"] / row["student-pruned.onnx"]["macs"])
    eff = next(f for f in figs if f["figure"] == "speedup / MAC reduction")
    assert eff["target"] == f">= {TARGETS['prune_efficiency']}"


def test_speedups_are_also_given_per_thread_count_for_information(real_run):
    figs = score(real_run)["figures"]
    per = [f for f in figs if f["figure"].startswith("p50 speedup at ")]
    assert per and all(f["met"] is None and f["comparison"].endswith("(info)") for f in per)
    rows = {r["artifact"]: r for r in json.loads((real_run / "report.json").read_text())["rows"]
            if r["status"] == "measured" and r.get("batch") == 1 and r.get("p50_by_threads")}
    for f in per:
        t = f["figure"].removeprefix("p50 speedup at ").removesuffix(" thread(s)")
        base, new = rows[f["base"]]["p50_by_threads"], rows[f["new"]]["p50_by_threads"]
        assert f["value"] == pytest.approx(base[t] / new[t])
    assert {f["figure"] for f in per if f["new"] == "student-pruned.onnx"} == {
        f"p50 speedup at {t} thread(s)" for t in rows["student-pruned.onnx"]["p50_by_threads"]}


def test_the_test_set_size_is_the_rows_accuracy_n_field():
    from scripts.bench import _n
    rows = [{"accuracy_source": "see the measured rows"},
            {"accuracy_n": 360, "accuracy_source": "measured: on the test split (n=999)"}]
    assert _n(rows) == 360
    assert _n([{"accuracy_source": "measured: on the test split (n=999)"}]) == 0  # never read back from text
