"""mamba_chunk_scan: Mamba-2's chunked state-space-duality (SSD) scan."""
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkern import _backends
from rnnkern.ops import _checks
from rnnkern.ops._common import state_dtype
from rnnkern.ops.mamba_chunk_scan.packed import sequence_final_states, sequence_index
from rnnkern.ops.mamba_chunk_scan.reference import num_chunks

__all__ = ["MAMBA_CHUNK_SCAN", "mamba_chunk_scan"]

MAMBA_CHUNK_SCAN = _backends.sequence_op("mamba_chunk_scan", __name__)


# ---------------------------------------------------------------------------------------
# torch.library ops. dt arrives biased, softplus'd and clamped, in the state dtype; D as (h, p).


@torch.library.custom_op("rnnkern::mamba_chunk_scan", mutates_args=())
def _chunk_scan_op(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    initial_states: Optional[Tensor], seq_idx: Optional[Tensor], chunk_size: int, keep_chunk_states: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    forward = MAMBA_CHUNK_SCAN.function(backend, "mamba_chunk_scan_fwd")
    return forward(x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_size, keep_chunk_states)


@_chunk_scan_op.register_fake
def _(x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_size, keep_chunk_states, backend):
    batch, length, heads, dim = x.shape
    acc = state_dtype(x.dtype)
    states = (batch, heads, dim, B.shape[3])
    chunks = (batch, num_chunks(length, chunk_size), *states[1:]) if keep_chunk_states else (0,)
    return x.new_empty(x.shape), x.new_empty(states, dtype=acc), x.new_empty(chunks, dtype=acc)


@torch.library.custom_op("rnnkern::mamba_chunk_scan_bwd", mutates_args=())
def _chunk_scan_bwd_op(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    initial_states: Optional[Tensor], seq_idx: Optional[Tensor], chunk_size: int, chunk_states: Tensor,
    grad_out: Tensor, grad_final_states: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    backward = MAMBA_CHUNK_SCAN.function(backend, "mamba_chunk_scan_bwd")
    return backward(x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_size, chunk_states, grad_out,
                    grad_final_states)


@_chunk_scan_bwd_op.register_fake
def _(x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_size, chunk_states, grad_out, grad_final_states,
      backend):
    acc = state_dtype(x.dtype)

    def like(t: Optional[Tensor]) -> Tensor:
        return x.new_empty((0,) if t is None else t.shape, dtype=acc)

    return tuple(like(t) for t in (x, dt, A, B, C, D, z, initial_states))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_size, keep_chunk_states, backend = inputs
    _, _, chunk_states = output
    ctx.mark_non_differentiable(chunk_states)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_states)
    ctx.chunk_size, ctx.kept, ctx.backend = chunk_size, keep_chunk_states, backend


def _backward(ctx, grad_out, grad_final_states, _grad_chunk_states):
    x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_states = ctx.saved_tensors
    if not ctx.kept:
        raise RuntimeError("mamba_chunk_scan ran without keeping its chunk states; it has nothing to differentiate")
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if grad_final_states is None:
        grad_final_states = chunk_states.new_zeros(chunk_states.shape[:1] + chunk_states.shape[2:])
    grads = _chunk_scan_bwd_op(x, dt, A, B, C, D, z, initial_states, seq_idx, ctx.chunk_size, chunk_states,
                               grad_out, grad_final_states, ctx.backend)
    inputs = (x, dt, A, B, C, D, z, initial_states)
    cast = [None if t is None else g.to(t.dtype) for g, t in zip(grads, inputs)]
    return (*cast, None, None, None, None)


_chunk_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public function.


def mamba_chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    *,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, ...]]:
    """Mamba-2's SSD scan, with mamba_ssm's ``mamba_chunk_scan_combined`` arguments and returns.

    Per batch b, head h (reading group ``g = h // (H / G)`` of B and C) and position t:

    .. math::
        \\Delta_t = \\text{clamp}(\\text{softplus}(dt_t + dt_{bias}), \\text{dt\\_limit})
            \\ (\\text{softplus only with dt\\_softplus}) \\\\
        s_t = e^{\\Delta_t A[h]}\\, s_{t-1} + \\Delta_t\\, x_t B_t^T, \\qquad
            s_{-1} = \\text{initial\\_states} \\\\
        y_t = s_t C_t + D[h]\\, x_t, \\qquad \\text{out}_t = y_t \\cdot \\text{silu}(z_t)\\ (\\text{with z})

    with the state ``s`` ``(P, N)`` per head. The kernels split the sequence into chunks of
    ``chunk_size`` positions: within a chunk the scan is a few matrix products (the
    decay-masked ``C B^T``, the chunk's state), between chunks a short recurrence.

    Args:
        x: ``(b, l, h, p)``, fp16, bf16, fp32 or fp64; any ``l >= 1``.
        dt: ``(b, l, h)``, a float dtype, on x's device.
        A: ``(h,)`` real (negative for a decaying state). B, C: ``(b, l, g, n)``, g dividing h;
            x's dtype or float32 (used in x's dtype).
        chunk_size: positions per chunk, any ``>= 1`` (need not divide l). Results do not
            depend on it beyond rounding.
        D: ``(h, p)`` or ``(h,)``, or None. z: gate like x, or None. dt_bias: ``(h,)`` or None.
        initial_states: ``(b, h, p, n)``, the state before position 0, x's dtype or the state
            dtype; zeros when None.
        seq_idx: ``(b, l)`` int32/int64, the packed sequence each position belongs to: where it
            changes the state restarts from zero.
        cu_seqlens: ``(num_seqs + 1,)`` int32/int64 offsets of sequences packed along l (batch 1):
            ``[0, l_0, l_0 + l_1, ..., l]``. Alone it restarts the state at each boundary (seq_idx
            is derived from it without a host sync); with seq_idx, seq_idx decides the restarts.
        dt_softplus: apply softplus to ``dt + dt_bias``. dt_limit: ``(min, max)`` clamp of the
            time step after softplus; the default ``(0, inf)`` applies no clamp.
        return_final_states: also return the state after position l - 1 (of the last sequence).
        return_varlen_states: also return each packed sequence's final state (needs cu_seqlens).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (see :func:`rnnkern.linear_scan`).

    Returns:
        ``out`` ``(b, l, h, p)`` in x's dtype; with ``return_final_states`` also
        ``final_states`` ``(b, h, p, n)``; with ``return_varlen_states`` also ``varlen_states``
        ``(num_seqs, h, p, n)`` (an empty sequence's is zeros); in that order, as mamba_ssm does.
        States are in the state dtype (float32; float64 for fp64 inputs), in which the scan runs.
        Gradients flow to every tensor argument, from out and final_states; varlen_states is
        for inference (decode caches) and carries no gradient.

    Example::

        >>> x, dt = torch.randn(2, 100, 8, 16), torch.randn(2, 100, 8)
        >>> A, B, C = -torch.rand(8), torch.randn(2, 100, 1, 32), torch.randn(2, 100, 1, 32)
        >>> out, final = rnnkern.mamba_chunk_scan(x, dt, A, B, C, chunk_size=64, dt_softplus=True,
        ...                                       return_final_states=True)
    """
    _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus,
              dt_limit, return_final_states, return_varlen_states)
    name = _backends.select(MAMBA_CHUNK_SCAN, x.device, x.dtype, backend)
    acc = state_dtype(x.dtype)
    step = _time_step(dt, dt_bias, dt_softplus, dt_limit, acc)  # (b, l, h)
    if seq_idx is None and cu_seqlens is not None:
        seq_idx = sequence_index(cu_seqlens, x.shape[1])
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    keep = _checks.keeps_grad(tensors) or return_varlen_states
    out, final_states, chunk_states = _chunk_scan_op(
        x.contiguous(), step.contiguous(), A.to(acc).contiguous(), _matrix(B, x), _matrix(C, x),
        _skip(D, x.shape[3], acc), None if z is None else z.contiguous(),
        None if initial_states is None else initial_states.to(acc).contiguous(),
        None if seq_idx is None else seq_idx.to(torch.int32).contiguous(), chunk_size, keep, name,
    )
    results = (out, final_states) if return_final_states else (out,)
    if return_varlen_states:
        with torch.no_grad():
            results += (sequence_final_states(x, step, A.to(acc), B, cu_seqlens, chunk_states, chunk_size),)
    return results[0] if len(results) == 1 else results


