"""Pure-PyTorch LSTM recurrence: the ground truth the kernels are tested against.

The input projection gx = x W_ih^T + b_ih + b_hh is computed outside (one GEMM); per step,
with torch.nn's gate order (i, f, g, o):

    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of  gx_t + h_{t-1} W_hh^T
    c_t = f * c_{t-1} + i * g
    m_t = o * tanh(c_t)
    h_t = m_t             or, with a projection W_hr (P, H),  h_t = m_t W_hr^T

Gate math and the cell state c run in the state dtype (fp32 for fp16/bf16); h is kept in
the input dtype, since it is both the output y_t and the operand of the next GEMM. Steps
past lengths[b] leave sequence b's state alone and output zeros, in y and in the saved
gates and cells alike (the weight gradients multiply them by zeros there, so they must be
finite).

The backward walks the steps in the opposite order and returns the gradients of the
pre-activation gates (B, T, 4H) and of every h_t (B, T, P), from which the caller forms
the weight gradients with one GEMM each.
"""
from typing import Optional

import torch
from torch import Tensor

from rnnkern.ops._common import state_dtype
from rnnkern.ops._sequences import flip_valid, full_lengths, stack_steps


def lstm_layer_fwd(
    gx: Tensor,  # (B, T, 4H) input projection, biases included
    h0: Tensor,  # (B, P)
    c0: Tensor,  # (B, H)
    w_hh: Tensor,  # (4H, P)
    w_hr: Optional[Tensor],  # (P, H)
    lengths: Optional[Tensor],  # (B,) int64
    reverse: bool,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns y (B, T, P), h_n (B, P), c_n (B, H) in the input dtype, and the activated
    gates (B, T, 4H) and cell states (B, T, H) in the state dtype, for the backward (empty
    tensors when not `training`: nothing is kept)."""
    batch, steps, _ = gx.shape
    acc = state_dtype(gx.dtype)
    lengths = lengths if lengths is not None else full_lengths(batch, steps, gx.device)
    if reverse:
        gx = flip_valid(gx, lengths)
    h, c = h0, c0.to(acc)
    ys, gates, cells = [], [], []
    for s in range(steps):
        active = (s < lengths.to(gx.device))[:, None]  # (B, 1)
        pre = gx[:, s].to(acc) + h.to(acc) @ w_hh.to(acc).T  # (B, 4H)
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c + i * g
        h_new = _output(o * c_new.tanh(), w_hr, gx.dtype)
        h = torch.where(active, h_new, h)
        c = torch.where(active, c_new, c)
        ys.append(torch.where(active, h_new, 0))
        gates.append(torch.where(active, torch.cat([i, f, g, o], dim=1), 0))
        cells.append(torch.where(active, c_new, 0))
    y, gates, cells = stack_steps(ys, (gates, cells), lengths, reverse, training)
    return y, h, c.to(gx.dtype), gates, cells


def _output(m: Tensor, w_hr: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """h_t from m_t: m_t itself, or its projection (m_t rounded to the input dtype first,
    as it is when it enters a GEMM in that dtype)."""
    if w_hr is None:
        return m.to(dtype)
    return (m.to(dtype).to(m.dtype) @ w_hr.to(m.dtype).T).to(dtype)


def lstm_layer_bwd(
    w_hh: Tensor,  # (4H, P)
    w_hr: Optional[Tensor],  # (P, H)
    c0: Tensor,  # (B, H)
    gates: Tensor,  # (B, T, 4H) activated, state dtype
    cells: Tensor,  # (B, T, H) state dtype
    grad_y: Tensor,  # (B, T, P)
    grad_h_n: Tensor,  # (B, P)
    grad_c_n: Tensor,  # (B, H)
    lengths: Optional[Tensor],
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns, in the state dtype: d(pre-activation gates) (B, T, 4H), dL/dh_t (B, T, P)
    (each step's total, recurrent part included), dL/dh0 (B, P) and dL/dc0 (B, H)."""
    batch, steps, _ = gates.shape
    acc = gates.dtype
    lengths = lengths if lengths is not None else full_lengths(batch, steps, gates.device)
    if reverse:
        gates, cells, grad_y = (flip_valid(x, lengths) for x in (gates, cells, grad_y))
    dh, dc = grad_h_n.to(acc), grad_c_n.to(acc)
    d_gates, d_hs = [None] * steps, [None] * steps
    for s in reversed(range(steps)):
        active = (s < lengths.to(gates.device))[:, None]  # (B, 1)
        dh_t = dh + grad_y[:, s].to(acc)
        dm = dh_t @ w_hr.to(acc) if w_hr is not None else dh_t  # (B, H)
        i, f, g, o = gates[:, s].chunk(4, dim=1)
        c_prev = cells[:, s - 1] if s > 0 else c0.to(acc)
        tanh_c = cells[:, s].tanh()
        dc_t = dc + dm * o * (1 - tanh_c * tanh_c)
        d_pre = torch.cat([dc_t * g * i * (1 - i), dc_t * c_prev * f * (1 - f),
                           dc_t * i * (1 - g * g), dm * tanh_c * o * (1 - o)], dim=1)  # (B, 4H)
        d_pre = torch.where(active, d_pre, 0)
        d_gates[s], d_hs[s] = d_pre, torch.where(active, dh_t, 0)
        dh = torch.where(active, d_pre @ w_hh.to(acc), dh)
        dc = torch.where(active, dc_t * f, dc)
    d_gates, d_hs = torch.stack(d_gates, dim=1), torch.stack(d_hs, dim=1)
    if reverse:
        d_gates, d_hs = flip_valid(d_gates, lengths), flip_valid(d_hs, lengths)
    return d_gates, d_hs, dh, dc
