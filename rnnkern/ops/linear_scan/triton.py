"""Triton kernels of the linear recurrence h_t = a_t * h_{t-1} + b_t (math: reference.py).

One program per (sequence, channel block) walks its sequence in tiles of BLOCK_T steps:
inside a tile ``tl.associative_scan`` composes the affine maps h -> a h + b along time,
then the carried state is applied and the tile's last row becomes the next carry. The
backward kernel runs the same scan against the direction of the forward pass over
(a_{t+1}, dh_t), the incoming gradient and the shifted gates.
"""
import torch
import triton
import triton.language as tl

BLOCK_T = 64


@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    # applying h -> a_first h + b_first, then h -> a_then h + b_then
    return a_first * a_then, b_first * a_then + b_then


@triton.jit
def _sequence(cu_seqlens_ptr, i_n, T, IS_VARLEN: tl.constexpr):
    """(batch row, first time index, length) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int64)
        return 0, bos, eos - bos
    else:
        return i_n.to(tl.int64), 0, T


@triton.jit
def _channel_tile(cu_seqlens_ptr, T, D, IS_VARLEN: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sequence (index, batch row, first time index, length; program axis 0) and
    its channels offs_d [BLOCK_D] of D (axis 1) with their mask."""
    i_n = tl.program_id(0)
    batch, bos, length = _sequence(cu_seqlens_ptr, i_n, T, IS_VARLEN)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    return i_n, batch, bos, length, offs_d, offs_d < D


