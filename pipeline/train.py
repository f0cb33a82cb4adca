"""One training loop for every model the pipeline trains: teacher, KD student, scratch student, fine-tuning.

Warm-up, cosine/step schedule, gradient clipping, early stopping on validation accuracy (best weights kept),
NaN/explosion detection, collapse detection, DistributedDataParallel under torchrun, seeded and deterministic
on CPU.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from .context import StageError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TrainConfig(BaseModel, extra="forbid"):
    epochs: int = Field(30, ge=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_size: int = Field(10, gt=0, description="epochs between 10x LR drops, step schedule only")
    warmup_epochs: float = Field(1.0, ge=0, description="linear LR warm-up: the T^2-scaled KD term is large early")
    grad_clip: float | None = Field(5.0, gt=0, description="max gradient norm; guards KD against a confident teacher")
    patience: int | None = Field(None, gt=0, description="stop after this many epochs without a better val acc")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Logits for a numpy batch, in eval mode."""
    was = model.training
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch])).float() for i in range(0, len(x), batch)]
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(1) == y).mean())


def _lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    epoch = step / max(steps_per_epoch, 1)
    warm = min(1.0, (epoch + 1e-9) / cfg.warmup_epochs) if cfg.warmup_epochs else 1.0
    if cfg.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(epoch / max(cfg.epochs, 1), 1.0)))
    elif cfg.schedule == "step":
        decay = 0.1 ** int(epoch // cfg.step_size)
    else:
        decay = 1.0
    return warm * decay


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model: nn.Module, loss_fn: LossFn, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
        cfg: TrainConfig, *, seed: int, desc: str, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        extra_params: list[nn.Parameter] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train in place; keep the weights of the best validation epoch. Returns the history and best val acc.

    loss_fn(model, xb, yb, idx) gets the batch indices so KD methods can look up precomputed teacher outputs.
    """
    seed_everything(seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    net = model
    if world > 1:  # launched by torchrun; the process group is set up by pipeline.distributed
        net = nn.parallel.DistributedDataParallel(model)
    params = list(net.parameters()) + list(extra_params or [])
    opt = _optimizer(cfg, params)
    n = len(x)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / world / cfg.batch_size)
    chance = 1.0 / max(len(np.unique(y)), 1)
    best_acc, best_state, stale, step, last_finite = -1.0, None, 0, 0, None
    history: list[dict] = []
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(n, generator=g)  # same on every rank: each takes its own shard below
        perm = perm[rank::world]
        total, count = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb, yb = torch.from_numpy(x[idx.numpy()]), torch.from_numpy(y[idx.numpy()])
            if augment is not None:
                xb = augment(xb)
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * _lr_factor(cfg, step, steps_per_epoch)
            loss = loss_fn(net, xb, yb, idx)
            if not torch.isfinite(loss) or loss.item() > 1e4:
                raise StageError(f"{desc}: loss became {loss.item():.4g} at epoch {epoch + 1}, step {step} "
                                 f"(last finite mean loss {last_finite}). Lower the LR, raise warmup_epochs or "
                                 f"set grad_clip.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            total += loss.item() * len(idx)
            count += len(idx)
        last_finite = round(total / max(count, 1), 5)
        val_acc = accuracy(model, x_val, y_val)
        history.append({"epoch": epoch + 1, "loss": last_finite, "val_acc": round(val_acc, 4)})
        if log and rank == 0:
            log(f"  {desc} epoch {epoch + 1}/{cfg.epochs}  loss {last_finite:.4f}  val acc {val_acc:.4f}")
        if val_acc > best_acc:
            best_acc, stale = val_acc, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if cfg.epochs and best_acc <= chance + 0.05:
        raise StageError(f"{desc}: collapsed: best validation accuracy {best_acc:.3f} is at chance ({chance:.3f}). "
                         f"This is a failed run, not a result: lower the LR, raise warmup_epochs, or lower "
                         f"the temperature/alpha.")
    return {"history": history, "best_val_acc": best_acc, "epochs_run": len(history)}
