"""Energy per inference: RAPL, NVML or Jetson tegrastats meters, and a labelled estimate when none works.

Runs on edge devices as a standalone folder: top-level imports are the stdlib only (numpy is allowed but
not needed); pynvml is imported inside NvmlMeter.
"""
from __future__ import annotations

import abc
import contextlib
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# A counter that changes every `update_s` can be off by up to one update at each end of a window;
# 20 updates keep that quantisation error near 10% worst case, ~5% typical.
_UPDATES_PER_WINDOW = 20
_KINDS = ("rapl", "nvml", "tegrastats")


class MeterUnavailable(Exception):
    """Raised by a meter's constructor; the message says why and what would make it usable."""


class Meter(abc.ABC):
    """Reads joules consumed between start() and stop()."""

    name: str
    update_s: float  # how often the underlying reading changes

    @property
    def min_window_s(self) -> float:
        return _UPDATES_PER_WINDOW * self.update_s

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> float:
        """Joules consumed since start()."""


# ---------------------------------------------------------------- RAPL (Linux powercap)

# intel-rapl:N is a package zone; intel-rapl:N:M are its sub-zones (core, uncore, dram), already inside
# the package, and intel-rapl-mmio:N is a second view of the same package: counting either double-counts.
# AMD Zen CPUs appear under the same intel-rapl names.
_RAPL_PACKAGE = re.compile(r"intel-rapl:(\d+)")


class RaplMeter(Meter):
    """CPU package energy (all sockets summed); excludes the GPU and, on most CPUs, DRAM."""

    update_s = 0.001  # RAPL counters update about every millisecond (Intel SDM: ~976 us)

    def __init__(self, sysfs_root: Path | str = "/sys/class/powercap") -> None:
        root = Path(sysfs_root)
        if not root.is_dir():
            raise MeterUnavailable(f"{root} does not exist (not Linux, or a VM/container that hides powercap)")
        zones = sorted((d for d in root.iterdir() if _RAPL_PACKAGE.fullmatch(d.name)),
                       key=lambda d: int(d.name.split(":")[1]))
        packages = [(z, _read_sysfs(z / "name")) for z in zones]
        packages = [(z, n) for z, n in packages if n.startswith("package")]  # skips 'psys' (whole platform)
        if not packages:
            raise MeterUnavailable(f"no intel-rapl:N package zone under {root}; "
                                   "load the driver with `modprobe intel_rapl_common` (absent in most VMs)")
        self._zones = [z for z, _ in packages]
        self._ranges = [int(_read_sysfs(z / "max_energy_range_uj")) for z in self._zones]
        self._read_uj()  # probe: energy_uj is root-only on many kernels even when the rest is readable
        self.name = "rapl:" + "+".join(n for _, n in packages)
        self._start: list[int] | None = None

    def _read_uj(self) -> list[int]:
        return [int(_read_sysfs(z / "energy_uj")) for z in self._zones]

    def start(self) -> None:
        self._start = self._read_uj()

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("RaplMeter.stop() called before start()")
        end = self._read_uj()
        total_uj = sum(_counter_delta(s, e, r) for s, e, r in zip(self._start, end, self._ranges))
        self._start = None
        return total_uj / 1e6


def _counter_delta(start: int, end: int, max_range: int) -> int:
    """Difference of a counter that restarts from 0 after max_range; assumes at most one wrap."""
    # One wrap takes max_energy_range_uj / power: ~262 kJ / 200 W = ~20 min, far longer than a window.
    return end - start if end >= start else end + max_range - start


def _read_sysfs(path: Path) -> str:
    try:
        return path.read_text().strip()
    except PermissionError:
        raise MeterUnavailable(f"cannot read {path}: permission denied (energy_uj is root-only since "
                               f"Linux 5.10, CVE-2020-8694); run as root or `sudo chmod a+r {path}`") from None
    except OSError as err:
        raise MeterUnavailable(f"cannot read {path}: {err}") from None


