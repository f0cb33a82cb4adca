"""Artifacts: files a stage writes into the run directory, named by role, hashed with every sidecar file.

torch 2.14's `torch.onnx.export` (dynamo) writes weights to `<name>.onnx.data` unless told otherwise, so a
size or a hash of the .onnx file alone can be 1 % of the truth. `files()` follows the ONNX external-data
references, and every size, hash and bundle goes through it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel

from pipeline.device.hashing import sha256_file  # one definition, stdlib only, shared with the device side

# What a model is for, written into its meta and every benchmark row. Quantize names its outputs
# f"{source role}-{precision}", so each FP32 role has its quantized variants (extra teachers are never exported).
Role = Literal["teacher", "extra-teacher", "student", "student-scratch", "student-pruned",
               "teacher-int8", "teacher-fp16", "student-int8", "student-fp16",
               "student-scratch-int8", "student-scratch-fp16", "student-pruned-int8", "student-pruned-fp16"]
ROLES: tuple[str, ...] = get_args(Role)
# references a run compares against: the model being compressed, its KD aids, and the no-teacher control
REFERENCES = frozenset({"teacher", "extra-teacher", "student-scratch"})
# trained from the teacher rather than compressed from a predecessor: the per-stage allowance does not apply
TRAINED = frozenset({"student", "student-scratch"})


def is_candidate(role: str | None) -> bool:
    """May this artifact be recommended and shipped? Every known role but the references (a quantized teacher is
    a compressed model, and a candidate)."""
    return role in ROLES and role not in REFERENCES


def is_trained(role: str | None) -> bool:
    """Was it distilled or trained from the teacher (judged by the profile's budgets), not compressed from a model
    of this run (judged also by the recipe's per-stage allowance)?"""
    return role in TRAINED


class Artifact(BaseModel, extra="forbid"):
    name: str                      # role and file name, e.g. "student.int8.onnx"
    kind: Literal["torch", "onnx", "json", "markdown", "html"]
    stage: str                     # the stage that wrote it
    meta: dict[str, Any] = {}      # params, macs, precision, source artifact, accuracy ...
    sha256: str = ""
    size_bytes: int = 0


Artifacts = dict[str, Artifact]


def onnx_external_files(path: Path) -> list[Path]:
    """Sidecar files referenced by an ONNX model's external-data initializers (weights not inside the .onnx)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    found: dict[str, Path] = {}
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            loc = next(e.value for e in tensor.external_data if e.key == "location")
            found[loc] = path.parent / loc
    return list(found.values())


def check_external_data(path: Path) -> None:
    """Refuse an ONNX model whose external weights are not regular files inside its own folder.

    files() follows these locations for every copy, hash and bundle, so a given model naming `/etc/passwd`,
    `../../x` or `/dev/zero` (a copy that fills the disk) must stop here, before anything reads them. The ONNX
    spec makes `location` a path relative to the model's folder; onnxruntime refuses the rest, but only later.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from pipeline.errors import ConfigError, first_line
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file. Give the path of an .onnx file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, or onnx's own: the bytes are not an ONNX model
        raise ConfigError(f"{path}: not a readable ONNX model ({first_line(e)}); export it again "
                          f"(torch.onnx.export) or copy it again.") from None
    folder = path.parent.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (path.parent / loc).resolve() if loc and "\0" not in loc else Path("/")
        if Path(loc).is_absolute() or not target.is_relative_to(folder):
            raise ConfigError(f"{path}: initializer '{tensor.name}' keeps its weights at '{loc}', outside the "
                              f"model's folder {folder}; external data must be a file beside the model "
                              f"(save it again with onnx.save(..., location='<name>.onnx.data')).")
        if not target.is_file():
            raise ConfigError(f"{path}: initializer '{tensor.name}' keeps its weights in '{loc}', which is not a "
                              f"regular file in {folder} (missing, a folder or a device); copy the model's "
                              f".data file beside it.")


def files(path: Path) -> list[Path]:
    """The file and every sidecar it needs to load."""
    path = Path(path)
    if path.suffix == ".onnx" and path.exists():
        return [path, *onnx_external_files(path)]
    return [path]


def fingerprint(path: Path) -> tuple[str, int]:
    """(sha256 over the file and its sidecars, total bytes)."""
    parts = files(path)
    if len(parts) == 1:
        return sha256_file(parts[0]), parts[0].stat().st_size
    h = hashlib.sha256()
    for p in parts:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest(), sum(p.stat().st_size for p in parts)


@contextlib.contextmanager
def atomic_target(path: Path):
    """A temporary name beside `path` to write to; renamed onto `path` when the block ends, removed when it
    raises (a full disk, a kill between the two leaves the old file whole and no half-written one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def make_output_dir(path: Path, option: str) -> None:
    """Create the directory a command-line option names for its outputs (--runs-dir, --out); ConfigError in one
    sentence when it is a file or cannot be created."""
    from pipeline.errors import ConfigError
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a directory. Give a directory (it is created when "
                          f"missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot create it ({e.strerror}). Give a writable directory.") from None
