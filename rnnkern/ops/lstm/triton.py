"""Triton kernels of the LSTM recurrence (math: reference.py).

Two paths, picked by :func:`choose_path` from the padded hidden and projection sizes:

* persistent (both <= PERSISTENT_MAX = 64): one program per tile of 16 sequences runs all
  T steps. W_hh (and W_hr) are loaded once and stay on chip; each step is ``tl.dot`` of
  the carried h with them, fused with the gate math. At 64, W_hh is 4*64*64 values: 32 KB
  in fp16/bf16, 64 KB in fp32, and the backward holds it (and W_hr) in fp32 for every
  input dtype. fp32 operands of tl.dot live in shared memory: the fp32 backward with a
  projection takes 140-156 KB of sm_80's 163 KB per block (``python -m rnnkern.aot``), so
  128 (four times as much) cannot fit; 16-bit forward weights sit in registers, unspilled.
* alternating (any size): per step, one kernel computes h_{t-1} W_hh^T for a tile of
  (sequences, hidden units) and applies the gate math in the same program (plus one GEMM
  kernel for the projection); the backward runs per step one kernel for the gate gradients
  and one for dh_{t-1} = d_gates W_hh.

Both paths multiply 16-bit operands with fp32 accumulation and fp32 operands in full
fp32 (no TF32), as the reference does. The rows of sequence b at step s sit at time s, or
lengths[b]-1-s when reversed; past the end of a sequence a step stays at time s, writes
zeros and leaves the state alone, so every time index of every output is written once.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from rnnkern.ops._sequences import full_lengths

PERSISTENT_MAX = 64  # largest padded hidden/projection size of the persistent path
FORCE_PATH: Optional[str] = None  # "persistent" or "alternating" overrides choose_path (tests)
BLOCK_B_PERSISTENT = 16  # sequences per program; tl.dot needs at least 16 rows
BLOCK_N = 32  # output columns per program of the alternating kernels
BLOCK_K = 32  # reduction chunk of the alternating kernels

# Triton's interpreter multiplies bf16 blocks as raw 16-bit integers and truncates fp32 to
# bf16; under it, _dot widens bf16 operands to fp32 (the products are exact either way) and
# _to rounds to nearest even by hand, so interpreted results match the compiled ones.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ---------------------------------------------------------------------------------------
# Helpers shared with the GRU kernels.


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b, accumulated in fp32; fp32 operands multiply in full fp32 (no TF32)."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _to(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest even in `dtype`."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mm(acc, a_rows, stride_ak, mask_m, w_cols, stride_wk, mask_n, K, BLOCK_K: tl.constexpr):
    """acc + A @ W: row m of A starts at a_rows[m], column n of W at w_cols[n], and both step
    by their stride along k < K. W is cast to A's dtype."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k  # [BLOCK_K]
        mask_k = k < K
        a = tl.load(a_rows[:, None] + k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, w.to(a.dtype), acc)  # [BLOCK_M, BLOCK_N]
    return acc


@triton.jit
def _tanh(x):
    """tanh in fp32 from one exp (tl has no tanh that the interpreter runs as well). The
    clamp keeps exp finite; exp(80) already makes the quotient -1. (A form with tl.abs and
    tl.where crashes LLVM's SLP vectorizer in triton 3.9 for sm_90.)"""
    e = tl.exp(tl.minimum(-2.0 * x, 80.0, propagate_nan=tl.PropagateNan.ALL))
    return (1.0 - e) / (1.0 + e)


@triton.jit
def _step_time(lengths, step, REVERSE: tl.constexpr):
    """Per sequence: the time index of `step` (int64) and whether the step is inside it."""
    active = step < lengths  # [BLOCK_B]
    if REVERSE:
        time = tl.where(active, lengths - 1 - step, step)
    else:
        time = tl.zeros_like(lengths) + step
    return time, active


@triton.jit
def _emit(h_new, active, state_offs, h_in_ptr, h_out_ptr, y_ptr, y_offs, mask):
    """Stores y_t (zero past a sequence's end) and the next carried h (kept past the end)."""
    h_old = tl.load(h_in_ptr + state_offs, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_N]
    h_new = _to(h_new, h_old.dtype)
    tl.store(h_out_ptr + state_offs, tl.where(active[:, None], h_new, h_old), mask=mask)
    tl.store(y_ptr + y_offs, tl.where(active[:, None], h_new, 0.0).to(h_old.dtype), mask=mask)


