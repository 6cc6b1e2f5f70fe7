"""linear_scan: every backend against the reference, the reference against an fp64 loop."""
import pytest
import torch

import rnnkern
from rnnkern.ops.linear_scan import LINEAR_SCAN
from tests.conftest import backend_params, interpreted_as_slow
from tests.tolerances import assert_close

BACKENDS = backend_params(LINEAR_SCAN)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(2, 63, 37), (1, 1, 5), (1, 1025, 5), (3, 64, 32)]  # (B, T, D)


def shape_id(shape) -> str:
    return "B{}-T{}-D{}".format(*shape)


def dtype_id(dtype) -> str:
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}[dtype]


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton backend: float64 is not supported")


def make_inputs(shape, dtype, device, seed=0, gates=(0.0, 1.0), num_states=None):
    """a with entries uniform in `gates`, b and initial_state standard normal."""
    gen = torch.Generator().manual_seed(seed)
    low, high = gates
    a = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    h0 = torch.randn((num_states or shape[0], shape[2]), generator=gen, dtype=torch.float64)
    return a.to(device, dtype), b.to(device, dtype), h0.to(device, rnnkern.ops.linear_scan.state_dtype(dtype))


def run(backend, a, b, h0=None, **kwargs):
    """Outputs and the gradients of every input under fixed random cotangents."""
    leaves = [x.detach().requires_grad_() for x in (a, b) + ((h0,) if h0 is not None else ())]
    h, final = rnnkern.linear_scan(*leaves, output_final_state=True, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(123)
    dh = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h.device, h.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.device, final.dtype)
    grads = torch.autograd.grad((h, final), leaves, (dh, dfinal))
    result = {"h": h, "final_state": final, "grad_a": grads[0], "grad_b": grads[1]}
    if h0 is not None:
        result["grad_initial_state"] = grads[2]
    return result


