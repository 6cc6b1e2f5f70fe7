"""Time bookkeeping shared by the recurrent ops: per-sequence lengths and directions, and
sequences packed along time.

A batch of B sequences padded to T steps, where sequence b holds lengths[b] valid steps.
Going forward, step s of sequence b is time s; going in reverse it is time lengths[b]-1-s,
so every sequence starts from its own last valid step.
"""
from typing import Optional

import torch
from torch import Tensor

from rnnkern import _backends
from rnnkern.ops import _checks


def packed_index(cu_seqlens: Tensor, steps: int) -> Tensor:
    """(T,) int64: the packed sequence each of T steps belongs to, for offsets cu_seqlens (S + 1,)
    (empty sequences own no step); computed on cu_seqlens' device, without a host sync."""
    times = torch.arange(steps, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), times, right=True)


def full_lengths(batch: int, steps: int, device: torch.device) -> Tensor:
    return torch.full((batch,), steps, dtype=torch.int64, device=device)


def flip_valid(x: Tensor, lengths: Tensor) -> Tensor:
    """x (B, T, ...) with each sequence's first lengths[b] steps in reverse order.

    Steps past a sequence's end stay where they are. flip_valid is its own inverse.
    """
    steps = torch.arange(x.shape[1], device=x.device)  # (T,)
    lengths = lengths.to(x.device)[:, None]  # (B, 1)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (B, T)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def stack_steps(ys: list, workspaces: tuple, lengths: Tensor, reverse: bool, training: bool) -> tuple:
    """A reference time loop's per-step lists as (B, T, ...) tensors in time order: the outputs
    `ys`, then each of the backward's `workspaces` (empty tensors when not training)."""
    y, *kept = (torch.stack(x, dim=1) for x in (ys, *workspaces))
    if not training:
        kept = [w.new_empty(0) for w in kept]
    elif reverse:
        kept = [flip_valid(w, lengths) for w in kept]
    if reverse:
        y = flip_valid(y, lengths)
    return (y, *kept)


def previous_states(y: Tensor, h0: Tensor, lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """(B, T, P): the state each step started from (h0 at a sequence's first step, else the
    previous step's output). Entries past a sequence's end are unspecified."""
    if not reverse:
        return torch.cat([h0[:, None], y[:, :-1]], dim=1)
    shifted = torch.cat([y[:, 1:], torch.zeros_like(y[:, :1])], dim=1)
    lengths = lengths if lengths is not None else full_lengths(y.shape[0], y.shape[1], y.device)
    first = (lengths.to(y.device) - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, y.shape[2])  # (B, 1, P)
    return shifted.scatter(1, first, h0[:, None].to(y.dtype))


# Up to this batch the one-token step kernel beats the sequence kernel's batched GEMM. Layer
# op medians at H = 256, step vs sequence kernel: on a 2-core Zen 4, LSTM 162 vs 235 us at
# B = 16 and 600 vs 480 us at B = 64 (level near B = 32 if linear in B); on a 2-core Zen 3
# (AVX2 panel GEMM), LSTM 318 vs 522 us at 16, 568 vs 676 at 32, 1371 vs 1677 at 64, and GRU
# 455 vs 551 us at 32, 786 vs 720 at 64.
STEP_KERNEL_MAX_BATCH = 32


def takes_step_kernel(step: _backends.Op, backend: str, x: Tensor, lengths: Optional[Tensor],
                      training: bool) -> bool:
    """Whether a layer call on x (B, T, I) run by `backend` takes the one-token kernel of the
    Op `step` (lstm_step / gru_step): T = 1, no lengths, step_kernel_applies, and the backend
    has that kernel for x's dtype."""
    return (x.shape[1] == 1 and lengths is None and step_kernel_applies(x.shape[0], training)
            and step.refusal(backend, x.device, x.dtype) is None)


def step_kernel_applies(batch: int, training: bool) -> bool:
    """The step kernels' conditions beyond one token and the backend: a small batch, nothing
    to differentiate, and not being traced by torch.compile (which sees the sequence op)."""
    return not training and batch <= STEP_KERNEL_MAX_BATCH and not torch.compiler.is_compiling()


def streaming_step(step_op: _backends.Op, stack_op: _backends.Op, backend: Optional[str], x: Tensor, states: tuple,
                   layers: list):
    """One token for each of B rows through a stack of layers on the cpu backend's one-token
    kernel of the Op `step_op` (one layer) or `stack_op` (every layer in one call), for the
    modules' streaming calls: x (1, B, I) or (B, 1, I) and states (L, B, H) as the module has
    them (the kernel keeps their leading dimensions), `layers` one (w_ih, w_hh, b_ih, b_hh) per
    layer. It runs where the layer op would take the same
    kernel: the module's `backend` (or RNNKERN_BACKEND) leaves the cpu backend chosen, the cpu
    backend has the kernel for x's dtype, and step_kernel_applies; all are checked once for the
    whole stack. There are no Python shape checks: the kernel checks shapes and dtypes against
    each layer's weights itself. Returns (y shaped like x, *new states (L, B, H)), or None where
    the layer op would not take it."""
    if not _backends.selects_cpu(step_op, backend, x.dtype):
        return None
    recorded = torch.is_grad_enabled() and _checks.keeps_grad((x, *states, *(w for layer in layers for w in layer)))
    if not step_kernel_applies(states[0].shape[1], recorded):
        return None
    if len(layers) == 1:  # the states as they are
        return _backends.step_kernel(step_op)(x, *states, *layers[0])
    return _backends.step_kernel(stack_op)(x, *states, [w for layer in layers for w in layer])
