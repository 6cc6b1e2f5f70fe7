"""Pure-PyTorch selective scan (Mamba's S6 recurrence): the ground truth for the kernels.

Per batch b, channel d and state index n, with delta' = softplus(delta + delta_bias) (or
without softplus) and channel d reading group g = d // (Dm / G) of B and C:

    forward:   a_t = exp(delta'_t A[d, n])
               x_t = a_t * x_{t-1} + delta'_t B_t[g, n] u_t,           x_{-1} = initial_state
               y_t = sum_n C_t[g, n] x_t[n] + D[d] u_t,                out_t = y_t * silu(z_t)
    backward:  gy_t = dout_t * silu(z_t),   dz_t = dout_t * y_t * silu'(z_t)
               h_t = gy_t C_t + a_{t+1} h_{t+1},   h_{L-1} = gy_{L-1} C_{L-1} + d(last_state)
               ddelta'_t = sum_n h_t (A a_t x_{t-1} + B_t u_t),   dA += h_t delta'_t a_t x_{t-1}
               dB_t = h_t delta'_t u_t,   dC_t = gy_t x_t,   du_t = delta'_t sum_n h_t B_t + D gy_t
               d(initial_state) = a_0 h_0

Packed sequences (``cu_seqlens`` (S + 1,), Bt == 1): the recurrence restarts at every sequence start
s_i, x_{s_i - 1} = initial_state[i] (zeros when None), and last_state[i] is the state after its last
step (its initial state when it is empty); nothing flows across a boundary, forward or backward.
This reference runs each sequence alone.

State and every gradient are kept in :func:`rnnkern.ops._common.state_dtype`. B and C are either "variable"
``(Bt, G, N, L)`` or "fixed" ``(Dm, N)``. Every backend implements these functions with the
same arguments and results; this one keeps all L states at once, the kernels do not.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkern.ops._common import state_dtype


CHUNK = 64  # steps between the state checkpoints the forward saves for the backward


def num_chunks(length: int) -> int:
    return math.ceil(length / CHUNK)


def selective_scan_fwd(
    u: Tensor,  # (Bt, Dm, L)
    delta: Tensor,  # (Bt, Dm, L)
    A: Tensor,  # (Dm, N)
    B: Tensor,  # (Bt, G, N, L) or (Dm, N)
    C: Tensor,  # (Bt, G, N, L) or (Dm, N)
    D: Optional[Tensor],  # (Dm,)
    z: Optional[Tensor],  # (Bt, Dm, L)
    delta_bias: Optional[Tensor],  # (Dm,)
    delta_softplus: bool,
    initial_state: Optional[Tensor],  # (Bt, Dm, N) in state_dtype; (S, Dm, N) packed
    cu_seqlens: Optional[Tensor],  # (S + 1,) offsets of S sequences packed along L, with Bt == 1
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # out (Bt, Dm, L), last_state (Bt | S, Dm, N), checkpoints
    if cu_seqlens is not None:
        return _packed_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, training)
    out, states = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, _initial(u, A, initial_state))
    checkpoints = _checkpoints(states[:-1]) if training else _empty(u)
    return out, states[-1].clone(), checkpoints


def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    checkpoints: Tensor,  # unused here: this backend recomputes every state from initial_state
    grad_out: Tensor,  # (Bt, Dm, L)
    grad_last_state: Tensor,  # (Bt | S, Dm, N)
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # du, ddelta (Bt, Dm, L); dA (Dm, N); dB, dC like B, C; dD (Dm,); dz (Bt, Dm, L);
    # ddelta_bias (Dm,); dinitial_state (Bt | S, Dm, N). Missing inputs get empty (0,) gradients.
    if cu_seqlens is not None:
        return _packed_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, grad_out,
                           grad_last_state)
    acc = state_dtype(u.dtype)
    dims = u.shape[1]
    u_, A_ = u.to(acc), A.to(acc)
    dt = _discretisation_step(delta, delta_bias, delta_softplus, acc)
    B_, C_ = _per_channel(B, dims, acc), _per_channel(C, dims, acc)  # (Bt | 1, Dm, N, L | 1)
    states = _states(u_, dt, A_, B_, _initial(u, A, initial_state))
    grad_out = grad_out.to(acc)
    dz = _empty(u)
    if z is not None:  # out = y * silu(z)
        z_ = z.to(acc)
        y = _readout(states[1:], u, C, D, acc)
        sig = torch.sigmoid(z_)
        dz = grad_out * y * sig * (1 + z_ * (1 - sig))
        grad_out = grad_out * F.silu(z_)  # now the gradient of y

    du = torch.zeros_like(u_) if D is None else grad_out * D.to(acc)[:, None]
    ddt = torch.zeros_like(dt)
    dA = torch.zeros_like(A_)
    dB, dC = torch.zeros_like(B_), torch.zeros_like(C_)  # per channel, (Bt, Dm, N, L) or (1, Dm, N, 1)
    h = grad_last_state.to(acc)  # gradient of the state x_t, (Bt, Dm, N)
    for t in reversed(range(u.shape[2])):
        gy = grad_out[:, :, t, None]  # (Bt, Dm, 1)
        h = h + gy * _at(C_, t)
        _add_at(dC, t, gy * states[t + 1])
        decay = torch.exp(dt[:, :, t, None] * A_)  # (Bt, Dm, N)
        x_prev = states[t]
        ddt[:, :, t] = (h * (A_ * decay * x_prev + _at(B_, t) * u_[:, :, t, None])).sum(-1)
        dA += (h * dt[:, :, t, None] * decay * x_prev).sum(0)
        _add_at(dB, t, h * (dt[:, :, t] * u_[:, :, t])[..., None])
        du[:, :, t] += dt[:, :, t] * (h * _at(B_, t)).sum(-1)
        h = decay * h

    dD = _empty(u) if D is None else (grad_out * u_).sum((0, 2))
    ddelta = ddt
    if delta_softplus:  # d softplus(v) / dv = sigmoid(v)
        ddelta = ddt * torch.sigmoid(_biased(delta, delta_bias, acc))
    ddelta_bias = _empty(u) if delta_bias is None else ddelta.sum((0, 2))
    return du, ddelta, dA, _per_group(dB, B), _per_group(dC, C), dD, dz, ddelta_bias, h


def selective_state_update(
    state: Tensor,  # (S, H, P, N): slots, heads, head dim, state size; updated in place
    x: Tensor,  # (Bt, H, P)
    dt: Tensor,  # (Bt, H, P)
    A: Tensor,  # (H, P, N)
    B: Tensor,  # (Bt, G, N): head h reads group h // (H / G)
    C: Tensor,  # (Bt, G, N)
    D: Optional[Tensor],  # (H, P)
    z: Optional[Tensor],  # (Bt, H, P)
    dt_bias: Optional[Tensor],  # (H, P)
    dt_softplus: bool,
    state_batch_indices: Optional[Tensor],  # (Bt,): row b's slot of state (-1: a padding row); None: slot b
) -> Tensor:  # y (Bt, H, P) in x's dtype, 0 in padding rows
    """One step of the scan, in place on the rows' state slots: the forward above with L = 1 on
    the Dm = H P channels d = h P + p (channel d reads group d // (Dm / G) = h // (H / G))."""
    batch, heads, dim = x.shape
    slots = torch.arange(batch, device=x.device) if state_batch_indices is None else state_batch_indices.long()
    rows = slots >= 0  # the rows that are not padding
    slots = slots[rows]

    def channels(t: Optional[Tensor]) -> Optional[Tensor]:  # (Bt, H, P) -> (rows, Dm, 1)
        return None if t is None else t[rows].flatten(1)[..., None]

    out, last, _ = selective_scan_fwd(
        channels(x), channels(dt), A.flatten(0, 1), B[rows][..., None], C[rows][..., None],
        None if D is None else D.flatten(), channels(z), None if dt_bias is None else dt_bias.flatten(),
        dt_softplus, state[slots].flatten(1, 2).to(state_dtype(x.dtype)), None, False,
    )
    state[slots] = last.view(-1, heads, dim, A.shape[2]).to(state.dtype)
    y = x.new_zeros(x.shape)
    y[rows] = out.view(-1, heads, dim)
    return y


# ---------------------------------------------------------------------------------------
# Packed sequences: each one run alone through the functions above.


def _packed_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, training):
    """Every sequence from its own initial state; checkpoints hold the packed stream's state
    before steps 0, CHUNK, ... (zeros before step 0: it restarts anyway)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    pieces, lasts, before = [], [], [_initial(u, A, None)]  # before: the state before each step
    for i, (start, end) in enumerate(_spans(cu_seqlens)):
        x0 = _initial(u, A, initial_state, i)
        if start == end:  # an empty sequence ends in its initial state
            lasts.append(x0)
            continue
        out, states = _forward(*_time_slice(inputs, start, end), delta_softplus, x0)
        pieces.append(out)
        lasts.append(states[-1])
        before += states[1:]
    checkpoints = _checkpoints(before[:-1]) if training else _empty(u)
    return torch.cat(pieces, dim=2), torch.cat(lasts), checkpoints


def _packed_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, grad_out,
                grad_last_state):
    """Every sequence's gradients alone: joined along time, summed for the parameters."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    per_sequence, grad_initial = [], []
    for i, (start, end) in enumerate(_spans(cu_seqlens)):
        grad_last = grad_last_state[i : i + 1].to(state_dtype(u.dtype))
        if start == end:  # an empty sequence passes its last state's gradient to its initial state
            grad_initial.append(grad_last)
            continue
        *grads, grad_x0 = selective_scan_bwd(
            *_time_slice(inputs, start, end), delta_softplus, _initial(u, A, initial_state, i), None, _empty(u),
            grad_out[..., start:end], grad_last)
        per_sequence.append(grads)
        grad_initial.append(grad_x0)
    joined = [torch.cat(grads, dim=-1) if _has_time(x) else sum(grads) for x, grads in zip(inputs, zip(*per_sequence))]
    return (*joined, torch.cat(grad_initial))


