"""Drive NVIDIA `trtexec`: pick flags by TensorRT version, run it, parse its log, cache engines.

This folder is copied to Jetsons on its own, so only the stdlib is imported here (Python 3.8+).
Flag facts checked against NVIDIA's docs and real logs (tests/fixtures/SOURCES-trtexec.md):
- `--memPoolSize=workspace:N` replaces `--workspace=N` from 8.4 (8.4 logs print "Memory Pools");
  the B/K/M/G suffixes are documented from the 10.x help on; a bare number means MiB everywhere.
- `--percentile=90,95,99` (several values) from 8.5 (8.4.1 logs print "Percentile: 99",
  8.5.0 logs "Percentiles: 90,95,99").
- TensorRT 11 is strongly typed only: --fp16/--int8/--best are removed and precision comes from
  the ONNX itself (ModelOpt AutoCast / Q/DQ nodes). `--stronglyTyped` exists from 10.0.
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-trtexec.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-8x-to-10x-trtexec.html
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .hashing import sha256_file  # noqa: F401  (re-exported: engine keys start from the ONNX file's hash)

PRECISIONS = ("fp32", "fp16", "int8")
JETPACK_TRTEXEC = Path("/usr/src/tensorrt/bin/trtexec")  # JetPack installs it here, not on PATH


# ---------------------------------------------------------------- versions
@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @classmethod
    def from_code(cls, code: int) -> TrtVersion:
        """Decode NV_TENSORRT_VERSION as printed in `[TensorRT v8201]` / `[TensorRT v101601]`."""
        if code >= 100000:  # 10.x and later: major*10000 + minor*100 + patch (NvInferRuntimeBase.h)
            return cls(code // 10000, code // 100 % 100, code % 100)
        return cls(code // 1000, code // 100 % 10, code % 100)  # 7.x-9.x: major*1000 + minor*100 + patch

    @classmethod
    def parse(cls, text: str) -> TrtVersion:
        """Accept 'v8601', '[TensorRT v101601]', '10.3.0.26', '8.6.1', or a dpkg line/version."""
        code = re.search(r"\bv(\d{4,6})\b", text)
        if code:
            return cls.from_code(int(code.group(1)))
        # the lookbehind skips 'cuda11.4' in '8.5.2-1+cuda11.4' and 'libnvinfer8' in dpkg -l lines
        dotted = re.search(r"(?<![\w.])(\d+)\.(\d+)(?:\.(\d+))?", text)
        if dotted:
            return cls(int(dotted.group(1)), int(dotted.group(2)), int(dotted.group(3) or 0))
        raise ValueError(f"No TensorRT version in {text!r}. Pass e.g. '10.3.0', 'v8601' or "
                         "`dpkg-query -W -f='${Version}' libnvinfer-bin` output.")


def supports_mem_pool_size(v: TrtVersion) -> bool:
    return v >= TrtVersion(8, 4)


def supports_mem_pool_suffix(v: TrtVersion) -> bool:
    return v.major >= 10


def supports_multiple_percentiles(v: TrtVersion) -> bool:
    return v >= TrtVersion(8, 5)


def supports_strongly_typed_flag(v: TrtVersion) -> bool:
    return v.major == 10  # 11: always strongly typed, the flag is no longer needed


def is_strongly_typed_only(v: TrtVersion) -> bool:
    return v.major >= 11


def precision_flags(v: TrtVersion, precision: str, *, strongly_typed: bool = False,
                    int8_allow_fp16: bool = True) -> list[str]:
    """trtexec flags for a precision; trt_api maps the same list onto builder flags.

    int8 means an explicitly quantized (Q/DQ) ONNX: 8.x-10.x still need --int8 to use its
    INT8 kernels, and --fp16 lets the layers left unquantized run in FP16.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}. Available: {', '.join(PRECISIONS)}")
    if is_strongly_typed_only(v):
        return []  # the ONNX's own types decide (FP16 graph or Q/DQ nodes)
    if strongly_typed:
        if not supports_strongly_typed_flag(v):
            raise ValueError(f"--stronglyTyped needs TensorRT 10; this is {v}. "
                             "Drop strongly_typed or build on TensorRT 10.x.")
        return ["--stronglyTyped"]  # precision flags are not allowed on a strongly typed network
    if precision == "fp16":
        return ["--fp16"]
    if precision == "int8":
        return ["--int8", "--fp16"] if int8_allow_fp16 else ["--int8"]
    return []


