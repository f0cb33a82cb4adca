"""One training loop for every model the pipeline trains: teacher, KD student, scratch student, fine-tuning.

Warm-up, cosine/step schedule, gradient clipping, early stopping on validation accuracy (best weights kept),
NaN/explosion detection, collapse detection, DistributedDataParallel under torchrun, seeded and deterministic
on CPU, a rich progress bar per model (one row, updated each epoch with the loss and validation accuracy).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from pipeline.artifacts import atomic_target
from pipeline.errors import StageError
from pipeline.settings import Strict
from pipeline.train import tasks
from pipeline.train.data import Split

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Below this many multiply-accumulates per batch, one intra-op thread: every op pays an OpenMP fork/join, and
# when another process holds a core, each barrier waits for a descheduled worker. Measured on the digits teacher
# (40 MMAC per batch of 64) on 2 cores: with another process busy, 5 epochs took 31.7 s on 2 threads and 0.8 s
# on 1 (this was the 39 s teacher stage); on an idle machine 2 threads were 1.4x faster. 1 thread loses
# little at worst; 2 threads can lose 40x.
SMALL_BATCH_MACS = 2e8


class TrainConfig(Strict):
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
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="mixed precision on a CUDA GPU: auto = bf16 where supported; fp16 uses a GradScaler; "
                            "always off on the CPU")
    channels_last: bool | None = Field(None, description="NHWC memory format for convolutions on a CUDA GPU (None: "
                                                         "on); never on the CPU, where it crashes torch 2.14.1")


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
    """Logits for a small numpy batch (parity checks, tests), in eval mode."""
    was = model.training
    model.eval()
    dev = device_of(model)
    out = [model(torch.from_numpy(x[i:i + batch]).to(dev)).float().cpu() for i in range(0, len(x), batch)]
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, split: Split, batch: int = 512, heads: list[str] | None = None) -> float:
    """Top-1 accuracy over a split (with tasks: of the model's first head), streamed batch by batch."""
    return next(iter(head_accuracy(model, split, batch, heads).values()))


@torch.no_grad()
def head_accuracy(model: nn.Module, split: Split, batch: int = 512, heads: list[str] | None = None
                  ) -> dict[str, float]:
    """Top-1 accuracy per head ({"class": acc} for a single-task model), streamed: only the counts are kept.
    `heads`: the tasks the model predicts, when not every task (a per-task teacher)."""
    was = model.training
    model.eval()
    dev = device_of(model)
    mine, cols = tasks.select(split.heads, heads)
    right, seen = [0] * max(len(mine), 1), 0
    for x, y, _ in split.batches(batch):
        y = y[:, cols] if mine else y
        right = [a + b for a, b in zip(right, tasks.correct(model(x.to(dev)).cpu(), y, mine))]
        seen += len(y)
    model.train(was)
    names = [h.name for h in mine] or ["class"]
    return {n: r / max(seen, 1) for n, r in zip(names, right)}


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
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


@dataclass
class Resume:
    """Where one fit() checkpoints after every epoch, and the key that makes a checkpoint usable.

    The key covers the stage's cache key (config, recipe data and models, input hashes) and the fit's
    description, so a checkpoint from other settings or other inputs is never loaded.
    """
    path: Path
    key: str


def fit(model: nn.Module, loss_fn: LossFn, train: Split, val: Split, cfg: TrainConfig, *, seed: int, desc: str,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None, log: Callable[[str], None] | None = None,
        console=None, resume: Resume | None = None, heads: list[str] | None = None,
        steps: StepCount | None = None) -> dict:
    """Train in place; keep the weights of the best validation epoch (or the last: cfg.keep). Returns the history.

    loss_fn(model, xb, yb, idx) gets the batch indices so KD methods can look up precomputed teacher outputs.
    Under torchrun each step's global batch perm[i:i+B] is split across ranks (rank r takes every world-th
    sample), so the DDP-averaged gradient is the single-process gradient up to BatchNorm batch statistics
    (per rank on CPU: no SyncBatchNorm there) and augmentation draws. `resume`: checkpoint every epoch and,
    when a checkpoint with the same key exists, continue after its last finished epoch (bit for bit on CPU).
    `console`: a rich Console for the progress bar (rank 0 only); `log`: one summary line when done.
    `heads`: the tasks the model predicts when not every task (a teacher of some tasks): what validation reads.
    `steps`: the loss's own step count (it counts its calls, one per optimiser step), set to the steps already
    taken when a checkpoint is restored, so a loss that changes over training continues where it stopped.
    """
    # 1) seed, threads, device, precision
    seed_everything(seed)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(pick_threads(cfg, model, train.input_shape, world))
    dev = train_device()
    prec = Precision(cfg, dev)
    model.to(dev)
    if prec.memory_format is torch.channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if world > 1:  # launched by torchrun; the process group is set up by pipeline.distributed
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    # 2) optimiser, keeper (best/EMA/early stop), the shuffling generator; or all of them from a checkpoint
    params = list(net.parameters())
    opt = _optimizer(cfg, params)
    keeper = Keeper(model, cfg, chance=1.0 / max(len(np.unique(train.labels.reshape(len(train), -1)[:, 0])), 1))
    g = torch.Generator().manual_seed(seed)
    state = _TrainState()
    done = _restore(resume, model, opt, keeper, prec, g, state, dev)
    if steps is not None:
        steps.n = state.step
    bar = _Bar(console if rank == 0 and done is None else None, desc, cfg.epochs)
    try:
        # 3) epochs: train, validate, keep, checkpoint
        for epoch in range(state.epoch, cfg.epochs if done is None else 0):
            loss = _epoch(net, loss_fn, train, cfg, opt, keeper, prec, g, state, augment, dev, epoch, desc,
                          world, rank)
            if world > 1:
                _sync_ranks([model, keeper.kept], loss)
            epoch_loss = round(float(loss[0] / max(loss[1], 1)), 5)
            val_acc = accuracy(keeper.kept, val, heads=heads)
            state.history.append({"epoch": epoch + 1, "loss": epoch_loss, "val_acc": round(val_acc, 4)})
            stop = keeper.update(val_acc)
            bar.update(epoch + 1, epoch_loss, val_acc, keeper.best_acc)
            state.epoch = epoch + 1
            _checkpoint(resume, rank, model, opt, keeper, prec, g, state)
            _fault_after(desc, state.epoch)
            if stop:
                break
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    # 4) the weights returned, the collapse check, the result
    if done is None:
        keeper.finish(model)
        done = {"history": state.history, "best_val_acc": keeper.best_acc, "epochs_run": len(state.history),
                "val_acc": state.history[-1]["val_acc"] if cfg.keep == "last" and state.history else keeper.best_acc}
        _checkpoint(resume, rank, model, opt, keeper, prec, g, state, result=done)
    model.cpu().eval()
    if log and rank == 0:
        log(f"  {desc}: {done['epochs_run']} epochs, best val acc {done['best_val_acc']:.4f}")
    if cfg.epochs and done["best_val_acc"] <= keeper.chance + 0.05:
        raise Collapsed(f"{desc}: collapsed: best validation accuracy {done['best_val_acc']:.3f} is at chance "
                        f"({keeper.chance:.3f}). This is a failed run, not a result: lower the LR, raise "
                        f"warmup_epochs, or lower the temperature/alpha.", result=done)
    return done


class Collapsed(StageError):
    """fit() ended at chance. The model and `result` (fit's return value) are kept for a caller to whom that is
    an answer, not a failure: the distill stage's scratch baseline."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


@dataclass
class StepCount:
    """Optimiser steps a loss has been called for (DKD's warm-up ramp reads it); fit() restores it on resume."""
    n: int = 0


@dataclass
class _TrainState:
    epoch: int = 0                  # epochs finished
    step: int = 0                   # optimiser steps taken (drives the LR schedule)
    last_finite: float | None = None
    history: list[dict] = field(default_factory=list)


def _epoch(net, loss_fn: LossFn, train: Split, cfg: TrainConfig, opt, keeper: "Keeper", prec: "Precision",
           g: torch.Generator, state: _TrainState, augment, dev: torch.device, epoch: int, desc: str, world: int,
           rank: int) -> torch.Tensor:
    """One pass over the training split; returns (loss sum, samples) as float64."""
    net.train()
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    perm = torch.randperm(n, generator=g)  # same on every rank: each takes its part of each batch below
    # a last batch too small to give every rank a sample is dropped
    order = [perm[i:i + cfg.batch_size][rank::world] for i in range(0, n, cfg.batch_size)
             if min(cfg.batch_size, n - i) >= world]
    total = torch.zeros(2, dtype=torch.float64)
    for xb, yb, idx in train.batches(order=order, pin=dev.type == "cuda"):
        xb = xb.to(dev, non_blocking=True)
        if prec.memory_format is torch.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = yb.to(dev, non_blocking=True)
        if augment is not None:
            xb = augment(xb)
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * lr_factor(cfg, state.step, steps_per_epoch)
        with prec.autocast():
            loss = loss_fn(net, xb, yb, idx)
        value = loss.item()
        if not math.isfinite(value) or value > 1e4:
            raise StageError(f"{desc}: loss became {value:.4g} at epoch {epoch + 1}, step {state.step} (last "
                             f"finite loss {state.last_finite}). Lower the LR, raise warmup_epochs or set grad_clip.")
        state.last_finite = round(value, 5)
        opt.zero_grad(set_to_none=True)
        prec.backward(loss, opt, cfg.grad_clip)
        keeper.step(net)
        state.step += 1
        total += torch.tensor([value * len(idx), len(idx)], dtype=torch.float64)
    return total


class Keeper:
    """What fit() returns: the best validation epoch's weights (or the last), of the model or its EMA."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, chance: float):
        self.cfg, self.chance = cfg, chance
        self.ema = _ema(model, cfg.ema) if cfg.ema else None
        self.kept = self.ema.module if self.ema is not None else model  # the weights validated, kept and returned
        self.best_acc, self.best_state, self.stale = -1.0, None, 0

    def step(self, net: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update_parameters(_unwrap(net))

    def update(self, val_acc: float) -> bool:
        """Record an epoch's validation accuracy; True when early stopping says stop."""
        if val_acc > self.best_acc:
            self.best_acc, self.stale = val_acc, 0
            self.best_state = {k: v.detach().clone() for k, v in self.kept.state_dict().items()}
            return False
        self.stale += 1
        return bool(self.cfg.patience and self.stale >= self.cfg.patience)

    def finish(self, model: nn.Module) -> None:
        if self.cfg.keep == "last" and self.ema is not None:
            model.load_state_dict(self.kept.state_dict())
        elif self.cfg.keep == "best" and self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc, "best_state": self.best_state, "stale": self.stale,
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, d: dict) -> None:
        self.best_acc, self.best_state, self.stale = d["best_acc"], d["best_state"], d["stale"]
        if self.ema is not None:
            self.ema.load_state_dict(d["ema"])


class Precision:
    """Mixed precision and memory format for one fit: autocast, a GradScaler for fp16, clipping, channels_last.

    amp auto = bf16 on a CUDA GPU that supports it, else off. On the CPU autocast stays off: without AMX,
    bf16 matmuls are slower than fp32 there, and the CPU results must stay bit-identical across a resume.
    """

    def __init__(self, cfg: TrainConfig, dev: torch.device):
        amp = cfg.amp
        if amp == "auto":
            amp = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
        if dev.type != "cuda":
            amp = "off"
        self.amp, self.dev = amp, dev
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        # GPU only: on the CPU, torch 2.14.1's channels_last convolution backward crashes (a segfault, seen on
        # this project's 2-core x86 host with a NarrowResNet), so the setting is not honoured there
        cl = (cfg.channels_last is not False) and dev.type == "cuda"
        self.memory_format = torch.channels_last if cl else torch.preserve_format

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dev.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, opt, grad_clip: float | None) -> None:
        params = [p for grp in opt.param_groups for p in grp["params"]]
        if self.scaler is None:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            return
        self.scaler.scale(loss).backward()
        if grad_clip:
            self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(opt)
        self.scaler.update()


