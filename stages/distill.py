"""distill: train the student against the frozen teacher, and the same student from scratch on the same budget."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline import kd, models
from pipeline.artifacts import Artifacts
from pipeline.context import Context
from pipeline.train import TrainConfig, accuracy, fit, seed_everything
from stages._common import augmenter, build_info, model_artifact


class Config(TrainConfig):
    method: Literal["hinton"] = Field("hinton", description="KD method")
    temperature: float = Field(4.0, gt=0, description="softens both distributions; T^2 rescales the KD term")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KD term; 1 - alpha on cross-entropy")


def load_teacher(inputs: Artifacts, ctx: Context) -> nn.Module:
    """The frozen teacher: a PyTorch module in eval mode, or an ONNX teacher run through onnxruntime."""
    if "teacher.onnx" in inputs and inputs["teacher.onnx"].meta.get("given"):
        from pipeline.models import OnnxModule
        return OnnxModule(ctx.path("teacher.onnx"))
    teacher = models.load(ctx.path("teacher.pt"), inputs["teacher.pt"].meta)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Distill the student from the teacher; train the scratch baseline; report the gap closed."""
    # 1) data, teacher, two students with the same initialisation
    data, spec, seed = ctx.data(), ctx.recipe.models.student, ctx.recipe.seed
    teacher = load_teacher(inputs, ctx)
    seed_everything(seed)
    student = models.build(spec, *build_info(data))
    scratch = models.build(spec, *build_info(data))
    scratch.load_state_dict(student.state_dict())
    aug = augmenter(ctx.recipe.data.augment, seed)
    # 2) KD student
    T, alpha = cfg.temperature, cfg.alpha

    def kd_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, _idx) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)
        return kd.hinton(m(x), t, y, T, alpha).mean()

    h_kd = fit(student, kd_loss, data.x_train, data.y_train, data.x_val, data.y_val, cfg, seed=seed,
               desc=f"student ({cfg.method} KD)", augment=aug, log=ctx.log)
    # 3) scratch baseline: same epochs, seed, data, schedule
    h_sc = fit(scratch, lambda m, x, y, _: F.cross_entropy(m(x), y), data.x_train, data.y_train, data.x_val,
               data.y_val, cfg, seed=seed, desc="student (scratch)", augment=aug, log=ctx.log)
    # 4) measure, save
    acc_t = accuracy(teacher, data.x_test, data.y_test)
    acc_kd = accuracy(student, data.x_test, data.y_test)
    acc_sc = accuracy(scratch, data.x_test, data.y_test)
    gap = acc_t - acc_sc
    ctx.results["distill"] = {
        "method": cfg.method, "acc_teacher": acc_t, "acc_kd": acc_kd, "acc_scratch": acc_sc,
        "gap_closed": (acc_kd - acc_sc) / gap if gap > 0 else None,
        "val_kd": h_kd["best_val_acc"], "val_scratch": h_sc["best_val_acc"],
        "history_kd": h_kd["history"], "history_scratch": h_sc["history"]}
    ctx.log(f"  test acc (PyTorch): teacher {acc_t:.4f}  KD student {acc_kd:.4f}  scratch student {acc_sc:.4f}")
    return {"student.pt": model_artifact(ctx, student, "student.pt", "student", spec, test_acc=acc_kd),
            "student-scratch.pt": model_artifact(ctx, scratch, "student-scratch.pt", "student-scratch", spec,
                                                 test_acc=acc_sc)}
