"""Triton kernels of the selective scan (math: reference.py).

One program per (sequence, block of BLOCK_D channels) keeps the state x, [BLOCK_D, BLOCK_N]
in fp32 (N padded to a power of two), in registers and walks the L steps one at a time,
with the discretisation, the D skip and the silu(z) gate fused into the step:

    delta'_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias)
    x_t = exp(delta'_t A) * x_{t-1} + delta'_t u_t B_t,     y_t = C_t . x_t + D u_t

When training, the forward stores the state before every CHUNK steps (the checkpoints).
The backward walks the chunks last to first: it recomputes a chunk's states from its
checkpoint into a per-program scratch buffer (CHUNK states, never (B, D, L, N)), then
runs the chunk backwards, carrying g = dL/dx_t:

    g_t = g_{t+1} exp(delta'_{t+1} A) + dy_t C_t,   dB_t = g_t delta'_t u_t,   dC_t = dy_t x_t
    d(delta'_t) = sum_n g_t x_{t-1} exp(delta'_t A) A + u_t sum_n g_t B_t
    du_t = D dy_t + delta'_t sum_n g_t B_t,    dA = sum_t g_t x_{t-1} exp(delta'_t A) delta'_t

Gradients of tensors shared by several programs (A, D, delta_bias, fixed B/C by every
sequence; variable B/C by the channels of a group) are added atomically into fp32 buffers.
B and C of group g are read by channels [g Dm/G, (g+1) Dm/G); when every channel block lies
inside one group (GROUP_ALIGNED), a program sums its channels before one atomic per step.
"""
import functools

import torch
import triton
import triton.language as tl

from rnnkern.ops._triton import to
from rnnkern.ops.selective_scan.reference import CHUNK

SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # softplus(x) = x above it, as torch.nn.functional.softplus


@triton.jit
def _delta(delta_ptr, offs, mask, bias, DELTA_SOFTPLUS: tl.constexpr):
    """delta' and d(delta')/d(delta) of one step, [BLOCK_D] fp32."""
    x = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias
    if DELTA_SOFTPLUS:
        # log1p(exp(x)) accurate for small exp(x): log(w) * e / (w - 1) with w = 1 + e
        e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
        w = 1.0 + e
        log1p = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        above = x > SOFTPLUS_THRESHOLD
        return tl.where(above, x, log1p), tl.where(above, 1.0, e / w)
    else:
        return x, tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _load_bc(ptr, rows, offs_n, t, L, mask, fixed, VARIABLE: tl.constexpr):
    """B_t or C_t per channel, [BLOCK_D, BLOCK_N] fp32: row d starts at rows[d] when
    variable (n steps by L), else the fixed (Dm, N) tile loaded once."""
    if VARIABLE:
        return tl.load(ptr + rows[:, None] + offs_n[None, :] * L + t, mask=mask, other=0.0).to(tl.float32)
    else:
        return fixed


