"""lstm_layer / gru_layer and their cells: every backend against the reference, the
reference against torch.nn in fp64."""
import functools

import pytest
import torch

import rnnkern
from rnnkern.ops._sequences import STEP_KERNEL_MAX_BATCH
from tests.conftest import backend_params, ran_op
from tests.ops.recurrent import GRU, KINDS, LSTM, lengths_tensor, outputs_and_grads, random_weights
from tests.tolerances import TOLERANCES, assert_close

DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
# (B, T, I, H, P, lengths, reverse): awkward sizes, packed lengths (unsorted, with 0 and T)
CONFIGS = {
    "B3-T7-I5-H4": (3, 7, 5, 4, 0, None, False),
    "B4-T6-I3-H5-lengths-reverse": (4, 6, 3, 5, 0, [6, 2, 0, 5], True),
    "B2-T5-I4-H6-P3-lengths": (2, 5, 4, 6, 3, [3, 5], False),
    "B1-T1-I2-H3": (1, 1, 2, 3, 0, None, False),
}


def configs_of(kind) -> dict:
    """The configurations that apply to `kind` (GRU has no projection)."""
    return {name: c for name, c in CONFIGS.items() if kind is LSTM or not c[4]}


def kind_id(kind):
    return kind.name


def backends(kind):
    return backend_params(kind.layer_op)


def case_inputs(kind, config, dtype, device, seed=0):
    batch, steps, features, hidden, proj, lengths, reverse = config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, steps, features), generator=gen, dtype=torch.float64).to(device, dtype)
    states = kind.states(batch, hidden, proj, dtype, device, gen)
    weights = random_weights(kind, features, hidden, proj, dtype, device, gen)
    return x, states, weights, dict(lengths=lengths_tensor(lengths, device), reverse=reverse)


def force_triton_path(monkeypatch, kind, path: str) -> None:
    """Makes the layer op's Triton launchers run `path` ("persistent" or "alternating")."""
    for part in ("fwd", "bwd"):
        name = f"{kind.name}_layer_{part}"
        monkeypatch.setattr(kind.triton, name, functools.partial(getattr(kind.triton, name), path=path))


