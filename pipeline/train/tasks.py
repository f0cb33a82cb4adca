"""Multi-task labels and heads (recipe `tasks:`).

A multi-task model is one backbone with one linear head per task. Every architecture the pipeline builds ends in
a linear classifier, so the heads are that last layer built with the sum of the tasks' class counts, its rows
split by task: the same function as separate nn.Linear heads over the shared features, with no surgery on
torchvision or user factories, and a pruner that leaves the last layer alone leaves every head alone. Export
splits the logits into one named ONNX output per head (`HeadOutputs`).

Labels: a split's `labels` is (N,) for a single task and (N, tasks) with tasks, column 0 the class.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError

# digits' built-in second tasks: class names, and the label of each digit 0..9
DIGITS_TASKS = {"parity": (("even", "odd"), lambda d: d % 2),
                "ge5": (("lt5", "ge5"), lambda d: (d >= 5).astype(np.int64))}


@dataclass(frozen=True)
class Head:
    name: str
    classes: tuple[str, ...]
    weight: float = 1.0
    labels: str = "class"  # where the labels come from: class, parity, ge5, or a CSV path

    def describe(self) -> dict:
        """For splits.json, benchmark.json and the report: a CSV by its file name (the host's path stays home)."""
        labels = Path(self.labels).name if self.labels.endswith(".csv") else self.labels
        return {"name": self.name, "classes": list(self.classes), "weight": self.weight, "labels": labels}


def read_csv(path: Path) -> dict[str, str]:
    """relative_path -> label from a CSV of `relative_path,label` rows (a header row of that shape is skipped)."""
    out: dict[str, str] = {}
    try:
        with open(path, newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or (n == 1 and [c.strip().lower() for c in row] in (["relative_path", "label"],
                                                                               ["path", "label"])):
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise ConfigError(f"{path}: line {n}: expected 'relative_path,label', got {','.join(row)!r}. "
                                      f"Fix the row: one image path (relative to data.root) and its label.")
                key = Path(row[0].strip()).as_posix()
                if key in out and out[key] != row[1].strip():
                    raise ConfigError(f"{path}: line {n}: {key} is labelled twice ('{out[key]}' and "
                                      f"'{row[1].strip()}'). Keep one row per image.")
                out[key] = row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot read this labels CSV ({e}). Give a UTF-8 file of relative_path,label "
                          f"rows.") from None
    if not out:
        raise ConfigError(f"{path}: no rows. Give one 'relative_path,label' row per image.")
    return out


def task_classes(labels: str, primary: list[str]) -> tuple[str, ...]:
    """A task's class names: the data's classes, a built-in digits task's, or the CSV's labels sorted."""
    if labels == "class":
        return tuple(primary)
    if labels in DIGITS_TASKS:
        return DIGITS_TASKS[labels][0]
    classes = tuple(sorted(set(read_csv(Path(labels)).values())))
    if len(classes) < 2:
        raise ConfigError(f"{labels}: every row has the label '{classes[0]}'; a task needs at least two labels to "
                          f"learn anything. Fix the CSV, or remove the task.")
    return classes


def make_heads(tasks, primary: list[str]) -> list[Head]:
    """The recipe's tasks as heads (none without tasks: the model has one output, the class)."""
    return [Head(t.name, task_classes(t.labels, primary), t.weight, t.labels) for t in tasks]


def read_csvs(heads: list[Head]) -> dict[str, dict[str, str]]:
    """Every CSV task's rows, read once for all splits (head_labels' `csvs`)."""
    return {h.labels: read_csv(Path(h.labels)) for h in heads if h.labels.endswith(".csv")}


def head_labels(heads: list[Head], y: np.ndarray, ids: list[str], csvs: dict[str, dict[str, str]]) -> np.ndarray:
    """(N, tasks) labels for one split from its class labels y and its image ids (paths relative to data.root)."""
    cols = []
    for h in heads:
        if h.labels == "class":
            cols.append(y)
        elif h.labels in DIGITS_TASKS:
            cols.append(DIGITS_TASKS[h.labels][1](y))
        else:
            rows, index = csvs[h.labels], {c: i for i, c in enumerate(h.classes)}
            missing = [i for i in ids if i not in rows]
            if missing:
                raise ConfigError(f"{h.labels}: no label for {missing[0]} (task '{h.name}')"
                                  f"{f' and {len(missing) - 1} more images' if len(missing) > 1 else ''}. Add a "
                                  f"'relative_path,label' row for every image under data.root.")
            cols.append(np.array([index[rows[i]] for i in ids], np.int64))
    return np.stack(cols, 1).astype(np.int64)


def select(heads: list[Head], names: list[str] | None) -> tuple[list[Head], list[int]]:
    """The heads a model predicts (None: all) and their label columns."""
    cols = [i for i, h in enumerate(heads) if names is None or h.name in names]
    return [heads[i] for i in cols], cols


# ---------------------------------------------------------------- torch side
def sizes(heads: list[Head]) -> list[int]:
    return [len(h.classes) for h in heads]


def assemble(outs: list[tuple[torch.Tensor, list[Head]]], heads: list[Head]) -> torch.Tensor:
    """Logits for every head in task order, each taken from the first model (its logits, its heads) that has it:
    one multi-head teacher, or one teacher per task."""
    found: dict[str, torch.Tensor] = {}
    for out, mine in outs:
        for h, o in zip(mine, split_logits(out, mine)):
            found.setdefault(h.name, o)
    return torch.cat([found[h.name] for h in heads], dim=1)


def split_logits(out: torch.Tensor, heads: list[Head]) -> list[torch.Tensor]:
    return list(torch.split(out, sizes(heads), dim=1)) if heads else [out]


def primary(out: torch.Tensor, y: torch.Tensor, heads: list[Head]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first head's logits and labels: what `accuracy` and every single-number figure mean."""
    if not heads:
        return out, y
    return out[:, :len(heads[0].classes)], y[:, 0]


def correct(out: torch.Tensor, y: torch.Tensor, heads: list[Head]) -> list[int]:
    """Right predictions per head (one count without heads)."""
    if not heads:
        return [int((out.argmax(1) == y).sum())]
    return [int((o.argmax(1) == y[:, i]).sum()) for i, o in enumerate(split_logits(out, heads))]


HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def per_head(fn: HeadLoss, heads: list[Head]) -> HeadLoss:
    """fn(student logits, teacher logits, labels) -> scalar, as the weighted sum over heads: sum_t w_t fn_t."""
    if not heads:
        return fn

    def loss(out: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = sizes(heads)
        return sum(h.weight * fn(o, tt, y[:, i]) for i, (h, o, tt)
                   in enumerate(zip(heads, torch.split(out, n, dim=1), torch.split(t, n, dim=1))))
    return loss


def ce(heads: list[Head]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy, summed over heads with their weights: the scratch baseline's and a teacher's loss."""
    import torch.nn.functional as F
    if not heads:
        return F.cross_entropy
    return lambda out, y: per_head(lambda o, _t, yy: F.cross_entropy(o, yy), heads)(out, out, y)


class HeadOutputs(nn.Module):
    """The model with its logits split into one output per head, for export (ONNX output names = task names)."""

    def __init__(self, model: nn.Module, heads: list[Head]):
        super().__init__()
        self.model, self.n = model, sizes(heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.split(self.model(x), self.n, dim=1))
