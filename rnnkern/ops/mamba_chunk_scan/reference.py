"""Pure-PyTorch Mamba-2 SSD scan, one position at a time: the ground truth for the kernels.

Per batch b, head h (reading group g = h // (H / G) of B and C) and position t, with dt
already biased, softplus'd and clamped by the public function:

    s_t = exp(dt_t A[h]) s_{t-1} + dt_t x_t B_t^T          s: (P, N), x_t: (P,), B_t, C_t: (N,)
    y_t = s_t C_t + D[h] x_t,     out_t = y_t * silu(z_t)

s_{-1} is initial_states (zeros when None). Where seq_idx changes between positions t-1 and
t, s_{t-1} is replaced by zeros: a new packed sequence starts from a zero state.

Every backend implements these two functions with these arguments and results. The kernels
work in chunks of `chunk_size` positions and return `chunk_states` (b, nchunks, h, p, n):
chunk_states[:, c] = s_{c*chunk_size - 1}, the state entering chunk c before any restart at
its first position (chunk_states[:, 0] = s_{-1}). The backward reads them; the public
function also reads them for each packed sequence's final state. State, accumulation and
every gradient are in :func:`rnnkern.ops._common.state_dtype`. This reference keeps all l
states at once; the kernels do not.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkern.ops._common import state_dtype


def num_chunks(length: int, chunk_size: int) -> int:
    return math.ceil(length / chunk_size)


def mamba_chunk_scan_fwd(
    x: Tensor,  # (b, l, h, p)
    dt: Tensor,  # (b, l, h), state dtype, after bias, softplus and clamp
    A: Tensor,  # (h,), state dtype
    B: Tensor,  # (b, l, g, n), x's dtype
    C: Tensor,  # (b, l, g, n), x's dtype
    D: Optional[Tensor],  # (h, p), state dtype
    z: Optional[Tensor],  # (b, l, h, p), x's dtype
    initial_states: Optional[Tensor],  # (b, h, p, n), state dtype
    seq_idx: Optional[Tensor],  # (b, l) int32
    chunk_size: int,
    keep_chunk_states: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # out (b, l, h, p), final_states (b, h, p, n), chunk_states
    acc = state_dtype(x.dtype)
    states = _states(x, dt, A, B, initial_states, seq_idx)
    y = _readout(states[1:], x, C, D)  # (b, l, h, p)
    out = y if z is None else y * F.silu(z.to(acc))
    if keep_chunk_states:  # the state entering positions 0, Q, 2Q, ...: (b, nchunks, h, p, n)
        chunk_states = torch.stack(states[: x.shape[1] : chunk_size], dim=1)
    else:
        chunk_states = x.new_empty((0,), dtype=acc)
    return out.to(x.dtype), states[-1], chunk_states


def mamba_chunk_scan_bwd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    initial_states: Optional[Tensor], seq_idx: Optional[Tensor], chunk_size: int,
    chunk_states: Tensor,  # what the forward kept (unused: this reference recomputes every state)
    grad_out: Tensor,  # (b, l, h, p)
    grad_final_states: Tensor,  # (b, h, p, n)
) -> tuple[Tensor, ...]:  # dx, ddt, dA, dB, dC, dD, dz, dinitial_states ((0,) for a None input)
    """With gy_t = dout_t * silu(z_t) and h_t the gradient of s_t, in reverse:

        h_t = gy_t C_t^T + keep_{t+1} a_{t+1} h_{t+1},   h_{l-1} = gy_{l-1} C_{l-1}^T + d(final_states)
        dC_t = s_t^T gy_t,   dB_t = dt_t h_t^T x_t,   dx_t = dt_t h_t B_t + D gy_t,   dD = sum gy_t x_t
        d a_t = <h_t, keep_t s_{t-1}>,   ddt_t = <h_t, x_t B_t^T> + d a_t a_t A,   dA = sum d a_t a_t dt_t
        d(initial_states) = a_0 h_0,   dz_t = dout_t y_t silu'(z_t)

    where a_t = exp(dt_t A) and keep_t is 0 where a sequence restarts at t, else 1.
    """
    acc = state_dtype(x.dtype)
    heads = x.shape[2]
    xs, Bs, Cs = x.to(acc), _per_head(B, heads, acc), _per_head(C, heads, acc)
    states = _states(x, dt, A, B, initial_states, seq_idx)
    gy, dz = _gate_grads(grad_out.to(acc), _readout(states[1:], x, C, D), z)  # (b, l, h, p)
    decay = torch.exp(dt * A)  # (b, l, h)
    dx, ddt, dB, dC = torch.zeros_like(xs), torch.zeros_like(dt), torch.zeros_like(Bs), torch.zeros_like(Cs)
    dA = torch.zeros_like(A)
    h = grad_final_states.to(acc)  # (b, h, p, n)
    for t in reversed(range(x.shape[1])):
        h = h + gy[:, t, :, :, None] * Cs[:, t, :, None, :]
        dC[:, t] = torch.einsum("bhpn,bhp->bhn", states[t + 1], gy[:, t])
        dB[:, t] = dt[:, t, :, None] * torch.einsum("bhpn,bhp->bhn", h, xs[:, t])
        dx[:, t] = dt[:, t, :, None] * torch.einsum("bhpn,bhn->bhp", h, Bs[:, t])
        previous = _kept(states[t], seq_idx, t)
        d_decay = (h * previous).sum((2, 3)) * decay[:, t]  # (b, h): d a_t times a_t
        ddt[:, t] = torch.einsum("bhpn,bhp,bhn->bh", h, xs[:, t], Bs[:, t]) + d_decay * A
        dA += (d_decay * dt[:, t]).sum(0)
        h = decay[:, t, :, None, None] * h
        if t > 0:
            h = _kept(h, seq_idx, t)  # the gradient reaching s_{t-1}
    if D is not None:
        dx += D * gy
    dD = None if D is None else (gy * xs).sum((0, 1))
    grads = (dx, ddt, dA, _per_group(dB, B), _per_group(dC, C), dD, dz, None if initial_states is None else h)
    return tuple(x.new_empty((0,), dtype=acc) if g is None else g for g in grads)


def _per_head(BC: Tensor, heads: int, acc: torch.dtype) -> Tensor:
    """(b, l, g, n) -> (b, l, h, n): head h reads group h // (h / g)."""
    return BC.to(acc).repeat_interleave(heads // BC.shape[2], dim=2)


def _per_group(grad: Tensor, BC: Tensor) -> Tensor:
    """Sum a per-head gradient (b, l, h, n) back to B's or C's groups (b, l, g, n)."""
    batch, length, heads, n = grad.shape
    groups = BC.shape[2]
    return grad.view(batch, length, groups, heads // groups, n).sum(3)


def _initial(x: Tensor, n: int, initial_states: Optional[Tensor]) -> Tensor:
    acc = state_dtype(x.dtype)
    if initial_states is None:
        batch, _, heads, dim = x.shape
        return x.new_zeros((batch, heads, dim, n), dtype=acc)
    return initial_states.to(acc)


def _kept(state: Tensor, seq_idx: Optional[Tensor], t: int) -> Tensor:
    """state (b, h, p, n) where position t continues the sequence of t - 1, zeros where one starts."""
    if seq_idx is None or t == 0:
        return state
    restarts = (seq_idx[:, t] != seq_idx[:, t - 1]).view(-1, 1, 1, 1)
    return torch.where(restarts, torch.zeros_like(state), state)


def _states(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, initial_states: Optional[Tensor],
            seq_idx: Optional[Tensor]) -> list[Tensor]:
    """[s_{-1}, s_0, ..., s_{l-1}], each (b, h, p, n)."""
    acc = state_dtype(x.dtype)
    xs, Bs = x.to(acc), _per_head(B, x.shape[2], acc)
    states = [_initial(x, B.shape[3], initial_states)]
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        update = (dt[:, t, :, None] * xs[:, t])[..., None] * Bs[:, t, :, None, :]  # (b, h, p, n)
        states.append(decay * _kept(states[-1], seq_idx, t) + update)
    return states


def _readout(states: list[Tensor], x: Tensor, C: Tensor, D: Optional[Tensor]) -> Tensor:
    """y_t = s_t C_t + D x_t for every position, (b, l, h, p), before the gate."""
    acc = state_dtype(x.dtype)
    Cs = _per_head(C, x.shape[2], acc)
    y = torch.stack([torch.einsum("bhpn,bhn->bhp", s, Cs[:, t]) for t, s in enumerate(states)], dim=1)
    return y if D is None else y + D * x.to(acc)


def _gate_grads(grad_out: Tensor, y: Tensor, z: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """(dy, dz) of out = y * silu(z) (out = y without z)."""
    if z is None:
        return grad_out, None
    zs = z.to(y.dtype)
    sig = torch.sigmoid(zs)
    return grad_out * zs * sig, grad_out * y * sig * (1 + zs * (1 - sig))