def assert_all_close(actual: dict, expected: dict, dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert_close(actual[name], expected[name], dtype, name)


# --- reference against torch.nn ---------------------------------------------------------


def torch_nn_outputs_and_grads(kind, module, x, states, direction, lengths, seed=7) -> dict:
    """Same outputs and gradients as outputs_and_grads, from a bidirectional torch.nn module."""
    leaves = [t.detach().requires_grad_() for t in [x, *states]]
    both = [torch.stack([s, s]) for s in leaves[1:]]  # the same initial state for both directions
    hx = tuple(both) if kind is LSTM else both[0]
    inp = leaves[0]
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(inp, lengths.clamp(min=1).cpu(), batch_first=True,
                                                      enforce_sorted=False)
    out, finals = module(inp, hx)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    finals = list(finals) if kind is LSTM else [finals]
    width = out.shape[-1] // 2
    outs = [out[..., direction * width:(direction + 1) * width]] + [f[direction] for f in finals]
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    params = kind.weights(module, direction)
    grads = torch.autograd.grad(outs, leaves + params, cotangents)
    result = dict(zip(["y", "h_T", "c_T"][: len(outs)], outs))
    result.update({f"grad_{i}": g for i, g in enumerate(grads)})
    return result


# torch.nn cannot pack empty sequences: those configurations are compared backend to backend
TORCH_NN_CASES = [
    pytest.param(kind, config, id=f"{kind.name}-{name}")
    for kind in KINDS for name, config in configs_of(kind).items() if config[5] is None or 0 not in config[5]
]


@pytest.mark.parametrize("direction", [0, 1], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind,config", TORCH_NN_CASES)
def test_reference_matches_torch_nn(kind, config, direction):
    batch, steps, features, hidden, proj, lengths, _ = config
    torch.manual_seed(0)
    module = kind.module(features, hidden, proj, bidirectional=True).double()
    x, states, _, opts = case_inputs(kind, config, torch.float64, "cpu")
    expected = torch_nn_outputs_and_grads(kind, module, x, states, direction, opts["lengths"])
    actual = outputs_and_grads(kind, x, states, kind.weights(module, direction), lengths=opts["lengths"],
                               reverse=bool(direction), backend="reference")
    assert_all_close(actual, expected, torch.float64)


# --- every backend against the reference ------------------------------------------------


def _params(kind):
    return [pytest.param(kind, *p.values, id=f"{kind.name}-{p.id}", marks=p.marks) for p in backends(kind)]


ALL_BACKENDS = _params(LSTM) + _params(GRU)


BACKEND_CONFIGS = [
    pytest.param(*p.values, config, id=f"{p.id}-{name}", marks=p.marks)
    for p in ALL_BACKENDS for name, config in configs_of(p.values[0]).items()
]


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind,device,backend,config", BACKEND_CONFIGS)
def test_matches_reference(kind, device, backend, config, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton backend: float64 is not supported")
    x, states, weights, opts = case_inputs(kind, config, dtype, device)
    assert_all_close(outputs_and_grads(kind, x, states, weights, backend=backend, **opts),
                     outputs_and_grads(kind, x, states, weights, backend="reference", **opts), dtype)


@pytest.mark.parametrize("kind,device,backend", ALL_BACKENDS)
def test_without_biases_or_states(kind, device, backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, generator=gen).to(device)
    weights = random_weights(kind, 3, 5, 0, torch.float32, device, gen, bias=False)
    if kind is LSTM:
        y, (h, c) = rnnkern.lstm_layer(x, None, *weights, backend=backend)
        y_ref, (h_ref, c_ref) = rnnkern.lstm_layer(x, None, *weights, backend="reference")
        got, want = [y, h, c], [y_ref, h_ref, c_ref]
    else:
        y, h = rnnkern.gru_layer(x, None, *weights, backend=backend)
        y_ref, h_ref = rnnkern.gru_layer(x, None, *weights, backend="reference")
        got, want = [y, h], [y_ref, h_ref]
    for name, g, w in zip(["y", "h", "c"], got, want):
        assert_close(g, w, torch.float32, name)


@pytest.mark.parametrize("kind,device,backend", ALL_BACKENDS)
def test_steps_one_at_a_time_equal_the_sequence(kind, device, backend):
    """The streaming API: T=1 calls carrying the state reproduce the full sequence."""
    x, states, weights, _ = case_inputs(kind, (2, 6, 3, 5, 0, None, False), torch.float32, device)
    full = kind.layer(x, states, weights, backend=backend)
    carried, steps = states, []
    for t in range(x.shape[1]):
        out = kind.layer(x[:, t:t + 1], carried, weights, backend=backend)
        steps.append(out[0])
        carried = out[1:]
    assert_close(torch.cat(steps, dim=1), full[0], torch.float32, "y")
    for name, got, want in zip(["h", "c"], carried, full[1:]):
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("kind,device,backend", ALL_BACKENDS)
def test_cell_equals_torch_nn_cell(kind, device, backend):
    torch.manual_seed(0)
    cell = (torch.nn.LSTMCell if kind is LSTM else torch.nn.GRUCell)(4, 6).to(device)
    x = torch.randn(3, 4, device=device)
    states = kind.states(3, 6, 0, torch.float32, device, torch.Generator().manual_seed(1))
    weights = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    got = kind.cell(x, states, weights, backend=backend)
    want = cell(x, tuple(states) if kind is LSTM else states[0])
    want = list(want) if kind is LSTM else [want]
    for name, g, w in zip(["h", "c"], got, want):
        assert_close(g, w, torch.float32, name)


GRADCHECK_CASES = [
    pytest.param(kind, *p.values[1:], name, id=f"{p.id}-{name}", marks=p.marks)
    for kind in KINDS for p in _params(kind) if p.values[2] in ("reference", "cpu") and p.values[1] == "cpu"
    for name in ("B4-T6-I3-H5-lengths-reverse", "B2-T5-I4-H6-P3-lengths") if name in configs_of(kind)
]


@pytest.mark.parametrize("kind,device,backend,config", GRADCHECK_CASES)
def test_gradcheck_fp64(kind, device, backend, config):
    batch, steps, features, hidden, proj, lengths, reverse = CONFIGS[config]
    x, states, weights, opts = case_inputs(kind, (batch, 3, features, 3, min(proj, 2), None, reverse),
                                           torch.float64, "cpu")
    opts["lengths"] = lengths_tensor([min(n, 3) for n in lengths] if lengths else None, "cpu")
    tensors = [t.requires_grad_() for t in [x, *states, *weights]]
    n_states = len(states)

    def layer(x, *rest):
        return tuple(kind.layer(x, list(rest[:n_states]), list(rest[n_states:]), backend=backend, **opts))

    assert torch.autograd.gradcheck(layer, tensors)


@pytest.mark.parametrize("kind,device,backend", ALL_BACKENDS)
def test_opcheck(kind, device, backend):
    x, states, weights, _ = case_inputs(kind, (2, 4, 3, 5, 0, None, False), torch.float32, device)
    gx = torch.nn.functional.linear(x, weights[0], weights[2]).detach()
    lengths = torch.tensor([4, 2], device=device)
    if kind is LSTM:
        op, args = torch.ops.rnnkern.lstm_layer.default, (gx, *states, weights[1], None)
    else:
        op, args = torch.ops.rnnkern.gru_layer.default, (gx, states[0], weights[1], weights[3])
    for lens, reverse in ((None, False), (lengths, True)):
        torch.library.opcheck(op, (*args, lens, reverse, True, backend))
    torch.library.opcheck(op, (*args, None, False, False, backend),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind,device,backend", ALL_BACKENDS)
def test_compile_fullgraph_forward_and_backward(kind, device, backend):
    x, states, weights, opts = case_inputs(kind, CONFIGS["B4-T6-I3-H5-lengths-reverse"], torch.float32, device)

    def loss(x, *weights):
        return sum(o.square().sum() for o in kind.layer(x.tanh(), states, list(weights), backend=backend, **opts))

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.clone().requires_grad_() for t in [x, *weights]]
    compiled_leaves = [t.clone().requires_grad_() for t in [x, *weights]]
    loss(*eager_leaves).backward()
    compiled(*compiled_leaves).backward()
    for eager, traced in zip(eager_leaves, compiled_leaves):
        assert_close(traced.grad, eager.grad, torch.float32, "gradient")


WORKSPACE_PATHS = [
    pytest.param(*p.values, path, id=f"{p.id}-{path}" if path else p.id, marks=p.marks)
    for p in ALL_BACKENDS for path in (["persistent", "alternating"] if p.values[2] == "triton" else [None])
]


@pytest.mark.parametrize("kind,device,backend,path", WORKSPACE_PATHS)
def test_inference_keeps_no_workspace_and_matches_training(kind, device, backend, path, monkeypatch):
    if path:
        force_triton_path(monkeypatch, kind, path)
    x, states, weights, opts = case_inputs(kind, CONFIGS["B4-T6-I3-H5-lengths-reverse"], torch.float32, device)
    with torch.no_grad():
        inference = kind.layer(x, states, weights, backend=backend, **opts)
    training = kind.layer(x, states, [w.requires_grad_() for w in weights], backend=backend, **opts)
    for name, got, want in zip(["y", "h", "c"], inference, training):
        assert_close(got, want, torch.float32, name)
    # the forward kernel itself: the backward's workspace (last two outputs) only when training
    forward = kind.layer_op.function(backend, f"{kind.name}_layer_fwd")
    gx = torch.randn((4, 6, kind.gates * 5), device=device)
    w_hh = weights[1].detach()
    args = [gx, *states, w_hh, None] if kind is LSTM else [gx, states[0], w_hh, weights[3].detach()]
    args += [opts["lengths"], opts["reverse"]]
    for training in (False, True):
        *_, first, second = forward(*args, training)
        expected_rows = 4 if training else 0
        assert first.shape[0] == expected_rows and second.shape[0] == expected_rows


# --- bad input ---------------------------------------------------------------------------


def _lstm_args(**overrides):
    gen = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 5, 3), hx=(torch.zeros(2, 4), torch.zeros(2, 4)),
                w_ih=torch.randn(16, 3, generator=gen), w_hh=torch.randn(16, 4, generator=gen),
                b_ih=torch.zeros(16), b_hh=torch.zeros(16))
    args.update(overrides)
    return args


BAD_LSTM_INPUTS = {
    "x-2d": (dict(x=torch.randn(5, 3)), ValueError, r"x must have shape \(B, T, I\), got shape \(5, 3\)"),
    "x-int": (dict(x=torch.ones(2, 5, 3, dtype=torch.int64)), TypeError, r"x must be float16.*got torch\.int64"),
    "feature-size": (dict(x=torch.randn(2, 5, 7)), ValueError, r"w_ih must have shape \(16, 7\), got \(16, 3\)"),
    "w-hh-rows": (dict(w_hh=torch.randn(15, 4)), ValueError, r"w_hh must have shape \(4H, P\).*not a multiple of 4"),
    "h0-shape": (dict(hx=(torch.zeros(3, 4), torch.zeros(2, 4))), ValueError, r"h0 must have shape \(2, 4\), got \(3, 4\)"),
    "c0-shape": (dict(hx=(torch.zeros(2, 4), torch.zeros(2, 5))), ValueError, r"c0 must have shape \(2, 4\), got \(2, 5\)"),
    "hx-not-tuple": (dict(hx=torch.zeros(2, 4)), TypeError, r"hx must be a tuple \(h0, c0\) or None, got Tensor"),
    "mixed-dtypes": (dict(w_hh=torch.randn(16, 4, dtype=torch.float64)), TypeError, r"w_hh must have the input's dtype \(torch\.float32\), got torch\.float64"),
    "mixed-devices": (dict(b_ih=torch.zeros(16, device="meta")), ValueError, r"b_ih must be on the input's device \(cpu\), got meta"),
    "lengths-shape": (dict(lengths=torch.tensor([5])), ValueError, r"lengths must have shape \(2,\), got \(1,\)"),
    "lengths-range": (dict(lengths=torch.tensor([5, 6])), ValueError, r"lengths must lie in \[0, T=5\], got values in \[5, 6\]"),
    "lengths-dtype": (dict(lengths=torch.tensor([5.0, 2.0])), TypeError, r"lengths must be int32 or int64, got torch\.float32"),
    "proj-without-w-hr": (dict(w_hh=torch.randn(16, 2), hx=None), ValueError, r"w_hh has 2 columns but the hidden size is 4: pass w_hr \(2, 4\)"),
    "unknown-backend": (dict(backend="cudnn"), ValueError, r"unknown backend 'cudnn'"),
}


@pytest.mark.parametrize("case", BAD_LSTM_INPUTS.values(), ids=BAD_LSTM_INPUTS.keys())
def test_lstm_bad_input_is_a_clear_error(case):
    overrides, error, message = case
    args = _lstm_args(**overrides)
    with pytest.raises(error, match=message):
        rnnkern.lstm_layer(args.pop("x"), args.pop("hx"), args.pop("w_ih"), args.pop("w_hh"), **args)


BAD_GRU_INPUTS = {
    "feature-size": (dict(x=torch.randn(2, 5, 7)), ValueError, r"w_ih must have shape \(12, 7\), got \(12, 3\)"),
    "w-hh-shape": (dict(w_hh=torch.randn(12, 5)), ValueError, r"w_hh must have shape \(15, 5\), got \(12, 5\)"),
    "h0-shape": (dict(h0=torch.zeros(2, 3)), ValueError, r"h0 must have shape \(2, 4\), got \(2, 3\)"),
    "mixed-dtypes": (dict(h0=torch.zeros(2, 4, dtype=torch.float16)), TypeError, r"h0 must have the input's dtype"),
    "cell-x-3d": (dict(cell=True), ValueError, r"x must have shape \(B, I\), got shape \(2, 5, 3\)"),
}


@pytest.mark.parametrize("case", BAD_GRU_INPUTS.values(), ids=BAD_GRU_INPUTS.keys())
def test_gru_bad_input_is_a_clear_error(case):
    overrides, error, message = case
    gen = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 5, 3), h0=torch.zeros(2, 4), w_ih=torch.randn(12, 3, generator=gen),
                w_hh=torch.randn(12, 4, generator=gen))
    cell = overrides.pop("cell", False)
    args.update(overrides)
    with pytest.raises(error, match=message):
        (rnnkern.gru_cell if cell else rnnkern.gru_layer)(*args.values())


