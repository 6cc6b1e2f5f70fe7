"""selective_scan and selective_state_update: every backend against the reference, the
reference against an explicit fp64 loop."""
import pytest
import torch

import rnnkern
from rnnkern import _backends
from rnnkern.ops import selective_scan as ops
from rnnkern.ops.selective_scan import SELECTIVE_SCAN, SELECTIVE_STATE_UPDATE
from tests.conftest import backend_case_params, backend_params, ran_op, skip_unsupported
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
    return backend_case_params(backends, cases, interpreted, case_id)


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


def update_step(state, inputs, t, backend, state_batch_indices=None):
    """selective_state_update on column t of the scan's inputs."""
    z = inputs.get("z")
    return rnnkern.selective_state_update(
        state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t], inputs["C"][..., t],
        D=inputs.get("D"), z=None if z is None else z[..., t], dt_bias=inputs.get("delta_bias"),
        dt_softplus=inputs["delta_softplus"], state_batch_indices=state_batch_indices, backend=backend,
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


@pytest.mark.parametrize("slots", [None, 5], ids=["rows", "pool"])
@pytest.mark.parametrize("device,backend", backend_params(SELECTIVE_STATE_UPDATE))
def test_state_update_opcheck(device, backend, slots):
    """The op takes the multi-head form (the single-head one is a view of it)."""
    kwargs = head_inputs((3, 4, 3, 4, 2, "scalarA", HEAD_OPTIONS), torch.float32, device, slots=slots)
    args = tuple(kwargs[k] for k in ("state", "x", "dt", "A", "B", "C"))
    D = kwargs["D"][:, None].expand(kwargs["dt_bias"].shape)  # (H,) -> (H, P)
    args += (D, kwargs["z"], kwargs["dt_bias"], True, kwargs.get("state_batch_indices"), backend)
    torch.library.opcheck(torch.ops.rnnkern.selective_state_update.default, args)


# --- one decoding step, multi-head (Mamba-2) form -------------------------------------

HEAD_OPTIONS = ("D", "z", "bias", "softplus")
# (batch, heads, head dim, state size, groups, A layout, options): A a scalar per head expanded
# with stride 0 (Mamba-2) or a full (H, P, N); P and N not powers of two, G in {1, 2, H}
HEAD_CASES = [
    (2, 4, 3, 5, 2, "scalarA", HEAD_OPTIONS),
    (1, 3, 5, 4, 1, "fullA", ("D", "z")),
    (3, 2, 2, 1, 2, "scalarA", ("softplus",)),
    (2, 6, 4, 8, 3, "fullA", ("bias", "softplus")),
]


def head_case_id(case) -> str:
    batch, heads, dim, n, groups, layout, options = case
    return "-".join([f"B{batch}-H{heads}-P{dim}-N{n}-G{groups}-{layout}", *options])


def head_inputs(case, dtype, device, slots=None, seed=0) -> dict:
    """Keyword arguments of selective_state_update in the multi-head form: make_inputs' first step
    on the H P channels, split into heads; D one value per head. With `slots` the state is a pool
    of that many slots and state_batch_indices names distinct ones, the second row padding (-1)
    when there are two rows or more."""
    batch, heads, dim, n, groups, layout, options = case
    scan = make_inputs((batch, heads * dim, 1, n, f"grouped{groups}", options), dtype, device, seed)

    def split(t):  # (B, H P, 1) -> (B, H, P)
        return t[..., 0].unflatten(1, (heads, dim))

    A = scan["A"].view(heads, dim, n)
    if layout == "scalarA":  # Mamba-2's one value per head, expanded over (P, N) with stride 0
        A = A[:, :1, :1].expand(A.shape)
    inputs = dict(x=split(scan["u"]), dt=split(scan["delta"]), A=A, B=scan["B"][..., 0], C=scan["C"][..., 0],
                  dt_softplus=scan["delta_softplus"])
    if "D" in options:
        inputs["D"] = scan["D"].view(heads, dim)[:, 0]
    if "z" in options:
        inputs["z"] = split(scan["z"])
    if "bias" in options:
        inputs["dt_bias"] = scan["delta_bias"].view(heads, dim)
    gen = torch.Generator().manual_seed(seed + 1)
    state = torch.randn((slots or batch, heads, dim, n), generator=gen, dtype=torch.float64)
    inputs["state"] = state.to(device, scan["initial_state"].dtype)
    if slots is not None:
        chosen = torch.randperm(slots, generator=gen)[:batch]
        if batch > 1:
            chosen[1] = -1
        inputs["state_batch_indices"] = chosen.to(device)
    return inputs


