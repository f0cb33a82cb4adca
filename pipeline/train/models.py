"""Models a recipe can name, checkpoint loading, saving artifacts, and counting params and MACs.

`arch` is one of: `cnn` (a small conv net for small images), `mlp` (fully connected: the default student),
`resnet` (a narrow ResNet-style net),
a torchvision architecture by name (`resnet18`, `mobilenet_v3_small`, ...), or `pkg.module:factory`.
"""
from __future__ import annotations

import importlib
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.artifacts import atomic_target
from pipeline.config import ModelSpec
from pipeline.errors import ConfigError, first_line


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


def build(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int, *, field: str = "models"
          ) -> nn.Module:
    """A model from its spec, with the checkpoint loaded when the spec names one; `field` names it in errors."""
    kw = dict(spec.kwargs)
    try:
        if spec.arch == "cnn":
            model: nn.Module = SmallCNN(in_channels, num_classes, image_size, **kw)
        elif spec.arch == "mlp":
            model = SmallMLP(in_channels, num_classes, image_size, **kw)
        elif spec.arch == "resnet":
            model = NarrowResNet(in_channels, num_classes, image_size, **kw)
        elif ":" in spec.arch:
            model = _factory(spec.arch, field)(**kw)
        else:
            model = _torchvision(spec.arch, in_channels, num_classes, kw, field)
    except ConfigError:
        raise
    except Exception as e:  # the recipe's kwargs reach a constructor: TypeError, ValueError, RuntimeError (a size)
        raise ConfigError(f"{field}.kwargs: arch '{spec.arch}' with kwargs {kw} fails ({first_line(e)}). Fix "
                          f"{field}.kwargs; for torchvision nets width is `width_mult` (mobilenet_v2, "
                          f"mobilenet_v3_*) or a sized variant (resnet18..152, efficientnet_b0..b7, "
                          f"shufflenet_v2_x0_5..x2_0, mnasnet0_5..1_3).") from None
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model


PROBE_MAX_PARAMS = 50_000_000  # above this, or above PROBE_MAX_SIZE, the load-time forward runs on meta tensors
PROBE_MAX_SIZE = 256           # (no memory, no compute; its first call costs a few seconds of imports)


def probe(spec: ModelSpec, in_channels: int, num_classes: int | None, image_size: int, *,
          field: str = "models") -> nn.Module:
    """Build a spec without initialising it, run a batch of 2 through it for its output size, and load its
    checkpoint: bad kwargs, a wrong class count or a checkpoint that does not fit fail at recipe load, in a second."""
    # built on the meta device: no init time, and no draw from the seeded RNG
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build(spec.model_copy(update={"checkpoint": None}), in_channels, num_classes or 2, image_size,
                      field=field).eval()
    small = image_size <= PROBE_MAX_SIZE and sum(p.numel() for p in model.parameters()) <= PROBE_MAX_PARAMS
    if small:  # uninitialised memory is enough for shapes, and a small CPU forward beats meta's first call
        model = model.to_empty(device="cpu")
    x = torch.zeros(2, in_channels, image_size, image_size, device="cpu" if small else "meta")
    try:
        with torch.no_grad():
            y = model(x)
    except NotImplementedError:  # an op without a meta kernel: `pipeline check` runs real data through it
        y = None
    except Exception as e:
        raise ConfigError(f"{field}: arch '{spec.arch}' fails on a batch of shape {tuple(x.shape)} "
                          f"({first_line(e)}). Check {field}.arch and kwargs against data.channels and "
                          f"data.image_size.") from None
    if y is not None:
        _check_output(y, field, num_classes)
    if spec.checkpoint is not None:
        try:
            load_checkpoint(model, spec.checkpoint)
        except ConfigError as e:
            raise ConfigError(f"{field}.checkpoint: {e}") from None
    return model


def _check_output(y: Any, field: str, num_classes: int | None) -> None:
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or (num_classes is not None and y.shape[1] != num_classes):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"{field}: the model gives {got} for a batch of 2, and the data needs (2, {num_classes}) "
                          f"(one score per class). Give a factory that takes the class count, or fix its head.")


def _factory(arch: str, field: str):
    mod_name, _, fn_name = arch.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, ValueError) as e:  # ValueError: an empty module name
        raise ConfigError(f"{field}.arch: '{arch}': cannot import ({e}). The module must be importable "
                          f"from the working directory or an installed package.") from None


