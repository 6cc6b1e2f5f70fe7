"""Packed sequences (batch 1, sequences back to back along l, cu_seqlens their offsets): the
position-to-sequence index the kernels read, and each sequence's final state from the chunk
states a scan kept. Torch ops on the scan's inputs, the same for every backend."""
import torch
from torch import Tensor


def sequence_index(cu_seqlens: Tensor, length: int) -> Tensor:
    """(1, l) int32: the sequence each position belongs to (empty sequences own none)."""
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True).to(torch.int32)[None]


def sequence_final_states(
    x: Tensor,  # (1, l, h, p)
    step: Tensor,  # (1, l, h): dt after bias, softplus and clamp, state dtype
    A: Tensor,  # (h,), state dtype
    B: Tensor,  # (1, l, g, n)
    cu_seqlens: Tensor,  # (s + 1,)
    chunk_states: Tensor,  # (1, nchunks, h, p, n): the state entering each chunk
    chunk_size: int,
) -> Tensor:  # (s, h, p, n): the state after each sequence's last position (zeros if empty)
    """The state at a sequence's last position e, in chunk c: the decayed state entering c,
    where the sequence began before c, plus the updates of its positions in c up to e."""
    acc, heads = A.dtype, x.shape[2]
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()  # (s,), ends exclusive
    last = ends - 1
    chunk = last.clamp(min=0) // chunk_size  # (s,)
    first = chunk * chunk_size
    window = first[:, None] + torch.arange(chunk_size, device=x.device)  # (s, Q)
    valid = (window >= starts[:, None]) & (window <= last[:, None])  # (s, Q)
    window = window.clamp(max=x.shape[1] - 1)
    dt = torch.where(valid[..., None], step[0, window], 0)  # (s, Q, h)
    log_decay = (dt * A).cumsum(1)  # (s, Q, h)
    at_end = log_decay.gather(1, (last - first).clamp(min=0)[:, None, None].expand(-1, 1, heads))  # (s, 1, h)
    weights = torch.exp(at_end - log_decay) * dt  # (s, Q, h); zero off the sequence
    inputs = x[0, window].to(acc)  # (s, Q, h, p)
    keys = B[0, window].to(x.dtype).to(acc).repeat_interleave(heads // B.shape[2], dim=2)  # (s, Q, h, n)
    states = torch.einsum("sqh,sqhp,sqhn->shpn", weights, inputs, keys)
    carries = (starts < first) | ((starts == 0) & (ends > 0))  # (s,): the state entering c is its own
    entering = chunk_states[0, chunk] * torch.exp(at_end[:, 0])[..., None, None]  # (s, h, p, n)
    return states + torch.where(carries[:, None, None, None], entering, 0)