# ---------------------------------------------------------------------------------------
# LSTM cell math, shared by both paths.


@triton.jit
def _lstm_cell(pre_i, pre_f, pre_g, pre_o, c_prev):
    i = tl.sigmoid(pre_i)
    f = tl.sigmoid(pre_f)
    g = _tanh(pre_g)
    o = tl.sigmoid(pre_o)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * _tanh(c)


@triton.jit
def _lstm_cell_grad(i, f, g, o, c, c_prev, dm, dc):
    """Gradients of the pre-activations and dL/dc_t from dL/dm_t and the carried dL/dc."""
    tanh_c = _tanh(c)
    dc = dc + dm * o * (1.0 - tanh_c * tanh_c)
    d_i = dc * g * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - g * g)
    d_o = dm * tanh_c * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, dc


@triton.jit
def _store_gates(ptrs, H, a, b, c, d, active, mask):
    """Four [BLOCK_B, BLOCK_N] gate tiles H apart, zero past a sequence's end."""
    keep = active[:, None]
    tl.store(ptrs, tl.where(keep, a, 0.0), mask=mask)
    tl.store(ptrs + H, tl.where(keep, b, 0.0), mask=mask)
    tl.store(ptrs + 2 * H, tl.where(keep, c, 0.0), mask=mask)
    tl.store(ptrs + 3 * H, tl.where(keep, d, 0.0), mask=mask)


@triton.jit
def _zero_unless(keep, a, b, c, d):
    return tl.where(keep, a, 0.0), tl.where(keep, b, 0.0), tl.where(keep, c, 0.0), tl.where(keep, d, 0.0)


