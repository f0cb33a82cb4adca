"""trtexec flags, log parsing against real logs, engine cache, running a stand-in trtexec.

No GPU or TensorRT needed: numbers are compared with the values printed in tests/fixtures/.
"""
from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.device import envinfo, trt_api, trtbench, trtexec
from pipeline.device.envinfo import compute_capability
from pipeline.device.trtexec import (
    EngineCache,
    EngineMismatchError,
    Stats,
    TrtVersion,
    build_command,
    engine_key,
    parse_log,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"


def load(name: str):
    return parse_log((FIXTURES / name).read_text())


# ---------------------------------------------------------------- versions
@pytest.mark.parametrize("text, expected", [
    ("v8201", (8, 2, 1)), ("[TensorRT v8601]", (8, 6, 1)), ("[TensorRT v101601] [b11]", (10, 16, 1)),
    ("v8400", (8, 4, 0)), ("v100300", (10, 3, 0)),
    ("10.3.0.26", (10, 3, 0)), ("8.6.1", (8, 6, 1)), ("11.0", (11, 0, 0)),
    ("8.5.2-1+cuda11.4", (8, 5, 2)), ("10.3.0.30-1+cuda12.5", (10, 3, 0)),
    ("ii  libnvinfer8  8.2.1-8+cuda10.2  arm64  TensorRT runtime libraries", (8, 2, 1)),
])
def test_version_parse(text, expected):
    assert TrtVersion.parse(text) == TrtVersion(*expected)


def test_version_parse_rejects_garbage_and_orders():
    with pytest.raises(ValueError, match="No TensorRT version"):
        TrtVersion.parse("libnvinfer")
    assert TrtVersion(8, 6, 1) < TrtVersion(10, 0, 0) < TrtVersion(10, 16, 1)
    assert str(TrtVersion(10, 16, 1)) == "10.16.1"


def test_supports_helpers_at_their_boundaries():
    v = TrtVersion.parse
    assert not trtexec.supports_mem_pool_size(v("8.2.1")) and trtexec.supports_mem_pool_size(v("8.4.0"))
    assert not trtexec.supports_multiple_percentiles(v("8.4.1"))
    assert trtexec.supports_multiple_percentiles(v("8.5.0"))
    assert not trtexec.supports_strongly_typed_flag(v("8.6.1"))
    assert trtexec.supports_strongly_typed_flag(v("10.3.0"))
    assert not trtexec.supports_strongly_typed_flag(v("11.0.0"))
    assert trtexec.is_strongly_typed_only(v("11.0.0")) and not trtexec.is_strongly_typed_only(v("10.16.1"))


# ---------------------------------------------------------------- command line
def test_build_command_trt10_int8_full_argv():
    argv = build_command(TrtVersion(10, 3, 0), onnx="m.int8.onnx", save_engine="m.engine", precision="int8",
                         shapes={"images": (8, 3, 640, 640)}, warmup_ms=500, duration_s=10, iterations=100,
                         avg_runs=20, use_spin_wait=True, timing_cache="t.cache", workspace_mib=2048,
                         export_times="times.json", verbose=True)
    assert argv == ["trtexec", "--onnx=m.int8.onnx", "--saveEngine=m.engine", "--int8", "--fp16",
                    "--memPoolSize=workspace:2048M", "--timingCacheFile=t.cache",
                    "--shapes=images:8x3x640x640", "--warmUp=500", "--duration=10", "--iterations=100",
                    "--avgRuns=20", "--percentile=90,95,99", "--useSpinWait", "--exportTimes=times.json",
                    "--verbose"]


def test_build_command_trt82_uses_workspace_and_single_percentile():
    argv = build_command(TrtVersion(8, 2, 1), onnx="m.onnx", precision="fp32", workspace_mib=2048)
    assert "--workspace=2048" in argv and "--percentile=99" in argv
    assert not any(a.startswith(("--memPoolSize", "--fp16", "--int8")) for a in argv)


def test_build_command_trt86_fp16_mempool_without_suffix():
    argv = build_command(TrtVersion(8, 6, 1), onnx="m.onnx", precision="fp16", workspace_mib=1024)
    assert "--fp16" in argv and "--memPoolSize=workspace:1024" in argv and "--int8" not in argv


def test_build_command_int8_without_fp16_fallback():
    argv = build_command(TrtVersion(8, 6, 1), onnx="m.onnx", precision="int8", int8_allow_fp16=False)
    assert "--int8" in argv and "--fp16" not in argv


def test_build_command_trt10_strongly_typed_drops_precision_flags():
    argv = build_command(TrtVersion(10, 16, 1), onnx="m.onnx", precision="int8", strongly_typed=True)
    assert "--stronglyTyped" in argv and "--int8" not in argv and "--fp16" not in argv


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_command_trt11_has_no_precision_flags(precision):
    argv = build_command(TrtVersion(11, 0, 0), onnx="m.onnx", precision=precision, strongly_typed=True)
    assert not {"--fp16", "--int8", "--stronglyTyped", "--best"} & set(argv)


def test_build_command_load_engine_and_tensor_names_with_colons():
    argv = build_command(TrtVersion(8, 2, 3), load_engine="m.plan", precision="fp16", workspace_mib=64,
                         shapes={"x:0": (4, 1, 28, 28)}, percentiles=(50, 90))
    assert argv == ["trtexec", "--loadEngine=m.plan", "--shapes=x:0:4x1x28x28", "--percentile=90"]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of onnx"),
    ({"onnx": "a.onnx", "load_engine": "b.plan"}, "exactly one of onnx"),
    ({"onnx": "a.onnx", "precision": "bf16"}, "Unknown precision"),
    ({"onnx": "a.onnx", "strongly_typed": True}, "needs TensorRT 10"),
    ({"onnx": "a.onnx", "shapes": {"a,b": (1, 3)}}, "has a comma"),
    ({"onnx": "a.onnx", "shapes": {"x": (0, 3)}}, "positive dims"),
    ({"onnx": "a.onnx", "percentiles": (101,)}, r"\[0, 100\]"),
    ({"onnx": "a.onnx", "workspace_mib": 0}, "positive"),
])
def test_build_command_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_command(TrtVersion(8, 6, 1), **kwargs)