def head_step_fp64(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   state_batch_indices=None):
    """The multi-head step written out per row and head in fp64: (y, the new state)."""
    state = state.double().clone()
    batch, heads, _ = x.shape
    y = torch.zeros(x.shape, dtype=torch.float64)
    slots = range(batch) if state_batch_indices is None else state_batch_indices.tolist()
    for b, slot in enumerate(slots):
        if slot == -1:
            continue
        for h in range(heads):
            g = h // (heads // B.shape[1])
            step = dt[b, h].double() + (0 if dt_bias is None else dt_bias[h].double())  # (P,)
            if dt_softplus:
                step = torch.log1p(torch.exp(step))
            state[slot, h] = (torch.exp(step[:, None] * A[h].double()) * state[slot, h]
                              + (step * x[b, h].double())[:, None] * B[b, g].double())
            y[b, h] = state[slot, h] @ C[b, g].double() + (0 if D is None else D[h].double() * x[b, h].double())
            if z is not None:
                y[b, h] *= torch.nn.functional.silu(z[b, h].double())
    return y, state


def head_update(inputs: dict, backend) -> tuple:
    """(y, state) of selective_state_update on a copy of the inputs' state."""
    state = inputs["state"].clone()
    y = rnnkern.selective_state_update(**dict(inputs, state=state), backend=backend)
    return y, state


HEAD_BACKENDS = backend_params(SELECTIVE_STATE_UPDATE)
HEAD_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def head_params(cases=HEAD_CASES) -> list:
    """(device, backend, case, dtype): fp32 and bf16 on every backend, fp64 where it runs."""
    params = []
    for dtype in HEAD_DTYPES:
        for p in HEAD_BACKENDS:
            device, backend = p.values
            if backend == "triton" and dtype == torch.float64 or backend == "cpu" and dtype == torch.bfloat16:
                continue
            params += [pytest.param(device, backend, case, dtype, id=f"{p.id}-{head_case_id(case)}-{dtype_id(dtype)}",
                                    marks=p.marks) for case in cases]
    return params


@pytest.mark.parametrize("slots", [None, 7], ids=["rows", "pool"])
@pytest.mark.parametrize("case", HEAD_CASES, ids=head_case_id)
def test_head_reference_matches_fp64_loop(case, slots):
    inputs = head_inputs(case, torch.float64, "cpu", slots=slots)
    y, state = head_update(inputs, "reference")
    expected_y, expected_state = head_step_fp64(**inputs)
    assert_close(y, expected_y, torch.float64, "y")
    assert_close(state, expected_state, torch.float64, "state")


@pytest.mark.parametrize("slots", [None, 7], ids=["rows", "pool"])
@pytest.mark.parametrize("device,backend,case,dtype", head_params())
def test_head_update_matches_reference(device, backend, case, dtype, slots):
    inputs = head_inputs(case, dtype, device, slots=slots)
    y, state = head_update(inputs, backend)
    expected_y, expected_state = head_update(inputs, "reference")
    assert y.dtype == dtype and y.shape == inputs["x"].shape
    assert_close(y, expected_y, dtype, "y")
    assert_close(state, expected_state, ops.state_dtype(dtype), "state")


@pytest.mark.parametrize("device,backend", HEAD_BACKENDS)
def test_head_update_reads_a_per_head_A_as_it_is(device, backend):
    """A expanded from one value per head (stride 0 over P and N) gives what its contiguous copy gives."""
    inputs = head_inputs(HEAD_CASES[0], torch.float32, device)
    assert inputs["A"].stride()[1:] == (0, 0)
    y, state = head_update(inputs, backend)
    y_copy, state_copy = head_update(dict(inputs, A=inputs["A"].contiguous()), backend)
    assert_close(y, y_copy, torch.float32, "y")
    assert_close(state, state_copy, torch.float32, "state")


