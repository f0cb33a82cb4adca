"""quantize: ONNX-to-ONNX INT8 (static, calibrated) and FP16 transforms with onnxruntime. Off by default."""
from __future__ import annotations

from pydantic import BaseModel

from pipeline.artifacts import Artifacts
from pipeline.context import Context

USES_PROFILE = True


class Config(BaseModel, extra="forbid"):
    enabled: bool = False
    preset: str | None = None


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Not yet implemented."""
    return {}
