"""mamba_chunk_scan: every backend against the reference, the reference against an explicit
fp64 loop of the recurrence."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import rnnkern
from rnnkern.ops import mamba_chunk_scan as ops
from rnnkern.ops.mamba_chunk_scan import MAMBA_CHUNK_SCAN
from rnnkern.ops.mamba_chunk_scan import reference
from tests.conftest import backend_case_params, backend_params, ran_op, skip_unsupported
from tests.tolerances import assert_all_close, assert_close

DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
TENSOR_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
# D (h, p), D1 (h,), z, bias (dt_bias with dt_softplus), limit (dt_limit), init (initial_states),
# seq (seq_idx with restarts, one at a chunk's first position)
ALL = ("D", "z", "bias", "limit", "init", "seq")
# (batch, length, heads, p, groups, n, chunk_size, options): l = 1, chunks that do not divide l,
# one chunk of exactly l, a chunk longer than a kernel tile (64) and than l, g in {1, 2, h},
# p and n from 3 to 12
CASES = [
    (2, 1, 4, 3, 1, 4, 8, ("D", "z", "init")),
    (2, 37, 4, 5, 2, 3, 8, ("D", "z", "bias", "init", "seq")),
    (1, 64, 3, 4, 3, 5, 64, ("D1", "limit")),
    (2, 130, 4, 6, 1, 4, 32, ("z", "bias", "limit", "init", "seq")),
    (1, 70, 6, 3, 2, 7, 100, ("D", "bias")),
    (1, 150, 2, 4, 1, 3, 130, ("D", "z", "init", "seq")),
    (1, 100, 2, 10, 1, 12, 64, ("D", "z", "init", "seq")),  # p, n past the kernels' 8-wide transpose blocks
]
# The Triton interpreter is slow: it runs only these.
INTERPRETED = CASES[:3]


def _importable(module: str):
    """None if `module` imports, else why not."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        return str(err)
    return None


def _backends() -> list:
    """backend_params, the triton ones skipped while the op has no Triton module."""
    missing = _importable("rnnkern.ops.mamba_chunk_scan.triton")
    params = []
    for p in backend_params(MAMBA_CHUNK_SCAN):
        if p.values[1] == "triton" and missing:
            skip = pytest.mark.skip(reason=f"triton: rnnkern.ops.mamba_chunk_scan.triton is not importable ({missing})")
            p = pytest.param(*p.values, id=p.id, marks=[*p.marks, skip])
        params.append(p)
    return params


BACKENDS = _backends()


def case_id(case) -> str:
    batch, length, heads, dim, groups, n, chunk, options = case
    return "-".join([f"B{batch}-L{length}-H{heads}-P{dim}-G{groups}-N{n}-Q{chunk}", *options])


def with_cases(cases, interpreted=INTERPRETED, backends=BACKENDS) -> list:
    """(device, backend, case) params: every backend with `cases`, the interpreter with fewer."""
    return backend_case_params(backends, cases, interpreted, case_id)


def sequence_index(batch: int, length: int, chunk: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, length) int32 packed-sequence ids: random restarts, and one at position `chunk`."""
    starts = torch.rand(batch, length, generator=gen) < 0.08
    starts[:, 0] = False
    if chunk < length:
        starts[:, chunk] = True
    return starts.cumsum(1).to(torch.int32)


def make_inputs(case, dtype, device="cpu", seed=0) -> dict:
    """Keyword arguments of mamba_chunk_scan for `case`: a decaying state (A < 0, dt > 0)."""
    batch, length, heads, dim, groups, n, chunk, options = case
    gen = torch.Generator().manual_seed(seed)
    state = ops.state_dtype(dtype)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(shape, generator=gen, dtype=torch.float64)

    softplus = "bias" in options
    dt = randn(batch, length, heads) * 0.5 - 1.0 if softplus else 0.05 + 0.5 * rand(batch, length, heads)
    inputs = dict(
        x=randn(batch, length, heads, dim).to(device, dtype),
        dt=dt.to(device, dtype),
        A=(-0.5 - 1.5 * rand(heads)).to(device, state),
        B=randn(batch, length, groups, n).to(device, dtype),
        C=randn(batch, length, groups, n).to(device, dtype),
        chunk_size=chunk,
    )
    if "D" in options:
        inputs["D"] = randn(heads, dim).to(device, state)
    if "D1" in options:
        inputs["D"] = randn(heads).to(device, state)
    if "z" in options:
        inputs["z"] = randn(batch, length, heads, dim).to(device, dtype)
    if softplus:
        inputs.update(dt_bias=(randn(heads) * 0.5).to(device, state), dt_softplus=True)
    if "limit" in options:
        inputs["dt_limit"] = (0.1, 0.4)
    if "init" in options:
        inputs["initial_states"] = randn(batch, heads, dim, n).to(device, state)
    if "seq" in options:
        inputs["seq_idx"] = sequence_index(batch, length, chunk, gen).to(device)
    return inputs


def outputs_and_grads(scan, inputs: dict, seed=123) -> dict:
    """out, final_states and the gradient of every tensor input under fixed random cotangents.

    `scan` takes mamba_chunk_scan's keyword arguments and returns (out, final_states)."""
    leaves = {k: v.detach().requires_grad_() if k in TENSOR_ARGS else v for k, v in inputs.items()}
    out, final = scan(**leaves)
    gen = torch.Generator().manual_seed(seed)
    # cotangents rounded to the outputs' dtypes, so every run differentiates the same values
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, inputs["x"].dtype)
    d_final = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.device, final.dtype)
    names = [k for k in TENSOR_ARGS if k in leaves]
    grads = torch.autograd.grad((out, final), [leaves[k] for k in names], (d_out.to(out.dtype), d_final))
    return {"out": out, "final_states": final, **{f"grad_{k}": g for k, g in zip(names, grads)}}


