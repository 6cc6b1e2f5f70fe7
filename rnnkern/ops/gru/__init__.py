"""GRU: gru_layer (a whole sequence, one layer and direction) and gru_cell (one step)."""
from typing import Optional

import torch
from torch import Tensor

from rnnkern import _backends
from rnnkern.ops import _checks
from rnnkern.ops._common import state_dtype, weight_grad, zeros_if_none
from rnnkern.ops._projection import input_projection
from rnnkern.ops._sequences import previous_states, takes_step_kernel

__all__ = ["gru_layer", "gru_cell"]


GRU_LAYER = _backends.sequence_op("gru_layer", __name__)
# The one-token kernel gru_layer takes for T = 1 without autograd (see _sequences.takes_step_kernel).
GRU_STEP = _backends.step_op("gru_step")
GRU_STACK_STEP = _backends.step_op("gru_stack_step")  # gru_step through every layer in one call


# ---------------------------------------------------------------------------------------
# torch.library ops over the recurrence; the input projection stays outside (one GEMM).


@torch.library.custom_op("rnnkern::gru_layer", mutates_args=())
def _gru_layer_op(
    gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
    training: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    forward = GRU_LAYER.function(backend, "gru_layer_fwd")
    return forward(gx, h0, w_hh, b_hh, lengths, reverse, training)


@_gru_layer_op.register_fake
def _(gx, h0, w_hh, b_hh, lengths, reverse, training, backend):
    batch, steps, _ = gx.shape
    hidden, acc = h0.shape[1], state_dtype(gx.dtype)
    workspace = ((batch, steps, 3 * hidden), (batch, steps, hidden)) if training else ((0,), (0,))
    return (gx.new_empty(batch, steps, hidden), h0.new_empty(h0.shape),
            gx.new_empty(workspace[0], dtype=acc), gx.new_empty(workspace[1], dtype=acc))


@torch.library.custom_op("rnnkern::gru_layer_bwd", mutates_args=())
def _gru_layer_bwd_op(
    w_hh: Tensor, gates: Tensor, ghn: Tensor, h_prev: Tensor, grad_y: Tensor, grad_h_n: Tensor,
    lengths: Optional[Tensor], reverse: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    backward = GRU_LAYER.function(backend, "gru_layer_bwd")
    return backward(w_hh, gates, ghn, h_prev, grad_y, grad_h_n, lengths, reverse)


@_gru_layer_bwd_op.register_fake
def _(w_hh, gates, ghn, h_prev, grad_y, grad_h_n, lengths, reverse, backend):
    return gates.new_empty(gates.shape), gates.new_empty(gates.shape), gates.new_empty(grad_h_n.shape)


def _setup_context(ctx, inputs, output):
    gx, h0, w_hh, b_hh, lengths, reverse, training, backend = inputs
    y, _, gates, ghn = output
    ctx.mark_non_differentiable(gates, ghn)
    ctx.set_materialize_grads(False)  # no zero tensors for the workspace outputs' gradients
    ctx.save_for_backward(h0, w_hh, b_hh, lengths, y, gates, ghn)
    ctx.reverse, ctx.training, ctx.backend = reverse, training, backend


def _backward(ctx, grad_y, grad_h_n, _grad_gates, _grad_ghn):
    h0, w_hh, b_hh, lengths, y, gates, ghn = ctx.saved_tensors
    if not ctx.training:
        raise RuntimeError("gru_layer ran with training=False; it kept nothing to differentiate")
    h_prev = previous_states(y, h0, lengths, ctx.reverse)  # (B, T, H)
    d_gx, d_gh, d_h0 = _gru_layer_bwd_op(
        w_hh, gates, ghn, h_prev, zeros_if_none(grad_y, y), zeros_if_none(grad_h_n, h0), lengths,
        ctx.reverse, ctx.backend,
    )
    d_b_hh = d_gh.sum(dim=(0, 1)).to(b_hh.dtype) if b_hh is not None else None
    return (d_gx.to(y.dtype), d_h0.to(h0.dtype), weight_grad(d_gh, h_prev, w_hh), d_b_hh,
            None, None, None, None)


_gru_layer_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public functions.


def gru_layer(
    x: Tensor,
    h0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer in one direction over a whole batch-first sequence.

    With torch.nn's weights and gate order (r, z, n), for each step t:

    .. math::
        r = \\sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}), \\quad
        z = \\sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\\\
        n = \\tanh(W_{in} x_t + b_{in} + r \\odot (W_{hn} h_{t-1} + b_{hn})), \\quad
        h_t = (1 - z) \\odot n + z \\odot h_{t-1}

    Args:
        x: ``(B, T, I)``; fp16, bf16, fp32 (fp64 on reference and cpu).
        h0: ``(B, H)`` or None for zeros.
        w_ih: ``(3H, I)``; w_hh: ``(3H, H)``; b_ih, b_hh: ``(3H,)`` or None.
        lengths: ``(B,)`` int steps per sequence, any order (see :func:`lstm_layer`).
        reverse: run each sequence from its own last valid step back to the first.
        backend: force a backend (see :func:`rnnkern.linear_scan`).

    Returns:
        ``y`` ``(B, T, H)`` and ``h_T`` ``(B, H)`` in x's dtype (gate math in fp32 for
        fp16/bf16 inputs).

    Example::

        >>> gru = torch.nn.GRU(32, 64, batch_first=True)
        >>> y, h = rnnkern.gru_layer(torch.randn(8, 100, 32), None, gru.weight_ih_l0,
        ...                          gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    """
    h0, lengths = _validate(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    name = _backends.select(GRU_LAYER, x.device, x.dtype, backend)
    training = _checks.keeps_grad((x, h0, w_ih, w_hh, b_ih, b_hh))
    if takes_step_kernel(GRU_STEP, name, x, lengths, training):
        return GRU_STEP.function(name, "gru_step")(x, h0, w_ih, w_hh, b_ih, b_hh)  # (B, 1, H), (B, H)
    gx = input_projection(x, w_ih, b_ih, name)  # (B, T, 3H)
    y, h_n, _, _ = _gru_layer_op(gx, h0, w_hh, b_hh, lengths, reverse, training, name)
    return y, h_n


def gru_cell(
    x: Tensor,
    h: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """One GRU step: x ``(B, I)``, h ``(B, H)`` or None; returns h'."""
    _checks.tensor("x", x, ndim=2, shape_doc="(B, I)")
    return gru_layer(x[:, None], h, w_ih, w_hh, b_ih, b_hh, backend=backend)[1]


def _validate(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """Checks every argument; returns (h0, lengths) with zeros for a missing state."""
    batch, steps, features = _checks.sequence("x", x, "(B, T, I)", time_dim=1)
    _checks.tensor("w_hh", w_hh, ndim=2, shape_doc="(3H, H)")
    hidden = w_hh.shape[1]
    _checks.parameter("w_hh", w_hh, (3 * hidden, hidden), x)
    _checks.parameter("w_ih", w_ih, (3 * hidden, features), x)
    for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
        if bias is not None:
            _checks.parameter(name, bias, (3 * hidden,), x)
    _checks.flag("reverse", reverse)
    if lengths is not None:
        lengths = _checks.lengths(lengths, batch, steps, x.device)
    if h0 is None:
        return x.new_zeros(batch, hidden), lengths
    _checks.parameter("h0", h0, (batch, hidden), x)
    return h0, lengths
