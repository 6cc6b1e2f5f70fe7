"""linear_scan: the first-order linear recurrence h_t = a_t * h_{t-1} + b_t."""
from typing import Optional, Union

import torch
from torch import Tensor

from rnnkern import _backends
from rnnkern.ops import _checks
from rnnkern.ops._common import state_dtype

__all__ = ["linear_scan"]


LINEAR_SCAN = _backends.sequence_op("linear_scan", __name__, extra=("linear_scan_fwd_out",))


# ---------------------------------------------------------------------------------------
# torch.library ops. `backend` is a plain string argument so torch.compile keeps it fixed.


@torch.library.custom_op("rnnkern::linear_scan", mutates_args=())
def _linear_scan_op(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    forward = LINEAR_SCAN.function(backend, "linear_scan_fwd")
    return forward(a, b, initial_state, cu_seqlens, reverse)


@_linear_scan_op.register_fake
def _(a, b, initial_state, cu_seqlens, reverse, backend):
    num_sequences = a.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final_state = a.new_empty((num_sequences, a.shape[2]), dtype=state_dtype(a.dtype))
    return a.new_empty(a.shape), final_state


@torch.library.custom_op("rnnkern::linear_scan_out", mutates_args=("out",))
def _linear_scan_out_op(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    reverse: bool,
    backend: str,
    out: Tensor,
) -> Tensor:
    """The forward with h written into `out`; returns the final state. No autograd (as torch's
    out= variants): the public function refuses inputs that require grad."""
    forward = LINEAR_SCAN.function(backend, "linear_scan_fwd_out")
    return forward(a, b, initial_state, cu_seqlens, reverse, out)


@_linear_scan_out_op.register_fake
def _(a, b, initial_state, cu_seqlens, reverse, backend, out):
    num_sequences = a.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return a.new_empty((num_sequences, a.shape[2]), dtype=state_dtype(a.dtype))


@torch.library.custom_op("rnnkern::linear_scan_bwd", mutates_args=())
def _linear_scan_bwd_op(
    a: Tensor,
    h: Tensor,
    initial_state: Optional[Tensor],
    grad_h: Tensor,
    grad_final: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    backward = LINEAR_SCAN.function(backend, "linear_scan_bwd")
    return backward(a, h, initial_state, grad_h, grad_final, cu_seqlens, reverse)


@_linear_scan_bwd_op.register_fake
def _(a, h, initial_state, grad_h, grad_final, cu_seqlens, reverse, backend):
    num_sequences = a.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    grad_initial = a.new_empty((num_sequences, a.shape[2]), dtype=state_dtype(a.dtype))
    return a.new_empty(a.shape), a.new_empty(a.shape), grad_initial


def _setup_context(ctx, inputs, output):
    a, _, initial_state, cu_seqlens, reverse, backend = inputs
    h, _ = output
    ctx.save_for_backward(a, h, initial_state, cu_seqlens)
    ctx.reverse, ctx.backend = reverse, backend


def _backward(ctx, grad_h, grad_final):
    a, h, initial_state, cu_seqlens = ctx.saved_tensors
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    grad_a, grad_b, grad_initial = _linear_scan_bwd_op(
        a, h, initial_state, grad_h, grad_final, cu_seqlens, ctx.reverse, ctx.backend
    )
    return grad_a, grad_b, (grad_initial if initial_state is not None else None), None, None, None


_linear_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public function.


def linear_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor] = None,
    *,
    reverse: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    output_final_state: bool = False,
    out: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """First-order linear recurrence, computed by a parallel scan.

    .. math:: h_t = a_t \\odot h_{t-1} + b_t, \\qquad h_{-1} = \\text{initial\\_state}

    Args:
        a: gates, ``(B, T, D)`` (batch, time, channels); fp16, bf16, fp32 or fp64.
        b: inputs, ``(B, T, D)``, same dtype and device as ``a``.
        initial_state: ``(B, D)`` (``(N, D)`` with ``cu_seqlens``), dtype of ``a`` or float32;
            zeros when None.
        reverse: run from the last step to the first, ``h_t = a_t * h_{t+1} + b_t``.
        cu_seqlens: int32/int64 ``(N + 1,)`` offsets of N sequences packed along time, with
            ``B == 1``, starting at 0, non-decreasing and ending at T; the recurrence
            restarts at every boundary.
        output_final_state: also return the state after each sequence's last step.
        out: a ``(B, T, D)`` tensor of ``a``'s dtype and device to write ``h`` into (and return),
            instead of a new one: on CPU a fresh output of this size costs a page fault per
            4 KiB page, often more than the scan. It must not share memory with ``a`` or ``b``,
            and like torch's ``out=`` arguments it has no autograd: with an input that requires
            grad, call it under ``torch.no_grad()``.
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (also settable
            with the ``RNNKERN_BACKEND`` environment variable); by default the fastest
            backend that supports the input.

    Returns:
        ``h`` ``(B, T, D)`` in the dtype of ``a`` (``out`` when given); with ``output_final_state`` also the final
        state ``(B, D)`` (``(N, D)`` packed) in the state dtype: float32 for fp16, bf16 and
        fp32 inputs, float64 for fp64. The state is accumulated in that dtype throughout.

    Gradients flow to ``a``, ``b`` and ``initial_state``, from ``h`` and the final state.

    Example::

        >>> a = torch.rand(2, 100, 64)            # decay per step and channel
        >>> b = torch.randn(2, 100, 64)
        >>> h, last = rnnkern.linear_scan(a, b, output_final_state=True)
        >>> h2 = rnnkern.linear_scan(a, b, initial_state=last)  # continue the sequences
    """
    _validate(a, b, initial_state, reverse, cu_seqlens)
    if out is not None:
        _checks.out("linear_scan", out, "a", a, "(B, T, D)", {"a": a, "b": b}, (a, b, initial_state))
    name = _backends.select(LINEAR_SCAN, a.device, a.dtype, backend)
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype(a.dtype)).contiguous()
    if out is not None:
        h, final_state = out, _linear_scan_out_op(a, b, initial_state, cu_seqlens, reverse, name, out)
    else:
        h, final_state = _linear_scan_op(a, b, initial_state, cu_seqlens, reverse, name)
    return (h, final_state) if output_final_state else h


def _validate(a, b, initial_state, reverse, cu_seqlens) -> None:
    _checks.sequence("a", a, "(B, T, D)", time_dim=1)
    _checks.like("b", b, "a", a, "(B, T, D)")
    _checks.flag("reverse", reverse)
    num_sequences = a.shape[0]
    if cu_seqlens is not None:
        num_sequences = _checks.cu_seqlens(cu_seqlens, a, total=a.shape[1])
    if initial_state is not None:
        _checks.state("initial_state", initial_state, a, (num_sequences, a.shape[2]), state_dtype(a.dtype))
