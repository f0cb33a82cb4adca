"""One training loop for every model the pipeline trains: teacher, KD student, scratch student, fine-tuning.

Warm-up, cosine/step schedule, gradient clipping, early stopping on validation accuracy (best weights kept),
NaN/explosion detection, collapse detection, DistributedDataParallel under torchrun, seeded and deterministic
on CPU, a rich progress bar per model (one row, updated each epoch with the loss and validation accuracy).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from pipeline.errors import StageError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Below this many multiply-accumulates per batch, one intra-op thread: every op pays an OpenMP fork/join, and
# when another process holds a core, each barrier waits for a descheduled worker. Measured on the digits teacher
# (40 MMAC per batch of 64) on 2 cores: with another process busy, 5 epochs took 31.7 s on 2 threads and 0.8 s
# on 1 (this was the 39 s teacher stage); on an idle machine 2 threads were 1.4x faster. 1 thread loses
# little at worst; 2 threads can lose 40x.
SMALL_BATCH_MACS = 2e8


class TrainConfig(BaseModel, extra="forbid"):
    epochs: int = Field(30, ge=0, description="passes over the training split (early stopping may end sooner)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate, reached after warm-up")
    batch_size: int = Field(64, gt=0, description="global batch; under torchrun each rank takes 1/world of it")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="adamw: decoupled weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(5e-4, ge=0, description="L2 penalty (decoupled for adamw)")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="LR decay after warm-up")
    step_size: int = Field(10, gt=0, description="epochs between 10x LR drops, step schedule only")
    warmup_epochs: float = Field(1.0, ge=0, description="linear LR warm-up: the T^2-scaled KD term is large early")
    grad_clip: float | None = Field(5.0, gt=0, description="max gradient norm; guards KD against a confident teacher")
    patience: int | None = Field(None, gt=0, description="stop after this many epochs without a better val acc")
    keep: Literal["best", "last"] = Field("best", description="weights returned: the best validation epoch's, or the "
                                          "last epoch's (steadier after a long cosine decay: a 200-image val split "
                                          "picks its best epoch partly by chance)")
    ema: float | None = Field(None, gt=0, lt=1, description="decay per step of an exponential moving average of the "
                                                           "weights, which is validated and kept (steadier tiny nets)")
    threads: int = Field(0, ge=0, description="intra-op CPU threads; 0 = 1 for small models (see SMALL_BATCH_MACS), "
                                              "else the cores divided among torchrun ranks")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    # Deterministic kernels: on CPU this costs nothing measurable for these models (checked: same time either way).
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is present, else the CPU. Models go back to the CPU after fit()."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Logits for a numpy batch, in eval mode."""
    was = model.training
    model.eval()
    dev = device_of(model)
    out = [model(torch.from_numpy(x[i:i + batch]).to(dev)).float().cpu() for i in range(0, len(x), batch)]
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


