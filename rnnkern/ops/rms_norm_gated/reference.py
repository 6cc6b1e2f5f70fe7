"""Pure-PyTorch gated RMSNorm (Mamba-2's output norm): the ground truth, and what every device runs.

Per row x (..., d), split into groups of `group_size` consecutive channels, with the gate
applied before the norm or after it:

    x' = x * silu(z)                    (norm_before_gate=False: gate, then normalise)
    out = x' / sqrt(mean_group(x'^2) + eps) * weight + bias
    out = out * silu(z)                 (norm_before_gate=True: normalise, then gate)

In float32 (float64 for fp64 inputs), rounded once to x's dtype.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkern.ops._common import state_dtype


def rms_norm_gated(
    x: Tensor,  # (..., d)
    weight: Tensor,  # (d,)
    bias: Optional[Tensor],  # (d,)
    z: Optional[Tensor],  # like x
    eps: float,
    group_size: int,  # divides d
    norm_before_gate: bool,
) -> Tensor:  # like x
    acc = state_dtype(x.dtype)
    xs = x.to(acc)
    gate = None if z is None else F.silu(z.to(acc))
    if gate is not None and not norm_before_gate:
        xs = xs * gate
    groups = xs.unflatten(-1, (-1, group_size))  # (..., d / group_size, group_size)
    normed = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2)
    out = normed * weight.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
