"""`pipeline ship`: the recommended artifact as bundle-<recipe>-<run_id>.tar.gz, ready for a device.

The bundle unpacks to one folder:
    manifest.json       sha256 of every other file; model I/O, opset, preprocessing, classes, versions, the
                        profile and the budgets the gate found met, the benchmark rows of the shipped models
    models/             the recommended ONNX (+ .onnx.data sidecars), and its fp16/int8 variants on TensorRT targets
    data/test_batch.npz x, y: 64 preprocessed test images; ref_teacher / ref_host: reference predictions
    device/             the device runner (pipeline/device/*.py, stdlib + numpy + onnxruntime)
    README-device.md    verify, build the TensorRT engine, benchmark
manifest.json doubles as the device runner's kit manifest (files, models, providers, settings, tensorrt).

The archive is written under a temporary name and renamed, so an interrupted ship never leaves a half bundle
under the final name; its bytes are reproducible (sorted members, fixed times and owners).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import tarfile
import tempfile
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Callable

from pipeline.artifacts import atomic_write_text, files, make_output_dir
from pipeline.config import DataConfig, Profile, load_profile
from pipeline.device import manifest as mf
from pipeline.device.hashing import sha256_file
from pipeline.device.measure import BenchSettings
from pipeline.device.trtexec import TrtVersion, precision_flags
from pipeline.errors import ConfigError
from pipeline.report import schema as reportschema
from pipeline.report.gate import UNUSABLE, gate
from pipeline.ship import ssh as sshlink
from pipeline.ship.kit import copy_payload, device_command, resolve

TEST_BATCH = 64  # images in data/test_batch.npz: enough for an agreement check, small enough to copy anywhere
VARIANTS = ("fp16", "int8")


class ShipError(RuntimeError):
    """Copying the bundle to the device, or verifying it there, failed; the message says what to do."""


def ship(run_dir: Path, profile: Profile | str, out_dir: Path, to: str | None = None,
         log: Callable[[str], None] = lambda _msg: None) -> Path:
    """Write out_dir/bundle-<recipe>-<run_id>.tar.gz; with `to` ([user@]host[:port]:/dir) copy it there and
    verify it with the device's python. Raises ConfigError for an unusable run, ShipError for a failed copy."""
    # 1) the run, the profile, the gate's verdict, the artifact (and a readable --to, before any work)
    if to:
        parse_to(to)
    run_dir = Path(run_dir)
    report = reportschema.load(run_dir)
    prof = load_profile(profile) if isinstance(profile, str) else profile
    verdict = gate(run_dir, prof)
    if verdict.code == UNUSABLE:
        raise ConfigError(verdict.notes[0])
    if not report.get("recommended"):
        raise ConfigError(f"{run_dir}: the report recommends no artifact (none meets the budgets of profile "
                          f"'{prof.name}'); nothing to ship. See report.md and `pipeline gate {run_dir}`.")
    if verdict.code:
        log(f"warning: gate {verdict.verdict} (exit {verdict.code}); the manifest records which budgets were met")
    names = shipped_names(run_dir, report["recommended"]["artifact"], prof.target.tensorrt)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"bundle-{report['recipe']['name']}-{report['run_id']}")  # a file name
    out_dir = Path(out_dir)
    make_output_dir(out_dir, "--out")
    final = out_dir / f"{name}.tar.gz"
    try:
        # 2) stage the folder   3) pack under a temporary name, then rename
        with tempfile.TemporaryDirectory(prefix=".ship-", dir=out_dir) as tmp:
            stage = Path(tmp) / name
            _stage(stage, run_dir, report, prof, verdict, names)
            part = out_dir / f".{final.name}.part-{os.getpid()}"
            try:
                _pack(stage, part, report.get("created"))
                os.replace(part, final)
            finally:
                part.unlink(missing_ok=True)
        # the archive's own sha256, beside it (`sha256sum -c` format): manifest.json cannot list its own checksum,
        # so this is what catches an edit to it; verify reads it, send copies it
        digest = sha256_file(final)
        atomic_write_text(mf.digest_path(final), f"{digest}  {final.name}\n")
    except OSError as e:  # a full disk, a file gone from the run: no half-written bundle is left under its name
        raise ShipError(f"writing the bundle in {out_dir} failed ({e.strerror or e}"
                        f"{f': {e.filename}' if e.filename else ''}); nothing was shipped. Free space there or "
                        f"give another --out, then ship again.") from None
    log(f"wrote {final} ({final.stat().st_size / 1024:.1f} KiB, sha256 {digest[:16]}…): {', '.join(names)}")
    # 4) to the device, verified there
    if to:
        log(send(final, to, prof))
    return final


