"""Models a recipe can name: torchvision by name, pkg.module:factory with a checkpoint, clear refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelSpec
from pipeline.errors import ConfigError
from pipeline.train import models


def tiny_net(width: int = 4, num_classes: int = 3) -> nn.Module:
    """A user's own factory, named in a recipe as tests.train.test_models:tiny_net."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def test_torchvision_by_name_adapts_classes_channels_and_width():
    full = models.build(ModelSpec(arch="mobilenet_v3_small"), in_channels=1, num_classes=7, image_size=32)
    half = models.build(ModelSpec(arch="mobilenet_v3_small", kwargs={"width_mult": 0.5}), 1, 7, 32)
    assert half(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert sum(p.numel() for p in half.parameters()) < 0.6 * sum(p.numel() for p in full.parameters())
    rgb = models.build(ModelSpec(arch="shufflenet_v2_x0_5"), 3, 5, 32)
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_bad_arch_or_kwargs_is_a_config_error_that_says_what_to_do():
    with pytest.raises(ConfigError, match="not 'cnn', 'mlp', 'resnet'"):
        models.build(ModelSpec(arch="resnet1"), 1, 10, 8)
    with pytest.raises(ConfigError, match="width_mult"):
        models.build(ModelSpec(arch="resnet18", kwargs={"width_mult": 0.5}), 1, 10, 8)
    with pytest.raises(ConfigError, match="cannot import"):
        models.build(ModelSpec(arch="tests.train.test_models:no_such_factory"), 1, 10, 8)


def test_factory_with_kwargs_loads_a_ddp_prefixed_state_dict_checkpoint(tmp_path):
    src = tiny_net(width=6)
    ckpt = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, ckpt)
    spec = ModelSpec(arch="tests.train.test_models:tiny_net", kwargs={"width": 6}, checkpoint=ckpt)
    got = models.build(spec, 1, 3, 8)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(got(x), src(x))
    torch.save(src.state_dict(), ckpt)  # a bare state_dict loads too
    assert torch.equal(models.build(spec, 1, 3, 8)(x), src(x))


def test_a_pickled_module_is_refused_with_how_to_convert(tmp_path):
    ckpt = tmp_path / "whole.pt"
    torch.save(tiny_net(), ckpt)  # the whole module: loading it would unpickle (run) arbitrary code
    with pytest.raises(ConfigError, match=r"refused.*torch\.save\(torch\.load\(p, weights_only=False\)\.state_dict"):
        models.load_checkpoint(tiny_net(), ckpt)


def test_a_mismatched_checkpoint_lists_the_first_mismatching_keys(tmp_path):
    ckpt = tmp_path / "w.pt"
    torch.save(tiny_net(width=8).state_dict(), ckpt)
    with pytest.raises(ConfigError, match=r"shape mismatch: 0\.weight: checkpoint \(8, 1, 3, 3\) vs model "
                                          r"\(4, 1, 3, 3\)"):
        models.load_checkpoint(tiny_net(width=4), ckpt)
    state = tiny_net().state_dict()
    state["extra.weight"] = state.pop("4.bias")
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match=r"missing from checkpoint: 4\.bias \| not in model: extra\.weight"):
        models.load_checkpoint(tiny_net(), ckpt)


def test_mlp_flattens_any_input_and_its_hidden_layers_prune_and_export(tmp_path):
    from stages import prune
    from stages._common import torch2onnx
    mlp = models.build(ModelSpec(arch="mlp", kwargs={"hidden": [32, 16]}), 3, 5, 4)
    assert mlp(torch.randn(2, 3, 4, 4)).shape == (2, 5)
    assert models.count(mlp, (3, 4, 4))[0] == (48 * 32 + 32) + (32 * 16 + 16) + (16 * 5 + 5)
    prune.prune_model(mlp, prune.Config(ratio=0.5, round_to=None), (3, 4, 4))
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [16, 8, 5]  # classes kept
    torch2onnx(mlp, tmp_path / "mlp.onnx", (3, 4, 4), 18)
    assert (tmp_path / "mlp.onnx").stat().st_size > 0


def _without_num_batches_tracked(state: dict) -> dict:
    for k in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[k]
    return state


def test_a_checkpoint_from_before_num_batches_tracked_loads_by_pytorchs_rules(tmp_path):
    # The layout of akamaster/pytorch_resnet_cifar10's resnet56.th: DataParallel keys, no num_batches_tracked
    # (saved before PyTorch 0.4.1), inside {'state_dict': ..., 'best_prec1': ...}.
    src = models.build(ModelSpec(arch="resnet", kwargs={"widths": [8, 16], "blocks": [1, 1]}), 3, 10, 8).eval()
    state = _without_num_batches_tracked(src.state_dict())
    assert not any("num_batches_tracked" in k for k in state) and any(".running_mean" in k for k in state)
    ckpt = tmp_path / "resnet.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 93.39}, ckpt)
    spec = ModelSpec(arch="resnet", kwargs={"widths": [8, 16], "blocks": [1, 1]}, checkpoint=ckpt)
    got = models.build(spec, 3, 10, 8).eval()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(got(x), src(x))
    assert int(got.stem[1].num_batches_tracked) == 0  # filled by BatchNorm's _load_from_state_dict
    models.probe(spec, 3, 10, 8)  # the load-time check takes it too


