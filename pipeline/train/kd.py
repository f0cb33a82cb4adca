"""Knowledge-distillation losses. Each returns a per-sample loss, callers take the mean; except `dist`, whose
terms compare samples with each other and so return one value for the batch.

Hinton et al. 2015: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).
The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Objective = Callable[[torch.Tensor], torch.Tensor]  # logits -> scalar to maximise


def kl_soft(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Per-sample KL(teacher_T || student_T), both sides as log-probabilities (numerically stable)."""
    s = F.log_softmax(student_logits / T, dim=1)
    t = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(s, t, reduction="none", log_target=True).sum(dim=1)


def hinton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, T: float,
           alpha: float | torch.Tensor) -> torch.Tensor:
    """Per-sample Hinton loss; alpha may be a per-sample tensor (see `dynamic_alpha`)."""
    ce = F.cross_entropy(student_logits, y, reduction="none")
    return alpha * T * T * kl_soft(student_logits, teacher_logits.detach(), T) + (1 - alpha) * ce


def decoupled_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, T: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD) of Zhao et al. 2022, without T^2; KL = TCKD + (1 - p_target(teacher)) * NCKD.

    TCKD: binary KL between the teacher's and the student's [p_target, 1 - p_target] at T. NCKD: KL between
    their distributions over the non-target classes, renormalised; the target logit is pushed down by 1000 before
    the softmax, as in the official code (mdistiller, DKD.py), so its probability is exactly 0 in float32.
    """
    t = teacher_logits.detach() / T
    s = student_logits / T
    gt = F.one_hot(y, s.shape[1]).bool()
    tckd = F.kl_div(_log_binary(s, gt), _log_binary(t, gt), reduction="none", log_target=True).sum(dim=1)
    nckd = kl_soft(s - 1000.0 * gt, t - 1000.0 * gt, 1.0)
    return tckd, nckd


def _log_binary(z: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """[log p_target, log(1 - p_target)] per row of softmax(z), from logsumexps: no log of 1 - p rounded to 0."""
    lse = z.logsumexp(dim=1)
    return torch.stack([z[gt] - lse, z.masked_fill(gt, -math.inf).logsumexp(dim=1) - lse], dim=1)


def dkd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, T: float, alpha: float,
        beta: float) -> torch.Tensor:
    """Per-sample Decoupled KD term, T^2 * (alpha * TCKD + beta * NCKD); the caller adds cross-entropy."""
    tckd, nckd = decoupled_kl(student_logits, teacher_logits, y, T)
    return T * T * (alpha * tckd + beta * nckd)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b (eps as in the official DIST code)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, beta: float, gamma: float
         ) -> torch.Tensor:
    """DIST (Huang et al. 2022) for the batch, a scalar: T^2 * (beta * inter + gamma * intra).

    inter: mean over samples of 1 - Pearson(student probabilities, teacher probabilities) at T; intra: the same
    per class, across the batch (the transposed matrices). Correlation instead of KL: the student must rank the
    classes as the teacher does, not match its exact probabilities (which helps with a much stronger teacher).
    A batch of one sample has no intra-class relation: that term is 0 then. Under torchrun each rank relates
    the samples of its own shard, as BatchNorm without SyncBatchNorm does.
    """
    p_s = F.softmax(student_logits / T, dim=1)
    p_t = F.softmax(teacher_logits.detach() / T, dim=1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    intra = 1 - _pearson_rows(p_s.T, p_t.T).mean() if len(p_s) > 1 else p_s.new_zeros(())
    return T * T * (beta * inter + gamma * intra)


def dynamic_alpha(teacher_logits: torch.Tensor, T: float, alpha: float) -> torch.Tensor:
    """Per-sample alpha from the teacher's certainty.

    Rule: certainty c_i = 1 - H(softmax(t_i/T)) / log(C), in [0, 1]. alpha_i = alpha * c_i / mean(c), clipped to
    [0, 1]: the batch keeps alpha on average, the student follows the teacher more where the teacher is sure
    and the labels more where it is not. With equal certainties alpha_i = alpha and the loss is `hinton`.
    """
    p = F.softmax(teacher_logits.detach() / T, dim=1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)
    certainty = 1 - entropy / math.log(teacher_logits.shape[1])
    return (alpha * certainty / certainty.mean().clamp_min(1e-8)).clamp(0.0, 1.0)


def mixup(x: torch.Tensor, y: torch.Tensor, a: float, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with another of the batch (Zhang et al. 2018), weight lam ~ Beta(a, a) per sample.

    Returns the mixed inputs and the mixed labels as class probabilities (F.cross_entropy takes those). With
    a teacher, the student then matches the teacher's output on the mixed image ("function matching", Beyer
    et al. 2022): every mixed image is a new point where the teacher says what the function is, which labels
    alone cannot say. Random draws come from torch's global generator, which fit() seeds.
    """
    lam = torch.distributions.Beta(a, a).sample((len(x),)).to(x.device)
    perm = torch.randperm(len(x), device=x.device)
    lx = lam.view(-1, *[1] * (x.dim() - 1))
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    return lx * x + (1 - lx) * x[perm], lam[:, None] * onehot + (1 - lam[:, None]) * onehot[perm]


def feature_hint(student_feat: torch.Tensor, teacher_feat: torch.Tensor, adapter: torch.nn.Module) -> torch.Tensor:
    """FitNets hint: per-sample MSE between the adapted student map and the teacher map (resized if needed)."""
    s = adapter(student_feat)
    t = teacher_feat.detach()
    if s.shape[-2:] != t.shape[-2:]:
        s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    return ((s - t) ** 2).flatten(1).mean(dim=1)


def ensemble_logits(teacher_logits: list[torch.Tensor], T: float) -> torch.Tensor:
    """Average the teachers' soft targets at temperature T; returned as logits whose softmax(./T) is that average."""
    probs = torch.stack([F.softmax(t / T, dim=1) for t in teacher_logits]).mean(0)
    return T * torch.log(probs.clamp_min(1e-12))


def fgsm(model: torch.nn.Module, x: torch.Tensor, objective: Objective, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps up the objective's gradient."""
    return pgd(model, x, objective, eps, steps=1, step_size=eps, random_start=False)


def pgd(model: torch.nn.Module, x: torch.Tensor, objective: Objective, eps: float, steps: int,
        step_size: float | None = None, random_start: bool = True) -> torch.Tensor:
    """Projected gradient ascent on objective(model(x_adv)) inside an L-inf ball of radius eps (Madry et al. 2018).

    eps is in the units of x (normalised pixels here). Runs the model in eval mode: BatchNorm statistics must
    not move while crafting the attack. The model's parameter gradients are left untouched.
    """
    if eps == 0 or steps == 0:
        return x.detach().clone()
    step_size = step_size or 2.5 * eps / steps
    was = model.training
    model.eval()
    adv = x.detach().clone()
    if random_start:
        adv = adv + torch.empty_like(adv).uniform_(-eps, eps)
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(model(adv)), adv)
        adv = (adv.detach() + step_size * grad.sign()).clamp(x - eps, x + eps)
    model.train(was)
    return adv.detach()


def kd_objective(teacher_logits: torch.Tensor, T: float) -> Objective:
    """Attack objective for training: push the student away from the teacher, sum of KL(teacher_T || student_T)."""
    return lambda out: kl_soft(out, teacher_logits.detach(), T).sum()


def ce_objective(y: torch.Tensor) -> Objective:
    """Attack objective for evaluation: the usual untargeted attack on the labels."""
    return lambda out: F.cross_entropy(out, y, reduction="sum")
