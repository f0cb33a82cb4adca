"""Roofline estimates for a target we could not measure: labelled estimates, never measurements.

A model cannot run faster than its arithmetic at the device's peak, nor faster than moving its bytes at the
device's memory bandwidth; the larger of the two is a lower bound on latency. Real latency is higher (kernel
launch, low utilisation at batch 1), so the figure is shown as a bound, with its formula.
"""
from __future__ import annotations

from pipeline.config import Hardware


def roofline(macs: int, file_bytes: int, io_bytes: int, precision: str, hw: Hardware) -> tuple[float, str]:
    """(lower bound in ms, formula)."""
    peak = hw.peak_tflops.get(precision) or hw.peak_tflops.get("fp32")
    if not peak:
        raise ValueError(f"hardware.peak_tflops has no '{precision}' or 'fp32' entry")
    t_compute = 2 * macs / (peak * 1e12)
    moved = file_bytes + io_bytes
    t_memory = moved / (hw.memory_bandwidth_gbs * 1e9)
    ms = max(t_compute, t_memory) * 1e3
    formula = (f"estimated lower bound: max(2 x {macs:,} MACs / {peak} TFLOP/s ({precision}), "
               f"{moved:,} bytes (weights file + I/O) / {hw.memory_bandwidth_gbs} GB/s) = {ms:.4f} ms; "
               f"datasheet figures from the profile{': ' + hw.source if hw.source else ''}")
    return ms, formula


def energy(power_w: float, ms: float, what: str) -> tuple[float, str]:
    mj = power_w * ms  # W x ms = mJ
    return mj, f"estimated: {power_w} W (profile power_w) x {ms:.4f} ms ({what}) = {mj:.4f} mJ"
