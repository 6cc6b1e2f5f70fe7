"""Triton helpers shared by the LSTM, GRU and selective-scan kernels: fp32-accumulating dot
products and rounding that behave the same compiled and interpreted, a tanh the interpreter runs,
per-sequence time indexing, the tile sizes of the recurrences' two paths (persistent and
alternating, see rnnkern/ops/lstm/triton.py), the shared-memory check of the path choice and the
CUDA-graph replay of the alternating path's step loop."""
import collections
import functools
import os

import torch
import triton
import triton.language as tl

PERSISTENT_MAX = 64  # largest padded hidden/projection size of the recurrences' persistent path
BLOCK_B_PERSISTENT = 16  # sequences per program of a persistent kernel; tl.dot needs at least 16 rows
# warps of a persistent forward: with 4, the fp32 kernels at 64 spill 112-520 B on sm_80 (255 registers)
PERSISTENT_FWD_WARPS = 8
BLOCK_N = 32  # output columns per program of the alternating kernels
BLOCK_K = 32  # reduction chunk of the alternating kernels

# Triton's interpreter multiplies bf16 blocks as raw 16-bit integers and truncates fp32 to
# bf16; under it, dot widens bf16 operands to fp32 (the products are exact either way) and
# to rounds to nearest even by hand, so interpreted results match the compiled ones.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in fp32, with `a` rounded to b's dtype first (the operands of a
    16-bit layer are 16-bit, as in cuDNN). fp32 operands multiply as PRECISION says ("ieee" or
    "tf32", from :func:`precision_for`); 16-bit ones ignore it."""
    if a.dtype != b.dtype:
        a = to(a, b.dtype)
    if _INTERPRETED and b.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def to(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest even in `dtype`."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mm(acc, a_rows, stride_ak, mask_m, w_cols, stride_wk, mask_n, K, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + A @ W: row m of A starts at a_rows[m], column n of W at w_cols[n], and both step
    by their stride along k < K (int64 offsets). A is rounded to W's dtype (see :func:`dot`);
    masked rows of A add nothing."""
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k  # [BLOCK_K]
        mask_k = k < K
        a = tl.load(a_rows[:, None] + k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a, w, acc, PRECISION)  # [BLOCK_M, BLOCK_N]
    return acc


@triton.jit
def tanh(x):
    """tanh in fp32 from one exp (tl has no tanh that the interpreter runs as well). The
    clamp keeps exp finite; exp(80) already makes the quotient -1. (A form with tl.abs and
    tl.where crashes LLVM's SLP vectorizer in triton 3.9 for sm_90.)"""
    e = tl.exp(tl.minimum(-2.0 * x, 80.0, propagate_nan=tl.PropagateNan.ALL))
    return (1.0 - e) / (1.0 + e)


@triton.jit
def step_time(lengths, step, REVERSE: tl.constexpr):
    """Per sequence: the time index of `step` (int64) and whether the step is inside it."""
    active = step < lengths  # [BLOCK_B]
    if REVERSE:
        time = tl.where(active, lengths - 1 - step, step)
    else:
        time = tl.zeros_like(lengths) + step
    return time, active


