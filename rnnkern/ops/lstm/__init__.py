"""LSTM: lstm_layer (a whole sequence, one layer and direction) and lstm_cell (one step)."""
from typing import Optional

import torch
from torch import Tensor

from rnnkern import _backends
from rnnkern.ops import _checks
from rnnkern.ops._common import state_dtype, weight_grad, zeros_if_none
from rnnkern.ops._projection import input_projection
from rnnkern.ops._sequences import previous_states, takes_step_kernel

__all__ = ["lstm_layer", "lstm_cell"]


LSTM_LAYER = _backends.sequence_op("lstm_layer", __name__)
# The one-token kernel lstm_layer takes for T = 1 without autograd (see _sequences.takes_step_kernel).
LSTM_STEP = _backends.step_op("lstm_step")
LSTM_STACK_STEP = _backends.step_op("lstm_stack_step")  # lstm_step through every layer in one call


# ---------------------------------------------------------------------------------------
# torch.library ops over the recurrence; the input projection stays outside (one GEMM).


@torch.library.custom_op("rnnkern::lstm_layer", mutates_args=())
def _lstm_layer_op(
    gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor],
    reverse: bool, training: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    forward = LSTM_LAYER.function(backend, "lstm_layer_fwd")
    return forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, training)


@_lstm_layer_op.register_fake
def _(gx, h0, c0, w_hh, w_hr, lengths, reverse, training, backend):
    batch, steps, _ = gx.shape
    hidden, acc = c0.shape[1], state_dtype(gx.dtype)
    workspace = ((batch, steps, 4 * hidden), (batch, steps, hidden)) if training else ((0,), (0,))
    return (gx.new_empty(batch, steps, h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            gx.new_empty(workspace[0], dtype=acc), gx.new_empty(workspace[1], dtype=acc))


@torch.library.custom_op("rnnkern::lstm_layer_bwd", mutates_args=())
def _lstm_layer_bwd_op(
    w_hh: Tensor, w_hr: Optional[Tensor], c0: Tensor, gates: Tensor, cells: Tensor, grad_y: Tensor,
    grad_h_n: Tensor, grad_c_n: Tensor, lengths: Optional[Tensor], reverse: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backward = LSTM_LAYER.function(backend, "lstm_layer_bwd")
    return backward(w_hh, w_hr, c0, gates, cells, grad_y, grad_h_n, grad_c_n, lengths, reverse)


@_lstm_layer_bwd_op.register_fake
def _(w_hh, w_hr, c0, gates, cells, grad_y, grad_h_n, grad_c_n, lengths, reverse, backend):
    return gates.new_empty(gates.shape), gates.new_empty(grad_y.shape), gates.new_empty(grad_h_n.shape), \
        gates.new_empty(c0.shape)


def _setup_context(ctx, inputs, output):
    gx, h0, c0, w_hh, w_hr, lengths, reverse, training, backend = inputs
    y, _, _, gates, cells = output
    ctx.mark_non_differentiable(gates, cells)
    ctx.set_materialize_grads(False)  # no zero tensors for the workspace outputs' gradients
    ctx.save_for_backward(h0, c0, w_hh, w_hr, lengths, y, gates, cells)
    ctx.reverse, ctx.training, ctx.backend = reverse, training, backend


def _backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    h0, c0, w_hh, w_hr, lengths, y, gates, cells = ctx.saved_tensors
    if not ctx.training:
        raise RuntimeError("lstm_layer ran with training=False; it kept nothing to differentiate")
    d_gates, d_h, d_h0, d_c0 = _lstm_layer_bwd_op(
        w_hh, w_hr, c0, gates, cells, zeros_if_none(grad_y, y), zeros_if_none(grad_h_n, h0),
        zeros_if_none(grad_c_n, c0), lengths, ctx.reverse, ctx.backend,
    )
    h_prev = previous_states(y, h0, lengths, ctx.reverse)  # (B, T, P)
    d_w_hh = weight_grad(d_gates, h_prev, w_hh)
    d_w_hr = None
    if w_hr is not None:
        m = (gates.chunk(4, dim=2)[3] * cells.tanh()).to(y.dtype)  # (B, T, H) as the GEMM saw it
        d_w_hr = weight_grad(d_h, m, w_hr)
    return d_gates.to(y.dtype), d_h0.to(h0.dtype), d_c0.to(c0.dtype), d_w_hh, d_w_hr, None, None, None, None


_lstm_layer_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public functions.


def lstm_layer(
    x: Tensor,
    hx: Optional[tuple[Tensor, Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer in one direction over a whole batch-first sequence.

    With torch.nn's weights and gate order (i, f, g, o), for each step t:

    .. math::
        i, f, g, o = \\sigma, \\sigma, \\tanh, \\sigma(x_t W_{ih}^T + b_{ih} + h_{t-1} W_{hh}^T + b_{hh}) \\\\
        c_t = f \\odot c_{t-1} + i \\odot g, \\qquad h_t = o \\odot \\tanh(c_t)\\ (W_{hr}^T \\text{ if given})

    Args:
        x: ``(B, T, I)``; fp16, bf16, fp32 (fp64 on reference and cpu).
        hx: ``(h0, c0)`` with h0 ``(B, P)`` and c0 ``(B, H)``, or None for zeros.
        w_ih: ``(4H, I)``; w_hh: ``(4H, P)``; b_ih, b_hh: ``(4H,)`` or None.
        w_hr: ``(P, H)`` projection (torch.nn's ``proj_size``), or None (then P = H).
        lengths: ``(B,)`` int steps per sequence, any order: sequence b stops after
            ``lengths[b]`` steps, its outputs past the end are zero and its final state is
            the one at its own last step.
        reverse: run each sequence from its own last valid step back to the first.
        backend: force a backend (see :func:`rnnkern.linear_scan`).

    Returns:
        ``y`` ``(B, T, P)`` and ``(h_T, c_T)`` ``(B, P)``, ``(B, H)``, all in x's dtype. Gate
        math and the cell state run in fp32 for fp16/bf16 inputs.

    Example::

        >>> lstm = torch.nn.LSTM(32, 64, batch_first=True)
        >>> x = torch.randn(8, 100, 32)
        >>> y, (h, c) = rnnkern.lstm_layer(x, None, lstm.weight_ih_l0, lstm.weight_hh_l0,
        ...                                lstm.bias_ih_l0, lstm.bias_hh_l0)
    """
    h0, c0, lengths = _validate(x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    name = _backends.select(LSTM_LAYER, x.device, x.dtype, backend)
    training = _checks.keeps_grad((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    if w_hr is None and takes_step_kernel(LSTM_STEP, name, x, lengths, training):
        step = LSTM_STEP.function(name, "lstm_step")
        y, h_n, c_n = step(x, h0, c0, w_ih, w_hh, b_ih, b_hh)  # (B, 1, H), (B, H)
        return y, (h_n, c_n)
    gx = input_projection(x, w_ih, _combined_bias(b_ih, b_hh), name)  # (B, T, 4H)
    y, h_n, c_n, _, _ = _lstm_layer_op(gx, h0, c0, w_hh, w_hr, lengths, reverse, training, name)
    return y, (h_n, c_n)


def lstm_cell(
    x: Tensor,
    hx: Optional[tuple[Tensor, Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step: x ``(B, I)``, hx ``(h, c)`` ``(B, H)`` each or None; returns ``(h', c')``."""
    _checks.tensor("x", x, ndim=2, shape_doc="(B, I)")
    _, (h, c) = lstm_layer(x[:, None], hx, w_ih, w_hh, b_ih, b_hh, backend=backend)
    return h, c


def _combined_bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    if b_ih is None or b_hh is None:
        return b_ih if b_hh is None else b_hh
    return b_ih + b_hh


def _validate(x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
    """Checks every argument; returns (h0, c0, lengths) with zeros for a missing state."""
    batch, steps, features = _checks.sequence("x", x, "(B, T, I)", time_dim=1)
    _checks.tensor("w_hh", w_hh, ndim=2, shape_doc="(4H, P)")
    if w_hh.shape[0] % 4:
        raise ValueError(f"w_hh must have shape (4H, P), got {tuple(w_hh.shape)} (first dim not a multiple of 4)")
    hidden, proj = w_hh.shape[0] // 4, w_hh.shape[1]
    _checks.parameter("w_ih", w_ih, (4 * hidden, features), x)
    _checks.parameter("w_hh", w_hh, (4 * hidden, proj), x)
    for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
        if bias is not None:
            _checks.parameter(name, bias, (4 * hidden,), x)
    if w_hr is not None:
        _checks.parameter("w_hr", w_hr, (proj, hidden), x)
    elif proj != hidden:
        raise ValueError(f"w_hh has {proj} columns but the hidden size is {hidden}: pass w_hr ({proj}, {hidden})")
    _checks.flag("reverse", reverse)
    if lengths is not None:
        lengths = _checks.lengths(lengths, batch, steps, x.device)
    if hx is None:
        return x.new_zeros(batch, proj), x.new_zeros(batch, hidden), lengths
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"hx must be a tuple (h0, c0) or None, got {type(hx).__name__}")
    _checks.parameter("h0", hx[0], (batch, proj), x)
    _checks.parameter("c0", hx[1], (batch, hidden), x)
    return hx[0], hx[1], lengths
