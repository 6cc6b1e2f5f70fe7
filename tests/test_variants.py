"""Every Triton kernel variant the launchers pick for realistic shapes runs in the interpreter.

rnnkern.aot records the launches of each Triton module's ``aot_problems()``: realistic shapes
(Mamba d_inner 1536-5120, LSTM/GRU hidden 256-1024 and the on-chip sizes, bf16/fp16/fp32) on
meta tensors. A variant is a kernel with its constexprs (flags, block sizes, the path). Each
must be launched by one of the small cases below, which run the op through the triton backend
in the interpreter against the reference, forward and backward; and each is one of the cases
rnnkern.aot compiles (ladder step 4)."""
import functools

import pytest
import torch

import rnnkern
from rnnkern import aot
from tests.tolerances import assert_close

pytest.importorskip("triton", reason="triton is not installed: no Triton kernels")

REALISTIC = {launch.variant: name for name, launch in aot.named_launches() if "#" not in name}


def _random(gen, *shape, dtype=torch.float32, low=None, high=None):
    x = torch.rand(shape, generator=gen, dtype=torch.float64) if low is not None else \
        torch.randn(shape, generator=gen, dtype=torch.float64)
    if low is not None:
        x = low + (high - low) * x
    return x.to(dtype)


def _compare(run, inputs: list, dtype, training: bool = True) -> None:
    """run(backend, *inputs) -> tuple of outputs: triton against reference, the outputs and
    (when training) the gradients of every floating input under fixed cotangents."""
    if not training:
        with torch.no_grad():
            results = [run(backend, *inputs) for backend in ("triton", "reference")]
        for index, (actual, expected) in enumerate(zip(*results)):
            assert_close(actual, expected, dtype, f"output {index}")
        return
    results = {}
    for backend in ("triton", "reference"):
        leaves = [x.detach().requires_grad_(x.is_floating_point()) if x is not None else None for x in inputs]
        outputs = run(backend, *leaves)
        gen = torch.Generator().manual_seed(7)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs]
        differentiable = [x for x in leaves if x is not None and x.requires_grad]
        grads = torch.autograd.grad(outputs, differentiable, cotangents, allow_unused=True)
        results[backend] = list(outputs) + [g for g in grads if g is not None]
    for index, (actual, expected) in enumerate(zip(results["triton"], results["reference"])):
        assert_close(actual, expected, dtype, f"output/gradient {index}")


# --- the small cases -----------------------------------------------------------------------


def linear_scan_case(batch, steps, dim, reverse=False, initial=True, sequences=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    a = _random(gen, batch, steps, dim, low=0.5, high=1.0, dtype=dtype)
    b = _random(gen, batch, steps, dim, dtype=dtype)
    cu_seqlens = None
    if sequences:
        cu_seqlens = torch.linspace(0, steps, sequences + 1).round().to(torch.int32)
    h0 = _random(gen, sequences or batch, dim) if initial else None

    def run(backend, a, b, h0):
        return rnnkern.linear_scan(a, b, h0, reverse=reverse, cu_seqlens=cu_seqlens, output_final_state=True,
                                   backend=backend)

    _compare(run, [a, b, h0], dtype)


def recurrence_case(kind, batch, steps, hidden, proj=0, reverse=False, packed=False, bias=True, training=True,
                    dtype=torch.float32, tf32=False):
    """An LSTM/GRU layer (H <= 64: the persistent path, else the alternating one); `tf32` runs it
    with torch's fp32 matmuls allowed TF32 (PRECISION="tf32"; the interpreter multiplies in fp32)."""
    if tf32:
        from rnnkern.ops._triton import with_tf32

        return with_tf32(recurrence_case, kind, batch, steps, hidden, proj, reverse, packed, bias, training, dtype)
    gen = torch.Generator().manual_seed(1)
    gates, features, p = (4 if kind == "lstm" else 3), 8, proj or hidden
    x = _random(gen, batch, steps, features, dtype=dtype)
    w_ih, w_hh = (_random(gen, gates * hidden, n, dtype=dtype) * 0.3 for n in (features, p))
    b_ih, b_hh = (_random(gen, gates * hidden, dtype=dtype) * 0.1 if bias else None for _ in range(2))
    w_hr = _random(gen, proj, hidden, dtype=dtype) * 0.3 if proj else None
    h0 = _random(gen, batch, p, dtype=dtype)
    c0 = _random(gen, batch, hidden, dtype=dtype) if kind == "lstm" else None
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen) if packed else None

    def run(backend, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0):
        if kind == "lstm":
            y, (h, c) = rnnkern.lstm_layer(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr, lengths=lengths,
                                           reverse=reverse, backend=backend)
            return y, h, c
        return rnnkern.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=reverse, backend=backend)

    _compare(run, [x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0], dtype, training)


