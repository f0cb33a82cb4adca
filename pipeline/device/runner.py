"""Device-side runner: verify a kit's checksums, benchmark its ONNX models, print one JSON document.

Needs only Python 3.8+, numpy and onnxruntime (trtexec/tensorrt when the device has them). Run in the kit
folder, with the folder last on sys.path so that nothing in it can shadow a module (ship/kit.py device_command):

    python3 -B -c '<put "." last on sys.path; run device.runner>' .

The kit holds manifest.json ({"files": {relative path: sha256}, "models": [...], "providers": [...],
"settings": {...}}), models/*.onnx, data/test_batch.npz (x, y and reference predictions) and device/.
TensorRT engines are cached next to the kit, in <kit>-trt-cache/: the kit holds only what its manifest lists.
Exit codes: 0 measured (rows may still be skipped, with reasons), 3 the kit failed verification.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `device` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "device"

from .manifest import check  # noqa: E402


def run(kit: Path) -> tuple[int, dict]:
    problems, warnings = check(kit)  # checksums, and nothing the manifest does not list
    if problems:
        return 3, {"error": "kit verification failed", "problems": problems, "warnings": warnings}
    # imported after the check, so that a stray numpy.py in the kit is refused before anything could import it
    import numpy as np

    from . import energy, envinfo, trtbench
    from .measure import BenchSettings, ModelEntry, measure, meter_kinds
    manifest = json.loads((kit / "manifest.json").read_text())
    where = envinfo.describe("device")
    if where.get("board") and "jetson" in where["board"].lower():
        where["jetson"] = energy.query_jetson_state()
    batch = np.load(kit / "data" / "test_batch.npz")
    x, y = batch["x"], batch["y"]
    refs = {k[len("ref_"):]: batch[k] for k in batch.files if k.startswith("ref_")}
    s = BenchSettings(**manifest["settings"])
    models = [ModelEntry(m["name"], kit / m["file"], m["precision"], m.get("meta", {})) for m in manifest["models"]]
    meter, reasons = energy.pick_meter(kinds=meter_kinds(where))
    skip_energy = (lambda _ms: (None, "skipped: no energy meter on the device: " + "; ".join(reasons)))
    log = (lambda msg: print(msg, file=sys.stderr))  # stdout is the JSON document
    cache = kit.with_name(kit.name + "-trt-cache")
    rows = measure(models, manifest["providers"], s, x, y, refs, where, meter=meter, no_meter_energy=skip_energy,
                   cache_dir=cache, log=log)
    if manifest.get("tensorrt"):
        rows += trtbench.rows(models, where, manifest["input_name"], list(x.shape[1:]), cache, log=log)
    return 0, {"where": where, "rows": rows, "warnings": warnings, "meter": getattr(meter, "name", None), "meter_reasons": reasons,
               "versions": envinfo.versions("numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="device.runner", description=__doc__.splitlines()[0])
    ap.add_argument("kit", type=Path, help="the kit folder (holds manifest.json)")
    args = ap.parse_args(argv)
    code, doc = run(args.kit.resolve())
    print(json.dumps(doc, default=float))
    return code


if __name__ == "__main__":
    sys.exit(main())
