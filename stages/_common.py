"""Helpers shared by the training stages: model artifacts and augmentation. Not a stage (leading underscore)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline import models
from pipeline.artifacts import Artifact
from pipeline.config import Augment, ModelSpec
from pipeline.context import Context
from pipeline.data import Splits


def build_info(data: Splits) -> tuple[int, int, int]:
    """(in_channels, num_classes, image_size) for models.build."""
    return data.input_shape[0], data.num_classes, data.input_shape[-1]


def model_artifact(ctx: Context, model: nn.Module, name: str, role: str, spec: ModelSpec | None, *,
                   whole: bool = False, **meta) -> Artifact:
    """Save a PyTorch model of this run (rank 0 only) and describe it: role, params and MACs counted."""
    data = ctx.data()
    spec_d = spec.model_dump(mode="json", exclude={"checkpoint", "onnx"}) if spec is not None else None
    if ctx.rank == 0:
        models.save(model, ctx.path(name), spec_d, whole=whole)
    params, macs = models.count(model, data.input_shape)
    in_ch, n_cls, size = build_info(data)
    return Artifact(name=name, kind="torch", stage=ctx_stage(name, role), meta={
        "role": role, "format": "module" if whole else "state_dict", "params": params, "macs": macs,
        "build": {"in_channels": in_ch, "num_classes": n_cls, "image_size": size}, **meta})


def ctx_stage(name: str, role: str) -> str:
    return {"teacher": "teacher", "student-pruned": "prune"}.get(role, "distill")


def augmenter(cfg: Augment, seed: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision transforms v2 from the recipe, applied per sample to training batches only."""
    from torchvision.transforms import v2
    t: list = []
    if cfg.rotation_deg or cfg.scale:
        t.append(v2.RandomAffine(degrees=cfg.rotation_deg, scale=tuple(cfg.scale) if cfg.scale else None))
    if cfg.hflip:
        t.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip:
        t.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.random_crop_padding:
        t.append(_PadCrop(cfg.random_crop_padding))
    if cfg.color_jitter:
        t.append(_Jitter(cfg.color_jitter))
    if cfg.gaussian_noise:
        t.append(v2.GaussianNoise(sigma=cfg.gaussian_noise, clip=False))
    if not t:
        return None
    pipe = v2.Compose(t)
    return lambda xb: torch.stack([pipe(x) for x in xb])


class _PadCrop(nn.Module):
    """Pad then crop back to the original size (v2.RandomCrop needs the size up front)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import v2
        return v2.RandomCrop(x.shape[-2:], padding=self.pad)(x)


class _Jitter(nn.Module):
    """Brightness/contrast jitter on normalised tensors (ColorJitter assumes [0, 1] images)."""

    def __init__(self, strength: float):
        super().__init__()
        self.s = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = 1 + (torch.rand(()) * 2 - 1) * self.s
        shift = (torch.rand(()) * 2 - 1) * self.s
        return x * gain + shift
