"""Multi-task distillation end to end (recipe `tasks:`), with few epochs: per-head rows, named ONNX outputs,
budgets per head at the gate, a CSV task with its own teacher, and the recipe errors as exit 2."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.artifacts import is_candidate
from pipeline.cli import app
from pipeline.config import ROOT, load_recipe
from pipeline.report import schema as reportschema
from tests.conftest import FAST

MULTITASK = ROOT / "recipes" / "digits-multitask.yaml"
SHORT = {**FAST, "teacher": {"epochs": 6}, "distill": {"epochs": 4}, "prune": {"epochs": 1},
         "quantize": {"calibration_samples": 64}}
ARTIFACTS = ("teacher.onnx", "student.onnx", "student-scratch.onnx", "student-pruned.onnx", "student-pruned.int8.onnx")
cli = CliRunner()


def _recipe(path: Path, data: dict, **over) -> Path:
    """`data` with the stages shortened (SHORT) and `over` merged per section, written to path."""
    for section, values in {**SHORT, **over}.items():
        data[section] = {**(data.get(section) or {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _rows(report: dict, artifact: str) -> list[dict]:
    return [r for r in report["rows"] if r["artifact"] == artifact and r["status"] == "measured"]


def _onnx_heads(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Argmax per named output of an ONNX file on x, through onnxruntime."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    return {o.name: v.argmax(1) for o, v in zip(sess.get_outputs(), outs)}


# ---------------------------------------------------------------- (a) digits: digit + parity through the CLI
def _profile(where: Path, **min_accuracy: float) -> Path:
    """profiles/edge-cpu.yaml (same target) with easy latency and size budgets and min_accuracy per head."""
    data = yaml.safe_load((ROOT / "profiles" / "edge-cpu.yaml").read_text())
    data["name"] = "edge-cpu-heads"
    data["budgets"] = {"p95_latency_ms": 1000.0, "max_size_mb": 100.0, "min_accuracy": min_accuracy}
    path = where / ("heads-" + "-".join(f"{k}{v}" for k, v in min_accuracy.items()) + ".yaml")
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`pipeline run --recipe recipes/digits-multitask.yaml --profile <edge-cpu with budgets per head>`, few
    epochs: (recipe, run directory, stdout). The gate checks the report's recommendation, so the run's own
    budgets are easy ones (every artifact meets them: one is recommended)."""
    tmp = tmp_path_factory.mktemp("mt")
    recipe = _recipe(tmp / "mt.yaml", yaml.safe_load(MULTITASK.read_text()))
    profile = _profile(tmp, digit=0.01, parity=0.01)
    from rich.console import Console
    mp = pytest.MonkeyPatch()
    mp.setattr("pipeline.cli.console", Console(width=250))  # one table row per line
    try:
        res = cli.invoke(app, ["run", "--recipe", str(recipe), "--profile", str(profile), "--runs-dir",
                               str(tmp / "runs")])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.stdout + res.stderr
    return recipe, (tmp / "runs" / "latest").resolve(), res.stdout


def test_report_has_tasks_and_per_head_rows_that_follow_the_schema(digits_run):
    _, run, stdout = digits_run
    report = json.loads((run / "report.json").read_text())
    assert reportschema.errors(report) == []
    assert [(t["name"], t["classes"], t["weight"]) for t in report["tasks"]] == \
        [("digit", [str(i) for i in range(10)], 1.0), ("parity", ["even", "odd"], 0.5)]
    for artifact in ARTIFACTS:
        rows = _rows(report, artifact)
        assert rows, artifact
        for r in rows:
            assert set(r["heads"]) == {"digit", "parity"}, artifact
            assert r["heads"]["digit"]["accuracy"] == r["accuracy"]  # the single figure is the first head's
            assert 0 <= r["heads"]["parity"]["accuracy"] <= 1 and r["heads"]["parity"]["accuracy_n"] == 360
    student = _rows(report, "student.onnx")[0]
    assert "teacher" in student["heads"]["parity"]["agreement"]
    # the terminal, report.md and report.html: one accuracy column per head, one budget column per head
    head = next(line for line in stdout.splitlines() if "artifact" in line and "status" in line)
    assert "acc digit" in head and "acc parity" in head and re.search(r"\bacc\b(?! (digit|parity))", head) is None
    assert f"{student['heads']['parity']['accuracy']:.4f}" in stdout
    assert "min_accuracy[digit]" in stdout and "min_accuracy[parity]" in stdout
    md = (run / "report.md").read_text()
    md_head = next(line for line in md.splitlines() if line.startswith("| artifact"))
    assert "| acc digit | acc parity |" in md_head and "| acc |" not in md_head
    page = (run / "report.html").read_text()
    assert "<th>accuracy digit</th><th>accuracy parity</th>" in page and "<th>accuracy</th>" not in page


