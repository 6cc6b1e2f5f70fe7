"""PackedSequence <-> padded batch in the caller's (unsorted) order, plus the lengths.

A PackedSequence stores, for each time step t, the rows of the ``batch_sizes[t]`` longest
sequences in the order ``sorted_indices`` (the longest first). The modules run on a padded
``(B, T, F)`` batch in the original order with per-sequence lengths, and write their output
back into the same packed layout, so batch_sizes, sorted_indices and unsorted_indices carry
over unchanged.
"""
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence


def positions(sequence: PackedSequence) -> tuple[Tensor, Tensor]:
    """(batch row in the original order, time step) of every packed row, each (N,)."""
    batch_sizes = sequence.batch_sizes  # (T,) on the CPU
    device = sequence.data.device
    times = torch.repeat_interleave(torch.arange(batch_sizes.shape[0]), batch_sizes)  # (N,)
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes  # (T,) first packed row of each step
    ranks = (torch.arange(times.shape[0]) - starts[times]).to(device)  # (N,) row within its step
    rows = ranks if sequence.sorted_indices is None else sequence.sorted_indices[ranks]
    return rows, times.to(device)


def unpack(sequence: PackedSequence, rows: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
    """Padded batch (B, T, F), zero past each end, and lengths (B,) int64, in the original order."""
    data = sequence.data  # (N, F)
    batch = int(sequence.batch_sizes[0])
    padded = data.new_zeros((batch, sequence.batch_sizes.shape[0], data.shape[-1]))
    padded = padded.index_put((rows, times), data)
    return padded, torch.bincount(rows, minlength=batch)


def pack(padded: Tensor, like: PackedSequence, rows: Tensor, times: Tensor) -> PackedSequence:
    """The (B, T, F) batch `padded` in the packed layout of `like`."""
    return PackedSequence(padded[rows, times], like.batch_sizes, like.sorted_indices, like.unsorted_indices)