@triton.jit
def _load_gates(ptrs, H, mask):
    a = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ptrs + H, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(ptrs + 2 * H, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(ptrs + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return a, b, c, d


# ---------------------------------------------------------------------------------------
# Persistent path: one program per tile of sequences, all steps, weights on chip.


@triton.jit
def _lstm_fwd_persistent_kernel(
    gx_ptr, h0_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    y_ptr, h_n_ptr, c_n_ptr, gates_ptr, cells_ptr,
    B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, KEEP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask_b, mask_h, mask_p = offs_b < B, offs_h < H, offs_p < P
    mask_bh = mask_b[:, None] & mask_h[None, :]  # [BLOCK_B, BLOCK_H]
    mask_bp = mask_b[:, None] & mask_p[None, :]  # [BLOCK_B, BLOCK_P]
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    # W_hh^T of each gate, [BLOCK_P, BLOCK_H]: element (p, j) is W_hh[q H + j, p]
    w_offs = offs_h[None, :] * P + offs_p[:, None]
    w_mask = mask_p[:, None] & mask_h[None, :]
    w_i = tl.load(w_hh_ptr + w_offs, mask=w_mask, other=0.0)
    w_f = tl.load(w_hh_ptr + H * P + w_offs, mask=w_mask, other=0.0)
    w_g = tl.load(w_hh_ptr + 2 * H * P + w_offs, mask=w_mask, other=0.0)
    w_o = tl.load(w_hh_ptr + 3 * H * P + w_offs, mask=w_mask, other=0.0)
    if HAS_PROJ:  # W_hr^T, [BLOCK_H, BLOCK_P]: element (j, p) is W_hr[p, j]
        w_r = tl.load(w_hr_ptr + offs_p[None, :] * H + offs_h[:, None], mask=mask_h[:, None] & mask_p[None, :],
                      other=0.0)
    state_h = offs_b[:, None] * P + offs_p[None, :]
    state_c = offs_b[:, None] * H + offs_h[None, :]
    h = tl.load(h0_ptr + state_h, mask=mask_bp, other=0.0)  # [BLOCK_B, BLOCK_P] input dtype
    c = tl.load(c0_ptr + state_c, mask=mask_bh, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_H]
    for step in range(0, T):
        time, active = _step_time(lengths, step, REVERSE)
        rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B] row of the (B, T, ...) tensors
        gx = gx_ptr + rows[:, None] * (4 * H) + offs_h[None, :]
        pre_i, pre_f, pre_g, pre_o = _load_gates(gx, H, mask_bh)
        i, f, g, o, c_new, m = _lstm_cell(_dot(h, w_i, pre_i), _dot(h, w_f, pre_f), _dot(h, w_g, pre_g),
                                          _dot(h, w_o, pre_o), c)
        if HAS_PROJ:
            h_new = _to(_dot(_to(m, h.dtype), w_r, tl.zeros([BLOCK_B, BLOCK_P], dtype=tl.float32)), h.dtype)
        else:
            h_new = _to(m, h.dtype)
        if KEEP:  # the backward's workspace
            _store_gates(gates_ptr + rows[:, None] * (4 * H) + offs_h[None, :], H, i, f, g, o, active, mask_bh)
            tl.store(cells_ptr + rows[:, None] * H + offs_h[None, :], tl.where(active[:, None], c_new, 0.0),
                     mask=mask_bh)
        tl.store(y_ptr + rows[:, None] * P + offs_p[None, :], tl.where(active[:, None], h_new, 0.0).to(h.dtype),
                 mask=mask_bp)
        h = tl.where(active[:, None], h_new, h)
        c = tl.where(active[:, None], c_new, c)
    tl.store(h_n_ptr + state_h, h, mask=mask_bp)
    tl.store(c_n_ptr + state_c, _to(c, c_n_ptr.dtype.element_ty), mask=mask_bh)


@triton.jit
def _lstm_bwd_persistent_kernel(
    w_hh_ptr, w_hr_ptr, c0_ptr, gates_ptr, cells_ptr, grad_y_ptr, grad_h_n_ptr, grad_c_n_ptr, lengths_ptr,
    d_gates_ptr, d_h_ptr, d_h0_ptr, d_c0_ptr,
    B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask_b, mask_h, mask_p = offs_b < B, offs_h < H, offs_p < P
    mask_bh = mask_b[:, None] & mask_h[None, :]  # [BLOCK_B, BLOCK_H]
    mask_bp = mask_b[:, None] & mask_p[None, :]  # [BLOCK_B, BLOCK_P]
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    # W_hh of each gate in fp32, [BLOCK_H, BLOCK_P]: element (j, p) is W_hh[q H + j, p]
    w_offs = offs_h[:, None] * P + offs_p[None, :]
    w_mask = mask_h[:, None] & mask_p[None, :]
    w_i = tl.load(w_hh_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    w_f = tl.load(w_hh_ptr + H * P + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    w_g = tl.load(w_hh_ptr + 2 * H * P + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    w_o = tl.load(w_hh_ptr + 3 * H * P + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    if HAS_PROJ:  # W_hr in fp32, [BLOCK_P, BLOCK_H]
        w_r = tl.load(w_hr_ptr + offs_p[:, None] * H + offs_h[None, :], mask=mask_p[:, None] & mask_h[None, :],
                      other=0.0).to(tl.float32)
    state_h = offs_b[:, None] * P + offs_p[None, :]
    state_c = offs_b[:, None] * H + offs_h[None, :]
    dh = tl.load(grad_h_n_ptr + state_h, mask=mask_bp, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_P]
    dc = tl.load(grad_c_n_ptr + state_c, mask=mask_bh, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_H]
    c0 = tl.load(c0_ptr + state_c, mask=mask_bh, other=0.0).to(tl.float32)
    for k in range(0, T):
        step = T - 1 - k
        time, active = _step_time(lengths, step, REVERSE)
        time_prev, _ = _step_time(lengths, step - 1, REVERSE)
        rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B]
        rows_prev = offs_b.to(tl.int64) * T + time_prev
        y_offs = rows[:, None] * P + offs_p[None, :]
        dh_t = dh + tl.load(grad_y_ptr + y_offs, mask=mask_bp, other=0.0).to(tl.float32)
        if HAS_PROJ:
            dm = _dot(dh_t, w_r, tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32))
        else:
            dm = dh_t
        gate_ptrs = rows[:, None] * (4 * H) + offs_h[None, :]
        i, f, g, o = _load_gates(gates_ptr + gate_ptrs, H, mask_bh)
        c = tl.load(cells_ptr + rows[:, None] * H + offs_h[None, :], mask=mask_bh, other=0.0)
        has_prev = (tl.zeros_like(lengths) + step > 0)[:, None]  # [BLOCK_B, 1]
        c_prev = tl.load(cells_ptr + rows_prev[:, None] * H + offs_h[None, :], mask=mask_bh & has_prev, other=0.0)
        c_prev = tl.where(has_prev, c_prev, c0)
        d_i, d_f, d_g, d_o, dc_t = _lstm_cell_grad(i, f, g, o, c, c_prev, dm, dc)
        keep = active[:, None]
        d_i, d_f, d_g, d_o = _zero_unless(keep, d_i, d_f, d_g, d_o)
        _store_gates(d_gates_ptr + gate_ptrs, H, d_i, d_f, d_g, d_o, active, mask_bh)
        tl.store(d_h_ptr + y_offs, tl.where(keep, dh_t, 0.0), mask=mask_bp)
        # dh <- d_gates W_hh inside a sequence, dh past its end (d_gates are zero there);
        # a tl.where on the product instead crashes LLVM in triton 3.9 for sm_90
        dh = _dot(d_o, w_o, _dot(d_g, w_g, _dot(d_f, w_f, _dot(d_i, w_i, tl.where(keep, 0.0, dh)))))
        dc = tl.where(keep, dc_t * f, dc)
    tl.store(d_h0_ptr + state_h, dh, mask=mask_bp)
    tl.store(d_c0_ptr + state_c, dc, mask=mask_bh)


# ---------------------------------------------------------------------------------------
# Alternating path: per step, kernels over (sequence tile, column tile).


@triton.jit(do_not_specialize=["step"])
def _lstm_fwd_step_kernel(
    gx_ptr, h_in_ptr, h_out_ptr, c_ptr, w_hh_ptr, m_ptr, lengths_ptr, y_ptr, gates_ptr, cells_ptr,
    step, B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, KEEP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_h = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_b, mask_h = offs_b < B, offs_h < H
    mask = mask_b[:, None] & mask_h[None, :]  # [BLOCK_B, BLOCK_N]
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    time, active = _step_time(lengths, step, REVERSE)
    rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B]
    gate_offs = rows[:, None] * (4 * H) + offs_h[None, :]
    pre_i, pre_f, pre_g, pre_o = _load_gates(gx_ptr + gate_offs, H, mask)
    h_rows = h_in_ptr + offs_b * P
    w_cols = w_hh_ptr + offs_h * P  # row j of W_hh's first gate
    pre_i = _mm(pre_i, h_rows, 1, mask_b, w_cols, 1, mask_h, P, BLOCK_K)
    pre_f = _mm(pre_f, h_rows, 1, mask_b, w_cols + H * P, 1, mask_h, P, BLOCK_K)
    pre_g = _mm(pre_g, h_rows, 1, mask_b, w_cols + 2 * H * P, 1, mask_h, P, BLOCK_K)
    pre_o = _mm(pre_o, h_rows, 1, mask_b, w_cols + 3 * H * P, 1, mask_h, P, BLOCK_K)
    state_c = offs_b[:, None] * H + offs_h[None, :]
    c_prev = tl.load(c_ptr + state_c, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_N] fp32
    i, f, g, o, c, m = _lstm_cell(pre_i, pre_f, pre_g, pre_o, c_prev)
    tl.store(c_ptr + state_c, tl.where(active[:, None], c, c_prev), mask=mask)
    if KEEP:  # the backward's workspace
        _store_gates(gates_ptr + gate_offs, H, i, f, g, o, active, mask)
        tl.store(cells_ptr + rows[:, None] * H + offs_h[None, :], tl.where(active[:, None], c, 0.0), mask=mask)
    if HAS_PROJ:  # h_t comes from _lstm_proj_step_kernel
        tl.store(m_ptr + state_c, _to(m, m_ptr.dtype.element_ty), mask=mask)
    else:
        _emit(m, active, state_c, h_in_ptr, h_out_ptr, y_ptr, rows[:, None] * H + offs_h[None, :], mask)


@triton.jit(do_not_specialize=["step"])
def _lstm_proj_step_kernel(
    m_ptr, w_hr_ptr, h_in_ptr, h_out_ptr, lengths_ptr, y_ptr,
    step, B, T, H, P,
    REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_p = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_b, mask_p = offs_b < B, offs_p < P
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    time, active = _step_time(lengths, step, REVERSE)
    rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B]
    h = _mm(tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), m_ptr + offs_b * H, 1, mask_b,
            w_hr_ptr + offs_p * H, 1, mask_p, H, BLOCK_K)  # [BLOCK_B, BLOCK_N]
    _emit(h, active, offs_b[:, None] * P + offs_p[None, :], h_in_ptr, h_out_ptr, y_ptr,
          rows[:, None] * P + offs_p[None, :], mask_b[:, None] & mask_p[None, :])


@triton.jit(do_not_specialize=["step"])
def _lstm_bwd_step_kernel(
    gates_ptr, cells_ptr, c0_ptr, w_hr_ptr, grad_y_ptr, dh_ptr, dc_ptr, lengths_ptr, d_gates_ptr,
    step, B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d_gates at `step` and the carried dL/dc; dh is still the one from the step after."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_h = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_b, mask_h = offs_b < B, offs_h < H
    mask = mask_b[:, None] & mask_h[None, :]  # [BLOCK_B, BLOCK_N]
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    time, active = _step_time(lengths, step, REVERSE)
    time_prev, _ = _step_time(lengths, step - 1, REVERSE)
    rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B]
    if HAS_PROJ:  # dm = (dh + grad_y_t) W_hr
        dm = _mm(tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), dh_ptr + offs_b * P, 1, mask_b,
                 w_hr_ptr + offs_h, H, mask_h, P, BLOCK_K)
        dm = _mm(dm, grad_y_ptr + rows * P, 1, mask_b, w_hr_ptr + offs_h, H, mask_h, P, BLOCK_K)
    else:
        dm = tl.load(dh_ptr + offs_b[:, None] * P + offs_h[None, :], mask=mask, other=0.0)
        dm += tl.load(grad_y_ptr + rows[:, None] * P + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    gate_offs = rows[:, None] * (4 * H) + offs_h[None, :]
    i, f, g, o = _load_gates(gates_ptr + gate_offs, H, mask)
    c = tl.load(cells_ptr + rows[:, None] * H + offs_h[None, :], mask=mask, other=0.0)
    rows_prev = offs_b.to(tl.int64) * T + time_prev
    has_prev = (tl.zeros_like(lengths) + step > 0)[:, None]  # [BLOCK_B, 1]
    c_prev = tl.load(cells_ptr + rows_prev[:, None] * H + offs_h[None, :], mask=mask & has_prev, other=0.0)
    c0 = tl.load(c0_ptr + offs_b[:, None] * H + offs_h[None, :], mask=mask & ~has_prev, other=0.0)
    c_prev = tl.where(has_prev, c_prev, c0.to(tl.float32))
    state_c = offs_b[:, None] * H + offs_h[None, :]
    dc = tl.load(dc_ptr + state_c, mask=mask, other=0.0)
    d_i, d_f, d_g, d_o, dc_t = _lstm_cell_grad(i, f, g, o, c, c_prev, dm, dc)
    _store_gates(d_gates_ptr + gate_offs, H, d_i, d_f, d_g, d_o, active, mask)
    tl.store(dc_ptr + state_c, tl.where(active[:, None], dc_t * f, dc), mask=mask)


@triton.jit(do_not_specialize=["step"])
def _lstm_bwd_hidden_kernel(
    d_gates_ptr, w_hh_ptr, grad_y_ptr, dh_ptr, lengths_ptr, d_h_ptr,
    step, B, T, H, P,
    REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dL/dh_t at `step` for the output, and the carried dh <- d_gates W_hh."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_p = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_b, mask_p = offs_b < B, offs_p < P
    mask = mask_b[:, None] & mask_p[None, :]  # [BLOCK_B, BLOCK_N]
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    time, active = _step_time(lengths, step, REVERSE)
    rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B]
    state_h = offs_b[:, None] * P + offs_p[None, :]
    y_offs = rows[:, None] * P + offs_p[None, :]
    dh = tl.load(dh_ptr + state_h, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_N] fp32
    dh_t = dh + tl.load(grad_y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_h_ptr + y_offs, tl.where(active[:, None], dh_t, 0.0), mask=mask)
    dh_prev = _mm(tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), d_gates_ptr + rows * (4 * H), 1, mask_b,
                  w_hh_ptr + offs_p, P, mask_p, 4 * H, BLOCK_K)
    tl.store(dh_ptr + state_h, tl.where(active[:, None], dh_prev, dh), mask=mask)


# ---------------------------------------------------------------------------------------
# Host launchers.


def padded(size: int) -> int:
    """A hidden size as a tl.dot dimension: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(size))


def choose_path(hidden: int, proj: int) -> str:
    """'persistent' when W_hh (4H, P) and W_hr (P, H) fit on chip, else 'alternating'."""
    if FORCE_PATH is not None:
        return FORCE_PATH
    return "persistent" if max(padded(hidden), padded(proj)) <= PERSISTENT_MAX else "alternating"


def alternating_grid(batch: int, columns: int) -> tuple[tuple[int, int], int]:
    """Grid and sequence tile of an alternating kernel over (batch, columns)."""
    block_b = min(32, padded(batch))
    return (triton.cdiv(batch, block_b), triton.cdiv(columns, BLOCK_N)), block_b


def lstm_fwd(gx, h0, c0, w_hh, w_hr, lengths, reverse, training):
    """Without `training` the kernels store no workspace: gates and cells come back empty."""
    B, T, G = gx.shape
    H, P = G // 4, h0.shape[1]
    gx, h0, c0, w_hh = (t.contiguous() for t in (gx, h0, c0, w_hh))
    w_hr = w_hr.contiguous() if w_hr is not None else None
    lengths = full_lengths(B, T, gx.device) if lengths is None else lengths.contiguous()
    y = gx.new_empty((B, T, P))
    gates = gx.new_empty((B, T, G) if training else (0,), dtype=torch.float32)
    cells = gx.new_empty((B, T, H) if training else (0,), dtype=torch.float32)
    if choose_path(H, P) == "persistent":
        h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
        _lstm_fwd_persistent_kernel[(triton.cdiv(B, BLOCK_B_PERSISTENT),)](
            gx, h0, c0, w_hh, w_hr, lengths, y, h_n, c_n, gates, cells, B, T, H, P,
            HAS_PROJ=w_hr is not None, REVERSE=reverse, KEEP=training,
            BLOCK_B=BLOCK_B_PERSISTENT, BLOCK_H=padded(H), BLOCK_P=padded(P),
        )
        return y, h_n, c_n, gates, cells
    h_n, c = _lstm_fwd_alternating(gx, h0, c0, w_hh, w_hr, lengths, reverse, y, gates, cells, training)
    return y, h_n, c.to(gx.dtype), gates, cells


def _lstm_fwd_alternating(gx, h0, c0, w_hh, w_hr, lengths, reverse, y, gates, cells, keep):
    """Runs the steps; returns h_n and the fp32 c_n. h ping-pongs between two buffers."""
    B, T, _ = gx.shape
    H, P = c0.shape[1], h0.shape[1]
    h = [h0.clone(), torch.empty_like(h0)]
    c = c0.to(torch.float32, copy=True)
    m = gx.new_empty((B, H)) if w_hr is not None else None
    grid_h, block_b = alternating_grid(B, H)
    grid_p, _ = alternating_grid(B, P)
    sizes = dict(BLOCK_B=block_b, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    for step in range(T):
        h_in, h_out = h[step % 2], h[(step + 1) % 2]
        _lstm_fwd_step_kernel[grid_h](
            gx, h_in, h_out, c, w_hh, m, lengths, y, gates, cells, step, B, T, H, P,
            HAS_PROJ=w_hr is not None, REVERSE=reverse, KEEP=keep, **sizes,
        )
        if w_hr is not None:
            _lstm_proj_step_kernel[grid_p](m, w_hr, h_in, h_out, lengths, y, step, B, T, H, P,
                                           REVERSE=reverse, **sizes)
    return h[T % 2], c


def lstm_bwd(w_hh, w_hr, c0, gates, cells, grad_y, grad_h_n, grad_c_n, lengths, reverse):
    B, T, G = gates.shape
    H, P = G // 4, grad_y.shape[2]
    w_hh, c0, gates, cells, grad_y = (t.contiguous() for t in (w_hh, c0, gates, cells, grad_y))
    w_hr = w_hr.contiguous() if w_hr is not None else None
    lengths = full_lengths(B, T, gates.device) if lengths is None else lengths.contiguous()
    d_gates = torch.empty_like(gates)
    d_h = gates.new_empty((B, T, P))
    # the carried gradients, updated in place: dL/dh_T, dL/dc_T in, dL/dh_0, dL/dc_0 out
    dh = grad_h_n.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    dc = grad_c_n.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if choose_path(H, P) == "persistent":
        _lstm_bwd_persistent_kernel[(triton.cdiv(B, BLOCK_B_PERSISTENT),)](
            w_hh, w_hr, c0, gates, cells, grad_y, dh, dc, lengths, d_gates, d_h, dh, dc, B, T, H, P,
            HAS_PROJ=w_hr is not None, REVERSE=reverse,
            BLOCK_B=BLOCK_B_PERSISTENT, BLOCK_H=padded(H), BLOCK_P=padded(P),
        )
        return d_gates, d_h, dh, dc
    grid_h, block_b = alternating_grid(B, H)
    grid_p, _ = alternating_grid(B, P)
    sizes = dict(BLOCK_B=block_b, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    for step in reversed(range(T)):
        _lstm_bwd_step_kernel[grid_h](
            gates, cells, c0, w_hr, grad_y, dh, dc, lengths, d_gates, step, B, T, H, P,
            HAS_PROJ=w_hr is not None, REVERSE=reverse, **sizes,
        )
        _lstm_bwd_hidden_kernel[grid_p](d_gates, w_hh, grad_y, dh, lengths, d_h, step, B, T, H, P,
                                        REVERSE=reverse, **sizes)
    return d_gates, d_h, dh, dc


def aot_specs():
    """(kernel, argument types, constexprs) cases for the ahead-of-time compile check."""
    sizes = {name: "i32" for name in ("step", "B", "T", "H", "P")}
    largest = dict(BLOCK_B=BLOCK_B_PERSISTENT, BLOCK_H=PERSISTENT_MAX, BLOCK_P=PERSISTENT_MAX)
    for dtype, proj, reverse, block_b, keep in (("fp32", True, False, 32, True), ("bf16", True, True, 32, False),
                                                ("fp16", False, True, 16, True)):
        x = f"*{dtype}"
        flags = dict(REVERSE=reverse)
        alternating = dict(BLOCK_B=block_b, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        types = {
            "gx_ptr": x, "h0_ptr": x, "c0_ptr": x, "w_hh_ptr": x, "w_hr_ptr": x, "lengths_ptr": "*i64",
            "y_ptr": x, "h_n_ptr": x, "c_n_ptr": x, "gates_ptr": "*fp32", "cells_ptr": "*fp32",
            "grad_y_ptr": x, "grad_h_n_ptr": "*fp32", "grad_c_n_ptr": "*fp32", "d_gates_ptr": "*fp32",
            "d_h_ptr": "*fp32", "d_h0_ptr": "*fp32", "d_c0_ptr": "*fp32",
            "h_in_ptr": x, "h_out_ptr": x, "c_ptr": "*fp32", "m_ptr": x, "dh_ptr": "*fp32", "dc_ptr": "*fp32",
            **sizes,
        }
        yield _lstm_fwd_persistent_kernel, types, {**flags, "HAS_PROJ": proj, "KEEP": keep, **largest}
        yield _lstm_bwd_persistent_kernel, types, {**flags, "HAS_PROJ": proj, **largest}
        yield _lstm_fwd_step_kernel, types, {**flags, "HAS_PROJ": proj, "KEEP": keep, **alternating}
        yield _lstm_bwd_step_kernel, types, {**flags, "HAS_PROJ": proj, **alternating}
        yield _lstm_bwd_hidden_kernel, types, {**flags, **alternating}
        if proj:
            yield _lstm_proj_step_kernel, types, {**flags, **alternating}
