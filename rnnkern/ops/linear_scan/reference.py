"""Pure-PyTorch linear recurrence: the ground truth the kernels are tested against.

    forward:   h_t = a_t * h_{t-1} + b_t,        h_{-1} = initial_state
    backward:  g_t = dh_t + a_{t+1} * g_{t+1},   g_{T-1} = dh_{T-1} + d(final_state)
               da_t = g_t * h_{t-1},   db_t = g_t,   d(initial_state) = a_0 * g_0

With ``reverse=True`` time runs from T-1 down to 0 ("t-1" becomes "t+1"). State is kept in
:func:`rnnkern.ops._common.state_dtype`; outputs are in the input dtype. Every backend implements these
functions (and linear_scan_fwd_out, the forward into a given h) with the same arguments and
results.
"""
from typing import Optional

import torch
from torch import Tensor

from rnnkern.ops._common import state_dtype


def linear_scan_fwd(
    a: Tensor,  # (B, T, D)
    b: Tensor,  # (B, T, D)
    initial_state: Optional[Tensor],  # (N, D) in state_dtype
    cu_seqlens: Optional[Tensor],  # (N + 1,) packed offsets, with B == 1
    reverse: bool,
) -> tuple[Tensor, Tensor]:  # h (B, T, D), final_state (N, D)
    pieces, finals = [], []
    for n, (row, span) in enumerate(_sequences(a, cu_seqlens)):
        state = _initial(a, initial_state, n, row)
        h, state = _scan(a[row, span], b[row, span], state, reverse)
        pieces.append(h)
        finals.append(state)
    return torch.cat(pieces, dim=1 if cu_seqlens is not None else 0), torch.cat(finals)


def linear_scan_fwd_out(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    reverse: bool,
    out: Tensor,  # (B, T, D), a's dtype: receives h
) -> Tensor:  # final_state (N, D)
    h, final_state = linear_scan_fwd(a, b, initial_state, cu_seqlens, reverse)
    out.copy_(h)
    return final_state


def linear_scan_bwd(
    a: Tensor,  # (B, T, D)
    h: Tensor,  # (B, T, D), the forward output
    initial_state: Optional[Tensor],  # (N, D)
    grad_h: Tensor,  # (B, T, D)
    grad_final: Optional[Tensor],  # (N, D)
    cu_seqlens: Optional[Tensor],
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # grad_a, grad_b (B, T, D); grad_initial (N, D)
    grads_a, grads_b, grads_init = [], [], []
    for n, (row, span) in enumerate(_sequences(a, cu_seqlens)):
        h_init = _initial(a, initial_state, n, row)
        g = _initial(a, grad_final, n, row)
        da, db, g = _scan_backward(a[row, span], h[row, span], h_init, grad_h[row, span], g, reverse)
        grads_a.append(da)
        grads_b.append(db)
        grads_init.append(g)
    dim = 1 if cu_seqlens is not None else 0
    return torch.cat(grads_a, dim), torch.cat(grads_b, dim), torch.cat(grads_init)


def _sequences(a: Tensor, cu_seqlens: Optional[Tensor]) -> list[tuple[slice, slice]]:
    """(batch rows, time span) of each sequence: all rows at once, or packed spans of row 0."""
    if cu_seqlens is None:
        return [(slice(None), slice(None))]
    bounds = cu_seqlens.tolist()
    return [(slice(0, 1), slice(start, end)) for start, end in zip(bounds[:-1], bounds[1:])]


def _initial(a: Tensor, state: Optional[Tensor], n: int, row: slice) -> Tensor:
    """The (rows, D) starting state of sequence n (zeros when none is given)."""
    rows = a[row].shape[0]
    if state is None:
        return a.new_zeros((rows, a.shape[-1]), dtype=state_dtype(a.dtype))
    first = n if row.start is not None else 0
    return state[first : first + rows].to(state_dtype(a.dtype))


def _steps(length: int, reverse: bool) -> range:
    return range(length - 1, -1, -1) if reverse else range(length)


def _scan(a: Tensor, b: Tensor, state: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    h = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    for t in _steps(a.shape[1], reverse):
        state = a[:, t].to(state.dtype) * state + b[:, t].to(state.dtype)
        h[:, t] = state.to(h.dtype)
    return h, state


def _scan_backward(a, h, h_init, grad_h, g, reverse):
    grad_a = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    grad_b = torch.empty_like(grad_a)
    steps = list(_steps(a.shape[1], reverse))
    for i in reversed(range(len(steps))):
        t = steps[i]
        g = g + grad_h[:, t].to(g.dtype)
        h_prev = h[:, steps[i - 1]].to(g.dtype) if i > 0 else h_init
        grad_b[:, t] = g.to(grad_b.dtype)
        grad_a[:, t] = (g * h_prev).to(grad_a.dtype)
        g = g * a[:, t].to(g.dtype)
    return grad_a, grad_b, g