# ---------------------------------------------------------------- parsing real logs
def test_parse_trt10_h100_fp32():
    r = load("trtexec-trt10.16-h100-fp32.log")
    assert (r.status, r.passed, r.trt_version) == ("passed", True, TrtVersion(10, 16, 1))
    assert (r.device, r.compute_capability, r.precision) == ("NVIDIA H100 PCIe", "9.0", "FP32")
    assert (r.throughput_qps, r.engine_build_s, r.implicit_batch) == (15374.3, 8.09138, None)
    assert r.stats["latency"] == Stats(0.0410156, 0.14917, 0.0441053, 0.0440674,
                                       {"p90": 0.0450439, "p95": 0.0458984, "p99": 0.0512695})
    assert r.stats["gpu_compute"] == Stats(0.0331421, 0.140381, 0.0359588, 0.0361328,
                                           {"p90": 0.0368652, "p95": 0.0371094, "p99": 0.041748})
    assert r.stats["enqueue"].percentiles["p99"] == 0.0357666
    assert r.stats["h2d"] == Stats(0.00341797, 0.108398, 0.00395853, 0.00378418,
                                   {"p90": 0.00439453, "p95": 0.00488281, "p99": 0.00537109})
    assert r.stats["d2h"].mean == 0.00418773
    assert "end_to_end" not in r.stats
    assert (r.total_host_walltime_s, r.total_gpu_compute_s, r.gpu_compute_cv_percent) == (3.00013, 1.6586, 6.58751)
    assert r.errors == [] and r.error_summary is None