def pick_threads(cfg: TrainConfig, model: nn.Module, sample_shape: tuple[int, ...], world: int) -> int:
    """Intra-op threads for this fit: the config's, or 1 for small models, or the cores shared among ranks."""
    if cfg.threads:
        return cfg.threads
    try:
        macs = _conv_linear_macs(model, sample_shape) * cfg.batch_size
    except Exception:  # a model that does not run on a zero sample: assume it is large
        macs = math.inf
    return 1 if macs < SMALL_BATCH_MACS else max(1, (os.cpu_count() or 1) // world)


@torch.no_grad()
def _conv_linear_macs(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the conv and linear layers for one sample (a quick estimate, milliseconds).

    Not models.count: torch-pruning's counter feeds torch.randn, which would move the global generator that
    fit() has just seeded, and with it every later draw (shuffles aside: mixup, dropout, augmentation).
    """
    total = [0]

    def hook(m, _inp, out):
        per_out = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * math.prod(m.kernel_size)
        total[0] += out.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    try:
        model.eval()(torch.zeros(1, *sample_shape))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total[0]


def fit(model: nn.Module, loss_fn: LossFn, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
        cfg: TrainConfig, *, seed: int, desc: str, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        extra_params: list[nn.Parameter] | None = None, log: Callable[[str], None] | None = None,
        console=None) -> dict:
    """Train in place; keep the weights of the best validation epoch (or the last: cfg.keep). Returns the history.

    loss_fn(model, xb, yb, idx) gets the batch indices so KD methods can look up precomputed teacher outputs.
    Under torchrun each step's global batch perm[i:i+B] is split across ranks (rank r takes every world-th
    sample), so the DDP-averaged gradient is the single-process gradient up to BatchNorm batch statistics
    (per rank on CPU: no SyncBatchNorm there) and augmentation draws. `console`: a rich Console for the progress
    bar (rank 0 only); `log`: one summary line when done.
    """
    seed_everything(seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(pick_threads(cfg, model, tuple(x.shape[1:]), world))
    dev = train_device()
    model.to(dev)
    net = model
    if world > 1:  # launched by torchrun; the process group is set up by pipeline.distributed
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = list(net.parameters()) + list(extra_params or [])
    opt = _optimizer(cfg, params)
    ema = _ema(model, cfg.ema) if cfg.ema else None
    kept = ema.module if ema is not None else model  # the weights validated, kept and returned
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(x)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    chance = 1.0 / max(len(np.unique(y)), 1)
    best_acc, best_state, stale, step, last_finite = -1.0, None, 0, 0, None
    history: list[dict] = []
    bar = _Bar(console if rank == 0 else None, desc, cfg.epochs)
    try:
        for epoch in range(cfg.epochs):
            net.train()
            perm = torch.randperm(n, generator=g)  # same on every rank: each takes its part of each batch below
            total = torch.zeros(2, dtype=torch.float64)  # loss sum, samples
            for i in range(0, n, cfg.batch_size):
                if min(cfg.batch_size, n - i) < world:  # a last batch too small to give every rank a sample
                    break
                idx = perm[i:i + cfg.batch_size][rank::world]
                xb, yb = xt[idx], yt[idx]
                if augment is not None:
                    xb = augment(xb)
                for grp in opt.param_groups:
                    grp["lr"] = cfg.lr * _lr_factor(cfg, step, steps_per_epoch)
                loss = loss_fn(net, xb.to(dev), yb.to(dev), idx)
                value = loss.item()
                if not math.isfinite(value) or value > 1e4:
                    raise StageError(f"{desc}: loss became {value:.4g} at epoch {epoch + 1}, step {step} (last "
                                     f"finite loss {last_finite}). Lower the LR, raise warmup_epochs or set "
                                     f"grad_clip.")
                last_finite = round(value, 5)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                total += torch.tensor([value * len(idx), len(idx)], dtype=torch.float64)
            if world > 1:
                _sync_ranks([model, kept], total)
            epoch_loss = round(float(total[0] / max(total[1], 1)), 5)
            val_acc = accuracy(kept, x_val, y_val)
            history.append({"epoch": epoch + 1, "loss": epoch_loss, "val_acc": round(val_acc, 4)})
            bar.update(epoch + 1, epoch_loss, val_acc, max(best_acc, val_acc))
            if val_acc > best_acc:
                best_acc, stale = val_acc, 0
                best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience:
                    break
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    if cfg.keep == "last" and ema is not None:
        model.load_state_dict(kept.state_dict())
    elif cfg.keep == "best" and best_state is not None:
        model.load_state_dict(best_state)
    model.cpu().eval()
    if log and rank == 0:
        log(f"  {desc}: {len(history)} epochs, best val acc {best_acc:.4f}")
    if cfg.epochs and best_acc <= chance + 0.05:
        raise StageError(f"{desc}: collapsed: best validation accuracy {best_acc:.3f} is at chance ({chance:.3f}). "
                         f"This is a failed run, not a result: lower the LR, raise warmup_epochs, or lower "
                         f"the temperature/alpha.")
    val_acc = history[-1]["val_acc"] if cfg.keep == "last" and history else best_acc
    return {"history": history, "best_val_acc": best_acc, "val_acc": val_acc, "epochs_run": len(history)}


def _ema(model: nn.Module, decay: float):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _sync_ranks(modules: list[nn.Module], total: torch.Tensor) -> None:
    """Give every rank rank 0's BatchNorm statistics and the global epoch loss.

    DDP broadcasts buffers at the start of each forward, then each rank's forward updates them with its own
    shard, so after the last step the ranks' running statistics differ; without this their validation
    accuracies (and early-stopping decisions) would diverge.
    """
    import torch.distributed as dist
    for m in modules:
        for b in m.buffers():
            dist.broadcast(b, src=0)
    dist.all_reduce(total)


class _Bar:
    """A rich progress row per model: epochs done, loss and validation accuracy. Silent without a console."""

    def __init__(self, console, desc: str, epochs: int):
        self.progress = None
        if console is None or getattr(console, "quiet", False) or not epochs:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.progress = Progress(TextColumn(f"  {desc:<28}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}  val acc {task.fields[val]} "
                                            "(best {task.fields[best]})"),
                                 TimeElapsedColumn(), console=console)
        self.task = self.progress.add_task(desc, total=epochs, loss="-", val="-", best="-")
        self.progress.start()

    def update(self, epoch: int, loss: float, val: float, best: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=epoch, loss=f"{loss:.4f}", val=f"{val:.4f}",
                                 best=f"{best:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