def verify(bundle: Path, warnings: list[str] | None = None) -> list[str]:
    """Problems with a bundle (.tar.gz or unpacked folder) on this machine; empty means it verifies.

    Warnings (another onnxruntime major.minor) are appended to `warnings` when given. ConfigError when the
    path is not a bundle.
    """
    try:
        problems, warns = mf.check(Path(bundle))
    except mf.NotABundle as e:
        raise ConfigError(str(e)) from None
    if warnings is not None:
        warnings.extend(warns)
    return problems


# ---------------------------------------------------------------- what goes in
def shipped_names(run_dir: Path, artifact: str, tensorrt: bool) -> list[str]:
    """The recommended artifact, then (TensorRT targets) <stem>.fp16.onnx / <stem>.int8.onnx when the run has them."""
    if not (run_dir / artifact).is_file():
        raise ConfigError(f"{run_dir / artifact}: the recommended artifact is missing from the run directory; "
                          f"rerun its stage with `pipeline run --resume`.")
    names = [artifact]
    if tensorrt:
        stem = re.sub(r"\.(fp32|fp16|int8)$", "", artifact.removesuffix(".onnx"))
        names += [v for p in VARIANTS if (v := f"{stem}.{p}.onnx") != artifact and (run_dir / v).is_file()]
    return names


def _stage(stage: Path, run_dir: Path, report: dict, prof: Profile, verdict, names: list[str]) -> None:
    (stage / "data").mkdir(parents=True)
    copy_payload(stage, [run_dir / n for n in names])
    recipe = json.loads((run_dir / "recipe.json").read_text())
    splits = json.loads((run_dir / "splits.json").read_text())
    _test_batch(stage / "data" / "test_batch.npz", run_dir, recipe, splits, names[0])
    models = [_model_info(run_dir, n, report) for n in names]
    (stage / "README-device.md").write_text(device_readme(stage.name, report, prof, models, splits))
    manifest = _manifest(stage, run_dir, report, prof, verdict, splits, models)
    (stage / mf.MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))


def _test_batch(path: Path, run_dir: Path, recipe: dict, splits: dict, artifact: str) -> None:
    from pipeline.device.measure import predictions
    from pipeline.train.data import load_splits
    data = load_splits(DataConfig.model_validate(recipe["data"]), recipe["seed"])
    want, have = splits.get("preprocessing", {}), data.preprocessing
    if any(abs(a - b) > 1e-6 for k in ("mean", "std") for a, b in zip(want.get(k, []), have.get(k, []))) \
            or want.get("image_size") != have.get("image_size"):
        raise ConfigError(f"{run_dir}: the data loads with other preprocessing than the run recorded "
                          f"(splits.json {want} vs now {have}); the data changed since the run: rerun it.")
    x, y = data.test.arrays(limit=TEST_BATCH)
    refs = {"ref_host": predictions(run_dir / artifact, x)}
    if (run_dir / "teacher.onnx").is_file():
        refs["ref_teacher"] = predictions(run_dir / "teacher.onnx", x)
    _npz(path, {"x": x, "y": y, **refs})


def _npz(path: Path, arrays: dict) -> None:
    """np.savez's format with fixed member times, so the same run ships the same bytes."""
    import zipfile

    import numpy as np
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for key, a in arrays.items():
            with z.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def _model_info(run_dir: Path, name: str, report: dict) -> dict:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    m = onnx.load(str(run_dir / name), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def io(values) -> list[dict]:
        return [{"name": v.name, "dtype": tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                           for d in v.type.tensor_type.shape.dim]} for v in values if v.name not in inits]
    row = next((r for r in report["rows"] if r["artifact"] == name), {})
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"name": name, "file": f"models/{name}", "precision": row.get("precision", "fp32"), "opset": opset,
            "inputs": io(m.graph.input), "outputs": io(m.graph.output),
            "sidecars": [f"models/{p.name}" for p in files(run_dir / name)[1:]],
            "meta": {k: row.get(k) for k in ("role", "stage", "size_bytes", "params", "macs")}}


def _outputs(model: dict, splits: dict) -> list[dict]:
    """What each output of the recommended model means: its task (recipe tasks:, one head each) and the class
    of each index; a single-task model's one output scores the data's classes."""
    tasks = {t["name"]: t for t in splits.get("tasks", [])}
    out = []
    for o in model["outputs"]:
        t = tasks.get(o["name"])
        out.append({"name": o["name"], "task": t["name"] if t else None,
                    "classes": t["classes"] if t else splits.get("classes", [])})
    return out


