"""Check a shipped bundle against its manifest.json: on the build host (`pipeline verify`) and on the device.

Standard library only (plus sibling modules of this folder, themselves stdlib only), because the device may have
nothing else:

    python3 -m device.manifest verify .                 # inside an unpacked bundle
    python3 -m device.manifest verify bundle-....tar.gz

Problems refuse the bundle: a file whose sha256 differs or is missing, an unsafe path in the archive, a
TensorRT engine built for another TensorRT version or GPU than this machine's. Warnings do not: an
onnxruntime of another major.minor than the one the figures were measured with. Exit codes: 0 verified
(warnings may be printed), 1 refused, 3 not a bundle.
"""
from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path, PurePosixPath

from .hashing import sha256_file, sha256_stream

MANIFEST = "manifest.json"


class NotABundle(ValueError):
    """No manifest.json where one should be, or an unreadable archive."""


def checksums(root: Path) -> dict[str, str]:
    """{path relative to root: sha256} of every file under root except manifest.json (for ship.py)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() != MANIFEST}


# ---------------------------------------------------------------- reading a bundle (folder or .tar.gz)
def read(bundle: str | Path) -> tuple[dict, dict[str, str], dict[str, dict | None], list[str]]:
    """(manifest, {relative path: sha256 now}, {engine path: its sidecar or None}, problems reading it)."""
    bundle = Path(bundle)
    if bundle.is_dir():
        return _read_dir(bundle)
    if bundle.is_file() and tarfile.is_tarfile(bundle):
        return _read_tar(bundle)
    raise NotABundle(f"{bundle}: not a bundle folder or a .tar.gz archive.")


def _read_dir(root: Path) -> tuple[dict, dict[str, str], dict[str, dict | None], list[str]]:
    if not (root / MANIFEST).is_file():
        raise NotABundle(f"{root}: no {MANIFEST}; give the unpacked bundle folder (or its .tar.gz).")
    manifest = _json((root / MANIFEST).read_bytes(), f"{root / MANIFEST}")
    have = {rel: sha256_file(root / rel) for rel in manifest.get("files", {})
            if ".." not in PurePosixPath(rel).parts and (root / rel).is_file()}
    engines = {}
    for p in sorted(root.rglob("*.engine")):
        side = p.with_suffix(".json")
        engines[p.relative_to(root).as_posix()] = _json(side.read_bytes(), str(side)) if side.is_file() else None
    return manifest, have, engines, []


def _read_tar(path: Path) -> tuple[dict, dict[str, str], dict[str, dict | None], list[str]]:
    problems, files = [], {}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            tops = [m.name for m in members
                    if PurePosixPath(m.name).name == MANIFEST and len(PurePosixPath(m.name).parts) <= 2]
            if not tops:
                raise NotABundle(f"{path}: the archive has no {MANIFEST} at its top or in its top folder.")
            prefix = str(PurePosixPath(tops[0]).parent)
            prefix = "" if prefix == "." else prefix + "/"
            for m in members:
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or m.issym() or m.islnk() or m.isdev():
                    problems.append(f"{m.name}: unsafe archive member (absolute, '..', link or device); refusing")
                elif m.isfile() and m.name.startswith(prefix):
                    files[m.name[len(prefix):]] = m
            manifest = _json(tar.extractfile(files[MANIFEST]).read(), f"{path}:{tops[0]}")
            have = {rel: sha256_stream(tar.extractfile(files[rel])) for rel in manifest.get("files", {})
                    if rel in files}
            engines = {rel: _json(tar.extractfile(files[rel[:-7] + ".json"]).read(), rel[:-7] + ".json")
                       if rel[:-7] + ".json" in files else None for rel in files if rel.endswith(".engine")}
    except (tarfile.TarError, OSError, EOFError, KeyError) as e:
        raise NotABundle(f"{path}: unreadable archive ({type(e).__name__}: {e}).") from None
    return manifest, have, engines, problems


def _json(data: bytes, where: str) -> dict:
    try:
        out = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise NotABundle(f"{where}: not valid JSON ({e}).") from None
    if not isinstance(out, dict):
        raise NotABundle(f"{where}: expected a JSON object.")
    return out


# ---------------------------------------------------------------- this machine's runtimes
def runtime() -> dict:
    """onnxruntime and TensorRT versions and the GPU's compute capability here; None where absent."""
    from .envinfo import versions
    found = versions("onnxruntime", "onnxruntime-gpu")
    ort = found["onnxruntime"] or found["onnxruntime-gpu"]
    return {"onnxruntime": ort, "tensorrt": _trt_version(), "compute_capability": _compute_capability()}