def _time_step(dt: Tensor, dt_bias: Optional[Tensor], softplus: bool, limit: tuple, acc: torch.dtype) -> Tensor:
    """clamp(softplus(dt + dt_bias), *limit) in the state dtype, (b, l, h)."""
    step = dt.to(acc)
    if dt_bias is not None:
        step = step + dt_bias.to(acc)
    if softplus:
        step = F.softplus(step)
    if tuple(limit) != (0.0, math.inf):
        step = step.clamp(min=limit[0], max=limit[1])
    return step


def _matrix(BC: Tensor, x: Tensor) -> Tensor:
    return BC.to(x.dtype).contiguous()


def _skip(D: Optional[Tensor], dim: int, acc: torch.dtype) -> Optional[Tensor]:
    """D as (h, p): a per-head D (h,) is broadcast over p."""
    if D is None:
        return None
    D = D.to(acc)
    return (D[:, None].expand(-1, dim) if D.dim() == 1 else D).contiguous()


# ---------------------------------------------------------------------------------------
# Validation.


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus,
              dt_limit, return_final_states, return_varlen_states):
    batch, length, heads, dim = _input(x)
    _real("dt", dt, (batch, length, heads), "(b, l, h)", x)
    _real("A", A, (heads,), "(h,)", x)
    n = _input_matrices(B, C, (batch, length, heads), x)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if D is not None:
        if not isinstance(D, Tensor) or tuple(D.shape) not in ((heads, dim), (heads,)):
            shape = tuple(D.shape) if isinstance(D, Tensor) else type(D).__name__
            raise ValueError(f"D must have shape ({heads}, {dim}) (h, p) or ({heads},) (h,), got {shape}")
        _real("D", D, tuple(D.shape), "(h, p) or (h,)", x)
    if z is not None:
        _checks.like("z", z, "x", x, "(b, l, h, p)")
    if dt_bias is not None:
        _real("dt_bias", dt_bias, (heads,), "(h,)", x)
    if initial_states is not None:
        _checks.state("initial_states", initial_states, x, (batch, heads, dim, n), state_dtype(x.dtype))
    if seq_idx is not None:
        _sequence_index(seq_idx, (batch, length), x)
    if cu_seqlens is not None:
        _checks.cu_seqlens(cu_seqlens, x, length)
    _checks.flag("dt_softplus", dt_softplus)
    _checks.flag("return_final_states", return_final_states)
    _checks.flag("return_varlen_states", return_varlen_states)
    _limit(dt_limit)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states needs cu_seqlens (the packed sequences whose final states to return)")