def test_parse_trt86_h100_fp16_with_merged_progress_line():
    r = load("trtexec-trt8.6-h100-fp16.log")
    assert (r.status, r.trt_version, r.device, r.compute_capability) == ("passed", TrtVersion(8, 6, 1),
                                                                         "NVIDIA H100 PCIe", "9.0")
    assert (r.precision, r.engine_build_s, r.throughput_qps) == ("FP32+FP16", 1033.79, 484.641)
    assert r.stats["latency"] == Stats(2.74048, 6.60767, 3.18949, 3.09521,
                                       {"p90": 4.38843, "p95": 4.60181, "p99": 4.83325})
    assert r.stats["gpu_compute"] == Stats(1.58716, 5.46997, 2.05867, 1.97192,
                                           {"p90": 3.27051, "p95": 3.48145, "p99": 3.66565})
    assert r.stats["enqueue"].max == 6.70361 and r.stats["d2h"].percentiles["p95"] == 0.364822
    assert r.command.endswith("--fp16") and r.errors == []


def test_parse_trt82_jetson_nano_fp32_p99_only_and_end_to_end():
    r = load("trtexec-trt8.2-jetson-nano-fp32.log")
    assert (r.status, r.trt_version, r.device, r.compute_capability) == ("passed", TrtVersion(8, 2, 1),
                                                                         "NVIDIA Tegra X1", "5.3")
    assert (r.throughput_qps, r.engine_build_s, r.precision) == (11.0613, 184.708, "FP32")
    assert r.stats["latency"] == Stats(89.312, 91.492, 90.3919, 90.3035, {"p99": 91.492})
    assert r.stats["end_to_end"] == Stats(89.3254, 91.5049, 90.4048, 90.3167, {"p99": 91.5049})
    assert r.stats["gpu_compute"] == Stats(89.0273, 91.2045, 90.1061, 90.0183, {"p99": 91.2045})
    assert r.stats["d2h"] == Stats(0.00683594, 0.00881958, 0.008238, 0.00830078, {"p99": 0.00881958})
    assert (r.total_host_walltime_s, r.total_gpu_compute_s, r.gpu_compute_cv_percent) == (3.16419, 3.15371, None)


def test_parse_trt84_xavier_summary_only_fragment():
    r = load("trtexec-trt8.4-xavier-agx-summary-only.log")
    assert (r.status, r.trt_version, r.implicit_batch) == ("passed", TrtVersion(8, 4, 0), 16)
    assert (r.device, r.compute_capability, r.engine_build_s) == (None, None, None)
    assert r.throughput_qps == 41087.7
    assert r.stats["latency"] == Stats(0.387207, 0.447357, 0.402238, 0.401947, {"p99": 0.420288})
    assert r.stats["gpu_compute"] == Stats(0.375977, 0.403564, 0.388221, 0.388443, {"p99": 0.393188})
    assert r.stats["h2d"].median == 0.00952148 and r.stats["enqueue"].percentiles == {"p99": 0.126099}


def test_parse_failed_onnx_parse_tail():
    r = load("trtexec-failed-onnx-parse-trt8.2-tail.log")
    assert (r.status, r.passed, r.trt_version) == ("failed", False, TrtVersion(8, 2, 4))
    assert len(r.errors) == 10 and r.errors[-1] == "Engine set up failed"
    assert "Failed to parse onnx file" in r.errors
    assert "Pad_13" in r.error_summary and "op Pad" in r.error_summary and "Error Code 4" in r.error_summary
    assert r.stats == {} and r.throughput_qps is None


def test_parse_failed_gtx1070_without_error_lines():
    r = load("trtexec-failed-trt8.2-gtx1070.log")
    assert (r.status, r.trt_version, r.device, r.compute_capability) == ("failed", TrtVersion(8, 2, 3),
                                                                         "NVIDIA GeForce GTX 1070", "6.1")
    assert r.precision == "FP32+FP16" and r.errors == []
    assert "without any [E] line" in r.error_summary
    assert "Finish parsing network model" in r.error_summary


def test_parse_incomplete_log_and_to_dict_is_json():
    text = (FIXTURES / "trtexec-trt8.6-h100-fp16.log").read_text().split("=== Trace details")[0]
    r = parse_log(text)
    assert r.status == "incomplete" and "killed" in r.error_summary and r.stats == {}
    d = json.loads(json.dumps(load("trtexec-trt10.16-h100-fp32.log").to_dict()))
    assert d["trt_version"] == "10.16.1" and d["passed"] is True
    assert d["stats"]["latency"]["percentiles"]["p99"] == 0.0512695


