"""prune: channels really removed (counted), the pruned module saved whole, exported, matching PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from rich.console import Console
from torch import nn

from pipeline.config import ModelSpec, load_profile
from pipeline.context import Context
from pipeline.device.ortbench import CPU, logits, open_session
from pipeline.errors import StageError
from pipeline.train import models
from pipeline.train.loop import TrainConfig, accuracy, fit, predict
from stages import prune
from stages._common import build_info, model_artifact, torch2onnx
from tests.conftest import fast_recipe

STUDENT = ModelSpec(arch="resnet", kwargs={"widths": [16, 32], "blocks": [1, 1]})
TEACHER = ModelSpec(arch="cnn", kwargs={"channels": [32, 64]})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Context, dict]:
    """A run directory holding a trained teacher.pt and student.pt on the 8x8 digits (seconds on a CPU)."""
    profile = load_profile("edge-cpu")
    recipe = fast_recipe(profile, prune={"enabled": True, "epochs": 8, "lr": 0.01})
    ctx = Context(run_dir=tmp_path_factory.mktemp("run"), recipe=recipe, profile=profile, console=Console(quiet=True))
    d = ctx.data()
    cfg, inputs = TrainConfig(epochs=8, lr=0.01), {}
    for name, spec in (("teacher", TEACHER), ("student", STUDENT)):
        m = models.build(spec, *build_info(d))
        fit(m, lambda m, x, y, _: F.cross_entropy(m(x), y), d.train, d.val, cfg, seed=0,
            desc=name)
        inputs[f"{name}.pt"] = model_artifact(ctx, m, f"{name}.pt", name, spec,
                                              test_acc=accuracy(m, d.test))
    return ctx, inputs


@pytest.fixture(scope="module")
def ctx(trained) -> Context:
    return trained[0]


@pytest.fixture(scope="module")
def pruned(trained):
    ctx, inputs = trained
    return inputs, prune.run(dict(inputs), ctx.recipe.prune, ctx)


def test_pruning_removes_channels_and_counts_fewer_params_and_macs():
    model = models.NarrowResNet(1, 10, 8, widths=[16, 32], blocks=[1, 1])
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    params0, macs0 = models.count(model, (1, 8, 8))
    prune.prune_model(model, prune.Config(ratio=0.5, round_to=8), (1, 8, 8))
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    params1, macs1 = models.count(model, (1, 8, 8))
    assert all(after[n] == before[n] // 2 for n in before), (before, after)
    assert all(c % 8 == 0 for c in after.values())
    assert model.fc.out_features == 10 and model.fc.in_features == 16  # classifier kept, its input pruned
    assert params1 < 0.4 * params0 and macs1 < 0.4 * macs0  # ~4x: both in and out channels halved
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_per_layer_ratio_and_ignored_layers():
    model = models.NarrowResNet(1, 10, 8, widths=[16, 32], blocks=[1, 1])
    cfg = prune.Config(ratio=0.5, round_to=None, layer_ratios={"layers.1": 0.25}, ignored_layers=["fc", "stem"])
    prune.prune_model(model, cfg, (1, 8, 8))
    assert model.stem[0].out_channels == 16  # ignored: its residual group stays whole
    assert model.layers[1][0].conv1.out_channels == 24  # 32 * (1 - 0.25)


def test_stage_saves_whole_pruned_module_with_counted_meta(ctx, pruned):
    inputs, out = pruned
    art = out["student-pruned.pt"]
    meta, res = art.meta, ctx.results["prune"]
    assert meta["format"] == "module" and meta["predecessor"] == "student.pt"
    assert meta["params"] < meta["params_before"] == inputs["student.pt"].meta["params"]
    assert meta["macs"] < meta["macs_before"] == inputs["student.pt"].meta["macs"]
    model = models.load(ctx.path(art.name), meta)  # whole module: loads without the original class shape
    assert models.count(model, ctx.data().input_shape) == (meta["params"], meta["macs"])
    d = ctx.data()
    assert accuracy(model, d.test) == pytest.approx(res["acc_after_finetune"])
    # fine-tuning with the teacher brings it back within a few points of the unpruned student
    assert res["acc_after_finetune"] >= res["acc_before"] - 0.05, res


def test_pruned_model_exports_and_matches_pytorch(ctx, pruned, tmp_path):
    _, out = pruned
    model = models.load(ctx.path("student-pruned.pt"), out["student-pruned.pt"].meta)
    path = tmp_path / "student-pruned.onnx"
    torch2onnx(model, path, ctx.data().input_shape, 18)
    x, _ = ctx.data().test.arrays(limit=64)
    got, want = logits(open_session(path, CPU, threads=1), x), predict(model, x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_ratio_outside_open_interval_is_refused():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValidationError, match="ratio"):
            prune.Config(ratio=bad)
    with pytest.raises(ValidationError, match="layer_ratios"):
        prune.Config(layer_ratios={"layers.0": 1.0})


def test_untraceable_model_is_a_stage_error():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 16, 3), nn.Linear(16, 10)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            _ = h.numpy()  # leaves the autograd graph: Torch-Pruning cannot follow it
            return self.fc(h)

    with pytest.raises(StageError, match=r"prune: torch-pruning could not trace.*ignored_layers"):
        prune.prune_model(Untraceable(), prune.Config(), (1, 8, 8))


def test_unknown_layer_name_is_a_stage_error():
    model = models.NarrowResNet(1, 10, 8, widths=[16, 32], blocks=[1, 1])
    with pytest.raises(StageError, match=r"prune.ignored_layers: no module 'classifier'"):
        prune.prune_model(model, prune.Config(ignored_layers=["classifier"]), (1, 8, 8))
