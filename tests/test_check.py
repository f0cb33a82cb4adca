"""`pipeline check`: one line per check, exit 0 when a run has what it needs, 2 with the sentence when not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import DEFAULT_RECIPE, ModelSpec
from pipeline.train import models

runner = CliRunner()
CHECKS = ["profile", "recipe", "paths", "data", "models.teacher", "models.student", "teacher on a batch", "device"]


def check(*args: str, env: dict | None = None):
    res = runner.invoke(app, ["check", *args], env={"PIPELINE_DEVICE": "", **(env or {})})
    assert "Traceback" not in res.stdout + res.stderr and "(a bug in the check" not in res.stdout
    return res, {line[6:].split(":")[0]: line[:4].strip() for line in res.stdout.splitlines() if line[4:6] == "  "}


def recipe_with(tmp_path: Path, **sections) -> Path:
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_default_recipe_is_ready_with_one_ok_line_per_check():
    res, status = check()
    assert res.exit_code == 0, res.stdout
    assert status == {name: "ok" for name in CHECKS}
    assert "ok    data: digits: 1,797 images, 10 classes, a batch of 16 read" in res.stdout
    assert "ok    teacher on a batch: a batch of 16 real images gives (16, 10) finite scores" in res.stdout
    assert res.stdout.splitlines()[-1].startswith("ready: checked in ")


def test_a_pre_0_4_1_checkpoint_teacher_is_ready(tmp_path):
    spec = ModelSpec(arch="cnn", kwargs={"channels": [8, 16]})
    state = models.build(spec, 1, 10, 8).state_dict()
    state = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "best_prec1": 91.0}, tmp_path / "teacher.th")
    path = recipe_with(tmp_path, models={"teacher": {"arch": "cnn", "kwargs": {"channels": [8, 16]},
                                                     "checkpoint": "teacher.th"}, "student": {"arch": "mlp"}})
    res, status = check("--recipe", str(path))
    assert res.exit_code == 0, res.stdout
    assert "ok    models.teacher: arch cnn with checkpoint teacher.th: builds, gives 10 class scores" in res.stdout


def test_a_bad_checkpoint_fails_its_line_skips_what_needs_it_and_checks_the_rest(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"")
    path = recipe_with(tmp_path, models={"teacher": {"arch": "cnn", "checkpoint": "teacher.pt"},
                                         "student": {"arch": "mlp"}})
    res, status = check("--recipe", str(path))
    assert res.exit_code == 2
    assert status == {**{name: "ok" for name in CHECKS}, "models.teacher": "FAIL", "teacher on a batch": "skip"}
    assert f"FAIL  models.teacher: {path}: models.teacher.checkpoint: {tmp_path / 'teacher.pt'}: is empty" in res.stdout
    assert res.stdout.splitlines()[-1].startswith("not ready")


def test_an_unknown_profile_fails_and_the_recipe_is_still_checked_without_overrides():
    res, status = check("--profile", "jetsn")
    assert res.exit_code == 2
    assert status["profile"] == "FAIL" and status["recipe"] == "ok" and status["device"] == "skip"
    assert "FAIL  profile: Unknown profile 'jetsn'. Available: edge-cpu, jetson, server-gpu" in res.stdout


def _image_folder(root: Path, classes: int = 3, per_class: int = 4) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")


def test_an_image_folder_is_listed_and_a_few_images_decoded(tmp_path):
    _image_folder(tmp_path / "images")
    path = recipe_with(tmp_path, data={"kind": "imagefolder", "root": "images", "channels": 3, "image_size": 8})
    res, status = check("--recipe", str(path))
    assert res.exit_code == 0, res.stdout
    assert f"ok    data: imagefolder {tmp_path / 'images'}: 3 classes, 12 images listed, 12 decoded" in res.stdout
    assert "ok    teacher on a batch: a batch of 12 real images gives (12, 3) finite scores" in res.stdout


def test_an_image_that_does_not_decode_is_named(tmp_path):
    _image_folder(tmp_path / "images")
    (tmp_path / "images" / "class1" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    path = recipe_with(tmp_path, data={"kind": "imagefolder", "root": "images", "channels": 3, "image_size": 8})
    res, status = check("--recipe", str(path))
    assert res.exit_code == 2 and status["data"] == "FAIL"
    assert f"FAIL  data: {tmp_path / 'images' / 'class1' / '0.png'} (data.root): cannot read this image" in res.stdout


def _profile_with_device(tmp_path: Path, remote, port: int) -> Path:
    prof = yaml.safe_load(Path("profiles/edge-cpu.yaml").read_text())
    prof["device"] = {"host": remote.host, "port": port, "user": remote.user,
                      "identity_file": str(remote.identity_file), "known_hosts": str(remote.known_hosts)}
    path = tmp_path / "with-device.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def test_a_named_device_is_reached_over_ssh(sshd, tmp_path):
    res, status = check("--profile", str(_profile_with_device(tmp_path, sshd, sshd.port)))
    assert res.exit_code == 0, res.stdout
    assert f"ok    device: {sshd.user}@127.0.0.1 port {sshd.port} answers `ssh ... true`" in res.stdout


def test_an_unreachable_device_fails_with_ssh_s_reason(sshd, tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on: bound, not listening
        s.bind(("127.0.0.1", 0))
        res, status = check("--profile", str(_profile_with_device(tmp_path, sshd, s.getsockname()[1])))
    assert res.exit_code == 2 and status["device"] == "FAIL"
    assert f"FAIL  device: Could not connect to {sshd.user}@127.0.0.1 port" in res.stdout


@pytest.mark.parametrize("spec", ["user@-oProxyCommand=x", "user@host:99999"])
def test_a_malformed_pipeline_device_fails_its_line(spec):
    res, status = check(env={"PIPELINE_DEVICE": spec})
    assert res.exit_code == 2 and status["device"] == "FAIL"
    assert f"PIPELINE_DEVICE={spec!r}" in res.stdout
