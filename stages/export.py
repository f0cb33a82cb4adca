"""export: every PyTorch artifact to ONNX (dynamo exporter, pinned opset, dynamic batch), checked for parity."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from pipeline.artifacts import Artifact, Artifacts
from pipeline.context import Context
from pipeline.device.ortbench import CPU, head_outputs, open_session
from pipeline.errors import StageError
from pipeline.settings import Strict
from pipeline.train import models, tasks
from pipeline.train.loop import predict
from stages._common import torch2onnx


class Config(Strict):
    opset: int = Field(18, ge=18, description="pinned; the torch.export-based exporter starts at 18")
    atol: float = Field(1e-4, gt=0, description="max |torch - onnxruntime| allowed, on logits")
    rtol: float = Field(1e-3, ge=0)
    parity_samples: int = Field(64, gt=0, description="test images run through both")
    external_data: bool = Field(False, description="weights in <name>.onnx.data (needed past 2 GB)")


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Export each torch model, check the graph, compare onnxruntime with PyTorch on the same inputs."""
    data = ctx.data()
    x, _ = data.test.arrays(limit=cfg.parity_samples)
    out: Artifacts = {}
    for name, art in inputs.items():
        if art.kind != "torch" or (art.meta.get("role") == "extra-teacher" and not art.meta.get("heads")):
            continue  # ensemble KD's aids are not candidates; a teacher of tasks is exported: its heads' reference
        # 1) load  2) export  3) check graph  4) parity on the same inputs
        model = models.load(ctx.path(name), art.meta)
        onnx_name = name.removesuffix(".pt") + ".onnx"
        path = ctx.path(onnx_name)
        heads = art.meta.get("heads")  # with tasks: one named output per head, the first task's first
        torch2onnx(tasks.HeadOutputs(model, tasks.select(data.heads, heads)[0]) if heads else model, path,
                   data.input_shape, cfg.opset, external_data=cfg.external_data, outputs=heads)
        expected = predict(model, x)
        got = np.concatenate(head_outputs(open_session(path, CPU, threads=0), x), axis=1)
        diff = np.abs(got - expected)
        parity = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "atol": cfg.atol, "rtol": cfg.rtol,
                  "samples": len(x), "argmax_agree": float((got.argmax(1) == expected.argmax(1)).mean())}
        if not np.allclose(got, expected, atol=cfg.atol, rtol=cfg.rtol):
            raise StageError(f"export: {onnx_name} differs from PyTorch beyond atol={cfg.atol}, rtol={cfg.rtol} "
                             f"(max |diff| {parity['max_abs']:.3g}). The graph is kept at {path} for inspection; "
                             f"raise export.atol only if the difference is understood.")
        ctx.log(f"  {onnx_name}: parity max |diff| {parity['max_abs']:.2e} on {len(x)} test images")
        meta = {k: v for k, v in art.meta.items() if k in ("role", "params", "macs", "test_acc", "heads")}
        if art.meta.get("predecessor"):  # the stage it should beat, for the report's "not faster" flag
            meta["predecessor"] = art.meta["predecessor"].removesuffix(".pt") + ".onnx"
        out[onnx_name] = Artifact(name=onnx_name, kind="onnx", stage="export", meta={
            **meta, "precision": "fp32", "source": name, "source_stage": art.stage, "opset": cfg.opset,
            "parity_vs_torch": parity})
    ctx.results["export"] = {k: a.meta["parity_vs_torch"] for k, a in out.items()}
    return out


