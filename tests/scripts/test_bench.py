"""pipeline/bench.py: the target figures scored from a finished run (the default recipe's, few epochs)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

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


def _quant_rows(test_accs: list[float], val_accs: list[float], p50s: list[float]) -> list[dict]:
    """bench_quant rows as bench() hands them to _score: FP32 first, then minmax and the others."""
    rows = [{"row": "FP32", "path": Path("r/s.onnx"), "artifact": "s.onnx", "meta": {}}]
    for name, acc, val in zip(["minmax", "best calibration", "+ exclusion"], test_accs[1:], val_accs[1:]):
        rows.append({"row": name, "path": Path(f"r/{name}/s.int8.onnx"), "artifact": "s.int8.onnx", "meta": {
            "source_test_acc": test_accs[0], "test_acc": acc, "agreement_vs_source": 0.99, "test_samples": 800,
            "calibrate_method": "minmax", "quant": {"validation": {"source_val_acc": val_accs[0],
                                                                   "chosen_val_acc": val}}}})
    for r, p50 in zip(rows, p50s):
        r["latency_ms"] = {"1": {"p50": p50}, "2": {"p50": 2 * p50}}
    return rows


def test_bench_quant_picks_on_validation_and_needs_minmax_to_lose_a_point():
    from pipeline.config import load_profile
    from scripts.bench_quant import _score
    rec, prof = SimpleNamespace(name="r", max_accuracy_drop_per_stage=0.01), load_profile("edge-cpu")
    # the row best on test (+ exclusion) is not picked: best calibration is better on validation
    t = _score(Path("r"), _quant_rows([0.98, 0.965, 0.978, 0.980], [0.97, 0.95, 0.975, 0.97], [3.0, 1.0, 1.0, 1.5]),
               rec, prof)["target"]
    assert t["row"] == "best calibration" and t["drop_points"] == pytest.approx(0.2)
    assert t["applies"] and t["minmax_drop_points"] == pytest.approx(1.5) and t["speedup"] == pytest.approx(3.0)
    assert t["met"]
    # within 0.3 points and 3x faster, but MinMax lost only 0.5 points: nothing was won back, so not met
    t = _score(Path("r"), _quant_rows([0.98, 0.975, 0.978, 0.98], [0.97, 0.96, 0.975, 0.97], [3.0, 1.0, 1.0, 1.0]),
               rec, prof)["target"]
    assert not t["applies"] and not t["met"]


@pytest.mark.slow
def test_bench_quant_on_a_real_run_named_through_runs_latest_writes_its_real_id(real_run, tmp_path):
    """The whole bench on the default run's student: every row built by the quantize stage, timed, scored; a
    --run given as a link (runs/latest) is the run it points at, in the JSON's name and run_id."""
    from typer.testing import CliRunner

    from scripts.bench_quant import app
    import shutil
    run = tmp_path / real_run.name  # a copy: the bench writes <run>/bench-quant/, and real_run is shared
    shutil.copytree(real_run, run, symlinks=True)
    link = tmp_path / "latest"
    link.symlink_to(run)
    # the run's own recipe.json: the default recipe with the tests' short benchmark (tests/conftest.py FAST)
    res = CliRunner().invoke(app, ["--recipe", str(run / "recipe.json"), "--run", str(link), "--source", "student.onnx",
                                   "--qat-epochs", "0", "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / f"quant-{run.name}.json").read_text())
    assert result["run_id"] == run.name and (run / "bench-quant" / "minmax").is_dir()
    assert [r["row"] for r in result["rows"]] == ["FP32", "minmax", "best calibration", "+ exclusion"]
    assert all(r["p50_ms"] > 0 for r in result["rows"]) and result["target"]["applies"] in (True, False)
