"""selective_scan and selective_state_update: every backend against the reference, the
reference against an explicit fp64 loop."""
import pytest
import torch

import rnnkern
from rnnkern import _backends
from rnnkern.ops import selective_scan as ops
from rnnkern.ops.selective_scan import SELECTIVE_SCAN, SELECTIVE_STATE_UPDATE
from tests.conftest import backend_params, ran_op
from tests.tolerances import assert_close

BACKENDS = backend_params(SELECTIVE_SCAN)
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
OPTIONS = ("D", "z", "bias", "softplus")  # D, z, delta_bias given; delta_softplus=True
# (batch, channels, length, state size, B/C layout, options): odd L, L = 1, L over several
# chunks (CHUNK = 64), channels not a power of two, N in {1, 4, 16}
CASES = [
    (2, 5, 1, 4, "shared", ()),
    (2, 7, 33, 1, "shared", ("D", "z")),
    (3, 4, 17, 4, "grouped2", ("z",)),
    (1, 3, 67, 4, "fixed", ("D", "z", "bias", "softplus")),
    (1, 6, 130, 16, "grouped3", ("D", "z", "bias", "softplus")),
    (2, 5, 65, 4, "fixed", ("bias", "softplus")),
    (1, 3, 64, 16, "shared", ("D", "bias")),
    (2, 6, 129, 4, "shared", ("D", "z", "bias", "softplus")),
]
# The Triton interpreter is slow: it runs only these (still L = 1, grouped, fixed, 2 chunks).
INTERPRETED = CASES[:4]


def case_id(case) -> str:
    batch, dims, length, n, layout, options = case
    return "-".join([f"B{batch}-D{dims}-L{length}-N{n}-{layout}", *options])


def dtype_id(dtype) -> str:
    return DTYPE_IDS[dtype]


def with_cases(cases, interpreted=INTERPRETED, backends=BACKENDS) -> list:
    """(device, backend, case) params: every backend with `cases`, the interpreter with fewer."""
    params = []
    for backend_param in backends:
        device, backend = backend_param.values
        slow = backend == "triton" and device == "cpu"
        for case in cases:
            if slow and case not in interpreted:
                continue
            params.append(pytest.param(device, backend, case, id=f"{backend_param.id}-{case_id(case)}",
                                       marks=backend_param.marks))
    return params


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton backend: float64 is not supported")


def make_inputs(case, dtype, device, seed=0, bc_dtype=None) -> dict:
    """Keyword arguments of selective_scan for `case`: a stable recurrence (A < 0, delta > 0)."""
    batch, dims, length, n, layout, options = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(shape, generator=gen, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    softplus = "softplus" in options
    delta = randn(batch, dims, length) * 0.5 - 1.0 if softplus else 0.05 + 0.5 * rand(batch, dims, length)
    if layout == "fixed":
        bc_shape = (dims, n)
    elif layout == "shared":
        bc_shape = (batch, n, length)
    else:
        bc_shape = (batch, int(layout.removeprefix("grouped")), n, length)
    state = ops.state_dtype(dtype)
    inputs = dict(
        u=randn(batch, dims, length).to(device, dtype),
        delta=delta.to(device, dtype),
        A=(-0.5 - 1.5 * rand(dims, n)).to(device, state),
        B=randn(*bc_shape).to(device, bc_dtype or dtype),
        C=randn(*bc_shape).to(device, bc_dtype or dtype),
        initial_state=randn(batch, dims, n).to(device, state),
        delta_softplus=softplus,
    )
    if "D" in options:
        inputs["D"] = randn(dims).to(device, state)
    if "z" in options:
        inputs["z"] = randn(batch, dims, length).to(device, dtype)
    if "bias" in options:
        inputs["delta_bias"] = (randn(dims) * 0.5 if softplus else 0.1 * rand(dims)).to(device, state)
    return inputs


TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def outputs_and_grads(scan, inputs: dict, seed=123) -> dict:
    """out, last_state and the gradient of every tensor input under fixed random cotangents.

    `scan` is called with the keyword arguments of selective_scan and returns (out, last_state).
    """
    leaves = {k: v.detach().requires_grad_() if k in TENSOR_ARGS else v for k, v in inputs.items()}
    out, last = scan(**leaves)
    gen = torch.Generator().manual_seed(seed)
    # cotangents rounded to the input's dtype (and fp32), so every run differentiates the same values
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(inputs["u"].dtype)
    d_last = torch.randn(last.shape, generator=gen, dtype=torch.float64).float()
    d_out, d_last = d_out.to(out.device, out.dtype), d_last.to(last.device, last.dtype)
    names = [k for k in TENSOR_ARGS if k in leaves]
    grads = torch.autograd.grad((out, last), [leaves[k] for k in names], (d_out, d_last))
    return {"out": out, "last_state": last, **{f"grad_{k}": g for k, g in zip(names, grads)}}


def run(backend, inputs: dict) -> dict:
    def scan(**kwargs):
        return rnnkern.selective_scan(**kwargs, return_last_state=True, backend=backend)

    return outputs_and_grads(scan, inputs)


def assert_all_close(actual: dict, expected: dict, dtype, check_dtypes=True) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        if check_dtypes:
            assert actual[name].dtype == expected[name].dtype, name
        assert_close(actual[name], expected[name], dtype, name)


def fp64_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """The recurrence written out step by step in fp64, differentiable by autograd."""
    batch, dims, length = u.shape
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))

    def per_channel(M, t):  # B or C as seen by every channel at step t: (batch, dims, N)
        M = M.double()
        if M.dim() == 2:  # fixed (dims, N)
            return M.expand(batch, dims, M.shape[1])
        if M.dim() == 3:  # (batch, N, L): one group
            M = M[:, None]
        group = torch.arange(dims) // (dims // M.shape[1])
        return M[:, group, :, t]

    x = torch.zeros(batch, dims, A.shape[1], dtype=torch.float64) if initial_state is None else initial_state.double()
    ys = []
    for t in range(length):
        x = torch.exp(delta[:, :, t, None] * A) * x + delta[:, :, t, None] * per_channel(B, t) * u[:, :, t, None]
        y = (per_channel(C, t) * x).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, :, t]
        if z is not None:
            y = y * z[:, :, t].double() * torch.sigmoid(z[:, :, t].double())
        ys.append(y)
    return torch.stack(ys, dim=2), x


