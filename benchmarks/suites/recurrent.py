"""LSTM and GRU suites: rnnkern.nn modules against torch.nn in the same process.

torch.nn runs cuDNN on a GPU and its native/oneDNN kernels on a CPU; both sides hold the
same weights (rnnkern loads torch's state_dict). What each direction times:
  fwd      ``module(x)`` under torch.no_grad (batch_first, whole sequence)
  fwd+bwd  ``module(x)`` then ``y.backward(grad)``, x and the parameters requiring grad
  step     one token: ``module(x_t, state)`` with x_t (B, 1, I) and the carried state,
           under torch.no_grad: the decoding / streaming call

Peer, on a GPU when installed: FlashRNN's fused kernel (``flashrnn.flashrnn.flashrnn``),
forward only, timed with the input projection (one F.linear) as the modules are. It gets
torch.nn's weights reshaped to its (gates, heads, D, D) layout without reordering gates, so
its outputs are not compared: the record is a timing of the same sizes, nothing more.

Peer, on a CPU when installed: ONNX Runtime running torch.nn's module exported to ONNX, on the
forward and the step (it has no backward); outputs checked against torch.nn's at creation,
spinning disabled (ort_peer.py says how and why). The "vs ORT" column is its median / each
contender's median.
"""
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import rnnkern
import rnnkern.nn
from benchmarks import memory, report
from benchmarks.report import progress, speedup_columns
from benchmarks.suites import ort_peer
from benchmarks.timing import Settings, measure_together

SECTION = "kernels"
COLUMNS = [*speedup_columns("vs torch.nn", "speedup_vs_torch", ("vs ORT", "speedup_vs_ort")),
           ("KiB/token", lambda r: f"{r['bytes_per_token'] / 2**10:.0f}" if "bytes_per_token" in r else "-"),
           ("GB/s", lambda r: f"{r['bytes_per_token'] / r['ms_median'] / 1e6:.1f}" if "bytes_per_token" in r else "-")]
LEGEND = ("vs torch.nn, vs ORT: torch.nn's, ONNX Runtime's median / this median (above 1: rnnkern is faster);\n"
          "onnxruntime's peak MiB is not measured (it allocates outside torch's allocator); KiB/token (steps):\n"
          "the weights a token reads once plus the state read and written; GB/s: those bytes over the median")


@dataclass(frozen=True)
class Case:
    direction: str  # "fwd", "fwd+bwd" or "step"
    batch: int
    steps: int
    hidden: int  # input size = hidden size
    dtype: torch.dtype
    device: torch.device

    @property
    def shape(self) -> list[int]:
        return [self.batch, self.steps, self.hidden, self.hidden]


def cases(device: torch.device, quick: bool) -> list[Case]:
    """The issue's reference points: I = H = 256 on CPU, H = 768 bf16 on GPU, and one-token steps."""
    if device.type == "cpu":
        sequences = [(16, 256, 256, torch.float32)]
        steps = [(1, 256, torch.float32)] + ([] if quick else [(1, 512, torch.float32)])
    else:
        sequences = [(16, 1024, 768, torch.bfloat16)] + ([] if quick else [(16, 1024, 768, torch.float32)])
        steps = [(1, 768, torch.bfloat16), (64, 768, torch.bfloat16)]
    return ([Case(d, b, t, h, dt, device) for b, t, h, dt in sequences for d in ("fwd", "fwd+bwd")]
            + [Case("step", b, 1, h, dt, device) for b, h, dt in steps])


def run_suite(kind: str, settings: Settings) -> list[dict[str, Any]]:
    records = []
    for case in cases(settings.device, settings.quick):
        baseline = torch_module(kind, case)
        contenders, skipped = {"torch.nn": baseline}, []
        for backend in report.KERNEL_BACKENDS[case.device.type]:
            reason = refusal(kind, backend, case)
            if reason is not None:
                skipped.append({**_identity(kind, backend, case), "skipped": reason})
            else:
                contenders[backend] = rnnkern_module(kind, baseline, backend)
        peer = FlashRNNPeer.create(kind, baseline, case)
        if isinstance(peer, str):
            skipped.append({**_identity(kind, "flashrnn", case), "skipped": peer})
        elif peer is not None:
            contenders["flashrnn"] = peer
        peer = onnxruntime_peer(kind, baseline, case)
        if isinstance(peer, str):
            skipped.append({**_identity(kind, "onnxruntime", case), "skipped": peer})
        elif peer is not None:
            contenders["onnxruntime"] = peer
        records += _measure(kind, contenders, case, settings) + skipped
    return records


class FlashRNNPeer(torch.nn.Module):
    """FlashRNN's fused LSTM/GRU with the sizes (and weights, not remapped) of `reference`."""

    def __init__(self, kind: str, reference: torch.nn.Module, flashrnn: Callable) -> None:
        super().__init__()
        self.kind, self.reference, self.flashrnn = kind, reference, flashrnn

    @classmethod
    def create(cls, kind: str, reference: torch.nn.Module, case: Case):
        """The peer; None where it does not apply (no GPU, not installed, not a forward);
        a string saying why when it is installed but fails on a small probe input."""
        if case.device.type != "cuda" or case.direction != "fwd":
            return None
        try:
            from flashrnn.flashrnn import flashrnn
        except ImportError:
            return None
        peer = cls(kind, reference, flashrnn)
        try:
            with torch.no_grad():
                peer(torch.zeros((1, 2, reference.input_size), dtype=case.dtype, device=case.device))
        except (RuntimeError, TypeError, ValueError) as err:
            return f"flashrnn refused a probe input: {type(err).__name__}: {err}"
        return peer

    def forward(self, x: torch.Tensor, state=None):
        """x (B, T, I) -> FlashRNN's outputs; `state` is ignored (zeros)."""
        gates, hidden = GATES[self.kind], self.reference.hidden_size
        batch, steps, _ = x.shape
        wx = torch.nn.functional.linear(x, self.reference.weight_ih_l0, self.reference.bias_ih_l0)
        return self.flashrnn(
            Wx=wx.view(batch, steps, gates, 1, hidden),  # (B, T, gates, heads, D)
            R=self.reference.weight_hh_l0.view(gates, 1, hidden, hidden),
            b=self.reference.bias_hh_l0.view(gates, 1, hidden),
            function=self.kind, backend="cuda_fused", dtype=str(x.dtype).removeprefix("torch."),
        )


