"""Timing: warm up, then time each repeat alone and report the median (plus min and quartiles).

Arguments are built outside the timer: either captured once by the timed callable, or built
fresh before each repeat by a `setup` callable. On CUDA each repeat is bracketed by CUDA
events after a synchronize; on CPU it is timed with time.perf_counter.

On CPU, how long an op that allocates a large output takes depends on the C allocator's
state: memory another op freed may be reused with its pages already mapped, or the output
may come fresh from the OS and fault in every 4 KiB page. So each callable is warmed up
and timed in consecutive calls, starting from a heap whose freed memory went back to the
OS (glibc's malloc_trim, where present): it runs in the steady state it would reach when
called over and over, not in whatever state the previous benchmark left.
"""
import ctypes
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# Builds the timed callable's arguments before each repeat, outside the timer.
Setup = Optional[Callable[[], tuple]]

_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None

METHOD = {
    "cpu": "time.perf_counter around each call; malloc_trim before each callable's warmup",
    "cuda": "CUDA events around each call, after torch.cuda.synchronize()",
}


@dataclass(frozen=True)
class Settings:
    """Where and how often a benchmark run measures."""

    device: torch.device
    quick: bool
    warmup: int
    repeats: int

    @classmethod
    def create(cls, device: torch.device, quick: bool) -> "Settings":
        return cls(device, quick, warmup=1 if quick else 3, repeats=10 if quick else 25)


@dataclass(frozen=True)
class Timing:
    """Summary of the per-repeat times, in milliseconds."""

    median_ms: float
    min_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Timing":
        q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
        return cls(median, min(samples_ms), q1, q3, len(samples_ms))

    def as_record(self) -> dict[str, Any]:
        return {
            "ms_median": self.median_ms,
            "ms_min": self.min_ms,
            "ms_q1": self.q1_ms,
            "ms_q3": self.q3_ms,
            "repeats": self.repeats,
        }


def arguments(setup: Setup) -> tuple:
    return setup() if setup is not None else ()


def measure(run: Callable, settings: Settings, setup: Setup = None) -> Timing:
    """Times run(*setup()) settings.repeats times in a row, after settings.warmup untimed calls."""
    if settings.device.type == "cpu":
        release_freed_memory()
    for _ in range(settings.warmup):
        run(*arguments(setup))
    return Timing.of([_time_once(run, arguments(setup), settings.device) for _ in range(settings.repeats)])


def release_freed_memory() -> None:
    """Hands the C heap's freed memory back to the OS (glibc only; elsewhere does nothing)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _time_once(run: Callable, args: tuple, device: torch.device) -> float:
    if device.type == "cuda":
        return _cuda_ms(run, args)
    start = time.perf_counter()
    run(*args)
    return (time.perf_counter() - start) * 1e3


def _cuda_ms(run: Callable, args: tuple) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    run(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