def _input(x) -> tuple:
    _checks.tensor("x", x, ndim=4, shape_doc="(b, l, h, p)")
    _checks.float_dtype("x", x)
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have shape (b, l, h, p) with l, h, p >= 1, got {tuple(x.shape)}")
    return tuple(x.shape)


def _real(name: str, t, shape: tuple, doc: str, x: Tensor) -> None:
    """A float tensor of exactly `shape` on x's device."""
    _checks.tensor(name, t, ndim=len(shape), shape_doc=doc)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {doc}, got {tuple(t.shape)}")
    _checks.float_dtype(name, t)
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}), got {t.device}")


def _input_matrices(B, C, sizes: tuple, x: Tensor) -> int:
    """B and C are (b, l, g, n) alike, g dividing h, in x's dtype or float32; returns n."""
    batch, length, heads = sizes
    for name, BC in (("B", B), ("C", C)):
        _checks.tensor(name, BC, ndim=4, shape_doc=f"({batch}, {length}, g, n) (b, l, g, n)")
        if tuple(BC.shape[:2]) != (batch, length) or BC.shape[2] < 1 or BC.shape[3] < 1:
            raise ValueError(f"{name} must have shape ({batch}, {length}, g, n) (b, l, g, n), got {tuple(BC.shape)}")
        if heads % BC.shape[2]:
            raise ValueError(f"{name} has g={BC.shape[2]} groups, which must divide the h={heads} heads; "
                             f"got shape {tuple(BC.shape)}")
        if BC.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must be {x.dtype} or torch.float32, got {BC.dtype}")
        if BC.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {BC.device}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got B {tuple(B.shape)} and C {tuple(C.shape)}")
    return B.shape[3]


def _sequence_index(seq_idx, shape: tuple, x: Tensor) -> None:
    _checks.tensor("seq_idx", seq_idx, ndim=2, shape_doc=f"{shape} (b, l)")
    if tuple(seq_idx.shape) != shape:
        raise ValueError(f"seq_idx must have shape {shape} (b, l), got {tuple(seq_idx.shape)}")
    if seq_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_idx must be int32 or int64, got {seq_idx.dtype}")
    if seq_idx.device != x.device:
        raise ValueError(f"seq_idx must be on x's device ({x.device}), got {seq_idx.device}")


def _limit(dt_limit) -> None:
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit)):
        raise TypeError(f"dt_limit must be a (min, max) pair of floats, got {dt_limit!r}")
    if not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"dt_limit must have min <= max, got {tuple(dt_limit)}")
