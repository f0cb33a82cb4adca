"""Bad input that used to end in a traceback mid-run: each case is `pipeline run` on it, exit 2, one sentence
naming the file and field, and no run directory (refused at recipe load, before anything is copied)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import DEFAULT_RECIPE, ModelSpec
from pipeline.train import models

runner = CliRunner()


def write_recipe(tmp_path: Path, **models_over) -> Path:
    """The default recipe with some models.* fields replaced, written beside the files it names."""
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    for field, value in models_over.items():
        role, _, key = field.partition("__")
        data["models"][role][key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(tmp_path: Path, *args: str):
    """`pipeline run` with runs in tmp_path/runs; returns (result, whether a run directory was made)."""
    runs = tmp_path / "runs"
    res = runner.invoke(app, ["run", *args, "--runs-dir", str(runs)])
    assert "Traceback" not in res.stdout + res.stderr
    return res, runs.exists() and any(runs.iterdir())


def tiny_onnx(path: Path, in_shape=("N", 1, 8, 8), classes: int = 10, external: bool = False,
              scale: float = 1.0) -> Path:
    """A real ONNX classifier: Flatten then MatMul, batch axis dynamic unless in_shape fixes it."""
    features = int(np.prod([d for d in in_shape[1:]]))
    w = (np.random.default_rng(0).standard_normal((features, classes)) * scale).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [in_shape[0], classes])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data",
                        size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


# ---------------------------------------------------------------- 2. checkpoints that are not checkpoints
def _truncated(p: Path) -> None:
    torch.save(models.build(ModelSpec(arch="cnn"), 1, 10, 8).state_dict(), p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _nan(p: Path) -> None:
    state = models.build(ModelSpec(arch="cnn"), 1, 10, 8).state_dict()
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, p)


@pytest.mark.parametrize("make, sentence", [
    (_truncated, "cannot be read as a PyTorch checkpoint"),
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "cannot be read as a PyTorch checkpoint"),
    (_nan, "weights features.0.weight are not finite"),
], ids=["truncated", "empty", "random-bytes", "nan-weights"])
def test_a_broken_checkpoint_exits_2_naming_the_file(tmp_path, make, sentence):
    ckpt = tmp_path / "teacher.pt"
    make(ckpt)
    res, made = run_cli(tmp_path, "--recipe", str(write_recipe(tmp_path, teacher__arch="cnn",
                                                               teacher__kwargs={}, teacher__checkpoint="teacher.pt")))
    assert res.exit_code == 2, res.stdout
    assert f"models.teacher.checkpoint: {ckpt}: {sentence}" in res.stderr
    assert "arbitrary code" not in res.stderr  # only a pickle that names Python objects would run code
    assert not made


# ---------------------------------------------------------------- 3. ONNX teachers that cannot be the teacher
def _garbage(p: Path) -> None:
    p.write_bytes(random.Random(1).randbytes(2048))


def _truncated_onnx(p: Path) -> None:
    tiny_onnx(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("make, sentence", [
    (_truncated_onnx, "not a readable ONNX model"),
    (_garbage, "not a readable ONNX model"),
    (lambda p: p.write_bytes(b""), "not a usable ONNX model"),
    (lambda p: tiny_onnx(p, in_shape=("N", 3, 8, 8)), "the data needs one input of shape [batch, 1, 8, 8]"),
    (lambda p: tiny_onnx(p, in_shape=(1, 1, 8, 8)), "with a dynamic batch axis"),
    (lambda p: tiny_onnx(p, classes=7), "gives (2, 7) for a batch of 2, and the data has 10 classes"),
    (lambda p: tiny_onnx(p, scale=float("inf")), "gives NaN or infinite scores"),
], ids=["truncated", "garbage", "empty", "wrong-channels", "fixed-batch", "wrong-classes", "inf-weights"])
def test_a_bad_onnx_teacher_exits_2_at_load(tmp_path, make, sentence):
    make(tmp_path / "teacher.onnx")
    res, made = run_cli(tmp_path, "--recipe", str(write_recipe(tmp_path, teacher__onnx="teacher.onnx")))
    assert res.exit_code == 2, res.stdout
    assert f"models.teacher.onnx: {tmp_path / 'teacher.onnx'}: " in res.stderr and sentence in res.stderr
    assert not made


@pytest.mark.parametrize("location, sentence", [
    ("/etc/passwd", "outside the model's folder"),
    ("../../etc/passwd", "outside the model's folder"),
    ("/dev/zero", "outside the model's folder"),
    ("link.data", "outside the model's folder"),   # a symlink inside the folder that points out of it
    ("sub", "not a regular file"),                  # a folder beside the model
    ("fifo.data", "not a regular file"),            # a named pipe: reading it would block forever
])
def test_onnx_external_data_must_be_a_file_beside_the_model(tmp_path, location, sentence):
    folder = tmp_path / "teacher"
    folder.mkdir()
    model_path = tiny_onnx(folder / "teacher.onnx", external=True)
    (folder / "link.data").symlink_to("/etc/hostname")
    (folder / "sub").mkdir()
    import os
    os.mkfifo(folder / "fifo.data")
    model = onnx.load(str(model_path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    model_path.write_bytes(model.SerializeToString())
    res, made = run_cli(tmp_path, "--recipe", str(write_recipe(tmp_path, teacher__onnx="teacher/teacher.onnx")))
    assert res.exit_code == 2, res.stdout
    assert f"initializer 'W' keeps its weights" in res.stderr and f"'{location}'" in res.stderr
    assert sentence in res.stderr
    assert not made, "refused before any stage copied the file"


def test_an_onnx_teacher_with_its_weights_beside_it_passes_the_check(tmp_path):
    tiny_onnx(tmp_path / "teacher.onnx", external=True)
    res = runner.invoke(app, ["check", "--recipe", str(write_recipe(tmp_path, teacher__onnx="teacher.onnx"))])
    assert res.exit_code == 0, res.stdout
    assert "ok    models.teacher: ONNX teacher.onnx" in res.stdout
    assert "ok    teacher on a batch: a batch of 16 real images gives (16, 10) finite scores" in res.stdout


# ---------------------------------------------------------------- 4. names, overrides, model kwargs
@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "-rf", "x y", "", "n" * 65])
def test_a_recipe_name_unsafe_as_a_file_name_exits_2(tmp_path, name):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["name"] = name
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    res, made = run_cli(tmp_path, "--recipe", str(tmp_path / "r.yaml"))
    assert res.exit_code == 2
    assert "name: Value error, it names the run directory" in res.stderr
    assert not made


def test_a_typo_in_a_profile_override_names_the_profile_file(tmp_path):
    prof = yaml.safe_load(Path("profiles/edge-cpu.yaml").read_text())
    prof["overrides"]["quantize"]["preest"] = "ort-cpu"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(prof))
    res, made = run_cli(tmp_path, "--profile", str(tmp_path / "p.yaml"))
    assert res.exit_code == 2
    assert f"{tmp_path / 'p.yaml'}: 1 invalid setting(s):" in res.stderr
    assert "overrides.quantize.preest: unknown key" in res.stderr
    assert str(DEFAULT_RECIPE) not in res.stderr  # the recipe is fine: do not send the reader there
    assert not made


def test_bad_student_kwargs_are_found_at_load_before_the_teacher_trains(tmp_path):
    res, made = run_cli(tmp_path, "--recipe", str(write_recipe(tmp_path, student__kwargs={"nonsense": 1})))
    assert res.exit_code == 2
    assert "models.student.kwargs: arch 'mlp' with kwargs {'nonsense': 1} fails (TypeError:" in res.stderr
    assert not made


def test_a_student_factory_with_the_wrong_class_count_is_found_at_load(tmp_path):
    res, made = run_cli(tmp_path, "--recipe", str(write_recipe(tmp_path, student__arch="tests.train.test_models:tiny_net",
                                                               student__kwargs={})))
    assert res.exit_code == 2
    assert "models.student: the model gives (2, 3) for a batch of 2, and the data needs (2, 10)" in res.stderr
    assert not made