# ---------------------------------------------------------------- command line
def build_command(
    trt_version: TrtVersion, *, onnx: str | Path | None = None, save_engine: str | Path | None = None,
    load_engine: str | Path | None = None, precision: str = "fp32", strongly_typed: bool = False,
    int8_allow_fp16: bool = True, shapes: Mapping[str, Sequence[int]] | None = None,
    warmup_ms: int | None = None, duration_s: int | None = None, iterations: int | None = None,
    avg_runs: int | None = None, percentiles: Sequence[float] = (90, 95, 99),
    use_spin_wait: bool = False, timing_cache: str | Path | None = None,
    workspace_mib: int | None = None, export_times: str | Path | None = None,
    verbose: bool = False, trtexec: str = "trtexec",
) -> list[str]:
    """Return the trtexec argument list (never a shell string) for this TensorRT version.

    Give `onnx` (build, optionally `save_engine`) or `load_engine` (benchmark a built engine);
    `shapes` maps an input name to its NxCxHxW inference shape, e.g. {"images": (8, 3, 640, 640)};
    when building, trtexec also uses it as the profile's min=opt=max, so the engine serves that batch.
    """
    if (onnx is None) == (load_engine is None):
        raise ValueError("Give exactly one of onnx= (build from ONNX) or load_engine= (reuse an engine).")
    argv = [trtexec]
    if onnx is not None:
        argv.append(f"--onnx={onnx}")
        if save_engine is not None:
            argv.append(f"--saveEngine={save_engine}")
        argv += precision_flags(trt_version, precision, strongly_typed=strongly_typed,
                                int8_allow_fp16=int8_allow_fp16)
        if workspace_mib is not None:
            argv.append(_workspace_flag(trt_version, workspace_mib))
        if timing_cache is not None:
            argv.append(f"--timingCacheFile={timing_cache}")
    else:
        argv.append(f"--loadEngine={load_engine}")  # precision and workspace are baked into it
    if shapes:
        argv.append("--shapes=" + ",".join(_shape_spec(n, d) for n, d in shapes.items()))
    for flag, value in (("--warmUp", warmup_ms), ("--duration", duration_s),
                        ("--iterations", iterations), ("--avgRuns", avg_runs)):
        if value is not None:
            argv.append(f"{flag}={int(value)}")
    argv.append("--percentile=" + _percentile_arg(trt_version, percentiles))
    if use_spin_wait:
        argv.append("--useSpinWait")
    if export_times is not None:
        argv.append(f"--exportTimes={export_times}")
    if verbose:
        argv.append("--verbose")
    return argv


def _workspace_flag(v: TrtVersion, mib: int) -> str:
    if mib <= 0:
        raise ValueError(f"workspace_mib must be positive, got {mib}")
    if not supports_mem_pool_size(v):
        return f"--workspace={mib}"
    return f"--memPoolSize=workspace:{mib}{'M' if supports_mem_pool_suffix(v) else ''}"


def _shape_spec(name: str, dims: Sequence[int]) -> str:
    # trtexec splits the list on ',' and name from dims on the last ':', so 'x:0' names work
    if not name or "," in name:
        raise ValueError(f"Input name {name!r} cannot be passed to --shapes (empty or has a comma).")
    if not dims or any(int(d) <= 0 for d in dims):
        raise ValueError(f"Shape for {name!r} needs positive dims, got {list(dims)}")
    return f"{name}:" + "x".join(str(int(d)) for d in dims)


