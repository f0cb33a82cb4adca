"""prune: structured pruning that removes channels (Torch-Pruning DepGraph), then KD fine-tuning. Off by default.

Channels are physically removed, so the pruned module has fewer parameters and MACs (counted, not estimated
from the ratio) and a different architecture: it is saved whole, not as a state_dict into the old class.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from pipeline.artifacts import Artifacts
from pipeline.context import Context
from pipeline.errors import StageError, first_line
from pipeline.train import kd, models, tasks
from pipeline.train.loop import TrainConfig, accuracy, device_of, fit, head_accuracy, seed_everything
from stages._common import load_teachers, model_artifact, teacher_heads, teacher_logits, train_augment


class Config(TrainConfig):
    enabled: bool = Field(False, description="off unless the recipe or profile asks for it")
    ratio: float = Field(0.5, gt=0, lt=1, description="share of channels removed per layer (or over all layers "
                                                     "when global_pruning)")
    layer_ratios: dict[str, Annotated[float, Field(gt=0, lt=1)]] = Field(
        {}, description="module name -> ratio, e.g. {layers.0: 0.25}; wins over ratio for every prunable layer "
                        "inside that module")
    global_pruning: bool = Field(False, description="rank channels across layers instead of within each layer; "
                                                    "uneven widths, usually less accuracy lost for the same MACs")
    importance: Literal["l1", "l2"] = Field("l2", description="channel magnitude criterion: L1 or L2 norm")
    round_to: int | None = Field(8, ge=1, description="keep channel counts a multiple of this, for SIMD lanes and "
                                                       "tensor cores; null for exact ratios")
    ignored_layers: list[str] | None = Field(None, description="module names left whole; null = the classifier "
                                                               "(the last Linear), whose outputs are the classes")
    max_layer_ratio: float = Field(0.9, gt=0, le=1, description="cap per layer, so global pruning never empties "
                                                                "one")
    # fine-tuning (the TrainConfig fields), with the distillation loss against the teacher
    epochs: int = Field(5, ge=0, description="KD fine-tuning epochs after pruning; 0 = none")
    lr: float = Field(1e-3, gt=0, description="lower than training from scratch: the weights are already good")
    temperature: float = Field(4.0, gt=0, description="KD temperature for fine-tuning")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KD term; 1 - alpha on cross-entropy")


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Remove channels by L1/L2 magnitude, then fine-tune with the distillation loss; save the whole module."""
    # 1) load the student and the teacher; count and measure before
    if "student.pt" not in inputs:
        raise StageError("prune: no student.pt among the inputs: enable the distill stage, or set prune.enabled: "
                         "false.")
    data, seed = ctx.data(), ctx.recipe.seed
    model = models.load(ctx.path("student.pt"), inputs["student.pt"].meta)
    teachers, heads = load_teachers(inputs, ctx), teacher_heads(ctx)  # with tasks: the teacher of each task

    @torch.no_grad()
    def teacher(x: torch.Tensor) -> torch.Tensor:  # the teachers stay where they were loaded (CPU)
        outs = [t(x.to(device_of(t))).to(x.device) for t in teachers]
        return tasks.assemble(list(zip(outs, heads)), data.heads) if heads else outs[0]
    params0, macs0 = models.count(model, data.input_shape)
    acc0 = accuracy(model, data.test)
    # 2) prune: Torch-Pruning's dependency graph keeps coupled layers (residual adds, BN) consistent
    seed_everything(seed)
    prune_model(model, cfg, data.input_shape)
    params1, macs1 = models.count(model, data.input_shape)
    if params1 >= params0:
        raise StageError(f"prune: nothing was removed ({params0:,} params before and after): every layer is "
                         f"ignored or rounds back up. Lower prune.round_to or shorten prune.ignored_layers.")
    acc_pruned = accuracy(model, data.test)
    ctx.log(f"  pruned: params {params0:,} -> {params1:,}, MACs {macs0:,} -> {macs1:,} "
            f"(x{macs0 / macs1:.2f}); test acc {acc0:.4f} -> {acc_pruned:.4f} before fine-tuning")
    # 3) fine-tune with the distillation loss
    history: dict = {}
    if cfg.epochs:
        aug = train_augment(ctx)
        # without augmentation the teacher sees the same images every epoch: run it once, look outputs up by index
        cached = None if aug is not None else teacher_logits(teacher, data.train)
        head = tasks.per_head(lambda o, t, y: kd.hinton(o, t, y, cfg.temperature, cfg.alpha).mean(), data.heads)

        def kd_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            if cached is not None:
                t = cached[idx].to(x.device)
            else:  # fit() may train the student elsewhere than the teacher
                t = teacher(x)
            return head(m(x), t, y)
        desc = "student-pruned (KD fine-tune)"
        history = fit(model, kd_loss, data.train, data.val, cfg, seed=seed, desc=desc, augment=aug, log=ctx.log,
                      resume=ctx.resume(desc))
    # 4) check accuracy
    acc1 = accuracy(model, data.test)
    ctx.results["prune"] = {
        "ratio": cfg.ratio, "layer_ratios": cfg.layer_ratios, "global_pruning": cfg.global_pruning,
        "importance": cfg.importance, "round_to": cfg.round_to,
        "params_before": params0, "params_after": params1, "macs_before": macs0, "macs_after": macs1,
        "macs_reduction": macs0 / macs1, "channels": _conv_widths(model),
        "acc_before": acc0, "acc_after_prune": acc_pruned, "acc_after_finetune": acc1,
        "counted_by": "torch_pruning.utils.count_ops_and_params at batch 1",
        "history": history.get("history", [])}
    if data.heads:
        ctx.results["prune"]["heads"] = head_accuracy(model, data.test)
    ctx.log(f"  student-pruned: test acc {acc1:.4f} after {history.get('epochs_run', 0)} fine-tuning epochs "
            f"(unpruned {acc0:.4f})")
    # 5) save the whole module: its shape no longer matches the class it was built from
    return {"student-pruned.pt": model_artifact(
        ctx, model, "student-pruned.pt", "student-pruned", None, whole=True, predecessor="student.pt",
        params_before=params0, macs_before=macs0, test_acc=acc1, test_acc_before_finetune=acc_pruned)}