@pytest.mark.parametrize("device,backend", HEAD_BACKENDS)
def test_state_batch_indices_update_only_their_slots(device, backend):
    """Rows 0 and 2 update slots 4 and 1 of a pool of 6; row 1 is padding (-1): y = 0 there, and
    every other slot keeps its bits."""
    inputs = head_inputs((3, 4, 3, 5, 2, "scalarA", HEAD_OPTIONS), torch.float32, device, slots=6)
    indices = torch.tensor([4, -1, 1], dtype=torch.int32, device=device)
    inputs["state_batch_indices"] = indices
    y, state = head_update(inputs, backend)
    untouched = [0, 2, 3, 5]
    assert torch.equal(state[untouched], inputs["state"][untouched])
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    rows = dict(inputs, state=inputs["state"][[4, 1]], state_batch_indices=None,
                **{k: inputs[k][[0, 2]] for k in ("x", "dt", "B", "C", "z")})
    expected_y, expected_state = head_update(rows, backend)
    assert_close(y[[0, 2]], expected_y, torch.float32, "y")
    assert_close(state[[4, 1]], expected_state, torch.float32, "state")


@pytest.mark.parametrize("device,backend", HEAD_BACKENDS)
def test_state_batch_indices_in_the_single_head_form(device, backend):
    inputs = make_inputs(UPDATE_CASES[0], torch.float32, device)
    pool = torch.randn(4, *inputs["initial_state"].shape[1:], device=device)
    indices = torch.tensor([2, 0], device=device)
    state = pool.clone()
    y = update_step(state, inputs, 0, backend, state_batch_indices=indices)
    rows = pool[indices]
    expected = update_step(rows, inputs, 0, "reference")
    assert_close(y, expected, torch.float32, "y")
    assert_close(state[indices], rows, torch.float32, "state")
    assert torch.equal(state[[1, 3]], pool[[1, 3]])


@pytest.mark.parametrize("device,backend", HEAD_BACKENDS)
def test_head_update_steps_equal_the_scan_of_the_channels(device, backend):
    """T multi-head steps = selective_scan over the H P channels h P + p, A flattened to (H P, N)."""
    batch, heads, dim, n, groups, length = 2, 4, 3, 5, 2, 5
    case = (batch, heads, dim, n, groups, "scalarA", HEAD_OPTIONS)
    steps = [head_inputs(case, torch.float32, device, seed=t) for t in range(length)]
    first = steps[0]

    def channels(k):  # (B, H, P) per step -> (B, H P, L)
        return torch.stack([s[k].flatten(1) for s in steps], dim=2)

    out, last = rnnkern.selective_scan(
        channels("x"), channels("dt"), first["A"].flatten(0, 1), torch.stack([s["B"] for s in steps], dim=3),
        torch.stack([s["C"] for s in steps], dim=3), first["D"].repeat_interleave(dim), channels("z"),
        first["dt_bias"].flatten(), True, return_last_state=True, initial_state=first["state"].flatten(1, 2),
        backend="reference")
    state = first["state"].clone()
    for t, s in enumerate(steps):
        y = rnnkern.selective_state_update(state, s["x"], s["dt"], first["A"], s["B"], s["C"], first["D"], s["z"],
                                           first["dt_bias"], True, backend=backend)
        assert_close(y.flatten(1), out[..., t], torch.float32, f"y at step {t}")
    assert_close(state.flatten(1, 2), last, torch.float32, "state after the last step")


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


def test_multi_head_state_update_compiles_fullgraph():
    """The Mamba-2 form under torch.compile: a per-head A expanded with stride 0, D per head, a
    pool of slots with a padding row."""
    inputs = head_inputs(HEAD_CASES[0], torch.float32, "cpu", slots=5)
    pool = inputs.pop("state")

    def step(state, **kwargs):
        return rnnkern.selective_state_update(state, **kwargs).sin()

    eager_state, compiled_state = pool.clone(), pool.clone()
    expected = step(eager_state, **inputs)
    actual = torch.compile(step, fullgraph=True)(compiled_state, **inputs)
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
    "x-4d": (dict(x=X[..., None, None]), ValueError, r"x must have shape \(B, D\) \(single-head\) or \(B, H, P\) \(multi-head\), got shape \(2, 5, 1, 1\)"),
    "x-not-a-tensor": (dict(x=1.0), TypeError, r"x must be a torch\.Tensor of shape \(B, D\) .*, got float"),
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


XH = torch.randn(2, 4, 3)
HEADS = dict(state=torch.zeros(2, 4, 3, 5), x=XH, dt=torch.rand(2, 4, 3), A=-torch.rand(4, 1, 1).expand(4, 3, 5),
             B=torch.randn(2, 2, 5), C=torch.randn(2, 2, 5))
