"""The input projection of the recurrent layers: gx = x W^T + bias for every step at once.

One GEMM. The cpu backend has a kernel of its own for fp32 (INPUT_PROJECTION):
rnnkern_C::input_projection runs it on oneDNN's small-matrix kernel in L2-sized panels on
AVX-512 CPUs (faster than the BLAS behind F.linear where that BLAS takes a narrower vector path
than the CPU has) and on rnnkern's AVX2 panel GEMM elsewhere (see csrc/cpu/projection.cpp). It
is registered as a custom op with its own backward (the three GEMMs of a linear layer), so
autograd and torch.compile see it like F.linear. Every other backend and dtype, and inputs of
too few rows for the kernel to pay for its dispatch, run F.linear: the native GEMM of the
device, which is also what the reference computes.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkern import _backends

# Below this many rows (B * T) the op's dispatch costs more than the faster GEMM saves.
MIN_ROWS = 256

INPUT_PROJECTION = _backends.Op("input_projection", functions=("input_projection",),
                                kernels={"cpu": _backends.COMPILED}, dtypes={"cpu": (torch.float32,)})


@torch.library.custom_op("rnnkern::input_projection", mutates_args=())
def _projection_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return INPUT_PROJECTION.function("cpu", "input_projection")(x, weight, bias)


@_projection_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_rows = grad.reshape(-1, grad.shape[-1])  # (M, N)
    grad_x = grad @ weight
    grad_weight = grad_rows.T @ x.reshape(-1, x.shape[-1])
    grad_bias = grad_rows.sum(0) if ctx.has_bias else None
    return grad_x, grad_weight, grad_bias


_projection_op.register_autograd(_backward, setup_context=_setup_context)


def input_projection(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    """x (..., K) W^T + bias for a weight W (N, K) -> (..., N), for a layer run by `backend`."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows >= MIN_ROWS and INPUT_PROJECTION.refusal(backend, x.device, x.dtype) is None:
        return _projection_op(x, weight, bias)
    return F.linear(x, weight, bias)
