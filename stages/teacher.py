"""teacher: train the teacher with cross-entropy, or load the recipe's checkpoint; save teacher.pt."""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from pipeline import models
from pipeline.artifacts import Artifact, Artifacts
from pipeline.context import Context
from pipeline.train import TrainConfig, accuracy, fit, seed_everything
from stages._common import augmenter, build_info, model_artifact


class Config(TrainConfig):
    epochs: int = Field(30, ge=0, description="ignored when models.teacher.checkpoint is given")


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Train (or load) the teacher, report its validation and test accuracy, save teacher.pt."""
    # 1) data and model
    data, spec = ctx.data(), ctx.recipe.models.teacher
    if spec.onnx is not None:
        return _onnx_teacher(ctx)
    seed_everything(ctx.recipe.seed)
    model = models.build(spec, *build_info(data))
    # 2) train unless a checkpoint was given
    history: dict = {}
    if spec.checkpoint is None:
        history = fit(model, lambda m, x, y, _: F.cross_entropy(m(x), y), data.x_train, data.y_train,
                      data.x_val, data.y_val, cfg, seed=ctx.recipe.seed, desc="teacher",
                      augment=augmenter(ctx.recipe.data.augment, ctx.recipe.seed), log=ctx.log)
    # 3) measure and save
    val, test = accuracy(model, data.x_val, data.y_val), accuracy(model, data.x_test, data.y_test)
    ctx.results["teacher"] = {"val_acc": val, "test_acc": test, "source": "checkpoint" if spec.checkpoint else "trained",
                              "epochs_run": history.get("epochs_run", 0), "history": history.get("history", [])}
    ctx.log(f"  teacher: val acc {val:.4f}, test acc {test:.4f} (PyTorch)")
    return {"teacher.pt": model_artifact(ctx, model, "teacher.pt", "teacher", spec, val_acc=val, test_acc=test)}


def _onnx_teacher(ctx: Context) -> Artifacts:
    """A teacher given as ONNX is copied in as the teacher artifact; the distill stage runs it with onnxruntime."""
    import shutil

    from pipeline.artifacts import files
    from pipeline.models import OnnxModule
    data, src = ctx.data(), ctx.recipe.models.teacher.onnx
    for f in files(src):
        shutil.copy2(f, ctx.path("teacher.onnx" if f == src else f.name))
    teacher = OnnxModule(ctx.path("teacher.onnx"))
    val, test = accuracy(teacher, data.x_val, data.y_val), accuracy(teacher, data.x_test, data.y_test)
    ctx.results["teacher"] = {"val_acc": val, "test_acc": test, "source": f"onnx: {src}"}
    ctx.log(f"  teacher (ONNX, onnxruntime): val acc {val:.4f}, test acc {test:.4f}")
    return {"teacher.onnx": Artifact(name="teacher.onnx", kind="onnx", stage="teacher",
                                     meta={"role": "teacher", "precision": "fp32", "val_acc": val,
                                           "torch_test_acc": test, "given": True})}
