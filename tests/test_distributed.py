"""Teacher and distill under torchrun: 2 gloo ranks on this machine against one process on the same recipe."""
from __future__ import annotations

import json

import pytest
import yaml
from rich.console import Console

from pipeline.config import DEFAULT_RECIPE, load_profile, recipe_model
from pipeline.context import Context
from stages import distill, teacher

TOLERANCE = 0.03  # test accuracy, absolute: BatchNorm statistics are per rank on CPU (see pipeline/distributed.py)


def _recipe():
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["models"] = {"teacher": {"arch": "cnn", "kwargs": {"channels": [16, 32]}},
                      "student": {"arch": "cnn", "kwargs": {"channels": [8, 16]}}}
    data["teacher"] = {"epochs": 4, "lr": 0.01}
    data["distill"] = {"epochs": 4, "lr": 0.01}
    return recipe_model().model_validate(data)


def _run_dir(path, recipe, profile, stages: dict) -> None:
    """What the runner leaves before a stage: recipe.json, profile.json, run.json with the earlier outputs."""
    path.mkdir()
    (path / "recipe.json").write_text(recipe.model_dump_json())
    (path / "profile.json").write_text(profile.model_dump_json())
    (path / "run.json").write_text(json.dumps({"stages": stages}))


@pytest.mark.timeout(240)
def test_two_gloo_ranks_match_one_process_and_only_rank_0_writes(tmp_path):
    pytest.importorskip("torch.distributed").is_available() or pytest.skip("torch built without distributed")
    from pipeline.distributed import result_path, run_stage_distributed
    recipe, profile = _recipe(), load_profile("edge-cpu")
    # one process
    single = Context(run_dir=tmp_path, recipe=recipe, profile=profile, console=Console(quiet=True))
    t_out = teacher.run({}, recipe.teacher, single)
    distill.run(t_out, recipe.distill, single)
    # two ranks: teacher, then distill from the DDP teacher's outputs as run.json records them
    ddp = tmp_path / "ddp"
    _run_dir(ddp, recipe, profile, {})
    outputs, results = run_stage_distributed(ddp, "teacher", 2, quiet=True)
    assert set(outputs) == {"teacher.pt"} and (ddp / "teacher.pt").exists()
    assert json.loads(result_path(ddp, "teacher").read_text())["world_size"] == 2
    assert results["test_acc"] == pytest.approx(single.results["teacher"]["test_acc"], abs=TOLERANCE)
    record = {"teacher": {"status": "ok", "outputs": {k: a.model_dump(mode="json") for k, a in outputs.items()}}}
    (ddp / "run.json").write_text(json.dumps({"stages": record}))
    outputs, results = run_stage_distributed(ddp, "distill", 2, quiet=True)
    assert set(outputs) == {"student.pt", "student-scratch.pt"}
    for key in ("acc_kd", "acc_scratch"):
        assert results[key] == pytest.approx(single.results["distill"][key], abs=TOLERANCE), key
    written = {p.name for p in ddp.iterdir()}
    assert written == {"recipe.json", "profile.json", "run.json", "splits.json", "teacher.pt", "student.pt",
                       "student-scratch.pt", ".teacher.distributed.json", ".distill.distributed.json",
                       ".checkpoints"}  # rank 0's per-epoch checkpoints (the runner removes them after the stage)
    assert len(list((ddp / ".checkpoints").rglob("*.pt"))) == 3  # one per fit: teacher, KD student, scratch


def test_a_stage_error_on_the_ranks_comes_back_as_the_same_error(tmp_path):
    from pipeline.distributed import run_stage_distributed
    from pipeline.errors import StageError
    recipe = _recipe()
    recipe.distill.method = "ensemble"  # no extra teachers: the stage refuses before training
    _run_dir(tmp_path / "run", recipe, load_profile("edge-cpu"), {})
    with pytest.raises(StageError, match="needs more than one teacher"):
        run_stage_distributed(tmp_path / "run", "distill", 2, quiet=True)


def test_model_artifact_writes_on_rank_0_only(tmp_path, monkeypatch):
    import torch

    from stages._common import model_artifact
    recipe = _recipe()
    ctx = Context(run_dir=tmp_path, recipe=recipe, profile=load_profile("edge-cpu"), console=Console(quiet=True))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    monkeypatch.setenv("RANK", "1")
    art = model_artifact(ctx, model, "m.pt", "student", None)
    assert art.meta["params"] == 650 and not (tmp_path / "m.pt").exists()
    monkeypatch.setenv("RANK", "0")
    model_artifact(ctx, model, "m.pt", "student", None)
    assert (tmp_path / "m.pt").exists()


@pytest.mark.timeout(300)
def test_two_ranks_stream_an_imagefolder_through_a_torchrun_rendezvous(tmp_path, monkeypatch):
    """Each rank reads its part of every batch from disk with its own DataLoader workers; the launch goes
    through PIPELINE_TORCHRUN_ARGS (a c10d rendezvous, as across machines) instead of --standalone."""
    from pipeline.distributed import result_path, run_stage_distributed
    from tests.train.test_data import _digits_pngs
    _digits_pngs(tmp_path / "images", {"train": 14, "test": 4})
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["data"] = {"kind": "imagefolder", "root": str(tmp_path / "images"), "image_size": 8, "channels": 1,
                    "workers": 1}
    data["models"] = {"teacher": {"arch": "mlp", "kwargs": {"hidden": [64]}}, "student": {"arch": "mlp"}}
    data["teacher"] = {"epochs": 6, "lr": 0.01, "batch_size": 32}
    recipe, profile = recipe_model().model_validate(data), load_profile("edge-cpu")
    single = Context(run_dir=tmp_path, recipe=recipe, profile=profile, console=Console(quiet=True))
    teacher.run({}, recipe.teacher, single)
    _run_dir(tmp_path / "ddp", recipe, profile, {})
    monkeypatch.setenv("PIPELINE_TORCHRUN_ARGS", "--nnodes 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 "
                                                 "--rdzv-id streamed")
    outputs, results = run_stage_distributed(tmp_path / "ddp", "teacher", 2, quiet=True)
    assert set(outputs) == {"teacher.pt"}
    assert json.loads(result_path(tmp_path / "ddp", "teacher").read_text())["world_size"] == 2
    assert results["test_acc"] == pytest.approx(single.results["teacher"]["test_acc"], abs=0.1)
