"""rnnkern.nn.LSTM / GRU / LSTMCell / GRUCell against torch.nn: parameters, state_dicts,
outputs and the gradients of every input, state and parameter (fp64), PackedSequence,
unbatched input, streaming, dropout, torch.compile and bad input."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkern.nn
from rnnkern.ops.gru import GRU_LAYER
from rnnkern.ops.lstm import LSTM_LAYER
from tests.conftest import backend_params, ran_op
from tests.tolerances import assert_close

MODULES = {  # mode: (torch.nn class, rnnkern class)
    "lstm": (torch.nn.LSTM, rnnkern.nn.LSTM),
    "gru": (torch.nn.GRU, rnnkern.nn.GRU),
}
CELLS = {"lstm": (torch.nn.LSTMCell, rnnkern.nn.LSTMCell), "gru": (torch.nn.GRUCell, rnnkern.nn.GRUCell)}
INPUT_SIZE, HIDDEN_SIZE, PROJ_SIZE = 4, 6, 3
LAYER_OPS = {"lstm": LSTM_LAYER, "gru": GRU_LAYER}


def mode_backends(fp64: bool) -> list:
    """pytest params (mode, device, backend); fp64 leaves out triton, which has no fp64."""
    params = []
    for mode in MODULES:
        for param in backend_params(LAYER_OPS[mode]):
            device, backend = param.values
            if not (fp64 and backend == "triton"):
                params.append(pytest.param(mode, device, backend, id=f"{mode}-{param.id}", marks=param.marks))
    return params


def make_pair(mode, device, backend, dtype=torch.float64, seed=0, **config):
    """(torch.nn module, rnnkern module) with the same weights, both in training mode."""
    torch_cls, rnnkern_cls = MODULES[mode]
    torch.manual_seed(seed)
    expected = torch_cls(INPUT_SIZE, HIDDEN_SIZE, **config, device=device, dtype=dtype)
    actual = rnnkern_cls(INPUT_SIZE, HIDDEN_SIZE, **config, device=device, dtype=dtype, backend=backend)
    actual.load_state_dict(expected.state_dict(), strict=True)
    return expected, actual


def random_states(module, batch, device, dtype, seed=1) -> list:
    """Random initial states [h_0] or [h_0, c_0], each (L * D, B, size) ((L * D, size) for batch=None)."""
    gen = torch.Generator().manual_seed(seed)
    stacked = module.num_layers * (2 if module.bidirectional else 1)
    sizes = [module.hidden_size]
    if isinstance(module, (torch.nn.LSTM, rnnkern.nn.LSTM)):
        sizes = [module.proj_size or module.hidden_size, module.hidden_size]
    shapes = [(stacked, size) if batch is None else (stacked, batch, size) for size in sizes]
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype) for shape in shapes]


def outputs_and_grads(module, x, states, to_input=None, seed=7) -> dict:
    """Outputs and the gradients of x, the states and every parameter under fixed random
    cotangents. `to_input` turns the leaf x into the module's input (e.g. packs it)."""
    x = x.detach().requires_grad_()
    states = [s.detach().requires_grad_() for s in states]
    hx = None if not states else (tuple(states) if len(states) == 2 else states[0])
    output, finals = module(x if to_input is None else to_input(x), hx)
    finals = list(finals) if isinstance(finals, tuple) else [finals]
    outputs = {"output": output.data if isinstance(output, PackedSequence) else output}
    outputs.update(zip(["h_n", "c_n"], finals))
    params = dict(module.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs.values()]
    inputs = {"input": x, **{f"hx[{i}]": s for i, s in enumerate(states)}, **params}
    grads = torch.autograd.grad(list(outputs.values()), list(inputs.values()), cotangents)
    return {**outputs, **{f"grad {name}": grad for name, grad in zip(inputs, grads)}}


