"""Bundles from a real run: contents, verification, one flipped byte refused, atomic writes, SSH delivery."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_profile
from pipeline.device import manifest as mf
from pipeline.errors import ConfigError
from pipeline.ship import bundle as ship_mod
from pipeline.ship.bundle import ShipError, parse_to, ship, shipped_names, verify
from tests.report.test_gate import LOOSE, profile_file, rerun

cli = CliRunner()
DEVICE = Path(ship_mod.__file__).parent / "device"


@pytest.fixture(scope="module")
def shippable(real_run, tmp_path_factory):
    """(run, profile path, bundle): the real run benchmarked for an edge-cpu copy whose budgets it meets."""
    tmp = tmp_path_factory.mktemp("ship")
    prof = profile_file(tmp, "edge-cpu", "edge-cpu-loose", **LOOSE)
    run = rerun(real_run, tmp, prof)
    return run, prof, ship(run, str(prof), tmp / "dist")


def _unpack(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")
    return dest / bundle.name.removesuffix(".tar.gz")


def _readme_command(folder: Path, module: str) -> list[str]:
    """The README-device.md command that runs device/<module>.py, with this interpreter for python3."""
    lines = [ln.strip() for ln in (folder / "README-device.md").read_text().splitlines()
             if ln.startswith("    python3 ") and f"device.{module} " in ln]
    assert len(lines) == 1, lines
    return [sys.executable, *shlex.split(lines[0])[1:]]


def _device(folder: Path, module: str) -> subprocess.CompletedProcess:
    return subprocess.run(_readme_command(folder, module), cwd=folder, capture_output=True, text=True, timeout=120)


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_bundle_from_a_real_run_verifies(shippable, tmp_path):
    run, prof, bundle = shippable
    report = json.loads((run / "report.json").read_text())
    rec = report["recommended"]["artifact"]
    assert bundle.name == f"bundle-digits-{run.name}.tar.gz"
    assert verify(bundle) == []
    folder = _unpack(bundle, tmp_path)
    assert verify(folder) == []
    m = json.loads((folder / "manifest.json").read_text())
    assert set(m["files"]) == {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                               if p.is_file() and p.name != "manifest.json"}
    assert f"models/{rec}" in m["files"] and {f"device/{p.name}" for p in DEVICE.glob("*.py")} <= set(m["files"])
    assert m["input"]["name"] == "input" and m["input"]["dtype"] == "float32" and m["input"]["shape"][1:] == [1, 8, 8]
    splits = json.loads((run / "splits.json").read_text())
    assert m["preprocessing"] == splits["preprocessing"] and m["classes"] == [str(i) for i in range(10)]
    assert m["opset"] == 18 and m["versions"]["onnxruntime"] and m["versions"]["torch"]
    assert m["profile"]["name"] == "edge-cpu-loose" and m["gate"]["verdict"] == "met"
    assert set(m["gate"]["met"]) == {"p95_latency_ms", "min_accuracy", "max_accuracy_drop", "max_size_mb"}
    assert {r["artifact"] for r in m["benchmark"]} == {rec}
    batch = np.load(folder / "data" / "test_batch.npz")
    assert batch["x"].shape == (64, 1, 8, 8) and batch["y"].shape == (64,) and "ref_teacher" in batch.files
    assert _readme_command(folder, "runner")[-1] == "."


def test_the_same_run_ships_the_same_bytes(shippable, tmp_path):
    run, prof, bundle = shippable
    assert ship(run, str(prof), tmp_path).read_bytes() == bundle.read_bytes()


def test_one_flipped_byte_of_the_onnx_is_refused(shippable, tmp_path):
    run, prof, bundle = shippable
    folder = _unpack(bundle, tmp_path)
    onnx = folder / "models" / json.loads((folder / "manifest.json").read_text())["recommended"]
    _flip(onnx)
    problems = verify(folder)
    assert len(problems) == 1 and onnx.name in problems[0] and "differs" in problems[0]
    # the same, packed again, and through the device-side command with a plain interpreter
    repacked = tmp_path / "tampered.tar.gz"
    with tarfile.open(repacked, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    assert any(onnx.name in p for p in verify(repacked))
    proc = _device(folder, "manifest")
    assert proc.returncode == 1 and "REFUSED" in proc.stdout
    res = cli.invoke(app, ["verify", str(folder)])
    assert res.exit_code == 1 and onnx.name in res.stderr
    assert cli.invoke(app, ["verify", str(bundle)]).exit_code == 0
    assert cli.invoke(app, ["verify", str(tmp_path / "nothing")]).exit_code == 3


def test_an_engine_inside_the_bundle_is_refused_as_unlisted(shippable, tmp_path):
    folder = _unpack(shippable[2], tmp_path)
    (folder / "models" / "s.engine").write_bytes(b"engine")
    (folder / "models" / "s.json").write_text(json.dumps({"trt_version": "10.3.0", "compute_capability": "8.7"}))
    problems = mf.check(folder, {"onnxruntime": None})[0]
    assert len(problems) == 2 and all("not listed in manifest.json" in p for p in problems)
    assert "built outside the bundle" in problems[0] and problems[0].startswith("models/s.engine")


def test_engines_built_as_the_device_readme_says_leave_the_bundle_verified(shippable, tmp_path):
    folder = _unpack(shippable[2], tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    jetson = load_profile("jetson")
    readme = ship_mod.device_readme(folder.name, json.loads((shippable[0] / "report.json").read_text()), jetson,
                              manifest["models"], json.loads((shippable[0] / "splits.json").read_text()))
    engines = re.findall(r"--saveEngine=(\S+)", readme)
    assert engines and "trtexec --onnx=" in readme
    for rel in engines:  # what trtexec would write, relative to the bundle folder the steps run in
        (folder / rel).write_bytes(b"engine")
    assert mf.check(folder, {"onnxruntime": None})[0] == []


def test_the_device_readme_builds_engines_with_the_flags_of_each_tensorrt(shippable):
    run = shippable[0]
    report, splits = (json.loads((run / f).read_text()) for f in ("report.json", "splits.json"))
    m = {"name": "s.onnx", "file": "models/s.onnx", "precision": "fp32", "opset": 18,
         "inputs": [{"name": "input", "dtype": "float32", "shape": ["n", 1, 8, 8]}],
         "outputs": [{"name": "logits", "dtype": "float32", "shape": ["n", 10]}]}
    models = [m, {**m, "name": "s.fp16.onnx", "precision": "fp16"}, {**m, "name": "s.int8.onnx", "precision": "int8"}]
    readme = ship_mod.device_readme("b", report, load_profile("jetson"), models, splits)
    head, _, trt11 = readme.partition("TensorRT 11 and later")

    def lines(text: str) -> list[list[str]]:
        return [ln.split() for ln in text.splitlines() if ln.startswith("    trtexec ")]
    assert [ln[3:-1] for ln in lines(head)] == [[], ["--fp16"], ["--int8", "--fp16"]]  # 8.x to 10.x
    assert [ln[3:-1] for ln in lines(trt11.partition("## 3.")[0])] == [[], [], []]  # 11 removed both flags
    assert all(ln[-1] == "--shapes=input:1x1x8x8" for ln in lines(readme))
    fp32_only = ship_mod.device_readme("b", report, load_profile("jetson"), [m], splits)
    assert "TensorRT 11" not in fp32_only and len(lines(fp32_only)) == 1  # one form serves every version


def test_another_onnxruntime_is_a_warning_not_a_failure(shippable):
    problems, warnings = mf.check(shippable[2], {"onnxruntime": "0.1.0"})
    assert problems == [] and "onnxruntime 0.1.0" in warnings[0]


def test_an_archive_with_unsafe_paths_is_refused(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for name, data in (("b/manifest.json", b'{"files": {"x": "00"}}'), ("b/../../evil", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert any("unsafe" in p for p in verify(bad))


def test_an_interrupted_ship_leaves_no_partial_bundle(shippable, tmp_path, monkeypatch):
    run, prof, _ = shippable
    out = tmp_path / "dist"
    out.mkdir()
    old = out / f"bundle-digits-{run.name}.tar.gz"
    old.write_bytes(b"the previous bundle")
    real_add, calls = tarfile.TarFile.add, []

    def add_then_die(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 5:
            raise OSError("disk full")
        return real_add(self, *args, **kwargs)
    monkeypatch.setattr(tarfile.TarFile, "add", add_then_die)
    with pytest.raises(ShipError, match=r"writing the bundle in .*dist failed \(disk full\); nothing was shipped"):
        ship(run, str(prof), out)  # a ShipError: the CLI's exit 1 and one paragraph, not an OSError traceback
    assert len(calls) == 5, "the failure must come mid-way through the archive"
    assert old.read_bytes() == b"the previous bundle"
    assert sorted(p.name for p in out.iterdir()) == [old.name], "no temporary file or folder may remain"


def test_tensorrt_targets_ship_the_fp16_and_int8_variants(tmp_path):
    for n in ("student-pruned.onnx", "student-pruned.fp16.onnx", "student-pruned.int8.onnx", "student.int8.onnx"):
        (tmp_path / n).write_bytes(b"onnx")
    assert shipped_names(tmp_path, "student-pruned.onnx", tensorrt=False) == ["student-pruned.onnx"]
    assert shipped_names(tmp_path, "student-pruned.onnx", tensorrt=True) == [
        "student-pruned.onnx", "student-pruned.fp16.onnx", "student-pruned.int8.onnx"]
    assert shipped_names(tmp_path, "student-pruned.int8.onnx", tensorrt=True) == [
        "student-pruned.int8.onnx", "student-pruned.fp16.onnx"]
    with pytest.raises(ConfigError, match="missing"):
        shipped_names(tmp_path, "gone.onnx", tensorrt=False)


def test_a_run_without_a_recommendation_is_not_shipped(shippable, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(shippable[0], run)
    report = json.loads((run / "report.json").read_text())
    (run / "report.json").write_text(json.dumps({**report, "recommended": None}))
    out = tmp_path / "dist"
    res = cli.invoke(app, ["ship", str(run), "--profile", str(shippable[1]), "--out", str(out)])
    assert res.exit_code == 3 and "nothing to ship" in res.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_cli_ship_and_parse_to(shippable, tmp_path):
    run, prof, _ = shippable
    res = cli.invoke(app, ["ship", str(run), "--profile", str(prof), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert len(list(tmp_path.glob("bundle-*.tar.gz"))) == 1
    assert parse_to("nvidia@jetson.local:2222:~/bundles") == ("nvidia@jetson.local:2222", "~/bundles")
    assert parse_to("pi@[::1]:/opt/m") == ("pi@[::1]", "/opt/m")
    with pytest.raises(ConfigError, match="expected"):
        parse_to("jetson.local")
    bad = cli.invoke(app, ["ship", str(run), "--profile", str(prof), "--out", str(tmp_path / "no"), "--to", "jetson"])
    assert bad.exit_code == 3 and "[user@]host[:port]" in bad.stderr and not (tmp_path / "no").exists()


def test_an_out_that_cannot_hold_a_bundle_exits_3_in_one_sentence(shippable, tmp_path):
    run, prof, _ = shippable
    (tmp_path / "a-file").write_text("not a folder")
    for out, says in ((tmp_path / "a-file", "is a file, not a directory"),
                      (Path("/proc/no-such-dir"), "cannot create it")):
        res = cli.invoke(app, ["ship", str(run), "--profile", str(prof), "--out", str(out)])
        assert res.exit_code == 3 and f"--out {out}: {says}" in res.stderr, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_ship_to_a_device_over_ssh_verifies_there(shippable, sshd, tmp_path, monkeypatch):
    run, prof, _ = shippable
    monkeypatch.setenv("PIPELINE_DEVICE_KNOWN_HOSTS", str(sshd.known_hosts))
    monkeypatch.setenv("PIPELINE_DEVICE_IDENTITY", str(sshd.identity_file))
    monkeypatch.setenv("PIPELINE_DEVICE_PYTHON", "/usr/bin/python3" if Path("/usr/bin/python3").exists()
                       else sys.executable)  # a plain interpreter: verification needs only the stdlib
    remote_dir = tmp_path / "device"
    logs: list[str] = []
    bundle = ship(run, str(prof), tmp_path / "dist", to=f"{sshd.user}@127.0.0.1:{sshd.port}:{remote_dir}",
                  log=logs.append)
    unpacked = remote_dir / bundle.name.removesuffix(".tar.gz")
    assert (remote_dir / bundle.name).is_file() and (unpacked / "manifest.json").is_file()
    assert "verified" in logs[-1]
    _flip(unpacked / "data" / "test_batch.npz")  # the copy on the "device" goes bad: shipping again repairs it
    ship(run, str(prof), tmp_path / "dist", to=f"{sshd.user}@127.0.0.1:{sshd.port}:{remote_dir}")
    assert verify(unpacked) == []


# ---------------------------------------------------------------- a bundle carries nothing it does not list
def _repack(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)  # links, FIFOs and hard links go in as such, not as their contents
    return dest


def test_a_planted_module_is_refused_and_never_runs(shippable, tmp_path):
    folder = _unpack(shippable[2], tmp_path / "b")
    ran = {name: tmp_path / f"{name}-ran" for name in ("json", "numpy")}
    for name, marker in ran.items():
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    # the plant is live: `python -m` puts the folder first on sys.path, and json.py runs in place of the stdlib's
    subprocess.run([sys.executable, "-m", "device.manifest", "verify", "."], cwd=folder, capture_output=True,
                   timeout=60)
    assert ran["json"].exists(), "the planted json.py must be importable for this test to mean anything"
    ran["json"].unlink()
    shutil.rmtree(folder / "device" / "__pycache__", ignore_errors=True)
    for bundle in (folder, _repack(folder, tmp_path / "planted.tar.gz")):
        problems = verify(bundle)
        assert [p.split(":")[0] for p in problems] == ["json.py", "numpy.py"], problems
        assert all("not listed in manifest.json" in p for p in problems)
    proc = _device(folder, "manifest")
    assert proc.returncode == 1 and "REFUSED: json.py: not listed" in proc.stdout
    proc = _device(folder, "runner")
    assert proc.returncode == 3 and any("numpy.py" in p for p in json.loads(proc.stdout)["problems"])
    assert not any(m.exists() for m in ran.values()), "planted code ran on the device side"
    assert not (folder / "device" / "__pycache__").exists(), "the device commands must write no bytecode"


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_links_and_special_files_are_refused(shippable, tmp_path, kind):
    folder = _unpack(shippable[2], tmp_path / "b")
    listed = folder / "data" / "test_batch.npz"
    outside = tmp_path / "copy.npz"
    shutil.copy(listed, outside)  # the same bytes: the sha256 alone would pass
    listed.unlink()
    if kind == "symlink":
        listed.symlink_to(outside)
    elif kind == "hardlink":
        os.link(outside, listed)
    else:
        os.mkfifo(folder / "data" / "pipe")  # read, it would block verify forever
        shutil.copy(outside, listed)
    problems = verify(folder)
    assert len(problems) == 1, problems
    word = {"symlink": "symbolic link", "hardlink": "hard link", "fifo": "FIFO"}[kind]
    assert word in problems[0] and problems[0].startswith("data/")
    if kind == "hardlink":  # inside an archive a hard link needs both names: the second becomes a link member
        os.link(listed, folder / "data" / "again.npz")
    problems = verify(_repack(folder, tmp_path / "b.tar.gz"))
    assert any("link, device or FIFO member" in p for p in problems), problems
    assert _device(folder, "manifest").returncode == 1


def test_a_flipped_gzip_crc_is_refused(shippable, tmp_path):
    data = shippable[2].read_bytes()
    for offset, what in ((-8, "crc"), (-1, "length")):
        bad = tmp_path / f"{what}.tar.gz"
        raw = bytearray(data)
        raw[offset] ^= 0x01
        bad.write_bytes(bytes(raw))
        problems = verify(bad)
        assert len(problems) == 1 and "fails its check at the end" in problems[0], (what, problems)
        res = cli.invoke(app, ["verify", str(bad)])
        assert res.exit_code == 1, res.output


@pytest.mark.parametrize("sha", [12345, ["ab"], None, "ABC"])
def test_a_manifest_sha256_of_the_wrong_type_is_a_clean_refusal(shippable, tmp_path, sha):
    folder = _unpack(shippable[2], tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["data/test_batch.npz"] = sha
    (folder / "manifest.json").write_text(json.dumps(m))
    problems = verify(folder)
    assert len(problems) == 1 and problems[0].startswith("data/test_batch.npz: the manifest's sha256 is")
    assert "not 64 hex digits" in problems[0]
    res = cli.invoke(app, ["verify", str(folder)])
    assert res.exit_code == 1 and "Traceback" not in res.output


# ---------------------------------------------------------------- manifest.json itself: the archive's own sha256
def test_an_edited_manifest_is_refused_by_the_archive_sha256_beside_it(shippable, tmp_path):
    import hashlib
    _, _, bundle = shippable
    side = bundle.with_name(bundle.name + ".sha256")
    assert side.read_text() == f"{hashlib.sha256(bundle.read_bytes()).hexdigest()}  {bundle.name}\n"  # sha256sum -c
    assert verify(bundle) == []
    # one field of the manifest that lists no file (the preprocessing the device applies), edited and repacked
    folder = _unpack(bundle, tmp_path / "x")
    manifest = json.loads((folder / mf.MANIFEST).read_text())
    manifest["preprocessing"]["mean"] = [0.0]
    (folder / mf.MANIFEST).write_text(json.dumps(manifest, indent=1))
    assert verify(folder) == []  # the unpacked folder cannot tell: nothing lists manifest.json's checksum
    edited = _repack(folder, tmp_path / bundle.name)
    shutil.copy(side, tmp_path / side.name)
    problems = verify(edited)
    assert len(problems) == 1 and "differs from" in problems[0] and "manifest.json included" in problems[0]
    # the device's own verify (the README's command) given the archive says the same, exit 1
    cmd = _readme_command(folder, "manifest")
    done = subprocess.run([*cmd[:-1], str(edited)], cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "REFUSED: " + bundle.name in done.stdout, done.stdout + done.stderr
    (tmp_path / side.name).unlink()  # without the .sha256: verified, with a warning that says what is unchecked
    warns: list[str] = []
    assert verify(edited, warns) == [] and any("manifest.json itself is unchecked" in w for w in warns)
