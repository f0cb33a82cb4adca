"""The stages, one module each, and the single source of their order.

A stage module has a typed `Config` (its recipe section) and `run(inputs, cfg, ctx) -> outputs`. The runner,
the recipe model and the contract test iterate over STAGES and look modules up with `load(name)`; nothing
else knows the list.
"""
from __future__ import annotations

from importlib import import_module
from types import ModuleType

STAGES: tuple[str, ...] = ("teacher", "distill", "prune", "export", "quantize", "benchmark", "report")


def load(name: str) -> ModuleType:
    """The module of stage `name` (imported on first use: stages import torch and onnxruntime)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}'. Stages: {', '.join(STAGES)}")
    return import_module(f"stages.{name}")
