"""Triton kernels of the LSTM recurrence (math: reference.py).

Two paths, picked by :func:`choose_path` from the padded hidden and projection sizes and the
device's shared memory per block:

* persistent (both <= PERSISTENT_MAX = 64, and :func:`persistent_shared_bytes` fits the
  device): one program per tile of 16 sequences runs all T steps. W_hh (and W_hr) are loaded
  once and stay on chip in the input dtype; each step is ``tl.dot`` of the carried h with
  them, fused with the gate math. At 64, W_hh is 4*64*64 values: 32 KB in fp16/bf16, 64 KB in
  fp32. fp32 operands of tl.dot live in shared memory, so 128 (four times as much) cannot fit;
  where a kernel's estimate exceeds the device's shared memory per block, that direction
  takes the alternating path (the fp32 backward at 64: 128 KB estimated, 124 KB compiled, over
  sm_86/sm_89's 99 KB).
* alternating (any size): the forward launches per step one kernel that computes
  h_{t-1} W_hh^T for a tile of (sequences, hidden units) and applies the gate math and the
  state update in the same program. A projection adds a second kernel per step, h_t = m_t
  W_hr^T: it needs all of m_t, which the first kernel's programs write tile by tile, and
  Triton has no grid-wide barrier. The backward launches one kernel per step: launch s takes
  the d_gates of step s+1 (written by the launch before) to dL/dh_s = grad_y_s + d_gates_{s+1}
  W_hh, then forms the d_gates of step s; a last launch (s = -1) finishes dL/dh_0. With a
  projection, dL/dm_s = dL/dh_s W_hr is one GEMM with W_hh W_hr (4H, H), formed once per call,
  so no launch needs another's output of the same step.

Matrix products accumulate in fp32 with operands in the input dtype: 16-bit layers multiply
16-bit operands (the backward rounds its fp32 gradients to the input dtype for the product
only, as cuDNN does, and keeps the d_gates workspace that feeds the weight gradients in fp32).
Measured at B = 40, T = 8, H = 96 (P = 80) against fp64, in units of the test tolerance: no
output or gradient is more than 0.21 units further off than the 16-bit reference itself (its
weight gradients are 0.7-2.9 units off, its outputs and input/state gradients below 0.4);
against that reference, which multiplies fp32 gradients, the weight gradients differ by up to
1.4 units (fp16 GRU W_ih), where fp32 operands would differ by at most 0.5: the tests compare
16-bit weight gradients with fp64 (tests/ops/test_lstm_gru.py). fp32 layers multiply fp32
operands as torch allows (PRECISION: "tf32" under ``torch.backends.cuda.matmul.allow_tf32``,
else "ieee").

The rows of sequence b at step s sit at time s, or lengths[b]-1-s when reversed; past the end
of a sequence a step stays at time s, writes zeros and leaves the state alone, so every time
index of every output is written once. Offsets are int64; lengths (T, step) are not
specialised on.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from rnnkern.ops._sequences import full_lengths
from rnnkern.ops._triton import (
    BLOCK_B_PERSISTENT, BLOCK_K, BLOCK_N, PERSISTENT_FWD_WARPS, alternating_grid, dot, emit, mm, padded, path_for,
    persistent_bytes, persistent_tile, precision_for, run_steps, step_tile, step_time, tanh, to, with_tf32,
)

# ---------------------------------------------------------------------------------------
# LSTM cell math, shared by both paths.


@triton.jit
def _lstm_cell(pre_i, pre_f, pre_g, pre_o, c_prev):
    i = tl.sigmoid(pre_i)
    f = tl.sigmoid(pre_f)
    g = tanh(pre_g)
    o = tl.sigmoid(pre_o)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * tanh(c)


@triton.jit
def _lstm_cell_grad(i, f, g, o, c, c_prev, dm, dc):
    """Gradients of the pre-activations and dL/dc_t from dL/dm_t and the carried dL/dc."""
    tanh_c = tanh(c)
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


@triton.jit(do_not_specialize=["T"])
def _lstm_fwd_persistent_kernel(
    gx_ptr, h0_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    y_ptr, h_n_ptr, c_n_ptr, gates_ptr, cells_ptr,
    B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, KEEP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_b, offs_h, mask_b, mask_h, mask_bh, lengths = persistent_tile(lengths_ptr, B, H, BLOCK_B, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    mask_bp = mask_b[:, None] & mask_p[None, :]  # [BLOCK_B, BLOCK_P]
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
        time, active = step_time(lengths, step, REVERSE)
        rows = offs_b * T + time  # [BLOCK_B] int64 row of the (B, T, ...) tensors
        gx = gx_ptr + rows[:, None] * (4 * H) + offs_h[None, :]
        pre_i, pre_f, pre_g, pre_o = _load_gates(gx, H, mask_bh)
        i, f, g, o, c_new, m = _lstm_cell(dot(h, w_i, pre_i, PRECISION), dot(h, w_f, pre_f, PRECISION),
                                          dot(h, w_g, pre_g, PRECISION), dot(h, w_o, pre_o, PRECISION), c)
        if HAS_PROJ:
            h_new = to(dot(m, w_r, tl.zeros([BLOCK_B, BLOCK_P], dtype=tl.float32), PRECISION), h.dtype)
        else:
            h_new = to(m, h.dtype)
        if KEEP:  # the backward's workspace
            _store_gates(gates_ptr + rows[:, None] * (4 * H) + offs_h[None, :], H, i, f, g, o, active, mask_bh)
            tl.store(cells_ptr + rows[:, None] * H + offs_h[None, :], tl.where(active[:, None], c_new, 0.0),
                     mask=mask_bh)
        tl.store(y_ptr + rows[:, None] * P + offs_p[None, :], tl.where(active[:, None], h_new, 0.0).to(h.dtype),
                 mask=mask_bp)
        h = tl.where(active[:, None], h_new, h)
        c = tl.where(active[:, None], c_new, c)
    tl.store(h_n_ptr + state_h, h, mask=mask_bp)
    tl.store(c_n_ptr + state_c, to(c, c_n_ptr.dtype.element_ty), mask=mask_bh)


@triton.jit(do_not_specialize=["T"])
def _lstm_bwd_persistent_kernel(
    w_hh_ptr, w_hr_ptr, c0_ptr, gates_ptr, cells_ptr, grad_y_ptr, grad_h_n_ptr, grad_c_n_ptr, lengths_ptr,
    d_gates_ptr, d_h_ptr, d_h0_ptr, d_c0_ptr,
    B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_b, offs_h, mask_b, mask_h, mask_bh, lengths = persistent_tile(lengths_ptr, B, H, BLOCK_B, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    mask_bp = mask_b[:, None] & mask_p[None, :]  # [BLOCK_B, BLOCK_P]
    # W_hh of each gate in the input dtype, [BLOCK_H, BLOCK_P]: element (j, p) is W_hh[q H + j, p]
    w_offs = offs_h[:, None] * P + offs_p[None, :]
    w_mask = mask_h[:, None] & mask_p[None, :]
    w_i = tl.load(w_hh_ptr + w_offs, mask=w_mask, other=0.0)
    w_f = tl.load(w_hh_ptr + H * P + w_offs, mask=w_mask, other=0.0)
    w_g = tl.load(w_hh_ptr + 2 * H * P + w_offs, mask=w_mask, other=0.0)
    w_o = tl.load(w_hh_ptr + 3 * H * P + w_offs, mask=w_mask, other=0.0)
    if HAS_PROJ:  # W_hr, [BLOCK_P, BLOCK_H]
        w_r = tl.load(w_hr_ptr + offs_p[:, None] * H + offs_h[None, :], mask=mask_p[:, None] & mask_h[None, :],
                      other=0.0)
    state_h = offs_b[:, None] * P + offs_p[None, :]
    state_c = offs_b[:, None] * H + offs_h[None, :]
    dh = tl.load(grad_h_n_ptr + state_h, mask=mask_bp, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_P]
    dc = tl.load(grad_c_n_ptr + state_c, mask=mask_bh, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_H]
    c0 = tl.load(c0_ptr + state_c, mask=mask_bh, other=0.0).to(tl.float32)
    for k in range(0, T):
        step = T - 1 - k
        time, active = step_time(lengths, step, REVERSE)
        time_prev, _ = step_time(lengths, step - 1, REVERSE)
        rows = offs_b * T + time  # [BLOCK_B] int64
        rows_prev = offs_b * T + time_prev
        y_offs = rows[:, None] * P + offs_p[None, :]
        dh_t = dh + tl.load(grad_y_ptr + y_offs, mask=mask_bp, other=0.0).to(tl.float32)
        if HAS_PROJ:
            dm = dot(dh_t, w_r, tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32), PRECISION)
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
        dh = dot(d_o, w_o, dot(d_g, w_g, dot(d_f, w_f, dot(d_i, w_i, tl.where(keep, 0.0, dh), PRECISION),
                                             PRECISION), PRECISION), PRECISION)
        dc = tl.where(keep, dc_t * f, dc)
    tl.store(d_h0_ptr + state_h, dh, mask=mask_bp)
    tl.store(d_c0_ptr + state_c, dc, mask=mask_bh)


# ---------------------------------------------------------------------------------------
# Alternating path: per step, kernels over (sequence tile, column tile).


@triton.jit(do_not_specialize=["step", "T"])
def _lstm_fwd_step_kernel(
    gx_ptr, h_in_ptr, h_out_ptr, c_ptr, w_hh_ptr, m_ptr, lengths_ptr, y_ptr, gates_ptr, cells_ptr,
    step, B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, KEEP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step `step`: pre-gates gx_t + h_{t-1} W_hh^T for the tile, the gates, c_t, m_t."""
    offs_b, offs_h, mask_b, mask_h, mask, lengths, active, rows = step_tile(
        lengths_ptr, step, B, T, H, tl.program_id(1), REVERSE, BLOCK_B, BLOCK_N)  # [BLOCK_B], [BLOCK_N]
    gate_offs = rows[:, None] * (4 * H) + offs_h[None, :]
    pre_i, pre_f, pre_g, pre_o = _load_gates(gx_ptr + gate_offs, H, mask)
    h_rows = h_in_ptr + offs_b * P
    pre_i = mm(pre_i, h_rows, 1, mask_b, w_hh_ptr + offs_h * P, 1, mask_h, P, BLOCK_K, PRECISION)
    pre_f = mm(pre_f, h_rows, 1, mask_b, w_hh_ptr + (H + offs_h) * P, 1, mask_h, P, BLOCK_K, PRECISION)
    pre_g = mm(pre_g, h_rows, 1, mask_b, w_hh_ptr + (2 * H + offs_h) * P, 1, mask_h, P, BLOCK_K, PRECISION)
    pre_o = mm(pre_o, h_rows, 1, mask_b, w_hh_ptr + (3 * H + offs_h) * P, 1, mask_h, P, BLOCK_K, PRECISION)
    state_c = offs_b[:, None] * H + offs_h[None, :]
    c_prev = tl.load(c_ptr + state_c, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_N] fp32
    i, f, g, o, c, m = _lstm_cell(pre_i, pre_f, pre_g, pre_o, c_prev)
    tl.store(c_ptr + state_c, tl.where(active[:, None], c, c_prev), mask=mask)
    if KEEP:  # the backward's workspace
        _store_gates(gates_ptr + gate_offs, H, i, f, g, o, active, mask)
        tl.store(cells_ptr + rows[:, None] * H + offs_h[None, :], tl.where(active[:, None], c, 0.0), mask=mask)
    if HAS_PROJ:  # h_t comes from _lstm_proj_step_kernel
        tl.store(m_ptr + state_c, to(m, m_ptr.dtype.element_ty), mask=mask)
    else:
        emit(m, active, state_c, h_in_ptr, h_out_ptr, y_ptr, rows[:, None] * H + offs_h[None, :], mask)


