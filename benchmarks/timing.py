"""Timing: warm up, then time each repeat alone and report the median (plus min and quartiles).

Arguments are built outside the timer: either captured once by the timed callable, or built
fresh before each repeat by a `setup` callable. On CUDA each repeat is bracketed by CUDA
events after a synchronize; on CPU it is timed with time.perf_counter.

Callables that are compared with each other (a kernel and its baseline) are measured
together, taking turns of about TURN_MS each: every round gives each of them a turn, in an
order rotated by one per round. A burst of load from elsewhere on a shared machine then
lands on all of them alike instead of on whichever happened to be running (the reason
behind Google Benchmark's random interleaving of repetitions); timed one whole series after
the other, the same two LSTMs gave ratios from 0.8 to 1.5 on a 2-core VM.

On CPU, how long an op that allocates a large output takes depends on the C allocator's
state: memory another op freed may be reused with its pages already mapped, or the output
may come fresh from the OS and fault in every 4 KiB page. So the callables are warmed up
and timed starting from a heap whose freed memory went back to the OS (glibc's
malloc_trim, where present): they run in the steady state that calling them over and over
reaches, not in whatever state the previous benchmark left.
"""
import ctypes
import functools
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

# Builds the timed callable's arguments before each repeat, outside the timer.
Setup = Optional[Callable[[], tuple]]

_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None

# A turn of measure_together: consecutive calls of one callable lasting about this long.
TURN_MS = 10.0

METHOD = {
    "cpu": f"time.perf_counter around each call; compared callables take turns of ~{TURN_MS:g} ms of calls "
           "(rotated order per round); malloc_trim before the warmup",
    "cuda": "CUDA events around each call, after torch.cuda.synchronize(); compared callables take turns "
            f"of ~{TURN_MS:g} ms of calls (rotated order per round)",
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
    """Times run(*setup()) settings.repeats times in a row, after settings.warmup untimed calls:
    for a callable compared with nothing in the same run, or one that must be called exactly
    warmup + repeats times (a decoder whose cache grows by one token per call)."""
    if settings.device.type == "cpu":
        release_freed_memory()
    for _ in range(settings.warmup):
        run(*arguments(setup))
    return Timing.of([_time_once(run, arguments(setup), settings.device) for _ in range(settings.repeats)])


def measure_together(runs: Sequence[Callable], settings: Settings,
                     setups: Optional[Sequence[Setup]] = None) -> list[Timing]:
    """One Timing per callable of `runs`, each called with its setup's arguments.

    Each callable is warmed up settings.warmup times. Then in each of settings.repeats rounds
    every callable takes a turn, round r starting from callable r mod len(runs). A turn is
    the consecutive calls that fill about TURN_MS (at least one), each timed alone: a call of
    a tenth of a millisecond is timed after calls of its own, with its weights in cache, not
    right after another callable's.
    """
    setups = [None] * len(runs) if setups is None else list(setups)
    if len(setups) != len(runs):
        raise ValueError(f"got {len(runs)} callables but {len(setups)} setups")
    if settings.device.type == "cpu":
        release_freed_memory()
    calls_per_turn = [_calls_per_turn(run, setup, settings) for run, setup in zip(runs, setups)]
    samples_ms: list[list[float]] = [[] for _ in runs]
    for round_index in range(settings.repeats):
        for offset in range(len(runs)):
            i = (round_index + offset) % len(runs)
            samples_ms[i] += [_time_once(runs[i], arguments(setups[i]), settings.device)
                              for _ in range(calls_per_turn[i])]
    return [Timing.of(samples) for samples in samples_ms]


def _calls_per_turn(run: Callable, setup: Setup, settings: Settings) -> int:
    """Warms `run` up, then counts how many of its calls fill a turn of TURN_MS (at least one).
    (Counted, not inferred from one warmup call: with --quick's single warmup that call is the
    first, which builds caches, and a 50 us step took 20 times longer; its turns came out a
    tenth of the intended length, so the cold calls after a switch weighed on the median.)"""
    for _ in range(settings.warmup):
        _time_once(run, arguments(setup), settings.device)
    calls, spent_ms = 0, 0.0
    while calls == 0 or spent_ms < TURN_MS:
        spent_ms += _time_once(run, arguments(setup), settings.device)
        calls += 1
    return calls


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


def keyword_call(fn: Callable, inputs: dict, direction: str) -> Callable[[], Any]:
    """The call a suite times: ``fn(**inputs)`` under torch.no_grad ("fwd"), or with every input
    a leaf requiring grad, then ``.backward(inputs["grad"])`` ("fwd+bwd"); "grad" is not passed."""
    tensors = {k: v for k, v in inputs.items() if k != "grad"}
    if direction == "fwd":
        return functools.partial(_no_grad, fn, tensors)
    leaves = {k: v.detach().requires_grad_() for k, v in tensors.items()}
    return functools.partial(_forward_backward, fn, leaves, inputs["grad"])


def _no_grad(fn: Callable, tensors: dict):
    with torch.no_grad():
        return fn(**tensors)


def _forward_backward(fn: Callable, leaves: dict, grad: torch.Tensor) -> None:
    fn(**leaves).backward(grad)
