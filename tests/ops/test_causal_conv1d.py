"""causal_conv1d and causal_conv1d_update against torch's F.conv1d, in fp64 and low precision."""
import pytest
import torch
import torch.nn.functional as F

import rnnkern
from rnnkern.ops.causal_conv1d import CAUSAL_CONV1D_UPDATE
from tests.conftest import backend_params, ran_op
from tests.tolerances import assert_close

SHAPES = [(2, 5, 9, 4), (1, 3, 1, 4), (3, 6, 3, 4), (2, 7, 17, 2), (1, 4, 2, 2)]  # (B, D, L, W)
ACTIVATIONS = [None, "silu"]


def shape_id(shape) -> str:
    return "B{}-D{}-L{}-W{}".format(*shape)


def dtype_id(dtype) -> str:
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}[dtype]


def make_inputs(shape, dtype, seed=0, bias=True):
    """x (B, D, L), weight (D, W) and bias (D,) (or None), standard normal."""
    batch, channels, steps, width = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, channels, steps), generator=gen, dtype=torch.float64)
    weight = torch.randn((channels, width), generator=gen, dtype=torch.float64)
    b = torch.randn((channels,), generator=gen, dtype=torch.float64) if bias else None
    return x.to(dtype), weight.to(dtype), (b.to(dtype) if bias else None)


def torch_conv(x, weight, bias, activation):
    """nn.Conv1d(D, D, W, groups=D, padding=W - 1) keeping the first L outputs, as Mamba does."""
    width = weight.shape[1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=weight.shape[0])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def outputs_and_grads(conv, x, weight, bias, activation, seed=7) -> dict:
    """The output and the gradients of x, weight and bias under a fixed random cotangent."""
    leaves = {"x": x, "weight": weight, **({"bias": bias} if bias is not None else {})}
    leaves = {name: t.detach().requires_grad_() for name, t in leaves.items()}
    out = conv(leaves["x"], leaves["weight"], leaves.get("bias"), activation)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return {"out": out, **{f"grad_{name}": grad for name, grad in zip(leaves, grads)}}


def assert_all_close(actual: dict, expected: dict, dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert_close(actual[name], expected[name], dtype, name)


def rnnkern_conv(x, weight, bias, activation):
    return rnnkern.causal_conv1d(x, weight, bias, activation)


# --- against F.conv1d -----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["identity", "silu"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_torch_conv1d_fp64(shape, activation, bias):
    x, weight, b = make_inputs(shape, torch.float64, bias=bias)
    actual = outputs_and_grads(rnnkern_conv, x, weight, b, activation)
    expected = outputs_and_grads(torch_conv, x, weight, b, activation)
    assert_all_close(actual, expected, torch.float64)
    assert actual["out"].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_low_precision_against_fp64(dtype):
    """Math in fp32, one rounding: within the output dtype's tolerance of the fp64 result."""
    x, weight, b = make_inputs((2, 6, 33, 4), dtype)
    actual = outputs_and_grads(rnnkern_conv, x, weight, b, "silu")
    expected = outputs_and_grads(torch_conv, x.double(), weight.double(), b.double(), "silu")
    for name, value in actual.items():
        assert value.dtype == dtype, name
    assert_all_close(actual, expected, dtype)


def test_swish_is_silu():
    x, weight, b = make_inputs((2, 3, 8, 4), torch.float64)
    assert torch.equal(rnnkern.causal_conv1d(x, weight, b, "swish"), rnnkern.causal_conv1d(x, weight, b, "silu"))


def test_is_causal():
    """Changing x at step t changes no output before t."""
    x, weight, b = make_inputs((1, 4, 12, 4), torch.float64)
    changed = x.clone()
    changed[..., 7] += 1.0
    before, after = rnnkern.causal_conv1d(x, weight, b), rnnkern.causal_conv1d(changed, weight, b)
    assert torch.equal(before[..., :7], after[..., :7])
    assert not torch.equal(before[..., 7:], after[..., 7:])


def test_non_contiguous_input():
    _, weight, b = make_inputs((2, 5, 9, 4), torch.float32)
    x = torch.randn(2, 9, 5).transpose(1, 2)  # (2, 5, 9), time stride 5
    assert not x.is_contiguous()
    expected = rnnkern.causal_conv1d(x.contiguous(), weight, b, "silu")
    assert_close(rnnkern.causal_conv1d(x, weight, b, "silu"), expected, torch.float32, "out")


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["identity", "silu"])
def test_gradcheck_fp64(activation):
    x, weight, b = make_inputs((2, 3, 6, 3), torch.float64)
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    assert torch.autograd.gradcheck(lambda *args: rnnkern.causal_conv1d(*args, activation), leaves)


