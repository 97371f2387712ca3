"""What every benchmark here reports a comparison with: interleaved rounds, the median and the spread.

A ratio between two systems is taken within each round, from runs made next to each other in time,
and reported as the median over the rounds with its minimum and maximum and the number of rounds.
Never the best run of each side: on a shared machine the best of A and the best of B come from
different moments, and their ratio measures the noise as much as the systems.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    """The median of some per-round values, their range and how many rounds there were."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of `values` (one per round); NaN throughout when there are none."""
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, fmt: str = ".2f", unit: str = "", what: str = "round") -> str:
        """`4.04× (3.72–4.30, 3 rounds)`, with the median in bold (`what`: what the values are one per)."""
        return (f"**{self.median:{fmt}}{unit}** ({self.low:{fmt}}–{self.high:{fmt}}, {self.rounds} "
                f"{what}{'s' if self.rounds != 1 else ''})")


def ratios(a: Sequence[float], b: Sequence[float]) -> Spread:
    """The spread of the per-round ratios a[i] / b[i] (rounds where b is 0 are left out)."""
    return Spread.of([x / y for x, y in zip(a, b, strict=True) if y])


def round_order(items: Sequence[T], round_index: int) -> list[T]:
    """`items` forwards in even rounds and backwards in odd ones, so that no side always runs first."""
    return list(items) if round_index % 2 == 0 else list(items)[::-1]


def cpu_model() -> str:
    """The CPU's model name (`lscpu`'s "Model name"), or the architecture where the kernel does not say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (how busy the machine is: other work slows the two sides unequally)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ------------------------------------------------------------------ memory of a worker process (Linux /proc)
def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), None where there is no /proc."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def peak_kib() -> int:
    """The process's peak resident set in KiB."""
    hwm = status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_peak() -> bool:
    """Reset the process's peak resident set to its current one (Linux ≥ 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

