"""The CPU's theoretical fp32 peak (the MFU denominator on CPU): worked out from /proc/cpuinfo, inputs shown."""

import pytest
import torch

from haina.core.device import cpu_peak, parse_cpu_peak, peak_flops


def cpuinfo(flags: str, *, vendor: str = "GenuineIntel", family: int = 6, mhz: float | None = 2000.0,
            model: str = "Test CPU", siblings: int = 4, cores: int = 4, processors: int = 1) -> str:
    """/proc/cpuinfo text with `processors` identical entries."""
    entry = [f"vendor_id\t: {vendor}", f"cpu family\t: {family}", f"model name\t: {model}"]
    if mhz is not None:
        entry.append(f"cpu MHz\t\t: {mhz}")
    entry += [f"siblings\t: {siblings}", f"cpu cores\t: {cores}", f"flags\t\t: fpu sse sse2 {flags}"]
    return "\n\n".join("\n".join([f"processor\t: {i}", *entry]) for i in range(processors)) + "\n"


def test_avx512_core_counts_16_lanes_and_two_fma_units():
    p = parse_cpu_peak(cpuinfo("avx avx2 fma avx512f"), logical_cpus=4, threads=4)
    assert (p.cores, p.lanes, p.fma_units, p.ghz) == (4, 16, 2, 2.0)
    assert p.flops == pytest.approx(4 * 16 * 2 * 2 * 2.0e9)
    text = p.describe()
    for part in ("4 cores", "16 fp32 lanes (avx512f)", "2 FMA units", "2.000 GHz", "/proc/cpuinfo", "512 GFLOP/s"):
        assert part in text
    assert "upper bound" in p.assumption  # Xeon Silver/Bronze have one 512-bit unit: the report says so


def test_avx2_fma_and_older_isas():
    assert parse_cpu_peak(cpuinfo("avx avx2 fma"), 4).lanes == 8
    no_fma = parse_cpu_peak(cpuinfo("avx"), 4)
    assert (no_fma.lanes, no_fma.fma_units) == (8, 1) and "no FMA" in no_fma.isa
    assert parse_cpu_peak(cpuinfo(""), 4).lanes == 4


def test_zen4_runs_512_bit_fmas_on_256_bit_pipes():
    p = parse_cpu_peak(cpuinfo("avx2 fma avx512f", vendor="AuthenticAMD", family=0x19), 4)
    assert (p.lanes, p.fma_units) == (8, 2) and "Zen 4" in p.assumption
    zen5 = parse_cpu_peak(cpuinfo("avx2 fma avx512f", vendor="AuthenticAMD", family=0x1A), 4)
    assert zen5.lanes == 16


def test_smt_siblings_share_a_core_and_threads_cap_the_cores():
    smt = cpuinfo("avx2 fma", siblings=8, cores=4)
    assert parse_cpu_peak(smt, logical_cpus=8).cores == 4
    assert parse_cpu_peak(smt, logical_cpus=8, threads=2).cores == 2
    assert parse_cpu_peak(smt, logical_cpus=2).cores == 1  # a process pinned to two hyperthreads of one core


def test_clock_sources_in_order_of_preference():
    text = cpuinfo("avx2 fma", mhz=2100.5, model="Xeon @ 3.00GHz", processors=2)
    assert parse_cpu_peak(text, 2, max_mhz=3500.0).ghz == 3.5  # cpufreq's maximum first
    p = parse_cpu_peak(text, 2)
    assert p.ghz == pytest.approx(2.1005) and "cpu MHz" in p.clock_source
    rated = parse_cpu_peak(cpuinfo("avx2 fma", mhz=None, model="Xeon @ 3.00GHz"), 2)
    assert rated.ghz == 3.0 and "model name" in rated.clock_source
    assert parse_cpu_peak(cpuinfo("avx2 fma", mhz=None, model="Some CPU"), 2) is None


def test_non_x86_gives_no_theoretical_peak():
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm sve\nCPU implementer\t: 0x41\n"
    assert parse_cpu_peak(arm, 4) is None


def test_peak_flops_on_cpu_is_the_theoretical_peak_where_known():
    peak = peak_flops(torch.device("cpu"), "fp32")
    assert peak > 0
    theory = cpu_peak()
    if theory is not None:
        assert peak == theory.flops
        assert theory.cores <= torch.get_num_threads()
