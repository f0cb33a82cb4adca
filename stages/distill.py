"""distill: train the student against the frozen teacher, and the same student from scratch on the same budget.

Methods (`method`): hinton (soft targets), feature (FitNets hint + soft targets), dynamic (per-sample alpha
from the teacher's certainty), adversarial (batches extended with FGSM/PGD inputs), self (born-again
generations), ensemble (the teacher and models.extra_teachers, soft targets averaged; the teacher stage
trains the extra teachers and saves them as teacher-1.pt, teacher-2.pt, ...).
"""
from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.artifacts import Artifacts
from pipeline.context import Context
from pipeline.errors import StageError
from pipeline.train import kd, models, tasks
from pipeline.train.data import Split
from pipeline.train.loop import (Collapsed, LossFn, StepCount, TrainConfig, accuracy, device_of, fit,
                                 head_accuracy, seed_everything, train_device)
from stages._common import (build_info, freeze, load_teachers, model_artifact, teacher_heads, teacher_logits,
                            train_augment)

Method = Literal["hinton", "feature", "dynamic", "adversarial", "self", "ensemble", "dkd", "dist"]
TeacherFn = Callable[[torch.Tensor], torch.Tensor]


class Config(TrainConfig):
    method: Method = Field("hinton", description="KD method; its settings below are ignored by the others")
    temperature: float = Field(4.0, gt=0, description="softens both distributions; T^2 rescales the KD term")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KD term; 1 - alpha on cross-entropy")
    student_layer: str = Field("features", description="feature: student module whose output is the hint input "
                                                       "(a name from model.named_modules())")
    teacher_layer: str = Field("features", description="feature: teacher module whose output is the hint target")
    beta: float = Field(1.0, ge=0, description="feature: weight of the hint MSE added to the logit loss")
    attack: Literal["fgsm", "pgd"] = Field("fgsm", description="adversarial: how the extra inputs are made")
    eps: float = Field(0.25, ge=0, description="adversarial: L-inf radius, in normalised pixel units (std = 1)")
    attack_steps: int = Field(3, ge=1, description="adversarial: PGD steps (FGSM takes one)")
    adv_target: Literal["clean", "perturbed"] = Field(
        "clean", description="adversarial: the student matches the teacher's output on the clean input (ARD, for "
                             "robustness) or on the perturbed one (function matching near the decision boundary)")
    augment: bool = Field(True, description="apply data.augment to both students' batches; off: the teacher "
                                            "(trained with it) passes its invariances on through its soft targets")
    mixup: float = Field(0.0, ge=0, description="Beta(a, a) mixup of every batch, both students alike: the KD "
                                                "student matches the teacher on the mixed images (function "
                                                "matching), the scratch one learns the mixed labels; 0: off")
    generations: int = Field(2, ge=1, description="self: students trained in turn, each the teacher of the next; "
                                                  "the first learns from the recipe's teacher")
    # dkd and dist follow their official code (mdistiller DKD.py and cfg.py; hunto/image_classification_sota
    # dist_kd.py, kd_loss.py): cross-entropy at a weight of its own, not 1 - alpha; `alpha` is unused by both
    ce_weight: float = Field(1.0, ge=0, description="dkd, dist: weight of the cross-entropy term (1.0 in both "
                                                    "official codes); the KD term is added at full weight")
    dkd_alpha: float = Field(1.0, ge=0, description="dkd: weight of TCKD, the target-vs-rest binary KL")
    dkd_beta: float = Field(8.0, ge=0, description="dkd: weight of NCKD, the KL among the non-target classes "
                                                   "(mdistiller: 8 on CIFAR-100, 0.5 on ImageNet)")
    dkd_warmup_steps: int = Field(400, ge=0, description="dkd: the KD term ramps linearly from 0 over this many "
                                                         "optimizer steps (mdistiller: over its first 20 epochs; "
                                                         "the loss sees steps, not epochs: 400 is 20 epochs of "
                                                         "the default digits recipe; a resumed fit continues "
                                                         "its ramp); 0: no ramp")
    dist_beta: float = Field(1.0, ge=0, description="dist: weight of the inter-class relation (per sample)")
    dist_gamma: float = Field(1.0, ge=0, description="dist: weight of the intra-class relation (per class, across "
                                                     "the batch; the official code uses T=1: set temperature: 1)")


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Distill the student from the teacher; train the scratch baseline; report the gap closed."""
    # 1) data, teachers, two students with the same initialisation
    data, spec, seed = ctx.data(), ctx.recipe.models.student, ctx.recipe.seed
    teachers = load_teachers(inputs, ctx, ensemble=cfg.method == "ensemble")
    heads = teacher_heads(ctx)  # with tasks: each teacher's (the extra teachers are the teachers of tasks)
    seed_everything(seed)
    student = models.build(spec, *build_info(data))
    scratch = copy.deepcopy(student)
    aug = train_augment(ctx) if cfg.augment else None
    train = dict(train=data.train, val=data.val, cfg=cfg, seed=seed, augment=aug,
                 console=ctx.console if ctx.rank == 0 else None)
    # 2) KD student (self: several generations, each taught by the one before)
    extra: dict = {}
    teacher_fn = base_fn = ensemble_fn(teachers, cfg.temperature, heads, data.heads)
    for gen in range(1, (cfg.generations if cfg.method == "self" else 1) + 1):
        if gen > 1:
            teacher_fn, student = frozen_teacher(student), _fresh(spec, data, seed + gen)
        # without augmentation the teacher's outputs on the training split never change: compute them once
        cache = None if aug is not None or cfg.mixup or cfg.method == "feature" else teacher_logits(teacher_fn,
                                                                                                    data.train)
        steps = StepCount()
        net, loss = make_loss(cfg, student, teacher_fn, teachers[0], data.input_shape, cache, data.heads, steps)
        desc = f"student ({cfg.method} KD{f', gen {gen}' if gen > 1 else ''})"
        h_kd = fit(net, mixed(loss, cfg.mixup, data.num_classes), desc=desc, resume=ctx.resume(desc), steps=steps,
                   **train)
        if isinstance(net, Hinted):
            net.detach_hook()
        if cfg.method == "self":
            extra.setdefault("generations", []).append(
                {"generation": gen, "val_acc": h_kd["val_acc"], "test_acc": accuracy(student, data.test)})
    # 3) scratch baseline: same epochs (per generation), seed, initialisation, data, schedule
    ce = tasks.ce(data.heads)  # with tasks: the same heads, the weighted sum of their cross-entropies
    try:
        h_sc = fit(scratch, mixed(lambda net, x, y, _: ce(net(x), y), cfg.mixup, data.num_classes),
                   desc="student (scratch)", resume=ctx.resume("student (scratch)"), **train)
    except Collapsed as e:
        # the baseline is a reference, not the deliverable: at chance, it says this budget does not train without
        # the teacher. The KD student (checked above) goes on; the report says the baseline collapsed.
        h_sc, extra["scratch_collapsed"] = e.result, True
        ctx.log(f"  warning: {e} The run goes on: the scratch student is only the baseline KD is compared with, "
                f"and the report marks it collapsed.")
    # 4) measure, save
    acc_t = _acc_fn(base_fn, data.test)
    acc_kd, acc_sc = accuracy(student, data.test), accuracy(scratch, data.test)
    if data.heads:  # every head's test accuracy: the teachers' (each task's own), the two students'
        names = ["teacher"] + [f"teacher-{i}" for i in range(1, len(heads))]
        extra["teacher_of"] = {h.name: next(n for n, mine in zip(names, heads) if h in mine) for h in data.heads}
        extra["heads"] = {h: {"acc_teacher": t, "acc_kd": k, "acc_scratch": c} for (h, t), k, c in zip(
            acc_t.items(), head_accuracy(student, data.test).values(), head_accuracy(scratch, data.test).values())}
    acc_t = next(iter(acc_t.values()))
    if cfg.method == "adversarial":
        extra.update(_robustness(student, scratch, data, cfg))
    gap = acc_t - acc_sc
    ctx.results["distill"] = {
        "method": cfg.method, "teachers": len(teachers), "acc_teacher": acc_t, "acc_kd": acc_kd,
        "acc_scratch": acc_sc, "gap_closed": (acc_kd - acc_sc) / gap if gap > 0 else None, **extra,
        "val_kd": h_kd["val_acc"], "val_scratch": h_sc["val_acc"],
        "history_kd": h_kd["history"], "history_scratch": h_sc["history"]}
    for h, a in extra.get("heads", {}).items():
        ctx.log(f"  head {h}: teacher {a['acc_teacher']:.4f}  KD student {a['acc_kd']:.4f}  scratch student "
                f"{a['acc_scratch']:.4f}")
    ctx.log(f"  test acc (PyTorch): teacher {acc_t:.4f}  KD student {acc_kd:.4f}  scratch student {acc_sc:.4f}"
            + (f"  under {extra['attack']}: KD {extra['acc_kd_attacked']:.4f}, scratch "
               f"{extra['acc_scratch_attacked']:.4f}" if "attack" in extra else ""))
    # predecessor: the model a student must beat on speed, for the report's "not faster" flag
    return {"student.pt": model_artifact(ctx, student, "student.pt", "student", spec, test_acc=acc_kd,
                                         predecessor="teacher.pt"),
            "student-scratch.pt": model_artifact(ctx, scratch, "student-scratch.pt", "student-scratch", spec,
                                                 test_acc=acc_sc, predecessor="teacher.pt")}


def ensemble_fn(teachers: list[nn.Module], T: float, heads: list[list[tasks.Head]] | None = None,
                all_heads: list[tasks.Head] | None = None) -> TeacherFn:
    """Teacher logits for a batch: one teacher's, or logits whose softmax(./T) is the teachers' mean; with tasks
    (`heads`: each teacher's), every task's logits from the teacher of that task, in task order."""
    dev = train_device()
    for t in teachers:
        if not isinstance(t, models.OnnxModule):
            t.to(dev)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # no autograd records at all for the frozen teacher (autocast applies)
            outs = [t(x).to(x.device) for t in teachers]
            if heads:
                out = tasks.assemble(list(zip(outs, heads)), all_heads)
            else:
                out = outs[0] if len(outs) == 1 else kd.ensemble_logits(outs, T)
        return out.clone()  # a normal tensor: autograd may save it, which it may not do with inference tensors
    return fn


def make_loss(cfg: Config, student: nn.Module, teacher_fn: TeacherFn, teacher: nn.Module | None = None,
              input_shape: tuple[int, ...] = (), cache: torch.Tensor | None = None,
              heads: list[tasks.Head] | None = None, steps: StepCount | None = None) -> tuple[nn.Module, LossFn]:
    """The module fit() trains (the student, or student + hint adapter) and the per-batch KD loss of cfg.method.

    `teacher` and `input_shape` are needed by `feature` only (hooks on the teacher, a probe to size the adapter).
    `cache`: the teacher's logits for every training sample, looked up by the batch indices fit() passes (only
    valid when batches are not augmented). `heads` (recipe tasks): the loss is the weighted sum over heads of the
    method's loss on each head's logits and labels (config.check_tasks admits only methods that split so).
    `steps`: the loss counts its calls there (DKD's warm-up); give the same one to fit() so a resume continues it.
    """
    T, alpha = cfg.temperature, cfg.alpha
    if cfg.method == "feature":
        return _feature_loss(cfg, student, teacher, input_shape)

    def t_of(x: torch.Tensor, idx) -> torch.Tensor:
        return teacher_fn(x) if cache is None or idx is None else cache[idx].to(x.device)

    if cfg.method == "adversarial":
        def loss(m, x, y, idx):
            # the attack pushes the student away from the teacher; the student then matches the teacher there:
            # on its clean output (ARD, Goldblum et al. 2020) or on the perturbed input (Heo et al. 2019)
            t = t_of(x, idx)
            x_adv = _attack(_unwrap(m), x, kd.kd_objective(t, T), cfg)
            t_adv = t if cfg.adv_target == "clean" else teacher_fn(x_adv)
            return kd.hinton(m(torch.cat([x, x_adv])), torch.cat([t, t_adv]), torch.cat([y, y]), T, alpha).mean()
        return student, loss
    steps = steps or StepCount()  # fit() calls the loss once per optimizer step (dkd's warm-up counts them)
    if cfg.method == "dynamic":
        def head(out, t, y):
            return kd.hinton(out, t, y, T, kd.dynamic_alpha(t, T, alpha)).mean()
    elif cfg.method == "dkd":
        def head(out, t, y):
            warm = min(steps.n / cfg.dkd_warmup_steps, 1.0) if cfg.dkd_warmup_steps else 1.0
            target = y.argmax(1) if y.dim() == 2 else y  # mixup's soft labels: the larger share is the target
            return (cfg.ce_weight * F.cross_entropy(out, y, reduction="none")
                    + warm * kd.dkd(out, t, target, T, cfg.dkd_alpha, cfg.dkd_beta)).mean()
    elif cfg.method == "dist":
        def head(out, t, y):  # a batch-level loss: kd.dist relates the samples of the batch (or rank's shard)
            return cfg.ce_weight * F.cross_entropy(out, y) + kd.dist(out, t, T, cfg.dist_beta, cfg.dist_gamma)
    else:  # hinton, self (each generation), ensemble (teacher_fn averages)
        def head(out, t, y):
            return kd.hinton(out, t, y, T, alpha).mean()
    fn = tasks.per_head(head, heads or [])  # with tasks: sum over heads of weight x the method's loss

    def loss(m, x, y, idx):
        steps.n += 1
        return fn(m(x), t_of(x, idx), y)
    return student, loss


def mixed(loss: LossFn, a: float, num_classes: int) -> LossFn:
    """`loss` on mixup batches (kd.mixup) when a > 0; the batch indices are dropped, as cached teacher
    outputs do not hold for mixed images."""
    if not a:
        return loss

    def fn(m, x, y, _idx):
        xm, ym = kd.mixup(x, y, a, num_classes)
        return loss(m, xm, ym, None)
    return fn


class Hinted(nn.Module):
    """The student with a learned adapter from its hint layer to the teacher's (FitNets, Romero et al. 2015).

    Trained as one module so DDP also averages the adapter's gradients; the hook keeps the student's feature.
    """

    def __init__(self, student: nn.Module, layer: str, adapter: nn.Module):
        super().__init__()
        self.student, self.adapter, self.feat = student, adapter, None
        self._hook = _module(student, layer, "student_layer").register_forward_hook(self._keep)

    def _keep(self, _m, _i, out):
        self.feat = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def hint(self, teacher_feat: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE between the adapted student feature and the teacher's."""
        return kd.feature_hint(self.feat, teacher_feat, self.adapter)

    def detach_hook(self) -> None:
        self._hook.remove()


def _feature_loss(cfg: Config, student: nn.Module, teacher: nn.Module | None, input_shape: tuple[int, ...]
                  ) -> tuple[nn.Module, LossFn]:
    if teacher is None or isinstance(teacher, models.OnnxModule):
        raise StageError("distill: method 'feature' needs a PyTorch teacher (an ONNX teacher exposes only its "
                         "logits). Give models.teacher as arch + checkpoint, or pick method 'hinton'.")
    feats: dict[str, torch.Tensor] = {}
    _module(teacher, cfg.teacher_layer, "teacher_layer").register_forward_hook(lambda _m, _i, o: feats.update(t=o))
    probe = torch.zeros(2, *input_shape)
    hinted = Hinted(student, cfg.student_layer, nn.Identity())
    with torch.no_grad():  # one probe through both nets gives the channel counts the adapter maps between
        hinted.eval()(probe)
        teacher(probe.to(device_of(teacher)))
    s, t = hinted.feat, feats["t"]
    if s.dim() != t.dim() or s.dim() not in (2, 4):
        raise StageError(f"distill: feature hint needs two (N, C, H, W) or two (N, C) outputs; student_layer gives "
                         f"{tuple(s.shape)}, teacher_layer {tuple(t.shape)}. Pick other layers.")
    hinted.adapter = (nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False) if s.dim() == 4
                      else nn.Linear(s.shape[1], t.shape[1], bias=False))
    T, alpha, beta = cfg.temperature, cfg.alpha, cfg.beta

    def loss(m, x, y, _):
        h = _unwrap(m)
        with torch.no_grad():
            t_logits = teacher(x)
        out = m(x)
        return (kd.hinton(out, t_logits, y, T, alpha) + beta * h.hint(feats["t"])).mean()
    return hinted, loss


