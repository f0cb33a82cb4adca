"""report.json against its schema, report.html's content and escaping, and `pipeline report` (rerender)."""
from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from pipeline.errors import ConfigError
from pipeline.report import html
from pipeline.report import schema as reportschema
from pipeline.report.build import flags as report_flags
from pipeline.report.build import recommend as report_recommend
from pipeline.report.build import render_md
from pipeline.report.rerender import rerender
from tests.report.test_gate import TASKS, crafted_report, row, two_head_report

cli = CliRunner()


def _copy(real_run, tmp_path):
    run = tmp_path / real_run.name
    shutil.copytree(real_run, run)
    return run


def test_real_report_follows_the_schema(real_run):
    report = json.loads((real_run / "report.json").read_text())
    assert reportschema.errors(report) == []
    reportschema.validate(report)


def _measured(r):
    return next(x for x in r["rows"] if x["status"] == "measured" and x["artifact"] == "s.onnx")


BREAKS = {
    "measured row without p95": lambda r: _measured(r)["latency_ms"].pop("p95"),
    "measured row without latency_source": lambda r: _measured(r).pop("latency_source"),
    "measured row labelled as an estimate": lambda r: _measured(r).update(latency_source="estimated: 1 ms"),
    "skipped row without reason": lambda r: r["rows"].append({**row("x.onnx", "student", status="skipped"),
                                                              "reason": None}),
    "energy without its source": lambda r: _measured(r).update(energy_mj=0.3),
    "energy without how it was obtained": lambda r: _measured(r).update(energy_mj=0.3, energy_source="measured: x"),
    "a skipped energy with a figure": lambda r: _measured(r).update(energy_mj=0.3, energy_source="skipped: x",
                                                                    energy_how="skipped"),
    "a measured energy on an estimated row": lambda r: r["rows"].append(
        {**row("s.onnx", "student", status="estimated", lower_bound=0.1), "energy_mj": 0.1,
         "energy_source": "measured: x", "energy_how": "measured"}),
    "status outside the enum": lambda r: _measured(r).update(status="guessed"),
    "estimate claiming on_target": lambda r: r["rows"].append(
        {**row("s.onnx", "student", status="estimated", lower_bound=0.1), "on_target": True}),
    "missing recommended key": lambda r: r.pop("recommended"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_schema_refuses_a_broken_report(name):
    report = crafted_report()
    assert reportschema.errors(report) == []
    BREAKS[name](report)
    assert reportschema.errors(report), f"{name}: the schema accepted it"
    with pytest.raises(ConfigError, match="report.schema.json"):
        reportschema.validate(report)


def test_rerender_rewrites_md_and_html_from_report_json(real_run, tmp_path):
    run = _copy(real_run, tmp_path)
    for n in ("report.md", "report.html"):
        (run / n).unlink()
    record = (run / "run.json").read_text()
    written = rerender(run)
    assert sorted(p.name for p in written) == ["report.html", "report.md"]
    report = json.loads((run / "report.json").read_text())
    assert (run / "report.md").read_text() == render_md(report)
    page = (run / "report.html").read_text()
    assert report["run_id"] in page and page.count("<svg") == 2
    assert (run / "run.json").read_text() == record, "rerender must not rerun anything"
    res = cli.invoke(app_(), ["report", str(run)])
    assert res.exit_code == 0 and "report.html" in res.stdout


def app_():
    from pipeline.cli import app
    return app


def test_rerender_refuses_another_schema_version(real_run, tmp_path):
    run = _copy(real_run, tmp_path)
    report = json.loads((run / "report.json").read_text())
    (run / "report.json").write_text(json.dumps({**report, "schema_version": 99}))
    (run / "report.html").unlink()
    with pytest.raises(ConfigError, match="schema_version 99"):
        rerender(run)
    assert not (run / "report.html").exists()
    res = cli.invoke(app_(), ["report", str(run)])
    assert res.exit_code == 3 and "schema_version 99" in res.stderr


def test_rerender_of_a_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        rerender(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="--resume"):
        rerender(tmp_path / "half")


def test_html_escapes_every_string_and_needs_no_network():
    evil = "<script>alert(1)</script>"
    report = crafted_report(rows=[row("t.onnx", "teacher", acc=0.97), row(evil + ".onnx", "student"),
                                  {**row("$x$.onnx", "student", status="skipped"), "reason": evil}],
                            recommended=evil + ".onnx")
    report["notes"] = [f'<img src=x onerror="{evil}">']
    report["flags"] = [{"artifact": evil, "provider": "CPU", "kind": "not_faster", "detail": evil}]
    page = html.render(report)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?https?:|@import|<link""", page)


def test_html_says_how_each_figure_was_obtained():
    rows = [row("t.onnx", "teacher", acc=0.97, on_target=False), row("s.onnx", "student", on_target=True),
            row("s.onnx", "student", on_target=False, provider="CUDAExecutionProvider"),
            row("s.onnx", "student", status="estimated", lower_bound=0.01),
            {**row("s.onnx", "student", status="skipped"), "reason": "TensorRT not installed here"}]
    page = html.render(crafted_report(rows=rows))
    for label in ("measured on target", "measured on host", "estimated with formula", "skipped [1]",
                  "TensorRT not installed here", "≥ 0.0100"):
        assert label in page, label
    pts = html._points(crafted_report(rows=copy.deepcopy(rows)))
    assert {p["kind"] for p in pts} == {"target", "host", "estimate"}
    est = next(p for p in pts if p["kind"] == "estimate")
    assert est["x"] == 0.01 and est["y"] == 0.95  # the artifact's measured accuracy, drawn as an estimate


def test_html_without_plottable_rows_still_renders():
    rows = [{**row("s.onnx", "student", status="skipped"), "reason": "no provider"}]
    page = html.render(crafted_report(rows=rows, recommended=None))
    assert "No artifact recommended" in page and "No row has both a latency and an accuracy" in page


def test_distillation_section_shows_robustness_and_generations():
    report = crafted_report(rows=[row("t.onnx", "teacher", acc=0.97)])
    report["distill"] = {"method": "adversarial", "teachers": 2, "acc_teacher": 0.99, "acc_kd": 0.98,
                         "acc_scratch": 0.96, "gap_closed": 2 / 3, "attack": "pgd eps=0.25 steps=3",
                         "acc_kd_attacked": 0.71, "acc_scratch_attacked": 0.42,
                         "generations": [{"generation": 1, "val_acc": 0.97, "test_acc": 0.975},
                                         {"generation": 2, "val_acc": 0.98, "test_acc": 0.9861}]}
    md, page = render_md(report), html.render(report)
    for text in ("ensemble of 2", "gap closed (KD - scratch) / (teacher - scratch): 0.67",
                 "under attack (pgd eps=0.25 steps=3): KD / scratch: 0.7100 / 0.4200",
                 "generation 2: 0.9861 (val 0.9800)"):
        assert text in md, text
    assert "0.7100 / 0.4200" in page and "generation 2</th><td>0.9861 (val 0.9800)" in page
    report["distill"].update(gap_closed=None, attack=None, generations=None, teachers=1)
    md = render_md(report)
    assert "undefined: the scratch student is at least as accurate" in md
    assert "under attack" not in md and "generation" not in md and "ensemble" not in md


def test_flags_judge_compression_steps_by_the_allowance_and_students_by_speed_only():
    rows = [row("t.onnx", "teacher", p95=1.0, acc=0.99), {**row("s.onnx", "student", p95=1.0, acc=0.90),
                                                            "predecessor": "t.onnx"},
            {**row("p.onnx", "student-pruned", p95=0.1, acc=0.88), "predecessor": "s.onnx"}]
    got = {(f["artifact"], f["kind"]) for f in report_flags(crafted_report(rows=rows))}
    # the student loses 9 points against its teacher: the profile's budget judges that, not the per-stage
    # allowance; it is not faster than the teacher, which is flagged. Pruning lost 2 points > 1: flagged.
    assert got == {("s.onnx", "not_faster"), ("p.onnx", "accuracy_drop")}
    report = crafted_report(rows=rows, min_accuracy=0.5, max_accuracy_drop=0.2)
    report["flags"] = report_flags(report)
    assert report_recommend(report)["artifact"] == "s.onnx"  # still the smaller model; p.onnx is flagged


def test_table_and_page_label_energy_by_its_energy_how_field():
    rows = [row("t.onnx", "teacher", acc=0.97, energy=0.7, energy_source="measured: rapl"),
            row("s.onnx", "student", energy=0.5, energy_source="measured-looking text", energy_how="estimated")]
    report = crafted_report(rows=rows)
    md = render_md(report)
    assert "| 0.7000 |" in md and "| 0.5000e |" in md
    page = html.render(report)
    assert page.count("<small>estimated</small>") == 1


def test_the_report_stage_records_each_file_with_its_kind(real_run):
    outputs = json.loads((real_run / "run.json").read_text())["stages"]["report"]["outputs"]
    assert {n: o["kind"] for n, o in outputs.items()} == {"report.json": "json", "report.md": "markdown",
                                                          "report.html": "html"}


def _trtexec_row(p95=None):
    """A measured trtexec row as trtbench writes it when TensorRT printed one percentile only."""
    r = row("s.onnx", "student", p95=0.5)
    r.update(backend="tensorrt", provider="trtexec", accuracy=None, accuracy_source="not measured: trtexec")
    r["latency_ms"]["p95"] = p95
    return r


def test_tables_render_from_values_both_in_markdown_and_the_terminal(tmp_path, capsys):
    from pipeline.cli import _print_report
    why = "TensorRT: libnvinfer.so.10: cannot open shared object file"
    rows = [row("t.onnx", "teacher", acc=0.97), _trtexec_row(),
            {**row("s.onnx", "student", status="skipped"), "reason": why}]
    report = crafted_report(rows=rows)
    assert reportschema.errors(report) == []
    md = render_md(report)
    assert f"| skipped: {why} |" in md
    trt = next(line for line in md.splitlines() if "tensorrt/trtexec" in line)
    assert "| 0.4000 | — |" in trt  # p50 measured, p95 not printed by this trtexec
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(report))
    _print_report(run)
    out = capsys.readouterr().out
    assert "skipped [1]" in out and f"[1] {why}" in out
    assert " trtexec " in out and "ort/CPU" in out


# ---------------------------------------------------------------- multi-task: tasks, heads, one column per head
def test_a_two_head_report_follows_the_schema_and_broken_heads_do_not():
    report = two_head_report(min_accuracy={"digit": 0.9, "parity": 0.99}, max_accuracy_drop=0.03)
    assert reportschema.errors(report) == []
    breaks = {
        "heads on an estimate": lambda r: r["rows"][2].update(heads={"digit": {"accuracy": 0.9}}),
        "a head without accuracy": lambda r: r["rows"][1]["heads"]["parity"].pop("accuracy"),
        "a head accuracy over 1": lambda r: r["rows"][1]["heads"]["parity"].update(accuracy=97.0),
        "a budget over 1 for a head": lambda r: r["profile"]["budgets"].update(min_accuracy={"parity": 1.5}),
        "a task without a name": lambda r: r["tasks"][1].pop("name"),
        "tasks not a list": lambda r: r.update(tasks={"digit": {}}),
    }
    for name, breaking in breaks.items():
        broken = copy.deepcopy(report)
        breaking(broken)
        assert reportschema.errors(broken), f"{name}: the schema accepted it"


def test_build_copies_the_benchmarks_tasks_and_rows_heads(tmp_path):
    from pipeline.report.build import build
    rows = two_head_report()["rows"]
    (tmp_path / "benchmark.json").write_text(json.dumps({"tasks": TASKS, "rows": copy.deepcopy(rows)}))
    report = build(tmp_path)
    assert report["tasks"] == TASKS
    assert [r.get("heads") for r in report["rows"]] == [r.get("heads") for r in rows]
    (tmp_path / "benchmark.json").write_text(json.dumps({"rows": copy.deepcopy(rows)}))  # before multi-task
    assert build(tmp_path)["tasks"] == []


def test_per_head_accuracy_columns_in_markdown_terminal_and_html(tmp_path, capsys, monkeypatch):
    from rich.console import Console

    from pipeline.cli import _print_report
    monkeypatch.setattr("pipeline.cli.console", Console(width=250))  # a table on one line per row
    report = two_head_report(min_accuracy={"digit": 0.9, "parity": 0.99})
    report["recommended"] = None
    md = render_md(report)
    head = next(line for line in md.splitlines() if line.startswith("| artifact"))
    assert "| acc digit | acc parity | Δ teacher |" in head and "| acc |" not in head
    student = next(line for line in md.splitlines() if line.startswith("| s.onnx") and "measured" in line)
    assert "| 0.9500 | 0.9700 |" in student
    assert "| min_accuracy[digit] ≥ 0.9 | min_accuracy[parity] ≥ 0.99 |" in md
    assert "| met 0.95 | MISSED 0.97 (by 0.02) |" in md
    assert "parity (2 classes, loss weight 0.5, labels parity)" in md
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(report))
    _print_report(run)
    out = capsys.readouterr().out
    assert "acc digit" in out and "acc parity" in out and "0.9700" in out
    assert "min_accuracy[parity] ≥ 0.99" in out and "MISSED 0.97 (by 0.02)" in out  # brackets are not markup
    page = html.render(report)
    assert "<th>accuracy digit</th><th>accuracy parity</th>" in page and "<th>accuracy</th>" not in page
    assert "minimum accuracy, head parity<br><small>0.99</small>" in page and "MISSED 0.97 (by 0.02)" in page
    assert "agreement with the teacher 0.9700" in page and page.count("<svg") == 2  # the plots still draw
    lines = {label: v for _, v, _, label in html._budget_lines(report, teacher=0.97)}
    assert lines == {"p95 budget 2.0 ms": 2.0, "min accuracy (digit head) 0.9": 0.9,
                     "teacher − max drop 0.03 = 0.9400": 0.97 - 0.03}


def test_a_single_task_report_keeps_one_accuracy_column():
    md, page = render_md(crafted_report()), html.render(crafted_report())
    assert "| MACs | acc | Δ teacher |" in md and "acc digit" not in md and "Tasks (" not in md
    assert "<th>accuracy</th>" in page and ", head " not in page and "Tasks (" not in page
