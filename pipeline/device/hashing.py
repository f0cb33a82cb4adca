"""sha256 of files and streams: the one definition for the host (artifacts, engine keys) and the device
(manifest checks). Standard library only and importing nothing of this folder, so that verify runs on a device
that has only Python; the runner and the benchmarks in this folder also need numpy and onnxruntime."""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_stream(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(CHUNK), b""):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)