def selective_scan_case(batch, channels, length, groups=1, mamba=True, training=True, initial=False,
                        dtype=torch.float32, state=16, deterministic=False, lengths=None):
    """`lengths` packs sequences of those lengths along `length` (batch 1, one initial state each)."""
    gen = torch.Generator().manual_seed(2)
    u = _random(gen, batch, channels, length, dtype=dtype)
    low, high = (-3.0, -1.0) if mamba else (0.05, 0.3)  # delta' = softplus(delta) or delta, about 0.05-0.3
    delta = _random(gen, batch, channels, length, low=low, high=high, dtype=dtype)
    A = -_random(gen, channels, state, low=0.5, high=2.0)
    bc = (channels, state) if groups is None else (batch, groups, state, length)
    B, C = _random(gen, *bc, dtype=dtype), _random(gen, *bc, dtype=dtype)
    D = _random(gen, channels) if mamba else None
    z = _random(gen, batch, channels, length, dtype=dtype) if mamba else None
    delta_bias = _random(gen, channels, low=-1.0, high=0.0) if mamba else None
    cu_seqlens = None if lengths is None else torch.tensor([0, *lengths]).cumsum(0)
    h0 = _random(gen, batch if lengths is None else len(lengths), channels, state) if initial else None

    def run(backend, u, delta, A, B, C, D, z, delta_bias, h0):
        out, last = rnnkern.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=mamba,
                                           initial_state=h0, return_last_state=True, cu_seqlens=cu_seqlens,
                                           backend=backend)
        return out, last

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _compare(run, [u, delta, A, B, C, D, z, delta_bias, h0], dtype, training)
    finally:
        torch.use_deterministic_algorithms(previous)


LINEAR_SCAN_CASES = {
    # one chunk (a short sequence), split sequences (a long one on a small grid)
    "linear_scan": functools.partial(linear_scan_case, 2, 100, 40),
    "linear_scan_split": functools.partial(linear_scan_case, 1, 600, 40),
    "linear_scan_split_reverse": functools.partial(linear_scan_case, 1, 600, 40, reverse=True, initial=False),
    "linear_scan_packed_split": functools.partial(linear_scan_case, 1, 600, 40, sequences=3),
    "linear_scan_packed": functools.partial(linear_scan_case, 1, 200, 40, sequences=3, reverse=True),
}

