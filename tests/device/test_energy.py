"""Energy meters: parsers on real Jetson output, RAPL on a fake sysfs tree, tegrastats through a real subprocess."""
import os
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.device.energy import (
    MeterUnavailable,
    NvmlMeter,
    RaplMeter,
    TegrastatsMeter,
    input_rails,
    measure_energy,
    parse_jetson_clocks_show,
    parse_nvpmodel_q,
    parse_tegrastats_line,
    pick_meter,
    query_jetson_state,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"

# Every line of every tegrastats fixture, read off the files by eye:
# (timestamp or None, RAM used MB, RAM total MB, GR3D %, GR3D MHz or None, {rail: (instant mW, average mW)})
_JP6, _AGX, _JP5, _NANO = (("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"), ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),
                           ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"), ("POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"))
TEGRASTATS = {
    "tegrastats-orin-nano-jp6.txt": (_JP6, [
        ("04-19-2026 01:31:35", 2525, 7607, 0, [1018], (6210, 6234), (1589, 1611), (2348, 2348)),
        ("04-19-2026 01:31:35", 2536, 7607, 0, [1018], (6249, 6234), (1629, 1611), (2348, 2348)),
        ("04-19-2026 01:31:35", 2600, 7607, 2, [1015], (6329, 6234), (1708, 1611), (2348, 2348)),
        ("04-19-2026 01:31:35", 2608, 7607, 4, [1016], (6448, 6235), (1867, 1612), (2348, 2348)),
        ("04-19-2026 01:31:35", 2617, 7607, 3, [1015], (6488, 6236), (1987, 1614), (2348, 2348))]),
    "tegrastats-agx-orin-64gb.txt": (_AGX, [
        ("07-21-2025 16:33:42", 17953, 62841, 39, [305, 0], (2798, 2798), (799, 799), (3315, 3315)),
        ("07-21-2025 16:33:43", 17955, 62841, 40, [305, 0], (2797, 2798), (799, 799), (3215, 3265)),
        ("07-21-2025 16:33:44", 17956, 62841, 35, [305, 0], (2798, 2798), (799, 799), (3215, 3248)),
        ("07-21-2025 16:33:45", 17956, 62841, 32, [305, 0], (2798, 2798), (799, 799), (3114, 3215)),
        ("07-21-2025 16:33:47", 17956, 62841, 41, [305, 0], (2798, 2798), (799, 799), (3215, 3215))]),
    "tegrastats-orin-8gb-jp5-gpuburn.txt": (_JP5, [
        ("10-01-2025 20:06:03", 3635, 6834, 0, None, (5582, 5564), (1594, 1625), (1236, 1235)),
        ("10-01-2025 20:06:04", 5408, 6834, 0, None, (5821, 5589), (1714, 1634), (1273, 1238)),
        ("10-01-2025 20:06:05", 5447, 6834, 0, None, (5701, 5599), (1714, 1641), (1234, 1238)),
        ("10-01-2025 20:06:06", 5453, 6834, 99, None, (9315, 5909), (4371, 1868), (1589, 1267)),
        ("10-01-2025 20:06:07", 5451, 6834, 99, None, (13353, 6482), (7340, 2289), (1944, 1319)),
        ("10-01-2025 20:06:08", 5451, 6834, 99, None, (13671, 6995), (7578, 2667), (1984, 1367))]),
    "tegrastats-jetson-nano.txt": (_NANO, [
        (None, 936, 3964, 0, [76], (920, 920), (0, 0), (119, 119)),
        (None, 958, 3964, 0, [76], (1537, 1228), (0, 0), (472, 295)),
        (None, 1095, 3964, 42, [76], (2793, 1750), (76, 25), (1222, 604)),
        (None, 1134, 3964, 0, [76], (2760, 2002), (115, 47), (1186, 749)),
        (None, 1182, 3964, 48, [76], (2688, 2139), (115, 61), (1226, 845))]),
}


@pytest.mark.parametrize("fixture", sorted(TEGRASTATS))
def test_tegrastats_parser_reads_every_fixture_line_exactly(fixture: str) -> None:
    rail_names, rows = TEGRASTATS[fixture]
    lines = (FIXTURES / fixture).read_text().splitlines()
    assert len(lines) == len(rows)
    for line, (ts, used, total, pct, mhz, *pairs) in zip(lines, rows):
        want = {"ram_used_mb": used, "ram_total_mb": total, "gr3d_pct": pct, "rails": dict(zip(rail_names, pairs))}
        want.update({"timestamp": ts} if ts else {})
        want.update({"gr3d_freq_mhz": mhz} if mhz else {})
        assert parse_tegrastats_line(line) == want


@pytest.mark.parametrize("fixture, rails", [("tegrastats-orin-nano-jp6.txt", ("VDD_IN",)),
                                            ("tegrastats-orin-8gb-jp5-gpuburn.txt", ("VDD_IN",)),
                                            ("tegrastats-jetson-nano.txt", ("POM_5V_IN",)),
                                            ("tegrastats-agx-orin-64gb.txt", _AGX)])
def test_input_rails_is_the_module_input_or_the_sum_on_agx(fixture: str, rails: tuple) -> None:
    line = (FIXTURES / fixture).read_text().splitlines()[0]
    assert input_rails(parse_tegrastats_line(line)["rails"]) == rails


def test_tegrastats_parser_rejects_a_line_that_is_not_a_sample() -> None:
    with pytest.raises(ValueError, match="not a tegrastats sample"):
        parse_tegrastats_line("NVPM ERROR: Error opening /sys/kernel/nvpmodel_emc_cap/emc_iso_cap: 13")
    with pytest.raises(ValueError, match="run it as root"):
        input_rails({})


@pytest.mark.parametrize("fixture, name, mode_id, n_errors", [("nvpmodel-q-jetson-nano.txt", "5W", 1, 0),
                                                              ("nvpmodel-q-jetson-nano-nonroot.txt", "5W", 1, 2),
                                                              ("nvpmodel-q-agx-thor.txt", "MAXN", 0, 0)])
def test_nvpmodel_parser(fixture: str, name: str, mode_id: int, n_errors: int) -> None:
    got = parse_nvpmodel_q((FIXTURES / fixture).read_text())
    assert (got["mode_name"], got["mode_id"], len(got["errors"])) == (name, mode_id, n_errors)
    assert all(e.startswith("NVPM ERROR: ") for e in got["errors"])


def test_nvpmodel_parser_says_what_to_do_without_a_mode_line() -> None:
    with pytest.raises(ValueError, match="nvpmodel -q"):
        parse_nvpmodel_q("NVPM ERROR: Error opening /sys/kernel/nvpmodel_emc_cap/emc_iso_cap: 13\n")


# Lines in the format quoted in jetson-stats' jtop/core/jetson_clocks.py comments (no captured output at hand).
_CLOCKS_UNLOCKED = """SOC family:tegra210  Machine:NVIDIA Jetson Nano Developer Kit
cpu0: Online=1 Governor=schedutil MinFreq=102000 MaxFreq=1428000 CurrentFreq=1428000 IdleStates: WFI=1 c7=1
GPU MinFreq=76800000 MaxFreq=921600000 CurrentFreq=384000000
EMC MinFreq=204000000 MaxFreq=1600000000 CurrentFreq=1600000000 FreqOverride=0
"""
_CLOCKS_LOCKED = """cpu0: Online=1 Governor=schedutil MinFreq=1428000 MaxFreq=1428000 CurrentFreq=1428000 IdleStates: WFI=0 c7=0
cpu1: Online=0 Governor=schedutil MinFreq=102000 MaxFreq=1428000 CurrentFreq=102000 IdleStates: WFI=0 c7=0
GPU MinFreq=921600000 MaxFreq=921600000 CurrentFreq=921600000
EMC MinFreq=204000000 MaxFreq=1600000000 CurrentFreq=1600000000 FreqOverride=1
"""


def test_jetson_clocks_show_parser() -> None:
    unlocked = parse_jetson_clocks_show(_CLOCKS_UNLOCKED)
    assert unlocked["clocks"]["GPU"] == (76800000, 921600000, 384000000) and unlocked["locked"] is False
    locked = parse_jetson_clocks_show(_CLOCKS_LOCKED)
    assert sorted(locked["clocks"]) == ["EMC", "GPU", "cpu0"] and locked["locked"] is True  # offline cpu1 left out


def _rapl_tree(root: Path, energies: dict[str, int], max_range: int = 262143328850) -> None:
    """Write a powercap tree: package zones plus the decoys a real machine has (sub-zone, mmio view, psys)."""
    zones = {"intel-rapl:0": "package-0", "intel-rapl:1": "package-1", "intel-rapl:0:0": "core",
             "intel-rapl-mmio:0": "package-0", "intel-rapl:2": "psys"}
    for zone, name in zones.items():
        (root / zone).mkdir(parents=True, exist_ok=True)
        (root / zone / "name").write_text(name + "\n")
        (root / zone / "max_energy_range_uj").write_text(f"{max_range}\n")
        (root / zone / "energy_uj").write_text(f"{energies.get(zone, 5_000_000)}\n")


def test_rapl_sums_packages_and_handles_wrap_around(tmp_path: Path) -> None:
    max_range = 262143328850
    _rapl_tree(tmp_path, {"intel-rapl:0": 1_000_000, "intel-rapl:1": max_range - 2_000_000})
    meter = RaplMeter(tmp_path)
    assert meter.name == "rapl:package-0+package-1"
    meter.start()
    # package-0 gains 3 J; package-1 gains 2 J up to the wrap, then 0.5 J; decoys gain 100 J and must not count
    _rapl_tree(tmp_path, {"intel-rapl:0": 4_000_000, "intel-rapl:1": 500_000, "intel-rapl:0:0": 105_000_000,
                          "intel-rapl-mmio:0": 105_000_000, "intel-rapl:2": 105_000_000})
    assert meter.stop() == pytest.approx(5.5)


def test_rapl_unusable_reasons(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="does not exist"):
        RaplMeter(tmp_path / "absent")
    (tmp_path / "intel-rapl:0:0").mkdir()
    with pytest.raises(MeterUnavailable, match="no intel-rapl:N package zone"):
        RaplMeter(tmp_path)
    _rapl_tree(tmp_path, {})
    (tmp_path / "intel-rapl:1" / "energy_uj").unlink()
    (tmp_path / "intel-rapl:1" / "energy_uj").mkdir()  # unreadable, whoever runs the test
    with pytest.raises(MeterUnavailable, match=r"cannot read .*intel-rapl:1/energy_uj"):
        RaplMeter(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_rapl_permission_denied_names_the_fix(tmp_path: Path) -> None:
    _rapl_tree(tmp_path, {})
    (tmp_path / "intel-rapl:0" / "energy_uj").chmod(0o200)
    with pytest.raises(MeterUnavailable, match="root-only since Linux 5.10"):
        RaplMeter(tmp_path)


def test_measure_energy_bills_each_call(tmp_path: Path) -> None:
    _rapl_tree(tmp_path, {"intel-rapl:0": 0, "intel-rapl:1": 0})
    energy = tmp_path / "intel-rapl:0" / "energy_uj"

    def one_millijoule() -> None:  # each call moves the real counter file by 1000 uJ
        energy.write_text(str(int(energy.read_text()) + 1000))

    got = measure_energy(one_millijoule, RaplMeter(tmp_path), min_window_s=0.05)
    assert got["seconds"] >= 0.05 and got["calls"] >= 1
    assert got["joules"] == pytest.approx(got["calls"] / 1000) and got["mj_per_call"] == pytest.approx(1.0)
    assert got["meter"] == "rapl:package-0+package-1"
    with pytest.raises(ValueError, match="min_window_s"):
        measure_energy(one_millijoule, RaplMeter(tmp_path), min_window_s=-1)


@pytest.mark.skipif(Path("/sys/class/powercap").exists() or Path("/proc/driver/nvidia").exists()
                    or shutil.which("tegrastats") is not None, reason="this host has an energy meter")
def test_pick_meter_on_a_host_without_meters_says_why_for_each() -> None:
    meter, reasons = pick_meter()
    assert meter is None and [r.split(":")[0] for r in reasons] == ["rapl", "nvml", "tegrastats"]
    assert "/sys/class/powercap does not exist" in reasons[0]
    assert "nvidia-ml-py" in reasons[1] or "NVML" in reasons[1]
    assert "`tegrastats` is not on PATH" in reasons[2]


def test_pick_meter_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="Available: rapl, nvml, tegrastats"):
        pick_meter(kinds=("rapl", "joulescope"))


def _fake_exe(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
    (bin_dir / name).chmod(0o755)


def _fake_tegrastats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> Path:
    """A `tegrastats` first on PATH that prints `lines` in a loop every --interval ms, as the real one does."""
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    _fake_exe(tmp_path / "bin", "tegrastats", f"""import os, sys, time
from pathlib import Path
Path({str(tmp_path / "argv.txt")!r}).write_text(" ".join(sys.argv[1:]))
Path({str(tmp_path / "pid.txt")!r}).write_text(str(os.getpid()))
lines = Path({str(tmp_path / "lines.txt")!r}).read_text().splitlines()
interval = int(sys.argv[sys.argv.index("--interval") + 1]) / 1000
for i in range(100000):
    print(lines[i % len(lines)], flush=True)
    time.sleep(interval)
""")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_tegrastats_meter_integrates_the_agx_rail_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agx_first = (FIXTURES / "tegrastats-agx-orin-64gb.txt").read_text().splitlines()[0]
    _fake_tegrastats(tmp_path, monkeypatch, [agx_first])
    meter, reasons = pick_meter(kinds=("rapl", "tegrastats"), sysfs_root=tmp_path / "absent",
                                tegrastats_interval_ms=20)
    assert isinstance(meter, TegrastatsMeter) and reasons[0].startswith("rapl: ")
    assert meter.name == "tegrastats:VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0"
    assert (tmp_path / "argv.txt").read_text() == "--interval 20"
    got = measure_energy(lambda: None, meter, min_window_s=0.2)
    assert got["seconds"] >= meter.min_window_s == pytest.approx(0.4)
    assert got["joules"] / got["seconds"] == pytest.approx((2798 + 799 + 3315) / 1000, rel=0.02)


def test_tegrastats_meter_uses_instant_not_running_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # gpu_burn log: VDD_IN instants average 8.9 W over a cycle; the average field never passes 7.0 W
    _fake_tegrastats(tmp_path, monkeypatch, (FIXTURES / "tegrastats-orin-8gb-jp5-gpuburn.txt").read_text().splitlines())
    meter = TegrastatsMeter(interval_ms=20)
    assert meter.name == "tegrastats:VDD_IN"
    got = measure_energy(lambda: None, meter, min_window_s=0.5)
    assert 7.0 < got["joules"] / got["seconds"] < 11.0


def test_tegrastats_child_is_stopped_when_fn_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tegrastats(tmp_path, monkeypatch, (FIXTURES / "tegrastats-jetson-nano.txt").read_text().splitlines())
    meter = TegrastatsMeter(interval_ms=20)

    def boom() -> None:
        raise KeyError("model failed")

    with pytest.raises(KeyError):
        measure_energy(boom, meter, min_window_s=0.0)
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid.txt").read_text()), 0)


def test_tegrastats_without_rails_is_not_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nano_first = (FIXTURES / "tegrastats-jetson-nano.txt").read_text().splitlines()[0]
    _fake_tegrastats(tmp_path, monkeypatch, [nano_first.split(" POM_5V_IN")[0]])  # the line with its rails cut
    meter, reasons = pick_meter(kinds=("tegrastats",), tegrastats_interval_ms=20)
    assert meter is None and reasons == ["tegrastats: tegrastats printed no power rails; "
                                         "run it as root (`sudo`) to expose them"]


def test_query_jetson_state_runs_nvpmodel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (FIXTURES / "nvpmodel-q-jetson-nano-nonroot.txt").read_text()
    _fake_exe(tmp_path / "bin", "nvpmodel", f"import sys\nsys.stdout.write({text!r})\nsys.exit(255)\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # nothing else: jetson_clocks is absent
    state = query_jetson_state()
    assert (state["nvpmodel"]["mode_name"], state["nvpmodel"]["mode_id"]) == ("5W", 1)
    assert state["jetson_clocks"] == {"reason": "`jetson_clocks` is not on PATH (not a Jetson)"}


@pytest.mark.gpu
def test_nvml_meter_on_a_real_gpu() -> None:
    try:
        meter = NvmlMeter(0)
    except MeterUnavailable as err:
        pytest.skip(f"no NVML energy counter here: {err}")
    got = measure_energy(lambda: None, meter, min_window_s=0.0)
    assert meter.name.startswith("nvml:gpu0 ") and got["seconds"] >= 2.0 and got["joules"] > 0
