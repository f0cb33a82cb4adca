"""pipeline/train/qat.py: fake-quantized layers on the INT8 grid onnxruntime uses, with straight-through gradients.
The whole QAT path (fine-tuning, export, real integer kernels) is tested through the stage in
tests/stages/test_quantize.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train import qat


def test_fake_quantized_layer_rounds_weights_and_passes_gradients():
    conv = nn.Conv2d(2, 3, 3)
    s = {"reduce_range": False, "activation_type": "u8", "symmetric_activations": False}
    fq = qat.FakeQuantLayer(conv, s).train()
    x = torch.randn(4, 2, 5, 5)
    out = fq(x)
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0  # straight-through estimator
    w = conv.weight.detach()
    scale = w.abs().flatten(1).amax(1) / 127
    levels = (w / scale.view(-1, 1, 1, 1))
    # the forward used weights on the INT8 grid: the same conv on rounded weights and inputs gives `out`
    wq = torch.round(levels) * scale.view(-1, 1, 1, 1)
    xs = (fq.hi - fq.lo) / 255
    zp = torch.round(-fq.lo / xs)
    xq = (torch.clamp(torch.round(x / xs) + zp, 0, 255) - zp) * xs
    assert torch.allclose(out, F.conv2d(xq, wq, conv.bias), atol=1e-5)
    assert not torch.allclose(out, conv(x), atol=1e-3)  # and that is not the float conv


def test_wrap_then_unwrap_gives_back_the_same_layers_and_observe_sets_the_input_ranges():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    conv, linear = model[0], model[3]
    wrapped = qat.wrap(model, {"reduce_range": False, "activation_type": "u8", "symmetric_activations": False})
    assert [type(m) for m in (model[0], model[3])] == [qat.FakeQuantLayer] * 2 and len(wrapped) == 2
    x = torch.rand(8, 1, 8, 8) * 3
    qat.observe(model, wrapped, x)
    assert float(model[0].hi) == float(x.max()) and float(model[0].lo) == 0  # the first pass sets the range
    assert float(model[3].hi) > 0
    qat.unwrap(wrapped)
    assert model[0] is conv and model[3] is linear
