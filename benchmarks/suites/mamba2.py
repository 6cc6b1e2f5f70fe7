"""Mamba-2 suite: rnnkern.mamba_chunk_scan and the multi-head decode step against PyTorch.

Inputs as a Mamba-2 block feeds them: x (b, l, h, p), dt (b, l, h) before its bias and
softplus, A (h,) < 0, B and C (b, l, 1, n), D and dt_bias (h,). What each row times:
  chunk_scan fwd      ``rnnkern.mamba_chunk_scan(..., dt_softplus=True)`` under torch.no_grad
  chunk_scan fwd+bwd  the same with every input requiring grad, then ``out.backward(grad)``
  state_update        one token of ``rnnkern.selective_state_update`` in Mamba-2's multi-head
                      form, state (b, h, p, n) updated in place

Baselines, timed in the same process on the same tensors, taking turns:
  torch_chunked  the chunked SSD in plain PyTorch, as users write it from the Mamba-2 paper:
                 per chunk the decay-masked C B^T times dt x, the chunks' states, the
                 recurrence over chunks, the readout of the entering states; autograd for
                 its backward.
  torch_step     the decode step in plain PyTorch (exp, einsum, in-place state update).
  mamba_ssm      ``mamba_chunk_scan_combined`` and ``selective_state_update`` of mamba_ssm
                 on a GPU, when it is importable.
"""
import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import rnnkern
from benchmarks import memory, report
from benchmarks.report import progress, speedup_columns
from benchmarks.timing import Settings, keyword_call, measure_together

SECTION = "kernels"
COLUMNS = speedup_columns("vs torch", "speedup_vs_torch")
LEGEND = ("vs torch: the plain PyTorch baseline's median (torch_chunked, torch_step) / this median "
          "(above 1: faster)")
CHUNK_SIZE = 256  # mamba_ssm's Mamba2 default


@dataclass(frozen=True)
class Case:
    op: str  # "chunk_scan" or "state_update"
    direction: str  # "fwd" or "fwd+bwd"
    shape: tuple[int, int, int, int, int]  # (b, l, h, p, n); l = 1 for the state update
    dtype: torch.dtype
    device: torch.device


def cases(device: torch.device, quick: bool) -> list[Case]:
    """The issue's point (2, 2048, 16, 64, 64) fp32 on CPU; Mamba-2 2.7B-like heads on a GPU."""
    if device.type == "cpu":
        scan_shape, step_shape, dtype = (2, 2048, 16, 64, 64), (1, 1, 16, 64, 64), torch.float32
    else:
        scan_shape, step_shape, dtype = (8, 2048, 80, 64, 128), (16, 1, 80, 64, 128), torch.bfloat16
    directions = ("fwd",) if quick and device.type == "cpu" else ("fwd", "fwd+bwd")
    return ([Case("chunk_scan", d, scan_shape, dtype, device) for d in directions]
            + [Case("state_update", "fwd", step_shape, torch.float32, device)])


def run(settings: Settings) -> list[dict[str, Any]]:
    records = []
    for case in cases(settings.device, settings.quick):
        contenders = _contenders(case)
        skipped = report.drop_refused(contenders, functools.partial(refusal, case=case),
                                      functools.partial(_identity, case=case))
        records += _measure(contenders, make_inputs(case), case, settings) + skipped
    return records