def test_a_real_mismatch_lists_missing_unexpected_and_wrongly_shaped_keys(tmp_path):
    state = _without_num_batches_tracked(tiny_net(width=8).state_dict())  # filled: not reported as missing
    state["extra.weight"] = state.pop("4.bias")
    ckpt = tmp_path / "w.pt"
    torch.save(state, ckpt)
    with pytest.raises(ConfigError) as e:
        models.load_checkpoint(tiny_net(width=4), ckpt)
    assert (f"{ckpt}: does not fit the model architecture (missing from checkpoint: 4.bias | not in model: "
            f"extra.weight | shape mismatch: 0.weight: checkpoint (8, 1, 3, 3) vs model (4, 1, 3, 3); ") in str(e.value)


@pytest.mark.parametrize("payload, sentence", [
    (b"", "is empty (0 bytes)"),
    (b"hello, not a checkpoint\n", "cannot be read as a PyTorch checkpoint (24 bytes"),
    (bytes(range(256)) * 8, "cannot be read as a PyTorch checkpoint (2,048 bytes"),
    (__import__("pickle").dumps({"a": 1}), "cannot be read as a PyTorch checkpoint"),  # a pickle, but no globals
], ids=["empty", "text", "bytes", "plain-pickle"])
def test_bytes_that_are_not_a_checkpoint_are_named_as_such_not_as_code(tmp_path, payload, sentence):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(payload)
    with pytest.raises(ConfigError) as e:
        models.load_checkpoint(tiny_net(), ckpt)
    assert str(e.value).startswith(f"{ckpt}: {sentence}") and "arbitrary code" not in str(e.value)


def test_a_plain_pickle_naming_a_class_is_refused_as_code(tmp_path):
    import pickle
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(pickle.dumps({"0.weight": nn.ReLU()}))
    with pytest.raises(ConfigError, match=r"names the Python object torch\.nn\.modules\.activation\.ReLU, and "
                                          r"loading it would run arbitrary code"):
        models.load_checkpoint(tiny_net(), ckpt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    state = tiny_net().state_dict()
    state["4.weight"][1, 2] = bad
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"weights 4\.weight are not finite"):
        models.load_checkpoint(tiny_net(), tmp_path / "w.pt")


def test_a_state_dict_with_non_tensor_entries_is_refused(tmp_path):
    torch.save({"epoch": 3, "model": tiny_net().state_dict()}, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"'epoch' \(int\), 'model' \(OrderedDict\) is not a named tensor"):
        models.load_checkpoint(tiny_net(), tmp_path / "w.pt")


def test_probe_finds_bad_kwargs_and_head_size_without_moving_the_seeded_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    models.probe(ModelSpec(arch="resnet18"), 1, 10, 32)
    assert torch.equal(torch.rand(3), expected), "a load-time check must not shift the run's random draws"
    with pytest.raises(ConfigError, match=r"^models\.student\.kwargs: arch 'mlp' with kwargs \{'nonsense': 1\} "
                                          r"fails \(TypeError: "):
        models.probe(ModelSpec(arch="mlp", kwargs={"nonsense": 1}), 1, 10, 8, field="models.student")
    with pytest.raises(ConfigError, match=r"the model gives \(2, 3\) for a batch of 2, and the data needs \(2, 10\)"):
        models.probe(ModelSpec(arch="tests.train.test_models:tiny_net"), 1, 10, 8)
    with pytest.raises(ConfigError, match=r"fails on a batch of shape \(2, 3, 8, 8\)"):
        models.probe(ModelSpec(arch="tests.train.test_models:tiny_net"), 3, 3, 8)  # a 1-channel first conv


def test_probe_of_large_inputs_runs_on_meta_tensors_and_still_checks_the_head(tmp_path):
    big = models.probe(ModelSpec(arch="resnet18"), 3, 10, models.PROBE_MAX_SIZE * 2)
    assert next(big.parameters()).is_meta  # no memory taken, no compute done
    with pytest.raises(ConfigError, match=r"the model gives \(2, 3\) for a batch of 2, and the data needs \(2, 10\)"):
        models.probe(ModelSpec(arch="tests.train.test_models:tiny_net"), 1, 10, models.PROBE_MAX_SIZE * 2)
    state = tiny_net().state_dict()
    state["4.weight"] = torch.zeros(5, 4)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"shape mismatch: 4\.weight: checkpoint \(5, 4\) vs model \(3, 4\)"):
        models.probe(ModelSpec(arch="tests.train.test_models:tiny_net", checkpoint=tmp_path / "w.pt"), 1, 3,
                     models.PROBE_MAX_SIZE * 2)