# ---------------------------------------------------------------- engine keys and cache
SHA = "ab" * 32
FIELDS = dict(onnx_sha256=SHA, precision="int8", trt_version="10.3.0", compute_capability="8.7")


def test_engine_key_changes_with_every_field():
    base = engine_key(SHA, "int8", TrtVersion(10, 3, 0), "8.7")
    assert base == "abababababababab-int8-trt10.3.0-sm87"
    others = {engine_key("cd" * 32, "int8", "10.3.0", "8.7"), engine_key(SHA, "fp16", "10.3.0", "8.7"),
              engine_key(SHA, "int8", "10.3.1", "8.7"), engine_key(SHA, "int8", "10.3.0", "7.2"),
              engine_key(SHA, "int8", "10.3.0", "8.7", {"batch": [1, 8, 32]})}
    assert base not in others and len(others) == 5
    with pytest.raises(ValueError, match="64-char"):
        engine_key("abc", "int8", "10.3.0", "8.7")
    with pytest.raises(ValueError, match="8.7"):
        engine_key(SHA, "int8", "10.3.0", "sm87")


def test_engine_cache_roundtrip_and_miss(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(**FIELDS) is None
    path = cache.store(b"PLAN", **FIELDS)
    assert cache.lookup(**FIELDS) == path and path.read_bytes() == b"PLAN"
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["trt_version"] == "10.3.0" and side["compute_capability"] == "8.7" and side["onnx_sha256"] == SHA
    assert cache.lookup(**{**FIELDS, "compute_capability": "7.2"}) is None  # another GPU: a miss, not a reuse


def test_engine_cache_refuses_mismatching_or_unverifiable_engine(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store(b"PLAN", **FIELDS)
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "trt_version": "8.6.1"}))  # e.g. copied from another device
    with pytest.raises(EngineMismatchError, match="trt_version: engine has '8.6.1', need '10.3.0'"):
        cache.lookup(**FIELDS)
    side.unlink()
    with pytest.raises(EngineMismatchError, match="no sidecar"):
        cache.lookup(**FIELDS)