def _manifest(stage: Path, run_dir: Path, report: dict, prof: Profile, verdict, splits: dict,
              models: list[dict]) -> dict:
    t = prof.target
    # the run's own timing settings, as its benchmark stage used them, with this profile's threads and batches
    timing = json.loads((run_dir / "benchmark.json").read_text()).get("timing")
    if timing is None:
        raise ConfigError(f"{run_dir / 'benchmark.json'}: no 'timing' settings (written by an older version). "
                          f"Rerun the benchmark stage: pipeline run --resume.")
    settings = BenchSettings(**{**timing, "threads": list(t.threads), "batch_sizes": list(t.batch_sizes)})
    shipped = {m["name"] for m in models}
    versions = report["environment"].get("versions", {})
    return {
        "kind": "bundle", "bundle_version": 1, "name": stage.name, "run_id": report["run_id"],
        "recipe": report["recipe"]["name"], "recommended": models[0]["name"],
        "files": mf.checksums(stage),
        "input": models[0]["inputs"][0], "input_name": models[0]["inputs"][0]["name"],
        "opset": models[0]["opset"], "models": models,
        "preprocessing": splits.get("preprocessing", {}), "classes": splits.get("classes", []),
        "outputs": _outputs(models[0], splits),
        "versions": {k: versions.get(k) for k in ("python", "torch", "onnx", "onnxruntime", "onnxruntime-gpu")},
        "profile": {"name": prof.name, "target": t.model_dump(mode="json"),
                    "budgets": prof.budgets.model_dump(mode="json")},
        "gate": {"verdict": verdict.verdict, "code": verdict.code,
                 "met": {c.budget: {"limit": c.limit, "value": c.value, "how": c.message}
                         for c in verdict.cases if c.status == "passed"},
                 "not_met": {c.budget: {"status": c.status, "limit": c.limit, "how": c.message}
                             for c in verdict.cases if c.status not in ("passed", "not_set")},
                 "not_set": [c.budget for c in verdict.cases if c.status == "not_set"]},
        "benchmark": [r for r in report["rows"] if r["artifact"] in shipped],
        # the device runner's kit fields (pipeline/device/runner.py)
        "providers": list(t.providers), "tensorrt": t.tensorrt, "settings": asdict(settings),
    }


def _scores(model: dict, splits: dict) -> str:
    """'10 classes', or per output of a multi-task model: "outputs `digit` (10 classes), `parity` (2 classes)"."""
    outs = _outputs(model, splits)
    if len(outs) == 1:
        return f"{len(outs[0]['classes'])} classes"
    return "outputs " + ", ".join(f"`{o['name']}` ({len(o['classes'])} classes)" for o in outs)


def device_readme(name: str, report: dict, prof: Profile, models: list[dict], splits: dict) -> str:
    m, pre = models[0], splits.get("preprocessing", {})
    inp = m["inputs"][0]
    shape = "x".join(str(d if isinstance(d, int) and d > 0 else 1) for d in inp["shape"])
    lines = [f"# {name}", "",
             f"`{m['file']}` ({m['precision']}, opset {m['opset']}): input `{inp['name']}` {inp['dtype']} "
             f"{inp['shape']}, {_scores(m, splits)}. From run `{report['run_id']}` for "
             f"profile `{prof.name}` ({prof.target.name}); manifest.json says which budgets the gate found met.", "",
             "## 1. Verify first", "", f"    {shlex.join(device_command('python3', 'manifest', 'verify', '.'))}", "",
             "Recomputes every sha256 in manifest.json, refuses any file it does not list (and any link, device "
             "or FIFO), and compares onnxruntime with the version the figures were measured with (a warning). "
             f"manifest.json cannot list its own checksum: the archive's is in `{name}.tar.gz.sha256` beside it "
             f"(`sha256sum -c {name}.tar.gz.sha256`, or the command above given `../{name}.tar.gz`). "
             "Do not use a bundle that does not verify. The commands here put the bundle folder last on "
             "sys.path (and -B writes no __pycache__ into it), so no file in it can stand in for a module "
             "Python or numpy provides.", ""]
    if prof.target.tensorrt:
        lines += ["## 2. TensorRT engines are built on this device", "",
                  "Engines are not portable across TensorRT versions or GPUs. The runner (next step) builds each "
                  f"one here with trtexec and caches it next to the bundle, in ../{name}-trt-cache/, with a "
                  "sidecar .json naming the TensorRT version and GPU; it never reuses one built for another. "
                  "To build one by hand (trtexec is at /usr/src/tensorrt/bin/trtexec on JetPack), keep it "
                  "outside the bundle too: verify refuses any file the manifest does not list.", ""]
        old, new = (_trtexec_lines(models, f"{inp['name']}:{shape}", TrtVersion(v, 0)) for v in (10, 11))
        if old != new:
            lines += ["TensorRT 8.x to 10.x (trtexec prints its version first, e.g. `[TensorRT v100300]`):", ""]
        lines += old
        if old != new:
            lines += ["", "TensorRT 11 and later removed --fp16 and --int8: the precision comes from the ONNX "
                      "itself (FP16 weights, Q/DQ nodes):", "", *new]
        lines += ["", "INT8 models carry their Q/DQ scales in the ONNX; no calibration cache is needed.", ""]
    lines += [f"## {3 if prof.target.tensorrt else 2}. Benchmark", "",
              f"    {shlex.join(device_command('python3', 'runner', '.'))}", "",
              "Prints one JSON document: latency p50/p95/p99 at batch 1, throughput, accuracy and agreement on "
              "data/test_batch.npz, energy when a meter is readable. Needs Python 3.8+, numpy and onnxruntime "
              "(onnxruntime-gpu, or JetPack's wheel, on a GPU).", "",
              "## Preprocessing (as in training and evaluation)", "",
              f"Layout {pre.get('layout')} {pre.get('dtype')}; pixels scaled {pre.get('scale')}; resized "
              f"({pre.get('resize')}) to {pre.get('image_size')}x{pre.get('image_size')}, {pre.get('channels')} "
              f"channel(s); then (x - mean) / std per channel with mean {pre.get('mean')} and std {pre.get('std')}.",
              ""]
    return "\n".join(lines)