@triton.jit
def persistent_tile(lengths_ptr, B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile of a persistent kernel: sequences offs_b [BLOCK_B] (program axis 0), all columns
    offs_n [BLOCK_N] of N, their masks and the tile's, and the sequences' lengths."""
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_b, mask_n = offs_b < B, offs_n < N
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    return offs_b, offs_n, mask_b, mask_n, mask_b[:, None] & mask_n[None, :], lengths


@triton.jit
def step_tile(lengths_ptr, step, B, T, N, column_tile, REVERSE: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """The tile of an alternating kernel at `step`: sequences offs_b [BLOCK_B] (program axis 0)
    and columns offs_n [BLOCK_N] of N (tile `column_tile`), both int64, with their masks and the
    tile's, the sequences' lengths, whether each is inside its sequence, and its row b * T + time
    (int64) in the (B, T, ...) tensors."""
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    offs_n = column_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_b, mask_n = offs_b < B, offs_n < N
    lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    time, active = step_time(lengths, step, REVERSE)
    rows = offs_b.to(tl.int64) * T + time  # [BLOCK_B]
    return offs_b, offs_n, mask_b, mask_n, mask_b[:, None] & mask_n[None, :], lengths, active, rows


@triton.jit
def emit(h_new, active, state_offs, h_in_ptr, h_out_ptr, y_ptr, y_offs, mask):
    """Stores y_t (zero past a sequence's end) and the next carried h (kept past the end)."""
    h_old = tl.load(h_in_ptr + state_offs, mask=mask, other=0.0)  # [BLOCK_B, BLOCK_N]
    h_new = to(h_new, h_old.dtype)
    tl.store(h_out_ptr + state_offs, tl.where(active[:, None], h_new, h_old), mask=mask)
    tl.store(y_ptr + y_offs, tl.where(active[:, None], h_new, 0.0).to(h_old.dtype), mask=mask)


# ---------------------------------------------------------------------------------------
# Launch shapes of the recurrences.


def padded(size: int) -> int:
    """A hidden size as a tl.dot dimension: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(size))


def alternating_grid(batch: int, columns: int) -> tuple[tuple[int, int], int]:
    """Grid and sequence tile of an alternating kernel over (batch, columns)."""
    block_b = min(32, padded(batch))
    return (triton.cdiv(batch, block_b), triton.cdiv(columns, BLOCK_N)), block_b


def dot_precision() -> str:
    """How fp32 tl.dot operands multiply: "tf32" where torch lets fp32 matmuls use TF32
    (``torch.backends.cuda.matmul.allow_tf32``, which ``torch.set_float32_matmul_precision``
    "high"/"medium" also sets), else "ieee" (torch's default), as cuBLAS does."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def precision_for(dtype: torch.dtype) -> str:
    """The PRECISION constexpr of a kernel on `dtype` inputs: :func:`dot_precision` for fp32;
    "ieee" for 16-bit inputs, whose operands are not fp32 (so no second variant is compiled)."""
    return dot_precision() if dtype == torch.float32 else "ieee"


def with_tf32(problem, *args) -> None:
    """Runs `problem(*args)` with torch's fp32 matmuls allowed TF32 (PRECISION "tf32"): for the
    modules' aot_problems()."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        problem(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def with_deterministic(problem, *args, **kwargs) -> None:
    """Runs `problem(*args, **kwargs)` under torch.use_deterministic_algorithms(True): for the
    aot_problems() of the kernels that reduce atomically otherwise."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        problem(*args, **kwargs)
    finally:
        torch.use_deterministic_algorithms(previous)


PATHS = ("persistent", "alternating")


def path_for(padded_sizes: tuple, shared_bytes: int, device: torch.device, path) -> str:
    """The recurrence path a launcher runs: `path` when given (one of PATHS), else persistent
    where every padded size is at most PERSISTENT_MAX and the persistent kernel's shared memory
    (`shared_bytes`) fits the device's block. (Forward and backward may take different paths:
    their workspace is the same on both.)"""
    if path is None:
        fits = max(padded_sizes) <= PERSISTENT_MAX and shared_bytes <= shared_memory_per_block(device)
        return "persistent" if fits else "alternating"
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    return path


# Opt-in shared memory per block by compute capability, where torch does not report it
_SHARED_PER_BLOCK = {(7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 7): 163 * 1024,
                     (9, 0): 227 * 1024}
_SHARED_PER_BLOCK_DEFAULT = 99 * 1024  # sm_86, sm_89 and consumer parts of later generations


def shared_memory_per_block(device: torch.device) -> float:
    """The shared memory one block may use on `device` (opt-in limit); unbounded off CUDA (the
    interpreter, meta tensors)."""
    if device.type != "cuda":
        return float("inf")
    return _cuda_shared_memory_per_block(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory_per_block(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return _SHARED_PER_BLOCK.get((props.major, props.minor), _SHARED_PER_BLOCK_DEFAULT)


def persistent_bytes(weight_elements: int, width: int, dtype: torch.dtype, backward: bool) -> int:
    """An upper bound of a persistent kernel's shared memory: its weights in the input dtype,
    plus fp32 [BLOCK_B_PERSISTENT, width] tiles staged by layout conversions, 16 for a backward
    and 2 for a forward (triton.compile reports 11-15 and 1 at widths 32-64; tests/test_aot.py
    checks the bound on every realistic variant)."""
    tiles = 16 if backward else 2
    return weight_elements * dtype.itemsize + tiles * BLOCK_B_PERSISTENT * width * 4


# ---------------------------------------------------------------------------------------
# CUDA-graph replay of an alternating path's step loop.

STEP_GRAPHS_MAX = 4  # step loops kept captured (least recently used dropped first)
# A step loop whose tensors are larger runs its launches directly: the graph's static copies would
# cost that much memory again, while per-step Python is small next to moving it.
STEP_GRAPH_MAX_BYTES = 256 * 2**20
_step_graphs: collections.OrderedDict = collections.OrderedDict()


def step_graphs_enabled(device: torch.device) -> bool:
    """Whether a step loop on `device` may replay from a CUDA graph: on CUDA, outside the
    interpreter, not while the caller captures a graph itself, unless RNNKERN_STEP_GRAPHS=0."""
    return (device.type == "cuda" and not _INTERPRETED and os.environ.get("RNNKERN_STEP_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def run_steps(name: str, run, tensors: dict, writes: frozenset, write_only: frozenset, flags: tuple) -> None:
    """Runs ``run(**tensors)``, a launcher's per-step kernel launches, on CUDA from a captured
    CUDA graph (so no Python runs per step), elsewhere directly.

    The graph is captured once per key: `name` (launcher and path), `flags` (the constexprs),
    every tensor's shape, dtype and strides, the device and the current stream; the last
    STEP_GRAPHS_MAX keys are kept, and loops over more than STEP_GRAPH_MAX_BYTES of tensors
    run directly. Its launches read and write static copies of `tensors`:
    each call copies the tensors in (all but `write_only`), replays, and copies `writes` out.
    The first call of a key warms up and captures (which synchronises the device once)."""
    device = next(t.device for t in tensors.values() if t is not None)
    size = sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)
    if not step_graphs_enabled(device) or size > STEP_GRAPH_MAX_BYTES:
        run(**tensors)
        return
    stream = torch.cuda.current_stream(device)
    key = (name, flags, device, stream.cuda_stream,
           tuple((k, None) if t is None else (k, tuple(t.shape), t.dtype, t.stride()) for k, t in tensors.items()))
    if key in _step_graphs:
        _step_graphs.move_to_end(key)
    else:
        _step_graphs[key] = _capture(run, tensors, write_only, stream)
        while len(_step_graphs) > STEP_GRAPHS_MAX:
            _step_graphs.popitem(last=False)
    graph, static = _step_graphs[key]
    for k, t in tensors.items():
        if t is not None and k not in write_only:
            static[k].copy_(t)
    graph.replay()
    for k in writes:
        tensors[k].copy_(static[k])


def _capture(run, tensors: dict, write_only: frozenset, stream) -> tuple:
    """(graph, static tensors): one eager run on copies of `tensors` (compiles and loads every
    kernel, as a capture must not), then the capture of the same launches."""
    static = {k: None if t is None else torch.empty_like(t) if k in write_only else t.clone()
              for k, t in tensors.items()}
    side = torch.cuda.Stream(stream.device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        run(**static)
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (a data loader's) do not void the capture
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        run(**static)
    return graph, static
