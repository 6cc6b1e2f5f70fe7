"""Input validation shared by the public ops: clear errors before any kernel runs; and
`keeps_grad`, whether a call's inputs need the op to keep what its backward reads."""
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def keeps_grad(tensors: tuple[Optional[Tensor], ...]) -> bool:
    """Whether autograd records a call on `tensors` (None entries allowed): grad mode is on
    and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def tensor(name: str, x, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(x.shape)}")


def sequence(name: str, x, shape_doc: str, time_dim: int) -> tuple:
    """`x` is a float tensor of the 3-D shape `shape_doc` (e.g. "(B, T, I)") with at least one step
    along `time_dim`; returns its shape."""
    tensor(name, x, ndim=3, shape_doc=shape_doc)
    float_dtype(name, x)
    if x.shape[time_dim] < 1:
        time = shape_doc.strip("()").split(", ")[time_dim]
        raise ValueError(f"{name} must have at least one time step ({time} >= 1), got shape {tuple(x.shape)}")
    return tuple(x.shape)


def float_dtype(name: str, x: Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def same(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    """`x` has the shape, dtype and device of `ref`."""
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def like(name: str, x, ref_name: str, ref: Tensor, shape_doc: str) -> None:
    """`x` is a tensor of the form `shape_doc` with the shape, dtype and device of `ref`."""
    tensor(name, x, ref.dim(), shape_doc)
    same(name, x, ref_name, ref)


def out(op: str, x, ref_name: str, ref: Tensor, shape_doc: str, inputs: dict, differentiable: tuple) -> None:
    """An `out=` tensor: the shape, dtype and device of `ref`, sharing no memory with the tensors
    of `inputs` (name: tensor or None; checked eagerly: torch.compile cannot trace storage
    pointers), and not asked for while autograd records the call (as torch's out= arguments,
    which refuse inputs that require grad)."""
    like("out", x, ref_name, ref, shape_doc)
    for name, other in inputs.items():
        if other is not None and not torch.compiler.is_compiling() and _overlap(x, other):
            raise ValueError(f"{op}: out must not share memory with {name}")
    if keeps_grad(differentiable):
        raise RuntimeError(f"{op}: out= does not support automatic differentiation, but an input requires grad; "
                           "call it under torch.no_grad(), or without out=")


def _overlap(x: Tensor, y: Tensor) -> bool:
    """Whether the bytes x and y span in their storage intersect (x, y non-empty, same storage)."""
    if x.numel() == 0 or y.numel() == 0 or x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr():
        return False
    x_first, x_last = _byte_span(x)
    y_first, y_last = _byte_span(y)
    return x_first < y_last and y_first < x_last


def _byte_span(x: Tensor) -> tuple[int, int]:
    """[first, last) bytes of x's storage that x reads (strides are never negative)."""
    extent = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    first = x.storage_offset()
    return first * x.element_size(), (first + extent + 1) * x.element_size()


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def state(name: str, x, ref: Tensor, shape: tuple, dtype: torch.dtype) -> None:
    """A carried state: `shape`, dtype of `ref` or `dtype`, on the device of `ref`."""
    _exact_shape(name, x, shape)
    if x.dtype not in (ref.dtype, dtype):
        allowed = str(ref.dtype) if ref.dtype == dtype else f"{ref.dtype} or {dtype}"
        raise TypeError(f"{name} must be {allowed}, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {x.device}")


def cu_seqlens(cu: Tensor, x: Tensor, total: int, time: str = "T") -> int:
    """Checks packed-sequence offsets for `x`, whose `total` steps (named `time` in the messages)
    are packed along one axis with batch 1; returns the sequence count."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (N + 1,) with N >= 1, got {tuple(cu.shape)}")
    if cu.device != x.device:
        raise ValueError(f"cu_seqlens must be on {x.device}, got {cu.device}")
    if x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along time), got {x.shape[0]}")
    if torch.compiler.is_compiling():  # values are data: only checkable eagerly
        return cu.shape[0] - 1
    if cu.is_cuda:  # checked on the device: reading the values would wait for the GPU
        valid = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
        torch._assert_async(valid, f"cu_seqlens must start at 0, end at {time}={total} and be non-decreasing")
        return cu.shape[0] - 1
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at {time}={total}, got {bounds[0]} ... {bounds[-1]}")
    if any(later < earlier for earlier, later in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return cu.shape[0] - 1


def parameter(name: str, x, shape: tuple, ref: Tensor) -> None:
    """A weight or bias: exactly `shape`, with the dtype and device of `ref` (the input)."""
    _exact_shape(name, x, shape)
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the input's dtype ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the input's device ({ref.device}), got {x.device}")


def lengths(lengths, batch: int, steps: int, device: torch.device) -> Tensor:
    """Per-sequence step counts (B,) in [0, T]; returned as int64 on `device`."""
    if not isinstance(lengths, Tensor):
        raise TypeError(f"lengths must be a torch.Tensor of shape ({batch},), got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if not torch.compiler.is_compiling() and batch > 0:  # values are data: only checkable eagerly
        in_range("lengths", lengths, 0, steps, f"[0, T={steps}]")
    # host lengths for device inputs: staged at once, without waiting for the GPU's queued work
    return lengths.to(device=device, dtype=torch.int64, non_blocking=True)


def in_range(name: str, values: Tensor, low: int, high: int, doc: str) -> None:
    """Every value of `values` lies in [low, high] (`doc` says so in the error). On CUDA it is
    asserted on the device: reading the values would wait for the GPU."""
    if values.is_cuda:
        torch._assert_async(((values >= low) & (values <= high)).all(), f"{name} must lie in {doc}")
        return
    smallest, largest = int(values.min()), int(values.max())
    if smallest < low or largest > high:
        raise ValueError(f"{name} must lie in {doc}, got values in [{smallest}, {largest}]")


def _exact_shape(name: str, x, shape: tuple) -> None:
    """`x` is a tensor of exactly `shape` (the message is only built for an error)."""
    if isinstance(x, Tensor) and tuple(x.shape) == tuple(shape):
        return
    doc = "(" + ", ".join(str(s) for s in shape) + ")"
    tensor(name, x, len(shape), doc)
    raise ValueError(f"{name} must have shape {doc}, got {tuple(x.shape)}")
