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
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from rnnkern.ops._sequences import full_lengths
from rnnkern.ops._triton import (
    BLOCK_B_PERSISTENT, BLOCK_K, BLOCK_N, PERSISTENT_MAX, alternating_grid, dot, emit, mm, padded, path_for,
    persistent_tile, step_tile, step_time, tanh, to,
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


@triton.jit
def _lstm_fwd_persistent_kernel(
    gx_ptr, h0_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    y_ptr, h_n_ptr, c_n_ptr, gates_ptr, cells_ptr,
    B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, KEEP: tl.constexpr,
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
        rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B] row of the (B, T, ...) tensors
        gx = gx_ptr + rows[:, None] * (4 * H) + offs_h[None, :]
        pre_i, pre_f, pre_g, pre_o = _load_gates(gx, H, mask_bh)
        i, f, g, o, c_new, m = _lstm_cell(dot(h, w_i, pre_i), dot(h, w_f, pre_f), dot(h, w_g, pre_g),
                                          dot(h, w_o, pre_o), c)
        if HAS_PROJ:
            h_new = to(dot(to(m, h.dtype), w_r, tl.zeros([BLOCK_B, BLOCK_P], dtype=tl.float32)), h.dtype)
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


@triton.jit
def _lstm_bwd_persistent_kernel(
    w_hh_ptr, w_hr_ptr, c0_ptr, gates_ptr, cells_ptr, grad_y_ptr, grad_h_n_ptr, grad_c_n_ptr, lengths_ptr,
    d_gates_ptr, d_h_ptr, d_h0_ptr, d_c0_ptr,
    B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_b, offs_h, mask_b, mask_h, mask_bh, lengths = persistent_tile(lengths_ptr, B, H, BLOCK_B, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    mask_bp = mask_b[:, None] & mask_p[None, :]  # [BLOCK_B, BLOCK_P]
    # W_hh of each gate in fp32, [BLOCK_H, BLOCK_P]: element (j, p) is W_hh[q H + j, p]
    w_offs = offs_h[:, None] * P + offs_p[None, :]
    w_mask = mask_h[:, None] & mask_p[None, :]
    w_i, w_f, w_g, w_o = _load_gates(w_hh_ptr + w_offs, H * P, w_mask)
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
        time, active = step_time(lengths, step, REVERSE)
        time_prev, _ = step_time(lengths, step - 1, REVERSE)
        rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B]
        rows_prev = offs_b.to(tl.int64) * T + time_prev
        y_offs = rows[:, None] * P + offs_p[None, :]
        dh_t = dh + tl.load(grad_y_ptr + y_offs, mask=mask_bp, other=0.0).to(tl.float32)
        if HAS_PROJ:
            dm = dot(dh_t, w_r, tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32))
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
        dh = dot(d_o, w_o, dot(d_g, w_g, dot(d_f, w_f, dot(d_i, w_i, tl.where(keep, 0.0, dh)))))
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
    offs_b, offs_h, mask_b, mask_h, mask, lengths, active, rows = step_tile(
        lengths_ptr, step, B, T, H, REVERSE, BLOCK_B, BLOCK_N)  # [BLOCK_B], [BLOCK_N]
    gate_offs = rows[:, None] * (4 * H) + offs_h[None, :]
    pre_i, pre_f, pre_g, pre_o = _load_gates(gx_ptr + gate_offs, H, mask)
    h_rows = h_in_ptr + offs_b * P
    w_cols = w_hh_ptr + offs_h * P  # row j of W_hh's first gate
    pre_i = mm(pre_i, h_rows, 1, mask_b, w_cols, 1, mask_h, P, BLOCK_K)
    pre_f = mm(pre_f, h_rows, 1, mask_b, w_cols + H * P, 1, mask_h, P, BLOCK_K)
    pre_g = mm(pre_g, h_rows, 1, mask_b, w_cols + 2 * H * P, 1, mask_h, P, BLOCK_K)
    pre_o = mm(pre_o, h_rows, 1, mask_b, w_cols + 3 * H * P, 1, mask_h, P, BLOCK_K)
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


@triton.jit(do_not_specialize=["step"])
def _lstm_proj_step_kernel(
    m_ptr, w_hr_ptr, h_in_ptr, h_out_ptr, lengths_ptr, y_ptr,
    step, B, T, H, P,
    REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_b, offs_p, mask_b, mask_p, mask, lengths, active, rows = step_tile(
        lengths_ptr, step, B, T, P, REVERSE, BLOCK_B, BLOCK_N)  # [BLOCK_B], [BLOCK_N]
    h = mm(tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), m_ptr + offs_b * H, 1, mask_b,
            w_hr_ptr + offs_p * H, 1, mask_p, H, BLOCK_K)  # [BLOCK_B, BLOCK_N]
    emit(h, active, offs_b[:, None] * P + offs_p[None, :], h_in_ptr, h_out_ptr, y_ptr,
          rows[:, None] * P + offs_p[None, :], mask)


@triton.jit(do_not_specialize=["step"])
def _lstm_bwd_step_kernel(
    gates_ptr, cells_ptr, c0_ptr, w_hr_ptr, grad_y_ptr, dh_ptr, dc_ptr, lengths_ptr, d_gates_ptr,
    step, B, T, H, P,
    HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d_gates at `step` and the carried dL/dc; dh is still the one from the step after."""
    offs_b, offs_h, mask_b, mask_h, mask, lengths, active, rows = step_tile(
        lengths_ptr, step, B, T, H, REVERSE, BLOCK_B, BLOCK_N)  # [BLOCK_B], [BLOCK_N]
    time_prev, _ = step_time(lengths, step - 1, REVERSE)
    if HAS_PROJ:  # dm = (dh + grad_y_t) W_hr
        dm = mm(tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), dh_ptr + offs_b * P, 1, mask_b,
                 w_hr_ptr + offs_h, H, mask_h, P, BLOCK_K)
        dm = mm(dm, grad_y_ptr + rows * P, 1, mask_b, w_hr_ptr + offs_h, H, mask_h, P, BLOCK_K)
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
    offs_b, offs_p, mask_b, mask_p, mask, lengths, active, rows = step_tile(
        lengths_ptr, step, B, T, P, REVERSE, BLOCK_B, BLOCK_N)  # [BLOCK_B], [BLOCK_N]
    state_h = offs_b[:, None] * P + offs_p[None, :]
    y_offs = rows[:, None] * P + offs_p[None, :]
    dh = tl.load(dh_ptr + state_h, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_N] fp32
    dh_t = dh + tl.load(grad_y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_h_ptr + y_offs, tl.where(active[:, None], dh_t, 0.0), mask=mask)
    dh_prev = mm(tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), d_gates_ptr + rows * (4 * H), 1, mask_b,
                  w_hh_ptr + offs_p, P, mask_p, 4 * H, BLOCK_K)
    tl.store(dh_ptr + state_h, tl.where(active[:, None], dh_prev, dh), mask=mask)


# ---------------------------------------------------------------------------------------
# Host launchers.


def choose_path(hidden: int, proj: int, path: Optional[str] = None) -> str:
    """`path`, or 'persistent' where W_hh (4H, P) and W_hr (P, H) fit on chip, else 'alternating'."""
    return path_for(max(padded(hidden), padded(proj)) <= PERSISTENT_MAX, path)


def lstm_layer_fwd(gx, h0, c0, w_hh, w_hr, lengths, reverse, training, *, path=None):
    """Without `training` the kernels store no workspace: gates and cells come back empty.
    `path` ("persistent" or "alternating") overrides :func:`choose_path`."""
    B, T, G = gx.shape
    H, P = G // 4, h0.shape[1]
    gx, h0, c0, w_hh = (t.contiguous() for t in (gx, h0, c0, w_hh))
    w_hr = w_hr.contiguous() if w_hr is not None else None
    lengths = full_lengths(B, T, gx.device) if lengths is None else lengths.contiguous()
    y = gx.new_empty((B, T, P))
    gates = gx.new_empty((B, T, G) if training else (0,), dtype=torch.float32)
    cells = gx.new_empty((B, T, H) if training else (0,), dtype=torch.float32)
    if choose_path(H, P, path) == "persistent":
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


def lstm_layer_bwd(w_hh, w_hr, c0, gates, cells, grad_y, grad_h_n, grad_c_n, lengths, reverse, *, path=None):
    """`path` as for :func:`lstm_layer_fwd`."""
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
    if choose_path(H, P, path) == "persistent":
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


def aot_problems():
    """Launcher calls on meta tensors of realistic shapes (see rnnkern.aot): both paths, with
    and without a projection, packed and reversed, training and inference."""
    for dtype in (torch.bfloat16, torch.float32):
        for batch, hidden, proj in ((16, 64, 0), (64, 48, 32), (16, 256, 0), (64, 768, 0), (16, 1024, 256)):
            yield functools.partial(_forward_and_backward, batch, hidden, proj, dtype)
        yield functools.partial(_forward_and_backward, 16, 768, 0, dtype, reverse=True, packed=True)
        yield functools.partial(_forward_and_backward, 1, 1024, 256, dtype, training=False)
    yield functools.partial(_forward_and_backward, 16, 768, 0, torch.float16)
    yield functools.partial(_forward_and_backward, 16, 32, 0, torch.float16, reverse=True)


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