def _trtexec_lines(models: list[dict], shapes: str, trt: TrtVersion) -> list[str]:
    """README lines that build each model's engine by hand, with the precision flags trtexec.py uses for `trt`."""
    return ["    " + shlex.join(["trtexec", f"--onnx={x['file']}", f"--saveEngine=../{Path(x['name']).stem}.engine",
                                 *precision_flags(trt, x["precision"]), f"--shapes={shapes}"]) for x in models]


def _pack(stage: Path, dest: Path, created: str | None) -> None:
    """A reproducible .tar.gz of `stage` (members sorted, times fixed to the run's, owners root)."""
    try:
        mtime = int(datetime.fromisoformat(created).timestamp()) if created else 0
    except ValueError:
        mtime = 0

    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mtime, 0, 0, "", ""
        ti.mode = 0o755 if ti.isdir() else 0o644
        return ti
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in [stage, *sorted(stage.rglob("*"))]:
            tar.add(p, arcname=str(Path(stage.name) / p.relative_to(stage)), recursive=False, filter=clean)


# ---------------------------------------------------------------- to the device
def parse_to(to: str) -> tuple[str, str]:
    """'[user@]host[:port]:/dir' (or :~/dir) -> ('[user@]host[:port]', '/dir')."""
    m = re.fullmatch(r"(.+?):([/~].*)", to.strip())
    if not m:
        raise ConfigError(f"--to {to!r}: expected [user@]host[:port]:/remote/dir, e.g. "
                          f"nvidia@jetson.local:~/bundles or pi@10.0.0.5:2222:/opt/models.")
    return m.group(1), m.group(2)


def send(bundle: Path, to: str, prof: Profile) -> str:
    """Copy the bundle over SSH (host keys verified), unpack it and verify it with the device's python."""
    dest, remote_dir = parse_to(to)
    try:  # the profile's device: interpreter, key and known_hosts, with PIPELINE_DEVICE_* winning (kit.resolve)
        remote = resolve(dest, prof.device)
    except ValueError as e:
        raise ConfigError(f"--to {to!r}: {e}") from None
    folder = bundle.name.removesuffix(".tar.gz")
    try:
        target = sshlink.resolve_path(remote, remote_dir).rstrip("/") or "/"
        digest = mf.digest_path(bundle)
        sshlink.put(remote, [bundle] + ([digest] if digest.is_file() else []), target)
        sshlink.run(remote, ["tar", "-xzf", bundle.name], cwd=target)
        # the archive first (with its .sha256: manifest.json included), then the unpacked folder the device uses
        proc = sshlink.run(remote, device_command(remote.python, "manifest", "verify", f"../{bundle.name}"),
                           cwd=f"{target}/{folder}", check=False)
        if proc.returncode == 0:
            proc = sshlink.run(remote, device_command(remote.python, "manifest", "verify", "."),
                               cwd=f"{target}/{folder}", check=False)
    except (sshlink.RemoteError, ValueError, FileNotFoundError) as e:
        raise ShipError(f"copying {bundle.name} to {remote.destination}:{remote_dir} failed: {e}") from None
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise ShipError(f"{remote.destination}:{target}/{folder} does not verify on the device "
                        f"(exit {proc.returncode}):\n{out}")
    return f"{remote.destination}:{target}/{folder}: {out}"
