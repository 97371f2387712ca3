"""Device and precision selection, and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from haina.core.errors import HainaError

Precision = Literal["fp32", "bf16", "fp16"]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HainaError(f"device '{name}' requested but CUDA is not available; use --train.device=cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise HainaError(f"device '{name}' requested but MPS is not available; use --train.device=cpu or auto")
    return dev


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Autocast context for mixed precision; fp32 means no autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise HainaError("fp16 mixed precision needs CUDA (it relies on a grad scaler); use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, precision: Precision = "bf16") -> float:
    """Peak FLOP/s of `device` for MFU: a table for known GPUs; on CPU the theoretical fp32 vector peak.

    The CPU peak (`cpu_peak`) is the fp32 FMA peak whatever the precision: bf16 dot-product
    instructions (avx512_bf16, AMX) can go beyond it, so a bf16 MFU on such CPUs reads high. Where
    the peak cannot be worked out (not Linux on x86), a measured fp32 matmul stands in for it.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
        for key, flops in table.items():
            if key in name:
                return flops if precision != "fp32" else flops / 2
        return 100e12
    if device.type == "cpu" and (peak := cpu_peak()) is not None:
        return peak.flops
    return measured_matmul_flops(device)


@dataclass(frozen=True)
class CpuPeak:
    """The theoretical fp32 peak of the CPU cores torch computes on, with every input it comes from."""

    model: str
    cores: int
    isa: str  # the widest fp32 FMA instruction set the flags show
    lanes: int  # fp32 lanes per FMA instruction, as the core executes it
    fma_units: int  # FMA instructions the core can start per cycle
    ghz: float
    clock_source: str
    assumption: str  # why `fma_units` (and `lanes`) are what they are

    @property
    def flops(self) -> float:
        """cores × lanes × FMA units × 2 (an FMA is a multiply and an add) × clock."""
        return self.cores * self.lanes * self.fma_units * 2 * self.ghz * 1e9

    def describe(self) -> str:
        """One line with the formula, its inputs and where each came from."""
        return (f"{self.model}: {self.cores} core{'s' if self.cores != 1 else ''} × {self.lanes} fp32 lanes ({self.isa}) × {self.fma_units} FMA "
                f"units × 2 FLOPs × {self.ghz:.3f} GHz ({self.clock_source}) = {self.flops / 1e9:,.0f} GFLOP/s; "
                f"{self.assumption}")


def _field(cpuinfo: str, name: str) -> str | None:
    m = re.search(rf"^{name}\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return m.group(1).strip() if m else None


def parse_cpu_peak(cpuinfo: str, logical_cpus: int, max_mhz: float | None = None,
                   threads: int | None = None) -> CpuPeak | None:
    """The fp32 peak from the text of /proc/cpuinfo (x86); None when it does not say enough.

    Args:
        cpuinfo: the text of /proc/cpuinfo.
        logical_cpus: the logical CPUs this process may run on.
        max_mhz: the maximum clock, where the kernel publishes it (cpufreq); else /proc/cpuinfo's clock.
        threads: the compute threads (torch's intra-op pool); the peak counts no more cores than that.
    """
    flags = set((_field(cpuinfo, "flags") or "").split())
    if not flags:
        return None  # not x86 (ARM lists "Features", whose vector width SVE does not fix): no model of the core
    model = _field(cpuinfo, "model name") or "unknown CPU"
    vendor, family = _field(cpuinfo, "vendor_id") or "", int(_field(cpuinfo, "cpu family") or 0)
    # Two FMA pipes per core: every Intel core since Haswell (2013) and AMD's since Zen 2 (2019). Known
    # exceptions make this an upper bound (MFU against it a lower bound): AVX-512 Xeon Bronze, Silver and some
    # Gold 5xxx have one 512-bit FMA unit, and flags cannot tell them apart.
    units = 2
    why = "2 FMA units per core assumed: two FMA pipes, as on every Intel core since Haswell and AMD's since Zen 2"
    if "avx512f" in flags and vendor == "AuthenticAMD" and family == 0x19:
        lanes, isa = 8, "avx512f on 256-bit pipes"
        why += "; Zen 4 (AMD family 19h) runs a 512-bit FMA as two 256-bit halves, so 8 lanes per unit"
    elif "avx512f" in flags:
        lanes, isa = 16, "avx512f"
        why += (" (an upper bound for AVX-512 Xeons with one 512-bit FMA unit: Bronze, Silver, some Gold 5xxx; and"
                " for Zen 5 laptop parts, which split 512-bit FMAs over 256-bit pipes)")
    elif {"avx2", "fma"} <= flags:
        lanes, isa = 8, "avx2+fma"
    elif "avx" in flags:
        lanes, isa, units = 8, "avx, no FMA", 1
        why = "no FMA: one multiply and one add port per core, counted as one FMA unit"
    else:
        lanes, isa, units = 4, "sse, no FMA", 1
        why = "no FMA: one multiply and one add port per core, counted as one FMA unit"
    if max_mhz:
        mhz, source = max_mhz, "cpufreq maximum"
    elif _field(cpuinfo, "cpu MHz") is not None:
        mhz = max(float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE))
        source = "/proc/cpuinfo 'cpu MHz'; in a VM the nominal clock, boost not visible"
    elif m := re.search(r"@\s*([\d.]+)\s*GHz", model):
        mhz, source = float(m.group(1)) * 1000, "the model name's rated clock"
    else:
        return None
    # SMT siblings share one core's FMA units: count physical cores.
    siblings, per_socket = _field(cpuinfo, "siblings"), _field(cpuinfo, "cpu cores")
    smt = max(1, int(siblings) // int(per_socket)) if siblings and per_socket and int(per_socket) else 1
    cores = max(1, logical_cpus // smt)
    if threads:
        cores = min(cores, threads)
    return CpuPeak(model, cores, isa, lanes, units, mhz / 1000, source, why)


def cpu_peak(threads: int | None = None) -> CpuPeak | None:
    """This machine's theoretical fp32 peak over the cores torch uses (`threads`: default torch's pool)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    try:
        max_mhz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        max_mhz = None
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return parse_cpu_peak(cpuinfo, logical, max_mhz, threads or torch.get_num_threads())


_MEASURED: dict[str, float] = {}


def measured_matmul_flops(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """Best observed FLOP/s of an fp32 n×n matmul: the honest CPU "peak" for MFU."""
    import time

    key = str(device)
    if key in _MEASURED:
        return _MEASURED[key]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the user's RNG alone
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    _MEASURED[key] = 2 * n**3 / best
    return _MEASURED[key]


DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' element type for inference (`--dtype`): float16 only where the device has fast kernels for it.

    On CPU, float16 matmuls fall back to slow reference kernels and overflow more easily than bfloat16, which
    has the same size; the error says to use bfloat16.
    """
    if name not in DTYPES:
        raise HainaError(f"--dtype {name} is not one of {', '.join(DTYPES)}")
    if name == "float16" and device.type not in ("cuda", "mps"):
        raise HainaError(f"--dtype float16 needs a CUDA or MPS device (this is {device.type}); use bfloat16 or "
                         "float32")
    return DTYPES[name]


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """The SDPA kernel `train.attention` names, for a step's forward passes (autograd runs the matching backward)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])
