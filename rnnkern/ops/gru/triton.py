"""Triton kernels of the GRU recurrence (math: reference.py).

The same two paths as the LSTM kernels (rnnkern/ops/lstm/triton.py, which states the numerics;
the helpers shared by both live in rnnkern/ops/_triton.py): persistent when the padded hidden
size is at most PERSISTENT_MAX = 64 and :func:`persistent_shared_bytes` fits the device (W_hh,
3*64*64 values, stays on chip for all T steps of a tile of 16 sequences), else alternating:
per step, one kernel computes h_{t-1} W_hh^T + b_hh for a tile of (sequences, hidden units)
fused with the gate math and the state update; the backward launches one kernel per step,
which forms dL/dh_s = dh_{s+1} z_{s+1} + d_gh_{s+1} W_hh + grad_y_s from the d_gh the launch
before wrote and the carried dh z of its own columns, then the gate gradients of step s; a
last launch (s = -1) finishes dL/dh_0. d_gx and d_gh, which the caller turns into the weight
gradients, stay fp32 for every input dtype; the recurrent product rounds d_gh to the input
dtype as its operand only.
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
# GRU cell math, shared by both paths.


@triton.jit
def _gru_cell(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h_prev):
    """Gates r, z, n and h_t in fp32 from the input and hidden projections and h_{t-1}."""
    r = tl.sigmoid(gx_r + gh_r)
    z = tl.sigmoid(gx_z + gh_z)
    n = tanh(gx_n + r * gh_n)
    return r, z, n, (1.0 - z) * n + z * h_prev


@triton.jit
def _gru_cell_grad(r, z, n, gh_n, h_prev, dh):
    """Gradients of the pre-activations of r, z, n from dL/dh_t."""
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    d_r = d_n * gh_n * r * (1.0 - r)
    return d_r, d_z, d_n


@triton.jit
def _store3(ptrs, H, a, b, c, active, mask):
    """Three [BLOCK_B, BLOCK_N] gate tiles H apart, zero past a sequence's end."""
    keep = active[:, None]
    tl.store(ptrs, tl.where(keep, a, 0.0), mask=mask)
    tl.store(ptrs + H, tl.where(keep, b, 0.0), mask=mask)
    tl.store(ptrs + 2 * H, tl.where(keep, c, 0.0), mask=mask)


@triton.jit
def _load3(ptrs, H, mask):
    a = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ptrs + H, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(ptrs + 2 * H, mask=mask, other=0.0).to(tl.float32)
    return a, b, c


