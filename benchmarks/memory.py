"""Peak memory one call allocates, above what was allocated when it started.

CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the process's
RSS is too coarse (freed pages are reused or returned lazily), so the call runs once under
torch.profiler with profile_memory=True, and the peak of the running sum of the allocations
and frees inside the call is taken. That counts every tensor allocated through torch's CPU
allocator during the call (outputs and temporaries, also those inside C++ kernels) and
nothing else. The arguments are built under the profiler too, so that frees of tensors
they allocated are seen.
"""
import itertools
from typing import Callable, Iterator

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.timing import Setup, arguments

METHOD = {
    "cpu": "torch.profiler(profile_memory=True): peak running sum of CPU allocations minus frees during the call",
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before",
}

_CALL = "benchmarks.memory.call"


def peak_bytes(run: Callable, device: torch.device, setup: Setup = None) -> int:
    """Peak bytes allocated by one untimed call of run(*setup())."""
    if device.type == "cuda":
        return _cuda_peak(run, arguments(setup), device)
    return _cpu_peak(run, setup)


def _cuda_peak(run: Callable, args: tuple, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _cpu_peak(run: Callable, setup: Setup) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        args = arguments(setup)
        with record_function(_CALL):
            run(*args)
    events = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    call = next(event for event in events if event.name == _CALL)
    changes = sorted(
        (event.start_time_ns, event.extra_fields.alloc_size)
        for event in events
        if event.tag == _EventType.Allocation and call.start_time_ns <= event.start_time_ns <= call.end_time_ns
    )
    return max(itertools.accumulate((size for _, size in changes), initial=0))


def _walk(roots) -> Iterator:
    """Every profiler event, parents before children."""
    pending = list(roots)
    while pending:
        event = pending.pop()
        yield event
        pending.extend(event.children)