_lstm, _gru = functools.partial(recurrence_case, "lstm"), functools.partial(recurrence_case, "gru")
RECURRENCE_CASES = {
    # persistent (H 40 pads to 64, H 20 to 32; P 24 to 32), training and inference
    "lstm_persistent": functools.partial(_lstm, 2, 3, 40),
    "lstm_persistent_proj": functools.partial(_lstm, 2, 3, 40, proj=24),
    "lstm_persistent_reverse_packed": functools.partial(_lstm, 3, 4, 20, reverse=True, packed=True),
    "lstm_persistent_inference": functools.partial(_lstm, 2, 3, 40, training=False),
    "lstm_persistent_tf32": functools.partial(_lstm, 2, 3, 40, tf32=True),
    # alternating (H 72: three column tiles; B 17: a sequence tile of 32)
    "lstm_alternating": functools.partial(_lstm, 2, 3, 72),
    "lstm_alternating_batch_tile_32": functools.partial(_lstm, 17, 2, 72),
    "lstm_alternating_proj": functools.partial(_lstm, 2, 3, 72, proj=24),
    "lstm_alternating_reverse_packed": functools.partial(_lstm, 3, 4, 72, reverse=True, packed=True),
    "lstm_alternating_inference": functools.partial(_lstm, 2, 3, 72, training=False),
    "lstm_alternating_proj_inference": functools.partial(_lstm, 2, 3, 72, proj=24, training=False),
    "lstm_alternating_proj_tf32": functools.partial(_lstm, 2, 3, 72, proj=24, tf32=True),
    "gru_persistent": functools.partial(_gru, 2, 3, 40),
    "gru_persistent_reverse_packed": functools.partial(_gru, 3, 4, 20, reverse=True, packed=True),
    "gru_persistent_inference": functools.partial(_gru, 2, 3, 40, training=False),
    "gru_persistent_tf32": functools.partial(_gru, 2, 3, 40, tf32=True),
    "gru_alternating": functools.partial(_gru, 2, 3, 72),
    "gru_alternating_batch_tile_32": functools.partial(_gru, 17, 2, 72),
    "gru_alternating_reverse_packed_no_bias": functools.partial(_gru, 3, 4, 72, reverse=True, packed=True,
                                                                bias=False),
    "gru_alternating_inference": functools.partial(_gru, 2, 3, 72, training=False),
    "gru_alternating_tf32": functools.partial(_gru, 2, 3, 72, tf32=True),
}

SELECTIVE_SCAN_CASES = {
    # batch > 1: 4 channels a program, atomics across sequences and channel blocks; batch 1: 2
    # channels a program; two time tiles (BLOCK_T = 64) each
    **{f"selective_scan_{name}": functools.partial(selective_scan_case, 2, 8, 70, dtype=dtype)
       for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16))},
    **{f"selective_scan_batch1_{name}": functools.partial(selective_scan_case, 1, 4, 70, dtype=dtype)
       for name, dtype in (("f32", torch.float32), ("f16", torch.float16))},
    "selective_scan_fixed": functools.partial(selective_scan_case, 2, 8, 70, groups=None, mamba=False),
    "selective_scan_inference": functools.partial(selective_scan_case, 1, 4, 70, training=False, initial=True,
                                                  dtype=torch.bfloat16),
    "selective_scan_deterministic": functools.partial(selective_scan_case, 2, 8, 70, dtype=torch.bfloat16,
                                                      deterministic=True),
    "selective_scan_deterministic_batch1": functools.partial(selective_scan_case, 1, 4, 70, dtype=torch.bfloat16,
                                                             deterministic=True),
    "selective_scan_deterministic_fixed": functools.partial(selective_scan_case, 2, 8, 70, groups=None,
                                                            deterministic=True),
    # packed sequences (batch 1: 2 channels a program), from zeros and from initial states
    **{f"selective_scan_packed{'_initial' if initial else ''}": functools.partial(
        selective_scan_case, 1, 4, 70, dtype=torch.bfloat16, initial=initial, lengths=(5, 0, 64, 1))
       for initial in (False, True)},
}


def state_update_case(heads, dim, state, per_head_A=True, slots=None):
    """One fp32 decode step (multi-head; heads=1 is the single-head form's layout), triton vs
    reference, with D, z, dt_bias and softplus; `slots` draws the rows' states from a pool."""
    gen = torch.Generator().manual_seed(4)
    batch = 2
    pool = _random(gen, slots or batch, heads, dim, state)
    x, dt, z = (_random(gen, batch, heads, dim) for _ in range(3))
    A = (-_random(gen, heads, 1, 1, low=0.5, high=2.0)).expand(heads, dim, state) if per_head_A else \
        -_random(gen, heads, dim, state, low=0.5, high=2.0)
    B, C = _random(gen, batch, 1, state), _random(gen, batch, 1, state)
    D, dt_bias = _random(gen, heads, dim), _random(gen, heads, dim, low=-1.0, high=0.0)
    indices = None if slots is None else torch.tensor([slots - 1, 0])
    results = []
    for backend in ("triton", "reference"):
        states = pool.clone()
        y = rnnkern.selective_state_update(states, x, dt, A, B, C, D, z, dt_bias, True,
                                           state_batch_indices=indices, backend=backend)
        results.append((y, states))
    for index, (actual, expected) in enumerate(zip(*results)):
        assert_close(actual, expected, torch.float32, f"output {index}")