def packed_separately(x, weight, bias, activation, cu_seqlens):
    """torch_conv on each packed sequence alone, joined along time: the ground truth of cu_seqlens."""
    bounds = cu_seqlens.tolist()
    return torch.cat([torch_conv(x[..., s:e], weight, bias, activation) for s, e in zip(bounds, bounds[1:]) if e > s], -1)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["identity", "silu"])
def test_packed_sequences_equal_separate_runs(activation):
    """Sequences shorter than the filter, an empty one: none sees another's inputs, forward or backward."""
    cu_seqlens = torch.tensor([0, 1, 6, 6, 8, 17])
    x, weight, b = make_inputs((1, 3, 17, 4), torch.float64)
    actual = outputs_and_grads(lambda *a: rnnkern.causal_conv1d(*a, cu_seqlens=cu_seqlens), x, weight, b, activation)
    expected = outputs_and_grads(lambda *a: packed_separately(*a, cu_seqlens), x, weight, b, activation)
    assert_all_close(actual, expected, torch.float64)


def test_gradcheck_fp64_packed():
    x, weight, b = make_inputs((1, 2, 7, 3), torch.float64)
    cu_seqlens = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    assert torch.autograd.gradcheck(lambda *args: rnnkern.causal_conv1d(*args, "silu", cu_seqlens=cu_seqlens), leaves)


# --- the one-step form ----------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", ["input", "float32"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["identity", "silu"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_update_steps_equal_the_convolution(shape, activation, state_dtype):
    dtype = torch.float64 if state_dtype == "input" else torch.float32
    x, weight, b = make_inputs(shape, dtype)
    batch, channels, steps, width = shape
    state = torch.zeros(batch, channels, width, dtype=dtype)
    outputs = [rnnkern.causal_conv1d_update(x[..., t], state, weight, b, activation) for t in range(steps)]
    assert all(out.shape == (batch, channels) and out.dtype == dtype for out in outputs)
    assert_close(torch.stack(outputs, dim=-1), rnnkern.causal_conv1d(x, weight, b, activation), dtype, "out")
    # the state holds the last W inputs, newest last (zeros where the sequence is shorter)
    expected_state = F.pad(x, (width, 0))[..., -width:]
    assert torch.equal(state, expected_state)


def test_update_continues_a_prefix():
    """A state holding the last W inputs of a prefix continues the convolution exactly."""
    x, weight, b = make_inputs((2, 5, 10, 4), torch.float64)
    full = rnnkern.causal_conv1d(x, weight, b, "silu")
    state = x[..., 3:7].clone()  # inputs 3..6, newest last
    for t in range(7, 10):
        y_t = rnnkern.causal_conv1d_update(x[..., t], state, weight, b, "silu")
        assert_close(y_t, full[..., t], torch.float64, f"step {t}")


def test_update_bf16_with_fp32_state():
    x, weight, b = make_inputs((2, 6, 5, 4), torch.bfloat16)
    state = torch.zeros(2, 6, 4, dtype=torch.float32)
    outputs = [rnnkern.causal_conv1d_update(x[..., t], state, weight, b, "silu") for t in range(5)]
    expected = torch_conv(x.double(), weight.double(), b.double(), "silu")
    assert_close(torch.stack(outputs, dim=-1), expected, torch.bfloat16, "out")


# --- torch integration ----------------------------------------------------------------


def test_opcheck():
    x, weight, b = make_inputs((2, 5, 9, 4), torch.float32)
    ops = torch.ops.rnnkern
    torch.library.opcheck(ops.causal_conv1d.default, (x, weight, b, "silu", None, "reference"))
    torch.library.opcheck(ops.causal_conv1d.default, (x, weight, None, None, None, "reference"))
    cu_seqlens = torch.tensor([0, 2, 2, 9])
    torch.library.opcheck(ops.causal_conv1d.default, (x[:1], weight, b, "silu", cu_seqlens, "reference"))
    grad_out = torch.randn_like(x)
    torch.library.opcheck(ops.causal_conv1d_bwd.default, (x, weight, b, "silu", None, grad_out, "reference"))
    torch.library.opcheck(ops.causal_conv1d_bwd.default, (x, weight, None, None, None, grad_out, "reference"))
    torch.library.opcheck(ops.causal_conv1d_bwd.default, (x[:1], weight, b, "silu", cu_seqlens, grad_out[:1], "reference"))
    state = torch.randn(2, 5, 4)
    torch.library.opcheck(ops.causal_conv1d_update.default, (x[..., 0], state, weight, b, "silu", "reference"))
    torch.library.opcheck(ops.causal_conv1d_update.default, (x[..., 0], state, weight, None, None, "reference"))


