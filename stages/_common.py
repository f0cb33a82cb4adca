"""Helpers shared by the training stages: model artifacts, the run's augmentation. Not a stage (leading underscore)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.artifacts import Artifact, Artifacts
from pipeline.config import ModelSpec, heads_of
from pipeline.context import Context
from pipeline.errors import StageError, first_line
from pipeline.train import models, tasks
from pipeline.train.augment import augmenter
from pipeline.train.data import Split, Splits
from pipeline.train.loop import device_of, train_device


def build_info(data: Splits, heads: list[str] | None = None) -> tuple[int, int, int]:
    """(in_channels, num_classes, image_size) for models.build; with tasks num_classes is the sum of the class
    counts of `heads` (the tasks the model predicts; None: all)."""
    mine, _ = tasks.select(data.heads, heads)
    n = sum(tasks.sizes(mine)) if mine else data.num_classes
    return data.input_shape[0], n, data.input_shape[-1]


def model_heads(ctx: Context, spec: ModelSpec) -> list[str] | None:
    """The tasks a model of the recipe predicts, in task order; None without tasks."""
    return heads_of(spec, [t.name for t in ctx.recipe.tasks]) if ctx.recipe.tasks else None


def model_artifact(ctx: Context, model: nn.Module, name: str, role: str, spec: ModelSpec | None, *,
                   whole: bool = False, heads: list[str] | None = None, **meta) -> Artifact:
    """Save a PyTorch model of this run (rank 0 only) and describe it: role, params and MACs counted, and with
    tasks the heads it predicts (export names its outputs after them)."""
    data = ctx.data()
    spec_d = spec.model_dump(mode="json", exclude={"checkpoint", "onnx"}) if spec is not None else None
    if ctx.rank == 0:
        models.save(model, ctx.path(name), spec_d, whole=whole)
    params, macs = models.count(model, data.input_shape)
    in_ch, n_cls, size = build_info(data, heads)
    if data.heads:
        meta["heads"] = [h.name for h in tasks.select(data.heads, heads)[0]]
    return Artifact(name=name, kind="torch", stage=ctx_stage(name, role), meta={
        "role": role, "format": "module" if whole else "state_dict", "params": params, "macs": macs,
        "build": {"in_channels": in_ch, "num_classes": n_cls, "image_size": size}, **meta})


def ctx_stage(name: str, role: str) -> str:
    return {"teacher": "teacher", "extra-teacher": "teacher", "student-pruned": "prune"}.get(role, "distill")


def train_augment(ctx: Context) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The recipe's augmentation for this run's data: pixels shifted in from outside the image are black."""
    pre = ctx.data().preprocessing
    fill = [-m / s for m, s in zip(pre["mean"], pre["std"])] if pre.get("mean") else None
    return augmenter(ctx.recipe.data.augment, fill=fill)


def load_teachers(inputs: Artifacts, ctx: Context, ensemble: bool = False) -> list[nn.Module]:
    """The frozen teacher, then (ensemble, or the teachers of tasks) the extra teachers the teacher stage saved as
    teacher-<i>.*."""
    names = ["teacher"] + ([f"teacher-{i}" for i in range(1, len(ctx.recipe.models.extra_teachers) + 1)]
                           if ensemble or ctx.recipe.tasks else [])
    if ensemble and len(names) == 1:
        raise StageError("distill: method 'ensemble' needs more than one teacher: list them under "
                         "models.extra_teachers in the recipe (the teacher stage trains them).")
    out = []
    for name in names:
        if f"{name}.onnx" in inputs and inputs[f"{name}.onnx"].meta.get("given"):
            out.append(models.OnnxModule(ctx.path(f"{name}.onnx")))
            continue
        if f"{name}.pt" not in inputs:
            raise StageError(f"distill: no {name}.pt from the teacher stage; rerun it (without --resume).")
        out.append(freeze(models.load(ctx.path(f"{name}.pt"), inputs[f"{name}.pt"].meta)))
    return out


def teacher_heads(ctx: Context) -> list[list[tasks.Head]] | None:
    """With tasks: the heads of each teacher load_teachers returns (the teacher's, then each extra teacher's)."""
    data, m = ctx.data(), ctx.recipe.models
    if not data.heads:
        return None
    return [tasks.select(data.heads, model_heads(ctx, t))[0] for t in [m.teacher, *m.extra_teachers]]


def freeze(model: nn.Module) -> nn.Module:
    """A teacher: no gradients, eval mode (BatchNorm uses its running statistics)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# Teacher outputs for the whole training split are kept only while they are this small (N x classes x 4 bytes):
# 1,100 digits take 44 KB; ImageNet's 1.28 M images x 1,000 classes would take 5 GB, so there the teacher runs
# on every batch instead.
LOGITS_CACHE_BYTES = 256 * 2**20


@torch.no_grad()
def teacher_logits(teacher, split: Split, batch: int = 512) -> torch.Tensor | None:
    """The teacher's logits for every training image, in index order (valid without augmentation), or None
    when they would not fit in LOGITS_CACHE_BYTES."""
    dev = device_of(teacher) if isinstance(teacher, nn.Module) else train_device()  # a function: ensemble_fn
    out: list[torch.Tensor] = []
    for x, _, _ in split.batches(batch):
        out.append(teacher(x.to(dev)).float().cpu())
        if len(out) == 1 and out[0].shape[1] * len(split) * 4 > LOGITS_CACHE_BYTES:
            return None
    return torch.cat(out)


def torch2onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...], opset: int, *,
               external_data: bool = False, what: str = "export", outputs: list[str] | None = None) -> None:
    """PyTorch to ONNX with one convention for every artifact: input 'input', output 'logits' (`outputs`: one per
    head of a multi-task model, which returns a tuple), a dynamic batch (torch.export's dynamo exporter), then
    onnx.checker. `what` names the setting in the error."""
    import warnings

    import onnx
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (torch.randn(2, *input_shape),), str(path), input_names=["input"],
                              output_names=outputs or ["logits"], opset_version=opset, dynamic_shapes=({0: batch},),
                              external_data=external_data, verbose=False)
        except Exception as e:
            raise StageError(f"{what}: torch.onnx.export failed for {Path(path).name}: {first_line(e)}") from e
    onnx.checker.check_model(str(path), full_check=True)