def _percentile_arg(v: TrtVersion, percentiles: Sequence[float]) -> str:
    if not percentiles or any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"Percentiles must be in [0, 100], got {list(percentiles)}")
    chosen = list(percentiles) if supports_multiple_percentiles(v) else [max(percentiles)]
    return ",".join(f"{p:g}" for p in chosen)  # before 8.5 only one value is accepted: keep the tail


# ---------------------------------------------------------------- log parsing
@dataclass
class Stats:
    """One 'Performance summary' row, in milliseconds."""
    min: float
    max: float
    mean: float
    median: float
    percentiles: dict[str, float] = field(default_factory=dict)  # {"p99": 4.83}


@dataclass
class TrtexecResult:
    status: str  # passed | failed | incomplete (no &&&& PASSED/FAILED line) | timeout
    trt_version: TrtVersion | None = None
    command: str | None = None
    device: str | None = None
    compute_capability: str | None = None
    precision: str | None = None
    implicit_batch: int | None = None
    engine_build_s: float | None = None
    throughput_qps: float | None = None
    stats: dict[str, Stats] = field(default_factory=dict)  # latency, gpu_compute, enqueue, h2d, d2h, end_to_end
    total_host_walltime_s: float | None = None
    total_gpu_compute_s: float | None = None
    gpu_compute_cv_percent: float | None = None
    errors: list[str] = field(default_factory=list)
    error_summary: str | None = None
    returncode: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trt_version"] = str(self.trt_version) if self.trt_version else None
        d["passed"] = self.passed
        return d


_SUMMARY_ROWS = {"Latency": "latency", "End-to-End Host Latency": "end_to_end", "Enqueue Time": "enqueue",
                 "H2D Latency": "h2d", "GPU Compute Time": "gpu_compute", "D2H Latency": "d2h"}
_NUM = r"([-+\d.eE]+)"
_MARKER = re.compile(r"&&&& (RUNNING|PASSED|FAILED) TensorRT\.trtexec \[TensorRT v(\d+)\](?: \[b\d+\])? # (.*)")
_STAT_ITEM = re.compile(r"(min|max|mean|median|percentile\(([\d.]+)%\)) = " + _NUM + " ms")


def parse_log(text: str) -> TrtexecResult:
    """Parse a trtexec log (complete or a tail); numbers are kept exactly as printed."""
    markers = _MARKER.findall(text)
    final = [m for m in markers if m[0] != "RUNNING"]
    r = TrtexecResult(status=final[-1][0].lower() if final else "incomplete")
    if markers:
        r.trt_version = TrtVersion.from_code(int(markers[-1][1]))
        r.command = markers[-1][2].strip()
    else:
        r.trt_version = _first(r"TensorRT version: (\d+\.\d+\.\d+)", text, TrtVersion.parse)
    r.device = _first(r"\] Selected Device: (.+)", text, str.strip)
    r.compute_capability = _first(r"\] Compute Capability: (\d+\.\d+)", text, str)
    r.precision = _first(r"\] Precision: (\S+)", text, str)
    r.engine_build_s = _first(r"Engine built in " + _NUM + " sec", text, float)
    r.implicit_batch = _first(r"(?:--batch=|\] Batch: |\] Max batch: )(\d+)\b", text, int)
    summary = text[text.rfind("=== Performance summary ==="):] if "=== Performance summary ===" in text else ""
    r.throughput_qps = _first(r"Throughput: " + _NUM + " qps", summary, float)
    r.total_host_walltime_s = _first(r"Total Host Walltime: " + _NUM + " s", summary, float)
    r.total_gpu_compute_s = _first(r"Total GPU Compute Time: " + _NUM + " s", summary, float)
    r.gpu_compute_cv_percent = _first(r"coefficient of variance = " + _NUM + "%", summary, float)
    for line in summary.splitlines():
        row = re.search(r"\] ([A-Za-z2 -]+): (min = .*)", line)
        if row and row.group(1) in _SUMMARY_ROWS:
            r.stats[_SUMMARY_ROWS[row.group(1)]] = _parse_stats(row.group(2))
    r.errors = [m.strip() for m in re.findall(r"\] \[E\] (.*)", text)]
    if r.status != "passed":
        r.error_summary = _summarize_failure(r, text)
    return r


