"""What machine and runtimes produced a number: stdlib only, optional packages probed by import."""
from __future__ import annotations

import os
import platform
import socket
from importlib import metadata

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16",
                     "asimd", "asimddp", "fp16")


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and model in ("", platform.machine(), "x86_64"):
                    model = val.strip()
                elif key in ("flags", "Features"):
                    flags.update(val.split())
    except OSError:
        pass
    return {"model": model, "arch": platform.machine(), "cores": os.cpu_count(),
            "flags": sorted(f for f in INTERESTING_FLAGS if f in flags),
            "vnni": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)}


def versions(*names: str) -> dict:
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def jetson_model() -> str | None:
    """Jetsons expose the board name in the device tree."""
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            with open(p, "rb") as f:
                return f.read().rstrip(b"\0").decode(errors="replace")
        except OSError:
            continue
    return None


def gpu_info() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi reports them; empty where there is none (or no nvidia-smi, as on Jetsons)."""
    import shutil
    import subprocess
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keys = ("name", "compute_capability", "driver", "memory")
    return [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in out.splitlines() if line.strip()]


def compute_capability() -> str | None:
    """'8.7' for CUDA device 0, None where no driver or GPU answers. The one reading of it: TensorRT engines are
    keyed by it (trtbench, trt_api). The driver API through ctypes: no torch or cuda-python on a device."""
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h); a non-zero result is an error
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0) \
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) \
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev):
        return None
    return f"{major.value}.{minor.value}"


def describe(kind: str) -> dict:
    """`where` of a row: host or device, with the machine's name, CPU and runtime versions."""
    import onnxruntime as ort
    return {"kind": kind, "hostname": socket.gethostname(), "cpu": cpu_info(), "gpus": gpu_info(),
            "board": jetson_model(),
            "os": f"{platform.system()} {platform.release()}",
            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers()}
