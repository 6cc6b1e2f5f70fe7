"""Triton helpers shared by the LSTM, GRU and selective-scan kernels: fp32-accumulating dot
products and rounding that behave the same compiled and interpreted, a tanh the interpreter runs,
per-sequence time indexing, and the tile sizes of the recurrences' two paths (persistent and
alternating, see rnnkern/ops/lstm/triton.py)."""
import os

import torch
import triton
import triton.language as tl

PERSISTENT_MAX = 64  # largest padded hidden/projection size of the recurrences' persistent path
BLOCK_B_PERSISTENT = 16  # sequences per program of a persistent kernel; tl.dot needs at least 16 rows
BLOCK_N = 32  # output columns per program of the alternating kernels
BLOCK_K = 32  # reduction chunk of the alternating kernels

# Triton's interpreter multiplies bf16 blocks as raw 16-bit integers and truncates fp32 to
# bf16; under it, dot widens bf16 operands to fp32 (the products are exact either way) and
# to rounds to nearest even by hand, so interpreted results match the compiled ones.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot(a, b, acc):
    """acc + a @ b, accumulated in fp32; fp32 operands multiply in full fp32 (no TF32)."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def to(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest even in `dtype`."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mm(acc, a_rows, stride_ak, mask_m, w_cols, stride_wk, mask_n, K, BLOCK_K: tl.constexpr):
    """acc + A @ W: row m of A starts at a_rows[m], column n of W at w_cols[n], and both step
    by their stride along k < K. W is cast to A's dtype."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k  # [BLOCK_K]
        mask_k = k < K
        a = tl.load(a_rows[:, None] + k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a, w.to(a.dtype), acc)  # [BLOCK_M, BLOCK_N]
    return acc


@triton.jit
def tanh(x):
    """tanh in fp32 from one exp (tl has no tanh that the interpreter runs as well). The
    clamp keeps exp finite; exp(80) already makes the quotient -1. (A form with tl.abs and
    tl.where crashes LLVM's SLP vectorizer in triton 3.9 for sm_90.)"""
    e = tl.exp(tl.minimum(-2.0 * x, 80.0, propagate_nan=tl.PropagateNan.ALL))
    return (1.0 - e) / (1.0 + e)


@triton.jit
def step_time(lengths, step, REVERSE: tl.constexpr):
    """Per sequence: the time index of `step` (int64) and whether the step is inside it."""
    active = step < lengths  # [BLOCK_B]
    if REVERSE:
        time = tl.where(active, lengths - 1 - step, step)
    else:
        time = tl.zeros_like(lengths) + step
    return time, active


@triton.jit
def persistent_tile(lengths_ptr, B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile of a persistent kernel: sequences offs_b [BLOCK_B] (program axis 0), all columns
    offs_n [BLOCK_N] of N, their masks and the tile's, and the sequences' lengths."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_b, mask_n = offs_b < B, offs_n < N
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    return offs_b, offs_n, mask_b, mask_n, mask_b[:, None] & mask_n[None, :], lengths


@triton.jit
def step_tile(lengths_ptr, step, B, T, N, REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile of an alternating kernel at `step`: sequences offs_b [BLOCK_B] (program axis 0)
    and columns offs_n [BLOCK_N] of N (axis 1) with their masks and the tile's, the sequences'
    lengths, whether each is inside its sequence, and its row b * T + time (int64) in the
    (B, T, ...) tensors."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_b, mask_n = offs_b < B, offs_n < N
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    time, active = step_time(lengths, step, REVERSE)
    rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B]
    return offs_b, offs_n, mask_b, mask_n, mask_b[:, None] & mask_n[None, :], lengths, active, rows


@triton.jit
def emit(h_new, active, state_offs, h_in_ptr, h_out_ptr, y_ptr, y_offs, mask):
    """Stores y_t (zero past a sequence's end) and the next carried h (kept past the end)."""
    h_old = tl.load(h_in_ptr + state_offs, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_N]
    h_new = to(h_new, h_old.dtype)
    tl.store(h_out_ptr + state_offs, tl.where(active[:, None], h_new, h_old), mask=mask)
    tl.store(y_ptr + y_offs, tl.where(active[:, None], h_new, 0.0).to(h_old.dtype), mask=mask)


# ---------------------------------------------------------------------------------------
# Launch shapes of the recurrences.


def padded(size: int) -> int:
    """A hidden size as a tl.dot dimension: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(size))


def alternating_grid(batch: int, columns: int) -> tuple[tuple[int, int], int]:
    """Grid and sequence tile of an alternating kernel over (batch, columns)."""
    block_b = min(32, padded(batch))
    return (triton.cdiv(batch, block_b), triton.cdiv(columns, BLOCK_N)), block_b


def dot_precision() -> str:
    """How fp32 tl.dot operands multiply: "tf32" where torch lets fp32 matmuls use TF32
    (``torch.backends.cuda.matmul.allow_tf32``, which ``torch.set_float32_matmul_precision``
    "high"/"medium" also sets), else "ieee" (torch's default), as cuBLAS does."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


PATHS = ("persistent", "alternating")


def path_for(fits_on_chip: bool, path) -> str:
    """The recurrence path a launcher runs: `path` when given (one of PATHS), else persistent
    where the weights fit on chip."""
    if path is None:
        return "persistent" if fits_on_chip else "alternating"
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    return path