# --- realistic sizes in low precision ------------------------------------------------------

# Outputs, final states and the gradients of x and the initial states, each a value rounded once
# to bf16, stay within two bf16 ulps of the fp64 reference at these sizes. The weight gradients
# are sums over B * T = 1024 steps whose terms cancel: their error is relative to the terms, not
# to the sum, so they are compared at the small sizes above (backend against the reference in
# the same dtype).
@pytest.mark.parametrize("kind,device,backend", [p for p in ALL_BACKENDS if p.values[2] == "cpu"])
def test_bf16_at_realistic_size_against_fp64(kind, device, backend):
    gen = torch.Generator().manual_seed(0)
    batch, steps, hidden = 16, 64, 256
    x = torch.randn((batch, steps, hidden), generator=gen, dtype=torch.float64).bfloat16()
    states = [s.bfloat16() for s in kind.states(batch, hidden, 0, torch.float64, device, gen)]
    weights = [w.bfloat16() for w in random_weights(kind, hidden, hidden, 0, torch.float64, device, gen)]
    got = outputs_and_grads(kind, x, states, weights, backend=backend)
    want = outputs_and_grads(kind, x.double(), [s.double() for s in states], [w.double() for w in weights],
                             backend="reference")
    leaves = 1 + len(states)  # x and the initial states: their gradients come first
    for name in ["y", "h_T", "c_T"][:leaves] + [f"grad_{i}" for i in range(leaves)]:
        assert got[name].dtype == torch.bfloat16, name
        assert_close(got[name], want[name], torch.bfloat16, name)


