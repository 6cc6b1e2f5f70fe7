"""Dtype rules and autograd helpers that several ops share."""
from typing import Optional

import torch
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of carried state and accumulation: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """An output's incoming gradient, zeros where autograd passed None (the output was unused)."""
    return torch.zeros_like(like) if grad is None else grad


def weight_grad(d_out: Tensor, inputs: Tensor, weight: Tensor) -> Tensor:
    """sum over (b, t) of d_out[b, t]^T inputs[b, t], in weight's dtype: one GEMM over all steps
    for d_out (B, T, N) and inputs (B, T, K) -> (N, K)."""
    d_out = d_out.flatten(0, 1)
    return (d_out.T @ inputs.flatten(0, 1).to(d_out.dtype)).to(weight.dtype)
