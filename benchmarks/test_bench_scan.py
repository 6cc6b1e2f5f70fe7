"""pytest-benchmark versions of the scan suite's benchmarks, on a small shape.

    pytest benchmarks/ --benchmark-only

The repository's pytest configuration collects tests/ only, so a plain `pytest` skips these.
Each group holds one direction of linear_scan with its baselines, for side-by-side numbers.
"""
from typing import Callable

import pytest
import torch

from benchmarks.suites import scan

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = scan.Case((2, 512, 256), torch.float32, DEVICE)
BACKENDS = [name for name in scan.BACKENDS[DEVICE.type] if scan.refusal(name, CASE) is None]
INPUTS = scan.make_inputs(CASE)
BENCHES = scan.forward_benches(INPUTS, BACKENDS) + scan.backward_benches(INPUTS, BACKENDS)


def synchronized(run: Callable) -> Callable:
    """`run`, waiting for the GPU to finish before returning, so wall-clock timing is right."""
    if DEVICE.type != "cuda":
        return run

    def call(*args):
        run(*args)
        torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("bench", BENCHES, ids=lambda bench: f"{bench.direction}-{bench.label}")
def test_scan(benchmark, bench: scan.Bench) -> None:
    benchmark.group = f"linear_scan {bench.direction} {CASE.id}"
    if bench.setup is None:
        benchmark(synchronized(bench.run))
    else:
        benchmark.pedantic(synchronized(bench.run), setup=lambda: (bench.setup(), {}), rounds=10, warmup_rounds=1)
