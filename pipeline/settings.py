"""The base of every settings model (recipes, profiles, stage configs, training): strict, so a typo is an error.

A key the model does not know is refused (extra="forbid"), and so is inf or nan where a number goes: a budget,
a learning rate or a tolerance of inf is a typo, never a setting (no budget is null). It imports nothing of the
pipeline, so every layer may build on it.
"""
from __future__ import annotations

from pydantic import BaseModel


class Strict(BaseModel, extra="forbid", allow_inf_nan=False):
    pass
