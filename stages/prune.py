"""prune: structured pruning that removes channels (Torch-Pruning), then KD fine-tuning. Off by default."""
from __future__ import annotations

from pydantic import BaseModel, Field

from pipeline.artifacts import Artifacts
from pipeline.context import Context


class Config(BaseModel, extra="forbid"):
    enabled: bool = False
    ratio: float = Field(0.5, gt=0, lt=1, description="share of channels removed per layer")


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Not yet implemented."""
    return {}
