"""Triton kernel of one selective-scan decode step, in the multi-head form (math:
reference.selective_state_update; the single-head form reaches it as a view).

One program per (row b, head h, block of BLOCK_P head positions) updates the state
[BLOCK_P, BLOCK_N] of slot ``state_batch_indices[b]`` (b without indices) in place, in fp32:

    dt' = softplus(dt + dt_bias)   (or dt + dt_bias),   g = h // (H / G)
    state = exp(dt' A) state + dt' x B[g],   y = C[g] . state + D x,   y *= silu(z)

Every tensor is read through its strides, so views (Mamba-2's x sliced from a projection, A
expanded from one scalar per head) are not copied. An A with stride 0 along N is read as one
value per (h, p) (A_PER_ROW: BLOCK_P exps, not BLOCK_P x BLOCK_N). A row whose slot is -1 is
padding: it writes y = 0 and reads and writes no state.

Roofline (estimate, not measured): the step is memory-bound. Per state element (fp32) it reads
and writes 8 B, and does one exp at most; the Mamba-2 2.7B decode at batch 8 (80 heads of 64,
N = 128) moves 8 x 80 x 64 x 128 x 8 B = 42 MB, ~13 us at an H100's 3.35 TB/s.
"""
import functools

import torch
import triton
import triton.language as tl

from rnnkern.ops._triton import to

SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # softplus(x) = x above it, as torch.nn.functional.softplus
MAX_TILE = 1024  # elements of a program's [BLOCK_P, BLOCK_N] state tile
NUM_WARPS = 4


@triton.jit
def _softplus(x):
    """log1p(exp(x)), accurate for small exp(x): log(w) * e / (w - 1) with w = 1 + e."""
    e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log1p)


@triton.jit
def _load_rows(ptr, rows, stride, offs_p, mask_p, HAS: tl.constexpr):
    """[BLOCK_P] fp32 of an optional tensor at rows + p * stride; zeros when absent."""
    if HAS:
        return tl.load(ptr + rows + offs_p * stride, mask=mask_p, other=0.0).to(tl.float32)
    else:
        return tl.zeros(offs_p.shape, tl.float32)


@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, slots_ptr, out_ptr,
    P, N, heads_per_group,
    stride_state_s, stride_state_h, stride_state_p, stride_state_n,
    stride_x_b, stride_x_h, stride_x_p, stride_dt_b, stride_dt_h, stride_dt_p, stride_z_b, stride_z_h, stride_z_p,
    stride_A_h, stride_A_p, stride_A_n, stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p, stride_dt_bias_h, stride_dt_bias_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_SLOTS: tl.constexpr, A_PER_ROW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(2).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_p, mask_n = offs_p < P, offs_n < N
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + i_b).to(tl.int64)
    else:
        slot = i_b
    live = slot >= 0  # -1: a padding row, whose state tile is all masked
    mask_pn = (offs_p < tl.where(live, P, 0))[:, None] & mask_n[None, :]  # [BLOCK_P, BLOCK_N]
    i_g = i_h // heads_per_group

    x = _load_rows(x_ptr, i_b * stride_x_b + i_h * stride_x_h, stride_x_p, offs_p, mask_p, True)
    dt = _load_rows(dt_ptr, i_b * stride_dt_b + i_h * stride_dt_h, stride_dt_p, offs_p, mask_p, True)
    dt += _load_rows(dt_bias_ptr, i_h * stride_dt_bias_h, stride_dt_bias_p, offs_p, mask_p, HAS_DT_BIAS)
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    A_rows = A_ptr + i_h * stride_A_h + offs_p * stride_A_p  # [BLOCK_P]
    if A_PER_ROW:
        decay = tl.exp(dt * tl.load(A_rows, mask=mask_p, other=0.0))[:, None]  # [BLOCK_P, 1]
    else:
        A = tl.load(A_rows[:, None] + offs_n[None, :] * stride_A_n, mask=mask_pn, other=0.0)
        decay = tl.exp(dt[:, None] * A)  # [BLOCK_P, BLOCK_N]
    B = tl.load(B_ptr + i_b * stride_B_b + i_g * stride_B_g + offs_n * stride_B_n, mask=mask_n, other=0.0)
    C = tl.load(C_ptr + i_b * stride_C_b + i_g * stride_C_g + offs_n * stride_C_n, mask=mask_n, other=0.0)

    state_offs = (tl.maximum(slot, 0) * stride_state_s + i_h * stride_state_h + offs_p[:, None] * stride_state_p
                  + offs_n[None, :] * stride_state_n)  # [BLOCK_P, BLOCK_N]
    h = tl.load(state_ptr + state_offs, mask=mask_pn, other=0.0).to(tl.float32)
    h = decay * h + (dt * x)[:, None] * B.to(tl.float32)[None, :]
    tl.store(state_ptr + state_offs, to(h, state_ptr.dtype.element_ty), mask=mask_pn)

    y = tl.sum(h * C.to(tl.float32)[None, :], axis=1)  # [BLOCK_P]
    y += _load_rows(D_ptr, i_h * stride_D_h, stride_D_p, offs_p, mask_p, HAS_D) * x
    if HAS_Z:
        z = _load_rows(z_ptr, i_b * stride_z_b + i_h * stride_z_h, stride_z_p, offs_p, mask_p, True)
        y = y * z * tl.sigmoid(z)
    out_offs = (i_b * tl.num_programs(1) + i_h) * P + offs_p
    tl.store(out_ptr + out_offs, to(tl.where(live, y, 0.0), out_ptr.dtype.element_ty), mask=mask_p)