def test_student_onnx_has_one_named_output_per_head_and_its_accuracies_are_recomputable(digits_run):
    recipe_path, run, _ = digits_run
    for name in ARTIFACTS:
        assert [o.name for o in onnx.load(str(run / name)).graph.output] == ["digit", "parity"], name
    from pipeline.train.data import load_splits
    recipe = load_recipe(recipe_path)
    test = load_splits(recipe.data, recipe.seed, tasks=recipe.tasks).test
    assert test.ids == json.loads((run / "splits.json").read_text())["test"]
    x, y = test.arrays()
    preds = _onnx_heads(run / "student.onnx", x)
    report = json.loads((run / "report.json").read_text())
    for r in _rows(report, "student.onnx"):
        assert r["heads"]["digit"]["accuracy"] == pytest.approx(float((preds["digit"] == y[:, 0]).mean()), abs=1e-12)
        assert r["heads"]["parity"]["accuracy"] == pytest.approx(float((preds["parity"] == y[:, 1]).mean()), abs=1e-12)


def test_gate_judges_each_head(digits_run, tmp_path):
    _, run, _ = digits_run
    report = json.loads((run / "report.json").read_text())
    assert report["recommended"] is not None
    parity = [r["heads"]["parity"]["accuracy"] for r in report["rows"] if r.get("heads") and r["on_target"]]
    assert parity and max(parity) < 0.9999, "precondition: no artifact has a perfect parity head"
    met = cli.invoke(app, ["gate", str(run)])  # the run's own profile: both heads easily met
    assert met.exit_code == 0, met.stdout
    assert "min_accuracy[digit]" in met.stdout and "min_accuracy[parity]" in met.stdout
    missed = cli.invoke(app, ["gate", str(run), "--json", "--profile",
                              str(_profile(tmp_path, digit=0.01, parity=0.9999))])
    assert missed.exit_code == 1, missed.stdout
    cases = {c["budget"]: c["status"] for c in json.loads(missed.stdout)["cases"]}
    assert cases["min_accuracy[digit]"] == "passed" and cases["min_accuracy[parity]"] == "failed"


