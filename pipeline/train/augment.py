"""Training-batch augmentation: torchvision v2's random transforms, drawn per sample, applied to a whole batch."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.config import Augment


def augmenter(cfg: Augment, fill: list[float] | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The recipe's augmentation as a batch transform for training batches (fit() never applies it to val/test).

    The transforms are those of torchvision v2 (RandomAffine rotation/scale, RandomHorizontal/VerticalFlip,
    RandomCrop with padding, brightness/contrast jitter, GaussianNoise) drawn per sample, but done on the whole
    batch at once: v2 draws one set of parameters per call, so per-sample draws meant a Python loop that took
    35 ms per batch of 64 8x8 digits, ten times the training step. Random draws come from torch's global
    generator, which fit() seeds.
    `fill`: per channel, the normalised value of the pixels a rotation or shift brings in (torchvision fills
    with 0 before normalisation, i.e. black; 0 after it would be the mean grey, a border the test images lack).
    """
    if not (cfg.rotation_deg or cfg.scale or cfg.hflip or cfg.vflip or cfg.random_crop_padding or cfg.color_jitter
            or cfg.gaussian_noise):
        return None
    return BatchAugment(cfg, fill)


class BatchAugment(nn.Module):
    """Per-sample random affine (rotation, scale, integer shift for pad-and-crop), flips, jitter and noise."""

    def __init__(self, cfg: Augment, fill: list[float] | None = None):
        super().__init__()
        self.cfg = cfg
        self.fill = torch.tensor(fill or [0.0]).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        # random draws on the CPU generator whatever the device: the same seed gives the same batches anywhere
        c, n, (h, w), dev = self.cfg, len(x), x.shape[-2:], x.device
        fill = self.fill.to(dev)
        if c.rotation_deg or c.scale or c.random_crop_padding:
            angle = (torch.rand(n) * 2 - 1) * c.rotation_deg * torch.pi / 180
            lo, hi = c.scale or (1.0, 1.0)
            scale = lo + torch.rand(n) * (hi - lo)
            p = c.random_crop_padding
            pixels = torch.randint(-p, p + 1, (n, 2))
            if not (c.rotation_deg or c.scale):  # pad-and-crop alone: integer shifts are slices, not resampling
                return self._after_affine(_shift(x, pixels, p, fill), n, dev)
            shift = pixels.float() * 2 / torch.tensor([w, h])  # pixels -> [-1, 1] units
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input sampling: inverse map
            theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
            grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
            # grid_sample pads with zeros: shift by the fill value so that the padding comes out as `fill`
            x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        return self._after_affine(x, n, dev)

    def _after_affine(self, x: torch.Tensor, n: int, dev: torch.device) -> torch.Tensor:
        c = self.cfg
        if c.hflip:
            x = torch.where((torch.rand(n) < c.hflip).to(dev)[:, None, None, None], x.flip(-1), x)
        if c.vflip:
            x = torch.where((torch.rand(n) < c.vflip).to(dev)[:, None, None, None], x.flip(-2), x)
        if c.color_jitter:  # on normalised tensors: a gain and an offset per sample (ColorJitter assumes [0, 1])
            gain = (1 + (torch.rand(n, 1, 1, 1) * 2 - 1) * c.color_jitter).to(dev)
            x = x * gain + ((torch.rand(n, 1, 1, 1) * 2 - 1) * c.color_jitter).to(dev)
        if c.gaussian_noise:
            x = x + torch.randn(x.shape).to(dev) * c.gaussian_noise
        return x


def _shift(x: torch.Tensor, pixels: torch.Tensor, p: int, fill: torch.Tensor) -> torch.Tensor:
    """Each sample moved by its (dx, dy) pixels, as RandomCrop(padding=p) does: out[r, c] = in[r + dy, c + dx],
    `fill` where that falls outside. Region copies: at 224x224 far cheaper than grid_sample's resampling."""
    h, w = x.shape[-2:]
    out = fill.expand(x.shape).clone() if fill.numel() > 1 else torch.full_like(x, float(fill))
    for i, (dx, dy) in enumerate(pixels.tolist()):
        out[i, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
            x[i, :, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out