# ---------------------------------------------------------------- NVML (NVIDIA driver)

class NvmlMeter(Meter):
    """Whole-board GPU energy from the driver's total-energy counter (millijoules, Volta and newer)."""

    # The counter moves in steps of ~100 ms on many GPUs (ml.energy; PETSc's docs say 20-100 ms).
    update_s = 0.1

    def __init__(self, gpu_index: int = 0) -> None:
        try:
            import pynvml  # here, not at the top: edge devices and CPU hosts do not have it
        except ImportError:
            raise MeterUnavailable("pynvml is not installed: `pip install nvidia-ml-py`") from None
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
            gpu_name = pynvml.nvmlDeviceGetName(self._handle)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # raises NotSupported before Volta
        except pynvml.NVMLError as err:
            raise MeterUnavailable(f"GPU {gpu_index}: {err} (needs an NVIDIA driver and a Volta or newer GPU; "
                                   "pre-Volta GPUs and Jetsons before Thor lack this counter)") from None
        self._nvml = pynvml
        gpu_name = gpu_name.decode() if isinstance(gpu_name, bytes) else gpu_name  # bytes in old pynvml
        self.name = f"nvml:gpu{gpu_index} {gpu_name}"
        self._start_mj: int | None = None

    def start(self) -> None:
        self._start_mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def stop(self) -> float:
        if self._start_mj is None:
            raise RuntimeError("NvmlMeter.stop() called before start()")
        end_mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        joules = (end_mj - self._start_mj) / 1000  # 64-bit counter since driver load: no wrap in practice
        self._start_mj = None
        return joules


# ---------------------------------------------------------------- Jetson tegrastats

_TIMESTAMP = re.compile(r"^(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d) ")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
# "VDD_IN 6210mW/6234mW" (JetPack 5+) or "POM_5V_IN 920/920" (JetPack 4): instant/average in mW.
# The lookarounds keep "RAM 2525/7607MB" and "IRAM 0/252kB" out.
_RAIL = re.compile(r"(?<!\S)([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?!\S)")
# Rails that measure the whole module input: VDD_IN on Orin Nano/NX and Xavier NX, POM_5V_IN on Nano/TX1.
# AGX Orin (and AGX Xavier) print no such rail: their VIN_SYS_5V0 is only the 5 V system supply, so the
# module total is the sum of the printed rails, as jetson-stats does (jetson_stats#344, NVIDIA forum 81016).
_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_tegrastats_line(line: str) -> dict:
    """One tegrastats line -> {"rails": {name: (instant_mW, average_mW)}, "ram_used_mb", "ram_total_mb",
    and where present "gr3d_pct", "gr3d_freq_mhz" (one per GPC), "timestamp" (as printed, 1 s resolution)}.

    Raises ValueError for a line without a RAM field (a warning or partial line, not a sample).
    """
    ram = _RAM.search(line)
    if ram is None:
        raise ValueError(f"not a tegrastats sample (no 'RAM used/totalMB' field): {line.strip()[:80]!r}")
    out: dict = {"ram_used_mb": int(ram[1]), "ram_total_mb": int(ram[2]),
                 "rails": {m[1]: (int(m[2]), int(m[3])) for m in _RAIL.finditer(line)}}
    if ts := _TIMESTAMP.match(line):
        out["timestamp"] = ts[1]
    if gr3d := _GR3D.search(line):
        out["gr3d_pct"] = int(gr3d[1])
        if gr3d[2]:
            out["gr3d_freq_mhz"] = [int(f) for f in gr3d[2].split(",")]
    return out


def input_rails(rails: dict[str, tuple[int, int]]) -> tuple[str, ...]:
    """The rails whose sum is the module's input power (see _INPUT_RAILS for why)."""
    for name in _INPUT_RAILS:
        if name in rails:
            return (name,)
    if not rails:
        raise ValueError("tegrastats printed no power rails; run it as root (`sudo`) to expose them")
    return tuple(rails)


