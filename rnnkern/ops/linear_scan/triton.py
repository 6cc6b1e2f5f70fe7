"""Triton kernels of the linear recurrence h_t = a_t * h_{t-1} + b_t (math: reference.py).

A program owns BLOCK_D channels of one sequence over a range of its steps and walks them in
tiles of BLOCK_T steps: inside a tile ``tl.associative_scan`` composes the affine maps
h -> a h + b along time, the carried state is applied, and the tile's last row becomes the
next carry. The backward runs the same scan against the direction of the forward pass over
(a_{t+1}, dh_t), the incoming gradient and the shifted gates: g_t = dh_t + a_{t+1} g_{t+1}.

Where sequences x channel blocks would leave a GPU mostly idle (a small batch of long
sequences: one program per SM is latency-bound), :func:`plan` splits each sequence into
``num_chunks`` ranges of ``chunk`` steps that run in parallel, reduce-then-scan:

1. ``_linear_scan_maps_kernel``: each chunk's composed map, (prod a, the scan of b from 0);
2. ``_linear_scan_carries_kernel``: per sequence, the state entering each chunk, in order;
3. the scan kernel over every chunk from its carry.

That reads a and b twice instead of once, for num_chunks times the parallelism: 3 launches
per call instead of 1, forward and backward alike. Lengths (T, chunk, the chunk count) are
not specialised on, so a new sequence length compiles nothing new; offsets are int64.

Roofline (estimate, not measured): the scan is memory-bound, a few flops per element. Per
(t, d) element the forward moves 3 values (read a, b; write h), the backward 5 (read a, h,
dh; write da, db), and a split call adds one more read of a and b (of a and dh backward). In
bf16 that is 6 B forward and 10 B backward: (4, 8192, 1024) moves 201 MB forward, 60 us at
an H100's 3.35 TB/s. Each program streams [64, 32] tiles (4 KB in bf16) with one
associative scan each, so with the grid filling every SM the kernel should reach the 70-85%
of peak bandwidth streaming kernels get; below that the grid is too small to hide memory
latency, which is what the split is for.
"""
import dataclasses
import functools

import torch
import triton
import triton.language as tl

BLOCK_T = 64
MIN_CHUNK = 4 * BLOCK_T  # fewest steps a chunk of a split sequence has
H100_SMS = 132  # the program count a launch aims at where no CUDA device can be asked


@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    # applying h -> a_first h + b_first, then h -> a_then h + b_then
    return a_first * a_then, b_first * a_then + b_then


@triton.jit
def _sequence(cu_seqlens_ptr, i_n, T, IS_VARLEN: tl.constexpr):
    """(batch row, first time index, length) of sequence i_n, int64."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int64)
        return tl.zeros_like(bos), bos, eos - bos
    else:
        return i_n.to(tl.int64), tl.zeros_like(i_n).to(tl.int64), tl.zeros_like(i_n).to(tl.int64) + T


@triton.jit
def _chunk_tile(cu_seqlens_ptr, T, D, chunk, IS_VARLEN: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sequence i_n (program axis 0: its batch row, first time index and length),
    channels offs_d [BLOCK_D] of D (axis 1, int64) with their mask, and chunk i_c (axis 2): the
    steps [lo, hi) of the sequence it scans."""
    i_n = tl.program_id(0)
    batch, bos, length = _sequence(cu_seqlens_ptr, i_n, T, IS_VARLEN)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    i_c = tl.program_id(2)
    lo = tl.minimum(i_c.to(tl.int64) * chunk, length)
    hi = tl.minimum(lo + chunk, length)
    return i_n.to(tl.int64), batch, bos, length, offs_d, offs_d < D, i_c, lo, hi


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
        return length - 1 - step
    else:
        return step


@triton.jit
def _last_row(x, rows, BLOCK_T: tl.constexpr):
    return tl.sum(tl.where((rows == BLOCK_T - 1)[:, None], x, 0.0), axis=0)