def _contenders(case: Case) -> dict[str, Callable]:
    baseline = torch_chunked if case.op == "chunk_scan" else torch_step
    rnnkern_op = rnnkern_chunk_scan if case.op == "chunk_scan" else rnnkern_state_update
    contenders = {baseline.__name__: baseline}
    contenders.update((name, functools.partial(rnnkern_op, name)) for name in report.KERNEL_BACKENDS[case.device.type])
    peer = _mamba_ssm(case.op) if case.device.type == "cuda" else None
    if peer is not None:
        contenders["mamba_ssm"] = peer
    return contenders


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Random inputs in Mamba-2's ranges: A in -[1, 16], dt before softplus around -4."""
    batch, length, heads, dim, state = case.shape
    gen = torch.Generator(device=case.device).manual_seed(0)
    options = {"device": case.device, "dtype": case.dtype}

    def randn(*shape, scale=1.0, shift=0.0, **kw):
        return torch.randn(shape, generator=gen, **{**options, **kw}) * scale + shift

    A = -(1 + 15 * torch.rand(heads, generator=gen, device=case.device))
    if case.op == "state_update":
        return {"state": randn(batch, heads, dim, state, dtype=torch.float32), "x": randn(batch, heads, dim),
                "dt": randn(batch, heads, scale=0.5, shift=-4.0), "A": A, "B": randn(batch, 1, state),
                "C": randn(batch, 1, state), "D": randn(heads, dtype=torch.float32),
                "dt_bias": randn(heads, scale=0.1, dtype=torch.float32)}
    return {"x": randn(batch, length, heads, dim), "dt": randn(batch, length, heads, scale=0.5, shift=-4.0),
            "A": A, "B": randn(batch, length, 1, state), "C": randn(batch, length, 1, state),
            "D": randn(heads, dtype=torch.float32), "dt_bias": randn(heads, scale=0.1, dtype=torch.float32),
            "grad": randn(batch, length, heads, dim)}


# ---------------------------------------------------------------------------------------
# The chunk scan.


def torch_chunked(x, dt, A, B, C, D, dt_bias):
    """Mamba-2's SSD in plain PyTorch, chunk by chunk in batched matmuls (fp32 math)."""
    batch, length, heads, dim = x.shape
    q = CHUNK_SIZE
    pad = -length % q
    dt = F.softplus(dt.float() + dt_bias)  # (b, l, h)
    xdt = F.pad(x.float() * dt[..., None], (0, 0, 0, 0, 0, pad))  # (b, L', h, p), zero past l
    step = F.pad(dt * A, (0, 0, 0, pad))  # (b, L', h): log-decay per position
    Bh = F.pad(B.float().expand(-1, -1, heads, -1), (0, 0, 0, 0, 0, pad))  # (b, L', h, n)
    Ch = F.pad(C.float().expand(-1, -1, heads, -1), (0, 0, 0, 0, 0, pad))

    def chunks(t):  # (b, L', h, ...) -> (b, h, c, q, ...)
        return t.unflatten(1, (-1, q)).movedim(3, 1)

    xdt, Bh, Ch, step = chunks(xdt), chunks(Bh), chunks(Ch), chunks(step)
    cs = step.cumsum(-1)  # (b, h, c, q)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, float("-inf")))  # (b, h, c, q, q)
    y = ((Ch @ Bh.transpose(-1, -2)) * decay) @ xdt  # (b, h, c, q, p): within chunks
    to_end = torch.exp(cs[..., -1:] - cs)  # (b, h, c, q)
    chunk_states = (xdt * to_end[..., None]).transpose(-1, -2) @ Bh  # (b, h, c, p, n)
    state = chunk_states.new_zeros(chunk_states[:, :, 0].shape)  # (b, h, p, n)
    entering = []
    for c in range(chunk_states.shape[2]):
        entering.append(state)
        state = torch.exp(cs[:, :, c, -1])[..., None, None] * state + chunk_states[:, :, c]
    entering = torch.stack(entering, dim=2)  # (b, h, c, p, n)
    y = y + torch.exp(cs)[..., None] * (Ch @ entering.transpose(-1, -2))  # from the entering states
    y = y.movedim(1, 3).flatten(1, 2)[:, :length]  # (b, l, h, p)
    return (y + D[:, None] * x.float()).to(x.dtype)


def rnnkern_chunk_scan(backend, x, dt, A, B, C, D, dt_bias):
    return rnnkern.mamba_chunk_scan(x, dt, A, B, C, CHUNK_SIZE, D=D, dt_bias=dt_bias, dt_softplus=True,
                                    backend=backend)