def _first(pattern: str, text: str, conv: Any) -> Any:
    m = re.search(pattern, text)
    return conv(m.group(1)) if m else None


def _parse_stats(row: str) -> Stats:
    values: dict[str, float] = {}
    pct: dict[str, float] = {}
    for name, p, num in _STAT_ITEM.findall(row):
        if p:
            pct[f"p{p}"] = float(num)
        else:
            values[name] = float(num)
    return Stats(values["min"], values["max"], values["mean"], values["median"], pct)


def _summarize_failure(r: TrtexecResult, text: str) -> str:
    if r.status == "incomplete":
        return ("The log ends without '&&&& PASSED' or '&&&& FAILED': trtexec was killed, crashed "
                "or is still running. Check memory (Jetsons OOM on large builds) and rerun.")
    if r.status == "timeout":
        return "trtexec ran past its timeout and was killed. Raise the timeout or lower --duration."
    if any("Failed to parse onnx file" in e for e in r.errors):
        node = _first(r"Invalid Node - (\S+)", text, str)
        op = _first(r"While parsing node number \d+ \[(\w+) ->", text, str)
        where = f" at node {node} (op {op})" if node else ""
        return (f"TensorRT's ONNX parser rejected the model{where}: {r.errors[0]} "
                "Change the export (opset, op choice) or check this op's support in this TensorRT.")
    if r.errors:
        return f"trtexec failed with {len(r.errors)} error line(s); first: {r.errors[0]}"
    last = re.findall(r"\] \[[IW]\] (?!\[TRT\])(.*)", text)
    step = f" after '{last[-1].strip()}'" if last else ""
    return (f"trtexec reported FAILED{step} without any [E] line. Rerun with --verbose and read "
            "the last lines; check the input shapes and that the engine fits in memory.")


# ---------------------------------------------------------------- engine cache
class EngineMismatchError(ValueError):
    """A cached or shipped engine was built for another ONNX, precision, TensorRT or GPU."""


def engine_key(onnx_sha256: str, precision: str, trt_version: TrtVersion | str,
               compute_capability: str, extra: Mapping[str, Any] | None = None) -> str:
    """e.g. '3f2a9c1d4e5b6a7f-int8-trt10.3.0-sm87'; `extra` (shapes, flags) adds a short hash."""
    if not re.fullmatch(r"[0-9a-f]{64}", onnx_sha256):
        raise ValueError("onnx_sha256 must be a 64-char lowercase hex digest; use sha256_file(onnx).")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}. Available: {', '.join(PRECISIONS)}")
    if not re.fullmatch(r"\d+\.\d+", compute_capability):
        raise ValueError(f"compute_capability looks like '8.7', got {compute_capability!r}")
    version = trt_version if isinstance(trt_version, TrtVersion) else TrtVersion.parse(trt_version)
    key = f"{onnx_sha256[:16]}-{precision}-trt{version}-sm{compute_capability.replace('.', '')}"
    if extra:
        key += "-" + hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]
    return key