def run(backend, inputs: dict) -> dict:
    def scan(**kwargs):
        return rnnkern.mamba_chunk_scan(**kwargs, return_final_states=True, backend=backend)

    return outputs_and_grads(scan, inputs)


def fp64_loop(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
              dt_softplus=False, dt_limit=(0.0, math.inf)):
    """The recurrence written out step by step in fp64, differentiable by autograd: (out, final)."""
    batch, length, heads, dim = x.shape
    x, dt, A, B, C = x.double(), dt.double(), A.double(), B.double(), C.double()
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    dt = dt.clamp(*dt_limit)
    group = torch.arange(heads) // (heads // B.shape[2])  # the group each head reads
    s = x.new_zeros(batch, heads, dim, B.shape[3]) if initial_states is None else initial_states.double()
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            s = s * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        s = decay * s + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group][:, :, None, :]
        y = (s * C[:, t, group][:, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y = y + (D.double() if D.dim() == 2 else D.double()[:, None]) * x[:, t]
        if z is not None:
            y = y * F.silu(z[:, t].double())
        ys.append(y)
    return torch.stack(ys, dim=1), s


# --- the reference against the fp64 loop -----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_fp64_loop(case):
    inputs = make_inputs(case, torch.float64)
    assert_all_close(run("reference", inputs), outputs_and_grads(fp64_loop, inputs), torch.float64)


# --- every backend against the reference -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("device,backend,case", with_cases(CASES))
def test_matches_reference(device, backend, case, dtype):
    skip_unsupported(backend, dtype)
    inputs = make_inputs(case, dtype, device)
    assert_all_close(run(backend, inputs), run("reference", inputs), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("device,backend,case", with_cases([CASES[1], CASES[3]], interpreted=[CASES[1]]))
def test_half_precision_inputs_match_reference(device, backend, case, dtype):
    """x, dt, B, C, z in half precision, the scan in fp32: out and gradients in the inputs' dtypes,
    final_states and the fp32 parameters' gradients in fp32."""
    inputs = make_inputs(case, dtype, device)
    result = run(backend, inputs)
    assert result["out"].dtype == result["grad_x"].dtype == result["grad_B"].dtype == dtype
    assert result["final_states"].dtype == result["grad_A"].dtype == result["grad_initial_states"].dtype
    assert result["grad_A"].dtype == torch.float32
    assert_all_close(result, run("reference", inputs), dtype)


GRADCHECK_BACKENDS = [p for p in BACKENDS if p.values in (("cpu", "reference"), ("cpu", "cpu"))]


@pytest.mark.parametrize("device,backend", GRADCHECK_BACKENDS)
def test_gradcheck_fp64(device, backend):
    """Every input's gradient, restarts inside and at the start of a chunk, chunks over two tiles."""
    for case, fast in (((1, 11, 2, 3, 1, 2, 4, ALL), False), ((1, 70, 2, 2, 2, 2, 66, ALL), True)):
        inputs = make_inputs(case, torch.float64, device)
        names = [k for k in TENSOR_ARGS if k in inputs]
        rest = {k: v for k, v in inputs.items() if k not in names}

        def scan(*tensors):
            kwargs = dict(zip(names, tensors), **rest)
            return rnnkern.mamba_chunk_scan(**kwargs, return_final_states=True, backend=backend)

        assert torch.autograd.gradcheck(scan, [inputs[k].requires_grad_() for k in names], fast_mode=fast)


# --- properties of every backend --------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_results_do_not_depend_on_chunk_size(device, backend):
    inputs = make_inputs((2, 45, 4, 3, 2, 5, 1, ALL), torch.float64 if backend != "triton" else torch.float32, device)
    dtype = inputs["x"].dtype
    expected = run(backend, inputs)
    for chunk in (7, 16, 45, 200):
        assert_all_close(run(backend, dict(inputs, chunk_size=chunk)), expected, dtype)


# cu_seqlens (with an empty sequence), the initial state the first sequence's
PACKED = (0, 9, 9, 40, 75, 81)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_packed_sequences_equal_each_sequence_alone(device, backend):
    dtype = torch.float64 if backend != "triton" else torch.float32
    inputs = make_inputs((1, PACKED[-1], 4, 3, 2, 5, 16, ("D", "z", "bias", "init")), dtype, device)
    cu_seqlens = torch.tensor(PACKED, device=device)
    out, varlen = rnnkern.mamba_chunk_scan(**inputs, cu_seqlens=cu_seqlens, return_varlen_states=True,
                                           backend=backend)
    assert varlen.shape == (len(PACKED) - 1, 4, 3, 5) and varlen.dtype == ops.state_dtype(dtype)
    sliced = ("x", "dt", "B", "C", "z")
    for index, (start, end) in enumerate(zip(PACKED[:-1], PACKED[1:])):
        if start == end:
            assert torch.equal(varlen[index], torch.zeros_like(varlen[index]))
            continue
        alone = dict(inputs, **{k: inputs[k][:, start:end] for k in sliced})
        if index > 0:
            del alone["initial_states"]
        out_alone, final_alone = rnnkern.mamba_chunk_scan(**alone, return_final_states=True, backend=backend)
        assert_close(out[:, start:end], out_alone, dtype, f"out of sequence {index}")
        assert_close(varlen[index], final_alone[0], dtype, f"final state of sequence {index}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_cu_seqlens_gradients_match_seq_idx(device, backend):
    """cu_seqlens alone restarts the state like the seq_idx derived from it."""
    inputs = make_inputs((1, PACKED[-1], 4, 3, 2, 5, 16, ("D", "z", "init")), torch.float32, device)
    cu_seqlens = torch.tensor(PACKED, device=device)
    seq_idx = torch.repeat_interleave(torch.arange(len(PACKED) - 1), torch.diff(torch.tensor(PACKED)))
    expected = run(backend, dict(inputs, seq_idx=seq_idx[None].to(device, torch.int32)))
    assert_all_close(run(backend, dict(inputs, cu_seqlens=cu_seqlens)), expected, torch.float32)


@pytest.mark.parametrize("device,backend,case", with_cases([CASES[3], CASES[5]], interpreted=[CASES[3]]))
def test_kernel_chunk_states_are_the_states_entering_each_chunk(device, backend, case):
    inputs = make_inputs(case, torch.float32, device)
    step = ops._time_step(inputs["dt"], inputs.get("dt_bias"), inputs.get("dt_softplus", False),
                          inputs.get("dt_limit", (0.0, math.inf)), torch.float32)
    args = [inputs["x"], step, inputs["A"], inputs["B"], inputs["C"], inputs.get("D"), inputs.get("z"),
            inputs.get("initial_states"), inputs.get("seq_idx"), inputs["chunk_size"]]
    forward = MAMBA_CHUNK_SCAN.function(backend, "mamba_chunk_scan_fwd")
    expected = reference.mamba_chunk_scan_fwd(*args, True)
    for keep in (True, False):
        out, final, chunk_states = forward(*args, keep)
        assert_close(out, expected[0], torch.float32, "out")
        assert_close(final, expected[1], torch.float32, "final_states")
        if keep:
            assert chunk_states.shape == (case[0], -(-case[1] // case[6]), *final.shape[1:])
            assert_close(chunk_states, expected[2], torch.float32, "chunk_states")
        else:
            assert chunk_states.shape == (0,)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    inputs = make_inputs((2, 21, 4, 3, 2, 5, 8, ALL), torch.float32, device)
    x, dt, A, B, C, D, z, h0, seq_idx = (inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "initial_states",
                                                             "seq_idx"))
    dt = F.softplus(dt)
    scan = torch.ops.rnnkern.mamba_chunk_scan.default
    torch.library.opcheck(scan, (x, dt, A, B, C, D, z, h0, seq_idx, 8, True, backend))
    torch.library.opcheck(scan, (x, dt, A, B, C, None, None, None, None, 8, True, backend))
    _, _, chunk_states = scan(x, dt, A, B, C, D, z, h0, seq_idx, 8, True, backend)
    torch.library.opcheck(torch.ops.rnnkern.mamba_chunk_scan_bwd.default,
                          (x, dt, A, B, C, D, z, h0, seq_idx, 8, chunk_states, torch.ones_like(x),
                           torch.ones_like(h0), backend))


def test_cpu_backend_runs_by_default_on_cpu_tensors():
    if MAMBA_CHUNK_SCAN.refusal("cpu", torch.device("cpu"), torch.float32):
        pytest.fail("rnnkern._C lacks mamba_chunk_scan_fwd/bwd: rebuild the extension")
    inputs = make_inputs(CASES[1], torch.float32)
    assert ran_op("rnnkern_C::mamba_chunk_scan_fwd", lambda: rnnkern.mamba_chunk_scan(**inputs))


# --- bad input ---------------------------------------------------------------------------


def _bad(inputs: dict, name: str):
    """inputs with one argument made wrong: (name of the change, kwargs)."""
    x = inputs["x"]
    changes = {
        "x-3d": dict(x=x[0]),
        "x-int": dict(x=x.long()),
        "dt-shape": dict(dt=inputs["dt"][:, :-1]),
        "A-shape": dict(A=inputs["A"][:-1]),
        "B-dtype": dict(B=inputs["B"].long()),
        "B-groups": dict(B=inputs["B"][:, :, :1].expand(-1, -1, 3, -1), C=inputs["C"][:, :, :1].expand(-1, -1, 3, -1)),
        "C-shape": dict(C=inputs["C"][..., :-1]),
        "D-shape": dict(D=inputs["D"][:, :-1]),
        "z-shape": dict(z=inputs["z"][:, :-1]),
        "initial_states-shape": dict(initial_states=inputs["initial_states"][..., :-1]),
        "seq_idx-dtype": dict(seq_idx=inputs["seq_idx"].float()),
        "chunk_size-zero": dict(chunk_size=0),
        "chunk_size-bool": dict(chunk_size=True),
        "chunk_size-float": dict(chunk_size=8.0),
    }
    return dict(inputs, **changes[name])


BAD = [
    ("x-3d", ValueError, r"x must have shape \(b, l, h, p\)"),
    ("x-int", TypeError, r"x must be float16, bfloat16, float32 or float64"),
    ("dt-shape", ValueError, r"dt must have shape \(2, 37, 4\)"),
    ("A-shape", ValueError, r"A must have shape \(4,\)"),
    ("B-dtype", TypeError, r"B must be torch.float32 .*got torch.int64"),
    ("B-groups", ValueError, r"B has g=3 groups, which must divide the h=4 heads"),
    ("C-shape", ValueError, r"B and C must have the same shape"),
    ("D-shape", ValueError, r"D must have shape \(4, 5\) \(h, p\) or \(4,\) \(h,\)"),
    ("z-shape", ValueError, r"z must have the shape of x"),
    ("initial_states-shape", ValueError, r"initial_states must have shape"),
    ("seq_idx-dtype", TypeError, r"seq_idx must be int32 or int64"),
    ("chunk_size-zero", ValueError, r"chunk_size must be an int >= 1, got 0"),
    ("chunk_size-bool", ValueError, r"chunk_size must be an int >= 1, got True"),
    ("chunk_size-float", ValueError, r"chunk_size must be an int >= 1, got 8.0"),
]


@pytest.mark.parametrize("name,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, error, match):
    inputs = _bad(make_inputs(CASES[1], torch.float32), name)
    with pytest.raises(error, match=match):
        rnnkern.mamba_chunk_scan(**inputs)


@pytest.mark.parametrize("name,match", [
    ("dt-shape", r"mamba_chunk_scan_fwd: dt must have shape \[2, 37, 4\]"),
    ("B-groups", r"mamba_chunk_scan_fwd: B must have shape \(2, 37, g, n\) with g dividing h = 4, got \[2, 37, 3, 3\]"),
    ("seq_idx-int64", r"mamba_chunk_scan_fwd: seq_idx must be Int, got Long"),
    ("chunk_size-zero", r"mamba_chunk_scan_fwd: chunk_size must be >= 1, got 0"),
])
def test_kernel_checks_its_arguments(name, match):
    """A direct call of the compiled op fails with a message naming the argument, reading nothing."""
    forward = MAMBA_CHUNK_SCAN.function("cpu", "mamba_chunk_scan_fwd")  # the installed package has rnnkern._C
    inputs = make_inputs(CASES[1], torch.float32)
    inputs["dt"] = inputs["dt"].float()
    if name == "seq_idx-int64":
        inputs["seq_idx"] = inputs["seq_idx"].long()
    else:
        inputs = _bad(inputs, name)
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "initial_states", "seq_idx", "chunk_size")]
    with pytest.raises(RuntimeError, match=match):
        forward(*args, True)