# --- both Triton paths -------------------------------------------------------------------

TRITON = [p for p in ALL_BACKENDS if p.values[2] == "triton"]


@pytest.mark.parametrize("path", ["persistent", "alternating"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind,device,backend", TRITON)
def test_triton_paths_match_reference(kind, device, backend, dtype, path, monkeypatch):
    force_triton_path(monkeypatch, kind, path)
    config = (3, 5, 4, 20, 17 if kind is LSTM else 0, [5, 0, 3], True)  # H, P not powers of two
    x, states, weights, opts = case_inputs(kind, config, dtype, device)
    assert_all_close(outputs_and_grads(kind, x, states, weights, backend=backend, **opts),
                     outputs_and_grads(kind, x, states, weights, backend="reference", **opts), dtype)


# --- the cpu backend's one-token step kernels ---------------------------------------------

CPU = [p for p in ALL_BACKENDS if p.values[2] == "cpu"]


def _ran_step_kernel(kind, run) -> bool:
    return ran_op(f"rnnkern_C::{kind.name}_step", run)


@pytest.mark.parametrize("batch", [1, 3, STEP_KERNEL_MAX_BATCH, STEP_KERNEL_MAX_BATCH + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind,device,backend", CPU)
def test_one_token_step_kernel_matches_reference(kind, device, backend, bias, dtype, batch):
    """T = 1 without autograd takes the step kernel up to its batch limit (H = 130: not a
    multiple of the 4-row blocks or of the thread split), and above it the sequence kernel."""
    gen = torch.Generator().manual_seed(batch)
    weights = random_weights(kind, 7, 130, 0, dtype, device, gen, bias=bias)
    x = torch.randn((batch, 1, 7), generator=gen, dtype=torch.float64).to(device, dtype)
    states = kind.states(batch, 130, 0, dtype, device, gen)
    with torch.no_grad():
        got = kind.layer(x, states, weights, backend=backend)
        want = kind.layer(x, states, weights, backend="reference")
        took_step_kernel = _ran_step_kernel(kind, lambda: kind.layer(x, states, weights, backend=backend))
    assert took_step_kernel == (batch <= STEP_KERNEL_MAX_BATCH)
    for name, g, w in zip(["y", "h", "c"], got, want):
        assert_close(g, w, dtype, name)
    assert got[0].data_ptr() != got[1].data_ptr(), "y must not alias h_T"


@pytest.mark.parametrize("kind,device,backend", CPU)
def test_one_token_step_with_autograd_takes_the_sequence_kernel(kind, device, backend):
    gen = torch.Generator().manual_seed(0)
    weights = [w.requires_grad_() for w in random_weights(kind, 3, 5, 0, torch.float32, device, gen)]
    x = torch.randn((2, 1, 3), generator=gen)
    states = kind.states(2, 5, 0, torch.float32, device, gen)
    assert not _ran_step_kernel(kind, lambda: kind.layer(x, states, weights, backend=backend))


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_step_kernel_rejects_bad_input(kind):
    import rnnkern._C  # noqa: F401  (registers the rnnkern_C ops)

    gates = kind.gates * 4
    args = [torch.randn(2, 3), torch.zeros(2, 4)] + ([torch.zeros(2, 4)] if kind is LSTM else [])
    step = getattr(torch.ops.rnnkern_C, f"{kind.name}_step")
    with pytest.raises(RuntimeError, match=r"w_hh must have shape \[%d, 4\], got \[%d, 5\]" % (gates, gates)):
        step(*args, torch.randn(gates, 3), torch.randn(gates, 5), None, None)
    with pytest.raises(RuntimeError, match=r"x must be float32 or float64, got BFloat16"):
        step(args[0].bfloat16(), *args[1:], torch.randn(gates, 3), torch.randn(gates, 4), None, None)
    with pytest.raises(RuntimeError, match=r"x \[3, 3\] and h \[2, 4\] must hold the same number of rows"):
        step(torch.randn(3, 3), *args[1:], torch.randn(gates, 3), torch.randn(gates, 4), None, None)


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_step_kernel_keeps_leading_dimensions(kind):
    """x (..., I) and the states (..., H) may carry any leading dimensions around their B rows
    (a module's (1, B, I) and (1, B, H)): y comes back shaped like x, the states like the old."""
    import rnnkern._C  # noqa: F401  (registers the rnnkern_C ops)

    gen = torch.Generator().manual_seed(3)
    gates, batch = kind.gates * 4, 3
    weights = [torch.randn(gates, 5, generator=gen), torch.randn(gates, 4, generator=gen), None, None]
    x = torch.randn(batch, 5, generator=gen)
    states = [torch.randn(batch, 4, generator=gen) for _ in range(2 if kind is LSTM else 1)]
    step = getattr(torch.ops.rnnkern_C, f"{kind.name}_step")
    flat = step(x, *states, *weights)
    shaped = step(x[None], *[s[None] for s in states], *weights)
    assert flat[0].shape == (batch, 4) and shaped[0].shape == (1, batch, 4)
    for got, want in zip(shaped, flat):
        assert got.shape == (1, *want.shape)
        assert torch.equal(got[0], want)


# --- the Triton kernels' tiles, launches and path choice ------------------------------------

# (B, T, H, P, lengths, reverse): B = 40 spans two sequence tiles of 32 (alternating) and three of
# 16 (persistent); H = 96 (alternating, three column tiles), H = 40 (persistent, padded to 64)
TILE_CONFIGS = {
    "alternating-B40-H96": (40, 4, 96, 0, None, False),
    "alternating-B40-H96-P80-lengths-reverse": (40, 4, 96, 80, "random", True),
    "persistent-B40-H40": (40, 4, 40, 0, "random", True),
    "persistent-B40-H40-P24": (40, 4, 40, 24, None, False),
}
TILE_CASES = [
    pytest.param(*p.values, name, dtype, id=f"{p.id}-{name}-{DTYPE_IDS[dtype]}",
                 marks=[*p.marks] + ([pytest.mark.slow] if dtype != torch.float32 else []))
    for p in TRITON for name, config in TILE_CONFIGS.items() if p.values[0] is LSTM or not config[3]
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


def default_path(kind, hidden, proj=0, dtype=torch.float32, device=torch.device("cpu")) -> str:
    """The path the Triton launchers pick for these sizes on `device`."""
    if kind is LSTM:
        return kind.triton.choose_path(hidden, proj, dtype, device)
    return kind.triton.choose_path(hidden, dtype, device)


def tile_inputs(kind, name, dtype, device):
    batch, steps, hidden, proj, lengths, reverse = TILE_CONFIGS[name]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((batch, steps, 8), generator=gen, dtype=torch.float64)
    states = kind.states(batch, hidden, proj, torch.float64, device, gen)
    weights = random_weights(kind, 8, hidden, proj, torch.float64, device, gen)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen) if lengths else None
    return [x, *states], weights, dict(lengths=lengths, reverse=reverse)


def _in(dtype, tensors, device="cpu"):
    return [t if t is None else t.to(device, dtype) for t in tensors]


def _tolerance_units(actual, expected, dtype) -> float:
    """max |actual - expected| / (atol + rtol |expected|) with the table's tolerance of `dtype`."""
    rtol, atol = TOLERANCES[dtype]
    return ((actual.double() - expected.double()).abs() / (atol + rtol * expected.double().abs())).max().item()


@pytest.mark.parametrize("kind,device,backend,name,dtype", TILE_CASES)
def test_triton_tiles_match_reference(kind, device, backend, name, dtype, monkeypatch):
    """Several programs along the batch and the hidden units, on the path the sizes pick.

    In fp32 everything is compared with the reference. In fp16/bf16 the outputs, final states
    and the gradients of x and the initial states are compared with the reference in the same
    dtype; the weight gradients, sums over B * T terms that cancel (their error is relative to
    the terms), are compared with fp64: their error may exceed the reference's own error in
    that dtype by at most one tolerance of the table (the kernels' 16-bit GEMM operands round
    d_gates where the reference multiplies fp32)."""
    path = name.split("-")[0]
    assert default_path(kind, *TILE_CONFIGS[name][2:4]) == path
    force_triton_path(monkeypatch, kind, path)  # the same path on a device with little shared memory
    leaves, weights, opts = tile_inputs(kind, name, dtype, device)
    x, *states = _in(dtype, leaves, device)
    got = outputs_and_grads(kind, x, states, _in(dtype, weights, device), backend=backend, **opts)
    want = outputs_and_grads(kind, x, states, _in(dtype, weights, device), backend="reference", **opts)
    if dtype == torch.float32:
        assert_all_close(got, want, dtype)
        return
    exact = ["y", "h_T", "c_T"][: len(leaves)] + [f"grad_{i}" for i in range(len(leaves))]
    assert_all_close({k: got[k] for k in exact}, {k: want[k] for k in exact}, dtype)
    truth = outputs_and_grads(kind, leaves[0], leaves[1:], weights, backend="reference", **opts)
    for key in sorted(set(got) - set(exact)):
        assert got[key].dtype == dtype, key
        allowed = _tolerance_units(want[key], truth[key], dtype) + 1.0
        assert _tolerance_units(got[key], truth[key], dtype) <= allowed, key


# per path and projection: (forward launches, backward launches) of a layer call with T steps
EXPECTED_LAUNCHES = {
    ("persistent", False): lambda steps: (1, 1),
    ("persistent", True): lambda steps: (1, 1),
    ("alternating", False): lambda steps: (steps, steps + 1),
    ("alternating", True): lambda steps: (2 * steps, steps + 1),  # the projection: a second kernel per step
}


_TRITON_WITH_PROJ = [pytest.param(*p.values, proj, id=f"{p.id}-{'proj' if proj else 'no-proj'}", marks=p.marks)
                     for p in TRITON for proj in ((0, 3) if p.values[0] is LSTM else (0,))]  # GRU has no projection


@pytest.mark.parametrize("path", ["persistent", "alternating"])
@pytest.mark.parametrize("kind,device,backend,proj", _TRITON_WITH_PROJ)
def test_triton_launches_per_layer_call(kind, device, backend, path, proj, monkeypatch):
    """Every kernel launch of a forward and a backward, recorded as it runs: one fused launch
    per step on the alternating path in each direction (plus one finishing the backward)."""
    from rnnkern import aot

    force_triton_path(monkeypatch, kind, path)
    monkeypatch.setenv("RNNKERN_STEP_GRAPHS", "0")  # on CUDA: the launches themselves, not a graph's replay
    steps = 5
    x, states, weights, opts = case_inputs(kind, (3, steps, 4, 6, proj, [5, 2, 4], True), torch.float32, device)
    leaves = [w.requires_grad_() for w in weights if w is not None]
    with aot.recording([f"rnnkern.ops.{kind.name}.triton"], run=True) as forward:
        outputs = kind.layer(x, states, weights, backend=backend, **opts)
    with aot.recording([f"rnnkern.ops.{kind.name}.triton"], run=True) as backward:
        torch.autograd.grad(sum(o.sum() for o in outputs), leaves)
    assert (len(forward), len(backward)) == EXPECTED_LAUNCHES[(path, bool(proj))](steps)
    assert {launch.kernel_name.split("_")[2] for launch in forward} == {"fwd"} | ({"proj"} if proj and path ==
                                                                               "alternating" else set())
    assert {launch.kernel_name.split("_")[2] for launch in backward} == {"bwd"}


def _fake_device_shared_memory(monkeypatch, shared_bytes):
    """Makes cuda:0 report `shared_bytes` of shared memory per block (no CUDA call is made)."""
    from rnnkern.ops import _triton

    monkeypatch.setattr(_triton, "_cuda_shared_memory_per_block", lambda index: shared_bytes)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_path_takes_the_devices_shared_memory(kind, monkeypatch):
    """H = 64 in fp32: both directions persistent where their shared memory fits (H100's 227 KB);
    on a device with 99 KB per block (sm_86/sm_89) the forward stays persistent and the backward,
    which stages more, is alternating; bf16 halves the weights."""
    pytest.importorskip("triton")

    def path(hidden, shared_bytes, backward, dtype=torch.float32):
        device = _fake_device_shared_memory(monkeypatch, shared_bytes)
        if kind is LSTM:
            return kind.triton.choose_path(hidden, 0, dtype, device, backward=backward)
        return kind.triton.choose_path(hidden, dtype, device, backward=backward)

    assert [path(64, 227 * 1024, backward) for backward in (False, True)] == ["persistent"] * 2
    assert [path(64, 99 * 1024, backward) for backward in (False, True)] == ["persistent", "alternating"]
    assert path(64, 99 * 1024, True, torch.bfloat16) == "persistent"
    assert path(32, 48 * 1024, True) == "persistent"
    assert path(65, 227 * 1024, False) == "alternating"


@pytest.mark.parametrize("optin", [101376, None], ids=["reported", "absent"])
def test_shared_memory_per_block_without_the_attribute(optin, monkeypatch):
    """torch's opt-in limit where it reports one, else the compute capability's (sm_86: 99 KB)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from rnnkern.ops import _triton

    props = SimpleNamespace(major=8, minor=6, **({"shared_memory_per_block_optin": optin} if optin else {}))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    _triton._cuda_shared_memory_per_block.cache_clear()
    try:
        assert _triton._cuda_shared_memory_per_block(0) == (optin or 99 * 1024)
    finally:
        _triton._cuda_shared_memory_per_block.cache_clear()


@pytest.mark.parametrize("spoil,match", [
    (lambda w: w[:7], "expected 4 weights per layer for 2 layers, got 7"),
    (lambda w: w[:5] + [None] + w[6:], r"weight 5 \(w_ih or w_hh of layer 1\) is required, got None"),
], ids=["count", "missing-w_hh"])
def test_stack_step_weights_are_checked(spoil, match):
    import rnnkern._C
    lstm = rnnkern.nn.LSTM(8, 8, num_layers=2).eval()
    weights = [getattr(lstm, f"{name}_l{layer}") for layer in range(2)
               for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    x, h = torch.randn(1, 3, 8), torch.zeros(2, 3, 8)
    with pytest.raises(RuntimeError, match="lstm_stack_step: " + match):
        rnnkern._C.lstm_stack_step(x, h, h, spoil(weights))
