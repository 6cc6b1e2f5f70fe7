"""Pure-PyTorch GRU recurrence: the ground truth the kernels are tested against.

The input projection gx = x W_ih^T + b_ih is computed outside (one GEMM); per step, with
torch.nn's (and cuDNN's) gate order (r, z, n):

    gh_t = h_{t-1} W_hh^T + b_hh                      (3H: r, z, n parts)
    r = sigmoid(gx_r + gh_r),  z = sigmoid(gx_z + gh_z)
    n = tanh(gx_n + r * gh_n)
    h_t = (1 - z) * n + z * h_{t-1}

Gate math runs in the state dtype (fp32 for fp16/bf16); h is kept in the input dtype, as
the output y_t and the operand of the next GEMM. Steps past lengths[b] leave sequence b's
state alone and output zeros, in y and in the saved gates alike.

The backward returns the gradients of gx (B, T, 3H) and of gh (B, T, 3H), from which the
caller forms dW_hh and db_hh with one GEMM / one sum.
"""
from typing import Optional

import torch
from torch import Tensor

from rnnkern.ops._common import state_dtype
from rnnkern.ops._sequences import flip_valid, full_lengths, stack_steps


def gru_layer_fwd(
    gx: Tensor,  # (B, T, 3H) input projection, b_ih included
    h0: Tensor,  # (B, H)
    w_hh: Tensor,  # (3H, H)
    b_hh: Optional[Tensor],  # (3H,)
    lengths: Optional[Tensor],  # (B,) int64
    reverse: bool,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns y (B, T, H) and h_n (B, H) in the input dtype, and the activated gates
    (B, T, 3H: r, z, n) and gh_n (B, T, H) in the state dtype, for the backward (empty
    tensors when not `training`)."""
    batch, steps, _ = gx.shape
    acc = state_dtype(gx.dtype)
    lengths = lengths if lengths is not None else full_lengths(batch, steps, gx.device)
    if reverse:
        gx = flip_valid(gx, lengths)
    h = h0
    ys, gates, ghn = [], [], []
    for s in range(steps):
        active = (s < lengths.to(gx.device))[:, None]  # (B, 1)
        gh = h.to(acc) @ w_hh.to(acc).T  # (B, 3H)
        if b_hh is not None:
            gh = gh + b_hh.to(acc)
        gx_r, gx_z, gx_n = gx[:, s].to(acc).chunk(3, dim=1)
        gh_r, gh_z, gh_n = gh.chunk(3, dim=1)
        r, z = (gx_r + gh_r).sigmoid(), (gx_z + gh_z).sigmoid()
        n = (gx_n + r * gh_n).tanh()
        h_new = ((1 - z) * n + z * h.to(acc)).to(gx.dtype)
        h = torch.where(active, h_new, h)
        ys.append(torch.where(active, h_new, 0))
        gates.append(torch.where(active, torch.cat([r, z, n], dim=1), 0))
        ghn.append(torch.where(active, gh_n, 0))
    y, gates, ghn = stack_steps(ys, (gates, ghn), lengths, reverse, training)
    return y, h, gates, ghn


def gru_layer_bwd(
    w_hh: Tensor,  # (3H, H)
    gates: Tensor,  # (B, T, 3H) activated r, z, n, state dtype
    ghn: Tensor,  # (B, T, H) state dtype
    h_prev: Tensor,  # (B, T, H) the state each step started from
    grad_y: Tensor,  # (B, T, H)
    grad_h_n: Tensor,  # (B, H)
    lengths: Optional[Tensor],
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns, in the state dtype: dL/dgx (B, T, 3H), dL/dgh (B, T, 3H), dL/dh0 (B, H)."""
    batch, steps, _ = gates.shape
    acc = gates.dtype
    lengths = lengths if lengths is not None else full_lengths(batch, steps, gates.device)
    if reverse:
        gates, ghn, h_prev, grad_y = (flip_valid(x, lengths) for x in (gates, ghn, h_prev, grad_y))
    dh = grad_h_n.to(acc)
    d_gx, d_gh = [None] * steps, [None] * steps
    for s in reversed(range(steps)):
        active = (s < lengths.to(gates.device))[:, None]  # (B, 1)
        dh_t = dh + grad_y[:, s].to(acc)
        r, z, n = gates[:, s].chunk(3, dim=1)
        d_n = dh_t * (1 - z) * (1 - n * n)
        d_z = dh_t * (h_prev[:, s].to(acc) - n) * z * (1 - z)
        d_r = d_n * ghn[:, s] * r * (1 - r)
        d_gx[s] = torch.where(active, torch.cat([d_r, d_z, d_n], dim=1), 0)
        d_gh[s] = torch.where(active, torch.cat([d_r, d_z, d_n * r], dim=1), 0)
        dh = torch.where(active, dh_t * z + d_gh[s] @ w_hh.to(acc), dh)
    d_gx, d_gh = torch.stack(d_gx, dim=1), torch.stack(d_gh, dim=1)
    if reverse:
        d_gx, d_gh = flip_valid(d_gx, lengths), flip_valid(d_gh, lengths)
    return d_gx, d_gh, dh