# --- reference against the fp64 loop ---------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_fp64_loop(case):
    inputs = make_inputs(case, torch.float64, "cpu")
    assert_all_close(run("reference", inputs), outputs_and_grads(fp64_loop, inputs), torch.float64)


# --- every backend against the reference -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("device,backend,case", with_cases(CASES))
def test_matches_reference(device, backend, case, dtype):
    skip_unsupported(backend, dtype)
    inputs = make_inputs(case, dtype, device)
    assert_all_close(run(backend, inputs), run("reference", inputs), dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_float32_B_and_C_with_bf16_inputs(device, backend):
    """Mamba's usual mix: bf16 activations, fp32 A, D, delta_bias and (here) fp32 B and C."""
    inputs = make_inputs((2, 6, 40, 4, "grouped2", OPTIONS), torch.bfloat16, device, bc_dtype=torch.float32)
    result = run(backend, inputs)
    assert result["grad_B"].dtype == result["grad_C"].dtype == result["grad_A"].dtype == torch.float32
    assert result["grad_u"].dtype == result["out"].dtype == torch.bfloat16
    assert_all_close(result, run("reference", inputs), torch.bfloat16)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_without_initial_state_starts_from_zero(device, backend):
    inputs = make_inputs((2, 5, 21, 4, "shared", ("D", "z")), torch.float32, device)
    zeros = dict(inputs, initial_state=torch.zeros_like(inputs["initial_state"]))
    expected = run(backend, zeros)
    del expected["grad_initial_state"]
    del inputs["initial_state"]
    assert_all_close(run(backend, inputs), expected, torch.float32)
    assert_all_close(run(backend, inputs), run("reference", inputs), torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_returns_like_mamba_ssm(device, backend):
    """out alone by default; (out, last_state) with return_last_state; last_state in fp32."""
    inputs = make_inputs((2, 5, 9, 4, "shared", ("D", "z")), torch.bfloat16, device)
    out = rnnkern.selective_scan(**inputs, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 9) and out.dtype == torch.bfloat16
    out2, last = rnnkern.selective_scan(**inputs, return_last_state=True, backend=backend)
    assert torch.equal(out, out2) and last.shape == (2, 5, 4) and last.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("device,backend,case", with_cases([CASES[4], CASES[3]], interpreted=[CASES[3]]))
def test_kernel_checkpoints_are_the_states_before_each_chunk(device, backend, case, training):
    inputs = make_inputs(case, torch.float32, device)
    forward = SELECTIVE_SCAN.function(backend, "selective_scan_fwd")
    args = [inputs.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args[3:5] = [ops._variable(args[3]), ops._variable(args[4])]
    out, last, checkpoints = forward(*args, inputs["delta_softplus"], inputs["initial_state"], None, training)
    ref_out, ref_last, ref_checkpoints = ops.reference.selective_scan_fwd(
        *args, inputs["delta_softplus"], inputs["initial_state"], None, True)
    length = inputs["u"].shape[2]
    assert ref_checkpoints.shape == (*inputs["initial_state"].shape[:2], -(-length // ops.CHUNK),
                                     inputs["A"].shape[1])
    assert torch.equal(ref_checkpoints[:, :, 0], inputs["initial_state"])
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(last, ref_last, torch.float32, "last_state")
    if training:
        assert_close(checkpoints, ref_checkpoints, torch.float32, "checkpoints")
    else:
        assert checkpoints.shape == (0,)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs(device, backend):
    inputs = make_inputs((2, 5, 19, 4, "grouped5", ("D", "z", "bias")), torch.float32, device)
    strided = dict(inputs)
    strided["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["B"] = torch.stack([inputs["B"], inputs["B"]], dim=-1)[..., 0]  # time stride 2
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    assert_all_close(run(backend, strided), run(backend, inputs), torch.float32)


# --- the path of real Mamba shapes: whole channel blocks, several time tiles -----------

# D a multiple of the channel block (4 a program at batch > 1, 2 at batch 1) with several blocks
# per group, N = 16, L over two or three 64-step tiles: G = 1, G = 2, fixed B/C, batch 1
ALIGNED_CASES = [
    (2, 12, 130, 16, "shared", OPTIONS),
    (2, 16, 70, 16, "grouped2", OPTIONS),
    (2, 8, 130, 16, "fixed", OPTIONS),
    (1, 8, 130, 16, "grouped2", OPTIONS),
]
ALIGNED_PARAMS = [pytest.param(*p.values, torch.float32, id=f"{p.id}-f32", marks=p.marks)
                  for p in with_cases(ALIGNED_CASES, interpreted=ALIGNED_CASES)] + \
                 [pytest.param(*p.values, torch.bfloat16, id=f"{p.id}-bf16", marks=p.marks)
                  for p in with_cases(ALIGNED_CASES[3:], interpreted=ALIGNED_CASES)]


def triton_launches(run_scan) -> dict:
    """kernel name -> the launch run_scan() made of it (with the triton backend)."""
    from rnnkern import aot

    with aot.recording(run=True) as launches:
        run_scan()
    return {launch.kernel_name: launch for launch in launches}


@pytest.mark.parametrize("device,backend,case,dtype", ALIGNED_PARAMS)
def test_aligned_channel_blocks_over_several_time_tiles(device, backend, case, dtype):
    inputs = make_inputs(case, dtype, device)
    if backend != "triton":
        assert_all_close(run(backend, inputs), run("reference", inputs), dtype)
        return
    launches = triton_launches(lambda: assert_all_close(run(backend, inputs), run("reference", inputs), dtype))
    batch, dims, length = inputs["u"].shape
    for launch in launches.values():
        block_d = launch.arguments["BLOCK_D"]
        assert launch.grid == (batch, dims // block_d) and dims % block_d == 0 and launch.grid[1] >= 2
        assert length > launch.arguments["BLOCK_T"]
    groups = inputs["B"].shape[1] if inputs["B"].dim() == 4 else None
    if groups is not None:  # several channel blocks per group: their dB, dC partial sums are added
        assert launches["_selective_scan_bwd_kernel"].arguments["ATOMIC_BC"]


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("layout", ["shared", "fixed"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible(device, backend, layout, deterministic_algorithms):
    """Under torch.use_deterministic_algorithms(True) two backward passes give the same bits:
    the triton backward stores per-program partial sums (no atomics) that one sum reduces; here
    two sequences share dA, dD, d(delta_bias) (and fixed dB, dC) and two channel blocks a group's
    variable dB, dC."""
    inputs = make_inputs((2, 8, 70, 4, layout, OPTIONS), torch.float32, device)
    results = []
    launches = triton_launches(lambda: results.append(run(backend, inputs))) if backend == "triton" else {}
    if backend == "triton":
        flags = launches["_selective_scan_bwd_kernel"].arguments
        assert not flags["ATOMIC_PARAMS"] and not flags["ATOMIC_BC"]
    else:
        results.append(run(backend, inputs))
    first, second = results[0], run(backend, inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert_all_close(first, run("reference", inputs), torch.float32)


def test_deterministic_mode_is_restored_by_the_fixture():
    assert not torch.are_deterministic_algorithms_enabled()


TRITON_BACKENDS = [p for p in BACKENDS if p.values[1] == "triton"]


@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
def test_triton_row_offsets_past_2_31(device, backend):
    """u and grad_out are (2, 4, L) views of one 4 GiB buffer whose second sequence starts
    2**31 + 1024 elements in: row offsets computed in 32 bits would wrap. Only the views' few
    pages are touched. (The public function makes inputs contiguous, so this calls the kernels'
    launchers, which take any (batch, channel) strides.)"""
    inputs = make_inputs((2, 4, 70, 4, "shared", OPTIONS), torch.bfloat16, device)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    B, C = ops._variable(B), ops._variable(C)
    stride = 2**31 + 1024
    storage = torch.empty(stride + 2 * u[0].numel(), dtype=u.dtype, device=device)
    u_far = storage.as_strided(u.shape, (stride, u.shape[2], 1))
    grad_out = torch.randn(u.shape, generator=torch.Generator().manual_seed(5)).to(device, u.dtype)
    grad_out_far = storage.as_strided(u.shape, (stride, u.shape[2], 1), storage_offset=u[0].numel())
    u_far.copy_(u)
    grad_out_far.copy_(grad_out)
    assert u_far.stride(0) * (u.shape[0] - 1) >= 2**31
    grad_last = torch.randn(inputs["initial_state"].shape).to(device)
    h0 = inputs["initial_state"]
    results = {}
    for name, (u_, grad_out_) in (("triton", (u_far, grad_out_far)), ("reference", (u, grad_out))):
        forward = SELECTIVE_SCAN.function(name, "selective_scan_fwd")
        backward = SELECTIVE_SCAN.function(name, "selective_scan_bwd")
        out, last, checkpoints = forward(u_, delta, A, B, C, D, z, bias, True, h0, None, True)
        grads = backward(u_, delta, A, B, C, D, z, bias, True, h0, None, checkpoints, grad_out_, grad_last)
        results[name] = (out, last, *grads)
    for index, (actual, expected) in enumerate(zip(*results.values())):
        assert_close(actual, expected, torch.bfloat16, f"result {index}")


# --- numerics ------------------------------------------------------------------------


BF16_CASES = [CASES[4], CASES[7], (1, 3, 67, 4, "grouped3", OPTIONS)]


@pytest.mark.parametrize("device,backend,case", with_cases(BF16_CASES, interpreted=BF16_CASES[2:]))
def test_bf16_against_fp64(device, backend, case):
    """bf16 inputs, fp32 state: outputs and gradients within bf16 rounding of the exact values."""
    inputs = make_inputs(case, torch.bfloat16, device)
    expected = outputs_and_grads(fp64_loop, {k: v.cpu() if k in TENSOR_ARGS else v for k, v in inputs.items()})
    actual = {k: v.cpu() for k, v in run(backend, inputs).items()}
    assert_all_close(actual, expected, torch.bfloat16, check_dtypes=False)


GRADCHECK_BACKENDS = [p for p in BACKENDS if p.values in (("cpu", "reference"), ("cpu", "cpu"))]


@pytest.mark.parametrize("layout", ["shared", "grouped2", "fixed"])
@pytest.mark.parametrize("device,backend", GRADCHECK_BACKENDS)
def test_gradcheck_fp64(device, backend, layout):
    short = make_inputs((2, 4, 5, 3, layout, OPTIONS), torch.float64, device)
    long = make_inputs((1, 2, 67, 2, layout, OPTIONS), torch.float64, device)  # crosses a chunk boundary
    for inputs, fast in ((short, False), (long, True)):
        names = [k for k in TENSOR_ARGS if k in inputs]

        def scan(*tensors):
            kwargs = dict(zip(names, tensors), delta_softplus=True)
            return rnnkern.selective_scan(**kwargs, return_last_state=True, backend=backend)

        assert torch.autograd.gradcheck(scan, [inputs[k].requires_grad_() for k in names], fast_mode=fast)


# --- packed sequences ------------------------------------------------------------------

# lengths crossing the 64-step checkpoint chunk, an empty sequence, a sequence of one step
PACKED_LENGTHS = [1, 5, 64, 0, 70]
# (B/C layout, per-sequence initial states); the interpreter runs the first two
PACKED_CASES = [("grouped2", True), ("fixed", False), ("shared", False), ("fixed", True)]
PACKED_PARAMS = [
    pytest.param(*p.values, layout, initial, id=f"{p.id}-{layout}-{'initial' if initial else 'zeros'}", marks=p.marks)
    for p in BACKENDS for layout, initial in PACKED_CASES
    if p.values != ("cpu", "triton") or (layout, initial) in PACKED_CASES[:2]
]


def cumulative(lengths, device, dtype=torch.int64) -> torch.Tensor:
    """cu_seqlens of sequences of `lengths`: [0, l0, l0 + l1, ...]."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=device)


def packed_inputs(lengths, layout, dtype, device, initial=True, seed=0) -> dict:
    """selective_scan's keyword arguments for sequences of `lengths` packed in one row, each with
    its own initial state (or none)."""
    inputs = make_inputs((1, 4, sum(lengths), 4, layout, OPTIONS), dtype, device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    state = torch.randn((len(lengths), 4, 4), generator=gen, dtype=torch.float64)
    inputs["initial_state"] = state.to(device, ops.state_dtype(dtype))
    if not initial:
        del inputs["initial_state"]
    return dict(inputs, cu_seqlens=cumulative(lengths, device))


def separately(backend):
    """selective_scan over packed sequences, as one call per sequence (joined outputs, stacked
    last states): the ground truth of cu_seqlens."""
    def scan(u, delta, A, B, C, cu_seqlens, initial_state=None, **kwargs):
        outs, lasts = [], []
        bounds = cu_seqlens.tolist()
        for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
            h0 = None if initial_state is None else initial_state[i : i + 1]
            if start == end:  # nothing to run: the last state is the initial state
                lasts.append(u.new_zeros((1, *A.shape), dtype=ops.state_dtype(u.dtype)) if h0 is None else h0)
                continue
            time = [x[..., start:end] if x.dim() >= 3 else x for x in (u, delta, B, C)]
            z = kwargs.get("z")
            out, last = rnnkern.selective_scan(
                time[0], time[1], A, time[2], time[3], **dict(kwargs, z=None if z is None else z[..., start:end]),
                initial_state=h0, return_last_state=True, backend=backend)
            outs.append(out)
            lasts.append(last)
        return torch.cat(outs, dim=2), torch.cat(lasts)

    return scan


@pytest.mark.parametrize("device,backend,layout,initial", PACKED_PARAMS)
def test_packed_sequences_equal_separate_runs(device, backend, layout, initial):
    """Outputs, every sequence's last state and the gradients of every input equal those of one
    run per sequence (an empty one ends in its initial state, which gets d(last_state))."""
    inputs = packed_inputs(PACKED_LENGTHS, layout, torch.float32, device, initial)
    packed = run(backend, inputs)
    assert packed["last_state"].shape == (len(PACKED_LENGTHS), 4, 4)
    assert_all_close(packed, outputs_and_grads(separately("reference"), inputs), torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_packed_sequences_in_bf16(device, backend):
    inputs = packed_inputs([3, 61, 9], "shared", torch.bfloat16, device)
    assert_all_close(run(backend, inputs), outputs_and_grads(separately("reference"), inputs), torch.bfloat16)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_packed_checkpoints_are_the_stream_states_before_each_chunk(device, backend):
    """The packed row's state before steps 0, 64, 128 (zeros before step 0); a sequence starts at
    step 64 and restarts from its own initial state there."""
    inputs = packed_inputs([6, 58, 0, 70], "shared", torch.float32, device)
    args = [inputs.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args[3:5] = [ops._variable(args[3]), ops._variable(args[4])]
    rest = (inputs["delta_softplus"], inputs["initial_state"], inputs["cu_seqlens"], True)
    _, _, checkpoints = SELECTIVE_SCAN.function(backend, "selective_scan_fwd")(*args, *rest)
    _, ref_last, ref_checkpoints = ops.reference.selective_scan_fwd(*args, *rest)
    assert torch.equal(ref_checkpoints[:, :, 0], torch.zeros_like(ref_checkpoints[:, :, 0]))
    assert_close(ref_checkpoints[0, :, 1], ref_last[1], torch.float32, "state before step 64: the end of sequence 1")
    assert_close(checkpoints, ref_checkpoints, torch.float32, "checkpoints")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_packed_without_grad_and_last_state(device, backend, index_dtype):
    inputs = packed_inputs([2, 9], "grouped2", torch.float32, device)
    inputs["cu_seqlens"] = inputs["cu_seqlens"].to(index_dtype)
    out = rnnkern.selective_scan(**inputs, backend=backend)
    expected, _ = separately("reference")(**inputs)
    assert_close(out, expected, torch.float32, "out")


@pytest.mark.parametrize("device,backend", GRADCHECK_BACKENDS)
def test_gradcheck_fp64_packed(device, backend):
    short = packed_inputs([2, 0, 3], "grouped2", torch.float64, device)
    long = packed_inputs([60, 7], "fixed", torch.float64, device)  # a chunk boundary inside a sequence
    for inputs, fast in ((short, False), (long, True)):
        names = [k for k in TENSOR_ARGS if k in inputs]

        def scan(*tensors):
            kwargs = dict(zip(names, tensors), delta_softplus=True, cu_seqlens=inputs["cu_seqlens"])
            return rnnkern.selective_scan(**kwargs, return_last_state=True, backend=backend)

        assert torch.autograd.gradcheck(scan, [inputs[k].requires_grad_() for k in names], fast_mode=fast)


# --- one decoding step -----------------------------------------------------------------


UPDATE_CASES = [(2, 6, 9, 4, "grouped3", OPTIONS), (1, 5, 4, 16, "shared", ("D", "z")), (2, 5, 3, 1, "shared", ())]


def update_step(state, inputs, t, backend):
    """selective_state_update on column t of the scan's inputs."""
    z = inputs.get("z")
    return rnnkern.selective_state_update(
        state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t], inputs["C"][..., t],
        D=inputs.get("D"), z=None if z is None else z[..., t], dt_bias=inputs.get("delta_bias"),
        dt_softplus=inputs["delta_softplus"], backend=backend,
    )


UPDATE_CASES_BY_DTYPE = [
    pytest.param(*p.values, dtype, id=f"{p.id}-{dtype_id(dtype)}", marks=p.marks)
    for dtype in (torch.float32, torch.bfloat16)
    for p in with_cases(UPDATE_CASES, backends=backend_params(SELECTIVE_STATE_UPDATE, dtype))
]


@pytest.mark.parametrize("device,backend,case,dtype", UPDATE_CASES_BY_DTYPE)
def test_state_update_steps_equal_the_scan(device, backend, case, dtype):
    inputs = make_inputs(case, dtype, device)
    out, last = rnnkern.selective_scan(**inputs, return_last_state=True, backend=backend)
    state = inputs["initial_state"].clone()
    storage = state.data_ptr()
    for t in range(inputs["u"].shape[2]):
        y = update_step(state, inputs, t, backend)
        assert y.dtype == dtype
        assert_close(y, out[..., t], dtype, f"y at step {t}")
    assert state.data_ptr() == storage and state.dtype == torch.float32
    assert_close(state, last, torch.float32, "state after the last step")


@pytest.mark.parametrize("device,backend", backend_params(SELECTIVE_STATE_UPDATE, torch.bfloat16))
def test_state_update_keeps_a_state_in_the_input_dtype(device, backend):
    inputs = make_inputs(UPDATE_CASES[0], torch.bfloat16, device)
    low = inputs["initial_state"].bfloat16()
    high = low.float()  # the same values in fp32
    y_low, y_high = update_step(low, inputs, 0, backend), update_step(high, inputs, 0, backend)
    assert low.dtype == torch.bfloat16
    assert_close(y_low, y_high, torch.bfloat16, "y")
    assert torch.equal(low, high.bfloat16())


def test_forcing_the_cpu_backend_on_a_dtype_its_update_kernel_lacks_is_an_error():
    inputs = make_inputs(UPDATE_CASES[0], torch.bfloat16, "cpu")
    with pytest.raises(rnnkern.BackendError, match=r"backend 'cpu' cannot run this input: torch.bfloat16 is not "
                                                   r"supported by its selective_state_update kernel"):
        update_step(inputs["initial_state"].clone(), inputs, 0, "cpu")


@pytest.mark.parametrize("device,backend", backend_params(SELECTIVE_STATE_UPDATE))
def test_state_update_opcheck(device, backend):
    inputs = make_inputs((2, 6, 1, 4, "grouped3", OPTIONS), torch.float32, device)
    state = inputs["initial_state"].clone()
    args = (state, inputs["u"][..., 0], inputs["delta"][..., 0], inputs["A"], inputs["B"][..., 0],
            inputs["C"][..., 0], inputs["D"], inputs["z"][..., 0], inputs["delta_bias"], True, backend)
    torch.library.opcheck(torch.ops.rnnkern.selective_state_update.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_state_update_runs_the_cpu_kernel_for_fp32_and_fp64(dtype):
    if SELECTIVE_STATE_UPDATE.refusal("cpu", torch.device("cpu"), torch.float32):
        pytest.fail("rnnkern._C lacks selective_state_update: rebuild the extension")
    inputs = make_inputs(UPDATE_CASES[0], dtype, "cpu")
    ran = ran_op("rnnkern_C::selective_state_update",
                 lambda: update_step(inputs["initial_state"].clone(), inputs, 0, None))
    assert ran == (dtype != torch.bfloat16)


def test_state_update_compiles_fullgraph():
    inputs = make_inputs((2, 6, 1, 4, "shared", OPTIONS), torch.float32, "cpu")
    args = (inputs["u"][..., 0], inputs["delta"][..., 0], inputs["A"], inputs["B"][..., 0], inputs["C"][..., 0],
            inputs["D"], inputs["z"][..., 0], inputs["delta_bias"], True)

    def step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
        return rnnkern.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus).sin()

    eager_state, compiled_state = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    expected = step(eager_state, *args)
    actual = torch.compile(step, fullgraph=True)(compiled_state, *args)
    assert_close(actual, expected, torch.float32, "y")
    assert_close(compiled_state, eager_state, torch.float32, "state")


# --- torch integration -----------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    inputs = make_inputs((2, 6, 17, 4, "grouped3", OPTIONS), torch.float32, device)
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    D, z, bias, h0 = inputs["D"], inputs["z"], inputs["delta_bias"], inputs["initial_state"]
    scan = torch.ops.rnnkern.selective_scan.default
    torch.library.opcheck(scan, (u, delta, A, B, C, D, z, bias, True, h0, None, True, backend))
    fixed_B = torch.randn(6, 4, device=device)
    torch.library.opcheck(scan, (u, delta, A, fixed_B, C, None, None, None, False, None, None, True, backend))
    torch.library.opcheck(scan, (u, delta, A, B, C, D, z, bias, True, h0, None, False, backend),
                          test_utils=("test_schema", "test_faketensor"))
    _, _, checkpoints = scan(u, delta, A, B, C, D, z, bias, True, h0, None, True, backend)
    torch.library.opcheck(
        torch.ops.rnnkern.selective_scan_bwd.default,
        (u, delta, A, B, C, D, z, bias, True, h0, None, checkpoints, torch.ones_like(u), torch.ones_like(h0),
         backend),
    )


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_packed(device, backend):
    inputs = make_inputs((1, 6, 17, 4, "grouped3", OPTIONS), torch.float32, device)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    cu_seqlens = torch.tensor([0, 4, 4, 17], device=device)
    h0 = torch.randn(3, 6, 4, device=device)
    scan = torch.ops.rnnkern.selective_scan.default
    torch.library.opcheck(scan, (u, delta, A, B, C, D, z, bias, True, h0, cu_seqlens, True, backend))
    torch.library.opcheck(scan, (u, delta, A, B, C, None, None, None, False, None, cu_seqlens, True, backend))
    _, _, checkpoints = scan(u, delta, A, B, C, D, z, bias, True, h0, cu_seqlens, True, backend)
    torch.library.opcheck(
        torch.ops.rnnkern.selective_scan_bwd.default,
        (u, delta, A, B, C, D, z, bias, True, h0, cu_seqlens, checkpoints, torch.ones_like(u), torch.ones_like(h0),
         backend),
    )


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph_forward_and_backward(device, backend):
    inputs = make_inputs((2, 6, 21, 4, "shared", OPTIONS), torch.float32, device)
    names = [k for k in TENSOR_ARGS if k in inputs]

    def loss(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = rnnkern.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state,
                                           backend=backend)
        return out.sin().sum() + last.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_leaves = [inputs[k].clone().requires_grad_() for k in names]
    compiled_leaves = [inputs[k].clone().requires_grad_() for k in names]
    loss(*eager_leaves).backward()
    compiled(*compiled_leaves).backward()
    for name, eager, traced in zip(names, eager_leaves, compiled_leaves):
        assert_close(traced.grad, eager.grad, torch.float32, f"gradient of {name}")


def test_compile_fullgraph_with_inductor():
    inputs = make_inputs((2, 6, 21, 4, "grouped2", OPTIONS), torch.float32, "cpu")

    def block(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        return rnnkern.selective_scan(u.sin(), delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      initial_state=initial_state).cos()

    assert_close(torch.compile(block, fullgraph=True)(**inputs), block(**inputs), torch.float32, "out")


# --- backend selection ----------------------------------------------------------------


def test_cpu_backend_without_its_compiled_kernel_is_refused_with_a_reason():
    """What happens when rnnkern._C was built before an op existed."""
    missing = _backends.Op("selective_scan", functions=("selective_scan_missing_fwd",),
                           kernels={"reference": "rnnkern.ops.selective_scan.reference", "cpu": _backends.COMPILED})
    cpu = torch.device("cpu")
    assert "has no selective_scan_missing_fwd op" in missing.refusal("cpu", cpu, torch.float32)
    assert _backends.select(missing, cpu, torch.float32) == "reference"
    with pytest.raises(rnnkern.BackendError, match="backend 'cpu' cannot run this input: .*selective_scan_missing"):
        _backends.select(missing, cpu, torch.float32, "cpu")


def test_default_backend_has_the_kernel():
    assert _backends.unavailable_reason("cpu") is None
    assert _backends.select(SELECTIVE_SCAN, torch.device("cpu"), torch.float32) == "cpu"


# --- bad input ------------------------------------------------------------------------

U = torch.randn(2, 5, 7)
SCAN = dict(u=U, delta=torch.rand(2, 5, 7), A=-torch.rand(5, 3), B=torch.randn(2, 3, 7), C=torch.randn(2, 3, 7))
PACKED = {name: SCAN[name][:1] for name in ("u", "delta", "B", "C")}  # batch 1, for cu_seqlens
BAD_SCAN_INPUTS = {
    "u-not-a-tensor": (dict(u=[[1.0]]), TypeError, r"u must be a torch\.Tensor of shape \(B, D, L\), got list"),
    "u-2d": (dict(u=U[0]), ValueError, r"u must have shape \(B, D, L\), got shape \(5, 7\)"),
    "int-dtype": (dict(u=U.long(), delta=U.long()), TypeError, r"u must be float16, bfloat16, float32 or float64, got torch\.int64"),
    "no-steps": (dict(u=U[..., :0], delta=U[..., :0]), ValueError, r"at least one time step \(L >= 1\)"),
    "delta-length": (dict(delta=U[..., :6]), ValueError, r"delta must have the shape of u \(2, 5, 7\), got \(2, 5, 6\)"),
    "delta-dtype": (dict(delta=U.double()), TypeError, r"delta must have the dtype of u \(torch\.float32\), got torch\.float64"),
    "delta-device": (dict(delta=U.to("meta")), ValueError, r"delta must be on the device of u \(cpu\), got meta"),
    "A-rows": (dict(A=-torch.rand(4, 3)), ValueError, r"A must have shape \(D, N\) with D=5 .*got \(4, 3\)"),
    "A-1d": (dict(A=-torch.rand(5)), ValueError, r"A must have shape \(D, N\), got shape \(5,\)"),
    "A-complex": (dict(A=torch.randn(5, 3, dtype=torch.complex64)), TypeError, r"A must be real .*complex A \(torch\.complex64\) is not supported"),
    "A-device": (dict(A=-torch.rand(5, 3, device="meta")), ValueError, r"A must be on the input's device \(cpu\), got meta"),
    "B-length": (dict(B=torch.randn(2, 3, 6)), ValueError, r"B must have shape \(2, 3, 7\) \(B, N, L\), \(2, G, 3, 7\) \(B, G, N, L\) or \(5, 3\) \(D, N\), got \(2, 3, 6\)"),
    "B-state-size": (dict(B=torch.randn(2, 4, 7)), ValueError, r"B must have shape \(2, 3, 7\) .*got \(2, 4, 7\)"),
    "C-batch": (dict(C=torch.randn(1, 3, 7)), ValueError, r"C must have shape \(2, 3, 7\) .*got \(1, 3, 7\)"),
    "C-fixed-rows": (dict(C=torch.randn(4, 3)), ValueError, r"C must have shape .* or \(5, 3\) \(D, N\), got \(4, 3\)"),
    "B-groups-not-dividing": (dict(B=torch.randn(2, 2, 3, 7)), ValueError, r"B has G=2 groups, which must divide D=5"),
    "B-C-groups-differ": (dict(B=torch.randn(2, 5, 3, 7)), ValueError, r"B and C must have the same number of groups, got B \(2, 5, 3, 7\) and C \(2, 3, 7\)"),
    "B-dtype": (dict(B=torch.randn(2, 3, 7, dtype=torch.float16)), TypeError, r"B must be torch\.float32, got torch\.float16"),
    "C-dtype-bf16-input": (dict(u=U.bfloat16(), delta=U.bfloat16(), C=torch.randn(2, 3, 7, dtype=torch.float16)), TypeError, r"C must be torch\.bfloat16 or torch\.float32, got torch\.float16"),
    "B-device": (dict(B=torch.randn(2, 3, 7, device="meta")), ValueError, r"B must be on the input's device \(cpu\), got meta"),
    "D-shape": (dict(D=torch.randn(4)), ValueError, r"D must have shape \(5,\) \(one value per channel\), got \(4,\)"),
    "delta-bias-2d": (dict(delta_bias=torch.randn(5, 1)), ValueError, r"delta_bias must have shape \(5,\), got shape \(5, 1\)"),
    "z-shape": (dict(z=U[:1]), ValueError, r"z must have the shape of u \(2, 5, 7\), got \(1, 5, 7\)"),
    "initial-state-shape": (dict(initial_state=torch.zeros(2, 5, 4)), ValueError, r"initial_state must have shape \(2, 5, 3\), got \(2, 5, 4\)"),
    "initial-state-dtype": (dict(initial_state=torch.zeros(2, 5, 3, dtype=torch.float64)), TypeError, r"initial_state must be torch\.float32, got torch\.float64"),
    "softplus-not-bool": (dict(delta_softplus=1), TypeError, r"delta_softplus must be a bool, got int"),
    "unknown-backend": (dict(backend="cudnn"), ValueError, r"unknown backend 'cudnn'; expected one of"),
    "cu-seqlens-batch": (dict(cu_seqlens=torch.tensor([0, 7])), ValueError, r"with cu_seqlens the batch size must be 1 .*got 2"),
    "cu-seqlens-dtype": (dict(PACKED, cu_seqlens=torch.tensor([0.0, 7.0])), TypeError, r"cu_seqlens must be int32 or int64, got torch\.float32"),
    "cu-seqlens-2d": (dict(PACKED, cu_seqlens=torch.tensor([[0, 7]])), ValueError, r"cu_seqlens must have shape \(N \+ 1,\)"),
    "cu-seqlens-start": (dict(PACKED, cu_seqlens=torch.tensor([1, 7])), ValueError, r"cu_seqlens must start at 0 and end at L=7, got 1 \.\.\. 7"),
    "cu-seqlens-end": (dict(PACKED, cu_seqlens=torch.tensor([0, 3, 6])), ValueError, r"cu_seqlens must start at 0 and end at L=7, got 0 \.\.\. 6"),
    "cu-seqlens-decreasing": (dict(PACKED, cu_seqlens=torch.tensor([0, 5, 3, 7])), ValueError, r"cu_seqlens must be non-decreasing, got \[0, 5, 3, 7\]"),
    "cu-seqlens-device": (dict(PACKED, cu_seqlens=torch.tensor([0, 7], device="meta")), ValueError, r"cu_seqlens must be on cpu, got meta"),
    "cu-seqlens-initial-state": (dict(PACKED, cu_seqlens=torch.tensor([0, 3, 7]), initial_state=torch.zeros(1, 5, 3)), ValueError, r"initial_state must have shape \(2, 5, 3\), got \(1, 5, 3\)"),
}


@pytest.mark.parametrize("case", BAD_SCAN_INPUTS.values(), ids=BAD_SCAN_INPUTS.keys())
def test_bad_scan_input_is_a_clear_error(case):
    overrides, error, message = case
    with pytest.raises(error, match=message):
        rnnkern.selective_scan(**{**SCAN, **overrides})


X = torch.randn(2, 5)
UPDATE = dict(state=torch.zeros(2, 5, 3), x=X, dt=torch.rand(2, 5), A=-torch.rand(5, 3), B=torch.randn(2, 3),
              C=torch.randn(2, 3))
BAD_UPDATE_INPUTS = {
    "x-3d": (dict(x=X[..., None]), ValueError, r"x must have shape \(B, D\), got shape \(2, 5, 1\)"),
    "dt-shape": (dict(dt=X[:1]), ValueError, r"dt must have the shape of x \(2, 5\), got \(1, 5\)"),
    "state-shape": (dict(state=torch.zeros(2, 5, 4)), ValueError, r"state must have shape \(2, 5, 3\), got \(2, 5, 4\)"),
    "state-dtype": (dict(state=torch.zeros(2, 5, 3, dtype=torch.float64)), TypeError, r"state must be torch\.float32, got torch\.float64"),
    "A-rows": (dict(A=-torch.rand(6, 3)), ValueError, r"A must have shape \(D, N\) with D=5 .*got \(6, 3\)"),
    "B-state-size": (dict(B=torch.randn(2, 4)), ValueError, r"B must have shape \(2, 3\) \(B, N\) or \(2, G, 3\) \(B, G, N\), got \(2, 4\)"),
    "C-groups-not-dividing": (dict(C=torch.randn(2, 3, 3)), ValueError, r"C has G=3 groups, which must divide D=5"),
    "z-dtype": (dict(z=X.double()), TypeError, r"z must have the dtype of x \(torch\.float32\), got torch\.float64"),
    "dt-bias-shape": (dict(dt_bias=torch.randn(3)), ValueError, r"dt_bias must have shape \(5,\) \(one value per channel\), got \(3,\)"),
}


@pytest.mark.parametrize("case", BAD_UPDATE_INPUTS.values(), ids=BAD_UPDATE_INPUTS.keys())
def test_bad_state_update_input_is_a_clear_error(case):
    overrides, error, message = case
    with pytest.raises(error, match=message):
        rnnkern.selective_state_update(**{**UPDATE, **overrides})
