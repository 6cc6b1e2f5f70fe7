"""pytest-benchmark versions of the LSTM, GRU and selective-scan suites, on small shapes.

    pytest benchmarks/ --benchmark-only

Not collected by the repository's default test run (it collects tests/ only). Each group
holds one op and direction: the baseline (torch.nn, or the PyTorch loop), every backend and,
where installed, ONNX Runtime. The tests of the ORT peer's output check are plain tests (run
without --benchmark-only).
"""
import functools

import pytest
import torch

from benchmarks import report
from benchmarks.suites import ort_peer, recurrent, selective
from benchmarks.test_bench_scan import DEVICE, synchronized
from benchmarks.timing import keyword_call

RECURRENT_CASES = [recurrent.Case("fwd", 4, 64, 128, torch.float32, DEVICE),
                   recurrent.Case("fwd+bwd", 4, 64, 128, torch.float32, DEVICE),
                   recurrent.Case("step", 1, 1, 128, torch.float32, DEVICE)]


@pytest.mark.parametrize("backend", ["torch.nn", *report.KERNEL_BACKENDS[DEVICE.type], "onnxruntime"])
@pytest.mark.parametrize("case", RECURRENT_CASES, ids=lambda case: case.direction)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent(benchmark, kind, case, backend):
    module = recurrent.torch_module(kind, case)
    if backend == "onnxruntime":
        module = _onnxruntime_peer(kind, module, case)
    elif backend != "torch.nn":
        reason = recurrent.refusal(kind, backend, case)
        if reason is not None:
            pytest.skip(reason)
        module = recurrent.rnnkern_module(kind, module, backend)
    benchmark.group = f"{kind} {case.direction} B{case.batch}-T{case.steps}-H{case.hidden}"
    benchmark(synchronized(recurrent.timed_call(kind, module, case)))


def _onnxruntime_peer(kind, reference, case):
    if DEVICE.type != "cpu" or case.direction == "fwd+bwd":
        pytest.skip("the ONNX Runtime peer runs forward and step on a CPU only (ORT has no backward)")
    if ort_peer.unavailable() is not None:
        pytest.skip(ort_peer.unavailable())
    peer = recurrent.onnxruntime_peer(kind, reference, case)
    assert isinstance(peer, ort_peer.OnnxRuntimePeer), peer  # a string: its outputs differ
    return peer


TINY_CASES = [recurrent.Case("fwd", 2, 5, 8, torch.float32, torch.device("cpu")),
              recurrent.Case("step", 1, 1, 8, torch.float32, torch.device("cpu"))]


@pytest.mark.skipif(ort_peer.unavailable() is not None, reason=str(ort_peer.unavailable()))
@pytest.mark.parametrize("case", TINY_CASES, ids=lambda case: case.direction)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_onnxruntime_peer_matches_torch_and_rejects_a_wrong_model(monkeypatch, kind, case):
    reference = recurrent.torch_module(kind, case)
    peer = recurrent.onnxruntime_peer(kind, reference, case)
    assert isinstance(peer, ort_peer.OnnxRuntimePeer), peer
    assert len(recurrent.timed_call(kind, peer, case)()) == (3 if kind == "lstm" else 2)

    other = recurrent.torch_module(kind, case)
    with torch.no_grad():
        other.weight_hh_l0.add_(0.1)  # a model of other weights, exported in the reference's place
    export = ort_peer.export
    monkeypatch.setattr(ort_peer, "export", lambda module, x, state: export(other, x, state))
    reason = recurrent.onnxruntime_peer(kind, reference, case)
    assert isinstance(reason, str) and reason.startswith("onnxruntime's ") and "differs from torch.nn's" in reason


@pytest.mark.skipif(ort_peer.unavailable() is not None, reason=str(ort_peer.unavailable()))
def test_onnxruntime_peer_checks_the_state_inputs():
    """A model exported without state inputs cannot pass for a step's."""
    case = TINY_CASES[1]
    reference = recurrent.torch_module("gru", case)
    x, h = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    peer = ort_peer.OnnxRuntimePeer(ort_peer.export(reference, x, None))
    with pytest.raises(ValueError, match="the model takes"):
        peer.check(reference, x, h)



def test_without_onnxruntime_the_peer_is_a_skip_reason(monkeypatch):
    monkeypatch.setattr(ort_peer.importlib.util, "find_spec", lambda name: None)
    reason = recurrent.onnxruntime_peer("lstm", recurrent.torch_module("lstm", TINY_CASES[0]), TINY_CASES[0])
    assert reason == "onnxruntime is not installed (it is in the bench extra)"


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