def test_compile_fullgraph_forward_and_backward():
    x, weight, b = make_inputs((2, 5, 9, 4), torch.float32)

    def loss(x, weight, b):
        return rnnkern.causal_conv1d(x * 2, weight, b, "silu").sin().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    compiled_leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    loss(*eager_leaves).backward()
    compiled(*compiled_leaves).backward()
    for name, eager, traced in zip(["x", "weight", "bias"], eager_leaves, compiled_leaves):
        assert_close(traced.grad, eager.grad, torch.float32, f"grad_{name}")


def test_compile_fullgraph_update_with_inductor():
    x, weight, b = make_inputs((2, 5, 6, 4), torch.float32)

    def decode(x, state):
        return torch.stack([rnnkern.causal_conv1d_update(x[..., t], state, weight, b, "silu") for t in range(6)], -1)

    state_eager, state_compiled = torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)
    expected = decode(x, state_eager)
    actual = torch.compile(decode, fullgraph=True)(x, state_compiled)
    assert_close(actual, expected, torch.float32, "out")
    assert_close(state_compiled, state_eager, torch.float32, "conv_state")


# --- backends -------------------------------------------------------------------------


BACKENDS = backend_params(CAUSAL_CONV1D_UPDATE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_every_backend_matches_torch_conv1d(device, backend, dtype):
    x, weight, b = (t.to(device) for t in make_inputs((2, 5, 9, 4), dtype))
    expected = torch_conv(x, weight, b, "silu")
    assert_close(rnnkern.causal_conv1d(x, weight, b, "silu", backend=backend), expected, dtype, "out")
    state = torch.zeros(2, 5, 4, dtype=dtype, device=device)
    steps = [rnnkern.causal_conv1d_update(x[..., t], state, weight, b, "silu", backend=backend) for t in range(9)]
    assert_close(torch.stack(steps, dim=-1), expected, dtype, "update")


def _ran_cpu_update_kernel(run) -> bool:
    return ran_op("rnnkern_C::causal_conv1d_update", run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_cpu_update_kernel_runs_fp32_and_fp64(dtype):
    if CAUSAL_CONV1D_UPDATE.refusal("cpu", torch.device("cpu"), torch.float32):
        pytest.fail("rnnkern._C lacks causal_conv1d_update: rebuild the extension")
    x, weight, b = make_inputs((2, 5, 1, 4), dtype)
    state = torch.zeros(2, 5, 4, dtype=dtype)
    assert _ran_cpu_update_kernel(lambda: rnnkern.causal_conv1d_update(x[..., 0], state, weight, b, "silu")) == (
        dtype != torch.bfloat16)


def test_forcing_a_backend_that_cannot_run_the_device_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the triton backend then takes CUDA tensors only
    x, weight, b = make_inputs((2, 5, 9, 4), torch.float32)
    with pytest.raises(rnnkern.BackendError, match=r"causal_conv1d: backend 'triton' cannot run this input"):
        rnnkern.causal_conv1d(x, weight, b, backend="triton")
    with pytest.raises(rnnkern.BackendError, match=r"causal_conv1d_update: backend 'triton' cannot run"):
        rnnkern.causal_conv1d_update(x[..., 0], torch.zeros(2, 5, 4), weight, b, backend="triton")


def test_forcing_the_cpu_backend_on_a_dtype_its_update_kernel_lacks_is_an_error():
    x, weight, b = make_inputs((2, 5, 1, 4), torch.bfloat16)
    with pytest.raises(rnnkern.BackendError, match=r"backend 'cpu' cannot run this input: torch.bfloat16 is not "
                                                   r"supported by its causal_conv1d_update kernel"):
        rnnkern.causal_conv1d_update(x[..., 0], torch.zeros(2, 5, 4), weight, b, backend="cpu")


# --- bad input ------------------------------------------------------------------------

X, W, BIAS = make_inputs((2, 5, 9, 4), torch.float32)
BAD_INPUTS = {
    "x-not-a-tensor": (dict(x=[[1.0]]), TypeError, r"x must be a torch\.Tensor of shape \(B, D, L\), got list"),
    "x-2d": (dict(x=X[0]), ValueError, r"x must have shape \(B, D, L\), got shape \(5, 9\)"),
    "x-int": (dict(x=X.long()), TypeError, r"x must be float16, bfloat16, float32 or float64, got torch\.int64"),
    "no-steps": (dict(x=X[..., :0]), ValueError, r"at least one time step \(L >= 1\)"),
    "weight-3d": (dict(weight=W.unsqueeze(1)), ValueError, r"weight must have shape \(D, W\) = \(5, W\), got shape \(5, 1, 4\)"),
    "weight-rows": (dict(weight=W[:4]), ValueError, r"weight must have shape \(D, W\) = \(5, W\) with W >= 1, got \(4, 4\)"),
    "weight-no-taps": (dict(weight=W[:, :0]), ValueError, r"with W >= 1, got \(5, 0\)"),
    "weight-dtype": (dict(weight=W.double()), TypeError, r"weight must have the input's dtype \(torch\.float32\), got torch\.float64"),
    "weight-device": (dict(weight=W.to("meta")), ValueError, r"weight must be on the input's device \(cpu\), got meta"),
    "bias-shape": (dict(bias=BIAS[:3]), ValueError, r"bias must have shape \(5\), got \(3,\)"),
    "bias-dtype": (dict(bias=BIAS.half()), TypeError, r"bias must have the input's dtype \(torch\.float32\), got torch\.float16"),
    "activation": (dict(activation="relu"), ValueError, r"activation must be None, 'silu' or 'swish', got 'relu'"),
    "activation-type": (dict(activation=True), ValueError, r"activation must be None, 'silu' or 'swish', got True"),
    "unknown-backend": (dict(backend="cudnn"), ValueError, r"unknown backend 'cudnn'; expected one of"),
    "cu-seqlens-batch": (dict(cu_seqlens=torch.tensor([0, 9])), ValueError, r"with cu_seqlens the batch size must be 1 .*got 2"),
    "cu-seqlens-dtype": (dict(x=X[:1], cu_seqlens=torch.tensor([0.0, 9.0])), TypeError, r"cu_seqlens must be int32 or int64"),
    "cu-seqlens-start": (dict(x=X[:1], cu_seqlens=torch.tensor([1, 9])), ValueError, r"cu_seqlens must start at 0 and end at L=9"),
    "cu-seqlens-end": (dict(x=X[:1], cu_seqlens=torch.tensor([0, 4, 8])), ValueError, r"cu_seqlens must start at 0 and end at L=9"),
    "cu-seqlens-device": (dict(x=X[:1], cu_seqlens=torch.tensor([0, 9], device="meta")), ValueError, r"cu_seqlens must be on cpu, got meta"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_clear_error(case):
    overrides, error, message = case
    kwargs = {"x": X, "weight": W, "bias": BIAS, **overrides}
    with pytest.raises(error, match=message):
        rnnkern.causal_conv1d(kwargs.pop("x"), kwargs.pop("weight"), **kwargs)


STATE = torch.zeros(2, 5, 4)
BAD_UPDATES = {
    "x-3d": (dict(x=X), ValueError, r"x must have shape \(B, D\), got shape \(2, 5, 9\)"),
    "state-shape": (dict(conv_state=STATE[..., :3]), ValueError, r"conv_state must have shape \(2, 5, 4\), got \(2, 5, 3\)"),
    "state-batch": (dict(conv_state=STATE[:1]), ValueError, r"conv_state must have shape \(2, 5, 4\), got \(1, 5, 4\)"),
    "state-dtype": (dict(conv_state=STATE.double()), TypeError, r"conv_state must be torch\.float32, got torch\.float64"),
    "state-device": (dict(conv_state=STATE.to("meta")), ValueError, r"conv_state must be on cpu, got meta"),
    "weight-rows": (dict(weight=W[:3]), ValueError, r"weight must have shape \(D, W\) = \(5, W\) with W >= 1, got \(3, 4\)"),
    "activation": (dict(activation="gelu"), ValueError, r"activation must be None, 'silu' or 'swish', got 'gelu'"),
}


@pytest.mark.parametrize("case", BAD_UPDATES.values(), ids=BAD_UPDATES.keys())
def test_bad_update_input_is_a_clear_error(case):
    overrides, error, message = case
    kwargs = {"x": X[..., 0], "conv_state": STATE, "weight": W, "bias": BIAS, **overrides}
    with pytest.raises(error, match=message):
        rnnkern.causal_conv1d_update(kwargs.pop("x"), kwargs.pop("conv_state"), kwargs.pop("weight"), **kwargs)
