"""Check a shipped bundle against its manifest.json: on the build host (`pipeline verify`) and on the device.

Standard library only (plus the stdlib-only hashing.py and envinfo.py of this folder), because the device may
have nothing else. Run it so that the bundle folder cannot shadow a module it imports (README-device.md,
ship/kit.py device_command: the folder goes last on sys.path, and -B writes no __pycache__ into it):

    python3 -B -c '<put "." last on sys.path; run device.manifest>' verify .     # inside an unpacked bundle

Problems refuse the bundle: a file whose sha256 differs or is missing, a file the manifest does not list, a
link, device or FIFO, an unsafe path in the archive, a compressed stream that fails its check. Warnings do
not: an onnxruntime of another major.minor than the one the figures were measured with. Exit codes: 0
verified (warnings may be printed), 1 refused, 3 not a bundle.
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from .hashing import CHUNK, sha256_file, sha256_stream

MANIFEST = "manifest.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


class NotABundle(ValueError):
    """No manifest.json where one should be, or an unreadable archive."""


def checksums(root: Path) -> dict[str, str]:
    """{path relative to root: sha256} of every file under root except manifest.json (for ship.py)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() != MANIFEST}


# ---------------------------------------------------------------- reading a bundle (folder or .tar.gz)
def read(bundle: str | Path) -> tuple[dict, dict[str, str], dict[str, str]]:
    """(manifest, {relative path: sha256} of every regular file but manifest.json, {path: why it is refused}).

    Every file counts, listed or not: verify refuses what the manifest does not list. Links, devices and
    FIFOs are problems, never followed or read.
    """
    bundle = Path(bundle)
    if bundle.is_dir():
        return _read_dir(bundle)
    if bundle.is_file() and tarfile.is_tarfile(bundle):
        return _read_tar(bundle)
    raise NotABundle(f"{bundle}: not a bundle folder or a .tar.gz archive.")


def _read_dir(root: Path) -> tuple[dict, dict[str, str], dict[str, str]]:
    if not (root / MANIFEST).is_file():
        raise NotABundle(f"{root}: no {MANIFEST}; give the unpacked bundle folder (or its .tar.gz).")
    refused, have = {}, {}
    for folder, dirs, names in os.walk(root):  # followlinks=False: a linked folder is reported, not entered
        dirs.sort()
        for name in sorted(dirs + names):
            p = Path(folder) / name
            rel, st = p.relative_to(root).as_posix(), p.lstat()
            if stat.S_ISLNK(st.st_mode):
                refused[rel] = (f"{rel}: a symbolic link; a bundle holds only regular files (a link can point "
                                f"anywhere, and change after verify): replace it with the file or ship again")
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif not stat.S_ISREG(st.st_mode):
                refused[rel] = f"{rel}: a device, FIFO or socket, not a regular file; remove it or ship again"
            elif st.st_nlink > 1:
                refused[rel] = (f"{rel}: a hard link ({st.st_nlink} names for one file), so a file outside the "
                                f"bundle can change it after verify: copy the bundle with tar or cp, not cp -l")
            elif rel != MANIFEST:
                have[rel] = sha256_file(p)
    return _json((root / MANIFEST).read_bytes(), f"{root / MANIFEST}"), have, refused


def _read_tar(path: Path) -> tuple[dict, dict[str, str], dict[str, str]]:
    refused, have, manifest = {}, {}, None
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            tops = [m.name for m in members
                    if PurePosixPath(m.name).name == MANIFEST and len(PurePosixPath(m.name).parts) <= 2]
            if not tops:
                raise NotABundle(f"{path}: the archive has no {MANIFEST} at its top or in its top folder.")
            top = str(PurePosixPath(tops[0]).parent)
            prefix = "" if top == "." else top + "/"
            for m in members:
                p, rel = PurePosixPath(m.name), m.name[len(prefix):]
                if p.is_absolute() or ".." in p.parts:
                    refused[m.name] = f"{m.name}: unsafe archive member (absolute or '..'); refusing"
                elif not (m.isfile() or m.isdir()):  # symlink, hard link, device, FIFO
                    refused[rel] = (f"{m.name}: a link, device or FIFO member; a bundle holds only regular "
                                    f"files and folders: refusing")
                elif m.name != top and not m.name.startswith(prefix):
                    refused[m.name] = f"{m.name}: outside the bundle's folder {top}/; refusing"
                elif m.isfile() and rel == MANIFEST:
                    manifest = _json(tar.extractfile(m).read(), f"{path}:{m.name}")
                elif m.isfile() and rel in have:  # tar -x keeps the last copy: the first would be checked
                    refused[rel] = f"{m.name}: in the archive twice; refusing"
                elif m.isfile():
                    have[rel] = sha256_stream(tar.extractfile(m))
            try:  # read to the end: gzip checks its CRC and length only there
                while tar.fileobj.read(CHUNK):
                    pass
            except (OSError, EOFError, zlib.error) as e:
                refused[str(path)] = (f"{path}: the compressed stream fails its check at the end ({e}): the "
                                      f"archive is corrupt; copy or ship it again")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise NotABundle(f"{path}: unreadable archive ({type(e).__name__}: {e}).") from None
    if manifest is None:
        raise NotABundle(f"{path}: {tops[0]} is not a regular file in the archive.")
    return manifest, have, refused


