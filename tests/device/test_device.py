"""The device flow for real: a kit over SSH to a real sshd on 127.0.0.1, the runner there, rows merged back."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.config import DEFAULT_RECIPE, DeviceSpec, load_profile
from pipeline.errors import StageError
from pipeline.runner import Runner
from pipeline.ship.kit import DEVICE_ENV, device_command, resolve
from pipeline.ship.ssh import run
from stages.benchmark import NOT_ON_TARGET
from tests.conftest import fast_recipe


def _copy_run(real_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / real_run.name
    shutil.copytree(real_run, run_dir)
    return run_dir


def _device_env(monkeypatch, sshd, **over) -> None:
    monkeypatch.setenv("PIPELINE_DEVICE", f"{sshd.user}@127.0.0.1:{sshd.port}")
    monkeypatch.setenv("PIPELINE_DEVICE_KNOWN_HOSTS", str(sshd.known_hosts))
    monkeypatch.setenv("PIPELINE_DEVICE_IDENTITY", str(sshd.identity_file))
    monkeypatch.setenv("PIPELINE_DEVICE_PYTHON", over.get("python", sys.executable))  # has numpy + onnxruntime


def _jetson(run_dir: Path):
    profile = load_profile("jetson")
    runner = Runner(run_dir, fast_recipe(profile), profile, recipe_path=DEFAULT_RECIPE, console=Console(quiet=True))
    runner.run(resume=True)
    return json.loads((run_dir / "report.json").read_text()), json.loads((run_dir / "run.json").read_text())


def test_jetson_profile_on_a_device_over_ssh(real_run, tmp_path, monkeypatch, sshd):
    _device_env(monkeypatch, sshd)
    report, record = _jetson(_copy_run(real_run, tmp_path))
    assert record["stages"]["teacher"].get("reused") and record["stages"]["export"].get("reused")
    device = [r for r in report["rows"] if r["where"]["kind"] == "device"]
    assert device, "no rows came back from the device"
    assert {r["where"]["ssh"] for r in device} == {f"{sshd.user}@127.0.0.1:{sshd.port}"}
    # the fake device has no GPU: the providers the profile asks for are skipped there, with the reason
    gpu = [r for r in device if r["provider"] != "CPUExecutionProvider"]
    assert gpu and all(r["status"] == "skipped" and r["provider"] in r["reason"] for r in gpu)
    # its CPU is measured, labelled device, and is not a Jetson GPU number
    cpu = [r for r in device if r["provider"] == "CPUExecutionProvider" and r["precision"] != "fp16"]
    assert cpu and all(r["status"] == "measured" and not r["on_target"] for r in cpu)
    fp16 = [r for r in device if r["provider"] == "CPUExecutionProvider" and r["precision"] == "fp16"]
    assert all(r["status"] == "skipped" and "FP16 on CPU" in r["reason"] for r in fp16)
    host = {r["artifact"]: r for r in report["rows"] if r["where"]["kind"] == "host" and r["status"] == "measured"}
    for r in cpu:  # same model, same images, another process on another "machine": same predictions
        assert r["accuracy"] == pytest.approx(host[r["artifact"]]["accuracy"])
    assert NOT_ON_TARGET not in report["notes"]
    assert {r["artifact"] for r in report["rows"] if r["status"] == "estimated"} == {r["artifact"] for r in report["rows"]}


def test_jetson_profile_without_a_device_says_so(real_run, tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_DEVICE", raising=False)
    report, _ = _jetson(_copy_run(real_run, tmp_path))
    assert NOT_ON_TARGET in report["notes"]
    assert not any(r["on_target"] for r in report["rows"])
    trt = [r for r in report["rows"] if r["backend"] == "tensorrt"]
    assert trt and all(r["status"] == "skipped" and "TensorRT not installed" in r["reason"] for r in trt)
    est = [r for r in report["rows"] if r["status"] == "estimated"]
    assert est and all("lower bound" in r["latency_source"] and r["energy_source"].startswith("estimated")
                       for r in est)


def test_profile_values_cannot_inject_shell(real_run, tmp_path, monkeypatch, sshd):
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    _device_env(monkeypatch, sshd, python=f"python3; touch {marker}")
    with pytest.raises(StageError):
        _jetson(_copy_run(real_run, tmp_path))
    assert not marker.exists()


def test_runner_refuses_a_tampered_kit(real_run, tmp_path, monkeypatch, sshd):
    _device_env(monkeypatch, sshd)
    run_dir = _copy_run(real_run, tmp_path)
    _jetson(run_dir)
    kit = run_dir / "device-kit"
    model = next((kit / "models").glob("*.onnx"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    proc = subprocess.run(device_command(sys.executable, "runner", "."), cwd=kit, capture_output=True, text=True)
    assert proc.returncode == 3
    doc = json.loads(proc.stdout)
    assert any(model.name in p and "differs from the manifest" in p for p in doc["problems"])


def test_device_variables_win_over_a_profiles_device(monkeypatch, tmp_path):
    spec = DeviceSpec(host="jetson.local", user="nvidia", python="python3.8", known_hosts="/etc/kh")
    for var in DEVICE_ENV.values():
        monkeypatch.delenv(var, raising=False)
    assert (resolve(spec).python, resolve(spec).known_hosts) == ("python3.8", Path("/etc/kh"))
    monkeypatch.setenv("PIPELINE_DEVICE_PYTHON", "/opt/py/bin/python3")
    monkeypatch.setenv("PIPELINE_DEVICE_KNOWN_HOSTS", str(tmp_path / "kh"))
    monkeypatch.setenv("PIPELINE_DEVICE_IDENTITY", str(tmp_path / "id"))
    for remote in (resolve(spec), resolve("pi@10.0.0.5:2222", spec), resolve("pi@10.0.0.5:2222")):
        assert (remote.python, remote.known_hosts, remote.identity_file) == (
            "/opt/py/bin/python3", tmp_path / "kh", tmp_path / "id")
    assert (resolve(spec).destination, resolve("pi@10.0.0.5:2222", spec).destination) == (
        "nvidia@jetson.local", "pi@10.0.0.5")
    monkeypatch.delenv("PIPELINE_DEVICE_PYTHON")
    assert resolve("pi@10.0.0.5", spec).python == "python3.8"  # ship --to: the profile's interpreter elsewhere


def test_a_profiles_device_reaches_sshd_with_the_key_from_the_environment(monkeypatch, sshd):
    # the profile names the device but not this machine's key or known_hosts: the variables supply them
    spec = DeviceSpec(host="127.0.0.1", user=sshd.user, port=sshd.port)
    monkeypatch.setenv("PIPELINE_DEVICE_KNOWN_HOSTS", str(sshd.known_hosts))
    monkeypatch.setenv("PIPELINE_DEVICE_IDENTITY", str(sshd.identity_file))
    assert run(resolve(spec), ["echo", "ok"], timeout=30).stdout == "ok\n"