def test_engine_cache_extra_survives_json_and_shipped_engine_check(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store(b"PLAN", **FIELDS, extra={"batch": (1, 8, 32)})  # tuple in, list in the JSON
    assert cache.lookup(**FIELDS, extra={"batch": (1, 8, 32)}) == path
    trtexec.verify_engine(path, {"trt_version": "10.3.0", "compute_capability": "8.7"})
    with pytest.raises(EngineMismatchError, match="compute_capability: engine has '8.7', need '7.2'"):
        trtexec.verify_engine(path, {"compute_capability": "7.2"})


# ---------------------------------------------------------------- finding and running trtexec
def fake_exe(directory: Path, body: str) -> Path:
    exe = directory / "trtexec"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@pytest.fixture
def no_trt(tmp_path, monkeypatch):
    """PATH without trtexec, no JetPack copy, and `import tensorrt` failing."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(trtexec, "JETPACK_TRTEXEC", tmp_path / "missing" / "trtexec")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    return tmp_path


def test_find_trtexec_path_then_jetpack(no_trt, monkeypatch):
    assert trtexec.find_trtexec() is None
    (no_trt / "jp").mkdir()
    jetpack = fake_exe(no_trt / "jp", "true")
    monkeypatch.setattr(trtexec, "JETPACK_TRTEXEC", jetpack)
    assert trtexec.find_trtexec() == str(jetpack)
    on_path = fake_exe(no_trt, "true")
    assert trtexec.find_trtexec() == str(on_path)


def test_trt_status_reports_skip_reason_then_availability(no_trt):
    ok, reason = trtexec.trt_status()
    assert not ok and reason.startswith("TensorRT not installed: no trtexec on PATH")
    assert "import tensorrt" in reason
    fake_exe(no_trt, "true")
    ok, reason = trtexec.trt_status()
    assert ok and str(no_trt / "trtexec") in reason


def test_run_trtexec_parses_output_and_keeps_log(tmp_path):
    log = FIXTURES / "trtexec-trt8.2-jetson-nano-fp32.log"
    exe = fake_exe(tmp_path, f"cat '{log}'")
    r = trtexec.run_trtexec([str(exe), "--onnx=m.onnx"], timeout=30, log_path=tmp_path / "out.log")
    assert (r.status, r.returncode, r.throughput_qps) == ("passed", 0, 11.0613)
    assert (tmp_path / "out.log").read_text() == log.read_text()


def test_run_trtexec_nonzero_exit_overrides_passed_line(tmp_path):
    log = FIXTURES / "trtexec-trt8.4-xavier-agx-summary-only.log"
    exe = fake_exe(tmp_path, f"cat '{log}'; exit 3")
    r = trtexec.run_trtexec([str(exe)], timeout=30)
    assert (r.status, r.returncode) == ("failed", 3) and "exited with code 3" in r.error_summary


def test_run_trtexec_crash_without_final_line_is_incomplete(tmp_path):
    exe = fake_exe(tmp_path, "echo '&&&& RUNNING TensorRT.trtexec [TensorRT v8201] # trtexec'; exit 139")
    r = trtexec.run_trtexec([str(exe)], timeout=30)
    assert (r.status, r.returncode) == ("incomplete", 139) and "Exit code: 139." in r.error_summary


def test_run_trtexec_missing_executable_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="find_trtexec"):
        trtexec.run_trtexec([str(tmp_path / "nope" / "trtexec")], timeout=5)


def test_run_trtexec_timeout_kills_and_keeps_partial_output(tmp_path):
    exe = fake_exe(tmp_path, "echo '&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec'; sleep 30")
    start = time.monotonic()
    r = trtexec.run_trtexec([str(exe)], timeout=1)
    assert time.monotonic() - start < 15  # the sleeping child was killed with its process group
    assert (r.status, r.trt_version) == ("timeout", TrtVersion(8, 6, 1))
    assert "timeout" in r.error_summary


# ---------------------------------------------------------------- Python API without TensorRT
def test_trt_api_without_tensorrt_names_the_fix(no_trt, tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really onnx")
    with pytest.raises(RuntimeError, match="pip install tensorrt"):
        trt_api.build_engine(onnx, EngineCache(tmp_path / "engines"), compute_capability="8.7")
    with pytest.raises(RuntimeError, match="JetPack"):
        trt_api.time_engine(tmp_path / "m.engine")
    assert not (tmp_path / "engines").exists()



class FakeTrt:
    """Stands in for the `tensorrt` module (names as in its Python API) and records the calls."""

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH, STRONGLY_TYPED = 0, 1

    class BuilderFlag:
        FP16, INT8 = "FP16", "INT8"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    def __init__(self, version: str) -> None:
        self.__version__ = version
        self.calls: dict = {"flags": [], "builds": 0}
        self.input = SimpleNamespace(name="images", shape=(-1, 3, 32, 32))

    # builder, network, parser, config and profile are all this one object
    def Builder(self, logger):
        return self

    def OnnxParser(self, network, logger):
        return SimpleNamespace(parse_from_file=lambda path: True)

    def create_network(self, flags):
        self.calls["net_flags"], self.num_inputs = flags, 1
        return self

    def get_input(self, i):
        return self.input

    def create_builder_config(self):
        return self

    def create_optimization_profile(self):
        return self

    def set_flag(self, flag):
        self.calls["flags"].append(flag)

    def set_memory_pool_limit(self, pool, size):
        self.calls["pool"] = size

    def set_shape(self, name, *shapes):
        self.calls["profile"] = (name, *shapes)

    def add_optimization_profile(self, profile):
        pass

    def build_serialized_network(self, network, config):
        self.calls["builds"] += 1
        return b"PLAN"


@pytest.mark.parametrize("version, precision, strongly_typed, flags, net_flags", [
    ("8.6.1", "int8", False, ["INT8", "FP16"], 1 << 0),  # explicit batch before 10
    ("10.3.0.26", "fp16", False, ["FP16"], 0),
    ("10.3.0.26", "int8", True, [], 1 << 1),               # strongly typed: no precision flags
    ("11.0.0", "int8", False, [], 0),                       # 11: precision comes from the Q/DQ ONNX
])
def test_build_engine_maps_precision_onto_builder(tmp_path, monkeypatch, version, precision,
                                                  strongly_typed, flags, net_flags):
    fake = FakeTrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx bytes")
    cache = EngineCache(tmp_path / "engines")
    path = trt_api.build_engine(onnx, cache, precision=precision, strongly_typed=strongly_typed,
                                batch=(1, 8, 32), workspace_mib=256, compute_capability="8.7")
    assert sorted(fake.calls["flags"]) == sorted(flags) and fake.calls["net_flags"] == net_flags
    assert fake.calls["profile"] == ("images", (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    assert fake.calls["pool"] == 256 << 20 and path.read_bytes() == b"PLAN"
    assert json.loads(path.with_suffix(".json").read_text())["trt_version"] == str(TrtVersion.parse(version))
    assert trt_api.build_engine(onnx, cache, precision=precision, strongly_typed=strongly_typed,
                                batch=(1, 8, 32), workspace_mib=256, compute_capability="8.7") == path
    assert fake.calls["builds"] == 1  # the second call reused the cached engine


def test_build_engine_dynamic_batch_needs_batch_range(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt("10.3.0"))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx bytes")
    with pytest.raises(ValueError, match=r"batch=\(min, opt, max\)"):
        trt_api.build_engine(onnx, EngineCache(tmp_path), compute_capability="8.7")


# ---------------------------------------------------------------- the GPU's compute capability: one reading
def test_compute_capability_is_the_drivers_answer_or_none():
    cc = compute_capability()
    smi = [g["compute_capability"] for g in envinfo.gpu_info()]
    if smi:  # a GPU host: the driver API and nvidia-smi agree on device 0
        assert cc == smi[0]
    else:
        assert cc is None


@pytest.mark.skipif(compute_capability() is not None, reason="needs a host without a CUDA GPU")
def test_engines_are_not_built_without_a_gpu_to_key_them(tmp_path, monkeypatch):
    # trt_api and trtexec both ask envinfo.compute_capability before building, not torch or the trtexec log
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt("10.3.0"))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx bytes")
    with pytest.raises(RuntimeError, match="no CUDA GPU answered"):
        trt_api.build_engine(onnx, EngineCache(tmp_path / "engines"), batch=(1, 1, 1))
    log = FIXTURES / "trtexec-trt10.16-h100-fp32.log"  # what a real trtexec prints, --help included
    monkeypatch.setenv("PATH", f"{fake_exe(tmp_path, f'cat {log}').parent}:/usr/bin:/bin")
    with pytest.raises(RuntimeError, match="no CUDA GPU answered"):
        trtbench.time_model(onnx, "fp32", "input", [1, 8, 8], tmp_path / "cache")
    assert not (tmp_path / "engines").exists()


@pytest.mark.skipif(compute_capability() is not None, reason="needs a host without a CUDA GPU")
def test_without_trtexec_the_device_rows_go_through_the_python_api(tmp_path, monkeypatch):
    # the tensorrt module imports, trtexec is nowhere: rows come from trt_api (here: skipped, no GPU to build
    # for), not a "skipped" that only repeats trt_status's "found the Python module"
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(trtexec, "JETPACK_TRTEXEC", tmp_path / "missing" / "trtexec")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt("10.3.0"))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx bytes")
    model = SimpleNamespace(name="m.onnx", path=onnx, precision="fp16", meta={})
    (row,) = trtbench.rows([model], {"kind": "device"}, "input", [1, 8, 8], tmp_path / "cache", log=lambda _m: None)
    assert (row["backend"], row["provider"], row["status"]) == ("tensorrt", "tensorrt-python-api", "skipped")
    assert "no CUDA GPU answered" in row["reason"]
