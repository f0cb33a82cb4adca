"""export: real ONNX files that match PyTorch; sizes and hashes count external weight files."""
from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from pipeline.artifacts import files, fingerprint
from pipeline.device.ortbench import CPU, logits, open_session
from pipeline.train.models import SmallCNN
from stages._common import torch2onnx
from stages.export import Config


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallCNN(1, 10, 8, channels=[8, 16]).eval()


def test_export_matches_pytorch_with_a_dynamic_batch(tmp_path):
    model, path = _model(), tmp_path / "m.onnx"
    torch2onnx(model, path, (1, 8, 8), 18)
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == Config().opset
    dim0 = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param, "batch dimension must be dynamic"
    sess = open_session(path, CPU, threads=1)
    for n in (1, 7, 33):
        x = np.random.default_rng(n).standard_normal((n, 1, 8, 8)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(logits(sess, x), want, atol=1e-4, rtol=1e-3)


def test_external_data_is_counted_in_size_and_hash(tmp_path):
    model = _model()
    inline, external = tmp_path / "inline.onnx", tmp_path / "ext" / "m.onnx"
    external.parent.mkdir()
    torch2onnx(model, inline, (1, 8, 8), 18)
    torch2onnx(model, external, (1, 8, 8), 18, external_data=True)
    sidecars = files(external)[1:]
    assert sidecars and all(p.exists() for p in sidecars), "expected weights in a .data file"
    h1, size = fingerprint(external)
    assert size == sum(p.stat().st_size for p in files(external))
    assert size > external.stat().st_size
    data = bytearray(sidecars[0].read_bytes())
    data[-1] ^= 0x01  # one weight bit in the sidecar changes the artifact's hash
    sidecars[0].write_bytes(bytes(data))
    assert fingerprint(external)[0] != h1


def test_export_stage_records_parity(real_run):
    stages = json.loads((real_run / "run.json").read_text())["stages"]
    rec = stages["export"]
    torch_models = {n for s in stages.values() for n, o in s.get("outputs", {}).items() if o["kind"] == "torch"}
    assert {"teacher.pt", "student.pt", "student-scratch.pt"} <= torch_models
    assert set(rec["outputs"]) == {n.removesuffix(".pt") + ".onnx" for n in torch_models}
    for out in rec["outputs"].values():
        parity = out["meta"]["parity_vs_torch"]
        assert parity["max_abs"] <= parity["atol"] + parity["rtol"] * 100 and parity["argmax_agree"] == 1.0