def attacked_accuracy(model: nn.Module, split: Split, cfg: Config, batch: int = 256) -> float:
    """Accuracy on inputs perturbed by cfg's attack against the labels (cross-entropy), same eps and steps."""
    correct = 0
    for xb, yb, _ in split.batches(batch):
        adv = _attack(model, xb, kd.ce_objective(yb), cfg)
        with torch.no_grad():
            correct += int((model.eval()(adv).argmax(1) == yb).sum())
    return correct / max(len(split), 1)


def _robustness(student: nn.Module, scratch: nn.Module, data, cfg: Config) -> dict:
    """Both students' test accuracy under the training attack (eps, steps), aimed at the labels."""
    return {"attack": f"{cfg.attack} eps={cfg.eps}" + (f" steps={cfg.attack_steps}" if cfg.attack == "pgd" else ""),
            "acc_kd_attacked": attacked_accuracy(student, data.test, cfg),
            "acc_scratch_attacked": attacked_accuracy(scratch, data.test, cfg)}


def _attack(model: nn.Module, x: torch.Tensor, objective, cfg: Config) -> torch.Tensor:
    if cfg.attack == "fgsm":
        return kd.fgsm(model, x, objective, cfg.eps)
    return kd.pgd(model, x, objective, cfg.eps, cfg.attack_steps)


@torch.no_grad()
def _acc_fn(teacher_fn: TeacherFn, split: Split, batch: int = 512) -> dict[str, float]:
    """Accuracy of the (ensemble) teacher function over a split per head ({"class": acc} for one), streamed."""
    dev, right = train_device(), [0] * max(len(split.heads), 1)
    for x, y, _ in split.batches(batch):
        right = [a + b for a, b in zip(right, tasks.correct(teacher_fn(x.to(dev)).cpu(), y, split.heads))]
    return {n: r / max(len(split), 1) for n, r in zip([h.name for h in split.heads] or ["class"], right)}


def frozen_teacher(student: nn.Module) -> TeacherFn:
    """A trained generation as the next one's teacher (self-distillation)."""
    teacher = freeze(copy.deepcopy(student)).to(train_device())
    return torch.no_grad()(lambda x: teacher(x))


def _fresh(spec, data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(spec, *build_info(data))


def _module(model: nn.Module, name: str, field: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise StageError(f"distill.{field}: '{name}' is not a module of the model. Some that are: "
                         f"{', '.join(names)}.") from None


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m

