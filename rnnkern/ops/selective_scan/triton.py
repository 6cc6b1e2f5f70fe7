"""Triton kernels of the selective scan (math: reference.py).

One program per (sequence, block of BLOCK_D channels) keeps the state x, [BLOCK_D, BLOCK_N] in
fp32 (N padded to a power of two), and walks L in time tiles of BLOCK_T = CHUNK steps. A tile
loads u, delta and z as [BLOCK_D, BLOCK_T] (unit stride along L) and B, C as [BLOCK_N, BLOCK_T]
(one group per program: BLOCK_D divides the group size), and scans the tile's affine maps
x -> a x + b with ``tl.associative_scan`` along time, [BLOCK_D, BLOCK_N, BLOCK_T]:

    delta'_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias)
    x_t = exp(delta'_t A) * x_{t-1} + delta'_t u_t B_t,     y_t = C_t . x_t + D u_t

then applies the carried state and carries the tile's last column on. exp(v) is exp2(v log2 e)
with log2 e folded into A. When training, the forward stores the state entering every tile
(the checkpoints, (Bt, Dm, num_chunks, N)): the backward's only scratch.

The backward walks the tiles last to first. It recomputes a tile's states from its checkpoint
with the same scan, then scans g = dL/dx_t backwards (``reverse=True``) over (a_{t+1}, dy_t C_t),
a_{t+1} from delta read one step ahead, carrying g between tiles (with reverse=True Triton
calls the combine as (the scan of the later steps, this step), as its test_scan2d checks for this
same linear recurrence, compiled and interpreted):

    g_t = a_{t+1} g_{t+1} + dy_t C_t,   dB_t = g_t delta'_t u_t,   dC_t = dy_t x_t
    a_t x_{t-1} = x_t - delta'_t u_t B_t                     (no division, no shifted state)
    d(delta'_t) = sum_n g_t a_t x_{t-1} A + u_t sum_n g_t B_t,   du_t = D dy_t + delta'_t sum_n g_t B_t
    dA = sum_t g_t a_t x_{t-1} delta'_t,   d(initial_state) = a_0 g_0

Reductions across programs. Each program sums its own steps and channels in registers, in a
fixed order. What several programs share is reduced in one of two ways, chosen per launch:
atomically into one fp32 buffer (the default; the order of the additions varies from run to
run), or, under ``torch.use_deterministic_algorithms(True)`` (ATOMIC_PARAMS and ATOMIC_BC off), each program
stores its partial sum in its own slot of a (slots, ...) buffer which one ``.sum(0)`` reduces,
so two runs give bitwise equal gradients:

- dA, dD, d(delta_bias) and fixed (Dm, N) dB, dC are shared by the Bt sequences: slots = Bt;
- variable dB, dC, (Bt, G, N, L), by the channel blocks of a group: slots = group size / BLOCK_D,
  i.e. up to (Dm / G / BLOCK_D) x the size of B in fp32 (Dm 1536, BLOCK_D 4: 384 x B).

Where a buffer has one writer per element (batch 1, or one channel block per group) it is
stored, never added, in both modes. du, ddelta, dz and d(initial_state) have one writer each.

Roofline (estimate, not measured). Per (d, t) element the forward reads u, delta, z and writes
out (bf16: 8 B), plus the checkpoints (N fp32 per CHUNK steps: 1 B) and B, C (2 N values per
step per group, shared by Dm / G channels: under 0.1 B); 9 B. The backward reads u, delta, z,
dout and the checkpoints and writes du, ddelta, dz in fp32 (8 + 1 + 12 = 21 B; delta is read
twice but the second read, one step ahead, hits L1/L2). (8, 1536, 2048): 25.2 M elements,
227 MB forward (68 us at an H100's 3.35 TB/s), 528 MB backward (158 us). The arithmetic is per
(d, n, t): an exp2, the scan's log2(BLOCK_T) = 6 combine levels of 3 flops and, at worst, 2 warp
shuffles each, the readout (2 flops); the backward has two scans and the exp2 of the shifted
decay. At 16 n that is up to ~190 shuffles per (d, t) forward and ~400 backward; an H100 issues
32 shuffle lanes per SM per clock (132 SMs, 1.75 GHz: 7.4 T/s), so the shuffles take up to
~0.65 ms forward and ~1.4 ms backward at that shape (the exp2s, 16 per SM per clock, ~0.1 ms):
the kernels are bound by the scan's shuffles, at about 10 % of HBM bandwidth, not by memory.
Less where Triton's layout gives a thread several steps of a row (those levels are sequential
in registers). mamba_ssm scans 16 steps per thread sequentially before its warp scan, which is
why it is expected to stay ahead. Occupancy (sm_90 compile): the forward takes 128 registers
at 8 warps ([4, 16, 64] tile), 2 programs per SM; the backward ~250 at 8 warps, 1 per SM.
"""
import functools