@triton.jit(do_not_specialize=["step", "T"])
def _lstm_proj_step_kernel(
    m_ptr, w_hr_ptr, h_in_ptr, h_out_ptr, lengths_ptr, y_ptr,
    step, B, T, H, P,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step `step`: h_t = m_t W_hr^T for the tile."""
    offs_b, offs_p, mask_b, mask_p, mask, lengths, active, rows = step_tile(
        lengths_ptr, step, B, T, P, tl.program_id(1), REVERSE, BLOCK_B, BLOCK_N)  # [BLOCK_B], [BLOCK_N]
    h = mm(tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), m_ptr + offs_b * H, 1, mask_b,
           w_hr_ptr + offs_p * H, 1, mask_p, H, BLOCK_K, PRECISION)  # [BLOCK_B, BLOCK_N]
    emit(h, active, offs_b[:, None] * P + offs_p[None, :], h_in_ptr, h_out_ptr, y_ptr,
         rows[:, None] * P + offs_p[None, :], mask)


@triton.jit(do_not_specialize=["step", "T"])
def _lstm_bwd_step_kernel(
    gates_ptr, cells_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, w_hhr_ptr, grad_y_ptr, grad_h_n_ptr, dc_ptr, lengths_ptr,
    d_gates_ptr, d_h_ptr, d_h0_ptr,
    step, B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Launch `step` (T-1 down to 0, then -1): dL/dh_step from the d_gates of step + 1, then
    the d_gates of `step` and the carried dL/dc; at step -1 only dL/dh_0. Without a projection
    a program does both for its columns; with one, the programs of axis 1 past the H tiles
    form dL/dh (P columns) and the others dL/dm from W_hh W_hr (`w_hhr`, (4H, H))."""
    tiles_h = tl.cdiv(H, BLOCK_N)
    if not HAS_PROJ:
        dh_t = _lstm_bwd_hidden(w_hh_ptr, d_gates_ptr, grad_y_ptr, grad_h_n_ptr, lengths_ptr, d_h_ptr, d_h0_ptr,
                                tl.program_id(1), step, B, T, H, P, REVERSE, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        if step >= 0:
            _lstm_bwd_gates(gates_ptr, cells_ptr, c0_ptr, dc_ptr, lengths_ptr, d_gates_ptr, dh_t, step, B, T, H,
                            REVERSE, BLOCK_B, BLOCK_N)
    elif tl.program_id(1) >= tiles_h:
        _lstm_bwd_hidden(w_hh_ptr, d_gates_ptr, grad_y_ptr, grad_h_n_ptr, lengths_ptr, d_h_ptr, d_h0_ptr,
                         tl.program_id(1) - tiles_h, step, B, T, H, P, REVERSE, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
    elif step >= 0:
        dm = _lstm_bwd_projected(w_hr_ptr, w_hhr_ptr, d_gates_ptr, grad_y_ptr, grad_h_n_ptr, lengths_ptr, step,
                                 B, T, H, P, REVERSE, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        _lstm_bwd_gates(gates_ptr, cells_ptr, c0_ptr, dc_ptr, lengths_ptr, d_gates_ptr, dm, step, B, T, H,
                        REVERSE, BLOCK_B, BLOCK_N)


@triton.jit
def _lstm_bwd_hidden(w_hh_ptr, d_gates_ptr, grad_y_ptr, grad_h_n_ptr, lengths_ptr, d_h_ptr, d_h0_ptr, column_tile,
                     step, B, T, H, P, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dh_step [BLOCK_B, BLOCK_N] (fp32) of a tile of P columns, stored to d_h (to d_h0 at
    step -1): grad_y_step + d_gates_{step+1} W_hh inside a sequence, grad_y_step + grad_h_n at
    its last step (the carried gradient is grad_h_n until then)."""
    offs_b, offs_p, mask_b, mask_p, mask, lengths, active_next, rows_next = step_tile(
        lengths_ptr, step + 1, B, T, P, column_tile, REVERSE, BLOCK_B, BLOCK_N)
    state_h = offs_b[:, None] * P + offs_p[None, :]
    dh = tl.load(grad_h_n_ptr + state_h, mask=mask & ~active_next[:, None], other=0.0).to(tl.float32)
    dh = mm(dh, d_gates_ptr + rows_next * (4 * H), 1, mask_b & active_next, w_hh_ptr + offs_p, P, mask_p, 4 * H,
            BLOCK_K, PRECISION)  # [BLOCK_B, BLOCK_N]
    if step >= 0:
        time, active = step_time(lengths, step, REVERSE)
        y_offs = (offs_b * T + time)[:, None] * P + offs_p[None, :]
        dh += tl.load(grad_y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(d_h_ptr + y_offs, tl.where(active[:, None], dh, 0.0), mask=mask)
    else:
        tl.store(d_h0_ptr + state_h, dh, mask=mask)
    return dh


@triton.jit
def _lstm_bwd_projected(w_hr_ptr, w_hhr_ptr, d_gates_ptr, grad_y_ptr, grad_h_n_ptr, lengths_ptr, step, B, T, H, P,
                        REVERSE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dm_step = dL/dh_step W_hr [BLOCK_B, BLOCK_N] (fp32) of the program's H columns, as
    d_gates_{step+1} (W_hh W_hr) inside a sequence or grad_h_n W_hr at its last step, plus
    grad_y_step W_hr."""
    offs_b, offs_h, mask_b, mask_h, mask, lengths, active_next, rows_next = step_tile(
        lengths_ptr, step + 1, B, T, H, tl.program_id(1), REVERSE, BLOCK_B, BLOCK_N)
    time, _ = step_time(lengths, step, REVERSE)
    dm = mm(tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), d_gates_ptr + rows_next * (4 * H), 1,
            mask_b & active_next, w_hhr_ptr + offs_h, H, mask_h, 4 * H, BLOCK_K, PRECISION)
    dm = mm(dm, grad_h_n_ptr + offs_b * P, 1, mask_b & ~active_next, w_hr_ptr + offs_h, H, mask_h, P, BLOCK_K,
            PRECISION)
    return mm(dm, grad_y_ptr + (offs_b * T + time) * P, 1, mask_b, w_hr_ptr + offs_h, H, mask_h, P, BLOCK_K,
              PRECISION)


@triton.jit
def _lstm_bwd_gates(gates_ptr, cells_ptr, c0_ptr, dc_ptr, lengths_ptr, d_gates_ptr, dm, step, B, T, H,
                    REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """The d_gates at `step` of the program's H columns from dL/dm [BLOCK_B, BLOCK_N], and the
    carried dL/dc (fp32, in place)."""
    offs_b, offs_h, mask_b, mask_h, mask, lengths, active, rows = step_tile(
        lengths_ptr, step, B, T, H, tl.program_id(1), REVERSE, BLOCK_B, BLOCK_N)
    time_prev, _ = step_time(lengths, step - 1, REVERSE)
    gate_offs = rows[:, None] * (4 * H) + offs_h[None, :]
    i, f, g, o = _load_gates(gates_ptr + gate_offs, H, mask)
    c = tl.load(cells_ptr + rows[:, None] * H + offs_h[None, :], mask=mask, other=0.0)
    rows_prev = offs_b * T + time_prev
    has_prev = (tl.zeros_like(lengths) + step > 0)[:, None]  # [BLOCK_B, 1]
    c_prev = tl.load(cells_ptr + rows_prev[:, None] * H + offs_h[None, :], mask=mask & has_prev, other=0.0)
    c0 = tl.load(c0_ptr + offs_b[:, None] * H + offs_h[None, :], mask=mask & ~has_prev, other=0.0)
    c_prev = tl.where(has_prev, c_prev, c0.to(tl.float32))
    state_c = offs_b[:, None] * H + offs_h[None, :]
    dc = tl.load(dc_ptr + state_c, mask=mask, other=0.0)
    d_i, d_f, d_g, d_o, dc_t = _lstm_cell_grad(i, f, g, o, c, c_prev, dm, dc)
    _store_gates(d_gates_ptr + gate_offs, H, d_i, d_f, d_g, d_o, active, mask)
    tl.store(dc_ptr + state_c, tl.where(active[:, None], dc_t * f, dc), mask=mask)


# ---------------------------------------------------------------------------------------
# Host launchers.


def persistent_shared_bytes(hidden: int, proj: int, dtype: torch.dtype, backward: bool) -> int:
    """An upper bound of the shared memory of the persistent forward or backward kernel
    (_triton.persistent_bytes): W_hh (4H, P) and W_hr (P, H) at padded sizes (`proj` = P, 0
    without a projection)."""
    H = padded(hidden)
    P = padded(proj) if proj else H
    weights = 4 * H * P + (P * H if proj else 0)
    return persistent_bytes(weights, max(H, P), dtype, backward)


def choose_path(hidden: int, proj: int = 0, dtype: torch.dtype = torch.float32, device=torch.device("cpu"),
                path: Optional[str] = None, backward: bool = False) -> str:
    """`path`, or 'persistent' where W_hh (4H, P) and W_hr (P, H) fit on chip (`proj` = P, 0
    without a projection) and the persistent forward (`backward`: backward) kernel's shared
    memory fits `device`, else 'alternating'."""
    return path_for((padded(hidden), padded(proj or hidden)), persistent_shared_bytes(hidden, proj, dtype, backward),
                    device, path)


def lstm_layer_fwd(gx, h0, c0, w_hh, w_hr, lengths, reverse, training, *, path=None):
    """Without `training` the kernels store no workspace: gates and cells come back empty.
    `path` ("persistent" or "alternating") overrides :func:`choose_path`.

    Kernel launches per call: 1 on the persistent path; T on the alternating path (2T with a
    projection), replayed from one CUDA graph on CUDA (see _triton.run_steps)."""
    B, T, G = gx.shape
    H, P = G // 4, h0.shape[1]
    gx, h0, c0, w_hh = (t.contiguous() for t in (gx, h0, c0, w_hh))
    w_hr = w_hr.contiguous() if w_hr is not None else None
    lengths = full_lengths(B, T, gx.device) if lengths is None else lengths.contiguous()
    y = gx.new_empty((B, T, P))
    gates = gx.new_empty((B, T, G) if training else (0,), dtype=torch.float32)
    cells = gx.new_empty((B, T, H) if training else (0,), dtype=torch.float32)
    precision = precision_for(gx.dtype)
    if choose_path(H, P if w_hr is not None else 0, gx.dtype, gx.device, path) == "persistent":
        h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
        _lstm_fwd_persistent_kernel[(triton.cdiv(B, BLOCK_B_PERSISTENT),)](
            gx, h0, c0, w_hh, w_hr, lengths, y, h_n, c_n, gates, cells, B, T, H, P,
            HAS_PROJ=w_hr is not None, REVERSE=reverse, KEEP=training, PRECISION=precision,
            BLOCK_B=BLOCK_B_PERSISTENT, BLOCK_H=padded(H), BLOCK_P=padded(P), num_warps=PERSISTENT_FWD_WARPS,
        )
        return y, h_n, c_n, gates, cells
    h = [h0.clone(), torch.empty_like(h0)]  # h ping-pongs between two buffers
    c = c0.to(torch.float32, copy=True)
    flags = dict(HAS_PROJ=w_hr is not None, REVERSE=reverse, KEEP=training, PRECISION=precision)
    tensors = dict(gx=gx, h_even=h[0], h_odd=h[1], c=c, w_hh=w_hh, w_hr=w_hr, lengths=lengths, y=y, gates=gates,
                   cells=cells, m=gx.new_empty((B, H)) if w_hr is not None else None)
    run_steps("lstm_fwd_alternating", functools.partial(_lstm_fwd_steps, **flags), tensors,
              writes=frozenset({"h_even", "h_odd", "c", "y", "gates", "cells"}),
              write_only=frozenset({"h_odd", "y", "gates", "cells", "m"}), flags=tuple(flags.items()))
    return y, h[T % 2], c.to(gx.dtype), gates, cells


def _lstm_fwd_steps(gx, h_even, h_odd, c, w_hh, w_hr, lengths, y, gates, cells, m, **flags):
    """The alternating forward's launches: per step the gate kernel (and the projection)."""
    B, T, _ = gx.shape
    H, P = c.shape[1], h_even.shape[1]
    grid_h, block_b = alternating_grid(B, H)
    grid_p, _ = alternating_grid(B, P)
    sizes = dict(BLOCK_B=block_b, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    h = (h_even, h_odd)
    for step in range(T):
        h_in, h_out = h[step % 2], h[(step + 1) % 2]
        _lstm_fwd_step_kernel[grid_h](gx, h_in, h_out, c, w_hh, m, lengths, y, gates, cells, step, B, T, H, P,
                                      **flags, **sizes)
        if w_hr is not None:
            _lstm_proj_step_kernel[grid_p](m, w_hr, h_in, h_out, lengths, y, step, B, T, H, P,
                                           REVERSE=flags["REVERSE"], PRECISION=flags["PRECISION"], **sizes)


def lstm_layer_bwd(w_hh, w_hr, c0, gates, cells, grad_y, grad_h_n, grad_c_n, lengths, reverse, *, path=None):
    """`path` as for :func:`lstm_layer_fwd`.

    Kernel launches per call: 1 on the persistent path; T + 1 on the alternating path (one per
    step and one finishing dL/dh_0; with a projection also one torch GEMM forming W_hh W_hr),
    replayed from one CUDA graph on CUDA. The d_gates workspace, which the caller turns into
    the weight gradients, stays fp32 for every input dtype."""
    B, T, G = gates.shape
    H, P = G // 4, grad_y.shape[2]
    w_hh, c0, gates, cells, grad_y, grad_h_n = (t.contiguous() for t in (w_hh, c0, gates, cells, grad_y, grad_h_n))
    w_hr = w_hr.contiguous() if w_hr is not None else None
    lengths = full_lengths(B, T, gates.device) if lengths is None else lengths.contiguous()
    d_gates = torch.empty_like(gates)
    d_h = gates.new_empty((B, T, P))
    d_h0 = gates.new_empty((B, P))
    dc = grad_c_n.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # dL/dc_T in, dL/dc_0 out
    precision = precision_for(w_hh.dtype)
    if choose_path(H, P if w_hr is not None else 0, w_hh.dtype, gates.device, path, backward=True) == "persistent":
        _lstm_bwd_persistent_kernel[(triton.cdiv(B, BLOCK_B_PERSISTENT),)](
            w_hh, w_hr, c0, gates, cells, grad_y, grad_h_n, dc, lengths, d_gates, d_h, d_h0, dc, B, T, H, P,
            HAS_PROJ=w_hr is not None, REVERSE=reverse, PRECISION=precision,
            BLOCK_B=BLOCK_B_PERSISTENT, BLOCK_H=padded(H), BLOCK_P=padded(P),
        )
        return d_gates, d_h, d_h0, dc
    w_hhr = _combined_weight(w_hh, w_hr) if w_hr is not None else None
    flags = dict(HAS_PROJ=w_hr is not None, REVERSE=reverse, PRECISION=precision)
    tensors = dict(gates=gates, cells=cells, c0=c0, w_hh=w_hh, w_hr=w_hr, w_hhr=w_hhr, grad_y=grad_y,
                   grad_h_n=grad_h_n, dc=dc, lengths=lengths, d_gates=d_gates, d_h=d_h, d_h0=d_h0)
    run_steps("lstm_bwd_alternating", functools.partial(_lstm_bwd_steps, **flags), tensors,
              writes=frozenset({"dc", "d_gates", "d_h", "d_h0"}), write_only=frozenset({"d_gates", "d_h", "d_h0"}),
              flags=tuple(flags.items()))
    return d_gates, d_h, d_h0, dc


def _combined_weight(w_hh, w_hr):
    """W_hh W_hr (4H, H) in the input dtype: dL/dm_t = d_gates_{t+1} (W_hh W_hr) + ... in one GEMM."""
    return (w_hh.float() @ w_hr.float()).to(w_hh.dtype)


def _lstm_bwd_steps(gates, cells, c0, w_hh, w_hr, w_hhr, grad_y, grad_h_n, dc, lengths, d_gates, d_h, d_h0,
                    **flags):
    """The alternating backward's launches: steps T-1 .. 0, then -1 for dL/dh_0."""
    B, T, G = gates.shape
    H, P = G // 4, grad_y.shape[2]
    (tiles_b, tiles_h), block_b = alternating_grid(B, H)
    tiles_p = triton.cdiv(P, BLOCK_N) if w_hr is not None else 0
    for step in range(T - 1, -2, -1):
        _lstm_bwd_step_kernel[(tiles_b, tiles_h + tiles_p)](
            gates, cells, c0, w_hh, w_hr, w_hhr, grad_y, grad_h_n, dc, lengths, d_gates, d_h, d_h0, step, B, T, H, P,
            **flags, BLOCK_B=block_b, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )


def aot_problems():
    """Launcher calls on meta tensors of realistic shapes (see rnnkern.aot): both paths, with
    and without a projection, packed and reversed, training and inference (B = 1), bf16, fp16
    and fp32 (with TF32 allowed too)."""
    for dtype in (torch.bfloat16, torch.float32):
        for batch, hidden, proj in ((16, 64, 0), (64, 48, 32), (16, 256, 0), (64, 768, 0), (16, 1024, 256)):
            yield functools.partial(_forward_and_backward, batch, hidden, proj, dtype)
        yield functools.partial(_forward_and_backward, 16, 768, 0, dtype, reverse=True, packed=True)
        yield functools.partial(_forward_and_backward, 1, 1024, 256, dtype, training=False)
        yield functools.partial(_forward_and_backward, 1, 1024, 0, dtype, training=False)
        yield functools.partial(_forward_and_backward, 1, 64, 0, dtype, training=False)
    yield functools.partial(_forward_and_backward, 16, 768, 0, torch.float16)
    yield functools.partial(_forward_and_backward, 16, 32, 0, torch.float16, reverse=True)
    yield functools.partial(with_tf32, _forward_and_backward, 16, 1024, 256, torch.float32)
    yield functools.partial(with_tf32, _forward_and_backward, 16, 64, 0, torch.float32)


def _forward_and_backward(batch, hidden, proj, dtype, reverse=False, packed=False, training=True, steps=4):
    meta = dict(device="meta", dtype=dtype)
    P = proj or hidden
    gx = torch.empty((batch, steps, 4 * hidden), **meta)
    h0, c0 = torch.empty((batch, P), **meta), torch.empty((batch, hidden), **meta)
    w_hh = torch.empty((4 * hidden, P), **meta)
    w_hr = torch.empty((P, hidden), **meta) if proj else None
    lengths = torch.empty(batch, device="meta", dtype=torch.int64) if packed else None
    y, h_n, c_n, gates, cells = lstm_layer_fwd(gx, h0, c0, w_hh, w_hr, lengths, reverse, training)
    if training:
        lstm_layer_bwd(w_hh, w_hr, c0, gates, cells, torch.empty_like(y), torch.empty_like(h_n),
                       torch.empty_like(c_n), lengths, reverse)
