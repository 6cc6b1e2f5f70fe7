"""selective_scan: Mamba's selective state-space scan, and its one-step decoding form."""
from typing import Optional, Union

import torch
from torch import Tensor

from rnnkern import _backends
from rnnkern.ops import _checks
from rnnkern.ops._common import state_dtype
from rnnkern.ops.selective_scan.reference import CHUNK, num_chunks

__all__ = ["CHUNK", "selective_scan", "selective_state_update", "state_dtype"]


SELECTIVE_SCAN = _backends.sequence_op("selective_scan", __name__)
# One decode step: a C++ kernel on the cpu backend (fp32/fp64), a Triton kernel on the triton backend.
SELECTIVE_STATE_UPDATE = _backends.Op(
    "selective_state_update", functions=("selective_state_update",),
    kernels={"reference": f"{__name__}.reference", "cpu": _backends.COMPILED, "triton": f"{__name__}.triton_update"},
    dtypes={"cpu": _backends.STEP_DTYPES, "triton": _backends.TRITON_DTYPES},
)


# ---------------------------------------------------------------------------------------
# torch.library ops. B and C arrive normalised: (Bt, G, N, L) or fixed (Dm, N).


@torch.library.custom_op("rnnkern::selective_scan", mutates_args=())
def _selective_scan_op(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], delta_softplus: bool, initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor], training: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    forward = SELECTIVE_SCAN.function(backend, "selective_scan_fwd")
    return forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, training)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, training, backend):
    batch, dims, length = u.shape
    acc = state_dtype(u.dtype)
    checkpoints = (batch, dims, num_chunks(length), A.shape[1]) if training else (0,)
    return u.new_empty(u.shape), u.new_empty(_last_state_shape(u, A, cu_seqlens), dtype=acc), \
        u.new_empty(checkpoints, dtype=acc)


def _last_state_shape(u: Tensor, A: Tensor, cu_seqlens: Optional[Tensor]) -> tuple:
    """(Bt, Dm, N), or (S, Dm, N) for S packed sequences."""
    sequences = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return sequences, u.shape[1], A.shape[1]


@torch.library.custom_op("rnnkern::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd_op(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], delta_softplus: bool, initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor], checkpoints: Tensor, grad_out: Tensor, grad_last_state: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    backward = SELECTIVE_SCAN.function(backend, "selective_scan_bwd")
    return backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, checkpoints,
                    grad_out, grad_last_state)


@_selective_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, checkpoints, grad_out,
      grad_last_state, backend):
    acc = state_dtype(u.dtype)

    def like(x: Optional[Tensor], shape=None) -> Tensor:
        return u.new_empty((0,) if x is None else (shape or x.shape), dtype=acc)

    return (like(u), like(u), like(A), like(B), like(C), like(D), like(z), like(delta_bias),
            like(u, grad_last_state.shape))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, training, backend = inputs
    _, _, checkpoints = output
    ctx.mark_non_differentiable(checkpoints)
    ctx.set_materialize_grads(False)  # no zero tensors for the workspace outputs' gradients
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, checkpoints)
    ctx.delta_softplus, ctx.training, ctx.backend = delta_softplus, training, backend


