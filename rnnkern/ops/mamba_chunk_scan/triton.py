"""Triton kernels of Mamba-2's SSD scan, in chunks (math: reference.py).

Per (b, h) the sequence splits into chunks of Q = chunk_size positions; in chunk c, with
cs_i = sum_{k <= i} dt_k A the cumulative log-decay inside the chunk, S_c the state entering it
(chunk_states[:, c]) and "j reaches i" meaning j <= i in the same packed sequence:

    y_i = sum_{j reaches i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j      the intra-chunk part
          + [no restart in 0..i] exp(cs_i) S_c C_i + D x_i             the entering state
    S_{c+1} = [no restart in the chunk] exp(cs_last) S_c + sum_{j reaches last} exp(cs_last - cs_j) dt_j x_j B_j^T

Forward, four launches:

1. ``_chunk_cumsum_kernel`` per (b, chunk, block of heads): cs, (b, h, nchunks * Q) fp32;
2. ``_chunk_state_kernel`` per (b, chunk, h, block of p): the chunk's own state, the last sum
   above, one tl.dot per block of positions ((p, Q') x (Q', n));
3. ``_state_passing_kernel`` per (b, h, block of p * n): the recurrence over chunks, in place:
   each chunk's own state is replaced by the state entering it (the chunk states), the last
   one is the final state;
4. ``_chunk_scan_kernel`` per (b, chunk, h, block of positions x block of p): y with the
   decay-masked (C B^T) as tl.dots over the position blocks up to its own, then D and the gate
   out = y silu(z).

seq_idx becomes, on the host, each position's count of restarts so far (a cumsum over l): j
reaches i where the counts are equal, and the entering state reaches i where i's count equals
that of the chunk's previous position. Positions past l and past Q in a padded tile are masked;
chunk tiles are powers of two of at least 16 (tl.dot's minimum), p and n are padded alike.

Backward, from the kept chunk states S_c, with gy = dout silu(z), dS_c the gradient of S_c
(dS_nchunks = d(final_states)) and the sums over the same positions as above:

    dS_c = [no restart] exp(cs_last) dS_{c+1} + sum_i [no restart in 0..i] exp(cs_i) gy_i C_i^T
    dx_j = sum_{i reached} (C_i . B_j) exp(cs_i - cs_j) dt_j gy_i + w_j dt_j dS_{c+1} B_j + D gy_j
    dB_j = sum_{i reached} (gy_i . x_j) exp(cs_i - cs_j) dt_j C_i + w_j dt_j dS_{c+1}^T x_j
    dC_i = sum_{j reaching} (gy_i . x_j) exp(cs_i - cs_j) dt_j B_j + [no restart in 0..i] exp(cs_i) S_c^T gy_i

(w_j = exp(cs_last - cs_j) [j reaches last]). dt enters directly and through cs; the gradient of
cs, reverse-cumsummed over the chunk, gives ddt = (direct) + A rcs and dA = sum dt rcs. Six
launches: the cumsum again; ``_chunk_state_kernel`` with GRAD (the local sum of dS_c);
``_state_passing_kernel`` with REVERSE (dS_{c+1} per chunk in place, d(initial_states), and the
carry's <dS_{c+1}, S_c> for d cs_last); ``_chunk_scan_bwd_dc_kernel`` per block of positions i
(dC, dz, dD, the row terms of d cs) and ``_chunk_scan_bwd_dx_kernel`` per block of positions j
(dx, dB, the direct ddt), both over all of p; ``_chunk_cumsum_bwd_kernel`` (ddt, dA).

Reductions. dA and dD are summed over batch, chunks (and position blocks) from per-program slots
by one ``.sum(0)``: deterministic. dB and dC of a group are shared by its h / g heads: added
atomically into one fp32 buffer (the order varies from run to run), or, under
``torch.use_deterministic_algorithms(True)``, stored in a slot per head of the group, (h / g)
times B's size in fp32, and summed (bitwise reproducible). With one head per group they are
stored in both modes. Every other gradient has one writer per element.

Precision. tl.dots accumulate in fp32; fp32 inputs multiply as
:func:`rnnkern.ops._triton.precision_for` says. For 16-bit inputs the operands are 16-bit:
x, B, C, dout exactly; the decay-weighted products (scores exp(cs_i - cs_j) dt_j, x_j w_j dt_j)
rounded once, as the output is; the fp32 chunk states, their gradients and gy (with z) enter
split in two roundings (:func:`_dot_split`, one more tl.dot each), since one rounding of a
state summed over p and n leaves ddt and dB outside two ulps of the reference (tests/tolerances.py).

Tiles (Mamba-2: p 64, n 128, chunk 256). Positions in blocks of BLOCK_Q = 32; the forward's
programs take 64 head dims, the backward's all of p (dB, dC and d cs sum over p, so no p split);
n whole. The sm_90 compile (python -m rnnkern.aot) of the bf16 kernels: the chunk scan ~172
registers at 8 warps, the chunk states ~103 at 4, the backward's dC kernel ~240 at 8 (255 and
128 B spilled with z) and dx kernel 255 (40-56 B spilled), the others 28-91; at BLOCK_Q 64 the
chunk scan and the backward spill 0.3-0.6 KB on sm_80. fp32 (dots without tensor cores, or
TF32) spills up to 0.5 KB in the backward, and 272 B in the chunk scan on sm_80. Scratch: cs, d cs and dlast, (b, h, nchunks * Q) fp32 each; the
states' gradients as chunk_states; dD's slots, (b nchunks Q/BLOCK_Q, h, p).
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rnnkern.ops._triton import dot, padded, precision_for, to
from rnnkern.ops.mamba_chunk_scan.reference import num_chunks as chunk_count

MAX_BLOCK_Q = 32  # positions per tile of a chunk (at 64 the chunk scan and the backward spill on sm_80)
MAX_BLOCK_P = 64  # head dims per program of the forward (the backward's programs take all of p)
BLOCK_PN = 1024  # state elements per program of the pass over chunks
MAX_CUMSUM_TILE = 1024  # elements of a [BLOCK_H, BLOCK_Q] tile of the cumsum kernels (4096: 255 registers)
SCAN_WARPS = 8  # of _chunk_scan_kernel: ~170 registers (at 4, ~250)
BWD_WARPS = 8  # of the two position-block backward kernels (at 4 the dx kernel spills 168 B)


# ---------------------------------------------------------------------------------------
# Helpers.


@triton.jit
def _chunk(L, chunk_size, num_chunks):
    """This program's batch i_b (int64) and chunk i_c (axis 0), the chunk's first position t0
    and its number of positions (chunk_size, fewer in a tail chunk)."""
    pid = tl.program_id(0)
    i_b, i_c = (pid // num_chunks).to(tl.int64), pid % num_chunks
    t0 = i_c * chunk_size
    return i_b, i_c, t0, tl.minimum(chunk_size, L - t0)


@triton.jit
def _rows(ptr, base, t, valid, row_stride, cols, mask_cols):
    """[BLOCK, BLOCK_COLS] of a (b, l, ...) tensor: positions t (rows, masked by valid) from
    ptr + base, columns cols."""
    offs = base + t.to(tl.int64)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs, mask=valid[:, None] & mask_cols[None, :], other=0.0)


@triton.jit
def _head(i_b, i_h, L, H, G, P, N, heads_per_group, p0, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Head i_h of batch i_b at head dims p0 + [0, BLOCK_P) and every n: offs_p, offs_n and their
    masks; the offsets (int64) of (b, 0, h, 0) in x-like (b, l, h, p) tensors and of
    (b, 0, h's group, 0) in B and C."""
    offs_p, offs_n = p0 + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    x_base, b_base = i_b * L * H * P + i_h * P, i_b * L * G * N + (i_h // heads_per_group) * N
    return offs_p, offs_n, offs_p < P, offs_n < N, x_base, b_base


@triton.jit
def _state_block(i_b, i_c, i_h, num_chunks, H, P, N, offs_p, offs_n, mask_p, mask_n):
    """The offsets and mask, [BLOCK_P, BLOCK_N], of the block at (b, c, h) of a (b, nchunks, h, p, n) tensor."""
    offs = (((i_b * num_chunks + i_c) * H + i_h) * P + offs_p)[:, None] * N + offs_n[None, :]
    return offs, mask_p[:, None] & mask_n[None, :]


@triton.jit
def _positions(dt_ptr, cs_ptr, seg_ptr, i_b, i_h, t0, offs, count, L, H, cs_len, HAS_SEQ: tl.constexpr):
    """Positions t = t0 + offs of a chunk of `count`: t, valid [BLOCK], dt and cs fp32 (0 where
    not valid) and the restart counts (0 without seq_idx)."""
    t, valid = t0 + offs, offs < count
    dt = tl.load(dt_ptr + (i_b * L + t) * H + i_h, mask=valid, other=0.0)
    cs = tl.load(cs_ptr + (i_b * H + i_h) * cs_len + t, mask=valid, other=0.0)
    if HAS_SEQ:
        seg = tl.load(seg_ptr + i_b * L + t, mask=valid, other=-1)
    else:
        seg = tl.zeros_like(offs)
    return t, valid, dt, cs, seg


@triton.jit
def _chunk_ends(cs_ptr, seg_ptr, i_b, i_h, t0, count, L, H, cs_len, HAS_SEQ: tl.constexpr):
    """cs at the chunk's last position, and the restart counts there and at the position before
    the chunk (position 0's own for chunk 0)."""
    last = t0 + count - 1
    cs_last = tl.load(cs_ptr + (i_b * H + i_h) * cs_len + last)
    if HAS_SEQ:
        seg_last = tl.load(seg_ptr + i_b * L + last)
        seg_prev = tl.load(seg_ptr + i_b * L + tl.maximum(t0 - 1, 0))
    else:
        seg_last, seg_prev = 0, 0
    return cs_last, seg_last, seg_prev


@triton.jit
def _decay(cs_i, cs_j, offs_i, offs_j, seg_i, seg_j, count):
    """exp(cs_i - cs_j) where position j reaches position i (j <= i < count, no restart
    between), else 0; on broadcast operands ([M, 1] x [1, K] or [K, 1] x [1, M])."""
    reaches = (offs_j <= offs_i) & (offs_i < count) & (seg_j == seg_i)
    return tl.exp(tl.where(reaches, cs_i - cs_j, float("-inf")))


@triton.jit
def _gate_rows(dout_ptr, z_ptr, base, t, valid, row_stride, cols, mask_cols, HAS_Z: tl.constexpr):
    """dout, z (zeros without HAS_Z) and gy = dout silu(z) (dout without z) at rows t, as
    :func:`_rows` loads them, fp32."""
    dout = _rows(dout_ptr, base, t, valid, row_stride, cols, mask_cols).to(tl.float32)
    if HAS_Z:
        z = _rows(z_ptr, base, t, valid, row_stride, cols, mask_cols).to(tl.float32)
        gy = dout * z * tl.sigmoid(z)
    else:
        z = tl.zeros_like(dout)
        gy = dout
    return dout, z, gy


@triton.jit
def _dot_split(a, b, acc, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in tl.dots on `dtype` (the inputs'), where an fp32 operand (a state, its
    gradient, gy) enters as its rounding to a 16-bit `dtype` plus the rounding of the remainder:
    about 16 significant bits, where one rounding keeps 8 (bf16) or 11 (fp16), at one more dot
    per split operand (the product of the two remainders is dropped)."""
    if dtype == tl.float32:
        return dot(a, b, acc, PRECISION)
    else:
        a_high, a_low = _split(a, dtype)
        b_high, b_low = _split(b, dtype)
        acc = dot(a_high, b_high, acc, PRECISION)
        if a.dtype == tl.float32:
            acc = dot(a_low, b_high, acc, PRECISION)
        if b.dtype == tl.float32:
            acc = dot(a_high, b_low, acc, PRECISION)
        return acc


@triton.jit
def _split(x, dtype: tl.constexpr):
    """(x rounded to dtype, the remainder rounded to dtype) for fp32 x; (x, x) for x in dtype."""
    if x.dtype == tl.float32:
        high = to(x, dtype)
        return high, to(x - high.to(tl.float32), dtype)
    else:
        return x, x


@triton.jit
def _reduce(ptr, slot, slot_size, offs, value, mask, ATOMIC: tl.constexpr):
    """A partial sum several programs share: added atomically into ptr + offs, or stored in this
    program's slot of a (slots, ...) buffer that the launcher sums."""
    if ATOMIC:
        tl.atomic_add(ptr + offs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr + slot.to(tl.int64) * slot_size + offs, value, mask=mask)


# ---------------------------------------------------------------------------------------
# Kernels.


@triton.jit(do_not_specialize=["L", "num_chunks"])
def _chunk_cumsum_kernel(dt_ptr, A_ptr, cs_ptr, L, H, chunk_size, num_chunks,
                         BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr):
    """cs[b, h, c Q + i] = sum_{k <= i} dt A over chunk c (positions past l add 0)."""
    i_b, i_c, t0, count = _chunk(L, chunk_size, num_chunks)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_q = tl.arange(0, BLOCK_Q)
    mask_h = offs_h < H
    t = t0 + offs_q  # [BLOCK_Q]
    dt = tl.load(dt_ptr + (i_b * L + t)[None, :] * H + offs_h[:, None],
                 mask=mask_h[:, None] & (offs_q < count)[None, :], other=0.0)  # [BLOCK_H, BLOCK_Q]
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0)
    cs = tl.cumsum(dt * A[:, None], axis=1)
    cs_rows = (i_b * H + offs_h) * (num_chunks * chunk_size)
    tl.store(cs_ptr + cs_rows[:, None] + t[None, :], cs, mask=mask_h[:, None] & (offs_q < chunk_size)[None, :])


@triton.jit(do_not_specialize=["L", "num_chunks"])
def _chunk_state_kernel(x_ptr, z_ptr, B_ptr, dt_ptr, cs_ptr, seg_ptr, out_ptr,
                        L, H, G, P, N, chunk_size, num_chunks, heads_per_group,
                        HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, GRAD: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A chunk's weighted sum of outer products, (b, nchunks, h, p, n) fp32:
    sum_j exp(cs_last - cs_j) dt_j x_j B_j^T over the j reaching the chunk's last position, or
    with GRAD (x_ptr = dout, B_ptr = C) sum_i exp(cs_i) gy_i C_i^T over the i the entering
    state reaches."""
    i_b, i_c, t0, count = _chunk(L, chunk_size, num_chunks)
    i_h, i_p = tl.program_id(1), tl.program_id(2)
    cs_len = num_chunks * chunk_size
    offs_p, offs_n, mask_p, mask_n, x_base, b_base = _head(i_b, i_h, L, H, G, P, N, heads_per_group, i_p * BLOCK_P,
                                                           BLOCK_P, BLOCK_N)
    cs_last, seg_last, seg_prev = _chunk_ends(cs_ptr, seg_ptr, i_b, i_h, t0, count, L, H, cs_len, HAS_SEQ)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, count, BLOCK_Q):
        t, valid, dt, cs, seg = _positions(dt_ptr, cs_ptr, seg_ptr, i_b, i_h, t0, k0 + tl.arange(0, BLOCK_Q), count,
                                           L, H, cs_len, HAS_SEQ)
        bs = _rows(B_ptr, b_base, t, valid, G * N, offs_n, mask_n)  # [BLOCK_Q, BLOCK_N]
        if GRAD:
            _, _, xs = _gate_rows(x_ptr, z_ptr, x_base, t, valid, H * P, offs_p, mask_p, HAS_Z)  # [BLOCK_Q, BLOCK_P]
            weight = tl.where(valid & (seg == seg_prev), tl.exp(cs), 0.0)
        else:
            xs = _rows(x_ptr, x_base, t, valid, H * P, offs_p, mask_p)
            weight = tl.where(valid & (seg == seg_last), tl.exp(cs_last - cs) * dt, 0.0)
        acc = dot(tl.trans(xs * weight[:, None]), bs, acc, PRECISION)  # [BLOCK_P, BLOCK_N]
    state_offs, mask_pn = _state_block(i_b, i_c, i_h, num_chunks, H, P, N, offs_p, offs_n, mask_p, mask_n)
    tl.store(out_ptr + state_offs, acc, mask=mask_pn)


@triton.jit(do_not_specialize=["L", "num_chunks"])
def _state_passing_kernel(states_ptr, start_ptr, end_ptr, prior_ptr, carry_ptr, cs_ptr, seg_ptr,
                          L, H, PN, chunk_size, num_chunks,
                          HAS_START: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
                          BLOCK: tl.constexpr):
    """s <- a_c s + states[c] over the chunks, a_c = [no restart in c] exp(cs_last of c), from
    `start` (zeros without HAS_START), storing each s before its update over states[c] and the
    last s at `end`. Forward: chunks in order, the chunks' own states become the entering
    ones. REVERSE: chunks last to first, the local dS_c become dS_{c+1}; carry[b, h, c, block]
    = a_c <dS_{c+1}, S_c> over this block, S_c read from `prior` (the chunk states)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] of p * n
    mask = offs < PN
    cs_len = num_chunks * chunk_size
    if HAS_START:
        s = tl.load(start_ptr + i_bh * PN + offs, mask=mask, other=0.0)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, num_chunks):
        c = num_chunks - 1 - k if REVERSE else k
        t0 = c * chunk_size
        cs_last, seg_last, seg_prev = _chunk_ends(cs_ptr, seg_ptr, i_b, i_h, t0, tl.minimum(chunk_size, L - t0), L, H,
                                                  cs_len, HAS_SEQ)
        decay = tl.exp(cs_last)
        if HAS_SEQ:
            decay = tl.where(seg_last == seg_prev, decay, 0.0)
        state_offs = ((i_b * num_chunks + c) * H + i_h) * PN + offs
        local = tl.load(states_ptr + state_offs, mask=mask, other=0.0)
        tl.store(states_ptr + state_offs, s, mask=mask)
        if REVERSE:
            prior = tl.load(prior_ptr + state_offs, mask=mask, other=0.0)
            tl.store(carry_ptr + (i_bh * num_chunks + c) * tl.num_programs(1) + tl.program_id(1),
                     decay * tl.sum(s * prior, axis=0))
        s = decay * s + local
    tl.store(end_ptr + i_bh * PN + offs, s, mask=mask)