def _torchvision(arch: str, in_channels: int, num_classes: int, kw: dict[str, Any], field: str) -> nn.Module:
    """A torchvision net, random init, num_classes outputs, first conv rebuilt for in_channels."""
    import torchvision
    if arch not in torchvision.models.list_models():
        raise ConfigError(f"{field}.arch: '{arch}' is not 'cnn', 'mlp', 'resnet', 'pkg.module:factory' or a "
                          f"torchvision model (e.g. resnet18, mobilenet_v3_small, efficientnet_b0).")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
    _adapt_first_conv(model, in_channels)
    return model


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state_dict by the rules of load_state_dict(strict=True); refuse unreadable files and non-finite weights.

    PyTorch's rules decide what is missing: BatchNorm fills the `num_batches_tracked` that checkpoints from before
    PyTorch 0.4.1 lack (e.g. the CIFAR ResNet-56 of akamaster/pytorch_resnet_cifar10). When this raises, the
    model may be partly loaded; callers discard it.
    """
    path = Path(path)
    obj = _read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"{path}: expected a state_dict (or {{'state_dict': ...}}), found "
                          f"{'an empty dict' if obj == {} else type(obj).__name__}. Save model.state_dict().")
    odd = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(k, str)
           or not isinstance(v, torch.Tensor)]
    if odd:
        raise ConfigError(f"{path}: expected a state_dict (names to tensors, or {{'state_dict': ...}}), and "
                          f"{', '.join(odd[:5])} is not a named tensor. Save model.state_dict().")
    # A new dict drops the DDP prefix and the file's _metadata versions: the keys alone decide, as for any plain
    # dict (BatchNorm reads a missing version as pre-0.4.1 and fills num_batches_tracked).
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(v.isfinite().all())]
    if bad:
        raise ConfigError(f"{path}: weights {', '.join(bad[:5])} are not finite (NaN or infinity: a diverged or "
                          f"corrupt run); use an earlier checkpoint.")
    own = model.state_dict()
    shape = {k: f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)}
    meta = any(t.is_meta for t in own.values())  # probe() of a large model: take the tensors as they are
    try:
        got = model.load_state_dict({k: v for k, v in state.items() if k not in shape}, strict=False, assign=meta)
    except RuntimeError as e:  # e.g. a complex tensor for a real parameter
        raise ConfigError(f"{path}: does not load into the model ({first_line(e)}).") from None
    missing = [k for k in got.missing_keys if k not in shape]
    if missing or got.unexpected_keys or shape:
        parts = []
        if missing:
            parts.append(f"missing from checkpoint: {', '.join(missing[:5])}")
        if got.unexpected_keys:
            parts.append(f"not in model: {', '.join(got.unexpected_keys[:5])}")
        if shape:
            parts.append(f"shape mismatch: {'; '.join(list(shape.values())[:5])}")
        raise ConfigError(f"{path}: does not fit the model architecture ({' | '.join(parts)}). Check models.*.arch "
                          f"and kwargs against the checkpoint.")


def _read_checkpoint(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # bad bytes surface as RuntimeError, EOFError, KeyError, IndexError, UnpicklingError
        # torch's weights-only unpickler names the global it refused; a plain pickle is read by us
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        found = named.group(1) if named else _pickled_global(path)
        if found:
            raise ConfigError(
                f"{path}: refused: the checkpoint is a pickle that names the Python object {found}, and loading it "
                f"would run arbitrary code. Convert it where you trust it: "
                f"`torch.save(torch.load(p, weights_only=False).state_dict(), 'weights.pt')`.") from None
        size = path.stat().st_size
        what = "is empty (0 bytes)" if size == 0 else (
            f"cannot be read as a PyTorch checkpoint ({size:,} bytes, truncated, corrupt or not written by "
            f"torch.save; torch.load said {first_line(e).split('. ')[0]!r})")
        raise ConfigError(f"{path}: {what}. Copy it again, or save it with torch.save(model.state_dict(), "
                          f"path).") from None


def _pickled_global(path: Path, max_ops: int = 1_000_000) -> str | None:
    """The first global a non-zip file's first pickle names, if the file starts with a whole pickle; else None."""
    if zipfile.is_zipfile(path):
        return None  # torch's own format: its unpickler has already judged the globals
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for i, (op, arg, _) in enumerate(pickletools.genops(f)):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STOP":  # a whole pickle: random bytes almost never get here
                    return names[0] if names else None
                if i >= max_ops:
                    return None
    except Exception:  # not a pickle at all
        return None
    return None


def save(model: nn.Module, path: Path, spec: dict[str, Any] | None, whole: bool = False) -> None:
    """Save a state_dict with the spec that rebuilds it, or the whole module when pruning changed its shape."""
    model = model.module if hasattr(model, "module") else model
    with atomic_target(path) as tmp:
        torch.save(model if whole else {"spec": spec, "state_dict": model.state_dict()}, tmp)


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


def probe_onnx(path: Path, in_channels: int, num_classes: int | None, image_size: int, *,
               field: str = "models.teacher") -> None:
    """Open an ONNX teacher in onnxruntime and run a batch of 2 zeros: a broken file, an input that does not take
    the data's shape or batches, or a class count that differs fails at recipe load, not mid-run."""
    import numpy as np

    from pipeline.device.ortbench import CPU, Skip, feed, open_session
    try:
        sess = open_session(path, CPU, threads=1)
    except Skip as e:
        raise ConfigError(f"{field}.onnx: {path}: not a usable ONNX model ({e}). Export it again or copy it "
                          f"again.") from None
    want = (2, in_channels, image_size, image_size)
    inputs = sess.get_inputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    fixed = [d if isinstance(d, int) else None for d in shape]
    if len(inputs) != 1 or len(shape) != 4 or fixed[0] is not None \
            or any(d is not None and d != w for d, w in zip(fixed[1:], want[1:])):
        got = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise ConfigError(f"{field}.onnx: {path}: takes {got}; the data needs one input of shape "
                          f"[batch, {in_channels}, {image_size}, {image_size}] with a dynamic batch axis. Export it "
                          f"for data.channels and data.image_size, with dynamic_shapes on the batch.")
    try:
        y = sess.run(None, feed(sess, np.zeros(want, np.float32)))[0]
    except Exception as e:  # onnxruntime's own exception types
        raise ConfigError(f"{field}.onnx: {path}: onnxruntime cannot run it on a batch of shape {want} "
                          f"({first_line(e)}).") from None
    y = np.asarray(y)
    if y.ndim != 2 or (num_classes is not None and y.shape[1] != num_classes):
        raise ConfigError(f"{field}.onnx: {path}: gives {tuple(y.shape)} for a batch of 2, and the data has "
                          f"{num_classes} classes: it needs (2, {num_classes}). Export the teacher of this data.")
    if not np.isfinite(y).all():
        raise ConfigError(f"{field}.onnx: {path}: gives NaN or infinite scores for a batch of zeros (weights that "
                          f"are not finite); export it again from a good checkpoint.")


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