class TegrastatsMeter(Meter):
    """Module input power sampled by `tegrastats --interval`, integrated over the window."""

    def __init__(self, interval_ms: int = 100, exe: str = "tegrastats") -> None:
        path = shutil.which(exe)
        if path is None:
            raise MeterUnavailable(f"`{exe}` is not on PATH (not a Jetson, or L4T tools not installed)")
        self._cmd = [path, "--interval", str(interval_ms)]
        self.update_s = interval_ms / 1000
        self._rails: tuple[str, ...] = ()
        self._proc: subprocess.Popen | None = None
        try:
            first = self._spawn()  # probe once to learn which rails this board prints
        except (OSError, RuntimeError) as err:
            raise MeterUnavailable(str(err)) from None
        finally:
            self._kill()
        try:
            self._rails = input_rails(first)
        except ValueError as err:
            raise MeterUnavailable(str(err)) from None
        self.name = "tegrastats:" + "+".join(self._rails)

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("TegrastatsMeter.start() called twice; call stop() first")
        self._spawn()
        self._t0 = time.monotonic()  # after the first sample: samples from here on cover the window

    def stop(self) -> float:
        t1 = time.monotonic()
        if self._proc is None:
            raise RuntimeError("TegrastatsMeter.stop() called before start()")
        self._kill()
        with self._lock:
            in_window = [mw for t, mw in self._samples if self._t0 < t <= t1]
        if not in_window:
            raise RuntimeError(f"no tegrastats sample arrived in the {t1 - self._t0:.3f} s window; "
                               f"measure for at least min_window_s={self.min_window_s} s")
        # Mean of evenly spaced samples x duration. Arrival time, not the printed timestamp (1 s
        # resolution), places samples; the average field is tegrastats' running mean since it started.
        return sum(in_window) / len(in_window) / 1000 * (t1 - self._t0)

    def _spawn(self) -> dict[str, tuple[int, int]]:
        """Start tegrastats and a reader thread; return the first sample's rails."""
        self._samples: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        first: list[dict] = []
        got_first = threading.Event()
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, errors="replace", bufsize=1)

        def read(stdout) -> None:
            for line in stdout:
                arrived = time.monotonic()
                try:
                    rails = parse_tegrastats_line(line)["rails"]
                except ValueError:
                    continue
                if not first:
                    first.append(rails)
                    got_first.set()
                if self._rails and all(r in rails for r in self._rails):
                    with self._lock:
                        self._samples.append((arrived, sum(rails[r][0] for r in self._rails)))

        self._reader = threading.Thread(target=read, args=(self._proc.stdout,), daemon=True)
        self._reader.start()
        timeout = max(3.0, 5 * self.update_s)
        if not got_first.wait(timeout):
            self._kill()
            raise RuntimeError(f"`{' '.join(self._cmd)}` printed no sample within {timeout:.1f} s; "
                               "run it by hand to see its error")
        return first[0]

    def _kill(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=2)  # EOF ends it; joined so no sample lands after stop() reads the list
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None


# ---------------------------------------------------------------- Jetson power mode and clocks