def assert_all_close(actual: dict, expected: dict, dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert_close(actual[name], expected[name], dtype, name)


def fp64_loop(a, b, h0, reverse=False):
    """The recurrence written out step by step in fp64, differentiable by autograd."""
    state = h0.double()
    steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
    hs = {}
    for t in steps:
        state = a[:, t].double() * state + b[:, t].double()
        hs[t] = state
    return torch.stack([hs[t] for t in range(a.shape[1])], dim=1), state


# --- reference against the fp64 loop ---------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", [(2, 63, 37), (1, 1, 5)], ids=shape_id)
def test_reference_matches_fp64_loop(shape, reverse):
    a, b, h0 = make_inputs(shape, torch.float64, "cpu", gates=(-1.0, 1.0))
    leaves = [x.requires_grad_() for x in (a, b, h0)]
    h, final = fp64_loop(*leaves, reverse=reverse)
    gen = torch.Generator().manual_seed(123)
    dh = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((h, final), leaves, (dh, dfinal))
    expected = dict(zip(["h", "final_state", "grad_a", "grad_b", "grad_initial_state"], [h, final, *grads]))
    assert_all_close(run("reference", a, b, h0, reverse=reverse), expected, torch.float64)


# --- every backend against the reference -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_reference(device, backend, shape, dtype):
    skip_unsupported(backend, dtype)
    a, b, h0 = make_inputs(shape, dtype, device)
    assert_all_close(run(backend, a, b, h0), run("reference", a, b, h0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_reverse_with_negative_gates(device, backend, dtype):
    a, b, h0 = make_inputs((2, 70, 19), dtype, device, gates=(-1.0, 1.0))
    assert_all_close(run(backend, a, b, h0, reverse=True), run("reference", a, b, h0, reverse=True), dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_without_initial_state_starts_from_zero(device, backend):
    a, b, h0 = make_inputs((2, 33, 9), torch.float32, device)
    expected = run(backend, a, b, torch.zeros_like(h0))
    del expected["grad_initial_state"]
    assert_all_close(run(backend, a, b), expected, torch.float32)
    assert_all_close(run(backend, a, b), run("reference", a, b), torch.float32)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_packed_sequences_equal_separate_runs(device, backend, reverse, index_dtype):
    bounds = [0, 5, 5, 40, 63, 64]  # includes an empty sequence and a single step
    a, b, h0 = make_inputs((1, 64, 11), torch.float32, device, num_states=len(bounds) - 1)
    cu_seqlens = torch.tensor(bounds, dtype=index_dtype, device=device)
    packed = run(backend, a, b, h0, reverse=reverse, cu_seqlens=cu_seqlens)
    assert packed["final_state"].shape == (len(bounds) - 1, 11)
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if start == end:
            assert_close(packed["final_state"][n], h0[n], torch.float32, "final state of an empty sequence")
            continue
        alone = run(backend, a[:, start:end], b[:, start:end], h0[n : n + 1], reverse=reverse)
        # gradients differ only through the cotangents, so compare the forward pieces
        assert_close(packed["h"][:, start:end], alone["h"], torch.float32, f"h of sequence {n}")
        assert_close(packed["final_state"][n : n + 1], alone["final_state"], torch.float32, f"final {n}")
    expected = run("reference", a, b, h0, reverse=reverse, cu_seqlens=cu_seqlens)
    assert_all_close(packed, expected, torch.float32)


def launcher_results(module, a, b, h0, cu_seqlens, reverse, **kwargs):
    """h, the final state and the gradients from a backend module's launchers, called directly."""
    gen = torch.Generator().manual_seed(5)
    dh = torch.randn(a.shape, generator=gen).to(a.dtype)
    dfinal = torch.randn(h0.shape, generator=gen)
    h, final = module.linear_scan_fwd(a, b, h0, cu_seqlens, reverse, **kwargs)
    grads = module.linear_scan_bwd(a, h, h0, dh, dfinal, cu_seqlens, reverse, **kwargs)
    return dict(zip(["h", "final_state", "grad_a", "grad_b", "grad_initial_state"], [h, final, *grads]))


@pytest.mark.parametrize("chunks", [1, 3], ids=["one-chunk", "three-chunks"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_triton_over_time_tiles_channel_blocks_and_chunks(reverse, packed, chunks):
    """Several programs along every grid axis: 2 sequences x 2 channel blocks (D=40 in blocks
    of 32, the last ragged) x chunks of 2 time tiles, packed sequences ending mid-chunk."""
    triton_scan = pytest.importorskip("rnnkern.ops.linear_scan.triton", reason="triton is not installed")
    from rnnkern.ops.linear_scan import reference

    T, D = 300, 40
    cu_seqlens = torch.tensor([0, 150, T], dtype=torch.int32) if packed else None
    a, b, h0 = make_inputs((1 if packed else 2, T, D), torch.float32, "cpu", gates=(-1.0, 1.0), num_states=2)
    block_d, num_chunks, _ = triton_scan.plan(2, T, D, a.device, chunks)
    assert (-(-D // block_d), num_chunks) == (2, chunks)
    actual = launcher_results(triton_scan, a, b, h0, cu_seqlens, reverse, chunks=chunks)
    expected = launcher_results(reference, a, b, h0, cu_seqlens, reverse)
    assert_all_close(actual, expected, torch.float32)


def test_triton_splits_sequences_only_where_the_grid_is_small():
    triton_scan = pytest.importorskip("rnnkern.ops.linear_scan.triton", reason="triton is not installed")
    meta = torch.device("meta")  # no CUDA device to ask: the plan aims at an H100's 132 SMs
    assert triton_scan.plan(8, 4096, 1536, meta)[1] == 1  # 384 programs already
    assert triton_scan.plan(8, 4096, 1536, meta, chunks=4)[1] == 4
    _, num_chunks, chunk = triton_scan.plan(1, 65536, 256, meta)  # 8 programs
    assert 8 * num_chunks in range(200, 265) and chunk * num_chunks >= 65536 and chunk % triton_scan.BLOCK_T == 0
    assert triton_scan.plan(1, 300, 256, meta)[1] == 2  # never below MIN_CHUNK steps a chunk
    assert triton_scan.plan(1, 200, 256, meta)[1] == 1


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_channel_offsets_past_2_31(device, backend):
    """A (1, T, 3) view of a 4 GiB buffer whose third channel starts 2**31 + 2 elements in:
    offsets computed in 32 bits would wrap. Only the view's few pages are ever touched."""
    T, stride = 5, 2**30 + 1
    storage = torch.empty(2 * stride + T, dtype=torch.bfloat16, device=device)
    a = storage.as_strided((1, T, 3), (3 * stride, 1, stride))
    dense, b, h0 = make_inputs((1, T, 3), torch.bfloat16, device)
    a.copy_(dense)
    assert a.stride(2) * (a.shape[2] - 1) >= 2**31
    assert_all_close(run(backend, a, b, h0), run("reference", dense, b, h0), torch.bfloat16)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_single_step(device, backend):
    a, b, h0 = make_inputs((3, 1, 6), torch.float32, device)
    out = run(backend, a, b, h0)
    assert_close(out["h"][:, 0], a[:, 0] * h0 + b[:, 0], torch.float32, "h")
    assert_all_close(out, run("reference", a, b, h0), torch.float32)


@pytest.mark.parametrize("device,backend", interpreted_as_slow(BACKENDS))
def test_sequence_longer_than_65536(device, backend):
    a, b, h0 = make_inputs((1, 70001, 3), torch.float32, device, gates=(0.9, 1.0))
    assert_all_close(run(backend, a, b, h0), run("reference", a, b, h0), torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs(device, backend):
    _, _, h0 = make_inputs((2, 40, 9), torch.float32, device)
    a = torch.rand(2, 9, 40, device=device).transpose(1, 2)  # (2, 40, 9), channel stride 40
    b = torch.randn(2, 80, 9, device=device)[:, ::2]  # time stride 2
    assert not a.is_contiguous() and not b.is_contiguous()
    assert_all_close(run(backend, a, b, h0), run(backend, a.contiguous(), b.contiguous(), h0), torch.float32)
    # expanded gradients (stride 0), as .sum() produces them
    leaves = [x.detach().requires_grad_() for x in (a, b)]
    rnnkern.linear_scan(*leaves, backend=backend).sum().backward()
    expected = run_with_ones(backend, a.contiguous(), b.contiguous())
    assert_close(leaves[0].grad, expected[0], torch.float32, "grad_a")
    assert_close(leaves[1].grad, expected[1], torch.float32, "grad_b")


def run_with_ones(backend, a, b):
    leaves = [x.detach().requires_grad_() for x in (a, b)]
    h = rnnkern.linear_scan(*leaves, backend=backend)
    return torch.autograd.grad(h, leaves, torch.ones_like(h).contiguous())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", interpreted_as_slow(BACKENDS))
def test_long_memory_low_precision_against_fp64(device, backend, dtype):
    """Gates near 1 over thousands of steps: only an fp32 state keeps h within output rounding."""
    a, b, h0 = make_inputs((1, 4096, 8), dtype, device, gates=(0.999, 1.0))
    leaves = [x.double().requires_grad_() for x in (a, b, h0)]
    h, final = fp64_loop(*leaves)
    out = run(backend, a, b, h0)
    assert_close(out["h"], h, dtype, "h")
    assert_close(out["final_state"], final, dtype, "final state")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_step_by_step_decoding_equals_parallel_forward(device, backend):
    a, b, h0 = make_inputs((2, 20, 7), torch.float32, device)
    h_all, final = rnnkern.linear_scan(a, b, h0, output_final_state=True, backend=backend)
    state, steps = h0, []
    for t in range(a.shape[1]):
        h_t, state = rnnkern.linear_scan(a[:, t : t + 1], b[:, t : t + 1], state, output_final_state=True,
                                         backend=backend)
        steps.append(h_t)
    assert_close(torch.cat(steps, dim=1), h_all, torch.float32, "h")
    assert_close(state, final, torch.float32, "final state")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend, packed, reverse):
    cu_seqlens = torch.tensor([0, 2, 7]) if packed else None
    a, b, h0 = make_inputs((1 if packed else 2, 7, 3), torch.float64, "cpu", gates=(-1.0, 1.0), num_states=2)

    def scan(a, b, h0):
        return rnnkern.linear_scan(a, b, h0, reverse=reverse, cu_seqlens=cu_seqlens, output_final_state=True,
                                   backend=backend)

    assert torch.autograd.gradcheck(scan, [x.requires_grad_() for x in (a, b, h0)])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    a, b, h0 = make_inputs((2, 17, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.rnnkern.linear_scan.default, (a, b, h0, None, False, backend))
    torch.library.opcheck(torch.ops.rnnkern.linear_scan.default, (a, b, None, None, True, backend))
    cu_seqlens = torch.tensor([0, 4, 17], device=device)
    torch.library.opcheck(
        torch.ops.rnnkern.linear_scan.default, (a[:1], b[:1], h0, cu_seqlens, False, backend),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    h = rnnkern.linear_scan(a, b, h0, backend=backend)
    torch.library.opcheck(
        torch.ops.rnnkern.linear_scan_bwd.default, (a, h, h0, torch.ones_like(h), h0, None, False, backend)
    )


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph_forward_and_backward(device, backend):
    a, b, h0 = make_inputs((2, 21, 6), torch.float32, device)

    def loss(a, b, h0):
        h, final = rnnkern.linear_scan(a.sigmoid(), b, h0, output_final_state=True, backend=backend)
        return h.sin().sum() + final.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_leaves = [x.clone().requires_grad_() for x in (a, b, h0)]
    compiled_leaves = [x.clone().requires_grad_() for x in (a, b, h0)]
    loss(*eager_leaves).backward()
    compiled(*compiled_leaves).backward()
    for eager, traced in zip(eager_leaves, compiled_leaves):
        assert_close(traced.grad, eager.grad, torch.float32, "gradient")


def test_compile_fullgraph_with_inductor():
    a, b, h0 = make_inputs((2, 21, 6), torch.float32, "cpu")

    def step(a, b, h0):
        return rnnkern.linear_scan(a.sigmoid(), b * 2, h0, reverse=True).cos()

    assert_close(torch.compile(step, fullgraph=True)(a, b, h0), step(a, b, h0), torch.float32, "h")


# --- out= ------------------------------------------------------------------------------


def strided_out(shape, dtype, device, layout):
    """An uninitialised (B, T, D) output: contiguous; with channels strided (a transposed
    buffer); or contiguous but starting one element into its storage (not 32-byte aligned)."""
    batch, steps, dim = shape
    if layout == "transposed":
        return torch.full((batch, dim, steps), float("nan"), dtype=dtype, device=device).transpose(1, 2)
    if layout == "offset":
        return torch.full((batch * steps * dim + 1,), float("nan"), dtype=dtype, device=device)[1:].view(shape)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_out_receives_h(device, backend, dtype, layout):
    a, b, h0 = make_inputs((2, 33, 19), dtype, device)
    expected, expected_final = rnnkern.linear_scan(a, b, h0, output_final_state=True, backend=backend)
    out = strided_out(a.shape, dtype, device, layout)
    h, final = rnnkern.linear_scan(a, b, h0, output_final_state=True, out=out, backend=backend)
    assert h is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=0)


# Outputs of 16 MiB and more take the cpu forward's streaming stores (csrc/cpu/linear_scan.cpp):
# from an aligned start, and from one element past it (scalar stores up to the alignment); the
# backward runs on the result at the same size (whole-row channel blocks).
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_cpu_large_outputs_match_the_reference(dtype, reverse, layout):
    dim = 2056 * 4 // torch.finfo(dtype).bits * 8  # just over 16 MiB for 2048 steps
    a, b, h0 = make_inputs((1, 2048, dim), dtype, "cpu")
    out = strided_out(a.shape, dtype, "cpu", layout)
    rnnkern.linear_scan(a, b, h0, reverse=reverse, out=out, backend="cpu")
    expected = rnnkern.linear_scan(a, b, h0, reverse=reverse, backend="reference")
    assert_close(out, expected, dtype, "h")
    dh = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.ops.rnnkern.linear_scan_bwd(a, out, h0, dh, None, None, reverse, "cpu")
    expected_grads = torch.ops.rnnkern.linear_scan_bwd(a, expected, h0, dh, None, None, reverse, "reference")
    for name, actual, wanted in zip(("grad_a", "grad_b", "grad_initial"), grads, expected_grads):
        assert_close(actual, wanted, dtype, name)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_out_opcheck_and_compile(device, backend):
    a, b, h0 = make_inputs((2, 17, 5), torch.float32, device)
    out = torch.empty_like(a)
    torch.library.opcheck(torch.ops.rnnkern.linear_scan_out.default, (a, b, h0, None, False, backend, out))

    def scan_into(a, b, h0, out):
        return rnnkern.linear_scan(a.sigmoid(), b, h0, out=out, backend=backend).cos()

    compiled_out = torch.empty_like(a)
    result = torch.compile(scan_into, fullgraph=True, backend="aot_eager")(a, b, h0, compiled_out)
    assert_close(result, scan_into(a, b, h0, out), torch.float32, "h")
    assert_close(compiled_out, out, torch.float32, "out")


def shifted_views(shape):
    """A (B, T, D) tensor and a view of the same storage one element further on."""
    storage = torch.rand(torch.Size(shape).numel() + 1)
    return storage[:-1].view(shape), storage[1:].view(shape)


BAD_OUTS = {  # id: (() -> (a, out), error, message)
    "shape": (lambda: (A, torch.empty(2, 4, 3)), ValueError, r"out must have the shape of a \(2, 5, 3\), got \(2, 4, 3\)"),
    "dtype": (lambda: (A, torch.empty(2, 5, 3, dtype=torch.float64)), TypeError,
              r"out must have the dtype of a \(torch\.float32\), got torch\.float64"),
    "device": (lambda: (A, torch.empty(2, 5, 3, device="meta")), ValueError, r"out must be on the device of a"),
    "not-a-tensor": (lambda: (A, [[0.0]]), TypeError, r"out must be a torch\.Tensor of shape \(B, T, D\)"),
    "b-itself": (lambda: (A, B), ValueError, r"linear_scan: out must not share memory with b"),
    "overlapping-a": (lambda: shifted_views(A.shape), ValueError, r"linear_scan: out must not share memory with a"),
    "requires-grad": (lambda: (A.clone().requires_grad_(), torch.empty(2, 5, 3)), RuntimeError,
                      r"out= does not support automatic differentiation"),
}


@pytest.mark.parametrize("case", BAD_OUTS.values(), ids=BAD_OUTS.keys())
def test_bad_out_is_a_clear_error(case):
    make, error, message = case
    a, out = make()
    with pytest.raises(error, match=message):
        rnnkern.linear_scan(a, B, out=out)


def test_out_with_grad_inputs_under_no_grad():
    a = A.clone().requires_grad_()
    out = torch.empty_like(A)
    with torch.no_grad():
        rnnkern.linear_scan(a, B, out=out)
    assert_close(out, rnnkern.linear_scan(A, B), torch.float32, "h")


# --- bad input ------------------------------------------------------------------------

A = torch.rand(2, 5, 3)
B = torch.randn(2, 5, 3)
BAD_INPUTS = {
    "a-not-a-tensor": (dict(a=[[1.0]]), TypeError, r"a must be a torch\.Tensor of shape \(B, T, D\), got list"),
    "a-2d": (dict(a=A[0], b=B[0]), ValueError, r"a must have shape \(B, T, D\), got shape \(5, 3\)"),
    "b-shape": (dict(b=B[:, :4]), ValueError, r"b must have the shape of a \(2, 5, 3\), got \(2, 4, 3\)"),
    "int-dtype": (dict(a=A.long(), b=B.long()), TypeError, r"a must be float16, bfloat16, float32 or float64, got torch\.int64"),
    "mixed-dtypes": (dict(b=B.double()), TypeError, r"b must have the dtype of a \(torch\.float32\), got torch\.float64"),
    "mixed-devices": (dict(b=B.to("meta")), ValueError, r"b must be on the device of a \(cpu\), got meta"),
    "no-steps": (dict(a=A[:, :0], b=B[:, :0]), ValueError, r"at least one time step \(T >= 1\)"),
    "initial-state-shape": (dict(initial_state=torch.zeros(2, 4)), ValueError, r"initial_state must have shape \(2, 3\), got \(2, 4\)"),
    "initial-state-dtype": (dict(initial_state=torch.zeros(2, 3, dtype=torch.float64)), TypeError, r"initial_state must be torch\.float32, got torch\.float64"),
    "initial-state-device": (dict(initial_state=torch.zeros(2, 3, device="meta")), ValueError, r"initial_state must be on cpu, got meta"),
    "reverse-not-bool": (dict(reverse=1), TypeError, r"reverse must be a bool, got int"),
    "cu-seqlens-batch": (dict(cu_seqlens=torch.tensor([0, 5])), ValueError, r"batch size must be 1.*got 2"),
    "cu-seqlens-dtype": (dict(a=A[:1], b=B[:1], cu_seqlens=torch.tensor([0.0, 5.0])), TypeError, r"cu_seqlens must be int32 or int64, got torch\.float32"),
    "cu-seqlens-2d": (dict(a=A[:1], b=B[:1], cu_seqlens=torch.tensor([[0, 5]])), ValueError, r"cu_seqlens must have shape \(N \+ 1,\)"),
    "cu-seqlens-decreasing": (dict(a=A[:1], b=B[:1], cu_seqlens=torch.tensor([0, 4, 2, 5])), ValueError, r"non-decreasing, got \[0, 4, 2, 5\]"),
    "cu-seqlens-end": (dict(a=A[:1], b=B[:1], cu_seqlens=torch.tensor([0, 2, 4])), ValueError, r"start at 0 and end at T=5, got 0 \.\.\. 4"),
    "cu-seqlens-start": (dict(a=A[:1], b=B[:1], cu_seqlens=torch.tensor([1, 5])), ValueError, r"start at 0 and end at T=5, got 1 \.\.\. 5"),
    "cu-seqlens-state": (dict(a=A[:1], b=B[:1], cu_seqlens=torch.tensor([0, 2, 5]), initial_state=torch.zeros(1, 3)), ValueError, r"initial_state must have shape \(2, 3\), got \(1, 3\)"),
    "unknown-backend": (dict(backend="cudnn"), ValueError, r"unknown backend 'cudnn'; expected one of"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_clear_error(case):
    overrides, error, message = case
    kwargs = {"a": A, "b": B, **overrides}
    with pytest.raises(error, match=message):
        rnnkern.linear_scan(kwargs.pop("a"), kwargs.pop("b"), **kwargs)