def assert_all_close(actual: dict, expected: dict, dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert actual[name].dtype == expected[name].dtype, name
        assert_close(actual[name], expected[name], dtype, name)


def sequence(batch_first, batch, steps, device, dtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, steps, INPUT_SIZE) if batch_first else (steps, batch, INPUT_SIZE)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


# --- construction: parameters, initialisation, repr, state_dict -------------------------


def config_grid(mode):
    """Every combination of the constructor's options (3 layers run dropout in eval mode)."""
    for layers, bidirectional, batch_first, bias in itertools.product((1, 2, 3), (False, True), (False, True),
                                                                      (True, False)):
        for proj_size in (0, PROJ_SIZE) if mode == "lstm" else (0,):
            config = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
            if proj_size:
                config["proj_size"] = proj_size
            if layers == 3:
                config["dropout"] = 0.4
            yield config


def config_id(config) -> str:
    names = {"num_layers": "L", "proj_size": "P", "dropout": "eval-drop"}
    parts = [f"{names[k]}{v}" for k, v in config.items() if k in names]
    parts += [k.replace("_", "") for k in ("bidirectional", "batch_first") if config[k]]
    return "-".join(parts + ([] if config["bias"] else ["nobias"]))


GRID = [
    pytest.param(mode, config, id=f"{mode}-{config_id(config)}") for mode in MODULES for config in config_grid(mode)
]


@pytest.mark.parametrize("mode,config", GRID)
def test_parameters_init_and_repr_match_torch_nn(mode, config):
    torch_cls, rnnkern_cls = MODULES[mode]
    torch.manual_seed(3)
    expected = torch_cls(INPUT_SIZE, HIDDEN_SIZE, **config)
    torch.manual_seed(3)
    actual = rnnkern_cls(INPUT_SIZE, HIDDEN_SIZE, **config)
    expected_params, actual_params = list(expected.named_parameters()), list(actual.named_parameters())
    assert [name for name, _ in actual_params] == [name for name, _ in expected_params]
    for (name, a), (_, e) in zip(actual_params, expected_params):
        assert a.shape == e.shape, name
        assert torch.equal(a, e), f"{name}: initialisation differs from torch.nn's"
    assert repr(actual) == repr(expected)
    shapes = [[[p.shape for p in ps] for ps in module.all_weights] for module in (actual, expected)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("mode,config", GRID)
def test_state_dict_round_trip_strict(mode, config):
    torch_cls, rnnkern_cls = MODULES[mode]
    expected = torch_cls(INPUT_SIZE, HIDDEN_SIZE, **config)
    actual = rnnkern_cls(INPUT_SIZE, HIDDEN_SIZE, **config)
    actual.load_state_dict(expected.state_dict(), strict=True)
    back = torch_cls(INPUT_SIZE, HIDDEN_SIZE, **config)
    back.load_state_dict(actual.state_dict(), strict=True)
    assert list(back.state_dict()) == list(expected.state_dict())
    for name, value in expected.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_device_dtype_and_backend_arguments():
    lstm = rnnkern.nn.LSTM(3, 5, 2, dtype=torch.float64, device="meta", backend="reference")
    assert {(p.dtype, p.device.type) for p in lstm.parameters()} == {(torch.float64, "meta")}
    assert repr(lstm) == "LSTM(3, 5, num_layers=2, backend='reference')"
    lstm.flatten_parameters()


def test_dropout_with_one_layer_warns_like_torch_nn():
    with pytest.warns(UserWarning, match="dropout=0.5 has no effect with num_layers=1"):
        rnnkern.nn.GRU(3, 5, dropout=0.5)


BAD_CONFIGS = {
    "hidden-size-zero": (dict(hidden_size=0), ValueError, r"hidden_size must be greater than zero, got 0"),
    "hidden-size-float": (dict(hidden_size=5.0), TypeError, r"hidden_size must be an int, got float"),
    "num-layers-zero": (dict(num_layers=0), ValueError, r"num_layers must be greater than zero, got 0"),
    "dropout-above-one": (dict(dropout=1.5), ValueError, r"dropout must be a probability in \[0, 1\], got 1\.5"),
    "dropout-bool": (dict(dropout=True), ValueError, r"dropout must be a probability in \[0, 1\], got True"),
    "proj-negative": (dict(proj_size=-1), ValueError, r"proj_size must be zero \(no projection\) or positive, got -1"),
    "proj-too-large": (dict(proj_size=5), ValueError, r"proj_size must be smaller than hidden_size \(5\), got 5"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_constructor_arguments(case):
    overrides, error, message = case
    with pytest.raises(error, match=message):
        rnnkern.nn.LSTM(**{"input_size": 3, "hidden_size": 5, **overrides})


# --- forward and backward against torch.nn in fp64 -------------------------------------


def grid_with_backends() -> list:
    """pytest params (mode, device, backend, config): every fp64 backend on every configuration."""
    return [
        pytest.param(mode, device, backend, config, id=f"{param.id}-{config_id(config)}", marks=param.marks)
        for param in mode_backends(fp64=True)
        for mode, device, backend in [param.values]
        for config in config_grid(mode)
    ]


@pytest.mark.parametrize("mode,device,backend,config", grid_with_backends())
def test_matches_torch_nn(mode, device, backend, config):
    expected, actual = make_pair(mode, device, backend, **config)
    if config.get("dropout"):
        expected.eval()
        actual.eval()
    x = sequence(config["batch_first"], 3, 5, device, torch.float64)
    states = random_states(expected, 3, device, torch.float64)
    assert_all_close(outputs_and_grads(actual, x, states), outputs_and_grads(expected, x, states), torch.float64)


@pytest.mark.parametrize("mode,device,backend", mode_backends(fp64=True))
def test_without_hx_starts_from_zeros(mode, device, backend):
    expected, actual = make_pair(mode, device, backend, num_layers=2, bidirectional=True)
    x = sequence(False, 2, 4, device, torch.float64)
    assert_all_close(outputs_and_grads(actual, x, []), outputs_and_grads(expected, x, []), torch.float64)


TRITON = [p for p in mode_backends(fp64=False) if p.values[2] == "triton"]


@pytest.mark.parametrize("mode,device,backend", TRITON)
def test_triton_backend_matches_torch_nn_fp32(mode, device, backend):
    config = dict(num_layers=2, bidirectional=True, proj_size=2) if mode == "lstm" else dict(num_layers=2)
    expected, actual = make_pair(mode, device, backend, dtype=torch.float32, **config)
    x = sequence(False, 2, 3, device, torch.float32)
    states = random_states(expected, 2, device, torch.float32)
    assert_all_close(outputs_and_grads(actual, x, states), outputs_and_grads(expected, x, states), torch.float32)


# --- PackedSequence ----------------------------------------------------------------------

PACKED_LENGTHS = {"unsorted": ([3, 6, 1, 4], False), "sorted": ([6, 4, 3, 1], True)}


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("lengths", PACKED_LENGTHS.values(), ids=PACKED_LENGTHS.keys())
@pytest.mark.parametrize("mode,device,backend", mode_backends(fp64=True))
def test_packed_sequence_matches_torch_nn(mode, device, backend, lengths, with_hx):
    lengths, enforce_sorted = lengths
    config = dict(num_layers=2, bidirectional=True, batch_first=True)
    if mode == "lstm":
        config["proj_size"] = PROJ_SIZE
    expected, actual = make_pair(mode, device, backend, **config)
    x = sequence(True, len(lengths), max(lengths), device, torch.float64)
    states = random_states(expected, len(lengths), device, torch.float64) if with_hx else []

    def pack(leaf):
        return pack_padded_sequence(leaf, torch.tensor(lengths), batch_first=True, enforce_sorted=enforce_sorted)

    assert_all_close(outputs_and_grads(actual, x, states, pack), outputs_and_grads(expected, x, states, pack),
                     torch.float64)
    actual_out, expected_out = actual(pack(x))[0], expected(pack(x))[0]
    for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        actual_field, expected_field = getattr(actual_out, field), getattr(expected_out, field)
        assert (actual_field is None and expected_field is None) or torch.equal(actual_field, expected_field), field


def test_packed_sequence_keeps_given_sorted_indices():
    """Equal lengths in any permutation: the output follows the input's sorted_indices."""
    expected, actual = make_pair("gru", "cpu", "reference")
    x = torch.randn(5, 3, INPUT_SIZE, dtype=torch.float64)  # (T, B, I), all of length 5
    sorted_indices = torch.tensor([2, 0, 1])
    packed = PackedSequence(x[:, sorted_indices].reshape(15, INPUT_SIZE), torch.tensor([3] * 5), sorted_indices)
    (actual_out, actual_h), (expected_out, expected_h) = actual(packed), expected(packed)
    assert torch.equal(actual_out.sorted_indices, sorted_indices)
    assert_close(actual_out.data, expected_out.data, torch.float64, "output")
    assert_close(actual_h, expected_h, torch.float64, "h_n")


# --- unbatched input ---------------------------------------------------------------------


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-first", "batch-first"])
@pytest.mark.parametrize("mode,device,backend", mode_backends(fp64=True))
def test_unbatched_input_matches_torch_nn(mode, device, backend, batch_first, with_hx):
    expected, actual = make_pair(mode, device, backend, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = sequence(True, 1, 5, device, torch.float64)[0]  # (T, I)
    states = random_states(expected, None, device, torch.float64) if with_hx else []
    assert_all_close(outputs_and_grads(actual, x, states), outputs_and_grads(expected, x, states), torch.float64)


# --- streaming and dropout ------------------------------------------------------------------


@pytest.mark.parametrize("mode,device,backend", mode_backends(fp64=True))
def test_streaming_one_step_at_a_time_equals_sequence(mode, device, backend):
    config = dict(num_layers=2, batch_first=True, **({"proj_size": PROJ_SIZE} if mode == "lstm" else {}))
    _, module = make_pair(mode, device, backend, **config)
    x = sequence(True, 3, 6, device, torch.float64)
    with torch.no_grad():
        y_all, finals_all = module(x)
        hx, steps = None, []
        for t in range(x.shape[1]):
            y_t, hx = module(x[:, t : t + 1], hx)
            steps.append(y_t)
    assert_close(torch.cat(steps, dim=1), y_all, torch.float64, "output")
    if mode == "gru":
        hx, finals_all = (hx,), (finals_all,)
    for name, step, full in zip(["h_n", "c_n"], hx, finals_all):
        assert_close(step, full, torch.float64, name)


CPU_LAYERS = [p for p in mode_backends(fp64=True) if p.values[2] == "cpu"]


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_streaming_call_sees_a_replaced_weight(mode):
    """The streaming path keeps its weight list between calls; a parameter replaced after one
    (setattr of a new Parameter) is what the next call uses."""
    expected, actual = make_pair(mode, "cpu", "cpu", dtype=torch.float32, num_layers=2, batch_first=True)
    expected.eval()
    actual.eval()
    x = sequence(True, 3, 1, "cpu", torch.float32)
    weight = torch.randn_like(expected.weight_ih_l1)
    with torch.no_grad():
        actual(x)  # fills the cache
        expected.weight_ih_l1 = torch.nn.Parameter(weight.clone())  # (W_ih: from zero states W_hh does nothing)
        actual.weight_ih_l1 = torch.nn.Parameter(weight.clone())
        assert_close(actual(x)[0], expected(x)[0], torch.float32, "output")


@pytest.mark.parametrize("num_layers", [1, 3], ids=["1-layer", "3-layers"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "time-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode,device,backend", CPU_LAYERS)
def test_streaming_call_takes_the_step_kernel(mode, device, backend, dtype, batch_first, with_hx, bias, num_layers,
                                              monkeypatch):
    """A one-token call of a one-direction module goes straight to the step kernel, one call
    for a stack of layers (the module's streaming fast path, not the generic layer loop), and
    returns what torch.nn returns, in torch.nn's shapes; with dropout between layers in eval
    mode too."""
    expected, actual = make_pair(mode, device, backend, dtype=dtype, batch_first=batch_first, bias=bias,
                                 num_layers=num_layers, dropout=0.5 if num_layers > 1 else 0.0)
    expected.eval()
    actual.eval()
    monkeypatch.setattr(actual, "_run", lambda *args: pytest.fail("the generic path ran"))
    x = sequence(batch_first, 3, 1, device, dtype)
    hx = None
    if with_hx:
        states = [torch.randn(num_layers, 3, HIDDEN_SIZE, dtype=dtype) for _ in range(2 if mode == "lstm" else 1)]
        hx = tuple(states) if mode == "lstm" else states[0]
    with torch.no_grad():
        want_y, want_states = expected(x, hx)
        kernel = f"rnnkern_C::{mode}_step" if num_layers == 1 else f"rnnkern_C::{mode}_stack_step"  # one call
        assert ran_op(kernel, lambda: actual(x, hx))
        got_y, got_states = actual(x, hx)
    assert_close(got_y, want_y, dtype, "output")
    if mode == "gru":
        got_states, want_states = (got_states,), (want_states,)
    for name, got, want in zip(["h_n", "c_n"], got_states, want_states):
        assert got.shape == want.shape, name
        assert_close(got, want, dtype, name)


class _Halved(torch.nn.Module):
    def forward(self, weight):
        return 0.5 * weight


def _halve_w_hh(expected, actual):
    """A parametrization on actual's weight_hh_l0 (so it is no longer a registered parameter),
    and the same halved weight in expected."""
    torch.nn.utils.parametrize.register_parametrization(actual, "weight_hh_l0", _Halved())
    with torch.no_grad():
        expected.weight_hh_l0.mul_(0.5)


STEP_KERNEL_REFUSALS = {  # name: (options of both modules, rnnkern's own, what the test changes, under no_grad)
    "module-backend": ({}, dict(backend="reference"), None, True),
    "env-backend": ({}, {}, lambda monkeypatch, *_: monkeypatch.setenv("RNNKERN_BACKEND", "reference"), True),
    "grad-enabled": ({}, {}, None, False),
    "parametrized-weight": ({}, {}, lambda _, expected, actual: _halve_w_hh(expected, actual), True),
    # training mode: dropout (p = 1 zeroes every input after the first layer) between the layers
    "training-dropout": (dict(num_layers=2, dropout=1.0), {}, None, True),
}


@pytest.mark.parametrize("case", STEP_KERNEL_REFUSALS.values(), ids=STEP_KERNEL_REFUSALS.keys())
@pytest.mark.parametrize("mode", MODULES)
def test_streaming_call_takes_the_generic_path_where_the_step_kernel_does_not_apply(mode, case, monkeypatch):
    """The fast path's cheap checks stand in for the layer op's backend choice and conditions:
    a forced backend, gradients to keep, weights that are not plain parameters and dropout in
    training mode all go through the generic path, and the result is still torch.nn's."""
    shared, options, change, no_grad = case
    torch.manual_seed(0)
    expected = MODULES[mode][0](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **shared)
    actual = MODULES[mode][1](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **shared, **options)
    actual.load_state_dict(expected.state_dict(), strict=True)
    if change is not None:
        change(monkeypatch, expected, actual)
    generic_calls = []
    generic = actual._run
    monkeypatch.setattr(actual, "_run", lambda *args, **kwargs: generic_calls.append(1) or generic(*args, **kwargs))
    x = sequence(False, 3, 1, "cpu", torch.float64)
    with torch.set_grad_enabled(not no_grad):
        got_y, _ = actual(x)
        want_y, _ = expected(x)
    assert generic_calls, "the streaming fast path ran"
    assert got_y.requires_grad == (not no_grad)
    assert_close(got_y, want_y, torch.float64, "output")


ONE_LAYER_BAD_STEPS = {  # a one-token call of a one-layer module (input_size 3, hidden_size 4, B = 2)
    "feature-size": ("lstm", dict(input=torch.randn(1, 2, 2)), ValueError, r"LSTM: input must have input_size=3"),
    "input-dtype": ("gru", dict(input=torch.randn(1, 2, 3, dtype=torch.float64)), TypeError,
                    r"GRU: input must have the dtype of the parameters"),
    "h0-batch": ("gru", dict(hx=torch.zeros(1, 1, 4)), ValueError, r"GRU: hx \(h_0\) must have shape \(1, 2, 4\)"),
    "h0-layers": ("lstm", dict(hx=(torch.zeros(2, 2, 4), torch.zeros(1, 2, 4))), ValueError,
                  r"LSTM: hx\[0\] \(h_0\) must have shape \(1, 2, 4\), got \(2, 2, 4\)"),
    "c0-dtype": ("lstm", dict(hx=(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, dtype=torch.float64))), TypeError,
                 r"LSTM: hx\[1\] \(c_0\) must have the dtype of input"),
    "hx-not-a-pair": ("lstm", dict(hx=torch.zeros(1, 2, 4)), TypeError, r"LSTM: hx must be a tuple \(h_0, c_0\)"),
}


@pytest.mark.parametrize("case", ONE_LAYER_BAD_STEPS.values(), ids=ONE_LAYER_BAD_STEPS.keys())
@pytest.mark.parametrize("device,backend", [p.values[1:] for p in CPU_LAYERS[:1]])
def test_one_layer_streaming_call_bad_input_is_the_modules_error(case, device, backend):
    mode, overrides, error, message = case
    module = MODULES[mode][1](3, 4, backend=backend)
    kwargs = {"input": torch.randn(1, 2, 3), "hx": None, **overrides}
    with torch.no_grad(), pytest.raises(error, match=message):
        module(kwargs["input"], kwargs["hx"])


@pytest.mark.parametrize("mode,device,backend", mode_backends(fp64=True))
def test_training_dropout_one_zeroes_inputs_between_layers_like_torch_nn(mode, device, backend):
    """With p=1 dropout is deterministic: every layer after the first sees zero input."""
    expected, actual = make_pair(mode, device, backend, num_layers=3, dropout=1.0, bidirectional=True)
    x = sequence(False, 2, 4, device, torch.float64)
    states = random_states(expected, 2, device, torch.float64)
    assert_all_close(outputs_and_grads(actual, x, states), outputs_and_grads(expected, x, states), torch.float64)


@pytest.mark.parametrize("mode,device,backend", mode_backends(fp64=True))
def test_training_dropout_applies_between_layers_only(mode, device, backend):
    _, module = make_pair(mode, device, backend, num_layers=2, dropout=0.5)
    x = sequence(False, 4, 6, device, torch.float64)
    with torch.no_grad():
        train_output = module(x)[0]
        module.eval()
        eval_output = module(x)[0]
    assert not torch.equal(train_output, eval_output), "dropout had no effect in training mode"
    assert (train_output != 0).all(), "dropout was applied to the last layer's output"


# --- torch.compile --------------------------------------------------------------------------


class Stack(torch.nn.Module):
    """An LSTM feeding a GRU, with hx given to the first and not the second."""

    def __init__(self, backend):
        super().__init__()
        self.lstm = rnnkern.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, 2, bidirectional=True, proj_size=2, backend=backend)
        self.gru = rnnkern.nn.GRU(4, HIDDEN_SIZE, batch_first=True, backend=backend)

    def forward(self, x, h0, c0):
        y, (h, c) = self.lstm(x, (h0, c0))
        z, g = self.gru(y.transpose(0, 1))
        return z.sin().sum() + h.square().sum() + c.sum() + g.sum()


NOT_TRITON = [p for p in backend_params(LSTM_LAYER) if p.values[1] != "triton"]


@pytest.mark.parametrize("device,backend", NOT_TRITON)
def test_compile_fullgraph_forward_and_backward_equal_eager(device, backend):
    torch.manual_seed(0)
    model = Stack(backend).to(device)
    x = torch.randn(5, 3, INPUT_SIZE, device=device)
    h0, c0 = torch.randn(4, 3, 2, device=device), torch.randn(4, 3, HIDDEN_SIZE, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for run in (model, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        model.zero_grad()
        loss = run(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves] + [p.grad.clone() for p in model.parameters()])
    for eager, traced in zip(*results):
        assert_close(traced, eager, torch.float32, "compiled vs eager")


# --- bad input ------------------------------------------------------------------------------

X = torch.randn(5, 2, 3)  # (T, B, I) for modules of input_size 3, hidden_size 4, 2 layers
H0, C0 = torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)
BAD_INPUTS = {
    "not-a-tensor": ("lstm", dict(input=[[1.0]]), TypeError, r"LSTM: input must be a torch\.Tensor .*got list"),
    "4d-input": ("gru", dict(input=X[None]), ValueError, r"GRU: input must have shape \(T, B, input_size\) or \(T, input_size\), got shape \(1, 5, 2, 3\)"),
    "feature-size": ("lstm", dict(input=X[..., :2]), ValueError, r"LSTM: input must have input_size=3 features in its last dimension, got shape \(5, 2, 2\)"),
    "input-dtype": ("gru", dict(input=X.double()), TypeError, r"GRU: input must have the dtype of the parameters \(torch\.float32\), got torch\.float64"),
    "hx-not-a-pair": ("lstm", dict(hx=H0), TypeError, r"LSTM: hx must be a tuple \(h_0, c_0\) of two tensors, got Tensor"),
    "h0-shape": ("lstm", dict(hx=(H0[:1], C0)), ValueError, r"LSTM: hx\[0\] \(h_0\) must have shape \(2, 2, 4\), got \(1, 2, 4\)"),
    "c0-shape": ("lstm", dict(hx=(H0, C0[..., :3])), ValueError, r"LSTM: hx\[1\] \(c_0\) must have shape \(2, 2, 4\), got \(2, 2, 3\)"),
    "c0-dtype": ("lstm", dict(hx=(H0, C0.double())), TypeError, r"LSTM: hx\[1\] \(c_0\) must have the dtype of input \(torch\.float32\), got torch\.float64"),
    "gru-h0-batch": ("gru", dict(hx=H0[:, :1]), ValueError, r"GRU: hx \(h_0\) must have shape \(2, 2, 4\), got \(2, 1, 4\)"),
    "gru-h0-not-tensor": ("gru", dict(hx=(H0,)), TypeError, r"GRU: hx \(h_0\) must be a torch\.Tensor of shape \(2, 2, 4\), got tuple"),
    "unbatched-3d-hx": ("gru", dict(input=X[:, 0], hx=H0), ValueError, r"GRU: hx \(h_0\) must have shape \(2, 4\), got \(2, 2, 4\)"),
    "packed-batch": ("gru", dict(input=pack_padded_sequence(X, [5, 3], enforce_sorted=False), hx=H0[:, :1]), ValueError, r"GRU: hx \(h_0\) must have shape \(2, 2, 4\), got \(2, 1, 4\)"),
    "packed-features": ("gru", dict(input=pack_padded_sequence(X[..., :2], [5, 3])), ValueError, r"GRU: input must have input_size=3 features"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_clear_error(case):
    mode, overrides, error, message = case
    module = MODULES[mode][1](3, 4, num_layers=2, backend="reference")
    kwargs = {"input": X, "hx": None, **overrides}
    with pytest.raises(error, match=message):
        module(kwargs["input"], kwargs["hx"])


# --- cells ----------------------------------------------------------------------------------


def make_cells(mode, device, backend, dtype=torch.float64, **config):
    torch_cls, rnnkern_cls = CELLS[mode]
    torch.manual_seed(0)
    expected = torch_cls(INPUT_SIZE, HIDDEN_SIZE, **config, device=device, dtype=dtype)
    torch.manual_seed(0)
    actual = rnnkern_cls(INPUT_SIZE, HIDDEN_SIZE, **config, device=device, dtype=dtype, backend=backend)
    return expected, actual


def cell_outputs_and_grads(cell, x, states, seed=7) -> dict:
    x = x.detach().requires_grad_()
    states = [s.detach().requires_grad_() for s in states]
    hx = None if not states else (tuple(states) if len(states) == 2 else states[0])
    outputs = cell(x, hx)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs]
    inputs = {"input": x, **{f"hx[{i}]": s for i, s in enumerate(states)}, **dict(cell.named_parameters())}
    grads = torch.autograd.grad(outputs, list(inputs.values()), cotangents)
    return {**dict(zip(["h'", "c'"], outputs)), **{f"grad {name}": grad for name, grad in zip(inputs, grads)}}


CELL_CASES = {  # id: (batch or None for unbatched, bias, with hx)
    "B3": (3, True, True),
    "B1-nobias": (1, False, True),
    "B2-no-hx": (2, True, False),
    "unbatched": (None, True, True),
    "unbatched-no-hx": (None, True, False),
}


@pytest.mark.parametrize("case", CELL_CASES.values(), ids=CELL_CASES.keys())
@pytest.mark.parametrize("mode,device,backend", mode_backends(fp64=True))
def test_cell_matches_torch_nn(mode, device, backend, case):
    batch, bias, with_hx = case
    expected, actual = make_cells(mode, device, backend, bias=bias)
    assert [name for name, _ in actual.named_parameters()] == [name for name, _ in expected.named_parameters()]
    for a, e in zip(actual.parameters(), expected.parameters()):
        assert torch.equal(a, e), "initialisation differs from torch.nn's"
    assert repr(actual) == repr(expected).replace(")", f", backend={backend!r})")
    gen = torch.Generator().manual_seed(4)
    shape = (INPUT_SIZE,) if batch is None else (batch, INPUT_SIZE)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    state_shape = (HIDDEN_SIZE,) if batch is None else (batch, HIDDEN_SIZE)
    count = (2 if mode == "lstm" else 1) if with_hx else 0
    states = [torch.randn(state_shape, generator=gen, dtype=torch.float64).to(device) for _ in range(count)]
    expected_results = cell_outputs_and_grads(expected, x, states)
    assert_all_close(cell_outputs_and_grads(actual, x, states), expected_results, torch.float64)


@pytest.mark.parametrize("mode", CELLS)
def test_cell_state_dict_round_trip_strict(mode):
    for bias in (True, False):
        expected, actual = CELLS[mode][0](3, 5, bias=bias), CELLS[mode][1](3, 5, bias=bias)
        actual.load_state_dict(expected.state_dict(), strict=True)
        CELLS[mode][0](3, 5, bias=bias).load_state_dict(actual.state_dict(), strict=True)
        assert list(actual.state_dict()) == list(expected.state_dict())


CELL_X = torch.randn(2, 3)
BAD_CELL_INPUTS = {
    "3d-input": ("gru", dict(input=CELL_X[None]), ValueError, r"GRUCell: input must have shape \(B, input_size\) or \(input_size,\), got shape \(1, 2, 3\)"),
    "feature-size": ("lstm", dict(input=CELL_X[:, :2]), ValueError, r"LSTMCell: input must have input_size=3 features"),
    "input-dtype": ("lstm", dict(input=CELL_X.half()), TypeError, r"LSTMCell: input must have the dtype of the parameters \(torch\.float32\), got torch\.float16"),
    "hx-not-a-pair": ("lstm", dict(hx=torch.zeros(2, 4)), TypeError, r"LSTMCell: hx must be a tuple \(h_0, c_0\)"),
    "c-shape": ("lstm", dict(hx=(torch.zeros(2, 4), torch.zeros(2, 5))), ValueError, r"LSTMCell: hx\[1\] \(c_0\) must have shape \(2, 4\), got \(2, 5\)"),
    "h-dtype": ("gru", dict(hx=torch.zeros(2, 4, dtype=torch.float64)), TypeError, r"GRUCell: hx must have the dtype of input \(torch\.float32\), got torch\.float64"),
    "unbatched-2d-hx": ("gru", dict(input=CELL_X[0], hx=torch.zeros(1, 4)), ValueError, r"GRUCell: hx must have shape \(4,\), got \(1, 4\)"),
}


@pytest.mark.parametrize("case", BAD_CELL_INPUTS.values(), ids=BAD_CELL_INPUTS.keys())
def test_cell_bad_input_is_a_clear_error(case):
    mode, overrides, error, message = case
    cell = CELLS[mode][1](3, 4, backend="reference")
    kwargs = {"input": CELL_X, "hx": None, **overrides}
    with pytest.raises(error, match=message):
        cell(kwargs["input"], kwargs["hx"])