def prune_model(model: nn.Module, cfg: Config, input_shape: tuple[int, ...]) -> nn.Module:
    """Prune in place with Torch-Pruning; raise StageError naming the setting when it cannot."""
    import torch_pruning as tp
    model.eval()
    ignored = _modules(model, cfg.ignored_layers, "ignored_layers") if cfg.ignored_layers is not None \
        else [_classifier(model)]
    per_layer = dict(zip(_modules(model, list(cfg.layer_ratios), "layer_ratios"), cfg.layer_ratios.values()))
    example = torch.randn(2, *input_shape)
    try:
        with torch.no_grad():
            shape = model(example).shape
        pruner = tp.pruner.BasePruner(
            model, example[:1], importance=tp.importance.MagnitudeImportance(p=1 if cfg.importance == "l1" else 2),
            global_pruning=cfg.global_pruning, pruning_ratio=cfg.ratio, pruning_ratio_dict=per_layer or None,
            max_pruning_ratio=cfg.max_layer_ratio, ignored_layers=ignored, round_to=cfg.round_to)
        pruner.step()
        with torch.no_grad():  # a dependency the tracer missed shows up here as a shape error
            if model(example).shape != shape:
                raise RuntimeError(f"output shape changed from {tuple(shape)}")
    except Exception as e:  # tracing failures come as many exception types
        raise StageError(f"prune: torch-pruning could not trace or prune {type(model).__name__} "
                         f"({first_line(e)}). Add the offending "
                         f"module to prune.ignored_layers, or set prune.enabled: false.") from e
    return model


def _classifier(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StageError(f"prune.ignored_layers: {type(model).__name__} has no Linear classifier to keep whole; "
                         f"name the output layer(s) explicitly.")
    return linears[-1]


def _modules(model: nn.Module, names: list[str], setting: str) -> list[nn.Module]:
    out = []
    for n in names:
        try:
            out.append(model.get_submodule(n))
        except AttributeError:
            known = [k for k, _ in model.named_modules() if k][:12]
            raise StageError(f"prune.{setting}: no module '{n}' in {type(model).__name__}. Module names look "
                             f"like: {', '.join(known)} ...") from None
    return out


def _conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels per conv after pruning, for the report."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