# ---------------------------------------------------------------------------------------
# The decode step.


def torch_step(state, x, dt, A, B, C, D, dt_bias):
    """One Mamba-2 token in plain PyTorch, state (b, h, p, n) updated in place."""
    dt = F.softplus(dt + dt_bias)  # (b, h)
    state.mul_(torch.exp(dt * A)[..., None, None]).add_(torch.einsum("bh,bhp,bn->bhpn", dt, x, B[:, 0]))
    return torch.einsum("bhpn,bn->bhp", state, C[:, 0]) + D[:, None] * x


def rnnkern_state_update(backend, state, x, dt, A, B, C, D, dt_bias):
    heads, dim, n = state.shape[1:]
    return rnnkern.selective_state_update(
        state, x, dt[..., None].expand(-1, -1, dim), A[:, None, None].expand(-1, dim, n), B, C,
        D[:, None].expand(-1, dim), dt_bias=dt_bias[:, None].expand(-1, dim), dt_softplus=True, backend=backend)


def _mamba_ssm(op: str) -> Optional[Callable]:
    try:
        if op == "chunk_scan":
            peer = importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
        else:
            peer = importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update
    except ImportError:
        return None
    if op == "chunk_scan":
        def call(x, dt, A, B, C, D, dt_bias):
            return peer(x, dt, A, B, C, CHUNK_SIZE, D=D, dt_bias=dt_bias, dt_softplus=True)
    else:
        def call(state, x, dt, A, B, C, D, dt_bias):
            heads, dim, n = state.shape[1:]
            return peer(state, x, dt[..., None].expand(-1, -1, dim), A[:, None, None].expand(-1, dim, n), B, C,
                        D[:, None].expand(-1, dim), dt_bias=dt_bias[:, None].expand(-1, dim), dt_softplus=True)
    return call


def refusal(name: str, case: Case) -> Optional[str]:
    """Why backend `name` cannot run this case, or None (baselines and peers always can)."""
    if name not in rnnkern.BACKENDS:
        return None
    probe_shape = (1, 1 if case.op == "state_update" else 3, 2, 2, 2)
    probe = make_inputs(Case(case.op, "fwd", probe_shape, case.dtype, case.device))
    probe.pop("grad", None)
    try:
        (rnnkern_chunk_scan if case.op == "chunk_scan" else rnnkern_state_update)(name, **probe)
    except rnnkern.BackendError as err:
        return str(err).splitlines()[0]
    return None


def _measure(contenders: dict[str, Callable], inputs: dict, case: Case, settings: Settings) -> list[dict[str, Any]]:
    """Records of `contenders` (the PyTorch baseline first) timed together, each with its speedup."""
    progress(f"mamba2 {case.op} {case.direction} {_shape_id(case)}: " + ", ".join(contenders))
    calls = [keyword_call(fn, inputs, case.direction) for fn in contenders.values()]
    timings = measure_together(calls, settings)
    baseline_ms = timings[0].median_ms
    return [{**_identity(name, case), **timing.as_record(), "speedup_vs_torch": baseline_ms / timing.median_ms,
             "peak_mem_bytes": memory.peak_bytes(call, case.device)}
            for name, call, timing in zip(contenders, calls, timings)]


def _shape_id(case: Case) -> str:
    batch, length, heads, dim, state = case.shape
    return f"b{batch}-l{length}-h{heads}-p{dim}-n{state}-{report.dtype_name(case.dtype)}"


def _identity(backend: str, case: Case) -> dict[str, Any]:
    return {"suite": "mamba2", "op": "selective_state_update" if case.op == "state_update" else "mamba_chunk_scan",
            "backend": backend, "direction": case.direction, "shape": list(case.shape),
            "dtype": report.dtype_name(case.dtype), "device": case.device.type}
