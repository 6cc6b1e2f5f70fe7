"""pytest-benchmark versions of the LSTM, GRU and selective-scan suites, on small shapes.

    pytest benchmarks/ --benchmark-only

Not collected by the repository's default test run (it collects tests/ only). Each group
holds one op and direction: the baseline (torch.nn, or the PyTorch loop) and every backend.
"""
import functools

import pytest
import torch

from benchmarks import report
from benchmarks.suites import recurrent, selective
from benchmarks.test_bench_scan import DEVICE, synchronized
from benchmarks.timing import keyword_call

RECURRENT_CASES = [recurrent.Case("fwd", 4, 64, 128, torch.float32, DEVICE),
                   recurrent.Case("fwd+bwd", 4, 64, 128, torch.float32, DEVICE),
                   recurrent.Case("step", 1, 1, 128, torch.float32, DEVICE)]


@pytest.mark.parametrize("backend", ["torch.nn", *report.KERNEL_BACKENDS[DEVICE.type]])
@pytest.mark.parametrize("case", RECURRENT_CASES, ids=lambda case: case.direction)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent(benchmark, kind, case, backend):
    module = recurrent.torch_module(kind, case)
    if backend != "torch.nn":
        reason = recurrent.refusal(kind, backend, case)
        if reason is not None:
            pytest.skip(reason)
        module = recurrent.rnnkern_module(kind, module, backend)
    benchmark.group = f"{kind} {case.direction} B{case.batch}-T{case.steps}-H{case.hidden}"
    benchmark(synchronized(recurrent.timed_call(kind, module, case)))


SELECTIVE_CASE = selective.Case("fwd", (1, 64, 512, 16), torch.float32, DEVICE)
SELECTIVE_INPUTS = selective.make_inputs(SELECTIVE_CASE)


@pytest.mark.parametrize("backend", ["torch_loop", *report.KERNEL_BACKENDS[DEVICE.type]])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_selective(benchmark, direction, backend):
    if backend == "torch_loop":
        scan = selective.torch_loop
    else:
        reason = selective.refusal(backend, SELECTIVE_CASE)
        if reason is not None:
            pytest.skip(reason)
        scan = functools.partial(selective.rnnkern_scan, backend)
    benchmark.group = f"selective_scan {direction} {'x'.join(map(str, SELECTIVE_CASE.shape))}"
    benchmark(synchronized(keyword_call(scan, SELECTIVE_INPUTS, direction)))
