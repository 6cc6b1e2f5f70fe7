"""RMSNormGated: the gated, grouped RMSNorm of Mamba-2 as a module (mamba_ssm's name and parameter)."""
from typing import Optional

import torch
from torch import Tensor, nn

from rnnkern.ops.rms_norm_gated import rms_norm_gated

__all__ = ["RMSNormGated"]


class RMSNormGated(nn.Module):
    """:func:`rnnkern.rms_norm_gated` with a learned ``weight`` ``(hidden_size,)`` (ones at init).

    Args: hidden_size, eps, group_size (None: one group of all channels), norm_before_gate,
    device, dtype, as mamba_ssm's ``RMSNorm`` of ``layernorm_gated``. ``forward(x, z=None)``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return rms_norm_gated(x, self.weight, None, z, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
