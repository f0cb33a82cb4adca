"""Models a recipe can name, checkpoint loading, saving artifacts, and counting params and MACs.

`arch` is one of: `cnn` (a small conv net for small images), `resnet` (a narrow ResNet-style net),
a torchvision architecture by name (`resnet18`, `mobilenet_v3_small`, ...), or `pkg.module:factory`.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelSpec
from pipeline.errors import ConfigError


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU blocks, 2x2 max-pool after each while the map is larger than 2x2, global average pool."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, channels: list[int] = (16, 32),
                 hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for width in channels:
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if size > 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(c, hidden), nn.ReLU(inplace=True)]
            c = hidden
        if dropout:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(c, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class SmallMLP(nn.Module):
    """Flatten, then Linear-ReLU layers: for small images (8x8 digits) a fully connected student is cheaper per
    inference than a CNN of the same accuracy, and it is the student soft targets help most (Hinton et al. 2015
    distilled an MLP on MNIST)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, hidden: list[int] = (64,),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        c = in_channels * image_size * image_size
        for width in hidden:
            layers += [nn.Linear(c, width), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class NarrowResNet(nn.Module):
    """ResNet-style net with configurable widths (torchvision's BasicBlock), a 3x3 stem for small images."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, widths: list[int] = (16, 32, 64, 128),
                 blocks: list[int] = (1, 1, 1, 1)):
        super().__init__()
        from torchvision.models.resnet import BasicBlock
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c != w:
                down = nn.Sequential(nn.Conv2d(c, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
            layer = [BasicBlock(c, w, stride, down)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layer))
            c = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """torchvision nets expect 3 channels; rebuild the first conv for grayscale (or any) input."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups, mod.bias is not None)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return


def build(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A model from its spec, with the checkpoint loaded when the spec names one."""
    kw = dict(spec.kwargs)
    try:
        if spec.arch == "cnn":
            model: nn.Module = SmallCNN(in_channels, num_classes, image_size, **kw)
        elif spec.arch == "mlp":
            model = SmallMLP(in_channels, num_classes, image_size, **kw)
        elif spec.arch == "resnet":
            model = NarrowResNet(in_channels, num_classes, image_size, **kw)
        elif ":" in spec.arch:
            model = _factory(spec.arch)(**kw)
        else:
            model = _torchvision(spec.arch, in_channels, num_classes, kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"models: arch '{spec.arch}' with kwargs {kw}: {e}. Fix models.*.kwargs; for torchvision "
                          f"nets width is `width_mult` (mobilenet_v2, mobilenet_v3_*) or a sized variant "
                          f"(resnet18..152, efficientnet_b0..b7, shufflenet_v2_x0_5..x2_0, mnasnet0_5..1_3).") from None
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model


def _factory(arch: str):
    mod_name, _, fn_name = arch.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"models: arch '{arch}': cannot import ({e}). The module must be importable "
                          f"from the working directory or an installed package.") from None


def _torchvision(arch: str, in_channels: int, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    """A torchvision net, random init, num_classes outputs, first conv rebuilt for in_channels."""
    import torchvision
    if arch not in torchvision.models.list_models():
        raise ConfigError(f"models: arch '{arch}' is not 'cnn', 'mlp', 'resnet', 'pkg.module:factory' or a "
                          f"torchvision model (e.g. resnet18, mobilenet_v3_small, efficientnet_b0).")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
    _adapt_first_conv(model, in_channels)
    return model


def load_checkpoint(model: nn.Module, path: Path) -> None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"{path}: refused: the checkpoint holds Python objects beyond tensors, and loading it would run "
            f"arbitrary code (torch.load weights_only=True said: {str(e).splitlines()[0]}). Convert it where you "
            f"trust it: `torch.save(torch.load(p, weights_only=False).state_dict(), 'weights.pt')`.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a state_dict (or {{'state_dict': ...}}), found {type(obj).__name__}.")
    state = {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel/DDP prefix
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing from checkpoint: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"not in model: {', '.join(unexpected[:5])}")
        if shape:
            parts.append(f"shape mismatch: {'; '.join(shape[:5])}")
        raise ConfigError(f"{path}: does not fit the model architecture ({' | '.join(parts)}). Check models.*.arch "
                          f"and kwargs against the checkpoint.")
    model.load_state_dict(state)


def save(model: nn.Module, path: Path, spec: dict[str, Any] | None, whole: bool = False) -> None:
    """Save a state_dict with the spec that rebuilds it, or the whole module when pruning changed its shape."""
    model = model.module if hasattr(model, "module") else model
    tmp = path.with_suffix(".tmp")
    if whole:
        torch.save(model, tmp)
    else:
        torch.save({"spec": spec, "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)


def load(path: Path, meta: dict[str, Any]) -> nn.Module:
    """Load a model artifact of this run; its sha256 was checked by the runner before any stage uses it."""
    if meta.get("format") == "module":
        # Our own artifact, hash-checked in run.json: a pruned module cannot be rebuilt from a state_dict.
        model = torch.load(path, map_location="cpu", weights_only=False)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        s = meta["build"]
        model = build(ModelSpec.model_validate(obj["spec"]), s["in_channels"], s["num_classes"], s["image_size"])
        model.load_state_dict(obj["state_dict"])
    return model.eval()


def count(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(params, MACs) at batch 1, counted by torch-pruning's op counter, not estimated."""
    import torch_pruning as tp
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, *input_shape))
    model.train(was_training)
    return int(params), int(macs)


class OnnxModule(nn.Module):
    """A frozen ONNX model run through onnxruntime on CPU, callable like a module (for ONNX teachers)."""

    def __init__(self, path: Path):
        super().__init__()
        from pipeline.device.ortbench import CPU, open_session
        self.path = Path(path)
        self.sess = open_session(self.path, CPU, threads=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pipeline.device.ortbench import feed
        return torch.from_numpy(self.sess.run(None, feed(self.sess, x.detach().cpu().numpy()))[0]).float()