def test_the_bundle_names_each_output_and_its_task(digits_run, tmp_path):
    import tarfile
    _, run, _ = digits_run
    res = cli.invoke(app, ["ship", str(run), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.stdout + res.stderr
    bundle = next(tmp_path.glob("bundle-*.tar.gz"))
    assert cli.invoke(app, ["verify", str(bundle)]).exit_code == 0
    with tarfile.open(bundle) as tar:
        manifest = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/manifest.json"))))
        readme = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/README-device.md"))).read()
    assert [(o["name"], o["task"], len(o["classes"])) for o in manifest["outputs"]] == [("digit", "digit", 10),
                                                                                      ("parity", "parity", 2)]
    assert [o["name"] for o in manifest["models"][0]["outputs"]] == ["digit", "parity"]
    assert "outputs `digit` (10 classes), `parity` (2 classes)" in readme.decode()


# ---------------------------------------------------------- (b) an ImageFolder with a CSV task and its own teacher
def _imagefolder(root: Path, per_class: int = 24) -> Path:
    """2 classes x per_class 8x8 PNGs under root/data/<class>/ (the bright half: left or right), and labels.csv:
    a second task 'tone' (dark or light image) for every image. Both are easy: few epochs learn them."""
    rng = np.random.default_rng(0)
    rows = ["relative_path,label"]
    for c, name in enumerate(("left", "right")):
        (root / "data" / name).mkdir(parents=True)
        for i in range(per_class):
            light = i % 2
            a = np.full((8, 8), 60 if light else 0)
            a[:, 4 * c:4 * c + 4] += 150
            a = np.clip(a + rng.integers(0, 30, a.shape), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / "data" / name / f"{i}.png")
            rows.append(f"{name}/{i}.png,{'light' if light else 'dark'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "data"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """An ImageFolder run: task 'side' (the class) taught by the teacher, task 'tone' (labels.csv) by an extra
    teacher of that task alone; prune and quantize off. (recipe, run directory, folder)."""
    tmp = tmp_path_factory.mktemp("folder")
    _imagefolder(tmp)
    data = {"name": "folder-mt", "seed": 0,
            "data": {"kind": "imagefolder", "root": "data", "image_size": 8, "channels": 1, "workers": 0},
            "tasks": [{"name": "side", "labels": "class"}, {"name": "tone", "labels": "labels.csv", "weight": 0.5}],
            "models": {"teacher": {"arch": "cnn", "heads": ["side"], "kwargs": {"channels": [8, 16], "hidden": 16}},
                       "extra_teachers": [{"arch": "mlp", "heads": ["tone"], "kwargs": {"hidden": [16]}}],
                       "student": {"arch": "mlp", "kwargs": {"hidden": [16]}}},
            "distill": {"method": "hinton"}, "prune": {"enabled": False}, "quantize": {"enabled": False}}
    recipe = _recipe(tmp / "folder.yaml", data, teacher={"epochs": 8}, distill={"epochs": 6, "batch_size": 8})
    res = cli.invoke(app, ["run", "--recipe", str(recipe), "--profile", "edge-cpu", "--runs-dir", str(tmp / "runs")])
    assert res.exit_code == 0, res.stdout + res.stderr
    return recipe, (tmp / "runs" / "latest").resolve(), tmp


def test_imagefolder_with_a_csv_task_taught_by_its_own_teacher(folder_run):
    recipe, run, tmp = folder_run
    assert [o.name for o in onnx.load(str(run / "student.onnx")).graph.output] == ["side", "tone"]
    assert [o.name for o in onnx.load(str(run / "teacher.onnx")).graph.output] == ["side"]
    report = json.loads((run / "report.json").read_text())
    assert reportschema.errors(report) == []
    assert [(t["name"], t["classes"]) for t in report["tasks"]] == [("side", ["left", "right"]),
                                                                     ("tone", ["dark", "light"])]
    student = _rows(report, "student.onnx")[0]
    assert set(student["heads"]) == {"side", "tone"}
    assert set(_rows(report, "teacher.onnx")[0]["heads"]) == {"side"}, "the first task's teacher: that head only"
    distill = json.loads((run / "run.json").read_text())["stages"]["distill"]
    assert set(distill["results"]["heads"]) == {"side", "tone"}
    assert distill["results"]["heads"]["tone"]["acc_teacher"] is not None, "tone's teacher is the extra teacher"
    # the exported student's tone head, recomputed on the test images against the CSV
    from pipeline.train.data import load_splits
    rec = load_recipe(recipe)
    test = load_splits(rec.data, rec.seed, tasks=rec.tasks).test
    x, y = test.arrays()
    labels = dict(line.split(",") for line in (tmp / "labels.csv").read_text().split()[1:])
    assert [("dark", "light")[v] for v in y[:, 1]] == [labels[i] for i in test.ids]
    tone = _onnx_heads(run / "student.onnx", x)["tone"]
    assert student["heads"]["tone"]["accuracy"] == pytest.approx(float((tone == y[:, 1]).mean()), abs=1e-12)


def test_a_head_taught_by_an_extra_teacher_has_a_drop_budget_the_gate_can_judge(folder_run, tmp_path):
    _, run, _ = folder_run
    data = yaml.safe_load((ROOT / "profiles" / "edge-cpu.yaml").read_text())
    data["budgets"] = {"p95_latency_ms": 1000.0, "max_size_mb": 100.0, "max_accuracy_drop": {"side": 1.0, "tone": 1.0}}
    profile = tmp_path / "drop.yaml"
    profile.write_text(yaml.safe_dump(data))
    res = cli.invoke(app, ["gate", str(run), "--profile", str(profile), "--json"])
    cases = {c["budget"]: c["status"] for c in json.loads(res.stdout)["cases"]}
    assert cases["max_accuracy_drop[side]"] == "passed"
    assert cases["max_accuracy_drop[tone]"] == "passed", res.stdout  # a drop of at most 1.0 always passes
    assert res.exit_code == 0


def test_the_teacher_of_a_task_is_benchmarked_as_a_reference_and_every_head_has_a_teacher_agreement(folder_run):
    _, run, _ = folder_run
    report = json.loads((run / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["rows"] if r["status"] == "measured"}
    assert list(rows["teacher-1.onnx"]["heads"]) == ["tone"] and rows["teacher-1.onnx"]["role"] == "extra-teacher"
    assert not is_candidate(rows["teacher-1.onnx"]["role"])  # a reference, never recommended or shipped
    assert report["tasks"][1]["labels"] == "labels.csv"  # the CSV by name: the host's path stays home
    student = rows["student.onnx"]["heads"]
    assert set(student["side"]["agreement"]) == set(student["tone"]["agreement"]) == {"teacher"}


def test_teachers_of_tasks_are_not_called_an_ensemble(folder_run):
    _, run, _ = folder_run
    md = (run / "report.md").read_text()
    assert "ensemble" not in md, next(line for line in md.splitlines() if "ensemble" in line)


# ---------------------------------------------------------------- (c) what tasks cannot be combined with: exit 2
def _digits_mt() -> dict:
    return yaml.safe_load(MULTITASK.read_text())


def _set(data: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    node = data
    for k in path:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


REFUSALS = {  # name: (change to the digits multi-task recipe, words the one paragraph must have)
    "duplicate task names": (lambda d: _set(d, "tasks.1.name", "digit"), "tasks: task names must differ"),
    "first task not the class": (lambda d: d.update(tasks=d["tasks"][::-1]), "tasks.0.labels: the first task is"),
    "digits with a CSV task": (lambda d: _set(d, "tasks.1.labels", "labels.csv"), "tasks.1.labels: digits has"),
    "imagefolder with a built-in task": (
        lambda d: _set(d, "data", {"kind": "imagefolder", "root": "data"}), "tasks.1.labels: an ImageFolder's"),
    "a head that is no task": (lambda d: _set(d, "models.teacher.heads", ["digit", "colour"]),
                               "models.teacher.heads: 'colour' is not a task"),
    "student without every head": (lambda d: _set(d, "models.student.heads", ["digit"]),
                                   "models.student.heads: the student predicts every task"),
    "teacher without the first task": (lambda d: _set(d, "models.teacher.heads", ["parity"]),
                                       "models.teacher.heads: the teacher is the reference of the first task"),
    "an ONNX teacher": (lambda d: _set(d, "models.teacher", {"arch": "cnn", "onnx": "t.onnx"}),
                        "models.teacher.onnx: an ONNX teacher with tasks is not supported"),
    "an extra teacher without heads": (lambda d: _set(d, "models.extra_teachers", [{"arch": "mlp"}]),
                                       "models.extra_teachers.0.heads: with tasks"),
    "a task without a teacher": (lambda d: _set(d, "models.teacher.heads", ["digit"]),
                                 "tasks: no teacher predicts 'parity'"),
    "feature KD": (lambda d: _set(d, "distill.method", "feature"), "distill.method: 'feature' is single-task"),
    "adversarial KD": (lambda d: _set(d, "distill.method", "adversarial"), "distill.method: 'adversarial' is"),
    "ensemble KD": (lambda d: _set(d, "distill.method", "ensemble"), "distill.method: 'ensemble' is single-task"),
    "mixup": (lambda d: _set(d, "distill.mixup", 0.2), "distill.mixup: mixup mixes one label per image"),
    "QAT": (lambda d: _set(d, "quantize.qat", {"epochs": 1}), "quantize.qat: fine-tunes one head"),
    "a CSV that is not there": (
        lambda d: (_set(d, "data", {"kind": "imagefolder", "root": "data"}), _set(d, "tasks.1.labels", "no.csv")),
        "tasks.1.labels: 'no.csv' is not a file"),
}


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_recipe_tasks_cannot_serve_exits_2_with_one_paragraph_naming_the_field(tmp_path, name, command):
    change, words = REFUSALS[name]
    data = _digits_mt()
    change(data)
    (tmp_path / "data" / "a").mkdir(parents=True)  # an ImageFolder root that exists, for the imagefolder cases
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data" / "a" / "0.png")
    (tmp_path / "t.onnx").write_bytes(b"")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    res = cli.invoke(app, [command, "--recipe", str(bad), "--runs-dir", str(tmp_path / "runs")]
                     if command == "run" else [command, "--recipe", str(bad)], env={"PIPELINE_DEVICE": ""})
    out = res.stderr if command == "run" else res.stdout
    assert res.exit_code == 2, out
    assert "Traceback" not in res.stdout + res.stderr
    assert f"{bad}: {words}" in out, out
    if command == "run":
        assert out.count("\n") == 1 and out.startswith("error: "), out  # one paragraph
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "no run was started"
    else:
        fail = [line for line in out.splitlines() if line.startswith("FAIL")]
        assert len(fail) == 1 and words in fail[0], out


def _drop_row(csv: Path) -> None:
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:5] + lines[6:]) + "\n")  # line 6: left/4.png


CSV_ERRORS = {  # name: (change to labels.csv, words the message has after the CSV's path)
    "an image without a row": (_drop_row, "no label for left/4.png (task 'tone')"),
    "a row without a label": (lambda p: p.write_text(p.read_text() + "left/0.png\n"), "line 50: expected"),
    "one label for every image": (lambda p: p.write_text("".join(f"{q.parent.name}/{q.name},dark\n" for q in
                                                                  sorted((p.parent / "data").rglob("*.png")))),
                                  "every row has the label 'dark'"),
}


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("name", list(CSV_ERRORS))
def test_a_bad_tasks_csv_exits_2_naming_the_file(tmp_path, name, command):
    change, words = CSV_ERRORS[name]
    _imagefolder(tmp_path)  # 48 images: line 50 is the first after them
    change(tmp_path / "labels.csv")
    data = {"name": "folder-mt", "data": {"kind": "imagefolder", "root": "data", "workers": 0},
            "tasks": [{"name": "side"}, {"name": "tone", "labels": "labels.csv"}],
            "models": {"teacher": {"arch": "mlp"}, "student": {"arch": "mlp"}}}
    recipe = _recipe(tmp_path / "r.yaml", data)
    res = cli.invoke(app, [command, "--recipe", str(recipe)] +
                     (["--runs-dir", str(tmp_path / "runs")] if command == "run" else []), env={"PIPELINE_DEVICE": ""})
    out = res.stderr if command == "run" else res.stdout
    assert res.exit_code == 2, res.stdout + res.stderr
    assert f"{tmp_path / 'labels.csv'}: " in out and words in out and "Traceback" not in res.stdout + res.stderr


# ---------------------------------------------------------------- DKD and DIST: the method's loss per head
@pytest.mark.parametrize("method", ["dkd", "dist", "hinton", "dynamic"])
def test_the_distill_loss_with_tasks_is_the_weighted_sum_of_the_methods_loss_per_head(method):
    import torch
    import torch.nn.functional as F

    from pipeline.train import kd
    from pipeline.train.tasks import Head
    from stages.distill import Config, make_loss
    heads = [Head("digit", tuple("0123456789")), Head("parity", ("even", "odd"), 0.5, "parity")]
    cfg = Config(method=method, dkd_warmup_steps=0)
    torch.manual_seed(0)
    student, t = torch.nn.Linear(4, 12), torch.randn(16, 12)
    x = torch.randn(16, 4)
    y = torch.stack([torch.randint(10, (16,)), torch.randint(2, (16,))], 1)
    net, loss = make_loss(cfg, student, lambda _x: t, heads=heads)
    out = student(x)

    def one(o, tt, yy):
        if method == "dkd":
            return (F.cross_entropy(o, yy, reduction="none") + kd.dkd(o, tt, yy, cfg.temperature, cfg.dkd_alpha,
                                                                       cfg.dkd_beta)).mean()
        if method == "dist":
            return F.cross_entropy(o, yy) + kd.dist(o, tt, cfg.temperature, cfg.dist_beta, cfg.dist_gamma)
        a = kd.dynamic_alpha(tt, cfg.temperature, cfg.alpha) if method == "dynamic" else cfg.alpha
        return kd.hinton(o, tt, yy, cfg.temperature, a).mean()
    by_hand = one(out[:, :10], t[:, :10], y[:, 0]) + 0.5 * one(out[:, 10:], t[:, 10:], y[:, 1])
    got = loss(net, x, y, None)
    assert torch.isfinite(got) and torch.allclose(got, by_hand, atol=1e-6)
    got.backward()
    assert student.weight.grad[10:].abs().sum() > 0, "the parity head learns"
