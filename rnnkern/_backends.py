"""Backend registry: which backends exist, which can run a given op on a given input, and why not.

A backend is one implementation family: ``reference`` (pure PyTorch), ``cpu`` (C++ in
csrc/cpu, through rnnkern._C) and ``triton`` (rnnkern/ops/*/triton.py). Each op declares an
:class:`Op`: which backends implement it, where their functions live, and the dtypes each
runs. Every op asks :func:`select` for the backend to run; ``backend=`` or ``RNNKERN_BACKEND``
forces one, and forcing one that cannot run the input is an error naming every backend's
reason, never a silent fallback.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable, Mapping, Optional

import torch

BACKENDS = ("reference", "cpu", "triton")

# First backend in this order that can run the input runs it. The Triton interpreter can
# run CPU tensors, but only when forced: it is a testing tool, not a fast path.
_PRIORITY = {
    "cuda": ("triton", "reference"),
    "cpu": ("cpu", "reference"),
}

COMPILED = "rnnkern._C"  # an Op's `kernels` value for the functions rnnkern._C registers


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run the given input."""


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """One op's entry in the registry.

    `functions` are the names of the op's kernels (e.g. ``lstm_layer_fwd``, ``lstm_layer_bwd``),
    the same in every backend's namespace and with the reference's signatures. `kernels` maps a
    backend to that namespace: a module path, imported on first use (so a Triton module needs
    triton only once it runs), or COMPILED for rnnkern._C. A backend missing from `kernels` has
    no implementation of the op. `dtypes` limits a backend to the input dtypes it runs.
    """

    name: str
    functions: tuple[str, ...]
    kernels: Mapping[str, str]
    dtypes: Mapping[str, tuple[torch.dtype, ...]] = dataclasses.field(default_factory=dict)

    def function(self, backend: str, name: str) -> Callable:
        """The kernel `name` (one of `functions`) of `backend`."""
        source = self.kernels[backend]
        if source == COMPILED:
            importlib.import_module("rnnkern._C")  # registers the rnnkern_C ops (loaded once)
        namespace = torch.ops.rnnkern_C if source == COMPILED else importlib.import_module(source)
        function = getattr(namespace, name)
        return _on_inputs_device(function) if backend == "triton" else function

    def refusal(self, backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """Why `backend` cannot run this op on inputs of `device` and `dtype`, or None if it can."""
        return (unavailable_reason(backend) or device_reason(backend, device)
                or _op_reason(self, backend, dtype))


def _on_inputs_device(launcher: Callable) -> Callable:
    """`launcher` run with the device of its first tensor argument current: a Triton kernel
    launches on the current CUDA device, which need not be the inputs' (tensors on cuda:1
    while cuda:0 is current)."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return launch


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> Optional[str]:
    """Why backend `name` cannot run at all in this process, or None if it can."""
    if name == "reference":
        return None
    if name == "cpu":
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
    if name == "cpu" and device.type != "cpu":
        return f"runs on CPU tensors only, got {device.type} tensors"
    if name == "triton" and device.type != "cuda":
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device.type} tensors"
    return None


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


# Cached: what rnnkern._C registers is fixed once unavailable_reason has imported it.
@functools.lru_cache(maxsize=None)
def _op_reason(op: Op, backend: str, dtype: torch.dtype) -> Optional[str]:
    if backend not in op.kernels:
        return f"has no {op.name} kernel"
    allowed = op.dtypes.get(backend)
    if allowed is not None and dtype not in allowed:
        return f"{dtype} is not supported by its {op.name} kernel (it runs {_dtype_names(allowed)})"
    if op.kernels[backend] == COMPILED:
        missing = [name for name in op.functions if not hasattr(torch.ops.rnnkern_C, name)]
        if missing:
            return f"rnnkern._C has no {', '.join(missing)} op (built from older sources? reinstall rnnkern)"
    return None


# Host-side logic on constants: torch.compile calls it while tracing and keeps the result
# (so RNNKERN_BACKEND is read when a function is compiled, not on every call).
@torch.compiler.assume_constant_result
def select(op: Op, device: torch.device, dtype: torch.dtype, requested: Optional[str] = None) -> str:
    """The backend that runs `op` on inputs of this device and dtype.

    `requested` (or the RNNKERN_BACKEND environment variable) forces a backend; otherwise
    the first backend in the device's priority order that can run the input is taken.
    """
    return _select(op, device, dtype, _requested(requested), triton_interpreted())


def _requested(requested: Optional[str]) -> Optional[str]:
    """The backend a call forces: its own `requested`, else RNNKERN_BACKEND, else None."""
    return requested or _environment_backend()


# os.environ.get of an unset variable costs about a microsecond (Mapping.get raises and catches
# a KeyError), which a one-token step pays on every call. CPython's os.environ keeps the
# variables, encoded, in the dict `_data` that each of its writes and deletions updates, so
# reading that dict sees what os.environ.get would.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_BACKEND_VARIABLE = "RNNKERN_BACKEND"
_BACKEND_KEY = os.environ.encodekey(_BACKEND_VARIABLE) if hasattr(os.environ, "encodekey") else None


def _environment_backend() -> Optional[str]:
    if not isinstance(_ENVIRON_DATA, dict) or _BACKEND_KEY is None:
        return os.environ.get(_BACKEND_VARIABLE) or None
    value = _ENVIRON_DATA.get(_BACKEND_KEY)
    return os.environ.decodevalue(value) if value else None


_CPU = torch.device("cpu")

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the Triton kernels have no float64
STEP_DTYPES = (torch.float32, torch.float64)  # the cpu backend's one-token kernels


def step_op(name: str) -> Op:
    """The Op of a one-token kernel `name` that the cpu backend alone has (fp32/fp64)."""
    return Op(name, functions=(name,), kernels={"cpu": COMPILED}, dtypes={"cpu": STEP_DTYPES})


def sequence_op(name: str, package: str, extra: tuple[str, ...] = ()) -> Op:
    """The Op of a sequence op `name` implemented on every backend: `{name}_fwd`, `{name}_bwd`
    and the `extra` functions in `package`.reference, rnnkern._C and `package`.triton."""
    return Op(name, functions=(f"{name}_fwd", f"{name}_bwd", *extra),
              kernels={"reference": f"{package}.reference", "cpu": COMPILED, "triton": f"{package}.triton"},
              dtypes={"triton": TRITON_DTYPES})


def selects_cpu(op: Op, requested: Optional[str], dtype: torch.dtype) -> bool:
    """Whether select(op, cpu, dtype, requested) is "cpu", for the per-token calls that cannot
    afford select: an environment read and a cache lookup. (With nothing forced the cpu backend
    comes first on CPU tensors.)"""
    return (_requested(requested) or "cpu") == "cpu" and _cpu_runs(op, dtype)


@functools.lru_cache(maxsize=256)
def _cpu_runs(op: Op, dtype: torch.dtype) -> bool:
    return op.refusal("cpu", _CPU, dtype) is None


def step_kernel(op: Op) -> Callable:
    """The cpu kernel of the one-token op `op` for an eager per-token call: with grad mode off,
    rnnkern._C's direct entry point (csrc/python_calls.cpp: the kernel without the dispatcher's
    argument parsing, which costs about as much as a small step); otherwise the registered op,
    which records that it has no backward."""
    name = op.functions[0]
    return op.function("cpu", name) if torch.is_grad_enabled() else _direct_entry_point(name)


@functools.cache
def _direct_entry_point(name: str) -> Callable:
    return getattr(importlib.import_module("rnnkern._C"), name)


# The answer depends only on its arguments (TRITON_INTERPRET among them, through
# device_reason) and on what this process has loaded, so it is computed once per input kind.
@functools.lru_cache(maxsize=512)
def _select(op: Op, device: torch.device, dtype: torch.dtype, requested: Optional[str], interpreted: bool) -> str:
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op.name}: unknown backend {requested!r}; expected one of {BACKENDS}")
        reason = op.refusal(requested, device, dtype)
        if reason is not None:
            raise BackendError(f"{op.name}: backend {requested!r} cannot run this input: {reason}.\n"
                               + _reasons_table(op, BACKENDS, device, dtype))
        return requested
    order = _PRIORITY.get(device.type, ("reference",))
    for name in order:
        if op.refusal(name, device, dtype) is None:
            return name
    raise BackendError(f"{op.name}: no backend can run this input.\n" + _reasons_table(op, order, device, dtype))


def _reasons_table(op: Op, names, device: torch.device, dtype: torch.dtype) -> str:
    lines = []
    for name in names:
        reason = op.refusal(name, device, dtype)
        lines.append(f"  {name}: {'available' if reason is None else reason}")
    return "backends:\n" + "\n".join(lines)
