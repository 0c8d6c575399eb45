"""Wall-clock timing and peak memory that are honest on both CPU and CUDA.

CUDA work is asynchronous, so every measurement synchronises the device before reading the clock (CUDA
events would measure the same interval; a synchronise keeps one code path for both devices).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Timing:
    """Median and spread of repeated runs, in seconds."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s, "repeats": self.repeats}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    run: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Time ``run()`` ``repeats`` times after ``warmup`` untimed calls; ``setup()`` runs untimed before each call."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    samples = []
    for index in range(warmup + repeats):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if index >= warmup:
            samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def peak_memory_bytes(run: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory of one call: CUDA allocator peak, or on Linux CPU the resident-set high-water mark growth.

    The CPU figure resets the kernel's high-water mark (``/proc/self/clear_refs``) first, so it is the peak RSS
    of this call above the RSS before it; None where neither is available.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _reset_rss_peak():
        run()
        return None
    before = _rss_kib("VmRSS")
    run()
    return (_rss_kib("VmHWM") - before) * 1024


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _rss_kib("VmHWM") is not None


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