def onnxruntime_peer(kind: str, reference: torch.nn.Module, case: Case):
    """ORT running `reference` exported; None where it does not apply (not on a CPU, or forward +
    backward: ORT has no backward); a string saying why where onnxruntime is not installed or its
    outputs differ from torch.nn's."""
    if case.device.type != "cpu" or case.direction == "fwd+bwd":
        return None
    gen = torch.Generator(device=case.device).manual_seed(2)
    options = {"generator": gen, "dtype": case.dtype, "device": case.device}
    x = torch.randn((case.batch, case.steps, case.hidden), **options)
    state = None
    if case.direction == "step":  # random, not zeros, so a miswired state input shows
        h, c = (torch.randn((1, case.batch, case.hidden), **options) for _ in range(2))
        state = (h, c) if kind == "lstm" else h
    return ort_peer.create(reference, x, state)


def torch_module(kind: str, case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    return cls(case.hidden, case.hidden, batch_first=True, device=case.device, dtype=case.dtype)


def rnnkern_module(kind: str, reference: torch.nn.Module, backend: str) -> torch.nn.Module:
    cls = rnnkern.nn.LSTM if kind == "lstm" else rnnkern.nn.GRU
    ours = cls(reference.input_size, reference.hidden_size, batch_first=True, backend=backend,
               device=reference.weight_ih_l0.device, dtype=reference.weight_ih_l0.dtype)
    ours.load_state_dict(reference.state_dict())
    return ours


def refusal(kind: str, backend: str, case: Case) -> Optional[str]:
    """Why `backend` cannot run this case, or None."""
    probe = torch.zeros((1, 1, 4), dtype=case.dtype, device=case.device)
    weights = [torch.zeros((GATES[kind] * 4, 4), dtype=case.dtype, device=case.device)] * 2
    layer = rnnkern.lstm_layer if kind == "lstm" else rnnkern.gru_layer
    try:
        layer(probe, None, *weights, backend=backend)
    except rnnkern.BackendError as err:
        return str(err).splitlines()[0]
    return None


GATES = {"lstm": 4, "gru": 3}


def _measure(kind: str, modules: dict[str, Any], case: Case, settings: Settings) -> list[dict[str, Any]]:
    """Records of `modules` (torch.nn's first) timed together, each with its ratio to torch.nn."""
    progress(f"{kind} {case.direction} B{case.batch}-T{case.steps}-H{case.hidden}-{report.dtype_name(case.dtype)}: "
             + ", ".join(modules))
    runs = [timed_call(kind, module, case) for module in modules.values()]
    timings = measure_together(runs, settings)
    baseline_ms = timings[0].median_ms
    ort_ms = dict(zip(modules, timings))["onnxruntime"].median_ms if "onnxruntime" in modules else None
    moved = {"bytes_per_token": _step_bytes(modules["torch.nn"], case)} if case.direction == "step" else {}
    return [{**_identity(kind, name, case), **timing.as_record(), "speedup_vs_torch": baseline_ms / timing.median_ms,
             **({} if ort_ms is None else {"speedup_vs_ort": ort_ms / timing.median_ms}), **moved,
             "peak_mem_bytes": None if name == "onnxruntime" else memory.peak_bytes(run, case.device)}
            for name, run, timing in zip(modules, runs, timings)]


def _step_bytes(module: torch.nn.Module, case: Case) -> int:
    """Bytes a one-token step moves at least: every parameter once, the state read and written."""
    parameters = sum(p.numel() * p.element_size() for p in module.parameters())
    states = 2 if isinstance(module, torch.nn.LSTM) else 1
    element = torch.empty((), dtype=case.dtype).element_size()
    return parameters + 2 * states * module.num_layers * case.batch * case.hidden * element


def timed_call(kind: str, module, case: Case) -> Callable[[], Any]:
    """The timed call of `case.direction`, with its inputs built here, outside the timer."""
    gen = torch.Generator(device=case.device).manual_seed(1)
    options = {"dtype": case.dtype, "device": case.device}
    x = torch.randn((case.batch, case.steps, case.hidden), generator=gen, **options)
    if case.direction == "fwd+bwd":
        grad = torch.randn((case.batch, case.steps, case.hidden), generator=gen, **options)
        return functools.partial(_forward_backward, module, x.requires_grad_(), grad)
    state = None
    if case.direction == "step":
        h = torch.zeros((1, case.batch, case.hidden), **options)
        state = (h, h) if kind == "lstm" else h
    if isinstance(module, ort_peer.OnnxRuntimePeer):
        return module.timed_call(x, state)
    return functools.partial(_no_grad_call, module, x, state)


def _no_grad_call(module, x, state):
    with torch.no_grad():
        return module(x, state)


def _forward_backward(module, x, grad):
    y, _ = module(x)
    y.backward(grad)


def _identity(kind: str, backend: str, case: Case) -> dict[str, Any]:
    return {"suite": kind, "op": kind, "backend": backend, "direction": case.direction, "shape": case.shape,
            "dtype": report.dtype_name(case.dtype), "device": case.device.type}