STATE_UPDATE_CASES = {
    "state_update_heads": functools.partial(state_update_case, 2, 8, 128),  # n 128: 8 head positions a program
    "state_update_heads_pool": functools.partial(state_update_case, 2, 8, 128, slots=3),
    "state_update_channels": functools.partial(state_update_case, 1, 64, 16, per_head_A=False),  # A (D, N)
}

def mamba_chunk_scan_case(batch=1, length=70, heads=9, groups=1, dtype=torch.float32, tf32=False, packed=False,
                          deterministic=False, dim=33, state=65, chunk_size=256):
    """The realistic tiles (BLOCK_Q 32, the cumsum's [4, 256], p padded to 64, n to 128) at a
    short length: one chunk of three position blocks; `packed` adds seq_idx, z and initial states."""
    if tf32:
        from rnnkern.ops._triton import with_tf32

        return with_tf32(mamba_chunk_scan_case, batch, length, heads, groups, dtype, False, packed, deterministic)
    gen = torch.Generator().manual_seed(3)
    x = _random(gen, batch, length, heads, dim, dtype=dtype)
    dt = _random(gen, batch, length, heads, low=0.05, high=0.3)
    A = -_random(gen, heads, low=0.5, high=1.5)
    B, C = (_random(gen, batch, length, groups, state, dtype=dtype) * 0.3 for _ in range(2))
    D = _random(gen, heads, dim)
    z = _random(gen, batch, length, heads, dim, dtype=dtype) if packed else None
    h0 = _random(gen, batch, heads, dim, state) if packed else None
    seq_idx = (torch.arange(length) >= length // 2).to(torch.int32)[None].expand(batch, -1) if packed else None

    def run(backend, x, dt, A, B, C, D, z, h0):
        return rnnkern.mamba_chunk_scan(x, dt, A, B, C, chunk_size, D=D, z=z, initial_states=h0, seq_idx=seq_idx,
                                        return_final_states=True, backend=backend)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _compare(run, [x, dt, A, B, C, D, z, h0], dtype)
    finally:
        torch.use_deterministic_algorithms(previous)


MAMBA_CHUNK_SCAN_CASES = {
    # one group: the 9 heads add dB/dC atomically
    **{f"mamba_chunk_scan_{name}": functools.partial(mamba_chunk_scan_case, dtype=dtype)
       for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16))},
    "mamba_chunk_scan_tf32": functools.partial(mamba_chunk_scan_case, tf32=True),
    "mamba_chunk_scan_packed": functools.partial(mamba_chunk_scan_case, dtype=torch.bfloat16, packed=True),
    "mamba_chunk_scan_deterministic": functools.partial(mamba_chunk_scan_case, groups=3, dtype=torch.bfloat16,
                                                        deterministic=True),
}

SMALL_CASES = {**LINEAR_SCAN_CASES, **RECURRENCE_CASES, **SELECTIVE_SCAN_CASES, **STATE_UPDATE_CASES,
               **MAMBA_CHUNK_SCAN_CASES}


# --- the check -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted_variants() -> dict:
    """variant -> the small case that launched it, from running every small case."""
    launched = {}
    for name, case in SMALL_CASES.items():
        with aot.recording(run=True) as launches:
            case()
        for launch in launches:
            launched.setdefault(launch.variant, name)
    return launched


@pytest.mark.slow  # runs every small case in the interpreter: a few minutes
@pytest.mark.parametrize("variant", list(REALISTIC), ids=list(REALISTIC.values()))
def test_realistic_variant_runs_in_the_interpreter(interpreted_variants, variant):
    """(tests/test_aot.py compiles the same variants, by the same names.)"""
    launched = [dict(constexprs) for kernel, constexprs in interpreted_variants if kernel == variant[0]]
    assert variant in interpreted_variants, (
        f"{REALISTIC[variant]}: no small case launches it; the small cases launch {variant[0]} with {launched}")
