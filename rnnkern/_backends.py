"""Backend registry: which backends exist, which can run a given input, and why not.

A backend is one implementation family: ``reference`` (pure PyTorch), ``cpu`` (C++ in
csrc/cpu), ``triton`` (rnnkern/ops/*/triton.py) and ``cuda`` (csrc/cuda). Every op asks
:func:`select` for the backend to run; ``backend=`` or ``RNNKERN_BACKEND`` forces one, and
forcing one that cannot run the input is an error, never a silent fallback.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

# First backend in this order that supports the input runs it. The Triton interpreter can
# run CPU tensors, but only when forced: it is a testing tool, not a fast path.
_PRIORITY = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# Op-specific reasons a backend refuses an input: (backend, device, dtype) -> reason or None.
SupportCheck = Callable[[str, torch.device, torch.dtype], Optional[str]]


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run the given input."""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> Optional[str]:
    """Why backend `name` cannot run at all in this process, or None if it can."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        try:
            importlib.import_module("rnnkern._C")
        except ImportError as err:
            return f"the compiled extension rnnkern._C is not importable ({err})"
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed (pip install triton)"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def device_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run tensors on `device`, or None if it can."""
    if name == "reference":
        return None
    if name == "cpu" and device.type != "cpu":
        return f"runs on CPU tensors only, got {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return f"runs on CUDA tensors only, got {device.type} tensors"
    if name == "triton" and device.type != "cuda":
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device.type} tensors"
    return None


# Cached: what rnnkern._C registers is fixed once unavailable_reason has imported it.
@functools.lru_cache(maxsize=None)
def compiled_kernel_reason(op: str, device: torch.device) -> Optional[str]:
    """Why rnnkern._C has no kernel for `op` on `device`, or None if it has one."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    missing_extension = unavailable_reason("cpu")  # importing rnnkern._C registers its ops
    if missing_extension is not None:
        return missing_extension
    if not hasattr(torch.ops.rnnkern_C, op):
        return f"rnnkern._C has no {op} op (built from older sources? reinstall rnnkern)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnkern_C::{op}", key):
        return f"rnnkern._C was built without a {key} kernel for {op}"
    return None


def kernels(op: str, backend: str, reference) -> tuple[Callable, ...]:
    """(forward, backward) of `op` on `backend`, all with the reference's signatures: the
    functions ``{op}_fwd`` and ``{op}_bwd`` of the `reference` module, of rnnkern._C (cpu and
    cuda) or of ``rnnkern.ops.{op}.triton`` (imported on first use: it needs triton)."""
    if backend == "reference":
        source = reference
    elif backend in ("cpu", "cuda"):
        source = torch.ops.rnnkern_C
    else:
        source = importlib.import_module(f"rnnkern.ops.{op}.triton")
    return getattr(source, f"{op}_fwd"), getattr(source, f"{op}_bwd")


def kernel_support(compiled_kernel: str) -> SupportCheck:
    """The support check most ops need: the triton backend has no float64, and the cpu and
    cuda backends need rnnkern._C to hold `compiled_kernel` for the device."""

    def supports(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if backend == "triton" and dtype == torch.float64:
            return "float64 is not supported (use the reference or cpu backend)"
        if backend in ("cpu", "cuda"):
            return compiled_kernel_reason(compiled_kernel, device)
        return None

    return supports


def _why_not(name: str, device: torch.device, dtype: torch.dtype, supports: SupportCheck) -> Optional[str]:
    return unavailable_reason(name) or device_reason(name, device) or supports(name, device, dtype)


# Host-side logic on constants: torch.compile calls it while tracing and keeps the result
# (so RNNKERN_BACKEND is read when a function is compiled, not on every call).
@torch.compiler.assume_constant_result
def select(
    op: str, device: torch.device, dtype: torch.dtype, supports: SupportCheck, requested: Optional[str] = None
) -> str:
    """The backend that runs `op` on inputs of this device and dtype.

    `requested` (or the RNNKERN_BACKEND environment variable) forces a backend; otherwise
    the first backend in the device's priority order whose checks all pass is taken.
    `supports` adds the op's own reasons to refuse an input.
    """
    return _select(op, device, dtype, supports, _requested(requested), triton_interpreted())


def _requested(requested: Optional[str]) -> Optional[str]:
    """The backend a call forces: its own `requested`, else RNNKERN_BACKEND, else None."""
    return requested or os.environ.get("RNNKERN_BACKEND") or None


_CPU = torch.device("cpu")


def selects_compiled_cpu_kernel(requested: Optional[str], kernel: str) -> bool:
    """Whether select, on CPU tensors with `requested`, picks the cpu backend, which has the
    compiled `kernel`: select's answer for the per-token calls that cannot afford select
    (an environment read and a cache lookup, nothing else)."""
    first_choice = _requested(requested) or _PRIORITY["cpu"][0]
    return first_choice == "cpu" and compiled_kernel_reason(kernel, _CPU) is None


# The answer depends only on its arguments (TRITON_INTERPRET among them, through
# device_reason) and on what this process has loaded, so it is computed once per input kind.
@functools.lru_cache(maxsize=512)
def _select(
    op: str, device: torch.device, dtype: torch.dtype, supports: SupportCheck, requested: Optional[str],
    interpreted: bool,
) -> str:
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {requested!r}; expected one of {BACKENDS}")
        reason = _why_not(requested, device, dtype, supports)
        if reason is not None:
            raise BackendError(
                f"{op}: backend {requested!r} cannot run this input: {reason}.\n"
                + _reasons_table(BACKENDS, device, dtype, supports)
            )
        return requested
    order = _PRIORITY.get(device.type, ("reference",))
    for name in order:
        if _why_not(name, device, dtype, supports) is None:
            return name
    raise BackendError(f"{op}: no backend can run this input.\n" + _reasons_table(order, device, dtype, supports))


def _reasons_table(names, device: torch.device, dtype: torch.dtype, supports: SupportCheck) -> str:
    lines = []
    for name in names:
        reason = _why_not(name, device, dtype, supports)
        lines.append(f"  {name}: {'available' if reason is None else reason}")
    return "backends:\n" + "\n".join(lines)