@triton.jit(do_not_specialize=["L", "num_chunks"])
def _chunk_scan_kernel(x_ptr, z_ptr, B_ptr, C_ptr, D_ptr, dt_ptr, cs_ptr, seg_ptr, states_ptr, out_ptr,
                       L, H, G, P, N, chunk_size, num_chunks, heads_per_group, p_blocks,
                       HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out at the block of positions i (axis 2 // p_blocks) and of p (axis 2 % p_blocks)."""
    i_b, i_c, t0, count = _chunk(L, chunk_size, num_chunks)
    i_h, i_m, i_p = tl.program_id(1), tl.program_id(2) // p_blocks, tl.program_id(2) % p_blocks
    m0 = i_m * BLOCK_Q
    if m0 >= count:  # a tail chunk's empty block
        return
    cs_len = num_chunks * chunk_size
    offs_m = m0 + tl.arange(0, BLOCK_Q)
    offs_p, offs_n, mask_p, mask_n, x_base, b_base = _head(i_b, i_h, L, H, G, P, N, heads_per_group, i_p * BLOCK_P,
                                                           BLOCK_P, BLOCK_N)
    _, _, seg_prev = _chunk_ends(cs_ptr, seg_ptr, i_b, i_h, t0, count, L, H, cs_len, HAS_SEQ)
    t_i, valid_i, _, cs_i, seg_i = _positions(dt_ptr, cs_ptr, seg_ptr, i_b, i_h, t0, offs_m, count, L, H, cs_len,
                                              HAS_SEQ)
    c_i = _rows(C_ptr, b_base, t_i, valid_i, G * N, offs_n, mask_n)  # [BLOCK_Q, BLOCK_N]
    state_offs, mask_pn = _state_block(i_b, i_c, i_h, num_chunks, H, P, N, offs_p, offs_n, mask_p, mask_n)
    state = tl.load(states_ptr + state_offs, mask=mask_pn, other=0.0)  # [BLOCK_P, BLOCK_N]
    entering = tl.where(valid_i & (seg_i == seg_prev), tl.exp(cs_i), 0.0)
    zeros = tl.zeros([BLOCK_Q, BLOCK_P], dtype=tl.float32)
    y = _dot_split(c_i, tl.trans(state), zeros, c_i.dtype, PRECISION) * entering[:, None]  # [BLOCK_Q, BLOCK_P]
    for k0 in range(0, m0 + BLOCK_Q, BLOCK_Q):
        offs_k = k0 + tl.arange(0, BLOCK_Q)
        t_k, valid_k, dt_k, cs_k, seg_k = _positions(dt_ptr, cs_ptr, seg_ptr, i_b, i_h, t0, offs_k, count, L, H,
                                                     cs_len, HAS_SEQ)
        b_k = _rows(B_ptr, b_base, t_k, valid_k, G * N, offs_n, mask_n)  # [BLOCK_Q, BLOCK_N]
        x_k = _rows(x_ptr, x_base, t_k, valid_k, H * P, offs_p, mask_p)  # [BLOCK_Q, BLOCK_P]
        scores = dot(c_i, tl.trans(b_k), tl.zeros([BLOCK_Q, BLOCK_Q], dtype=tl.float32), PRECISION)
        scores *= _decay(cs_i[:, None], cs_k[None, :], offs_m[:, None], offs_k[None, :], seg_i[:, None],
                         seg_k[None, :], count) * dt_k[None, :]  # [BLOCK_Q (i), BLOCK_Q (j)]
        y = dot(scores, x_k, y, PRECISION)
    mask = valid_i[:, None] & mask_p[None, :]
    if HAS_D:
        x_i = _rows(x_ptr, x_base, t_i, valid_i, H * P, offs_p, mask_p)
        y += tl.load(D_ptr + i_h * P + offs_p, mask=mask_p, other=0.0)[None, :] * x_i
    if HAS_Z:
        z = _rows(z_ptr, x_base, t_i, valid_i, H * P, offs_p, mask_p).to(tl.float32)
        y *= z * tl.sigmoid(z)
    out_offs = x_base + t_i.to(tl.int64)[:, None] * (H * P) + offs_p[None, :]
    tl.store(out_ptr + out_offs, to(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["L", "num_chunks"])
def _chunk_scan_bwd_dc_kernel(x_ptr, z_ptr, dout_ptr, B_ptr, C_ptr, D_ptr, dt_ptr, cs_ptr, seg_ptr, states_ptr,
                              dC_ptr, dz_ptr, dD_ptr, dcs_ptr,
                              L, H, G, P, N, chunk_size, num_chunks, heads_per_group, q_blocks, dC_slot_size,
                              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, ATOMIC: tl.constexpr,
                              PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """At the block of positions i (axis 2, all of p): dC_i (reduced over the group's heads), dz,
    this program's slot of dD, and d cs_i's terms of the positions j reaching i and of the
    entering state (dcs, (b, h, nchunks * Q))."""
    i_b, i_c, t0, count = _chunk(L, chunk_size, num_chunks)
    i_h, i_m = tl.program_id(1), tl.program_id(2)
    m0 = i_m * BLOCK_Q
    if m0 >= count:  # a tail chunk's empty block (its dD slot is zeroed)
        return
    cs_len = num_chunks * chunk_size
    offs_m = m0 + tl.arange(0, BLOCK_Q)
    offs_p, offs_n, mask_p, mask_n, x_base, b_base = _head(i_b, i_h, L, H, G, P, N, heads_per_group, 0, BLOCK_P,
                                                           BLOCK_N)
    _, _, seg_prev = _chunk_ends(cs_ptr, seg_ptr, i_b, i_h, t0, count, L, H, cs_len, HAS_SEQ)
    t_i, valid_i, _, cs_i, seg_i = _positions(dt_ptr, cs_ptr, seg_ptr, i_b, i_h, t0, offs_m, count, L, H, cs_len,
                                              HAS_SEQ)
    c_i = _rows(C_ptr, b_base, t_i, valid_i, G * N, offs_n, mask_n)  # [BLOCK_Q, BLOCK_N]
    x_i = _rows(x_ptr, x_base, t_i, valid_i, H * P, offs_p, mask_p)  # [BLOCK_Q, BLOCK_P]
    dout, z, gy = _gate_rows(dout_ptr, z_ptr, x_base, t_i, valid_i, H * P, offs_p, mask_p, HAS_Z)
    gy_exact = gy if HAS_Z else to(gy, c_i.dtype)  # 16-bit without z (dout), else split by _dot_split
    state_offs, mask_pn = _state_block(i_b, i_c, i_h, num_chunks, H, P, N, offs_p, offs_n, mask_p, mask_n)
    state = tl.load(states_ptr + state_offs, mask=mask_pn, other=0.0)  # [BLOCK_P, BLOCK_N] S_c
    entering = tl.where(valid_i & (seg_i == seg_prev), tl.exp(cs_i), 0.0)
    y = _dot_split(c_i, tl.trans(state), tl.zeros([BLOCK_Q, BLOCK_P], dtype=tl.float32), c_i.dtype,
                   PRECISION)  # C_i S_c^T
    dcs = entering * tl.sum(gy * y, axis=1)  # [BLOCK_Q]
    y *= entering[:, None]
    dc = _dot_split(gy_exact, state, tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32), c_i.dtype, PRECISION)
    dc *= entering[:, None]
    for k0 in range(0, m0 + BLOCK_Q, BLOCK_Q):
        offs_k = k0 + tl.arange(0, BLOCK_Q)
        t_k, valid_k, dt_k, cs_k, seg_k = _positions(dt_ptr, cs_ptr, seg_ptr, i_b, i_h, t0, offs_k, count, L, H,
                                                     cs_len, HAS_SEQ)
        b_k = _rows(B_ptr, b_base, t_k, valid_k, G * N, offs_n, mask_n)  # [BLOCK_Q, BLOCK_N]
        x_k = _rows(x_ptr, x_base, t_k, valid_k, H * P, offs_p, mask_p)  # [BLOCK_Q, BLOCK_P]
        zeros = tl.zeros([BLOCK_Q, BLOCK_Q], dtype=tl.float32)
        scores = dot(c_i, tl.trans(b_k), zeros, PRECISION)  # [BLOCK_Q (i), BLOCK_Q (j)] C_i . B_j
        decay = _decay(cs_i[:, None], cs_k[None, :], offs_m[:, None], offs_k[None, :], seg_i[:, None],
                       seg_k[None, :], count) * dt_k[None, :]
        y = dot(scores * decay, x_k, y, PRECISION)
        grad = _dot_split(gy_exact, tl.trans(x_k), zeros, c_i.dtype, PRECISION) * decay  # (gy_i . x_j) exp(cs_i - cs_j) dt_j
        dc = dot(grad, b_k, dc, PRECISION)
        dcs += tl.sum(grad * scores, axis=1)
    mask = valid_i[:, None] & mask_p[None, :]
    if HAS_D:
        y += tl.load(D_ptr + i_h * P + offs_p, mask=mask_p, other=0.0)[None, :] * x_i
        slot = tl.program_id(0).to(tl.int64) * tl.num_programs(2) + i_m
        tl.store(dD_ptr + (slot * H + i_h) * P + offs_p, tl.sum(gy * x_i, axis=0), mask=mask_p)
    if HAS_Z:
        sig = tl.sigmoid(z)
        tl.store(dz_ptr + x_base + t_i.to(tl.int64)[:, None] * (H * P) + offs_p[None, :],
                 dout * y * sig * (1.0 + z * (1.0 - sig)), mask=mask)
    tl.store(dcs_ptr + (i_b * H + i_h) * cs_len + t_i, dcs, mask=valid_i)
    _reduce(dC_ptr, i_h % heads_per_group, dC_slot_size, b_base + t_i.to(tl.int64)[:, None] * (G * N) + offs_n[None, :],
            dc, valid_i[:, None] & mask_n[None, :], ATOMIC)


@triton.jit(do_not_specialize=["L", "num_chunks"])
def _chunk_scan_bwd_dx_kernel(x_ptr, z_ptr, dout_ptr, B_ptr, C_ptr, D_ptr, dt_ptr, cs_ptr, seg_ptr, dstates_ptr,
                              dx_ptr, dB_ptr, ddt_ptr, dlast_ptr,
                              L, H, G, P, N, chunk_size, num_chunks, heads_per_group, dB_slot_size,
                              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, ATOMIC: tl.constexpr,
                              PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """At the block of positions j (axis 2, all of p): dx_j, dB_j (reduced over the group's
    heads), ddt's direct terms (ddt, (b, l, h)) and, for d cs_last, v_j = d(w_j dt_j) w_j dt_j
    (dlast, (b, h, nchunks * Q)), from dS_{c+1} (dstates[:, c]) and the positions i that j reaches."""
    i_b, i_c, t0, count = _chunk(L, chunk_size, num_chunks)
    i_h, i_k = tl.program_id(1), tl.program_id(2)
    k0 = i_k * BLOCK_Q
    if k0 >= count:  # a tail chunk's empty block
        return
    cs_len = num_chunks * chunk_size
    offs_k = k0 + tl.arange(0, BLOCK_Q)
    offs_p, offs_n, mask_p, mask_n, x_base, b_base = _head(i_b, i_h, L, H, G, P, N, heads_per_group, 0, BLOCK_P,
                                                           BLOCK_N)
    cs_last, seg_last, seg_prev = _chunk_ends(cs_ptr, seg_ptr, i_b, i_h, t0, count, L, H, cs_len, HAS_SEQ)
    t_k, valid_k, dt_k, cs_k, seg_k = _positions(dt_ptr, cs_ptr, seg_ptr, i_b, i_h, t0, offs_k, count, L, H, cs_len,
                                                 HAS_SEQ)
    b_k = _rows(B_ptr, b_base, t_k, valid_k, G * N, offs_n, mask_n)  # [BLOCK_Q, BLOCK_N]
    x_k = _rows(x_ptr, x_base, t_k, valid_k, H * P, offs_p, mask_p)  # [BLOCK_Q, BLOCK_P]
    state_offs, mask_pn = _state_block(i_b, i_c, i_h, num_chunks, H, P, N, offs_p, offs_n, mask_p, mask_n)
    dstate = tl.load(dstates_ptr + state_offs, mask=mask_pn, other=0.0)  # [BLOCK_P, BLOCK_N] dS_{c+1}
    to_last = tl.where(valid_k & (seg_k == seg_last), tl.exp(cs_last - cs_k), 0.0)  # w_j
    dx = _dot_split(b_k, tl.trans(dstate), tl.zeros([BLOCK_Q, BLOCK_P], dtype=tl.float32), b_k.dtype,
                    PRECISION)  # B_j dS^T
    ddt = to_last * tl.sum(x_k * dx, axis=1)  # [BLOCK_Q]
    dx *= (to_last * dt_k)[:, None]
    db = _dot_split(to(x_k * (to_last * dt_k)[:, None], x_k.dtype), dstate,
                    tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32), x_k.dtype, PRECISION)
    tl.store(dlast_ptr + (i_b * H + i_h) * cs_len + t_k, ddt * dt_k, mask=valid_k)
    for m0 in range(k0, count, BLOCK_Q):
        offs_m = m0 + tl.arange(0, BLOCK_Q)
        t_i, valid_i, dt_i, cs_i, seg_i = _positions(dt_ptr, cs_ptr, seg_ptr, i_b, i_h, t0, offs_m, count, L, H,
                                                     cs_len, HAS_SEQ)
        c_i = _rows(C_ptr, b_base, t_i, valid_i, G * N, offs_n, mask_n)  # [BLOCK_Q, BLOCK_N]
        dout_i, z_i, gy = _gate_rows(dout_ptr, z_ptr, x_base, t_i, valid_i, H * P, offs_p, mask_p, HAS_Z)
        gy_op = to(gy, b_k.dtype)
        gy_exact = gy if HAS_Z else gy_op  # as in _chunk_scan_bwd_dc_kernel
        zeros = tl.zeros([BLOCK_Q, BLOCK_Q], dtype=tl.float32)
        scores = dot(b_k, tl.trans(c_i), zeros, PRECISION)  # [BLOCK_Q (j), BLOCK_Q (i)] B_j . C_i
        decay = _decay(cs_i[None, :], cs_k[:, None], offs_m[None, :], offs_k[:, None], seg_i[None, :],
                       seg_k[:, None], count)  # exp(cs_i - cs_j)
        dx = dot(scores * decay * dt_k[:, None], gy_op, dx, PRECISION)
        grad = _dot_split(x_k, tl.trans(gy_exact), zeros, b_k.dtype, PRECISION) * decay  # (x_j . gy_i) exp(cs_i - cs_j)
        db = dot(grad * dt_k[:, None], c_i, db, PRECISION)
        ddt += tl.sum(grad * scores, axis=1)
    mask = valid_k[:, None] & mask_p[None, :]
    if HAS_D:
        _, _, gy_k = _gate_rows(dout_ptr, z_ptr, x_base, t_k, valid_k, H * P, offs_p, mask_p, HAS_Z)
        dx += tl.load(D_ptr + i_h * P + offs_p, mask=mask_p, other=0.0)[None, :] * gy_k
    tl.store(dx_ptr + x_base + t_k.to(tl.int64)[:, None] * (H * P) + offs_p[None, :], dx, mask=mask)
    tl.store(ddt_ptr + (i_b * L + t_k) * H + i_h, ddt, mask=valid_k)
    _reduce(dB_ptr, i_h % heads_per_group, dB_slot_size, b_base + t_k.to(tl.int64)[:, None] * (G * N) + offs_n[None, :],
            db, valid_k[:, None] & mask_n[None, :], ATOMIC)


@triton.jit(do_not_specialize=["L", "num_chunks"])
def _chunk_cumsum_bwd_kernel(dt_ptr, A_ptr, dcs_ptr, dlast_ptr, carry_ptr, ddt_ptr, dA_ptr,
                             L, H, chunk_size, num_chunks, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr):
    """ddt = (its direct terms, in ddt) + A rcs and this program's slot of dA = sum dt rcs, where
    rcs_k = sum_{i >= k} d cs_i: the reverse cumsum of d cs's position terms (dcs minus the
    direct terms' dt ddt) plus d cs_last (sum of dlast, and the carry of the pass over chunks)."""
    i_b, i_c, t0, count = _chunk(L, chunk_size, num_chunks)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_q = tl.arange(0, BLOCK_Q)
    mask_h = offs_h < H
    t = t0 + offs_q  # [BLOCK_Q]
    mask = mask_h[:, None] & (offs_q < count)[None, :]  # [BLOCK_H, BLOCK_Q]
    lhd = (i_b * L + t)[None, :] * H + offs_h[:, None]  # into (b, l, h)
    hl = ((i_b * H + offs_h) * (num_chunks * chunk_size))[:, None] + t[None, :]  # into (b, h, nchunks * Q)
    dt = tl.load(dt_ptr + lhd, mask=mask, other=0.0)
    direct = tl.load(ddt_ptr + lhd, mask=mask, other=0.0)
    local = tl.load(dcs_ptr + hl, mask=mask, other=0.0) - dt * direct
    carry = tl.load(carry_ptr + (i_b * H + offs_h) * num_chunks + i_c, mask=mask_h, other=0.0)
    last = tl.sum(tl.load(dlast_ptr + hl, mask=mask, other=0.0), axis=1) + carry  # [BLOCK_H]
    rcs = tl.cumsum(local, axis=1, reverse=True) + last[:, None]
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0)
    tl.store(ddt_ptr + lhd, direct + A[:, None] * rcs, mask=mask)
    tl.store(dA_ptr + tl.program_id(0) * H + offs_h, tl.sum(tl.where(mask, dt * rcs, 0.0), axis=1), mask=mask_h)


# ---------------------------------------------------------------------------------------
# Host launchers.


@functools.lru_cache(maxsize=None)
def plan(chunk_size: int, dim: int, state_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_P, BLOCK_N, BLOCK_PN): positions per tile (the chunk padded to a power of
    two >= 16, at most MAX_BLOCK_Q), head dims per forward program, the padded state size, and
    state elements per program of the pass over chunks."""
    return (min(MAX_BLOCK_Q, padded(chunk_size)), min(MAX_BLOCK_P, padded(dim)), padded(state_size),
            min(BLOCK_PN, triton.next_power_of_2(dim * state_size)))


def _segments(seq_idx):
    """(b, l) int32: the restarts of seq_idx up to each position (None without seq_idx)."""
    if seq_idx is None:
        return None
    restarts = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return F.pad(torch.cumsum(restarts, dim=1, dtype=torch.int32), (1, 0))


def _cumsum_tile(heads: int, chunk_size: int) -> tuple[int, int]:
    block_q = triton.next_power_of_2(chunk_size)
    return max(1, min(triton.next_power_of_2(heads), MAX_CUMSUM_TILE // block_q)), block_q


def _chunk_cumsum(dt, A, chunk_size: int, chunks: int):
    """cs (b, h, chunks * chunk_size) fp32."""
    batch, length, heads = dt.shape
    cs = dt.new_empty((batch, heads, chunks * chunk_size))
    block_h, block_q = _cumsum_tile(heads, chunk_size)
    _chunk_cumsum_kernel[(batch * chunks, triton.cdiv(heads, block_h))](
        dt, A, cs, length, heads, chunk_size, chunks, BLOCK_H=block_h, BLOCK_Q=block_q)
    return cs


def _shared_grad(slots: int, shape, atomic: bool, like):
    """The fp32 buffer of dB or dC, which the heads of a group reduce into: one zeroed slot
    they add to atomically, or a slot per head (summed by the caller)."""
    if atomic:
        return like.new_zeros((1, *shape), dtype=torch.float32)
    return like.new_empty((slots, *shape), dtype=torch.float32)


def mamba_chunk_scan_fwd(x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_size, keep_chunk_states):
    batch, length, heads, dim = x.shape
    groups, state_size = B.shape[2:]
    chunks = chunk_count(length, chunk_size)
    block_q, block_p, block_n, block_pn = plan(chunk_size, dim, state_size)
    seg = _segments(seq_idx)
    cs = _chunk_cumsum(dt, A, chunk_size, chunks)
    sizes = (length, heads, groups, dim, state_size, chunk_size, chunks, heads // groups)
    flags = dict(HAS_SEQ=seg is not None, PRECISION=precision_for(x.dtype), BLOCK_Q=block_q, BLOCK_P=block_p,
                 BLOCK_N=block_n)
    p_blocks = triton.cdiv(dim, block_p)
    states = x.new_empty((batch, chunks, heads, dim, state_size), dtype=torch.float32)
    _chunk_state_kernel[(batch * chunks, heads, p_blocks)](
        x, None, B, dt, cs, seg, states, *sizes, HAS_Z=False, GRAD=False, **flags)
    final_states = x.new_empty((batch, heads, dim, state_size), dtype=torch.float32)
    _state_passing_kernel[(batch * heads, triton.cdiv(dim * state_size, block_pn))](
        states, initial_states, final_states, None, None, cs, seg, length, heads, dim * state_size, chunk_size,
        chunks, HAS_START=initial_states is not None, HAS_SEQ=seg is not None, REVERSE=False, BLOCK=block_pn)
    out = torch.empty_like(x)
    q_blocks = triton.cdiv(min(chunk_size, length), block_q)
    _chunk_scan_kernel[(batch * chunks, heads, q_blocks * p_blocks)](
        x, z, B, C, D, dt, cs, seg, states, out, *sizes, p_blocks, HAS_D=D is not None, HAS_Z=z is not None,
        **flags, num_warps=SCAN_WARPS)
    if not keep_chunk_states:
        states = x.new_empty((0,), dtype=torch.float32)
    return out, final_states, states


def mamba_chunk_scan_bwd(x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_size, chunk_states, grad_out,
                         grad_final_states):
    """dB and dC are reduced atomically across a group's heads unless
    torch.use_deterministic_algorithms(True) is set (see the module docstring)."""
    batch, length, heads, dim = x.shape
    groups, state_size = B.shape[2:]
    chunks = chunk_count(length, chunk_size)
    block_q, block_p, block_n, block_pn = plan(chunk_size, dim, state_size)
    grad_out = grad_out.contiguous()
    seg = _segments(seq_idx)
    cs = _chunk_cumsum(dt, A, chunk_size, chunks)
    sizes = (length, heads, groups, dim, state_size, chunk_size, chunks, heads // groups)
    precision = precision_for(x.dtype)
    has = dict(HAS_Z=z is not None, HAS_SEQ=seg is not None)
    f32 = dict(dtype=torch.float32, device=x.device)
    dstates = torch.empty(chunk_states.shape, **f32)
    _chunk_state_kernel[(batch * chunks, heads, triton.cdiv(dim, block_p))](
        grad_out, z, C, dt, cs, seg, dstates, *sizes, **has, GRAD=True, PRECISION=precision, BLOCK_Q=block_q,
        BLOCK_P=block_p, BLOCK_N=block_n)
    pn_blocks = triton.cdiv(dim * state_size, block_pn)
    dinitial_states = torch.empty((batch, heads, dim, state_size), **f32)
    carry = torch.empty((batch, heads, chunks, pn_blocks), **f32)
    _state_passing_kernel[(batch * heads, pn_blocks)](
        dstates, grad_final_states.to(torch.float32).contiguous(), dinitial_states, chunk_states.contiguous(), carry,
        cs, seg, length, heads, dim * state_size, chunk_size, chunks, HAS_START=True, HAS_SEQ=seg is not None,
        REVERSE=True, BLOCK=block_pn)
    per_group = heads // groups
    atomic = not torch.are_deterministic_algorithms_enabled() and per_group > 1
    dB, dC = (_shared_grad(per_group, t.shape, atomic, x) for t in (B, C))
    q_blocks = triton.cdiv(min(chunk_size, length), block_q)
    dz = torch.empty(x.shape if z is not None else (0,), **f32)
    dD = torch.zeros((batch * chunks * q_blocks, heads, dim) if D is not None else (0,), **f32)
    dcs, dlast = torch.empty(cs.shape, **f32), torch.empty(cs.shape, **f32)
    dx, ddt = torch.empty(x.shape, **f32), torch.empty(dt.shape, **f32)
    grid = (batch * chunks, heads, q_blocks)
    flags = dict(HAS_D=D is not None, **has, ATOMIC=atomic, PRECISION=precision, BLOCK_Q=block_q,
                 BLOCK_P=padded(dim), BLOCK_N=block_n, num_warps=BWD_WARPS)
    _chunk_scan_bwd_dc_kernel[grid](
        x, z, grad_out, B, C, D, dt, cs, seg, chunk_states, dC, dz, dD, dcs, *sizes, q_blocks, C.numel(), **flags)
    _chunk_scan_bwd_dx_kernel[grid](
        x, z, grad_out, B, C, D, dt, cs, seg, dstates, dx, dB, ddt, dlast, *sizes, B.numel(), **flags)
    dA = torch.empty((batch * chunks, heads), **f32)
    block_h, block_q = _cumsum_tile(heads, chunk_size)
    _chunk_cumsum_bwd_kernel[(batch * chunks, triton.cdiv(heads, block_h))](
        dt, A, dcs, dlast, carry.sum(3), ddt, dA, length, heads, chunk_size, chunks, BLOCK_H=block_h,
        BLOCK_Q=block_q)
    empty = dx.new_empty((0,))
    return (dx, ddt, dA.sum(0), dB.sum(0), dC.sum(0), empty if D is None else dD.sum(0), dz,
            empty if initial_states is None else dinitial_states)


def aot_problems():
    """Launcher calls on meta tensors of realistic shapes (see rnnkern.aot): Mamba-2 blocks
    (head dim 64, state 128, chunk 256, D per head) of 24 and 80 heads, one group, at batch 8
    in bf16/fp16/fp32 (and fp32 with TF32 dots); packed sequences (seq_idx) with the gate z and
    initial states at batch 1; the deterministic backward, with 8 groups."""
    from rnnkern.ops._triton import with_deterministic, with_tf32

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        yield functools.partial(_forward_and_backward, 8, 24, dtype)
    yield functools.partial(_forward_and_backward, 8, 80, torch.bfloat16)
    yield functools.partial(with_tf32, _forward_and_backward, 8, 24, torch.float32)
    yield functools.partial(_forward_and_backward, 1, 24, torch.bfloat16, gate=True, packed=True, initial=True)
    yield functools.partial(with_deterministic, _forward_and_backward, 8, 24, torch.bfloat16, groups=8)


def _forward_and_backward(batch, heads, dtype, groups=1, gate=False, packed=False, initial=False, length=2048,
                          dim=64, state=128, chunk_size=256):
    meta = dict(device="meta", dtype=dtype)
    f32 = dict(device="meta", dtype=torch.float32)
    x = torch.empty((batch, length, heads, dim), **meta)
    dt, A = torch.empty((batch, length, heads), **f32), torch.empty((heads,), **f32)
    B, C = (torch.empty((batch, length, groups, state), **meta) for _ in range(2))
    D = torch.empty((heads, dim), **f32)
    z = torch.empty_like(x) if gate else None
    h0 = torch.empty((batch, heads, dim, state), **f32) if initial else None
    seq_idx = torch.empty((batch, length), device="meta", dtype=torch.int32) if packed else None
    out, final, chunk_states = mamba_chunk_scan_fwd(x, dt, A, B, C, D, z, h0, seq_idx, chunk_size, True)
    mamba_chunk_scan_bwd(x, dt, A, B, C, D, z, h0, seq_idx, chunk_size, chunk_states, torch.empty_like(out),
                         torch.empty_like(final))