def _json(data: bytes, where: str) -> dict:
    try:
        out = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise NotABundle(f"{where}: not valid JSON ({e}).") from None
    if not isinstance(out, dict):
        raise NotABundle(f"{where}: expected a JSON object.")
    return out


# ---------------------------------------------------------------- this machine's runtime
def runtime() -> dict:
    """The onnxruntime version here (None when absent), to compare with the one the figures were measured with."""
    from .envinfo import versions
    found = versions("onnxruntime", "onnxruntime-gpu")
    return {"onnxruntime": found["onnxruntime"] or found["onnxruntime-gpu"]}


# ---------------------------------------------------------------- the check
def check(bundle: str | Path, here: dict | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) for a bundle folder or archive; `here` overrides runtime() (tests, dry runs).

    Raises NotABundle when there is no manifest to check against.
    """
    manifest, have, refused = read(bundle)
    problems = list(refused.values())
    archive, archive_warnings = archive_digest(Path(bundle))
    problems += archive
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise NotABundle(f"{bundle}: {MANIFEST} lists no files (no 'files' mapping of path to sha256).")
    for rel, want in sorted(listed.items()):
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            problems.append(f"{rel}: the manifest names a path outside the bundle; refusing")
        elif not isinstance(want, str) or not SHA256.fullmatch(want):
            problems.append(f"{rel}: the manifest's sha256 is {json.dumps(want)[:40]}, not 64 hex digits: "
                            f"{MANIFEST} is damaged; ship the bundle again")
        elif rel in refused:
            continue  # said why above
        elif rel not in have:
            problems.append(f"{rel}: missing from the bundle")
        elif have[rel] != want:
            problems.append(f"{rel}: sha256 {have[rel][:16]}… differs from the manifest's {want[:16]}…: the file "
                            f"changed after shipping (corrupt copy or edited); ship it again")
    for rel in sorted(set(have) - set(listed)):
        hint = " (TensorRT engines are built outside the bundle: README-device.md)" if rel.endswith(".engine") else ""
        problems.append(f"{rel}: not listed in {MANIFEST}; a bundle carries only the files it lists, since a stray "
                        f"module could run in place of a real one: remove it or ship again{hint}")
    if problems:  # refused: probe nothing here (the probe imports modules)
        return problems, []
    versions = manifest.get("versions")
    want_ort = versions.get("onnxruntime") if isinstance(versions, dict) else None
    if not isinstance(want_ort, str):
        return problems, archive_warnings
    here = runtime() if here is None else here
    if here.get("onnxruntime") is None:
        return problems, archive_warnings + [
            f"onnxruntime is not installed here; the figures were measured with {want_ort} "
            f"(pip install onnxruntime=={want_ort}, or onnxruntime-gpu on a GPU)"]
    if _major_minor(want_ort) != _major_minor(here["onnxruntime"]):
        return problems, archive_warnings + [
            f"onnxruntime {here['onnxruntime']} here, {want_ort} in the manifest: outputs and timings may differ "
            f"from the shipped figures"]
    return problems, archive_warnings


def digest_path(archive: Path) -> Path:
    """<bundle>.tar.gz.sha256 beside the archive, in `sha256sum` format: ship writes it."""
    return archive.with_name(archive.name + ".sha256")


def archive_digest(bundle: Path) -> tuple[list[str], list[str]]:
    """(problems, warnings) of an archive against its .sha256: the one check that covers manifest.json itself,
    which cannot list its own checksum. A folder, or an archive without the file, is only warned about."""
    if not bundle.is_file():
        return [], []
    side = digest_path(bundle)
    if not side.is_file():
        return [], [f"no {side.name} beside the archive: manifest.json itself is unchecked (pipeline ship writes "
                    f"one; `sha256sum -c` reads it too)"]
    want = (side.read_text(errors="replace").split() or [""])[0].lower()
    if not SHA256.fullmatch(want):
        return [f"{side.name}: not a sha256 line ('<64 hex digits>  {bundle.name}'); ship the bundle again"], []
    got = sha256_file(bundle)
    if got != want:
        return [f"{bundle.name}: sha256 {got[:16]}… differs from {side.name}'s {want[:16]}…: the archive changed "
                f"after shipping (its manifest.json included: a corrupt copy or an edit); ship it again"], []
    return [], []


def _major_minor(v: str) -> tuple[str, ...]:
    return tuple(v.split("+")[0].split(".")[:2])


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