class EngineCache:
    """`<key>.engine` plus a `<key>.json` sidecar holding the fields the key was made from.

    lookup() returns None on a miss and raises EngineMismatchError when a file exists but its
    sidecar disagrees (or is missing): TensorRT engines are not portable across TensorRT versions
    or GPUs, and a wrong one fails late or silently computes with another model.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def store(self, engine: bytes | str | Path, *, onnx_sha256: str, precision: str,
              trt_version: TrtVersion | str, compute_capability: str,
              extra: Mapping[str, Any] | None = None) -> Path:
        meta = _sidecar(onnx_sha256, precision, trt_version, compute_capability, extra)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{meta['key']}.engine"
        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        _atomic_write(path, data)  # engine first: a sidecar never points at a half-written engine
        _atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
        return path

    def lookup(self, *, onnx_sha256: str, precision: str, trt_version: TrtVersion | str,
               compute_capability: str, extra: Mapping[str, Any] | None = None) -> Path | None:
        want = _sidecar(onnx_sha256, precision, trt_version, compute_capability, extra)
        path = self.dir / f"{want['key']}.engine"
        if not path.exists():
            return None
        verify_engine(path, want)
        return path


def verify_engine(engine_path: str | Path, want: Mapping[str, Any]) -> None:
    """Raise EngineMismatchError unless the engine's sidecar matches every field in `want`.

    On a device, check a shipped engine with only what is known there, e.g.
    verify_engine(p, {"trt_version": "10.3.0", "compute_capability": "8.7"}).
    """
    side = Path(engine_path).with_suffix(".json")
    if not side.exists():
        raise EngineMismatchError(f"{engine_path} has no sidecar {side.name}, so its TensorRT version "
                                  "and GPU are unknown. Delete it and rebuild.")
    have = json.loads(side.read_text())
    bad = [f"{k}: engine has {have.get(k)!r}, need {v!r}" for k, v in want.items() if have.get(k) != v]
    if bad:
        raise EngineMismatchError(f"Refusing {engine_path}: " + "; ".join(bad) +
                                  ". Delete it (and its .json) and rebuild on this device.")


def _sidecar(onnx_sha256: str, precision: str, trt_version: TrtVersion | str,
             compute_capability: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    version = trt_version if isinstance(trt_version, TrtVersion) else TrtVersion.parse(trt_version)
    return {"key": engine_key(onnx_sha256, precision, version, compute_capability, extra),
            "onnx_sha256": onnx_sha256, "precision": precision, "trt_version": str(version),
            "compute_capability": compute_capability,
            "extra": json.loads(json.dumps(dict(extra or {}), sort_keys=True))}  # as read back from JSON


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------- running
def find_trtexec() -> str | None:
    """trtexec on PATH, else JetPack's /usr/src/tensorrt/bin/trtexec, else None."""
    found = shutil.which("trtexec")
    if found:
        return found
    return str(JETPACK_TRTEXEC) if os.access(JETPACK_TRTEXEC, os.X_OK) else None


def run_trtexec(argv: Sequence[str], timeout: float, log_path: str | Path | None = None) -> TrtexecResult:
    """Run trtexec, keep its whole output (optionally in log_path) and parse it."""
    # own process group, so a timeout kills trtexec and anything it started, and the pipe closes
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"Cannot run {argv[0]!r}: {e}. Use find_trtexec() for its path; "
                           "trt_status() says why TensorRT is unavailable.") from e
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    text = out.decode("utf-8", errors="replace")
    if log_path is not None:
        Path(log_path).write_text(text, encoding="utf-8")
    result = parse_log(text)
    result.returncode = proc.returncode
    if timed_out:
        result.status = "timeout"
        result.error_summary = _summarize_failure(result, text)
    elif result.status == "passed" and proc.returncode != 0:
        result.status = "failed"  # trust the exit code over a PASSED line
        result.error_summary = (f"trtexec printed '&&&& PASSED' but exited with code {proc.returncode}; "
                                "do not trust these numbers, read the log and rerun.")
    elif result.status == "incomplete":
        result.error_summary = f"{result.error_summary} Exit code: {proc.returncode}."
    return result


def trt_status() -> tuple[bool, str]:
    """(available, reason); the reason becomes a 'skipped: ...' row when TensorRT is missing."""
    exe = find_trtexec()
    try:
        import tensorrt  # heavy and often absent, so probed here rather than at module top
        module = f"tensorrt {tensorrt.__version__} Python module"
        module_error = ""
    except Exception as e:  # a broken install raises OSError/RuntimeError too, not just ImportError
        module, module_error = "", f"{type(e).__name__}: {e}"
    if exe or module:
        return True, " and ".join(x for x in (f"trtexec at {exe}" if exe else "", module) if x)
    return False, (f"TensorRT not installed: no trtexec on PATH or at {JETPACK_TRTEXEC}, and "
                   f"`import tensorrt` failed ({module_error}). Install JetPack's TensorRT or "
                   "`pip install tensorrt` on an NVIDIA GPU host.")
