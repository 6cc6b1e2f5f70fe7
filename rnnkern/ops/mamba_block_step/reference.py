"""Pure-PyTorch decode steps of whole Mamba and Mamba-2 blocks: the ground truth of the C++
kernels, composed of the reference ops the blocks run token by token.

Both take u (..., d_model) (the rows of one token), the block's decode states, updated in
place, and its parameters as one list in the order the modules hold them (see each function);
A is -exp(A_log). They return the block's output (..., d_model) in u's dtype.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from rnnkern.ops.causal_conv1d.reference import causal_conv1d_update
from rnnkern.ops.rms_norm_gated.reference import rms_norm_gated
from rnnkern.ops.selective_scan.reference import selective_state_update


def mamba_block_step(
    u: Tensor,  # (..., d_model)
    conv_state: Tensor,  # (B, E, W), B the rows of u
    ssm_state: Tensor,  # (B, E, N)
    parameters: list[Optional[Tensor]],
) -> Tensor:  # (..., d_model)
    """parameters: in_proj.weight (2E, d_model), in_proj.bias, conv1d.weight (E, 1, W),
    conv1d.bias, x_proj.weight (R + 2N, E), dt_proj.weight (E, R), dt_proj.bias (E,),
    A (E, N), D (E,), out_proj.weight (d_model, E), out_proj.bias (biases may be None)."""
    w_in, b_in, w_conv, b_conv, w_x, w_dt, b_dt, A, D, w_out, b_out = parameters
    channels, n = A.shape
    rows = u.reshape(-1, u.shape[-1])  # (B, d_model)
    x, z = F.linear(rows, w_in, b_in).chunk(2, dim=-1)  # (B, E) each
    x = causal_conv1d_update(x, conv_state, w_conv.reshape(channels, -1), b_conv, "silu")
    dt, B, C = F.linear(x, w_x).split([w_dt.shape[1], n, n], dim=-1)  # (B, R), (B, N), (B, N)
    heads = ssm_state.view(-1, 1, channels, n)  # the E channels as one head of E
    y = selective_state_update(heads, x[:, None], F.linear(dt, w_dt)[:, None], A[None], B[:, None], C[:, None],
                               D[None], z[:, None], b_dt[None], True, None)  # (B, 1, E)
    return F.linear(y[:, 0], w_out, b_out).view(*u.shape[:-1], -1)


def mamba2_block_step(
    u: Tensor,  # (..., d_model)
    conv_state: Tensor,  # (B, E + 2GN, W)
    ssm_state: Tensor,  # (B, H, P, N), E = H P
    parameters: list[Optional[Tensor]],
    norm_group_size: int,  # channels per group of the gated RMSNorm
    norm_before_gate: bool,
    norm_eps: float,
    dt_min: float,  # the time step is clamped to [dt_min, dt_max] after its softplus
    dt_max: float,
) -> Tensor:  # (..., d_model)
    """parameters: in_proj.weight (2E + 2GN + H, d_model) with rows [z, x, B, C, dt],
    in_proj.bias, conv1d.weight (E + 2GN, 1, W), conv1d.bias, dt_bias (H,), A (H,), D (H,) or
    (E,), norm.weight (E,) (None: no norm, the scan's output gated by silu(z)),
    out_proj.weight (d_model, E), out_proj.bias."""
    w_in, b_in, w_conv, b_conv, dt_bias, A, D, w_norm, w_out, b_out = parameters
    _, heads, dim, n = ssm_state.shape
    channels = heads * dim
    groups = (conv_state.shape[1] - channels) // (2 * n)
    rows = u.reshape(-1, u.shape[-1])  # (B, d_model)
    batch = rows.shape[0]
    z, xBC, dt = F.linear(rows, w_in, b_in).split([channels, channels + 2 * groups * n, heads], dim=-1)
    xBC = causal_conv1d_update(xBC, conv_state, w_conv.reshape(xBC.shape[-1], -1), b_conv, "silu")
    x, B, C = xBC.split([channels, groups * n, groups * n], dim=-1)
    step = F.softplus(dt + dt_bias).clamp(dt_min, dt_max)  # (B, H)
    y = selective_state_update(
        ssm_state, x.view(batch, heads, dim), step[..., None].expand(-1, -1, dim),
        A[:, None, None].expand(-1, dim, n), B.view(batch, groups, n), C.view(batch, groups, n),
        D.view(heads, -1).expand(-1, dim), None if w_norm is not None else z.view(batch, heads, dim), None, False, None,
    ).flatten(-2)  # (B, E)
    if w_norm is not None:
        y = rms_norm_gated(y, w_norm, None, z, norm_eps, norm_group_size, norm_before_gate)
    return F.linear(y, w_out, b_out).view(*u.shape[:-1], -1)
