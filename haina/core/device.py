"""Device and precision selection."""

from __future__ import annotations

import contextlib
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
    """Peak FLOP/s of `device` for MFU: a table for known GPUs, a measured matmul peak on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
        for key, flops in table.items():
            if key in name:
                return flops if precision != "fp32" else flops / 2
        return 100e12
    return measured_matmul_flops(device)


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