import torch
import triton
import triton.language as tl

from rnnkern.ops._sequences import packed_index
from rnnkern.ops._triton import to, with_deterministic
from rnnkern.ops.selective_scan.reference import CHUNK

SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # softplus(x) = x above it, as torch.nn.functional.softplus
LOG2E = tl.constexpr(1.4426950408889634)
BLOCK_T = CHUNK  # steps per time tile: a tile is one checkpoint chunk
MAX_BLOCK_D = 4  # channels per program at batch > 1
MAX_TILE = 4096  # elements of a [BLOCK_D, BLOCK_N, BLOCK_T] tile


@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    # applying x -> a_first x + b_first, then x -> a_then x + b_then
    return a_first * a_then, b_first * a_then + b_then


@triton.jit
def _load_tile(ptr, rows, t, mask):
    """[BLOCK_D, BLOCK_T] fp32 of a (Bt, Dm, L) tensor: channel d's steps t from rows[d]."""
    return tl.load(ptr + rows[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _delta(delta_ptr, rows, t, mask, bias, DELTA_SOFTPLUS: tl.constexpr):
    """delta' and d(delta')/d(delta), [BLOCK_D, BLOCK_T] fp32, both 0 outside `mask`."""
    x = _load_tile(delta_ptr, rows, t, mask) + bias[:, None]
    if DELTA_SOFTPLUS:
        # log1p(exp(x)) accurate for small exp(x): log(w) * e / (w - 1) with w = 1 + e
        e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
        w = 1.0 + e
        log1p = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        above = x > SOFTPLUS_THRESHOLD
        dt, grad = tl.where(above, x, log1p), tl.where(above, 1.0, e / w)
    else:
        dt, grad = x, tl.full(x.shape, 1.0, tl.float32)
    return tl.where(mask, dt, 0.0), tl.where(mask, grad, 0.0)


@triton.jit
def _load_vector(ptr, offs_d, mask_d, HAS: tl.constexpr):
    """An optional (Dm,) parameter, [BLOCK_D] fp32; zeros when absent."""
    if HAS:
        return tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        return tl.zeros(offs_d.shape, tl.float32)


@triton.jit
def _load_fixed(ptr, param_offs, mask, VARIABLE: tl.constexpr):
    """A fixed (Dm, N) B or C, [BLOCK_D, BLOCK_N] fp32; zeros when variable (unused)."""
    if VARIABLE:
        return tl.zeros(mask.shape, tl.float32)
    else:
        return tl.load(ptr + param_offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _group_row(i_b, i_d, G, group_size, N, L, BLOCK_D: tl.constexpr):
    """Offset of (batch i_b, the group of channel block i_d, n=0, t=0) in a (Bt, G, N, L)
    tensor (int64): the block lies in one group."""
    return ((i_b * G + (i_d * BLOCK_D) // group_size) * N) * L


@triton.jit
def _program_block(Dm, N, num_chunks, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's sequence i_b (axis 0) and channel block i_d (axis 1), int64; its channels
    offs_d [BLOCK_D] and state indices offs_n [BLOCK_N] with their masks and the block's; where
    its [BLOCK_D, BLOCK_N] block sits in (Dm, N), in (Bt, Dm, N) and, chunk 0, in the
    (Bt, Dm, num_chunks, N) checkpoints."""
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    offs_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] int64
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < Dm, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]  # [BLOCK_D, BLOCK_N]
    param_offs = offs_d[:, None] * N + offs_n[None, :]
    state_offs = (i_b * Dm + offs_d)[:, None] * N + offs_n[None, :]
    checkpoint_offs = ((i_b * Dm + offs_d) * num_chunks)[:, None] * N + offs_n[None, :]
    return i_b, i_d, offs_d, offs_n, mask_d, mask_n, mask_dn, param_offs, state_offs, checkpoint_offs


@triton.jit
def _channel_params(A_ptr, D_ptr, delta_bias_ptr, B_ptr, C_ptr, i_b, i_d, offs_d, mask_d, param_offs, mask_dn, N, L,
                    G_B, G_C, group_size_b, group_size_c, HAS_D: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
                    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, BLOCK_D: tl.constexpr):
    """What the program's channels read once: A [BLOCK_D, BLOCK_N] fp32, D and delta_bias
    [BLOCK_D] (zeros when absent), B and C when fixed, and where their group's rows of B and C
    start when they vary."""
    A = tl.load(A_ptr + param_offs, mask=mask_dn, other=0.0)
    skip = _load_vector(D_ptr, offs_d, mask_d, HAS_D)
    bias = _load_vector(delta_bias_ptr, offs_d, mask_d, HAS_DELTA_BIAS)
    B_fixed = _load_fixed(B_ptr, param_offs, mask_dn, B_VARIABLE)
    C_fixed = _load_fixed(C_ptr, param_offs, mask_dn, C_VARIABLE)
    b_row = _group_row(i_b, i_d, G_B, group_size_b, N, L, BLOCK_D)
    c_row = _group_row(i_b, i_d, G_C, group_size_c, N, L, BLOCK_D)
    return A, skip, bias, B_fixed, C_fixed, b_row, c_row


@triton.jit
def _bc_tile(ptr, row, offs_n, t, L, mask_nt, fixed, VARIABLE: tl.constexpr):
    """B or C over a tile: the group's [1, BLOCK_N, BLOCK_T] when variable, else the fixed
    [BLOCK_D, BLOCK_N, 1]."""
    if VARIABLE:
        tile = tl.load(ptr + row + offs_n[:, None] * L + t[None, :], mask=mask_nt, other=0.0)
        return tile.to(tl.float32)[None, :, :]
    else:
        return fixed[:, :, None]


@triton.jit
def _segments(seq_ptr, t, L, VARLEN: tl.constexpr):
    """Packed sequences over the steps t [BLOCK_T]: each step's sequence and whether it
    starts or ends it (empty sequences own no step). Without VARLEN: zeros, all False (unused)."""
    if VARLEN:
        inside = t < L
        seq = tl.load(seq_ptr + t, mask=inside, other=-1)
        before = tl.load(seq_ptr + t - 1, mask=inside & (t > 0), other=-1)
        after = tl.load(seq_ptr + t + 1, mask=t + 1 < L, other=-1)
        return seq, inside & (seq != before), inside & (seq != after)
    else:
        none = t < 0
        return t * 0, none, none


@triton.jit
def _per_sequence(ptr, seq, param_offs, Dm, N):
    """Pointers [BLOCK_D, BLOCK_N, BLOCK_T] to (seq[t], d, n) of a (S, Dm, N) tensor."""
    return ptr + seq[None, None, :] * (Dm * N) + param_offs[:, :, None]


@triton.jit
def _restarts(decay, inp, h0_ptr, seq, starts, param_offs, mask_dn, Dm, N, HAS_INITIAL: tl.constexpr,
              VARLEN: tl.constexpr):
    """The tile's maps x -> a x + b, [BLOCK_D, BLOCK_N, BLOCK_T]: (a_t, delta'_t u_t B_t), except
    that a step starting a packed sequence maps any x to a_t h0[seq] + delta'_t u_t B_t."""
    if VARLEN:
        first = starts[None, None, :]
        b = inp
        if HAS_INITIAL:
            h0 = tl.load(_per_sequence(h0_ptr, seq, param_offs, Dm, N), mask=first & mask_dn[:, :, None], other=0.0)
            b = inp + decay * h0
        return tl.where(first, 0.0, decay), b
    else:
        return decay, inp


@triton.jit
def _sequence_ends(decay_next, dy_c, grad_last_ptr, seq, ends, param_offs, mask_dn, Dm, N, VARLEN: tl.constexpr):
    """The backward's maps g -> a g + b over a tile, [BLOCK_D, BLOCK_N, BLOCK_T]: (a_{t+1}, dy_t C_t),
    except that a step ending a packed sequence maps any g to d(last_state)[seq] + dy_t C_t."""
    if VARLEN:
        last = ends[None, None, :]
        grad_last = tl.load(_per_sequence(grad_last_ptr, seq, param_offs, Dm, N), mask=last & mask_dn[:, :, None],
                            other=0.0)
        return tl.where(last, 0.0, decay_next), dy_c + grad_last
    else:
        return decay_next, dy_c


@triton.jit
def _tile(t, x0, u_ptr, delta_ptr, B_ptr, C_ptr, h0_ptr, u_rows, delta_rows, b_row, c_row, offs_n, mask_d, mask_n,
          L, A2, bias, B_fixed, C_fixed, seq, starts, param_offs, mask_dn, Dm, N, DELTA_SOFTPLUS: tl.constexpr,
          B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, HAS_INITIAL: tl.constexpr, VARLEN: tl.constexpr):
    """The time tile of steps t [BLOCK_T]: their mask [BLOCK_D, BLOCK_T]; u, delta' and
    d(delta')/d(delta) [BLOCK_D, BLOCK_T]; B and C (see _bc_tile); and the states x_t from x0
    [BLOCK_D, BLOCK_N] with their decays a_t and input terms delta'_t u_t B_t,
    [BLOCK_D, BLOCK_N, BLOCK_T]. Steps past L (delta' = 0) keep the state; packed sequences
    restart (see _restarts)."""
    mask = mask_d[:, None] & (t < L)[None, :]
    mask_nt = mask_n[:, None] & (t < L)[None, :]  # [BLOCK_N, BLOCK_T]
    u = _load_tile(u_ptr, u_rows, t, mask)
    dt, dt_grad = _delta(delta_ptr, delta_rows, t, mask, bias, DELTA_SOFTPLUS)
    B3 = _bc_tile(B_ptr, b_row, offs_n, t, L, mask_nt, B_fixed, B_VARIABLE)
    C3 = _bc_tile(C_ptr, c_row, offs_n, t, L, mask_nt, C_fixed, C_VARIABLE)
    decay = tl.exp2(dt[:, None, :] * A2[:, :, None])  # [BLOCK_D, BLOCK_N, BLOCK_T]
    inp = (dt * u)[:, None, :] * B3
    maps = _restarts(decay, inp, h0_ptr, seq, starts, param_offs, mask_dn, Dm, N, HAS_INITIAL, VARLEN)
    a, b = tl.associative_scan(maps, axis=2, combine_fn=_compose)
    return mask, mask_nt, u, dt, dt_grad, B3, C3, a * x0[:, :, None] + b, decay, inp


@triton.jit
def _column(x, offs_t, index):
    """Column `index` of x [BLOCK_D, BLOCK_N, BLOCK_T] along time, [BLOCK_D, BLOCK_N]."""
    return tl.sum(tl.where((offs_t == index)[None, None, :], x, 0.0), axis=2)


@triton.jit
def _reduce(ptr, slot, slot_size, offs, value, mask, ATOMIC: tl.constexpr):
    """A partial sum of a gradient several programs share: added atomically into ptr + offs, or
    stored into this program's slot of a (slots, ...) buffer that the launcher sums."""
    if ATOMIC:
        tl.atomic_add(ptr + offs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr + slot * slot_size + offs, value, mask=mask)


@triton.jit
def _bc_grad(ptr, row, offs_n, t, L, grad3, mask_nt, acc, slot, slot_size, VARIABLE: tl.constexpr,
             ATOMIC: tl.constexpr):
    """A tile's gradient of B or C, [BLOCK_D, BLOCK_N, BLOCK_T]: when variable, summed over the
    block's channels and reduced into the group's (Bt, G, N, L) rows; when fixed, summed over the
    tile into the register accumulator `acc` [BLOCK_D, BLOCK_N], which is returned."""
    if VARIABLE:
        _reduce(ptr, slot, slot_size, row + offs_n[:, None] * L + t[None, :], tl.sum(grad3, axis=0), mask_nt,
                ATOMIC)
        return acc
    else:
        return acc + tl.sum(grad3, axis=2)


@triton.jit(do_not_specialize=["L", "num_chunks"])
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, h0_ptr, seq_ptr,
    out_ptr, last_ptr, checkpoints_ptr,
    Dm, L, N, G_B, G_C, group_size_b, group_size_c, num_chunks,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_INITIAL: tl.constexpr, B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, TRAINING: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i_b, i_d, offs_d, offs_n, mask_d, mask_n, mask_dn, param_offs, state_offs, checkpoint_offs = _program_block(
        Dm, N, num_chunks, BLOCK_D, BLOCK_N)
    A, skip, bias, B_fixed, C_fixed, b_row, c_row = _channel_params(
        A_ptr, D_ptr, delta_bias_ptr, B_ptr, C_ptr, i_b, i_d, offs_d, mask_d, param_offs, mask_dn, N, L, G_B, G_C,
        group_size_b, group_size_c, HAS_D, HAS_DELTA_BIAS, B_VARIABLE, C_VARIABLE, BLOCK_D)
    A2, offs_t = A * LOG2E, tl.arange(0, BLOCK_T)  # A log2(e): exp(v A) = exp2(v A2)
    u_rows, delta_rows = i_b * stride_u_b + offs_d * stride_u_d, i_b * stride_delta_b + offs_d * stride_delta_d
    z_rows, out_rows = i_b * stride_z_b + offs_d * stride_z_d, (i_b * Dm + offs_d) * L  # [BLOCK_D]
    if HAS_INITIAL and not VARLEN:
        x = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0)
    else:  # packed: step 0 starts a sequence
        x = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for c in range(0, num_chunks):
        if TRAINING:
            tl.store(checkpoints_ptr + checkpoint_offs + c * N, x, mask=mask_dn)
        t = c * BLOCK_T + offs_t
        seq, starts, ends = _segments(seq_ptr, t, L, VARLEN)
        mask, _, u, _, _, _, C3, xs, _, _ = _tile(
            t, x, u_ptr, delta_ptr, B_ptr, C_ptr, h0_ptr, u_rows, delta_rows, b_row, c_row, offs_n, mask_d, mask_n,
            L, A2, bias, B_fixed, C_fixed, seq, starts, param_offs, mask_dn, Dm, N, DELTA_SOFTPLUS, B_VARIABLE,
            C_VARIABLE, HAS_INITIAL, VARLEN)
        y = tl.sum(C3 * xs, axis=1) + skip[:, None] * u  # [BLOCK_D, BLOCK_T]
        if HAS_Z:
            z = _load_tile(z_ptr, z_rows, t, mask)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + out_rows[:, None] + t[None, :], to(y, out_ptr.dtype.element_ty), mask=mask)
        if VARLEN:  # the state after each sequence's last step
            tl.store(_per_sequence(last_ptr, seq, param_offs, Dm, N), xs, mask=ends[None, None, :] & mask_dn[:, :, None])
        x = _column(xs, offs_t, BLOCK_T - 1)  # steps past L kept the state
    if not VARLEN:
        tl.store(last_ptr + state_offs, x, mask=mask_dn)


@triton.jit(do_not_specialize=["L", "num_chunks", "bc_slot_size"])
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, h0_ptr, seq_ptr, checkpoints_ptr,
    grad_out_ptr, grad_last_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, ddelta_bias_ptr, dh0_ptr,
    Dm, L, N, G_B, G_C, group_size_b, group_size_c, num_chunks, bc_slots, bc_slot_size,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d, stride_dout_b, stride_dout_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, HAS_INITIAL: tl.constexpr, VARLEN: tl.constexpr,
    ATOMIC_PARAMS: tl.constexpr, ATOMIC_BC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    i_b, i_d, offs_d, offs_n, mask_d, mask_n, mask_dn, param_offs, state_offs, checkpoint_offs = _program_block(
        Dm, N, num_chunks, BLOCK_D, BLOCK_N)
    A, skip, bias, B_fixed, C_fixed, b_row, c_row = _channel_params(
        A_ptr, D_ptr, delta_bias_ptr, B_ptr, C_ptr, i_b, i_d, offs_d, mask_d, param_offs, mask_dn, N, L, G_B, G_C,
        group_size_b, group_size_c, HAS_D, HAS_DELTA_BIAS, B_VARIABLE, C_VARIABLE, BLOCK_D)
    A2, offs_t = A * LOG2E, tl.arange(0, BLOCK_T)  # A log2(e): exp(v A) = exp2(v A2)
    bc_slot = i_d % bc_slots  # this block's slot among the bc_slots channel blocks of its group
    u_rows, delta_rows = i_b * stride_u_b + offs_d * stride_u_d, i_b * stride_delta_b + offs_d * stride_delta_d
    z_rows, dout_rows = i_b * stride_z_b + offs_d * stride_z_d, i_b * stride_dout_b + offs_d * stride_dout_d
    grad_rows = (i_b * Dm + offs_d) * L  # [BLOCK_D] into du, ddelta, dz
    if VARLEN:  # dL/dx at the step after the tile; packed, each sequence's end adds d(last_state)
        g = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    else:
        g = tl.load(grad_last_ptr + state_offs, mask=mask_dn, other=0.0)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dB_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dC_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(0, num_chunks):
        c = num_chunks - 1 - k
        x0 = tl.load(checkpoints_ptr + checkpoint_offs + c * N, mask=mask_dn, other=0.0)
        t = c * BLOCK_T + offs_t
        seq, starts, ends = _segments(seq_ptr, t, L, VARLEN)
        mask, mask_nt, u, dt, dt_grad, B3, C3, xs, decay, inp = _tile(
            t, x0, u_ptr, delta_ptr, B_ptr, C_ptr, h0_ptr, u_rows, delta_rows, b_row, c_row, offs_n, mask_d, mask_n,
            L, A2, bias, B_fixed, C_fixed, seq, starts, param_offs, mask_dn, Dm, N, DELTA_SOFTPLUS, B_VARIABLE,
            C_VARIABLE, HAS_INITIAL, VARLEN)
        dy = _load_tile(grad_out_ptr, dout_rows, t, mask)  # [BLOCK_D, BLOCK_T]
        if HAS_Z:
            z = _load_tile(z_ptr, z_rows, t, mask)
            sig = tl.sigmoid(z)
            y = tl.sum(C3 * xs, axis=1) + skip[:, None] * u
            tl.store(dz_ptr + grad_rows[:, None] + t[None, :], dy * y * sig * (1.0 + z * (1.0 - sig)), mask=mask)
            dy = dy * z * sig
        # a_{t+1}: 1 past the last step, where g is dL/d(last_state)
        dt_next, _ = _delta(delta_ptr, delta_rows, t + 1, mask_d[:, None] & (t + 1 < L)[None, :], bias,
                            DELTA_SOFTPLUS)
        decay_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        maps = _sequence_ends(decay_next, dy[:, None, :] * C3, grad_last_ptr, seq, ends, param_offs, mask_dn, Dm, N,
                              VARLEN)
        g_a, g_b = tl.associative_scan(maps, axis=2, combine_fn=_compose, reverse=True)
        gs = g_a * g[:, :, None] + g_b  # [BLOCK_D, BLOCK_N, BLOCK_T] dL/dx_t
        g = _column(gs, offs_t, 0)
        if VARLEN:  # d(initial_state) of each sequence: a_t g_t at its first step
            tl.store(_per_sequence(dh0_ptr, seq, param_offs, Dm, N), decay * gs,
                     mask=starts[None, None, :] & mask_dn[:, :, None])
        g_decay = gs * (xs - inp)  # g_t a_t x_{t-1}
        dA_acc += tl.sum(g_decay * dt[:, None, :], axis=2)
        gB = tl.sum(gs * B3, axis=1)  # [BLOCK_D, BLOCK_T]
        d_delta = (tl.sum(g_decay * A[:, :, None], axis=1) + gB * u) * dt_grad
        tl.store(ddelta_ptr + grad_rows[:, None] + t[None, :], d_delta, mask=mask)
        tl.store(du_ptr + grad_rows[:, None] + t[None, :], skip[:, None] * dy + gB * dt, mask=mask)
        dbias_acc += tl.sum(d_delta, axis=1)
        dD_acc += tl.sum(dy * u, axis=1)
        dB_acc = _bc_grad(dB_ptr, b_row, offs_n, t, L, gs * (dt * u)[:, None, :], mask_nt, dB_acc, bc_slot,
                          bc_slot_size, B_VARIABLE, ATOMIC_BC)
        dC_acc = _bc_grad(dC_ptr, c_row, offs_n, t, L, dy[:, None, :] * xs, mask_nt, dC_acc, bc_slot,
                          bc_slot_size, C_VARIABLE, ATOMIC_BC)
    if not VARLEN:
        dt_first, _ = _delta(delta_ptr, delta_rows, offs_t, mask_d[:, None] & (offs_t == 0)[None, :], bias,
                             DELTA_SOFTPLUS)
        tl.store(dh0_ptr + state_offs, tl.exp2(tl.sum(dt_first, axis=1)[:, None] * A2) * g, mask=mask_dn)
    _reduce(dA_ptr, i_b, Dm * N, param_offs, dA_acc, mask_dn, ATOMIC_PARAMS)
    if not B_VARIABLE:
        _reduce(dB_ptr, i_b, Dm * N, param_offs, dB_acc, mask_dn, ATOMIC_PARAMS)
    if not C_VARIABLE:
        _reduce(dC_ptr, i_b, Dm * N, param_offs, dC_acc, mask_dn, ATOMIC_PARAMS)
    if HAS_D:
        _reduce(dD_ptr, i_b, Dm, offs_d, dD_acc, mask_d, ATOMIC_PARAMS)
    if HAS_DELTA_BIAS:
        _reduce(ddelta_bias_ptr, i_b, Dm, offs_d, dbias_acc, mask_d, ATOMIC_PARAMS)


# ---------------------------------------------------------------------------------------
# Host launchers.


def plan(batch: int, channels: int, state_size: int, group_size) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): the state padded to a power of two; MAX_BLOCK_D channels per program
    at batch > 1 (Mamba widths, D >= 1536, then give >= 768 programs), half as many for one
    sequence (latency: twice the programs), no more than a MAX_TILE tile holds, and a power of
    two dividing `group_size` (the channels per group of variable B/C; None when both are
    fixed) so that a block reads one group."""
    block_n = triton.next_power_of_2(state_size)
    block_d = min(MAX_BLOCK_D if batch > 1 else MAX_BLOCK_D // 2, max(1, MAX_TILE // (block_n * BLOCK_T)),
                  triton.next_power_of_2(channels))
    while group_size is not None and group_size % block_d:
        block_d //= 2
    return block_d, block_n


def num_warps(block_d: int, block_n: int, elements_per_thread: int) -> int:
    """Warps for a [block_d, block_n, BLOCK_T] tile at `elements_per_thread` per tensor, at most 8."""
    return max(1, min(8, block_d * block_n * BLOCK_T // (32 * elements_per_thread)))


# Chosen from the sm_90 compile (rnnkern.aot) of the [4 | 2, 16, 64] tiles: the forward at 16 takes
# ~128 registers (32 per thread: ~250), the backward at 16 (BLOCK_D 4) or 8 (BLOCK_D 2) stays
# under 255 without spilling (4 warps for BLOCK_D 4: 528 bytes spilled).
FWD_ELEMENTS_PER_THREAD = 16
BWD_ELEMENTS_PER_THREAD = 8


def _bc(x, Dm):
    """(tensor, variable, number of groups, channels per group) of B or C."""
    x = x.contiguous()
    if x.dim() == 4:
        return x, True, x.shape[1], Dm // x.shape[1]
    return x, False, 1, Dm


def _group_size(B_variable, group_b, C_variable, group_c):
    """Channels per group of the variable B/C (the same for both), None when both are fixed."""
    return group_b if B_variable else (group_c if C_variable else None)


def _rows(x):
    """x (Bt, Dm, L) with unit stride along L (other strides are passed to the kernels)."""
    return x if x.stride(2) == 1 else x.contiguous()


def _row_strides(*tensors) -> tuple:
    """(batch stride, channel stride) of each (Bt, Dm, L) tensor; (0, 0) for None."""
    return tuple(s for x in tensors for s in ((0, 0) if x is None else x.stride()[:2]))


def _sequence_index(cu_seqlens, length):
    """(L,) int64: the packed sequence of every step; None unpacked."""
    return None if cu_seqlens is None else packed_index(cu_seqlens, length)


def _optional(x, dtype=None):
    if x is None:
        return None
    return (x if dtype is None else x.to(dtype)).contiguous()


def _flags(D, z, delta_bias, delta_softplus, B_variable, C_variable, initial_state, cu_seqlens):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
                DELTA_SOFTPLUS=bool(delta_softplus), B_VARIABLE=B_variable, C_VARIABLE=C_variable,
                HAS_INITIAL=initial_state is not None, VARLEN=cu_seqlens is not None)


def _per_sequence_or(x, shape, like):
    """A (S, Dm, N) result of packed sequences, prefilled for the empty ones (which own no step):
    a copy of x, zeros when None. The kernels write the others."""
    return like.new_zeros(shape, dtype=torch.float32) if x is None else x.to(torch.float32, copy=True)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, training):
    Bt, Dm, L = u.shape
    N = A.shape[1]
    u, delta = _rows(u), _rows(delta)
    A = A.to(torch.float32).contiguous()
    B, B_variable, G_B, group_b = _bc(B, Dm)
    C, C_variable, G_C, group_c = _bc(C, Dm)
    D, delta_bias = _optional(D, torch.float32), _optional(delta_bias, torch.float32)
    z = None if z is None else _rows(z)
    initial_state = _optional(initial_state, torch.float32)
    num_chunks = triton.cdiv(L, CHUNK)
    out = torch.empty((Bt, Dm, L), dtype=u.dtype, device=u.device)
    if cu_seqlens is None:
        last_state = u.new_empty((Bt, Dm, N), dtype=torch.float32)
    else:
        last_state = _per_sequence_or(initial_state, (cu_seqlens.shape[0] - 1, Dm, N), u)
    checkpoints = u.new_empty((Bt, Dm, num_chunks, N) if training else (0,), dtype=torch.float32)
    block_d, block_n = plan(Bt, Dm, N, _group_size(B_variable, group_b, C_variable, group_c))
    _selective_scan_fwd_kernel[(Bt, triton.cdiv(Dm, block_d))](
        u, delta, A, B, C, D, z, delta_bias, initial_state, _sequence_index(cu_seqlens, L), out, last_state,
        checkpoints, Dm, L, N, G_B, G_C, group_b, group_c, num_chunks, *_row_strides(u, delta, z), TRAINING=training,
        **_flags(D, z, delta_bias, delta_softplus, B_variable, C_variable, initial_state, cu_seqlens),
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=BLOCK_T,
        num_warps=num_warps(block_d, block_n, FWD_ELEMENTS_PER_THREAD),
    )
    return out, last_state, checkpoints


def _shared_grad(slots: int, shape, atomic: bool, like):
    """The fp32 buffer of a gradient several programs reduce into: one zeroed slot they add to
    atomically, or `slots` slots each written by one program (summed by the caller)."""
    if atomic:
        return torch.zeros((1, *shape), dtype=torch.float32, device=like.device)
    return torch.empty((slots, *shape), dtype=torch.float32, device=like.device)


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, checkpoints,
                       grad_out, grad_last_state):
    """`initial_state` is read only where packed sequences restart (chunk 0's checkpoint holds it
    otherwise). Deterministic under torch.use_deterministic_algorithms(True) (see the module
    docstring)."""
    Bt, Dm, L = u.shape
    N = A.shape[1]
    u, delta, grad_out = _rows(u), _rows(delta), _rows(grad_out)
    A = A.to(torch.float32).contiguous()
    B, B_variable, G_B, group_b = _bc(B, Dm)
    C, C_variable, G_C, group_c = _bc(C, Dm)
    D, delta_bias = _optional(D, torch.float32), _optional(delta_bias, torch.float32)
    z = None if z is None else _rows(z)
    initial_state = None if cu_seqlens is None else _optional(initial_state, torch.float32)  # see above
    grad_last_state = grad_last_state.to(torch.float32).contiguous()
    group_size = _group_size(B_variable, group_b, C_variable, group_c)
    block_d, block_n = plan(Bt, Dm, N, group_size)
    deterministic = torch.are_deterministic_algorithms_enabled()
    atomic_params = not deterministic and Bt > 1
    bc_slots = 1 if group_size is None else group_size // block_d
    atomic_bc = not deterministic and bc_slots > 1
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = torch.empty((Bt, Dm, L), **f32), torch.empty((Bt, Dm, L), **f32)
    dz = torch.empty((Bt, Dm, L) if z is not None else (0,), **f32)
    dA = _shared_grad(Bt, (Dm, N), atomic_params, u)
    dB = _shared_grad(bc_slots if B_variable else Bt, B.shape, atomic_bc if B_variable else atomic_params, u)
    dC = _shared_grad(bc_slots if C_variable else Bt, C.shape, atomic_bc if C_variable else atomic_params, u)
    dD = _shared_grad(Bt, (Dm,) if D is not None else (0,), atomic_params, u)
    ddelta_bias = _shared_grad(Bt, (Dm,) if delta_bias is not None else (0,), atomic_params, u)
    if cu_seqlens is None:
        dinitial_state = torch.empty((Bt, Dm, N), **f32)
    else:  # an empty sequence passes d(last_state) on to its initial state
        dinitial_state = _per_sequence_or(grad_last_state, grad_last_state.shape, u)
    _selective_scan_bwd_kernel[(Bt, triton.cdiv(Dm, block_d))](
        u, delta, A, B, C, D, z, delta_bias, initial_state, _sequence_index(cu_seqlens, L), checkpoints.contiguous(),
        grad_out, grad_last_state,
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state,
        Dm, L, N, G_B, G_C, group_b, group_c, triton.cdiv(L, CHUNK), bc_slots, (B if B_variable else C).numel(),
        *_row_strides(u, delta, z, grad_out),
        **_flags(D, z, delta_bias, delta_softplus, B_variable, C_variable, initial_state, cu_seqlens),
        ATOMIC_PARAMS=atomic_params, ATOMIC_BC=atomic_bc,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=BLOCK_T,
        num_warps=num_warps(block_d, block_n, BWD_ELEMENTS_PER_THREAD),
    )
    dA, dB, dC, dD, ddelta_bias = (grad.sum(0) for grad in (dA, dB, dC, dD, ddelta_bias))
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state


def aot_problems():
    """Launcher calls on meta tensors of realistic shapes (see rnnkern.aot): Mamba blocks of
    d_inner 1536/2560/5120 (z, D, delta_bias, softplus, B and C per step shared by the
    channels) at batch 8 and 1 in bf16/fp16/fp32, grouped and fixed B/C, inference from an
    initial state, 16 packed sequences (with and without initial states), and the
    deterministic backward."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for channels in (1536, 2560, 5120):
            yield functools.partial(_forward_and_backward, 8, channels, dtype)
        yield functools.partial(_forward_and_backward, 1, 1536, dtype)
    yield functools.partial(_forward_and_backward, 8, 2560, torch.bfloat16, groups=2)
    yield functools.partial(_forward_and_backward, 8, 1536, torch.float32, groups=None, mamba=False)
    yield functools.partial(_forward_and_backward, 1, 5120, torch.bfloat16, training=False, initial=True)
    for initial in (False, True):  # 16 packed sequences
        yield functools.partial(_forward_and_backward, 1, 1536, torch.bfloat16, initial=initial, sequences=16)
    for batch in (8, 1):
        yield functools.partial(with_deterministic, _forward_and_backward, batch, 2560, torch.bfloat16)
    yield functools.partial(with_deterministic, _forward_and_backward, 8, 1536, torch.float32, groups=None)


def _forward_and_backward(batch, channels, dtype, groups=1, mamba=True, training=True, initial=False, length=2048,
                          state=16, sequences=None):
    meta = dict(device="meta", dtype=dtype)
    u, delta = torch.empty((batch, channels, length), **meta), torch.empty((batch, channels, length), **meta)
    A = torch.empty((channels, state), device="meta", dtype=torch.float32)
    bc_shape = (channels, state) if groups is None else (batch, groups, state, length)
    B, C = torch.empty(bc_shape, **meta), torch.empty(bc_shape, **meta)
    D = torch.empty(channels, device="meta", dtype=torch.float32) if mamba else None
    z = torch.empty((batch, channels, length), **meta) if mamba else None
    delta_bias = torch.empty(channels, device="meta", dtype=torch.float32) if mamba else None
    cu_seqlens = None if sequences is None else torch.empty(sequences + 1, device="meta", dtype=torch.int32)
    h0 = torch.empty((sequences or batch, channels, state), device="meta", dtype=torch.float32) if initial else None
    out, last, checkpoints = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, mamba, h0, cu_seqlens, training)
    if training:
        selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, mamba, h0, cu_seqlens, checkpoints,
                           torch.empty_like(out), torch.empty_like(last))