@triton.jit
def _load_or_zeros(ptr, offs, mask, HAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """An optional (BLOCK_D,) state in fp32: loaded where the tensor exists, else zeros."""
    if HAS:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.zeros([BLOCK_D], dtype=tl.float32)


@triton.jit
def _time_of_step(step, length, REVERSE: tl.constexpr):
    if REVERSE:
        return (length - 1 - step).to(tl.int64)
    else:
        return step.to(tl.int64)


@triton.jit
def _last_row(x, rows, BLOCK_T: tl.constexpr):
    return tl.sum(tl.where((rows == BLOCK_T - 1)[:, None], x, 0.0), axis=0)


@triton.jit
def _linear_scan_fwd_kernel(
    a_ptr, b_ptr, h0_ptr, h_ptr, ht_ptr, cu_seqlens_ptr,
    T, D,
    stride_a_b, stride_a_t, stride_a_d,
    stride_b_b, stride_b_t, stride_b_d,
    HAS_INITIAL: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_n, batch, bos, length, offs_d, mask_d = _channel_tile(cu_seqlens_ptr, T, D, IS_VARLEN, BLOCK_D)
    state = _load_or_zeros(h0_ptr, i_n * D + offs_d, mask_d, HAS_INITIAL, BLOCK_D)  # [BLOCK_D]
    rows = tl.arange(0, BLOCK_T)
    for start in range(0, length, BLOCK_T):
        step = start + rows  # [BLOCK_T] steps in the order they are taken
        t = bos + _time_of_step(step, length, REVERSE)
        mask = (step < length)[:, None] & mask_d[None, :]  # [BLOCK_T, BLOCK_D]
        a_ptrs = a_ptr + batch * stride_a_b + t[:, None] * stride_a_t + offs_d[None, :] * stride_a_d
        b_ptrs = b_ptr + batch * stride_b_b + t[:, None] * stride_b_t + offs_d[None, :] * stride_b_d
        # padding steps (a=1, b=0) leave the state unchanged, so the last row is the carry
        a = tl.load(a_ptrs, mask=mask, other=1.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        a_scan, b_scan = tl.associative_scan((a, b), axis=0, combine_fn=_compose)
        h = a_scan * state[None, :] + b_scan  # [BLOCK_T, BLOCK_D]
        h_ptrs = h_ptr + (batch * T + t[:, None]) * D + offs_d[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)
        state = _last_row(h, rows, BLOCK_T)
    tl.store(ht_ptr + i_n * D + offs_d, state, mask=mask_d)


@triton.jit
def _linear_scan_bwd_kernel(
    a_ptr, h_ptr, h0_ptr, dh_ptr, dht_ptr, da_ptr, db_ptr, dh0_ptr, cu_seqlens_ptr,
    T, D,
    stride_a_b, stride_a_t, stride_a_d,
    stride_dh_b, stride_dh_t, stride_dh_d,
    HAS_INITIAL: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
    REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_n, batch, bos, length, offs_d, mask_d = _channel_tile(cu_seqlens_ptr, T, D, IS_VARLEN, BLOCK_D)
    g = _load_or_zeros(dht_ptr, i_n * D + offs_d, mask_d, HAS_FINAL_GRAD, BLOCK_D)  # [BLOCK_D]
    h0 = _load_or_zeros(h0_ptr, i_n * D + offs_d, mask_d, HAS_INITIAL, BLOCK_D)
    a_base = a_ptr + batch * stride_a_b + offs_d[None, :] * stride_a_d
    rows = tl.arange(0, BLOCK_T)
    for start in range(0, length, BLOCK_T):
        step = length - 1 - (start + rows)  # [BLOCK_T] forward steps, last first
        valid = (step >= 0)[:, None] & mask_d[None, :]  # [BLOCK_T, BLOCK_D]
        t = bos + _time_of_step(step, length, REVERSE)
        t_next = bos + _time_of_step(step + 1, length, REVERSE)
        t_prev = bos + _time_of_step(step - 1, length, REVERSE)
        # g_t = dh_t + a_{t+1} g_{t+1}; past the last step the gate is 1 and g is dL/dh_final
        has_next = valid & (step + 1 < length)[:, None]
        a_next = tl.load(a_base + t_next[:, None] * stride_a_t, mask=has_next, other=1.0).to(tl.float32)
        dh_ptrs = dh_ptr + batch * stride_dh_b + t[:, None] * stride_dh_t + offs_d[None, :] * stride_dh_d
        dh = tl.load(dh_ptrs, mask=valid, other=0.0).to(tl.float32)
        a_scan, dh_scan = tl.associative_scan((a_next, dh), axis=0, combine_fn=_compose)
        g_t = a_scan * g[None, :] + dh_scan  # [BLOCK_T, BLOCK_D] dL/dh_t
        has_prev = valid & (step >= 1)[:, None]
        h_prev = tl.load(h_ptr + (batch * T + t_prev[:, None]) * D + offs_d[None, :], mask=has_prev, other=0.0)
        h_prev = tl.where((step == 0)[:, None], h0[None, :], h_prev.to(tl.float32))
        out = (batch * T + t[:, None]) * D + offs_d[None, :]
        tl.store(da_ptr + out, (g_t * h_prev).to(da_ptr.dtype.element_ty), mask=valid)
        tl.store(db_ptr + out, g_t.to(db_ptr.dtype.element_ty), mask=valid)
        g = _last_row(g_t, rows, BLOCK_T)
    # g is now dL/dh at the first step; an empty sequence passes dL/dh_final through
    if REVERSE:
        t_first = bos + length - 1
    else:
        t_first = bos
    a_first_ptrs = a_ptr + batch * stride_a_b + t_first * stride_a_t + offs_d * stride_a_d
    nonempty = (tl.zeros([BLOCK_D], dtype=tl.int64) + length) > 0  # [BLOCK_D]
    a_first = tl.load(a_first_ptrs, mask=mask_d & nonempty, other=1.0).to(tl.float32)
    tl.store(dh0_ptr + i_n * D + offs_d, a_first * g, mask=mask_d)


def _grid_and_block(num_sequences: int, dim: int):
    block_d = min(32, triton.next_power_of_2(dim))
    return (num_sequences, triton.cdiv(dim, block_d)), block_d


def _num_sequences(a, cu_seqlens) -> int:
    return a.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def linear_scan_fwd(a, b, initial_state, cu_seqlens, reverse):
    B, T, D = a.shape
    N = _num_sequences(a, cu_seqlens)
    h = torch.empty((B, T, D), dtype=a.dtype, device=a.device)
    final_state = torch.empty((N, D), dtype=torch.float32, device=a.device)
    grid, block_d = _grid_and_block(N, D)
    _linear_scan_fwd_kernel[grid](
        a, b, initial_state, h, final_state, cu_seqlens,
        T, D, *a.stride(), *b.stride(),
        HAS_INITIAL=initial_state is not None, IS_VARLEN=cu_seqlens is not None,
        REVERSE=reverse, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
    )
    return h, final_state


def linear_scan_bwd(a, h, initial_state, grad_h, grad_final, cu_seqlens, reverse):
    B, T, D = a.shape
    N = _num_sequences(a, cu_seqlens)
    grad_a = torch.empty((B, T, D), dtype=a.dtype, device=a.device)
    grad_b = torch.empty_like(grad_a)
    grad_initial = torch.empty((N, D), dtype=torch.float32, device=a.device)
    if grad_final is not None:
        grad_final = grad_final.contiguous()
    grid, block_d = _grid_and_block(N, D)
    _linear_scan_bwd_kernel[grid](
        a, h.contiguous(), initial_state, grad_h, grad_final, grad_a, grad_b, grad_initial, cu_seqlens,
        T, D, *a.stride(), *grad_h.stride(),
        HAS_INITIAL=initial_state is not None, HAS_FINAL_GRAD=grad_final is not None,
        IS_VARLEN=cu_seqlens is not None, REVERSE=reverse, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
    )
    return grad_a, grad_b, grad_initial


def aot_specs():
    """(kernel, argument types, constexprs) cases for the ahead-of-time compile check."""
    strides = {f"stride_{x}_{d}": "i32" for x in ("a", "b", "dh") for d in "btd"}
    for dtype, varlen, reverse in (("fp32", False, False), ("bf16", True, True), ("fp16", False, True)):
        common = {"T": "i32", "D": "i32", "cu_seqlens_ptr": "*i32", "a_ptr": f"*{dtype}", "h_ptr": f"*{dtype}"}
        flags = {"IS_VARLEN": varlen, "REVERSE": reverse, "BLOCK_T": BLOCK_T, "BLOCK_D": 32}
        fwd_types = {"b_ptr": f"*{dtype}", "h0_ptr": "*fp32", "ht_ptr": "*fp32"}
        bwd_types = {"h0_ptr": "*fp32", "dh_ptr": f"*{dtype}", "dht_ptr": "*fp32", "da_ptr": f"*{dtype}",
                     "db_ptr": f"*{dtype}", "dh0_ptr": "*fp32"}
        yield _linear_scan_fwd_kernel, {**common, **strides, **fwd_types}, {**flags, "HAS_INITIAL": True}
        yield _linear_scan_bwd_kernel, {**common, **strides, **bwd_types}, {
            **flags, "HAS_INITIAL": not varlen, "HAS_FINAL_GRAD": True}