def parse_nvpmodel_q(text: str) -> dict:
    """`nvpmodel -q` output -> {"mode_name", "mode_id", "errors"}; NVPM ERROR lines (non-root) go in errors."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("NVPM ERROR")]
    for i, ln in enumerate(lines):
        if ln.startswith("NV Power Mode:"):
            mode_id = next((int(x) for x in lines[i + 1:i + 2] if x.isdigit()), None)
            return {"mode_name": ln.split(":", 1)[1].strip(), "mode_id": mode_id, "errors": errors}
    raise ValueError("no 'NV Power Mode:' line in nvpmodel output; run `nvpmodel -q` by hand to see why")


_CLOCK = re.compile(r"^(cpu\d+|GPU|EMC):? (?:Online=(\d) )?.*?MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)", re.M)


def parse_jetson_clocks_show(text: str) -> dict:
    """`jetson_clocks --show` -> {"clocks": {unit: (min, max, current)}, "locked": bool}.

    Offline CPUs (Online=0) are left out. locked means every online CPU and the GPU run pinned at their
    maximum, which is what jetson_clocks sets; EMC is left out because nvpmodel may cap it below MaxFreq
    (jetson-stats does the same).
    """
    clocks = {m[1]: (int(m[3]), int(m[4]), int(m[5])) for m in _CLOCK.finditer(text) if m[2] != "0"}
    if not clocks:
        raise ValueError("no MinFreq/MaxFreq lines in jetson_clocks output; run `sudo jetson_clocks --show`")
    pinned = [lo == hi == cur for unit, (lo, hi, cur) in clocks.items() if unit != "EMC"]
    return {"clocks": clocks, "locked": bool(pinned) and all(pinned)}


def query_jetson_state() -> dict:
    """Best effort: {"nvpmodel": parsed or {"reason"}, "jetson_clocks": parsed or {"reason"}}; never raises."""
    def run(cmd: list[str], parse: Callable[[str], dict]) -> dict:
        if shutil.which(cmd[0]) is None:
            return {"reason": f"`{cmd[0]}` is not on PATH (not a Jetson)"}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return parse(done.stdout + done.stderr)  # NVPM ERROR lines go to either stream
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            return {"reason": f"`{' '.join(cmd)}` failed: {err}"}
    return {"nvpmodel": run(["nvpmodel", "-q"], parse_nvpmodel_q),
            "jetson_clocks": run(["jetson_clocks", "--show"], parse_jetson_clocks_show)}


# ---------------------------------------------------------------- picking, measuring, estimating

def pick_meter(kinds: Sequence[str] = _KINDS, gpu_index: int = 0,
               sysfs_root: Path | str = "/sys/class/powercap",
               tegrastats_interval_ms: int = 100) -> tuple[Meter | None, list[str]]:
    """First usable meter in `kinds` order, and "<kind>: <why not>" for each one tried before it.

    Order matters: rapl measures the CPU package only, nvml the GPU board only, tegrastats the whole
    Jetson module; pass the kinds that match where the model runs.
    """
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown:
        raise ValueError(f"Unknown meter kind(s) {unknown}. Available: {', '.join(_KINDS)}")
    makers: dict[str, Callable[[], Meter]] = {
        "rapl": lambda: RaplMeter(sysfs_root),
        "nvml": lambda: NvmlMeter(gpu_index),
        "tegrastats": lambda: TegrastatsMeter(tegrastats_interval_ms),
    }
    reasons: list[str] = []
    for kind in kinds:
        try:
            return makers[kind](), reasons
        except MeterUnavailable as err:
            reasons.append(f"{kind}: {err}")
    return None, reasons


def measure_energy(fn: Callable[[], object], meter: Meter, min_window_s: float) -> dict:
    """Call fn() back to back until the window reaches max(min_window_s, meter.min_window_s).

    Returns {"joules", "calls", "seconds", "mj_per_call", "meter"}. Warm fn up before calling this:
    the first calls (engine build, allocation) would otherwise be billed.
    """
    if not min_window_s >= 0:
        raise ValueError(f"min_window_s must be >= 0 seconds, got {min_window_s}")
    window = max(min_window_s, meter.min_window_s)
    calls = 0
    meter.start()
    t0 = time.perf_counter()
    try:
        while calls == 0 or time.perf_counter() - t0 < window:
            fn()
            calls += 1
    except BaseException:
        # stop anyway so a tegrastats child does not outlive us; fn's error is the one worth seeing
        with contextlib.suppress(Exception):
            meter.stop()
        raise
    seconds = time.perf_counter() - t0
    joules = meter.stop()
    return {"joules": joules, "calls": calls, "seconds": seconds,
            "mj_per_call": joules * 1000 / calls, "meter": meter.name}