@triton.jit
def _scan_steps(a_ptr, b_ptr, h_ptr, state, batch, bos, length, lo, hi, offs_d, mask_d, T, D,
                stride_a_b, stride_a_t, stride_a_d, stride_b_b, stride_b_t, stride_b_d,
                STORE: tl.constexpr, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Steps [lo, hi) of one sequence from `state` [BLOCK_D]; stores h when STORE. Returns the
    state after them and the product of their gates."""
    rows = tl.arange(0, BLOCK_T)
    gates = tl.full(state.shape, 1.0, tl.float32)
    for start in range(lo, hi, BLOCK_T):
        step = start + rows  # [BLOCK_T] steps in the order they are taken
        t = bos + _time_of_step(step, length, REVERSE)
        mask = (step < hi)[:, None] & mask_d[None, :]  # [BLOCK_T, BLOCK_D]
        a_ptrs = a_ptr + batch * stride_a_b + t[:, None] * stride_a_t + offs_d[None, :] * stride_a_d
        b_ptrs = b_ptr + batch * stride_b_b + t[:, None] * stride_b_t + offs_d[None, :] * stride_b_d
        # padding steps (a=1, b=0) leave the state unchanged, so the last row is the carry
        a = tl.load(a_ptrs, mask=mask, other=1.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        a_scan, b_scan = tl.associative_scan((a, b), axis=0, combine_fn=_compose)
        h = a_scan * state[None, :] + b_scan  # [BLOCK_T, BLOCK_D]
        if STORE:
            tl.store(h_ptr + (batch * T + t[:, None]) * D + offs_d[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
        state = _last_row(h, rows, BLOCK_T)
        gates = gates * _last_row(a_scan, rows, BLOCK_T)
    return state, gates


@triton.jit
def _grad_steps(a_ptr, h_ptr, dh_ptr, da_ptr, db_ptr, h0, g, batch, bos, length, lo, hi, offs_d, mask_d, T, D,
                stride_a_b, stride_a_t, stride_a_d, stride_dh_b, stride_dh_t, stride_dh_d,
                STORE: tl.constexpr, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Forward steps [lo, hi) of one sequence, last first, from g = dL/dh after them [BLOCK_D];
    stores dL/da and dL/db when STORE. Returns g = dL/dh_t at step lo and the product of the
    gates a_{t+1} the steps multiplied g by."""
    a_base = a_ptr + batch * stride_a_b + offs_d[None, :] * stride_a_d
    rows = tl.arange(0, BLOCK_T)
    gates = tl.full(g.shape, 1.0, tl.float32)
    for start in range(0, hi - lo, BLOCK_T):
        step = hi - 1 - (start + rows)  # [BLOCK_T] forward steps, last first
        valid = (step >= lo)[:, None] & mask_d[None, :]  # [BLOCK_T, BLOCK_D]
        t = bos + _time_of_step(step, length, REVERSE)
        # g_t = dh_t + a_{t+1} g_{t+1}; past the last step the gate is 1 and g is dL/dh_final
        has_next = valid & (step + 1 < length)[:, None]
        t_next = bos + _time_of_step(step + 1, length, REVERSE)
        a_next = tl.load(a_base + t_next[:, None] * stride_a_t, mask=has_next, other=1.0).to(tl.float32)
        dh_ptrs = dh_ptr + batch * stride_dh_b + t[:, None] * stride_dh_t + offs_d[None, :] * stride_dh_d
        dh = tl.load(dh_ptrs, mask=valid, other=0.0).to(tl.float32)
        a_scan, dh_scan = tl.associative_scan((a_next, dh), axis=0, combine_fn=_compose)
        g_t = a_scan * g[None, :] + dh_scan  # [BLOCK_T, BLOCK_D] dL/dh_t
        if STORE:
            has_prev = valid & (step >= 1)[:, None]
            t_prev = bos + _time_of_step(step - 1, length, REVERSE)
            h_prev = tl.load(h_ptr + (batch * T + t_prev[:, None]) * D + offs_d[None, :], mask=has_prev, other=0.0)
            h_prev = tl.where((step == 0)[:, None], h0[None, :], h_prev.to(tl.float32))
            out = (batch * T + t[:, None]) * D + offs_d[None, :]
            tl.store(da_ptr + out, (g_t * h_prev).to(da_ptr.dtype.element_ty), mask=valid)
            tl.store(db_ptr + out, g_t.to(db_ptr.dtype.element_ty), mask=valid)
        g = _last_row(g_t, rows, BLOCK_T)
        gates = gates * _last_row(a_scan, rows, BLOCK_T)
    return g, gates


@triton.jit(do_not_specialize=["T", "chunk"])
def _linear_scan_fwd_kernel(
    a_ptr, b_ptr, h0_ptr, carries_ptr, h_ptr, ht_ptr, cu_seqlens_ptr,
    T, D, chunk,
    stride_a_b, stride_a_t, stride_a_d,
    stride_b_b, stride_b_t, stride_b_d,
    HAS_INITIAL: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, CHUNKED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """h over one chunk of steps (the whole sequence unless CHUNKED) from its carry; the final
    state when it is the only chunk (else the carries kernel has it)."""
    i_n, batch, bos, length, offs_d, mask_d, i_c, lo, hi = _chunk_tile(cu_seqlens_ptr, T, D, chunk, IS_VARLEN,
                                                                        BLOCK_D)
    if CHUNKED:
        state = tl.load(carries_ptr + (i_n * tl.num_programs(2) + i_c) * D + offs_d, mask=mask_d, other=0.0)
    else:
        state = _load_or_zeros(h0_ptr, i_n * D + offs_d, mask_d, HAS_INITIAL, BLOCK_D)  # [BLOCK_D]
    state, _ = _scan_steps(a_ptr, b_ptr, h_ptr, state, batch, bos, length, lo, hi, offs_d, mask_d, T, D,
                           stride_a_b, stride_a_t, stride_a_d, stride_b_b, stride_b_t, stride_b_d,
                           True, REVERSE, BLOCK_T)
    if not CHUNKED:
        tl.store(ht_ptr + i_n * D + offs_d, state, mask=mask_d)


@triton.jit(do_not_specialize=["T", "chunk"])
def _linear_scan_maps_kernel(
    a_ptr, b_ptr, maps_a_ptr, maps_b_ptr, cu_seqlens_ptr,
    T, D, chunk,
    stride_a_b, stride_a_t, stride_a_d,
    stride_b_b, stride_b_t, stride_b_d,
    IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Chunk i_c's map h -> A h + B (A the product of its gates, B its scan from 0) into
    maps (num_sequences, num_chunks, D); an empty chunk stores the identity."""
    i_n, batch, bos, length, offs_d, mask_d, i_c, lo, hi = _chunk_tile(cu_seqlens_ptr, T, D, chunk, IS_VARLEN,
                                                                        BLOCK_D)
    zero = tl.zeros([BLOCK_D], dtype=tl.float32)
    state, gates = _scan_steps(a_ptr, b_ptr, a_ptr, zero, batch, bos, length, lo, hi, offs_d, mask_d, T, D,
                               stride_a_b, stride_a_t, stride_a_d, stride_b_b, stride_b_t, stride_b_d,
                               False, REVERSE, BLOCK_T)
    slot = (i_n * tl.num_programs(2) + i_c) * D + offs_d
    tl.store(maps_a_ptr + slot, gates, mask=mask_d)
    tl.store(maps_b_ptr + slot, state, mask=mask_d)


@triton.jit(do_not_specialize=["num_chunks"])
def _linear_scan_carries_kernel(
    maps_a_ptr, maps_b_ptr, initial_ptr, carries_ptr, final_ptr,
    D, num_chunks,
    HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per sequence (axis 0) and channel block (axis 1): the state entering each chunk, from the
    initial one through the chunks' maps in order; the state after the last when STORE_FINAL."""
    i_n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_d = offs_d < D
    state = _load_or_zeros(initial_ptr, i_n * D + offs_d, mask_d, HAS_INITIAL, BLOCK_D)
    slots = i_n * num_chunks * D + offs_d
    for c in range(0, num_chunks):
        tl.store(carries_ptr + slots + c * D, state, mask=mask_d)
        gates = tl.load(maps_a_ptr + slots + c * D, mask=mask_d, other=1.0)
        state = gates * state + tl.load(maps_b_ptr + slots + c * D, mask=mask_d, other=0.0)
    if STORE_FINAL:
        tl.store(final_ptr + i_n * D + offs_d, state, mask=mask_d)


@triton.jit
def _backward_slot(i_n, i_c, D, offs_d):
    """Where chunk i_c's map or carry sits in the backward's (sequences, chunks, D) buffers:
    ordered as the backward takes the chunks, last first."""
    num_chunks = tl.num_programs(2)
    return (i_n * num_chunks + (num_chunks - 1 - i_c)) * D + offs_d


@triton.jit(do_not_specialize=["T", "chunk"])
def _linear_scan_bwd_kernel(
    a_ptr, h_ptr, h0_ptr, dh_ptr, dht_ptr, carries_ptr, da_ptr, db_ptr, dh0_ptr, cu_seqlens_ptr,
    T, D, chunk,
    stride_a_b, stride_a_t, stride_a_d,
    stride_dh_b, stride_dh_t, stride_dh_d,
    HAS_INITIAL: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
    REVERSE: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dL/da and dL/db over one chunk from the gradient entering it; the chunk holding the first
    step also stores dL/dh_initial = a_first g."""
    i_n, batch, bos, length, offs_d, mask_d, i_c, lo, hi = _chunk_tile(cu_seqlens_ptr, T, D, chunk, IS_VARLEN,
                                                                        BLOCK_D)
    if CHUNKED:
        g = tl.load(carries_ptr + _backward_slot(i_n, i_c, D, offs_d), mask=mask_d, other=0.0)
    else:
        g = _load_or_zeros(dht_ptr, i_n * D + offs_d, mask_d, HAS_FINAL_GRAD, BLOCK_D)  # [BLOCK_D]
    h0 = _load_or_zeros(h0_ptr, i_n * D + offs_d, mask_d, HAS_INITIAL, BLOCK_D)
    g, _ = _grad_steps(a_ptr, h_ptr, dh_ptr, da_ptr, db_ptr, h0, g, batch, bos, length, lo, hi, offs_d, mask_d,
                       T, D, stride_a_b, stride_a_t, stride_a_d, stride_dh_b, stride_dh_t, stride_dh_d,
                       True, REVERSE, BLOCK_T)
    if i_c == 0:  # g is now dL/dh at the first step; an empty sequence passes dL/dh_final through
        t_first = bos + _time_of_step(tl.zeros_like(length), length, REVERSE)
        a_first_ptrs = a_ptr + batch * stride_a_b + t_first * stride_a_t + offs_d * stride_a_d
        nonempty = (tl.zeros_like(offs_d) + length) > 0  # [BLOCK_D]
        a_first = tl.load(a_first_ptrs, mask=mask_d & nonempty, other=1.0).to(tl.float32)
        tl.store(dh0_ptr + i_n * D + offs_d, a_first * g, mask=mask_d)


@triton.jit(do_not_specialize=["T", "chunk"])
def _linear_scan_bwd_maps_kernel(
    a_ptr, dh_ptr, maps_a_ptr, maps_b_ptr, cu_seqlens_ptr,
    T, D, chunk,
    stride_a_b, stride_a_t, stride_a_d,
    stride_dh_b, stride_dh_t, stride_dh_d,
    IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Chunk i_c's map of the gradient, g -> A g + B over its steps last first, into the
    backward's maps (in the order the backward takes the chunks)."""
    i_n, batch, bos, length, offs_d, mask_d, i_c, lo, hi = _chunk_tile(cu_seqlens_ptr, T, D, chunk, IS_VARLEN,
                                                                        BLOCK_D)
    zero = tl.zeros([BLOCK_D], dtype=tl.float32)
    g, gates = _grad_steps(a_ptr, a_ptr, dh_ptr, a_ptr, a_ptr, zero, zero, batch, bos, length, lo, hi, offs_d,
                           mask_d, T, D, stride_a_b, stride_a_t, stride_a_d, stride_dh_b, stride_dh_t, stride_dh_d,
                           False, REVERSE, BLOCK_T)
    slot = _backward_slot(i_n, i_c, D, offs_d)
    tl.store(maps_a_ptr + slot, gates, mask=mask_d)
    tl.store(maps_b_ptr + slot, g, mask=mask_d)


# ---------------------------------------------------------------------------------------
# Host launchers.


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep a GPU busy: two per SM (an H100's count where no CUDA device can be
    asked, so the interpreter and the AOT check take a GPU's choices)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * H100_SMS


def plan(num_sequences: int, steps: int, dim: int, device: torch.device, chunks=None) -> tuple[int, int, int]:
    """(BLOCK_D, num_chunks, chunk): the channel block, and how many chunks of how many steps
    each sequence is split into. `steps` bounds every sequence's length (T; for packed
    sequences their total, so nothing is read from cu_seqlens). Split only where the grid of
    sequences x channel blocks is below :func:`_programs_wanted` and chunks keep MIN_CHUNK
    steps; `chunks` forces a count."""
    block_d = min(32, triton.next_power_of_2(dim))
    if chunks is None:
        programs = num_sequences * triton.cdiv(dim, block_d)
        chunks = min(triton.cdiv(steps, MIN_CHUNK), triton.cdiv(_programs_wanted(device), max(programs, 1)))
    chunk = triton.cdiv(triton.cdiv(steps, max(chunks, 1)), BLOCK_T) * BLOCK_T
    return block_d, max(1, triton.cdiv(steps, max(chunk, 1))), max(chunk, BLOCK_T)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """The launch shape of one call: grid (sequences, channel blocks, chunks), the arguments
    every sequence kernel takes after its tensors, and their constexprs."""

    grid: tuple
    num_chunks: int
    args: tuple
    flags: dict

    def carries(self, maps_kernel, tensors, initial, final, like):
        """Runs the maps and carries kernels of a split call; returns the carries, or None for
        one chunk."""
        if self.num_chunks == 1:
            return None
        N, D = self.grid[0], like.shape[2]
        maps_a, maps_b, carries = (like.new_empty((N, self.num_chunks, D), dtype=torch.float32) for _ in range(3))
        maps_kernel[self.grid](*tensors, maps_a, maps_b, *self.args, **self.flags)
        _linear_scan_carries_kernel[self.grid[:2]](
            maps_a, maps_b, initial, carries, final, D, self.num_chunks,
            HAS_INITIAL=initial is not None, STORE_FINAL=final is not None, BLOCK_D=self.flags["BLOCK_D"])
        return carries


def _launch(a, second, cu_seqlens, reverse, chunks) -> _Launch:
    """`second` is b (forward) or grad_h (backward): its strides follow a's."""
    B, T, D = a.shape
    N = a.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    block_d, num_chunks, chunk = plan(N, T, D, a.device, chunks)
    flags = dict(IS_VARLEN=cu_seqlens is not None, REVERSE=reverse, BLOCK_T=BLOCK_T, BLOCK_D=block_d)
    return _Launch((N, triton.cdiv(D, block_d), num_chunks), num_chunks,
                   (cu_seqlens, T, D, chunk, *a.stride(), *second.stride()), flags)


def linear_scan_fwd(a, b, initial_state, cu_seqlens, reverse, *, chunks=None, h=None):
    """One launch, or three where :func:`plan` splits the sequences (`chunks` forces a count);
    into `h` when given (contiguous, a's shape and dtype)."""
    launch = _launch(a, b, cu_seqlens, reverse, chunks)
    h = torch.empty(a.shape, dtype=a.dtype, device=a.device) if h is None else h
    final_state = torch.empty((launch.grid[0], a.shape[2]), dtype=torch.float32, device=a.device)
    carries = launch.carries(_linear_scan_maps_kernel, (a, b), initial_state, final_state, a)
    _linear_scan_fwd_kernel[launch.grid](
        a, b, initial_state, carries, h, final_state, *launch.args,
        HAS_INITIAL=initial_state is not None, CHUNKED=carries is not None, **launch.flags,
    )
    return h, final_state


def linear_scan_fwd_out(a, b, initial_state, cu_seqlens, reverse, out):
    """linear_scan_fwd into `out`: directly when it is contiguous (the kernel's h layout), else
    through a copy; returns the final state."""
    h, final_state = linear_scan_fwd(a, b, initial_state, cu_seqlens, reverse, h=out if out.is_contiguous() else None)
    if h is not out:
        out.copy_(h)
    return final_state


def linear_scan_bwd(a, h, initial_state, grad_h, grad_final, cu_seqlens, reverse, *, chunks=None):
    """As :func:`linear_scan_fwd`: one launch, or three for split sequences."""
    launch = _launch(a, grad_h, cu_seqlens, reverse, chunks)
    grad_a = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    grad_b = torch.empty_like(grad_a)
    grad_initial = torch.empty((launch.grid[0], a.shape[2]), dtype=torch.float32, device=a.device)
    if grad_final is not None:
        grad_final = grad_final.contiguous()
    carries = launch.carries(_linear_scan_bwd_maps_kernel, (a, grad_h), grad_final, None, a)
    _linear_scan_bwd_kernel[launch.grid](
        a, h.contiguous(), initial_state, grad_h, grad_final, carries, grad_a, grad_b, grad_initial, *launch.args,
        HAS_INITIAL=initial_state is not None, HAS_FINAL_GRAD=grad_final is not None,
        CHUNKED=carries is not None, **launch.flags,
    )
    return grad_a, grad_b, grad_initial


def aot_problems():
    """Launcher calls on meta tensors of realistic shapes (see rnnkern.aot): a batch that fills
    the GPU, long sequences that are split, packed sequences of both kinds, a transposed input."""
    yield functools.partial(_forward_and_backward, (8, 2048, 1536), torch.float16)
    for dtype in (torch.bfloat16, torch.float32):
        yield functools.partial(_forward_and_backward, (8, 2048, 1536), dtype)
        yield functools.partial(_forward_and_backward, (1, 65536, 256), dtype, reverse=True, initial=False)
        yield functools.partial(_forward_and_backward, (1, 32768, 1024), dtype, sequences=4)
        yield functools.partial(_forward_and_backward, (1, 32768, 1024), dtype, sequences=64, reverse=True)
    yield functools.partial(_forward_and_backward, (4, 4096, 1024), torch.float32, transposed=True)


def _forward_and_backward(shape, dtype, reverse=False, initial=True, sequences=None, transposed=False):
    B, T, D = shape
    meta = dict(device="meta", dtype=dtype)
    a = torch.empty((B, D, T), **meta).transpose(1, 2) if transposed else torch.empty(shape, **meta)
    b = torch.empty(shape, **meta)
    cu_seqlens = None if sequences is None else torch.empty(sequences + 1, device="meta", dtype=torch.int32)
    N = B if sequences is None else sequences
    h0 = torch.empty((N, D), device="meta", dtype=torch.float32) if initial else None
    h, final = linear_scan_fwd(a, b, h0, cu_seqlens, reverse)
    linear_scan_bwd(a, h, h0, torch.empty_like(h), torch.empty_like(final), cu_seqlens, reverse)
