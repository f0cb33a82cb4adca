"""pipeline.artifacts: the one list of roles, which of them may be recommended, and the report's file kinds."""
from __future__ import annotations

import json

from pipeline.artifacts import ROLES, is_candidate, is_trained
from pipeline.report.build import flags, recommend
from pipeline.report.schema import SCHEMA_PATH
from tests.report.test_gate import crafted_report, row


def test_roles_are_each_fp32_role_and_its_quantized_variants():
    fp32 = ["teacher", "student", "student-scratch", "student-pruned"]
    assert set(ROLES) == {"extra-teacher", *fp32, *(f"{r}-{p}" for r in fp32 for p in ("int8", "fp16"))}


def test_the_schema_lists_the_same_roles():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$defs"]["row"]["properties"]["role"]["enum"] == [None, *ROLES]


def test_candidates_are_everything_but_the_references():
    assert [r for r in ROLES if not is_candidate(r)] == ["teacher", "extra-teacher", "student-scratch"]
    assert not is_candidate(None) and not is_candidate("mystery")
    assert [r for r in ROLES if is_trained(r)] == ["student", "student-scratch"]


def test_recommend_never_picks_a_reference_however_fast():
    rows = [row("t.onnx", "teacher", p95=0.1, acc=0.99), row("x.onnx", "student-scratch", p95=0.1, acc=0.99),
            row("s.onnx", "student", p95=0.5, acc=0.95), row("q.onnx", "teacher-int8", p95=0.3, acc=0.94)]
    report = crafted_report(rows=rows, min_accuracy=0.5, max_accuracy_drop=0.2)
    report["flags"] = flags(report)
    assert recommend(report)["artifact"] in ("s.onnx", "q.onnx")