def _trt_version() -> str | None:
    try:  # JetPack's apt package has no pip metadata, so ask the module, then trtexec itself
        import tensorrt
        return str(tensorrt.__version__)
    except Exception:
        pass
    try:
        from .trtbench import trt_version
        from .trtexec import find_trtexec
        exe = find_trtexec()
        if exe:
            return str(trt_version(exe))
    except Exception:
        pass
    return None


def _compute_capability() -> str | None:
    """Through the CUDA driver API with ctypes: no torch, no cuda-python on the device."""
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0):
            return None
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
        if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) or \
                cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev):
            return None
        return f"{major.value}.{minor.value}"
    except (OSError, AttributeError):
        return None


def _same_trt(a: str, b: str) -> bool:
    from .trtexec import TrtVersion
    try:
        return TrtVersion.parse(a) == TrtVersion.parse(b)
    except ValueError:
        return a == b


# ---------------------------------------------------------------- the check
def check(bundle: str | Path, here: dict | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) for a bundle folder or archive; `here` overrides runtime() (tests, dry runs).

    Raises NotABundle when there is no manifest to check against.
    """
    manifest, have, engines, problems = read(bundle)
    warnings: list[str] = []
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise NotABundle(f"{bundle}: {MANIFEST} lists no files (no 'files' mapping of path to sha256).")
    for rel, want in sorted(listed.items()):
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            problems.append(f"{rel}: the manifest names a path outside the bundle; refusing")
        elif rel not in have:
            problems.append(f"{rel}: missing from the bundle")
        elif have[rel] != want:
            problems.append(f"{rel}: sha256 {have[rel][:16]}… differs from the manifest's {want[:16]}…: the file "
                            f"changed after shipping (corrupt copy or edited); ship it again")
    want_ort = (manifest.get("versions") or {}).get("onnxruntime")
    if here is None and (want_ort or engines):  # probing TensorRT may run trtexec: only when there is a use
        here = runtime()
    if want_ort and here.get("onnxruntime") is None:
        warnings.append(f"onnxruntime is not installed here; the figures were measured with {want_ort} "
                        f"(pip install onnxruntime=={want_ort}, or onnxruntime-gpu on a GPU)")
    elif want_ort and _major_minor(want_ort) != _major_minor(here["onnxruntime"]):
        warnings.append(f"onnxruntime {here['onnxruntime']} here, {want_ort} in the manifest: outputs and "
                        f"timings may differ from the shipped figures")
    for rel, side in sorted(engines.items()):
        problems += _engine_problems(rel, side, here)
    return problems, warnings


def _major_minor(v: str) -> tuple[str, ...]:
    return tuple(v.split("+")[0].split(".")[:2])


def _engine_problems(rel: str, side: dict | None, here: dict) -> list[str]:
    """A TensorRT engine runs only on the TensorRT version and GPU (compute capability) that built it."""
    if side is None:
        return [f"{rel}: no sidecar {PurePosixPath(rel).stem}.json with the TensorRT version and GPU it was "
                f"built for; delete it and rebuild on this device"]
    out = []
    trt, cc = side.get("trt_version"), side.get("compute_capability")
    if here.get("tensorrt") is None:
        out.append(f"{rel}: built with TensorRT {trt}, but there is no TensorRT here: it cannot run on this machine")
    elif trt is None or not _same_trt(str(trt), str(here["tensorrt"])):
        out.append(f"{rel}: built with TensorRT {trt}, this machine has TensorRT {here['tensorrt']}: "
                   f"rebuild the engine here (README-device.md, trtexec)")
    if here.get("compute_capability") is None:
        out.append(f"{rel}: built for compute capability {cc}, but no CUDA GPU was found here")
    elif cc != here["compute_capability"]:
        out.append(f"{rel}: built for compute capability {cc} (sm{str(cc).replace('.', '')}), this GPU is "
                   f"{here['compute_capability']}: rebuild the engine here")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python3 -m device.manifest", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("verify", help="recompute checksums, compare runtimes").add_argument("bundle", type=Path)
    args = ap.parse_args(argv)
    try:
        problems, warnings = check(args.bundle)
    except NotABundle as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    for w in warnings:
        print(f"warning: {w}")
    for p in problems:
        print(f"REFUSED: {p}")
    if problems:
        print(f"{args.bundle}: {len(problems)} problem(s); do not use this bundle.")
        return 1
    print(f"{args.bundle}: verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