# ---------------------------------------------------------------------------------------
# Host launcher.


def plan(dim: int, state_size: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N): the state padded to a power of two, and as many head positions as a
    MAX_TILE tile holds (at most the head dim, padded)."""
    block_n = triton.next_power_of_2(state_size)
    return min(triton.next_power_of_2(dim), max(1, MAX_TILE // block_n)), block_n


def _strides(x, ndim: int) -> tuple:
    """The strides of an optional `ndim`-dimensional tensor; zeros when it is None."""
    return (0,) * ndim if x is None else x.stride()


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    batch, heads, dim = x.shape
    groups, n = B.shape[1], A.shape[2]
    out = torch.empty((batch, heads, dim), dtype=x.dtype, device=x.device)
    block_p, block_n = plan(dim, n)
    _selective_state_update_kernel[(batch, heads, triton.cdiv(dim, block_p))](
        state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out,
        dim, n, heads // groups, *state.stride(), *x.stride(), *dt.stride(), *_strides(z, 3),
        *A.stride(), *B.stride(), *C.stride(), *_strides(D, 2), *_strides(dt_bias, 2),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        HAS_SLOTS=state_batch_indices is not None, A_PER_ROW=A.stride(2) == 0 or n == 1,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=NUM_WARPS,
    )
    return out


def aot_problems():
    """Launcher calls on meta tensors of realistic shapes (see rnnkern.aot): Mamba-2 decodes
    (80 heads of 64, N = 128, one group; 24 heads, 8 groups) at batch 8 and 1 in bf16/fp16/fp32,
    A a scalar per head, from a pool of state slots and without; the Mamba (single-head) step of
    d_inner 1536/5120, N = 16, A (D, N); a bf16 state."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for batch in (8, 1):
            yield functools.partial(_step, batch, 80, 64, 128, 1, dtype)
        yield functools.partial(_step, 8, 80, 64, 128, 1, dtype, slots=32)
    yield functools.partial(_step, 8, 24, 64, 128, 8, torch.bfloat16, slots=32)
    for channels in (1536, 5120):
        yield functools.partial(_step, 8, 1, channels, 16, 1, torch.bfloat16, scalar_A=False)
    yield functools.partial(_step, 1, 1, 1536, 16, 1, torch.float32, scalar_A=False)
    yield functools.partial(_step, 8, 80, 64, 128, 1, torch.bfloat16, state_dtype=torch.bfloat16)


def _step(batch, heads, dim, n, groups, dtype, slots=None, scalar_A=True, state_dtype=torch.float32):
    meta = dict(device="meta", dtype=dtype)
    f32 = dict(device="meta", dtype=torch.float32)
    state = torch.empty((slots or batch, heads, dim, n), device="meta", dtype=state_dtype)
    x, dt, z = (torch.empty((batch, heads, dim), **meta) for _ in range(3))
    A = torch.empty(heads, 1, 1, **f32).expand(heads, dim, n) if scalar_A else torch.empty(heads, dim, n, **f32)
    B, C = torch.empty((batch, groups, n), **f32), torch.empty((batch, groups, n), **f32)
    D, dt_bias = torch.empty(heads, 1, **f32).expand(heads, dim), torch.empty(heads, 1, **f32).expand(heads, dim)
    indices = None if slots is None else torch.empty(batch, device="meta", dtype=torch.int32)
    selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True, indices)
