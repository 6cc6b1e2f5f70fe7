"""Scan suite: rnnkern.linear_scan on (B, T, D) inputs, against PyTorch baselines.

What each direction times:
  fwd  ``rnnkern.linear_scan(a, b, backend=...)``.
  bwd  the registered backward op ``torch.ops.rnnkern.linear_scan_bwd`` alone, on h
       from one untimed forward: no forward time is in it.

Baselines, timed in the same process on the same tensors (and, on a GPU, the peers
accelerated-scan and flash-linear-attention's HGRN scan when installed; see peer_benches):
  torch.add      ``torch.add(a, b)``: the forward's memory-traffic floor (reads 2 (B, T, D)
                 tensors, writes 1, as the forward does).
  torch.addcmul  ``torch.addcmul(a, h, grad_h)``: the backward's floor. It reads 3 tensors
                 and writes 1; the backward reads 3 and writes 2, so a backward running at
                 full bandwidth sits near 1.25x this floor, not 1x.
  ...(out=)      the same floors writing into a preallocated tensor. The kernels allocate
                 their outputs, so the floors above do too; on CPU a fresh large tensor
                 costs a page fault per page, and the gap between a floor and its out=
                 twin is that allocation cost. linear_scan(out=) is the forward writing
                 into the same preallocated tensor, against torch.add(out=); its bwd row
                 is the cpu backward writing both gradients into preallocated tensors
                 (torch.ops.rnnkern_C.linear_scan_bwd_out), against torch.addcmul(out=).
  torch_loop     ``h = a_t * h + b_t`` for each t in plain PyTorch, at the same shape, with
                 the outputs stacked into (B, T, D); its backward is autograd through that
                 loop, with the graph built outside the timer. The loop steps over
                 ``a.unbind(1)`` rather than ``a[:, t]``: autograd of ``a[:, t]`` adds a
                 zero-filled (B, T, D) gradient per step, which is quadratic in T.

The reference backend is a Python time loop too; it is timed only where T <= 2048.
"""
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import rnnkern
from benchmarks import memory, report
from benchmarks.report import PEAK_MEMORY_COLUMN, TIMING_COLUMNS, progress
from benchmarks.timing import Settings, Setup, Timing, measure_together

SECTION = "kernels"
COLUMNS = [
    *TIMING_COLUMNS,
    ("x add", lambda r: f"{r['ratio_vs_add']:.2f}"),
    ("vs loop", lambda r: f"{r['speedup_vs_loop']:.2f}"),
    ("GB/s", lambda r: f"{r['gbps']:.1f}"),
    PEAK_MEMORY_COLUMN,
]
LEGEND = (
    "x add: median / median of the memory-traffic floor (fwd: torch.add; bwd: torch.addcmul, which moves 4 of "
    "the backward's 5 tensors)\n"
    "(out=): the floor writing into a preallocated tensor, without the allocation and page faults\n"
    "vs loop: speedup over the plain PyTorch loop (loop median / median)"
)

HEADLINE_SHAPE = (4, 8192, 1024)
SMALL_SHAPE = (4, 2048, 1024)
REFERENCE_MAX_T = 2048

BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")}
DTYPES = {"cpu": (torch.float32, torch.float16, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


@dataclass(frozen=True)
class Case:
    """One input configuration: shape (B, T, D), dtype and device."""

    shape: tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device

    @property
    def id(self) -> str:
        batch, time, dim = self.shape
        return f"B{batch}-T{time}-D{dim}-{report.dtype_name(self.dtype)}"


@dataclass(frozen=True)
class Inputs:
    """The tensors every benchmark of a case reads: built once, outside every timer."""

    a: torch.Tensor  # (B, T, D) decays in [0, 1)
    b: torch.Tensor  # (B, T, D)
    h: torch.Tensor  # (B, T, D) the forward output, input of the backward
    grad_h: torch.Tensor  # (B, T, D)
    out: torch.Tensor  # (B, T, D) preallocated output of the out= floors and linear_scan(out=)
    grad_b_out: torch.Tensor  # (B, T, D) with `out` as grad_a: the preallocated gradients of the cpu backward


@dataclass(frozen=True)
class Bench:
    """One timed callable. `tensors_moved` counts the (B, T, D) tensors it must read or write."""

    op: str
    backend: str
    direction: str
    run: Callable
    tensors_moved: int
    note: str
    setup: Setup = None

    @property
    def label(self) -> str:
        return self.op if self.backend == "torch" else f"{self.op}[{self.backend}]"


def cases(device: torch.device, quick: bool) -> list[Case]:
    """The headline case alone when quick; otherwise both shapes in every dtype of the device."""
    if quick:
        return [Case(HEADLINE_SHAPE, torch.float32, device)]
    return [Case(shape, dtype, device) for shape in (HEADLINE_SHAPE, SMALL_SHAPE) for dtype in DTYPES[device.type]]


def make_inputs(case: Case) -> Inputs:
    """Random inputs, with h from the device's default linear_scan backend."""
    torch.manual_seed(0)
    options = {"dtype": case.dtype, "device": case.device}
    a, b = torch.rand(case.shape, **options), torch.randn(case.shape, **options)
    grad_h, out = torch.randn(case.shape, **options), torch.empty(case.shape, **options)
    return Inputs(a, b, rnnkern.linear_scan(a, b), grad_h, out, torch.empty(case.shape, **options))


def refusal(backend: str, case: Case) -> Optional[str]:
    """Why `backend` is not benchmarked on `case`, or None when it is."""
    if backend == "reference" and case.shape[1] > REFERENCE_MAX_T:
        return f"Python time loop: timed only where T <= {REFERENCE_MAX_T}"
    probe = torch.zeros((1, 1, 1), dtype=case.dtype, device=case.device)
    try:
        rnnkern.linear_scan(probe, probe, backend=backend)
    except rnnkern.BackendError as err:
        return str(err).splitlines()[0]
    return None


def loop_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The recurrence as a plain PyTorch loop over time."""
    state = torch.zeros_like(a[:, 0])
    outputs = []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        state = a_t * state + b_t
        outputs.append(state)
    return torch.stack(outputs, dim=1)


def forward_benches(inputs: Inputs, backends: list[str]) -> list[Bench]:
    """The floor first, the loop second, then the out= floor and one bench per backend."""
    a, b = inputs.a, inputs.b
    baselines = [
        Bench("torch.add", "torch", "fwd", functools.partial(torch.add, a, b), 3, "torch.add(a, b)"),
        Bench("torch_loop", "torch", "fwd", functools.partial(loop_scan, a, b), 3, "loop over t, outputs stacked"),
        Bench("torch.add(out=)", "torch", "fwd", functools.partial(torch.add, a, b, out=inputs.out), 3,
              "torch.add(a, b, out=preallocated)"),
    ]
    kernels = [
        Bench("linear_scan", name, "fwd", functools.partial(rnnkern.linear_scan, a, b, backend=name), 3,
              "rnnkern.linear_scan(a, b)")
        for name in backends
    ]
    into_out = [
        Bench("linear_scan(out=)", name, "fwd", functools.partial(rnnkern.linear_scan, a, b, out=inputs.out,
                                                                   backend=name), 3,
              "rnnkern.linear_scan(a, b, out=preallocated)")
        for name in backends
    ]
    return baselines + kernels + into_out


def peer_benches(inputs: Inputs) -> list[Bench]:
    """Peers computing the same recurrence on a GPU, when installed; their input layouts are
    made here, outside the timer.

    accelerated-scan's warp scan takes (B, D, T) contiguous tensors with T a power of two;
    flash-linear-attention's chunk_hgrn computes h_t = exp(g_t) h_{t-1} + x_t on (B, T, D),
    so it gets g = log(a) (a clamped to >= 1e-12, where exp(g) is a to within float rounding).
    """
    a, b = inputs.a, inputs.b
    if a.device.type != "cuda":
        return []
    benches = []
    try:
        from accelerated_scan.warp import scan as warp_scan
    except ImportError:
        warp_scan = None
    if warp_scan is not None and not a.shape[1] & (a.shape[1] - 1):
        gates, tokens = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()  # (B, D, T)
        benches.append(Bench("linear_scan", "accelerated_scan", "fwd", functools.partial(warp_scan, gates, tokens),
                             3, "accelerated_scan.warp.scan on (B, D, T) copies"))
    try:
        from fla.ops.hgrn import chunk_hgrn
    except ImportError:
        chunk_hgrn = None
    if chunk_hgrn is not None:
        log_a = a.clamp_min(1e-12).log()
        benches.append(Bench("linear_scan", "fla", "fwd", functools.partial(chunk_hgrn, b, log_a), 3,
                             "fla.ops.hgrn.chunk_hgrn(x=b, g=log a)"))
    return benches


def backward_benches(inputs: Inputs, backends: list[str]) -> list[Bench]:
    """The floor first, the loop second, then the out= floor and one bench per backend."""
    a, h, grad_h = inputs.a, inputs.h, inputs.grad_h
    baselines = [
        Bench("torch.addcmul", "torch", "bwd", functools.partial(torch.addcmul, a, h, grad_h), 4,
              "torch.addcmul(a, h, grad_h)"),
        Bench("torch_loop", "torch", "bwd", functools.partial(torch.Tensor.backward, gradient=grad_h), 5,
              "autograd through the loop, graph built outside the timer", setup=functools.partial(_loop_graph, inputs)),
        Bench("torch.addcmul(out=)", "torch", "bwd", functools.partial(torch.addcmul, a, h, grad_h, out=inputs.out), 4,
              "torch.addcmul(a, h, grad_h, out=preallocated)"),
    ]
    kernels = [
        Bench("linear_scan", name, "bwd", functools.partial(_backward_op, inputs, name), 5,
              "torch.ops.rnnkern.linear_scan_bwd alone")
        for name in backends
    ]
    if "cpu" in backends:
        kernels.append(Bench("linear_scan(out=)", "cpu", "bwd", functools.partial(_backward_into_buffers, inputs), 5,
                             "torch.ops.rnnkern_C.linear_scan_bwd_out into preallocated gradients"))
    return baselines + kernels


def _loop_graph(inputs: Inputs) -> tuple[torch.Tensor]:
    """The loop's output on fresh leaf views of a and b, with its autograd graph."""
    return (loop_scan(inputs.a.detach().requires_grad_(), inputs.b.detach().requires_grad_()),)


def _backward_op(inputs: Inputs, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_scan's registered backward: no initial state, final-state gradient or packing."""
    return torch.ops.rnnkern.linear_scan_bwd(inputs.a, inputs.h, None, inputs.grad_h, None, None, False, backend)


def _backward_into_buffers(inputs: Inputs) -> torch.Tensor:
    """The cpu backward writing grad_a and grad_b into preallocated tensors (the out= floors'
    conditions: no fresh pages)."""
    return torch.ops.rnnkern_C.linear_scan_bwd_out(inputs.a, inputs.h, None, inputs.grad_h, None, None, False,
                                                   inputs.out, inputs.grad_b_out)


def run(settings: Settings) -> list[dict[str, Any]]:
    records = []
    for case in cases(settings.device, settings.quick):
        records += _run_case(case, settings)
    return records


def _run_case(case: Case, settings: Settings) -> list[dict[str, Any]]:
    candidates = {name: refusal(name, case) for name in BACKENDS[case.device.type]}
    backends = [name for name, reason in candidates.items() if reason is None]
    skipped = [
        _skip_record(case, name, direction, reason)
        for name, reason in candidates.items() if reason is not None
        for direction in ("fwd", "bwd")
    ]
    progress(f"scan {case.id}: building inputs")
    inputs = make_inputs(case)
    measured = []
    for benches in (forward_benches(inputs, backends) + peer_benches(inputs), backward_benches(inputs, backends)):
        measured += _compare(case, benches, settings, inputs.a.nbytes)
    return measured + skipped


def _compare(case: Case, benches: list[Bench], settings: Settings, tensor_bytes: int) -> list[dict[str, Any]]:
    """Measures `benches` (floor first, loop second) and relates each to the floor and the loop."""
    progress(f"scan {case.id}: {benches[0].direction} " + ", ".join(bench.label for bench in benches))
    timings = measure_together([bench.run for bench in benches], settings, [bench.setup for bench in benches])
    records = [_record(case, bench, timing, tensor_bytes) for bench, timing in zip(benches, timings)]
    floor, loop = records[0], records[1]
    for record in records:
        record["floor_op"] = floor["op"]
        record["ratio_vs_add"] = record["ms_median"] / floor["ms_median"]
        record["speedup_vs_loop"] = loop["ms_median"] / record["ms_median"]
    return records


def _record(case: Case, bench: Bench, timing: Timing, tensor_bytes: int) -> dict[str, Any]:
    bytes_moved = bench.tensors_moved * tensor_bytes
    return {
        **_identity(case, bench.op, bench.backend, bench.direction),
        **timing.as_record(),
        "bytes_moved": bytes_moved,
        "gbps": bytes_moved / (timing.median_ms * 1e6),
        "peak_mem_bytes": memory.peak_bytes(bench.run, case.device, bench.setup),
        "note": bench.note,
    }


def _skip_record(case: Case, backend: str, direction: str, reason: str) -> dict[str, Any]:
    return {**_identity(case, "linear_scan", backend, direction), "skipped": reason}


def _identity(case: Case, op: str, backend: str, direction: str) -> dict[str, Any]:
    return {
        "suite": "scan",
        "op": op,
        "backend": backend,
        "direction": direction,
        "shape": list(case.shape),
        "dtype": report.dtype_name(case.dtype),
        "device": case.device.type,
    }