def _checkpoint(resume: Resume | None, rank: int, model, opt, keeper: Keeper, prec: Precision, g, state: _TrainState,
                result: dict | None = None) -> None:
    """Everything the next epoch depends on, written atomically (rank 0): a kill loses at most one epoch."""
    if resume is None or rank != 0:
        return
    payload = {"key": resume.key, "epoch": state.epoch, "step": state.step, "last_finite": state.last_finite,
               "history": state.history, "model": model.state_dict(), "optimizer": opt.state_dict(),
               "keeper": keeper.state_dict(), "scaler": prec.scaler.state_dict() if prec.scaler else None,
               "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "shuffle": g.get_state(),
                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               "result": result}
    resume.path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(resume.path) as tmp:
        torch.save(payload, tmp)


def _restore(resume: Resume | None, model, opt, keeper: Keeper, prec: Precision, g, state: _TrainState, dev
             ) -> dict | None:
    """Load a matching checkpoint into the fit's state; the finished result when the fit had already ended."""
    if resume is None or not resume.path.exists():
        return None
    try:
        ck = torch.load(resume.path, map_location=dev, weights_only=False)  # our own file, written by _checkpoint
    except Exception:  # a torn or foreign file: train from the start rather than trust it
        return None
    if ck.get("key") != resume.key:
        return None
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    keeper.load_state_dict(ck["keeper"])
    if prec.scaler is not None and ck["scaler"]:
        prec.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"].cpu())
    np.random.set_state(ck["rng"]["numpy"])
    g.set_state(ck["rng"]["shuffle"].cpu())
    if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng"]["cuda"]])
    state.epoch, state.step, state.last_finite, state.history = ck["epoch"], ck["step"], ck["last_finite"], ck["history"]
    return ck["result"]


def _fault_after(desc: str, epoch: int) -> None:
    """Test hook: PIPELINE_TEST_KILL_AFTER='<desc>:<epoch>' SIGKILLs this process once that epoch is saved."""
    spec = os.environ.get("PIPELINE_TEST_KILL_AFTER")
    if spec and spec == f"{desc}:{epoch}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


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