def _spans(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """(start, end) of every packed sequence."""
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _has_time(x: Optional[Tensor]) -> bool:
    """Whether an input has a time axis (its last): u, delta, z and variable B, C."""
    return x is not None and x.dim() >= 3


def _time_slice(inputs: tuple, start: int, end: int) -> list:
    """The inputs of steps [start, end): time axes sliced, parameters as they are."""
    return [x[..., start:end] if _has_time(x) else x for x in inputs]


# ---------------------------------------------------------------------------------------
# Helpers.


def _empty(u: Tensor) -> Tensor:
    """The (0,) stand-in for a result that does not exist (no checkpoints, no gradient)."""
    return u.new_empty((0,), dtype=state_dtype(u.dtype))


def _biased(delta: Tensor, delta_bias: Optional[Tensor], acc: torch.dtype) -> Tensor:
    delta = delta.to(acc)
    return delta if delta_bias is None else delta + delta_bias.to(acc)[:, None]


def _discretisation_step(delta, delta_bias, delta_softplus, acc) -> Tensor:
    """delta' = softplus(delta + delta_bias) or delta + delta_bias, (Bt, Dm, L)."""
    biased = _biased(delta, delta_bias, acc)
    return F.softplus(biased) if delta_softplus else biased


def _per_channel(BC: Tensor, dims: int, acc: torch.dtype) -> Tensor:
    """B or C for every channel: (Bt, G, N, L) -> (Bt, Dm, N, L); fixed (Dm, N) -> (1, Dm, N, 1)."""
    if BC.dim() == 2:
        return BC.to(acc)[None, :, :, None]
    return BC.to(acc).repeat_interleave(dims // BC.shape[1], dim=1)


def _per_group(grad: Tensor, BC: Tensor) -> Tensor:
    """Sum a per-channel gradient back to the shape of B or C."""
    if BC.dim() == 2:
        return grad[0, :, :, 0]
    batch, dims, n, length = grad.shape
    groups = BC.shape[1]
    return grad.view(batch, groups, dims // groups, n, length).sum(2)


def _at(BC: Tensor, t: int) -> Tensor:
    """Step t of a per-channel B or C: (Bt | 1, Dm, N)."""
    return BC[..., t if BC.shape[3] > 1 else 0]


def _add_at(grad: Tensor, t: int, value: Tensor) -> None:
    """Accumulate the step-t gradient `value` (Bt, Dm, N) into a per-channel B or C gradient."""
    if grad.shape[0] == 1:  # fixed B or C (or batch 1): summed over the batch
        value = value.sum(0, keepdim=True)
    grad[..., t if grad.shape[3] > 1 else 0] += value  # fixed: summed over time too


def _initial(u: Tensor, A: Tensor, initial_state: Optional[Tensor], sequence: Optional[int] = None) -> Tensor:
    """The state before step 0, (Bt, Dm, N); of one packed sequence, (1, Dm, N). Zeros when None."""
    acc = state_dtype(u.dtype)
    if initial_state is None:
        return u.new_zeros((u.shape[0], u.shape[1], A.shape[1]), dtype=acc)
    return initial_state.to(acc) if sequence is None else initial_state[sequence : sequence + 1].to(acc)


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, x0) -> tuple[Tensor, list[Tensor]]:
    """out (Bt, Dm, L) in u's dtype and the states [x_{-1} = x0, x_0, ..., x_{L-1}]."""
    acc = state_dtype(u.dtype)
    dt = _discretisation_step(delta, delta_bias, delta_softplus, acc)  # (Bt, Dm, L)
    states = _states(u.to(acc), dt, A.to(acc), _per_channel(B, u.shape[1], acc), x0)
    y = _readout(states[1:], u, C, D, acc)  # (Bt, Dm, L)
    out = y if z is None else y * F.silu(z.to(acc))
    return out.to(u.dtype), states


def _checkpoints(before: list[Tensor]) -> Tensor:
    """The states before steps 0, CHUNK, 2 CHUNK, ... of the states before every step: (Bt, Dm, chunks, N)."""
    return torch.stack(before[::CHUNK], dim=2)


def _states(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, x: Tensor) -> list[Tensor]:
    """[x_{-1}, x_0, ..., x_{L-1}], each (Bt, Dm, N)."""
    states = [x]
    for t in range(u.shape[2]):
        x = torch.exp(dt[:, :, t, None] * A) * x + (dt[:, :, t] * u[:, :, t])[..., None] * _at(B, t)
        states.append(x)
    return states


def _readout(states: list[Tensor], u: Tensor, C: Tensor, D: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """y_t = sum_n C_t x_t + D u_t for every step, (Bt, Dm, L)."""
    C_ = _per_channel(C, u.shape[1], acc)
    y = torch.stack([(x * _at(C_, t)).sum(-1) for t, x in enumerate(states)], dim=2)
    return y if D is None else y + D.to(acc)[:, None] * u.to(acc)
