"""teacher: train the teacher (and models.extra_teachers) with cross-entropy, or load what the recipe gives.

Writes teacher.pt (or teacher.onnx when the recipe gives an ONNX teacher) and teacher-1.pt, teacher-2.pt, ...
for the extra teachers, which ensemble KD averages (role extra-teacher: export and benchmark leave them out;
the recipe's teacher stays the reference every budget and delta is measured against). Extra teacher i trains
with seed + i, so copies of one spec still differ. With recipe `tasks:` a teacher predicts the tasks of its
`heads` (models.teacher: every task unless it names some), trained with the sum of their weighted
cross-entropies; an extra teacher is then the teacher of the tasks it names, not an ensemble member.
"""
from __future__ import annotations

import shutil

from pydantic import Field

from pipeline.artifacts import Artifact, Artifacts, files
from pipeline.config import ModelSpec
from pipeline.context import Context
from pipeline.train import models, tasks
from pipeline.train.loop import TrainConfig, accuracy, fit, head_accuracy, seed_everything
from stages._common import build_info, model_artifact, model_heads, train_augment

# recipe settings this stage never reads, left out of its cache key: trying another student keeps the teacher
NOT_READ = ("models.student",)


class Config(TrainConfig):
    epochs: int = Field(30, ge=0, description="ignored when models.teacher.checkpoint is given")


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Train (or load) the teacher and any extra teachers; report validation and test accuracy; save them."""
    specs = [("teacher", ctx.recipe.models.teacher)] + [
        (f"teacher-{i}", s) for i, s in enumerate(ctx.recipe.models.extra_teachers, 1)]
    out: Artifacts = {}
    for i, (name, spec) in enumerate(specs):
        role = "teacher" if i == 0 else "extra-teacher"  # extras are KD inputs only: not exported, not shipped
        art, res = _onnx_teacher(ctx, name, spec, role) if spec.onnx is not None else \
            _torch_teacher(ctx, name, spec, cfg, ctx.recipe.seed + i, role)
        out[art.name] = art
        if i == 0:
            ctx.results["teacher"] = res
        else:
            ctx.results["teacher"].setdefault("extra", []).append({"name": art.name, **res})
    return out


def _torch_teacher(ctx: Context, name: str, spec: ModelSpec, cfg: Config, seed: int, role: str
                   ) -> tuple[Artifact, dict]:
    # 1) data and model (with tasks: the heads it predicts, trained on their label columns)
    data, heads = ctx.data(), model_heads(ctx, spec)
    seed_everything(seed)
    model = models.build(spec, *build_info(data, heads))
    mine, cols = tasks.select(data.heads, heads)
    ce = tasks.ce(mine)
    # 2) train unless a checkpoint was given
    history: dict = {}
    if spec.checkpoint is None:
        history = fit(model, lambda m, x, y, _: ce(m(x), y[:, cols] if mine else y), data.train, data.val, cfg,
                      seed=seed, desc=name, augment=train_augment(ctx),
                      console=ctx.console if ctx.rank == 0 else None, resume=ctx.resume(name), heads=heads)
    # 3) measure and save
    val, test = (head_accuracy(model, s, heads=heads) for s in (data.val, data.test))
    ctx.log(f"  {name}: val acc {_show(val)}, test acc {_show(test)} (PyTorch)")
    first = next(iter(test))  # the first head's figures are the model's figures (the only head without tasks)
    res = {"val_acc": val[first], "test_acc": test[first], "source": "checkpoint" if spec.checkpoint else "trained",
           "epochs_run": history.get("epochs_run", 0), "history": history.get("history", [])}
    if mine:
        res["heads"] = {h: {"val_acc": val[h], "test_acc": test[h]} for h in test}
    return model_artifact(ctx, model, f"{name}.pt", role, spec, heads=heads, val_acc=val[first],
                          test_acc=test[first]), res


def _show(acc: dict[str, float]) -> str:
    """'0.9833' without tasks, 'digit 0.9833, parity 1.0000' with (head_accuracy names the one head 'class')."""
    return f"{acc['class']:.4f}" if list(acc) == ["class"] else ", ".join(f"{k} {v:.4f}" for k, v in acc.items())


def _onnx_teacher(ctx: Context, name: str, spec: ModelSpec, role: str) -> tuple[Artifact, dict]:
    """An ONNX teacher is copied in (rank 0) as <name>.onnx; the distill stage runs it with onnxruntime."""
    data, src = ctx.data(), spec.onnx
    if ctx.rank == 0:
        for f in files(src):
            shutil.copy2(f, ctx.path(f"{name}.onnx" if f == src else f.name))
    teacher = models.OnnxModule(src)  # the source, not the copy: other ranks must not wait for rank 0's copy
    val, test = accuracy(teacher, data.val), accuracy(teacher, data.test)
    ctx.log(f"  {name} (ONNX, onnxruntime): val acc {val:.4f}, test acc {test:.4f}")
    art = Artifact(name=f"{name}.onnx", kind="onnx", stage="teacher",
                   meta={"role": role, "precision": "fp32", "val_acc": val, "torch_test_acc": test,
                         "given": True})
    return art, {"val_acc": val, "test_acc": test, "source": f"onnx: {src}"}
