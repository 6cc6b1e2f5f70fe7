"""rms_norm_gated: the gated, grouped RMSNorm of Mamba-2's block.

A handful of elementwise torch ops and one reduction (reference.py) on every device, which
torch.compile fuses and autograd differentiates. Eagerly on CPU, where nothing needs a
gradient, fp32/fp64 inputs of one dtype go to a C++ kernel (csrc/cpu/mamba_decode.cpp) in one
call: at decode sizes the chain of torch ops costs tens of microseconds per row of a few
hundred channels.
"""
from typing import Optional

import torch
from torch import Tensor

from rnnkern import _backends
from rnnkern.ops import _checks
from rnnkern.ops.rms_norm_gated import reference

__all__ = ["RMS_NORM_GATED", "rms_norm_gated"]

RMS_NORM_GATED = _backends.step_op("rms_norm_gated")


def rms_norm_gated(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = True,
) -> Tensor:
    """RMSNorm over groups of channels, gated by ``silu(z)``; mamba_ssm's ``rmsnorm_fn`` arguments.

    .. math::
        x' = x \\cdot \\text{silu}(z)\\ (\\text{norm\\_before\\_gate=False}), \\qquad
        \\text{out} = \\frac{x'}{\\sqrt{\\text{mean}_{group}(x'^2) + \\epsilon}} \\cdot w + b, \\qquad
        \\text{out} \\leftarrow \\text{out} \\cdot \\text{silu}(z)\\ (\\text{norm\\_before\\_gate=True})

    Args:
        x: ``(..., d)``, any float dtype. weight, bias: ``(d,)`` (bias may be None).
        z: the gate, like x, or None (no gating).
        eps: added to the mean square. group_size: channels per group (must divide d);
            None normalises over all d (one group), as mamba_ssm's default.
        norm_before_gate: normalise then gate (True), or gate then normalise (False, what
            Mamba-2 and HF transformers' ``MambaRMSNormGated`` do).

    Returns:
        like x; computed in float32 (float64 for fp64) and rounded once. Differentiable in
        x, weight, bias and z.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a torch.Tensor of shape (..., d), got {type(x).__name__}"
                        + (f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else ""))
    _checks.float_dtype("x", x)
    dim = x.shape[-1]
    _vector("weight", weight, dim, x)
    if bias is not None:
        _vector("bias", bias, dim, x)
    if z is not None:
        _checks.like("z", z, "x", x, "(..., d)")
    if group_size is None:
        group_size = dim
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or dim % group_size:
        raise ValueError(f"group_size must be a positive int dividing d={dim} (x's last dimension), got {group_size!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    _checks.flag("norm_before_gate", norm_before_gate)
    if _takes_kernel(x, weight, bias, z):
        return _backends.step_kernel(RMS_NORM_GATED)(x, weight, bias, z, float(eps), group_size, norm_before_gate)
    return reference.rms_norm_gated(x, weight, bias, z, float(eps), group_size, norm_before_gate)


def _takes_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Optional[Tensor]) -> bool:
    """CPU tensors of one fp32/fp64 dtype, eagerly, nothing to differentiate, cpu backend selected."""
    operands = (x, weight, bias, z)
    return (x.is_cpu and all(t is None or t.dtype == x.dtype for t in operands)
            and not torch.compiler.is_compiling() and not _checks.keeps_grad(operands)
            and _backends.selects_cpu(RMS_NORM_GATED, None, x.dtype))


def _vector(name: str, v, dim: int, x: Tensor) -> None:
    _checks.tensor(name, v, ndim=1, shape_doc=f"({dim},)")
    if v.shape[0] != dim:
        raise ValueError(f"{name} must have shape ({dim},) (x's last dimension), got {tuple(v.shape)}")
    _checks.float_dtype(name, v)
    if v.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}), got {v.device}")
