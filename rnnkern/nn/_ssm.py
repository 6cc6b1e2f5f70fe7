"""Helpers shared by the state-space blocks (Mamba, Mamba2): time-step initialisation,
decoding-state shapes and dtypes, when the fused decode step applies."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkern import _backends


def inverse_softplus_time_steps(count: int, dt_min: float, dt_max: float, floor: float, device, dtype) -> Tensor:
    """(count,) softplus^-1(dt) for dt drawn log-uniformly from [dt_min, dt_max], at least `floor`:
    a time-step bias whose softplus is that dt."""
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    u = torch.rand(count, device=device, dtype=dtype)
    dt = torch.exp(log_min + u * (log_max - log_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def last_columns(x: Tensor, width: int) -> Tensor:
    """The last `width` steps of x (B, E, L), zero-padded on the left when L < width."""
    return F.pad(x, (max(width - x.shape[-1], 0), 0))[..., -width:].contiguous()


def wide(t: Tensor) -> Tensor:
    """`t` in float32, or float64 when it is float64 (the scan's parameters in its math dtype)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def wide_dtype(dtype) -> torch.dtype:
    """The dtype of the scans' parameters and states for modules built in `dtype`."""
    return torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)


def state_shape(owner: str, name: str, state, shape: tuple) -> None:
    if not isinstance(state, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor of shape {shape}, got {type(state).__name__}")
    if tuple(state.shape) != shape:
        raise ValueError(f"{owner}: {name} must have shape {shape}, got {tuple(state.shape)}")


def takes_fused_step(op, backend: Optional[str], u: Tensor, conv_state: Tensor, ssm_state: Tensor,
                     state_sizes: tuple, dtype: torch.dtype, d_model: int) -> bool:
    """Whether a block's step on u runs its fused kernel: one token (B, 1, d_model) on CPU, the
    states of the shapes (B, *sizes) that ``state_sizes`` gives for each, all in the
    parameters' ``dtype``, the cpu backend chosen and running that dtype, eagerly (torch.compile
    and export trace the op-by-op form, whose ops they know). Anything else takes the op-by-op
    form, which raises the errors of bad input. (Called per token: a few attribute reads.)"""
    if not (isinstance(u, Tensor) and isinstance(conv_state, Tensor) and isinstance(ssm_state, Tensor)):
        return False
    shape = u.shape
    if len(shape) != 3 or shape[1] != 1 or shape[2] != d_model or u.dtype != dtype or not u.is_cpu:
        return False
    conv_sizes, ssm_sizes = state_sizes
    return (conv_state.dtype == dtype and ssm_state.dtype == dtype and conv_state.shape == (shape[0], *conv_sizes)
            and ssm_state.shape == (shape[0], *ssm_sizes) and not torch.compiler.is_compiling()
            and _backends.selects_cpu(op, backend, dtype))