@triton.jit
def _load_fixed(ptr, offs_d, offs_n, N, mask, VARIABLE: tl.constexpr):
    """The (Dm, N) tile of a fixed B or C, fp32; zeros when variable (unused)."""
    if VARIABLE:
        return tl.zeros(mask.shape, dtype=tl.float32)
    else:
        return tl.load(ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _group_rows(i_b, offs_d, G, N, L, group_size):
    """Offset of (batch, group of channel d, n=0, t=0) in a (Bt, G, N, L) tensor, [BLOCK_D]."""
    return ((i_b * G + offs_d // group_size) * N) * L


@triton.jit
def _load_vector(ptr, offs_d, mask_d, default, HAS: tl.constexpr):
    if HAS:
        return tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        return tl.full(offs_d.shape, default, tl.float32)


@triton.jit
def _channel_params(A_ptr, D_ptr, delta_bias_ptr, B_ptr, C_ptr, i_b, offs_d, offs_n, mask_d, mask, N, L, G_B, G_C,
                    group_size_b, group_size_c, HAS_D: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
                    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr):
    """What the program's channels offs_d read once: A [BLOCK_D, BLOCK_N] in the state dtype, D and
    delta_bias [BLOCK_D] (zeros when absent), B and C when fixed, and where each channel's group
    rows of B and C start when they vary."""
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask, other=0.0)  # [BLOCK_D, BLOCK_N]
    skip = _load_vector(D_ptr, offs_d, mask_d, 0.0, HAS_D)  # [BLOCK_D]
    bias = _load_vector(delta_bias_ptr, offs_d, mask_d, 0.0, HAS_DELTA_BIAS)
    B_fixed = _load_fixed(B_ptr, offs_d, offs_n, N, mask, B_VARIABLE)
    C_fixed = _load_fixed(C_ptr, offs_d, offs_n, N, mask, C_VARIABLE)
    b_rows = _group_rows(i_b, offs_d, G_B, N, L, group_size_b)
    c_rows = _group_rows(i_b, offs_d, G_C, N, L, group_size_c)
    return A, skip, bias, B_fixed, C_fixed, b_rows, c_rows


@triton.jit
def _add_bc_grad(ptr, rows, offs_n, t, L, grad, mask, mask_n, acc, VARIABLE: tl.constexpr,
                 GROUP_ALIGNED: tl.constexpr):
    """Adds one step's [BLOCK_D, BLOCK_N] gradient of B or C: atomically into the (Bt, G, N, L)
    buffer when variable (summed over the block first when it lies in one group), else into
    the register accumulator `acc` of the fixed (Dm, N) gradient, which is returned."""
    if VARIABLE:
        if GROUP_ALIGNED:
            first_row = tl.min(rows, axis=0)  # the block's group (rows never decrease along d)
            tl.atomic_add(ptr + first_row + offs_n * L + t, tl.sum(grad, axis=0), mask=mask_n, sem="relaxed")
        else:
            tl.atomic_add(ptr + rows[:, None] + offs_n[None, :] * L + t, grad, mask=mask, sem="relaxed")
        return acc
    else:
        return acc + grad


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, h0_ptr,
    out_ptr, last_ptr, checkpoints_ptr,
    Dm, L, N, G_B, G_C, group_size_b, group_size_c, num_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_INITIAL: tl.constexpr, B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, TRAINING: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_d, mask_n = offs_d < Dm, offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]  # [BLOCK_D, BLOCK_N]
    A, skip, bias, B_fixed, C_fixed, b_rows, c_rows = _channel_params(
        A_ptr, D_ptr, delta_bias_ptr, B_ptr, C_ptr, i_b, offs_d, offs_n, mask_d, mask, N, L, G_B, G_C, group_size_b,
        group_size_c, HAS_D, HAS_DELTA_BIAS, B_VARIABLE, C_VARIABLE)
    seq = (i_b * Dm + offs_d) * L  # [BLOCK_D] start of each channel's (L,) row of u, delta, z, out
    state_offs = (i_b * Dm + offs_d)[:, None] * N + offs_n[None, :]  # [BLOCK_D, BLOCK_N]
    if HAS_INITIAL:
        x = tl.load(h0_ptr + state_offs, mask=mask, other=0.0)
    else:
        x = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    checkpoint_offs = ((i_b * Dm + offs_d) * num_chunks)[:, None] * N + offs_n[None, :]
    for t in range(0, L):
        if TRAINING:
            if t % CHUNK == 0:
                tl.store(checkpoints_ptr + checkpoint_offs + (t // CHUNK) * N, x, mask=mask)
        u = tl.load(u_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]
        dt, _ = _delta(delta_ptr, seq + t, mask_d, bias, DELTA_SOFTPLUS)
        B = _load_bc(B_ptr, b_rows, offs_n, t, L, mask, B_fixed, B_VARIABLE)
        C = _load_bc(C_ptr, c_rows, offs_n, t, L, mask, C_fixed, C_VARIABLE)
        x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * B
        y = tl.sum(C * x, axis=1) + skip * u  # [BLOCK_D]
        if HAS_Z:
            z = tl.load(z_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + seq + t, to(y, out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(last_ptr + state_offs, x, mask=mask)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, checkpoints_ptr,
    grad_out_ptr, grad_last_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, ddelta_bias_ptr, dh0_ptr,
    Dm, L, N, G_B, G_C, group_size_b, group_size_c, num_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    offs_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_d, mask_n = offs_d < Dm, offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]  # [BLOCK_D, BLOCK_N]
    param_offs = offs_d[:, None] * N + offs_n[None, :]  # [BLOCK_D, BLOCK_N] into (Dm, N)
    A, skip, bias, B_fixed, C_fixed, b_rows, c_rows = _channel_params(
        A_ptr, D_ptr, delta_bias_ptr, B_ptr, C_ptr, i_b, offs_d, offs_n, mask_d, mask, N, L, G_B, G_C, group_size_b,
        group_size_c, HAS_D, HAS_DELTA_BIAS, B_VARIABLE, C_VARIABLE)
    seq = (i_b * Dm + offs_d) * L  # [BLOCK_D]
    state_offs = (i_b * Dm + offs_d)[:, None] * N + offs_n[None, :]  # [BLOCK_D, BLOCK_N]
    checkpoint_offs = ((i_b * Dm + offs_d) * num_chunks)[:, None] * N + offs_n[None, :]
    # this program's CHUNK states, [CHUNK, BLOCK_D, BLOCK_N]; step s of a chunk at s * BLOCK_D * BLOCK_N
    program = i_b * tl.num_programs(1) + i_d
    scratch = scratch_ptr + program * (CHUNK * BLOCK_D * BLOCK_N) + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N \
        + offs_n[None, :]
    g = tl.load(grad_last_ptr + state_offs, mask=mask, other=0.0)  # [BLOCK_D, BLOCK_N] dL/dx
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dB_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dC_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(0, num_chunks):
        chunk = num_chunks - 1 - k
        start = chunk * CHUNK
        steps = tl.minimum(L - start, CHUNK)
        x_start = tl.load(checkpoints_ptr + checkpoint_offs + chunk * N, mask=mask, other=0.0)
        x = x_start
        for s in range(0, steps):  # the chunk's states, x_t at step s
            t = start + s
            u = tl.load(u_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
            dt, _ = _delta(delta_ptr, seq + t, mask_d, bias, DELTA_SOFTPLUS)
            B = _load_bc(B_ptr, b_rows, offs_n, t, L, mask, B_fixed, B_VARIABLE)
            x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * B
            tl.store(scratch + s * (BLOCK_D * BLOCK_N), x)
        tl.debug_barrier()
        for r in range(0, steps):
            s = steps - 1 - r
            t = start + s
            x = tl.load(scratch + s * (BLOCK_D * BLOCK_N))
            has_prev = (tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.int32) + s) > 0
            x_prev = tl.load(scratch + (s - 1) * (BLOCK_D * BLOCK_N), mask=has_prev, other=0.0)
            x_prev = tl.where(has_prev, x_prev, x_start)
            u = tl.load(u_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]
            dt, dt_grad = _delta(delta_ptr, seq + t, mask_d, bias, DELTA_SOFTPLUS)
            B = _load_bc(B_ptr, b_rows, offs_n, t, L, mask, B_fixed, B_VARIABLE)
            C = _load_bc(C_ptr, c_rows, offs_n, t, L, mask, C_fixed, C_VARIABLE)
            dy = tl.load(grad_out_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]
            if HAS_Z:
                z = tl.load(z_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                y = tl.sum(C * x, axis=1) + skip * u
                tl.store(dz_ptr + seq + t, dy * y * sig * (1.0 + z * (1.0 - sig)), mask=mask_d)
                dy = dy * z * sig
            dD_acc += dy * u
            dC_acc = _add_bc_grad(dC_ptr, c_rows, offs_n, t, L, dy[:, None] * x, mask, mask_n, dC_acc,
                                  C_VARIABLE, GROUP_ALIGNED)
            g += dy[:, None] * C
            decay = tl.exp(dt[:, None] * A)
            g_decay = g * x_prev * decay  # dL/d(delta' A)
            dA_acc += g_decay * dt[:, None]
            gB = tl.sum(g * B, axis=1)  # [BLOCK_D]
            d_dt = tl.sum(g_decay * A, axis=1) + gB * u
            dB_acc = _add_bc_grad(dB_ptr, b_rows, offs_n, t, L, g * (dt * u)[:, None], mask, mask_n, dB_acc,
                                  B_VARIABLE, GROUP_ALIGNED)
            d_delta = d_dt * dt_grad
            dbias_acc += d_delta
            tl.store(du_ptr + seq + t, skip * dy + gB * dt, mask=mask_d)
            tl.store(ddelta_ptr + seq + t, d_delta, mask=mask_d)
            g = g * decay
        tl.debug_barrier()  # the next chunk overwrites the scratch states
    tl.store(dh0_ptr + state_offs, g, mask=mask)
    tl.atomic_add(dA_ptr + param_offs, dA_acc, mask=mask, sem="relaxed")
    if not B_VARIABLE:
        tl.atomic_add(dB_ptr + param_offs, dB_acc, mask=mask, sem="relaxed")
    if not C_VARIABLE:
        tl.atomic_add(dC_ptr + param_offs, dC_acc, mask=mask, sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d, sem="relaxed")
    if HAS_DELTA_BIAS:
        tl.atomic_add(ddelta_bias_ptr + offs_d, dbias_acc, mask=mask_d, sem="relaxed")


# ---------------------------------------------------------------------------------------
# Host launchers.


def blocks(channels: int, state_size: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): the state padded to a power of two, about 256 fp32 per program
    (more programs for small batches, and the backward stays well under 255 registers)."""
    block_n = triton.next_power_of_2(state_size)
    block_d = min(triton.next_power_of_2(channels), max(1, 256 // block_n), 64)
    return block_d, block_n


def _bc(x, Dm):
    """(tensor, variable, number of groups, channels per group) of B or C."""
    x = x.contiguous()
    if x.dim() == 4:
        return x, True, x.shape[1], Dm // x.shape[1]
    return x, False, 1, Dm


def _optional(x, dtype=None):
    if x is None:
        return None
    return (x if dtype is None else x.to(dtype)).contiguous()


def _flags(D, z, delta_bias, delta_softplus, B_variable, C_variable):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
                DELTA_SOFTPLUS=bool(delta_softplus), B_VARIABLE=B_variable, C_VARIABLE=C_variable)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, training):
    Bt, Dm, L = u.shape
    N = A.shape[1]
    u, delta = u.contiguous(), delta.contiguous()
    A = A.to(torch.float32).contiguous()
    B, B_variable, G_B, group_b = _bc(B, Dm)
    C, C_variable, G_C, group_c = _bc(C, Dm)
    D, delta_bias = _optional(D, torch.float32), _optional(delta_bias, torch.float32)
    z, initial_state = _optional(z), _optional(initial_state, torch.float32)
    num_chunks = triton.cdiv(L, CHUNK)
    out = torch.empty_like(u)
    last_state = u.new_empty((Bt, Dm, N), dtype=torch.float32)
    checkpoints = u.new_empty((Bt, Dm, num_chunks, N) if training else (0,), dtype=torch.float32)
    block_d, block_n = blocks(Dm, N)
    _selective_scan_fwd_kernel[(Bt, triton.cdiv(Dm, block_d))](
        u, delta, A, B, C, D, z, delta_bias, initial_state, out, last_state, checkpoints,
        Dm, L, N, G_B, G_C, group_b, group_c, num_chunks,
        HAS_INITIAL=initial_state is not None, TRAINING=training,
        **_flags(D, z, delta_bias, delta_softplus, B_variable, C_variable),
        CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return out, last_state, checkpoints


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, checkpoints,
                       grad_out, grad_last_state):
    """`initial_state` is not read: chunk 0's checkpoint holds it."""
    Bt, Dm, L = u.shape
    N = A.shape[1]
    u, delta, grad_out = u.contiguous(), delta.contiguous(), grad_out.contiguous()
    A = A.to(torch.float32).contiguous()
    B, B_variable, G_B, group_b = _bc(B, Dm)
    C, C_variable, G_C, group_c = _bc(C, Dm)
    D, delta_bias = _optional(D, torch.float32), _optional(delta_bias, torch.float32)
    z = _optional(z)
    grad_last_state = grad_last_state.to(torch.float32).contiguous()
    block_d, block_n = blocks(Dm, N)
    grid = (Bt, triton.cdiv(Dm, block_d))
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = torch.empty((Bt, Dm, L), **f32), torch.empty((Bt, Dm, L), **f32)
    dz = torch.empty((Bt, Dm, L) if z is not None else (0,), **f32)
    dA = torch.zeros((Dm, N), **f32)
    dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
    dD = torch.zeros((Dm,) if D is not None else (0,), **f32)
    ddelta_bias = torch.zeros((Dm,) if delta_bias is not None else (0,), **f32)
    dinitial_state = torch.empty((Bt, Dm, N), **f32)
    scratch = torch.empty((grid[0] * grid[1] * CHUNK * block_d * block_n,), **f32)
    # a channel block lies inside one group when the group size is a multiple of BLOCK_D
    aligned = all(group % block_d == 0 for group, variable in ((group_b, B_variable), (group_c, C_variable))
                  if variable)
    _selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, checkpoints.contiguous(), grad_out, grad_last_state, scratch,
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state,
        Dm, L, N, G_B, G_C, group_b, group_c, triton.cdiv(L, CHUNK),
        **_flags(D, z, delta_bias, delta_softplus, B_variable, C_variable), GROUP_ALIGNED=aligned,
        CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state


def aot_problems():
    """Launcher calls on meta tensors of realistic shapes (see rnnkern.aot): Mamba blocks of
    d_inner 1536/2560/5120 (z, D, delta_bias, softplus, B and C per step shared by the
    channels), batch 8 and 1, grouped and fixed B/C, inference."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for channels in (1536, 2560, 5120):
            yield functools.partial(_forward_and_backward, 8, channels, dtype)
        yield functools.partial(_forward_and_backward, 1, 2560, dtype)
    yield functools.partial(_forward_and_backward, 8, 2560, torch.bfloat16, groups=2)
    yield functools.partial(_forward_and_backward, 8, 1536, torch.float32, groups=None, mamba=False)
    yield functools.partial(_forward_and_backward, 1, 5120, torch.bfloat16, training=False, initial=True)


def _forward_and_backward(batch, channels, dtype, groups=1, mamba=True, training=True, initial=False, length=64,
                          state=16):
    meta = dict(device="meta", dtype=dtype)
    u, delta = torch.empty((batch, channels, length), **meta), torch.empty((batch, channels, length), **meta)
    A = torch.empty((channels, state), device="meta", dtype=torch.float32)
    bc_shape = (channels, state) if groups is None else (batch, groups, state, length)
    B, C = torch.empty(bc_shape, **meta), torch.empty(bc_shape, **meta)
    D = torch.empty(channels, device="meta", dtype=torch.float32) if mamba else None
    z = torch.empty((batch, channels, length), **meta) if mamba else None
    delta_bias = torch.empty(channels, device="meta", dtype=torch.float32) if mamba else None
    h0 = torch.empty((batch, channels, state), device="meta", dtype=torch.float32) if initial else None
    out, last, checkpoints = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, mamba, h0, training)
    if training:
        selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, mamba, h0, checkpoints, torch.empty_like(out),
                           torch.empty_like(last))
