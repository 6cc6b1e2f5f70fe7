"""Decode steps of whole Mamba and Mamba-2 blocks: one call per block and token.

At one token a block is a few matrix-vector products around a few thousand pointwise
operations; as the chain of ops the blocks run on a sequence it costs dozens of dispatches
and temporaries, several times the time its weights take to stream from memory. The cpu
backend runs a block's step as one C++ call (fp32/fp64, no autograd); reference.py is the
ground truth it is tested against. rnnkern.nn.Mamba.step and Mamba2.step call these where
the cpu backend takes the step, and the op-by-op form elsewhere (other devices and dtypes,
autograd, torch.compile).
"""
from typing import Optional

import torch
from torch import Tensor

from rnnkern import _backends

__all__ = ["MAMBA_BLOCK_STEP", "MAMBA2_BLOCK_STEP", "mamba_block_step", "mamba2_block_step", "cpu_mamba_block_step",
           "cpu_mamba2_block_step"]


def _step_op(name: str) -> _backends.Op:
    return _backends.Op(name, functions=(name,), kernels={"reference": f"{__name__}.reference",
                                                          "cpu": _backends.COMPILED},
                        dtypes={"cpu": _backends.STEP_DTYPES})


MAMBA_BLOCK_STEP = _step_op("mamba_block_step")
MAMBA2_BLOCK_STEP = _step_op("mamba2_block_step")


# ---------------------------------------------------------------------------------------
# torch.library ops (what torch.compile sees); eagerly the kernels run directly, as the op
# wrapper costs more than a small step.


@torch.library.custom_op("rnnkern::mamba_block_step", mutates_args=("conv_state", "ssm_state"))
def _mamba_block_step_op(u: Tensor, conv_state: Tensor, ssm_state: Tensor, parameters: list[Optional[Tensor]],
                         backend: str) -> Tensor:
    return MAMBA_BLOCK_STEP.function(backend, "mamba_block_step")(u, conv_state, ssm_state, parameters)


@_mamba_block_step_op.register_fake
def _(u, conv_state, ssm_state, parameters, backend):
    return u.new_empty((*u.shape[:-1], parameters[9].shape[0]))  # out_proj.weight (d_model, E)


@torch.library.custom_op("rnnkern::mamba2_block_step", mutates_args=("conv_state", "ssm_state"))
def _mamba2_block_step_op(u: Tensor, conv_state: Tensor, ssm_state: Tensor, parameters: list[Optional[Tensor]],
                          norm_group_size: int, norm_before_gate: bool, norm_eps: float, dt_min: float,
                          dt_max: float, backend: str) -> Tensor:
    return MAMBA2_BLOCK_STEP.function(backend, "mamba2_block_step")(
        u, conv_state, ssm_state, parameters, norm_group_size, norm_before_gate, norm_eps, dt_min, dt_max)


@_mamba2_block_step_op.register_fake
def _(u, conv_state, ssm_state, parameters, norm_group_size, norm_before_gate, norm_eps, dt_min, dt_max, backend):
    return u.new_empty((*u.shape[:-1], parameters[8].shape[0]))  # out_proj.weight (d_model, E)


# ---------------------------------------------------------------------------------------
# Public functions.


def mamba_block_step(u: Tensor, conv_state: Tensor, ssm_state: Tensor, parameters: list[Optional[Tensor]], *,
                     backend: Optional[str] = None) -> Tensor:
    """One token through a Mamba block: u (..., d_model) -> (..., d_model), the states
    (conv_state (B, E, W), ssm_state (B, E, N), B the rows of u) updated in place.
    ``parameters`` and the math: reference.mamba_block_step. ``backend``: "cpu" (C++,
    fp32/fp64 CPU tensors) or "reference"; None picks cpu where it applies. No autograd."""
    name = _backends.select(MAMBA_BLOCK_STEP, u.device, u.dtype, backend)
    if torch.compiler.is_compiling():
        return _mamba_block_step_op(u, conv_state, ssm_state, parameters, name)
    return MAMBA_BLOCK_STEP.function(name, "mamba_block_step")(u, conv_state, ssm_state, parameters)


def mamba2_block_step(u: Tensor, conv_state: Tensor, ssm_state: Tensor, parameters: list[Optional[Tensor]],
                      norm_group_size: int, norm_before_gate: bool, norm_eps: float, dt_min: float, dt_max: float,
                      *, backend: Optional[str] = None) -> Tensor:
    """One token through a Mamba-2 block: u (..., d_model) -> (..., d_model), the states
    (conv_state (B, E + 2GN, W), ssm_state (B, H, P, N)) updated in place. ``parameters``,
    the norm and time-step arguments and the math: reference.mamba2_block_step. No autograd."""
    name = _backends.select(MAMBA2_BLOCK_STEP, u.device, u.dtype, backend)
    args = (u, conv_state, ssm_state, parameters, norm_group_size, norm_before_gate, norm_eps, dt_min, dt_max)
    if torch.compiler.is_compiling():
        return _mamba2_block_step_op(*args, name)
    return MAMBA2_BLOCK_STEP.function(name, "mamba2_block_step")(*args)


def cpu_mamba_block_step(u: Tensor, conv_state: Tensor, ssm_state: Tensor, parameters: list) -> Tensor:
    """mamba_block_step on the cpu kernel, with neither validation nor backend selection: for
    rnnkern.nn.Mamba.step's per-token call, which has checked that the cpu backend takes it."""
    return _backends.step_kernel(MAMBA_BLOCK_STEP)(u, conv_state, ssm_state, parameters)


def cpu_mamba2_block_step(u: Tensor, conv_state: Tensor, ssm_state: Tensor, parameters: list, *settings) -> Tensor:
    """mamba2_block_step on the cpu kernel, as cpu_mamba_block_step (``settings``: the norm and
    time-step arguments), for rnnkern.nn.Mamba2.step."""
    return _backends.step_kernel(MAMBA2_BLOCK_STEP)(u, conv_state, ssm_state, parameters, *settings)
