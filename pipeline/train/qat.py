"""Quantization-aware training in PyTorch, for the quantize stage's `qat` (stages/quantize.py).

A student's Conv2d and Linear layers run on INT8-rounded weights and inputs, laid out as onnxruntime's QDQ
quantizer lays them out (per-channel symmetric weights, per-tensor inputs), with straight-through gradients, and
are fine-tuned with the Hinton KD loss against the teacher. The stage folds the BatchNorms first, reads the data
(the training and validation batches come in as callables), then exports the float weights, which now sit on
the INT8 grid, and quantizes them like any FP32 source.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline.train.kd import hinton

Wrapped = list[tuple[nn.Module, str, "FakeQuantLayer"]]


def wrap(model: nn.Module, layout: dict) -> Wrapped:
    """Wrap every Conv2d and Linear in place in a FakeQuantLayer (layout: the stage's resolved INT8 settings);
    returns (parent, attribute, wrapper) for unwrap."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, (nn.Conv2d, nn.Linear))]
    out = []
    for parent, name, child in found:
        fq = FakeQuantLayer(child, layout)
        setattr(parent, name, fq)
        out.append((parent, name, fq))
    return out


def unwrap(wrapped: Wrapped) -> None:
    """Put the (fine-tuned) float layers back where wrap found them."""
    for parent, name, fq in wrapped:
        setattr(parent, name, fq.layer)


@torch.no_grad()
def observe(model: nn.Module, wrapped: Wrapped, x: torch.Tensor) -> None:
    """Set every wrapper's input range from one pass over x (the calibration images, what MinMax calibration
    sees), the rest of the model in eval mode: the fake-quantized model is then the PTQ model."""
    model.eval()
    for _, _, fq in wrapped:
        fq.train()
    model(x)


def kd_finetune(model: nn.Module, teacher: nn.Module,
                train_batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]],
                val_acc: Callable[[nn.Module], float], *, epochs: int, lr: float, temperature: float, alpha: float,
                seed: int, log: Callable[[str], None]) -> tuple[list[dict], int]:
    """Hinton KD against the teacher with Adam; the fake-quantized model's validation accuracy is measured before
    and after every epoch and the best weights are kept (the first of equals: the least fine-tuned), so QAT never
    ends below where it started on validation. train_batches(epoch) yields (images, labels) for that epoch.
    Returns the loss and val accuracy per epoch, and the epoch kept."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = [{"epoch": 0, "val_acc": val_acc(model)}]
    best = (history[0]["val_acc"], 0, copy.deepcopy(model.state_dict()))
    for epoch in range(1, epochs + 1):
        model.train()
        total, n = 0.0, 0
        for x, y in train_batches(epoch):
            xb, yb = torch.from_numpy(x), torch.from_numpy(y)
            with torch.no_grad():
                t = teacher(xb)
            loss = hinton(model(xb), t, yb, temperature, alpha).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(xb), n + len(xb)
        history.append({"epoch": epoch, "loss": total / max(n, 1), "val_acc": val_acc(model)})
        log(f"  qat epoch {epoch}/{epochs}: KD loss {history[-1]['loss']:.4f}, val acc (fake-quantized) "
            f"{history[-1]['val_acc']:.4f}")
        if history[-1]["val_acc"] > best[0]:
            best = (history[-1]["val_acc"], epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return history, best[1]


class FakeQuantLayer(nn.Module):
    """A Conv2d or Linear run on INT8-rounded weights and inputs (torch.fake_quantize_*: straight-through
    gradients). Weights: per output channel, symmetric, max|w|/qmax, as onnxruntime's QDQ quantizer does; inputs:
    per tensor, over an EMA of batch min/max (what PyTorch's MovingAverageMinMaxObserver does)."""

    def __init__(self, layer: nn.Module, s: dict, momentum: float = 0.01):
        super().__init__()
        self.layer, self.momentum = layer, momentum
        self.w_qmax = 64 if s["reduce_range"] else 127  # reduce_range: 7-bit weights
        self.signed, self.symmetric = s["activation_type"] == "s8", s["symmetric_activations"]
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.seen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                m = self.momentum if self.seen else 1.0
                self.lo.mul_(1 - m).add_(m * x.min().clamp(max=0))
                self.hi.mul_(1 - m).add_(m * x.max().clamp(min=0))
                self.seen = True
        w = self.layer.weight
        scale = (w.detach().abs().flatten(1).amax(1) / self.w_qmax).clamp(min=1e-12)
        w = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                   -self.w_qmax, self.w_qmax)
        x = self._fake_quantize_input(x)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return nn.functional.linear(x, w, self.layer.bias)

    def _fake_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:  # zero-point 0 (S8) or 128 (U8), the range symmetric around 0
            qmin, qmax = (-127, 127) if self.signed else (0, 255)
            scale = (torch.maximum(-self.lo, self.hi) / 127).clamp(min=1e-12)
            zero = torch.tensor(0 if self.signed else 128, dtype=torch.int32)
        else:
            qmin, qmax = (-128, 127) if self.signed else (0, 255)
            scale = ((self.hi - self.lo) / 255).clamp(min=1e-12)
            zero = (qmin - torch.round(self.lo / scale)).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)