INDICES = dict(state=torch.zeros(6, 4, 3, 5), state_batch_indices=torch.tensor([5, 0]))
BAD_HEAD_UPDATE_INPUTS = {
    "dt-shape": (dict(dt=XH[:, :3]), ValueError, r"dt must have the shape of x \(2, 4, 3\), got \(2, 3, 3\)"),
    "A-2d": (dict(A=-torch.rand(4, 5)), ValueError, r"A must have shape \(H, P, N\), got shape \(4, 5\)"),
    "A-heads": (dict(A=-torch.rand(4, 2, 5)), ValueError, r"A must have shape \(H, P, N\) with \(H, P\)=\(4, 3\) .*got \(4, 2, 5\)"),
    "A-complex": (dict(A=torch.randn(4, 3, 5, dtype=torch.complex64)), TypeError, r"A must be real"),
    "state-shape": (dict(state=torch.zeros(2, 4, 3, 4)), ValueError, r"state must have shape \(2, 4, 3, 5\), got \(2, 4, 3, 4\)"),
    "state-pool-without-indices": (dict(state=torch.zeros(6, 4, 3, 5)), ValueError, r"state must have shape \(2, 4, 3, 5\), got \(6, 4, 3, 5\)"),
    "B-groups-not-dividing-heads": (dict(B=torch.randn(2, 3, 5), C=torch.randn(2, 3, 5)), ValueError, r"B has G=3 groups, which must divide H=4"),
    "B-state-size": (dict(B=torch.randn(2, 2, 4)), ValueError, r"B must have shape \(2, G, 5\) \(B, G, N\) or \(2, 5\) \(B, N\), got \(2, 2, 4\)"),
    "B-C-groups-differ": (dict(C=torch.randn(2, 1, 5)), ValueError, r"B and C must have the same number of groups"),
    "D-shape": (dict(D=torch.randn(3)), ValueError, r"D must have shape \(4, 3\) \(H, P\) or \(4,\) \(H,\), got \(3,\)"),
    "dt-bias-shape": (dict(dt_bias=torch.randn(4, 2)), ValueError, r"dt_bias must have shape \(4, 3\) \(H, P\) or \(4,\) \(H,\), got \(4, 2\)"),
    "z-shape": (dict(z=XH[:1]), ValueError, r"z must have the shape of x \(2, 4, 3\), got \(1, 4, 3\)"),
    "indices-dtype": (dict(INDICES, state_batch_indices=torch.tensor([5.0, 0.0])), TypeError, r"state_batch_indices must be int32 or int64, got torch\.float32"),
    "indices-not-a-tensor": (dict(INDICES, state_batch_indices=[5, 0]), TypeError, r"state_batch_indices must be a torch\.Tensor of shape \(2,\), got list"),
    "indices-shape": (dict(INDICES, state_batch_indices=torch.tensor([5, 0, 1])), ValueError, r"state_batch_indices must have shape \(2,\) \(one slot per row of x\), got \(3,\)"),
    "indices-device": (dict(INDICES, state_batch_indices=torch.tensor([5, 0], device="meta")), ValueError, r"state_batch_indices must be on the input's device \(cpu\), got meta"),
    "indices-past-the-pool": (dict(INDICES, state_batch_indices=torch.tensor([6, 0])), ValueError, r"state_batch_indices must lie in \[-1, 6\) .*got values in \[0, 6\]"),
    "indices-below-padding": (dict(INDICES, state_batch_indices=torch.tensor([-2, 0], dtype=torch.int32)), ValueError, r"state_batch_indices must lie in \[-1, 6\)"),
}


@pytest.mark.parametrize("case", BAD_HEAD_UPDATE_INPUTS.values(), ids=BAD_HEAD_UPDATE_INPUTS.keys())
def test_bad_multi_head_state_update_input_is_a_clear_error(case):
    overrides, error, message = case
    with pytest.raises(error, match=message):
        rnnkern.selective_state_update(**{**HEADS, **overrides})


def test_the_cpu_kernel_refuses_an_index_past_the_pool():
    """Called directly (no validation in front), the kernel raises rather than write outside the pool."""
    inputs = head_inputs(HEAD_CASES[1], torch.float32, "cpu", slots=3)
    args = [inputs[k] for k in ("state", "x", "dt", "A", "B", "C")]
    with pytest.raises(RuntimeError, match=r"state_batch_indices must lie in \[-1, 2\]"):
        torch.ops.rnnkern_C.selective_state_update(*args, None, None, None, False, torch.tensor([3]))
