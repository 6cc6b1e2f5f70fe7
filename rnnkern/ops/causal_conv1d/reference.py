"""Pure-PyTorch depthwise causal convolution: the only implementation of causal_conv1d.

Each channel d of x (B, D, L) is convolved with its own W taps, looking only backwards::

    pre[b, d, t] = bias[d] + sum_{k=0}^{W-1} weight[d, k] * x[b, d, t - (W - 1) + k]
    out = silu(pre) if activation == "silu" else pre            (x[., ., t < 0] = 0)

so the last tap multiplies the current input. With sequences packed along time (cu_seqlens,
B == 1) every sequence sees zeros before its own start: the convolution runs on a copy of x
with W - 1 zeros between its sequences. The backward, with g = d(out) * act'(pre)::

    dx[b, d, s]     = sum_k weight[d, k] * g[b, d, s + (W - 1) - k]     (g[., ., t >= L] = 0)
    dweight[d, k]   = sum_{b, t} g[b, d, t] * x[b, d, t - (W - 1) + k]
    dbias[d]        = sum_{b, t} g[b, d, t]

The one-step form keeps a rolling state (B, D, W) of the last W inputs, newest last: a step
shifts it left by one, appends x_t and takes the same weighted sum. Math runs in fp32 (fp64
for fp64 inputs); results are rounded once to the input dtype.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkern.ops._common import state_dtype
from rnnkern.ops._sequences import packed_index


def causal_conv1d_fwd(
    x: Tensor,  # (B, D, L)
    weight: Tensor,  # (D, W)
    bias: Optional[Tensor],  # (D,)
    activation: Optional[str],  # None or "silu"
    cu_seqlens: Optional[Tensor],  # (S + 1,) offsets of S sequences packed along L, with B == 1
) -> Tensor:  # out (B, D, L) in x.dtype
    if cu_seqlens is not None:
        slots = _slots(cu_seqlens, x.shape[-1], weight.shape[1])
        return causal_conv1d_fwd(_spread(x, slots, cu_seqlens, weight), weight, bias, activation, None)[..., slots]
    return _activate(_pre_activation(x, weight, bias), activation).to(x.dtype)


def causal_conv1d_bwd(
    x: Tensor,  # (B, D, L)
    weight: Tensor,  # (D, W)
    bias: Optional[Tensor],  # (D,)
    activation: Optional[str],
    cu_seqlens: Optional[Tensor],
    grad_out: Tensor,  # (B, D, L)
) -> tuple[Tensor, Tensor, Tensor]:  # dx (B, D, L), dweight (D, W), dbias (D,) or empty (0,)
    if cu_seqlens is not None:  # the separating zeros get no gradient: dx is read at the slots
        slots = _slots(cu_seqlens, x.shape[-1], weight.shape[1])
        dx, dweight, dbias = causal_conv1d_bwd(_spread(x, slots, cu_seqlens, weight), weight, bias, activation, None,
                                               _spread(grad_out, slots, cu_seqlens, weight))
        return dx[..., slots], dweight, dbias
    acc = state_dtype(x.dtype)
    g = grad_out.to(acc)
    if activation == "silu":
        pre = _pre_activation(x, weight, bias)  # recomputed: cheaper than saving it
        s = torch.sigmoid(pre)
        g = g * s * (1 + pre * (1 - s))
    width = weight.shape[1]
    flipped = weight.to(acc).flip(-1).unsqueeze(1)  # (D, 1, W)
    dx = F.conv1d(F.pad(g, (0, width - 1)), flipped, groups=weight.shape[0])  # (B, D, L)
    windows = F.pad(x.to(acc), (width - 1, 0)).unfold(-1, width, 1)  # (B, D, L, W): inputs seen at t
    dweight = torch.einsum("bdt,bdtk->dk", g, windows)
    dbias = g.sum(dim=(0, 2)) if bias is not None else g.new_empty((0,))
    return dx.to(x.dtype), dweight.to(weight.dtype), dbias.to(x.dtype)


def causal_conv1d_update(
    x: Tensor,  # (B, D), the newest input
    conv_state: Tensor,  # (B, D, W), the last W inputs, newest last; updated in place
    weight: Tensor,  # (D, W)
    bias: Optional[Tensor],  # (D,)
    activation: Optional[str],
) -> Tensor:  # out (B, D) in x.dtype
    acc = state_dtype(x.dtype)
    rolled = torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # (B, D, W)
    conv_state.copy_(rolled)
    pre = (rolled.to(acc) * weight.to(acc)).sum(dim=-1)  # (B, D)
    if bias is not None:
        pre = pre + bias.to(acc)
    return _activate(pre, activation).to(x.dtype)


def _pre_activation(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """conv + bias in the compute dtype: left-pad W - 1 zeros, then a depthwise conv1d."""
    acc = state_dtype(x.dtype)
    channels, width = weight.shape
    padded = F.pad(x.to(acc), (width - 1, 0))  # (B, D, L + W - 1)
    b = bias.to(acc) if bias is not None else None
    return F.conv1d(padded, weight.to(acc).unsqueeze(1), b, groups=channels)  # (B, D, L)


def _slots(cu_seqlens: Tensor, length: int, width: int) -> Tensor:
    """(L,) int64: where each packed step goes in a copy with W - 1 zeros before every sequence but
    the first (whose zeros are the convolution's own padding)."""
    return torch.arange(length, device=cu_seqlens.device) + (width - 1) * packed_index(cu_seqlens, length)


def _spread(x: Tensor, slots: Tensor, cu_seqlens: Tensor, weight: Tensor) -> Tensor:
    """x (1, D, L) -> (1, D, L + (W - 1)(S - 1)): its steps at `slots`, zeros between sequences."""
    length = x.shape[-1] + (weight.shape[1] - 1) * (cu_seqlens.shape[0] - 2)
    return x.new_zeros((*x.shape[:-1], length)).index_copy_(-1, slots, x)


def _activate(pre: Tensor, activation: Optional[str]) -> Tensor:
    return F.silu(pre) if activation == "silu" else pre