@triton.jit
def _bias(b_hh_ptr, offs, mask, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr):
    """b_hh[offs] broadcast over a [BLOCK_B, BLOCK_N] tile (zeros without a bias)."""
    if HAS_BIAS:
        b = tl.load(b_hh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(offs).to(tl.float32)
    return tl.zeros([BLOCK_B, 1], dtype=tl.float32) + b[None, :]


@triton.jit
def _gru_step_grads(gates_ptr, ghn_ptr, h_prev_ptr, grad_y_ptr, d_gx_ptr, d_gh_ptr, dh, rows, offs_h, H, active,
                    mask):
    """One step's gradients for the tile of `rows` [BLOCK_B] (int64) and columns offs_h, from the
    carried dh: stores d_gx and d_gh (zero past a sequence's end) and returns dh_t = dh + grad_y,
    z, and d_gh's three tiles."""
    offs = rows[:, None] * H + offs_h[None, :]
    gate_offs = rows[:, None] * (3 * H) + offs_h[None, :]
    dh_t = dh + tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r, z, n = _load3(gates_ptr + gate_offs, H, mask)
    gh_n = tl.load(ghn_ptr + offs, mask=mask, other=0.0)
    h_prev = tl.load(h_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d_r, d_z, d_n = _gru_cell_grad(r, z, n, gh_n, h_prev, dh_t)
    keep = active[:, None]
    d_r, d_z, d_hn = tl.where(keep, d_r, 0.0), tl.where(keep, d_z, 0.0), tl.where(keep, d_n * r, 0.0)
    _store3(d_gx_ptr + gate_offs, H, d_r, d_z, d_n, active, mask)
    _store3(d_gh_ptr + gate_offs, H, d_r, d_z, d_hn, active, mask)
    return dh_t, z, d_r, d_z, d_hn


# ---------------------------------------------------------------------------------------
# Persistent path: one program per tile of sequences, all steps, W_hh on chip.


@triton.jit(do_not_specialize=["T"])
def _gru_fwd_persistent_kernel(
    gx_ptr, h0_ptr, w_hh_ptr, b_hh_ptr, lengths_ptr, y_ptr, h_n_ptr, gates_ptr, ghn_ptr,
    B, T, H,
    HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, KEEP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    offs_b, offs_h, mask_b, mask_h, mask, lengths = persistent_tile(lengths_ptr, B, H, BLOCK_B, BLOCK_H)
    # W_hh^T of each gate, [BLOCK_H, BLOCK_H]: element (k, j) is W_hh[q H + j, k]
    w_offs = offs_h[None, :] * H + offs_h[:, None]
    w_mask = mask_h[:, None] & mask_h[None, :]
    w_r = tl.load(w_hh_ptr + w_offs, mask=w_mask, other=0.0)
    w_z = tl.load(w_hh_ptr + H * H + w_offs, mask=w_mask, other=0.0)
    w_n = tl.load(w_hh_ptr + 2 * H * H + w_offs, mask=w_mask, other=0.0)
    b_r = _bias(b_hh_ptr, offs_h, mask_h, HAS_BIAS, BLOCK_B)  # [BLOCK_B, BLOCK_H]
    b_z = _bias(b_hh_ptr, H + offs_h, mask_h, HAS_BIAS, BLOCK_B)
    b_n = _bias(b_hh_ptr, 2 * H + offs_h, mask_h, HAS_BIAS, BLOCK_B)
    state = offs_b[:, None] * H + offs_h[None, :]
    h = tl.load(h0_ptr + state, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_H] input dtype
    for step in range(0, T):
        time, active = step_time(lengths, step, REVERSE)
        rows = offs_b * T + time  # [BLOCK_B] int64 row of the (B, T, ...) tensors
        gate_offs = rows[:, None] * (3 * H) + offs_h[None, :]
        gx_r, gx_z, gx_n = _load3(gx_ptr + gate_offs, H, mask)
        gh_n = dot(h, w_n, b_n, PRECISION)
        r, z, n, h_new = _gru_cell(gx_r, gx_z, gx_n, dot(h, w_r, b_r, PRECISION), dot(h, w_z, b_z, PRECISION),
                                   gh_n, h.to(tl.float32))
        h_new = to(h_new, h.dtype)
        if KEEP:  # the backward's workspace
            _store3(gates_ptr + gate_offs, H, r, z, n, active, mask)
            tl.store(ghn_ptr + rows[:, None] * H + offs_h[None, :], tl.where(active[:, None], gh_n, 0.0),
                     mask=mask)
        tl.store(y_ptr + rows[:, None] * H + offs_h[None, :], tl.where(active[:, None], h_new, 0.0).to(h.dtype),
                 mask=mask)
        h = tl.where(active[:, None], h_new, h)
    tl.store(h_n_ptr + state, h, mask=mask)


@triton.jit(do_not_specialize=["T"])
def _gru_bwd_persistent_kernel(
    w_hh_ptr, gates_ptr, ghn_ptr, h_prev_ptr, grad_y_ptr, grad_h_n_ptr, lengths_ptr, d_gx_ptr, d_gh_ptr, d_h0_ptr,
    B, T, H,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    offs_b, offs_h, mask_b, mask_h, mask, lengths = persistent_tile(lengths_ptr, B, H, BLOCK_B, BLOCK_H)
    # W_hh of each gate in the input dtype, [BLOCK_H, BLOCK_H]: element (j, k) is W_hh[q H + j, k]
    w_offs = offs_h[:, None] * H + offs_h[None, :]
    w_mask = mask_h[:, None] & mask_h[None, :]
    w_r = tl.load(w_hh_ptr + w_offs, mask=w_mask, other=0.0)
    w_z = tl.load(w_hh_ptr + H * H + w_offs, mask=w_mask, other=0.0)
    w_n = tl.load(w_hh_ptr + 2 * H * H + w_offs, mask=w_mask, other=0.0)
    state = offs_b[:, None] * H + offs_h[None, :]
    dh = tl.load(grad_h_n_ptr + state, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_H]
    for k in range(0, T):
        step = T - 1 - k
        time, active = step_time(lengths, step, REVERSE)
        rows = offs_b * T + time  # [BLOCK_B] int64
        dh_t, z, d_r, d_z, d_hn = _gru_step_grads(gates_ptr, ghn_ptr, h_prev_ptr, grad_y_ptr, d_gx_ptr, d_gh_ptr, dh,
                                                  rows, offs_h, H, active, mask)
        # dh <- dh_t z + d_gh W_hh inside a sequence, dh past its end (d_gh is zero there)
        dh = dot(d_hn, w_n, dot(d_z, w_z, dot(d_r, w_r, tl.where(active[:, None], dh_t * z, dh), PRECISION),
                                PRECISION), PRECISION)
    tl.store(d_h0_ptr + state, dh, mask=mask)


# ---------------------------------------------------------------------------------------
# Alternating path: per step, one kernel over (sequence tile, hidden tile).


@triton.jit(do_not_specialize=["step", "T"])
def _gru_fwd_step_kernel(
    gx_ptr, h_in_ptr, h_out_ptr, w_hh_ptr, b_hh_ptr, lengths_ptr, y_ptr, gates_ptr, ghn_ptr,
    step, B, T, H,
    HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, KEEP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step `step`: h_{t-1} W_hh^T + b_hh for the tile, the gates and h_t."""
    offs_b, offs_h, mask_b, mask_h, mask, lengths, active, rows = step_tile(
        lengths_ptr, step, B, T, H, tl.program_id(1), REVERSE, BLOCK_B, BLOCK_N)  # [BLOCK_B], [BLOCK_N]
    gate_offs = rows[:, None] * (3 * H) + offs_h[None, :]
    h_rows = h_in_ptr + offs_b * H
    gh_r = mm(_bias(b_hh_ptr, offs_h, mask_h, HAS_BIAS, BLOCK_B), h_rows, 1, mask_b, w_hh_ptr + offs_h * H, 1,
              mask_h, H, BLOCK_K, PRECISION)
    gh_z = mm(_bias(b_hh_ptr, H + offs_h, mask_h, HAS_BIAS, BLOCK_B), h_rows, 1, mask_b,
              w_hh_ptr + (H + offs_h) * H, 1, mask_h, H, BLOCK_K, PRECISION)
    gh_n = mm(_bias(b_hh_ptr, 2 * H + offs_h, mask_h, HAS_BIAS, BLOCK_B), h_rows, 1, mask_b,
              w_hh_ptr + (2 * H + offs_h) * H, 1, mask_h, H, BLOCK_K, PRECISION)
    gx_r, gx_z, gx_n = _load3(gx_ptr + gate_offs, H, mask)
    state = offs_b[:, None] * H + offs_h[None, :]
    h_prev = tl.load(h_in_ptr + state, mask=mask, other=0.0).to(tl.float32)
    r, z, n, h = _gru_cell(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h_prev)
    if KEEP:  # the backward's workspace
        _store3(gates_ptr + gate_offs, H, r, z, n, active, mask)
        tl.store(ghn_ptr + rows[:, None] * H + offs_h[None, :], tl.where(active[:, None], gh_n, 0.0), mask=mask)
    emit(h, active, state, h_in_ptr, h_out_ptr, y_ptr, rows[:, None] * H + offs_h[None, :], mask)


@triton.jit(do_not_specialize=["step", "T"])
def _gru_bwd_step_kernel(
    gates_ptr, ghn_ptr, h_prev_ptr, w_hh_ptr, grad_y_ptr, carry_ptr, lengths_ptr, d_gx_ptr, d_gh_ptr,
    step, B, T, H,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Launch `step` (T-1 down to 0, then -1): dL/dh_step = carry + d_gh_{step+1} W_hh +
    grad_y_step, then d_gx and d_gh at `step`. `carry` (B, H) fp32 holds dh_t z_t of the last
    step inside the sequence after `step` (grad_h_n before any) and dL/dh_0 after step -1."""
    offs_b, offs_h, mask_b, mask_h, mask, lengths, active_next, rows_next = step_tile(
        lengths_ptr, step + 1, B, T, H, tl.program_id(1), REVERSE, BLOCK_B, BLOCK_N)  # [BLOCK_B], [BLOCK_N]
    state = offs_b[:, None] * H + offs_h[None, :]
    carry = tl.load(carry_ptr + state, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_N] fp32
    dh = mm(carry, d_gh_ptr + rows_next * (3 * H), 1, mask_b & active_next, w_hh_ptr + offs_h, H, mask_h, 3 * H,
            BLOCK_K, PRECISION)
    if step >= 0:
        time, active = step_time(lengths, step, REVERSE)
        dh_t, z, _, _, _ = _gru_step_grads(gates_ptr, ghn_ptr, h_prev_ptr, grad_y_ptr, d_gx_ptr, d_gh_ptr, dh,
                                           offs_b * T + time, offs_h, H, active, mask)
        tl.store(carry_ptr + state, tl.where(active[:, None], dh_t * z, carry), mask=mask)
    else:
        tl.store(carry_ptr + state, dh, mask=mask)


# ---------------------------------------------------------------------------------------
# Host launchers.


def persistent_shared_bytes(hidden: int, dtype: torch.dtype, backward: bool) -> int:
    """An upper bound of the shared memory of the persistent forward or backward kernel
    (_triton.persistent_bytes): W_hh (3H, H) at the padded size."""
    H = padded(hidden)
    return persistent_bytes(3 * H * H, H, dtype, backward)


def choose_path(hidden: int, dtype: torch.dtype = torch.float32, device=torch.device("cpu"),
                path: Optional[str] = None, backward: bool = False) -> str:
    """`path`, or 'persistent' where W_hh (3H, H) fits on chip and the persistent forward
    (`backward`: backward) kernel's shared memory fits `device`, else 'alternating'."""
    return path_for((padded(hidden),), persistent_shared_bytes(hidden, dtype, backward), device, path)


def gru_layer_fwd(gx, h0, w_hh, b_hh, lengths, reverse, training, *, path=None):
    """Without `training` the kernels store no workspace: gates and ghn come back empty.
    `path` ("persistent" or "alternating") overrides :func:`choose_path`.

    Kernel launches per call: 1 on the persistent path, T on the alternating path (replayed
    from one CUDA graph on CUDA, see _triton.run_steps)."""
    B, T, G = gx.shape
    H = G // 3
    gx, h0, w_hh = (t.contiguous() for t in (gx, h0, w_hh))
    b_hh = b_hh.contiguous() if b_hh is not None else None
    lengths = full_lengths(B, T, gx.device) if lengths is None else lengths.contiguous()
    y = gx.new_empty((B, T, H))
    gates = gx.new_empty((B, T, G) if training else (0,), dtype=torch.float32)
    ghn = gx.new_empty((B, T, H) if training else (0,), dtype=torch.float32)
    flags = dict(HAS_BIAS=b_hh is not None, REVERSE=reverse, KEEP=training, PRECISION=precision_for(gx.dtype))
    if choose_path(H, gx.dtype, gx.device, path) == "persistent":
        h_n = torch.empty_like(h0)
        _gru_fwd_persistent_kernel[(triton.cdiv(B, BLOCK_B_PERSISTENT),)](
            gx, h0, w_hh, b_hh, lengths, y, h_n, gates, ghn, B, T, H, **flags, BLOCK_B=BLOCK_B_PERSISTENT,
            BLOCK_H=padded(H), num_warps=PERSISTENT_FWD_WARPS,
        )
        return y, h_n, gates, ghn
    h = [h0.clone(), torch.empty_like(h0)]  # h ping-pongs between two buffers
    tensors = dict(gx=gx, h_even=h[0], h_odd=h[1], w_hh=w_hh, b_hh=b_hh, lengths=lengths, y=y, gates=gates, ghn=ghn)
    run_steps("gru_fwd_alternating", functools.partial(_gru_fwd_steps, **flags), tensors,
              writes=frozenset({"h_even", "h_odd", "y", "gates", "ghn"}),
              write_only=frozenset({"h_odd", "y", "gates", "ghn"}), flags=tuple(flags.items()))
    return y, h[T % 2], gates, ghn


def _gru_fwd_steps(gx, h_even, h_odd, w_hh, b_hh, lengths, y, gates, ghn, **flags):
    """The alternating forward's launches: one per step."""
    B, T, G = gx.shape
    H = G // 3
    grid, block_b = alternating_grid(B, H)
    h = (h_even, h_odd)
    for step in range(T):
        _gru_fwd_step_kernel[grid](gx, h[step % 2], h[(step + 1) % 2], w_hh, b_hh, lengths, y, gates, ghn, step,
                                   B, T, H, **flags, BLOCK_B=block_b, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def gru_layer_bwd(w_hh, gates, ghn, h_prev, grad_y, grad_h_n, lengths, reverse, *, path=None):
    """`path` as for :func:`gru_layer_fwd`.

    Kernel launches per call: 1 on the persistent path; T + 1 on the alternating path (one per
    step and one finishing dL/dh_0), replayed from one CUDA graph on CUDA."""
    B, T, G = gates.shape
    H = G // 3
    w_hh, gates, ghn, h_prev, grad_y = (t.contiguous() for t in (w_hh, gates, ghn, h_prev, grad_y))
    lengths = full_lengths(B, T, gates.device) if lengths is None else lengths.contiguous()
    d_gx, d_gh = torch.empty_like(gates), torch.empty_like(gates)
    dh = grad_h_n.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # dL/dh_T in, dL/dh_0 out
    flags = dict(REVERSE=reverse, PRECISION=precision_for(w_hh.dtype))
    if choose_path(H, w_hh.dtype, gates.device, path, backward=True) == "persistent":
        _gru_bwd_persistent_kernel[(triton.cdiv(B, BLOCK_B_PERSISTENT),)](
            w_hh, gates, ghn, h_prev, grad_y, dh, lengths, d_gx, d_gh, dh, B, T, H, **flags,
            BLOCK_B=BLOCK_B_PERSISTENT, BLOCK_H=padded(H),
        )
        return d_gx, d_gh, dh
    tensors = dict(gates=gates, ghn=ghn, h_prev=h_prev, w_hh=w_hh, grad_y=grad_y, carry=dh, lengths=lengths,
                   d_gx=d_gx, d_gh=d_gh)
    run_steps("gru_bwd_alternating", functools.partial(_gru_bwd_steps, **flags), tensors,
              writes=frozenset({"carry", "d_gx", "d_gh"}), write_only=frozenset({"d_gx", "d_gh"}),
              flags=tuple(flags.items()))
    return d_gx, d_gh, dh


def _gru_bwd_steps(gates, ghn, h_prev, w_hh, grad_y, carry, lengths, d_gx, d_gh, **flags):
    """The alternating backward's launches: steps T-1 .. 0, then -1 for dL/dh_0."""
    B, T, G = gates.shape
    grid, block_b = alternating_grid(B, G // 3)
    for step in range(T - 1, -2, -1):
        _gru_bwd_step_kernel[grid](gates, ghn, h_prev, w_hh, grad_y, carry, lengths, d_gx, d_gh, step, B, T, G // 3,
                                   **flags, BLOCK_B=block_b, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def aot_problems():
    """Launcher calls on meta tensors of realistic shapes (see rnnkern.aot): both paths, with
    and without a bias, packed and reversed, training and inference (B = 1), bf16, fp16 and
    fp32 (with TF32 allowed too)."""
    for dtype in (torch.bfloat16, torch.float32):
        for batch, hidden in ((16, 64), (64, 48), (16, 256), (64, 768), (16, 1024)):
            yield functools.partial(_forward_and_backward, batch, hidden, dtype)
        yield functools.partial(_forward_and_backward, 16, 768, dtype, reverse=True, packed=True, bias=False)
        yield functools.partial(_forward_and_backward, 1, 1024, dtype, training=False)
        yield functools.partial(_forward_and_backward, 1, 64, dtype, training=False)
    yield functools.partial(_forward_and_backward, 16, 768, torch.float16)
    yield functools.partial(_forward_and_backward, 16, 32, torch.float16, reverse=True)
    yield functools.partial(with_tf32, _forward_and_backward, 16, 1024, torch.float32)
    yield functools.partial(with_tf32, _forward_and_backward, 16, 64, torch.float32)


def _forward_and_backward(batch, hidden, dtype, reverse=False, packed=False, bias=True, training=True, steps=4):
    meta = dict(device="meta", dtype=dtype)
    gx, h0 = torch.empty((batch, steps, 3 * hidden), **meta), torch.empty((batch, hidden), **meta)
    w_hh = torch.empty((3 * hidden, hidden), **meta)
    b_hh = torch.empty(3 * hidden, **meta) if bias else None
    lengths = torch.empty(batch, device="meta", dtype=torch.int64) if packed else None
    y, h_n, gates, ghn = gru_layer_fwd(gx, h0, w_hh, b_hh, lengths, reverse, training)
    if training:
        gru_layer_bwd(w_hh, gates, ghn, torch.empty_like(y), torch.empty_like(y), torch.empty_like(h_n), lengths,
                      reverse)