def _backward(ctx, grad_out, grad_last_state, _grad_checkpoints):
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, checkpoints = ctx.saved_tensors
    if not ctx.training:
        raise RuntimeError("selective_scan ran with training=False; it kept nothing to differentiate")
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    if grad_last_state is None:
        grad_last_state = u.new_zeros(_last_state_shape(u, A, cu_seqlens), dtype=state_dtype(u.dtype))
    grads = _selective_scan_bwd_op(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, cu_seqlens, checkpoints, grad_out,
        grad_last_state, ctx.backend,
    )
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    cast = [None if x is None else g.to(x.dtype) for g, x in zip(grads, inputs)]
    return (*cast[:8], None, cast[8], None, None, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


# In the multi-head form (see reference.selective_state_update), which the single-head form is a view of.
@torch.library.custom_op("rnnkern::selective_state_update", mutates_args=("state",))
def _selective_state_update_op(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, state_batch_indices: Optional[Tensor],
    backend: str,
) -> Tensor:
    update = SELECTIVE_STATE_UPDATE.function(backend, "selective_state_update")
    return update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


@_selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, backend):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------
# Public functions.


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Selective state-space scan (Mamba's S6), with mamba_ssm's ``selective_scan_fn`` arguments.

    For every batch b, channel d and state index n, with channel d reading group
    ``g = d // (D / G)`` of B and C:

    .. math::
        \\Delta_t = \\text{softplus}(\\delta_t + \\delta_{bias})\\ (\\text{or without softplus}) \\\\
        x_t[n] = e^{\\Delta_t A[d, n]}\\, x_{t-1}[n] + \\Delta_t B_t[g, n]\\, u_t, \\qquad
        x_{-1} = \\text{initial\\_state} \\\\
        y_t = \\textstyle\\sum_n C_t[g, n]\\, x_t[n] + D[d]\\, u_t, \\qquad
        \\text{out}_t = y_t \\cdot \\text{silu}(z_t)\\ (\\text{when z is given})

    Args:
        u: input ``(B, D, L)`` (batch, channels, length); fp16, bf16, fp32 or fp64.
        delta: time steps ``(B, D, L)``, same dtype and device as ``u``.
        A: state matrix ``(D, N)``, real (any float dtype; used in the state dtype).
        B, C: input and output matrices, each ``(B, N, L)``, grouped ``(B, G, N, L)`` (G divides D)
            or fixed over time and batch ``(D, N)``; dtype of ``u`` or float32.
        D: skip connection ``(D,)`` or None. z: gate ``(B, D, L)`` like ``u``, or None.
        delta_bias: ``(D,)`` added to delta, or None. delta_softplus: apply softplus to delta.
        return_last_state: also return the state after the last step.
        initial_state: ``(B, D, N)`` (``(S, D, N)`` with ``cu_seqlens``) in u's dtype or the state
            dtype; zeros when None.
        cu_seqlens: int32/int64 ``(S + 1,)`` offsets ``[0, l_0, l_0 + l_1, ..., L]`` of S sequences
            packed along L, with ``B == 1``; on u's device, starting at 0, non-decreasing and
            ending at L (checked on the host for CPU tensors, asynchronously on the GPU). The
            recurrence restarts at every sequence: from ``initial_state[i]`` (or zeros), with no
            value or gradient crossing a boundary. Empty sequences are allowed: their last state
            is their initial state.
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (see
            :func:`rnnkern.linear_scan`).

    Returns:
        ``out`` ``(B, D, L)`` in u's dtype; with ``return_last_state`` also the last state
        ``(B, D, N)`` (``(S, D, N)`` packed: each sequence's) in the state dtype (float32; float64 for fp64 inputs), in which the
        recurrence runs throughout. Gradients flow to every tensor argument, from both.

    Example::

        >>> u, delta = torch.randn(2, 64, 100), torch.rand(2, 64, 100)
        >>> A = -torch.rand(64, 16)
        >>> B, C = torch.randn(2, 16, 100), torch.randn(2, 16, 100)
        >>> out, last = rnnkern.selective_scan(u, delta, A, B, C, return_last_state=True)
        >>> out2 = rnnkern.selective_scan(u, delta, A, B, C, initial_state=last)  # continue
        >>> cu_seqlens = torch.tensor([0, 30, 100])      # sequences of 30 and 70 steps, packed
        >>> out, last = rnnkern.selective_scan(u[:1], delta[:1], A, B[:1], C[:1], return_last_state=True,
        ...                                    cu_seqlens=cu_seqlens)  # last (2, 64, 16)
    """
    _validate_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, cu_seqlens)
    name = _backends.select(SELECTIVE_SCAN, u.device, u.dtype, backend)
    acc = state_dtype(u.dtype)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    training = _checks.keeps_grad(tensors)
    out, last_state, _ = _selective_scan_op(
        u.contiguous(), delta.contiguous(), A.to(acc).contiguous(), _variable(B), _variable(C),
        _vector(D, acc), None if z is None else z.contiguous(), _vector(delta_bias, acc), delta_softplus,
        None if initial_state is None else initial_state.to(acc).contiguous(), cu_seqlens, training, name,
    )
    return (out, last_state) if return_last_state else out


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    *,
    state_batch_indices: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """One decoding step of :func:`selective_scan`, updating ``state`` in place; with
    mamba_ssm's arguments, in its single-head (Mamba) and multi-head (Mamba-2) forms.

    For every row b, channel (or head h and head position p) and state index n, with the
    channel reading group g of B and C:

    .. math::
        \\Delta = \\text{softplus}(dt + dt_{bias})\\ (\\text{or without softplus}), \\qquad
        \\text{state}[n] \\leftarrow e^{\\Delta A[n]}\\, \\text{state}[n] + \\Delta\\, B[g, n]\\, x \\\\
        y = \\textstyle\\sum_n C[g, n]\\, \\text{state}[n] + D\\, x, \\qquad y \\leftarrow y \\cdot \\text{silu}(z)

    Args:
        state: float32 (float64 for fp64 inputs) or x's dtype; overwritten with the new state.
            Single-head ``(B, D, N)``, multi-head ``(B, H, P, N)``; with ``state_batch_indices``
            a pool ``(S, D, N)`` or ``(S, H, P, N)`` of S slots.
        x, dt: single-head ``(B, D)`` (channels), multi-head ``(B, H, P)`` (heads, head dim);
            z: like x, or None; all of one dtype and device.
        A: single-head ``(D, N)``; multi-head ``(H, P, N)`` with any strides (Mamba-2's per-head
            scalar expanded over P and N, strides ``(1, 0, 0)``, is read as it is, one exp per
            (h, p)).
        B, C: ``(B, N)`` or grouped ``(B, G, N)``, G dividing D (single-head: channel d reads
            group ``d // (D / G)``) or H (multi-head: head h reads group ``h // (H / G)``).
        D, dt_bias: single-head ``(D,)``; multi-head ``(H, P)`` or a per-head ``(H,)``; or None.
        state_batch_indices: ``(B,)`` int32 or int64, or None (row b updates slot b). Row b reads
            and updates slot ``state_batch_indices[b]`` of the pool and no other; -1 marks a
            padding row, whose y is 0 and which touches no slot. Slots of two rows must differ.
            Values outside [-1, S) are a ValueError (checked eagerly; on CUDA tensors asserted
            on the device, without a host sync; not checked under torch.compile).
        backend: as :func:`selective_scan`'s. The cpu backend runs a C++ kernel for fp32/fp64
            (fp16/bf16 CPU inputs go to the reference unless cpu is forced, which is then an
            error); the triton backend a Triton kernel (fp16, bf16, fp32).

    Returns:
        ``y`` shaped like x, in x's dtype. Calling it for t = 0, 1, ... on the columns of a
        sequence gives :func:`selective_scan`'s output and last state (multi-head: the scan of
        the H P channels ``h P + p``).

    Example::

        >>> state = torch.zeros(2, 64, 16)              # (B, D, N), e.g. a scan's last state
        >>> x, dt = torch.randn(2, 64), torch.randn(2, 64)
        >>> B, C = torch.randn(2, 16), torch.randn(2, 16)
        >>> y = rnnkern.selective_state_update(state, x, dt, -torch.rand(64, 16), B, C, dt_softplus=True)

    Mamba-2 (8 heads of 32, one group, N = 64), two requests in a pool of 4 slots::

        >>> pool = torch.zeros(4, 8, 32, 64)            # (S, H, P, N)
        >>> x, dt = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
        >>> A = (-torch.rand(8))[:, None, None].expand(8, 32, 64)  # a scalar per head
        >>> B, C = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
        >>> D, dt_bias = torch.randn(8), torch.randn(8)
        >>> y = rnnkern.selective_state_update(pool, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True,
        ...                                    state_batch_indices=torch.tensor([3, 1]))  # slots 3 and 1
    """
    _validate_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    name = _backends.select(SELECTIVE_STATE_UPDATE, x.device, x.dtype, backend)
    args = (*_head_form(state, x, dt, A, B, C, D, z, dt_bias), dt_softplus, state_batch_indices)
    if torch.compiler.is_compiling():
        return _selective_state_update_op(*args, name).view(x.shape)
    # eagerly the kernel runs directly: the op wrapper (kept for torch.compile) costs more
    # than the step itself
    return SELECTIVE_STATE_UPDATE.function(name, "selective_state_update")(*args).view(x.shape)


# ---------------------------------------------------------------------------------------
# Normalisation and validation.


def _variable(BC: Tensor) -> Tensor:
    """(Bt, N, L) -> (Bt, 1, N, L); grouped (Bt, G, N, L) and fixed (Dm, N) stay."""
    return (BC[:, None] if BC.dim() == 3 else BC).contiguous()


def _grouped(BC: Tensor) -> Tensor:
    """(Bt, N) -> (Bt, 1, N); grouped (Bt, G, N) stays."""
    return BC[:, None] if BC.dim() == 2 else BC


def _head_form(state, x, dt, A, B, C, D, z, dt_bias) -> tuple:
    """The step's tensors in the multi-head form the kernels take, as views: a single-head step
    of D channels and G groups is G heads of D / G (channel h D/G + p reads group h); A, B, C,
    D and dt_bias in the state dtype, D and dt_bias per (head, position)."""
    acc = state_dtype(x.dtype)
    B, C = _grouped(B).to(acc), _grouped(C).to(acc)
    if x.dim() == 2:
        heads = (B.shape[1], -1)
        state, x, dt, z = (None if t is None else t.unflatten(1, heads) for t in (state, x, dt, z))
        A, D, dt_bias = (None if t is None else t.unflatten(0, heads) for t in (A, D, dt_bias))
    return state, x, dt, A.to(acc), B, C, _per_head(D, x, acc), z, _per_head(dt_bias, x, acc)


def _per_head(v: Optional[Tensor], x: Tensor, acc: torch.dtype) -> Optional[Tensor]:
    """D or dt_bias (H, P) in acc; a per-head (H,) broadcast over P."""
    if v is None:
        return None
    v = v.to(acc)
    return v[:, None].expand(x.shape[1:]) if v.dim() == 1 else v


def _vector(v: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    return None if v is None else v.to(acc).contiguous()


def _validate_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, cu_seqlens):
    batch, dims, length = _checks.sequence("u", u, "(B, D, L)", time_dim=2)
    _checks.like("delta", delta, "u", u, "(B, D, L)")
    n = _state_matrix(A, dims, u)
    for name, BC in (("B", B), ("C", C)):
        _input_matrix(name, BC, (batch, dims, n, length), u)
    _same_groups(B, C, variable_ndim=3)
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        _channel_vector(name, v, dims, u)
    if z is not None:
        _checks.like("z", z, "u", u, "(B, D, L)")
    _checks.flag("delta_softplus", delta_softplus)
    _checks.flag("return_last_state", return_last_state)
    sequences = batch if cu_seqlens is None else _checks.cu_seqlens(cu_seqlens, u, total=length, time="L")
    if initial_state is not None:
        _checks.state("initial_state", initial_state, u, (sequences, dims, n), state_dtype(u.dtype))


def _validate_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    forms = "(B, D) (single-head) or (B, H, P) (multi-head)"
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape {forms}, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape {forms}, got shape {tuple(x.shape)}")
    _checks.float_dtype("x", x)
    doc = "(B, D)" if x.dim() == 2 else "(B, H, P)"
    _checks.like("dt", dt, "x", x, doc)
    if z is not None:
        _checks.like("z", z, "x", x, doc)
    slots = _slots(state, x.shape[0], state_batch_indices)
    if x.dim() == 2:
        n = _validate_channels_update(x, A, B, C, D, dt_bias)
    else:
        n = _validate_heads_update(x, A, B, C, D, dt_bias)
    _checks.state("state", state, x, (slots, *x.shape[1:], n), state_dtype(x.dtype))
    _same_groups(B, C, variable_ndim=2)
    _checks.flag("dt_softplus", dt_softplus)
    _state_batch_indices(state_batch_indices, x, slots)


def _validate_channels_update(x, A, B, C, D, dt_bias) -> int:
    """The single-head form's A, B, C, D and dt_bias; returns N."""
    batch, dims = x.shape
    n = _state_matrix(A, dims, x)
    for name, BC in (("B", B), ("C", C)):
        _step_matrix(name, BC, (batch, dims, n), x)
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        _channel_vector(name, v, dims, x)
    return n


def _validate_heads_update(x, A, B, C, D, dt_bias) -> int:
    """The multi-head form's A (H, P, N), B, C (Bt, G, N) and D, dt_bias (H, P) or (H,); returns N."""
    batch, heads, dim = x.shape
    _checks.tensor("A", A, ndim=3, shape_doc="(H, P, N)")
    _real("A", A)
    if A.shape[:2] != (heads, dim) or A.shape[2] < 1:
        raise ValueError(f"A must have shape (H, P, N) with (H, P)=({heads}, {dim}) (the heads of x) and N >= 1, "
                         f"got {tuple(A.shape)}")
    _device("A", A, x)
    n = A.shape[2]
    for name, BC in (("B", B), ("C", C)):
        doc = f"({batch}, G, {n}) (B, G, N) or ({batch}, {n}) (B, N)"
        _grouped_matrix(name, BC, doc, fixed=None, variable=(batch, n), dims=heads, ref=x, divides="H")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        _head_vector(name, v, heads, dim, x)
    return n


def _slots(state, batch: int, state_batch_indices) -> int:
    """The slots state must have: B, or with state_batch_indices the pool's (state's first size)."""
    if state_batch_indices is None or not isinstance(state, Tensor) or state.dim() == 0:
        return batch
    return state.shape[0]


def _state_batch_indices(indices, x: Tensor, slots: int) -> None:
    """None, or a (B,) int32/int64 tensor on x's device with values in [-1, slots)."""
    if indices is None:
        return
    batch = x.shape[0]
    if not isinstance(indices, Tensor):
        raise TypeError(f"state_batch_indices must be a torch.Tensor of shape ({batch},), got "
                        f"{type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"state_batch_indices must be int32 or int64, got {indices.dtype}")
    if tuple(indices.shape) != (batch,):
        raise ValueError(f"state_batch_indices must have shape ({batch},) (one slot per row of x), got "
                         f"{tuple(indices.shape)}")
    _device("state_batch_indices", indices, x)
    if not torch.compiler.is_compiling() and batch > 0:  # values are data: only checkable eagerly
        _checks.in_range("state_batch_indices", indices, -1, slots - 1,
                         f"[-1, {slots}) (-1: a padding row; else a slot of state's first dimension)")


def _state_matrix(A, dims: int, ref: Tensor) -> int:
    """A is a real (D, N) matrix on ref's device; returns N."""
    _checks.tensor("A", A, ndim=2, shape_doc="(D, N)")
    _real("A", A)
    if A.shape[0] != dims or A.shape[1] < 1:
        raise ValueError(f"A must have shape (D, N) with D={dims} (the channels of the input) and N >= 1, "
                         f"got {tuple(A.shape)}")
    _device("A", A, ref)
    return A.shape[1]


def _real(name: str, A: Tensor) -> None:
    if A.is_complex():
        raise TypeError(f"{name} must be real (float16, bfloat16, float32 or float64); complex {name} ({A.dtype}) "
                        "is not supported")
    _checks.float_dtype(name, A)


def _input_matrix(name: str, BC, sizes: tuple, u: Tensor) -> None:
    """B or C of the scan: (Bt, N, L), (Bt, G, N, L) with G dividing D, or fixed (D, N)."""
    batch, dims, n, length = sizes
    doc = f"({batch}, {n}, {length}) (B, N, L), ({batch}, G, {n}, {length}) (B, G, N, L) or ({dims}, {n}) (D, N)"
    _grouped_matrix(name, BC, doc, fixed=(dims, n), variable=(batch, n, length), dims=dims, ref=u)


def _step_matrix(name: str, BC, sizes: tuple, x: Tensor) -> None:
    """B or C of one step: (Bt, N) or (Bt, G, N) with G dividing D."""
    batch, dims, n = sizes
    doc = f"({batch}, {n}) (B, N) or ({batch}, G, {n}) (B, G, N)"
    _grouped_matrix(name, BC, doc, fixed=None, variable=(batch, n), dims=dims, ref=x)


def _grouped_matrix(name, BC, doc: str, fixed, variable: tuple, dims: int, ref: Tensor, divides: str = "D") -> None:
    """BC is `fixed`, `variable` or `variable` with a group axis after the batch; its groups
    divide `dims` (the size `divides` names)."""
    if not isinstance(BC, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {doc}, got {type(BC).__name__}")
    shape = tuple(BC.shape)
    grouped = len(shape) == len(variable) + 1 and shape[:1] + shape[2:] == variable
    if shape != fixed and shape != variable and not grouped:
        raise ValueError(f"{name} must have shape {doc}, got {shape}")
    if grouped and (shape[1] < 1 or dims % shape[1]):
        raise ValueError(f"{name} has G={shape[1]} groups, which must divide {divides}={dims}; got shape {shape}")
    if BC.dtype not in (ref.dtype, torch.float32):
        allowed = str(ref.dtype) if ref.dtype == torch.float32 else f"{ref.dtype} or torch.float32"
        raise TypeError(f"{name} must be {allowed}, got {BC.dtype}")
    _device(name, BC, ref)


def _same_groups(B: Tensor, C: Tensor, variable_ndim: int) -> None:
    """B and C, when both vary with the input, have the same number of groups (1 if ungrouped)."""
    def groups(BC: Tensor) -> int:
        return BC.shape[1] if BC.dim() == variable_ndim + 1 else 1

    if B.dim() >= variable_ndim and C.dim() >= variable_ndim and groups(B) != groups(C):
        raise ValueError(f"B and C must have the same number of groups, got B {tuple(B.shape)} and C {tuple(C.shape)}")


def _channel_vector(name: str, v, dims: int, ref: Tensor) -> None:
    """D or delta_bias: None or a real (D,) vector on ref's device."""
    if v is None:
        return
    _checks.tensor(name, v, ndim=1, shape_doc=f"({dims},)")
    if tuple(v.shape) != (dims,):
        raise ValueError(f"{name} must have shape ({dims},) (one value per channel), got {tuple(v.shape)}")
    _checks.float_dtype(name, v)
    _device(name, v, ref)


def _head_vector(name: str, v, heads: int, dim: int, ref: Tensor) -> None:
    """D or dt_bias of the multi-head form: None or a real (H, P) or per-head (H,) tensor on ref's device."""
    if v is None:
        return
    doc = f"({heads}, {dim}) (H, P) or ({heads},) (H,)"
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {doc}, got {type(v).__name__}")
    if tuple(v.shape) not in ((heads, dim), (heads,)):
        raise ValueError(f"{name} must have shape {doc}, got {tuple(v.shape)}")
    _checks.float_dtype(name, v)
    _device(name, v, ref)


def _device(name: str, x: Tensor, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the input's device ({ref.device}), got {x.device}")
