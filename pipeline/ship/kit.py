"""Benchmark on a device over SSH: stage a kit, copy it, run device/runner.py there, merge its rows.

The device is named by the profile (`device:`) or by PIPELINE_DEVICE=user@host:port; in both cases
PIPELINE_DEVICE_KNOWN_HOSTS / PIPELINE_DEVICE_IDENTITY / PIPELINE_DEVICE_PYTHON, when set, name the
known_hosts file, the key and the interpreter. Host keys are always verified (pipeline/ship/ssh.py).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.artifacts import files
from pipeline.config import DeviceSpec
from pipeline.context import Context
from pipeline.device.manifest import checksums
from pipeline.device.measure import BenchSettings, ModelEntry
from pipeline.errors import StageError
from pipeline.ship import ssh as sshlink
from pipeline.train.data import Splits

DEVICE_DIR = Path(__file__).resolve().parent.parent / "device"
# test images copied to the device for its accuracy rows: the first N of the test split (the row says n=)
DEVICE_TEST_IMAGES = 2000


# what only this machine knows (its key, its known_hosts) or the device's interpreter: these win over a profile's
# device: fields, for a benchmark (PIPELINE_DEVICE or the profile's device) and for `ship --to` alike
DEVICE_ENV = {"known_hosts": "PIPELINE_DEVICE_KNOWN_HOSTS", "identity_file": "PIPELINE_DEVICE_IDENTITY",
              "python": "PIPELINE_DEVICE_PYTHON"}


def resolve(device: str | DeviceSpec, profile_device: DeviceSpec | None = None) -> sshlink.Remote:
    """The device: a profile's `device:`, or `[user@]host[:port]` (PIPELINE_DEVICE, ship --to) with the other
    fields of `profile_device`; PIPELINE_DEVICE_* win over both. ValueError names a bad value."""
    env = {name: os.environ[var] for name, var in DEVICE_ENV.items() if os.environ.get(var)}
    if isinstance(device, DeviceSpec):
        return sshlink.Remote.model_validate({**device.model_dump(), **env})
    fields = profile_device.model_dump(include=set(DEVICE_ENV)) if profile_device else {}
    return sshlink.Remote.parse(device, **{**fields, **env})


# `python3 -m device.runner` puts the kit folder first on sys.path, so a stray json.py there would run in place of
# the stdlib's. -I (or 3.11's -P) would drop the folder, but -I also drops PYTHONPATH and user site-packages, where
# JetPack setups and `pip install --user` put onnxruntime, and devices run Python 3.8 to 3.10. So -c drops the ''
# entry and puts the folder ('.': commands run in it) last, after the stdlib and site-packages, so only what is
# found nowhere else (our `device`) comes from it. -B: no __pycache__ written into the kit (verify would refuse it).
_LAUNCH = ('import sys; sys.path[:] = [p for p in sys.path if p not in ("", ".")] + ["."]; '
           'from device.{module} import main; sys.exit(main())')


def device_command(python: str, module: str, *args: str) -> list[str]:
    """argv that runs device/<module>.py's main(args) in the kit or bundle folder it is started in."""
    return [python, "-B", "-c", _LAUNCH.format(module=module), *args]


def copy_payload(dest: Path, model_paths: list[Path]) -> None:
    """What a benchmark kit and a shipped bundle both carry: models/ (each model with its sidecar weight files)
    and device/ (the runner, pipeline/device/*.py)."""
    for sub in ("models", "device"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for p in model_paths:
        for f in files(p):
            shutil.copy2(f, dest / "models" / f.name)
    for f in sorted(DEVICE_DIR.glob("*.py")):
        shutil.copy2(f, dest / "device" / f.name)


def stage_kit(kit: Path, models: list[ModelEntry], data: Splits, refs: dict[str, np.ndarray],
              settings: BenchSettings, ctx: Context, n_test: int | None = None) -> None:
    """models/, data/test_batch.npz, device/*.py and manifest.json with every file's sha256."""
    if kit.exists():
        shutil.rmtree(kit)
    (kit / "data").mkdir(parents=True)
    copy_payload(kit, [m.path for m in models])
    x, y = data.test.arrays(limit=n_test or DEVICE_TEST_IMAGES)
    n = len(y)
    def first(a: np.ndarray) -> np.ndarray:  # with tasks the device judges the first task's head (first output)
        return a[:, 0] if a.ndim == 2 else a
    np.savez(kit / "data" / "test_batch.npz", x=x, y=first(y), **{f"ref_{k}": first(v)[:n] for k, v in refs.items()})
    listed = checksums(kit)
    manifest = {"kind": "benchmark-kit", "run_id": ctx.run_dir.name, "files": listed,
                "models": [{"name": m.name, "file": f"models/{m.path.name}", "precision": m.precision,
                            "meta": m.meta} for m in models],
                "providers": _providers(ctx), "tensorrt": ctx.profile.target.tensorrt,
                "input_name": "input", "settings": asdict(settings)}
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))


def remote_rows(device: str | DeviceSpec, models: list[ModelEntry], data: Splits, refs: dict[str, np.ndarray],
                settings: BenchSettings, ctx: Context) -> list[dict]:
    """Rows measured on the device, labelled with its hostname, board and runtime versions."""
    try:
        remote = resolve(device)
    except ValueError as e:
        named = f"PIPELINE_DEVICE={device!r}" if isinstance(device, str) else "the profile's device"
        raise StageError(f"benchmark: {named}: {e}") from None
    kit = ctx.path("device-kit")
    stage_kit(kit, models, data, refs, settings, ctx)
    try:
        base = sshlink.resolve_path(remote, remote.workdir)
        target = f"{base.rstrip('/')}/{ctx.run_dir.name}"
        ctx.log(f"  device {remote.destination}:{remote.port}: copying kit to {target}")
        sshlink.run(remote, ["rm", "-rf", "--", f"{target}/device-kit"])
        sshlink.put(remote, [kit], target)
        proc = sshlink.run(remote, device_command(remote.python, "runner", "."), cwd=f"{target}/device-kit",
                           timeout=3600, check=False)
    except (sshlink.RemoteError, ValueError) as e:
        raise StageError(f"benchmark: device {remote.destination}:{remote.port}: {e}") from None
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise StageError(f"benchmark: the device runner printed no JSON (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-800:]}") from None
    if proc.returncode != 0:
        raise StageError(f"benchmark: device runner exit {proc.returncode}: {doc.get('error')}: "
                         f"{'; '.join(doc.get('problems', []))}")
    (ctx.path("device-result.json")).write_text(json.dumps(doc, indent=1))
    ssh = f"{remote.destination}:{remote.port}"
    for r in doc["rows"]:
        r["where"] = {**r["where"], "ssh": ssh, "versions": doc.get("versions")}
    return doc["rows"]


def _providers(ctx: Context) -> list[str]:
    """The profile's providers, plus the device's CPU as a labelled reference."""
    from pipeline.device.ortbench import CPU
    asked = list(ctx.profile.target.providers)
    return asked if CPU in asked else asked + [CPU]
