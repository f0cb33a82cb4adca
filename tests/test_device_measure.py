"""pipeline/device/measure.py: its settings, and rows measured on a tiny real ONNX model."""
from __future__ import annotations

from pipeline.device.measure import BenchSettings
from stages.benchmark import Config, settings


class _Target:
    threads, batch_sizes = [1], [1]


def test_the_timing_cap_has_one_default():
    assert BenchSettings().max_duration_s == Config().max_duration_s == 60.0
    assert settings(Config(), _Target()).max_duration_s == 60.0
