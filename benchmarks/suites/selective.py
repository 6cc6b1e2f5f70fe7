"""Selective-scan suite: rnnkern.selective_scan (Mamba's scan) against PyTorch baselines.

Inputs as a Mamba block feeds them: u, delta, z (B, D, L); A (D, N); B, C (B, N, L);
D and delta_bias (D,); delta_softplus=True. What each direction times:
  fwd      ``rnnkern.selective_scan(...)`` under torch.no_grad
  fwd+bwd  the same call with every input requiring grad, then ``out.backward(grad)``

Baselines, timed in the same process on the same tensors:
  torch_loop  what users write without a kernel: discretise up front (exp(delta A) and
              delta B u as (B, D, L, N) tensors), then ``x = dA_t * x + dBu_t`` and
              ``y_t = C_t . x`` for each t in plain PyTorch; its backward is autograd.
  mamba_ssm   ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` on a GPU, when
              mamba_ssm is importable.
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
COLUMNS = speedup_columns("vs loop", "speedup_vs_loop")
LEGEND = "vs loop: torch_loop's median / this median (above 1: faster than the plain PyTorch loop)"


@dataclass(frozen=True)
class Case:
    direction: str  # "fwd" or "fwd+bwd"
    shape: tuple[int, int, int, int]  # (B, D, L, N)
    dtype: torch.dtype
    device: torch.device


def cases(device: torch.device, quick: bool) -> list[Case]:
    """The issue's reference point (2, 256, 2048, 16) fp32 on CPU; Mamba-130M-like widths on a GPU."""
    if device.type == "cpu":
        shapes, dtypes = [(2, 256, 2048, 16)], [torch.float32]
    else:
        shapes = [(8, 1536, 2048, 16)] + ([] if quick else [(8, 1536, 8192, 16)])
        dtypes = [torch.bfloat16] + ([] if quick else [torch.float32])
    directions = ("fwd",) if quick and device.type == "cpu" else ("fwd", "fwd+bwd")
    return [Case(d, s, dt, device) for s in shapes for dt in dtypes for d in directions]


def run(settings: Settings) -> list[dict[str, Any]]:
    records = []
    for case in cases(settings.device, settings.quick):
        inputs = make_inputs(case)
        contenders = {"torch_loop": torch_loop}
        backends = report.KERNEL_BACKENDS[case.device.type]
        contenders.update((name, functools.partial(rnnkern_scan, name)) for name in backends)
        peer = _mamba_ssm() if case.device.type == "cuda" else None
        if peer is not None:
            contenders["mamba_ssm"] = peer
        skipped = report.drop_refused(contenders, functools.partial(refusal, case=case),
                                      functools.partial(_identity, case=case))
        records += _measure(contenders, inputs, case, settings) + skipped
    return records


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Random inputs with Mamba's ranges: A < 0, delta before softplus around -4 (dt ~ 0.02)."""
    batch, dim, length, state = case.shape
    gen = torch.Generator(device=case.device).manual_seed(0)
    options = {"device": case.device, "dtype": case.dtype}

    def randn(*shape, scale=1.0, shift=0.0, **kw):
        return (torch.randn(shape, generator=gen, **{**options, **kw}) * scale + shift)

    return {
        "u": randn(batch, dim, length), "delta": randn(batch, dim, length, scale=0.5, shift=-4.0),
        "A": -torch.rand((dim, state), generator=gen, device=case.device, dtype=torch.float32) * 4 - 0.5,
        "B": randn(batch, state, length), "C": randn(batch, state, length),
        "D": randn(dim, dtype=torch.float32), "z": randn(batch, dim, length),
        "delta_bias": randn(dim, scale=0.1, dtype=torch.float32),
        "grad": randn(batch, dim, length),
    }


def torch_loop(u, delta, A, B, C, D, z, delta_bias):
    """Mamba's scan as plain PyTorch, discretised up front: holds (B, D, L, N) tensors."""
    delta = F.softplus(delta.float() + delta_bias[:, None])  # (B, D, L)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # (B, D, L, N)
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u.float())  # (B, D, L, N)
    state = u.new_zeros((u.shape[0], u.shape[1], A.shape[1]), dtype=torch.float32)
    ys = []
    for t in range(u.shape[2]):
        state = decay[:, :, t] * state + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, :, t].float()))
    y = torch.stack(ys, dim=2) + D[:, None] * u.float()
    return (y * F.silu(z.float())).to(u.dtype)


def rnnkern_scan(backend, u, delta, A, B, C, D, z, delta_bias):
    return rnnkern.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend=backend)


def _mamba_ssm() -> Optional[Callable]:
    try:
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except ImportError:
        return None

    def scan(u, delta, A, B, C, D, z, delta_bias):
        return interface.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    return scan


def refusal(name: str, case: Case) -> Optional[str]:
    """Why backend `name` cannot run this case, or None (peers always can once imported)."""
    if name not in rnnkern.BACKENDS:
        return None
    probe = make_inputs(Case("fwd", (1, 2, 3, 2), case.dtype, case.device))
    probe.pop("grad")
    try:
        rnnkern_scan(name, **probe)
    except rnnkern.BackendError as err:
        return str(err).splitlines()[0]
    return None


def _measure(scans: dict[str, Callable], inputs: dict, case: Case, settings: Settings) -> list[dict[str, Any]]:
    """Records of `scans` (the loop first) timed together, each with its speedup over the loop."""
    batch, dim, length, state = case.shape
    progress(f"selective_scan {case.direction} B{batch}-D{dim}-L{length}-N{state}-{report.dtype_name(case.dtype)}: "
             + ", ".join(scans))
    calls = [keyword_call(scan, inputs, case.direction) for scan in scans.values()]
    timings = measure_together(calls, settings)
    loop_ms = timings[0].median_ms
    return [{**_identity(name, case), **timing.as_record(), "speedup_vs_loop": loop_ms / timing.median_ms,
             "peak_mem_bytes": memory.peak_bytes(call, case.device)}
            for name, call, timing in zip(scans, calls, timings)]


def _identity(backend: str, case: Case) -> dict[str, Any]:
    return {"suite": "selective", "op": "selective_scan", "backend": backend, "direction": case.direction,
            "shape": list(case.shape), "dtype": report.dtype_name(case.dtype), "device": case.device.type}
