"""rnnkern.nn.Mamba: mamba_ssm's parameters and initialisation, forward against the block
written from its math (fp64 loop), gradients of every parameter, decoding, low precision,
torch.compile and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import rnnkern.nn
from rnnkern.ops.selective_scan import SELECTIVE_SCAN
from tests.conftest import backend_params, perturb_parameters
from tests.tolerances import assert_close

# The Triton interpreter is slow: Mamba runs it in one tiny case only (test_triton_backend_matches_reference).
BACKENDS = [p for p in backend_params(SELECTIVE_SCAN) if p.values[1] != "triton"]
CONFIGS = {  # id: constructor arguments (d_inner = expand * d_model, not a power of two)
    "M12-N4-K4": dict(d_model=12, d_state=4, d_conv=4),
    "M10-N1-K2-bias": dict(d_model=10, d_state=1, d_conv=2, bias=True, conv_bias=False),
    "M20-N16-K3-E3-R5": dict(d_model=20, d_state=16, d_conv=3, expand=3, dt_rank=5),
}


def dtype_id(dtype) -> str:
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float64: "f64"}[dtype]


def make_block(config, device="cpu", dtype=torch.float64, backend=None, seed=0, perturb=True):
    """A Mamba block; with `perturb`, every parameter moved off its structured initial value
    (D = 1, A_log = log(1..N)) so that each one is exercised."""
    torch.manual_seed(seed)
    block = rnnkern.nn.Mamba(**config, device=device, dtype=dtype, backend=backend)
    if perturb:
        perturb_parameters(block, seed + 1, 0.1)
    return block


def sequence(batch, steps, block, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, steps, block.d_model), generator=gen, dtype=torch.float64)
    return x.to(block.in_proj.weight)


def mamba_math(params: dict, u, d_state: int, dt_rank: int):
    """The Mamba block from its equations, in fp64, with the scan as an explicit loop over time.

    u (B, L, d_model) -> (B, L, d_model); `params` is a Mamba state dict.
    """
    p = {name: value.double() for name, value in params.items()}
    steps, inner = u.shape[1], p["D"].shape[0]
    xz = u.double() @ p["in_proj.weight"].T + p.get("in_proj.bias", 0.0)  # (B, L, 2E)
    x, z = xz[..., :inner], xz[..., inner:]
    taps = p["conv1d.weight"][:, 0, :]  # (E, K), the last tap multiplies x_t
    width = taps.shape[1]
    padded = torch.cat([x.new_zeros(x.shape[0], width - 1, inner), x], dim=1)  # (B, K - 1 + L, E)
    x = sum(taps[:, k] * padded[:, k : k + steps] for k in range(width)) + p.get("conv1d.bias", 0.0)
    x = x * torch.sigmoid(x)
    dt, B, C = (x @ p["x_proj.weight"].T).split([dt_rank, d_state, d_state], dim=-1)
    dt = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])  # (B, L, E)
    A = -torch.exp(p["A_log"])  # (E, N)
    h = x.new_zeros(x.shape[0], inner, d_state)  # (B, E, N)
    ys = []
    for t in range(steps):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + p["D"] * x[:, t])  # (B, E)
    y = torch.stack(ys, dim=1) * z * torch.sigmoid(z)
    return y @ p["out_proj.weight"].T + p.get("out_proj.bias", 0.0)


def outputs_and_grads(forward, x, params: dict, seed=7) -> dict:
    """The output and the gradients of x and of every parameter under a fixed random cotangent."""
    x = x.detach().requires_grad_()
    out = forward(x)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, [x, *params.values()], grad_out)
    return {"output": out, "grad input": grads[0], **{f"grad {n}": g for n, g in zip(params, grads[1:])}}


def assert_all_close(actual: dict, expected: dict, dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert_close(actual[name], expected[name], dtype, name)


def decode(block, x):
    """Runs x (B, L, d_model) through block.step one token at a time from zero states."""
    conv_state, ssm_state = block.allocate_inference_cache(x.shape[0], x.shape[1])
    outputs = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y_t, conv_state, ssm_state = block.step(x[:, t : t + 1], conv_state, ssm_state)
            outputs.append(y_t)
    return torch.cat(outputs, dim=1), conv_state, ssm_state


# --- parameters and initialisation ----------------------------------------------------


def test_parameter_names_and_shapes_match_mamba_ssm():
    block = rnnkern.nn.Mamba(20, d_state=5, d_conv=3, bias=True)  # d_inner 40, dt_rank ceil(20 / 16) = 2
    shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
    assert shapes == {
        "A_log": (40, 5),
        "D": (40,),
        "in_proj.weight": (80, 20),
        "in_proj.bias": (80,),
        "conv1d.weight": (40, 1, 3),
        "conv1d.bias": (40,),
        "x_proj.weight": (2 + 2 * 5, 40),
        "dt_proj.weight": (40, 2),
        "dt_proj.bias": (40,),
        "out_proj.weight": (20, 40),
        "out_proj.bias": (20,),
    }
    assert (block.d_inner, block.dt_rank, block.conv1d.padding, block.conv1d.groups) == (40, 2, (2,), 40)


def test_defaults_and_optional_biases():
    block = rnnkern.nn.Mamba(64, conv_bias=False, layer_idx=3)
    assert (block.d_state, block.d_conv, block.expand, block.d_inner, block.dt_rank) == (16, 4, 2, 128, 4)
    assert block.in_proj.bias is None and block.out_proj.bias is None and block.conv1d.bias is None
    assert block.x_proj.bias is None and block.dt_proj.bias is not None
    assert block.layer_idx == 3
    assert rnnkern.nn.Mamba(64, dt_rank=7).dt_proj.weight.shape == (128, 7)


def test_state_space_parameters_are_initialised_as_mamba_ssm():
    block = rnnkern.nn.Mamba(16, d_state=6)
    expected_A_log = torch.log(torch.arange(1, 7, dtype=torch.float32)).expand(32, 6)
    assert torch.equal(block.A_log.data, expected_A_log)
    assert torch.equal(block.D.data, torch.ones(32))
    assert block.A_log._no_weight_decay and block.D._no_weight_decay
    assert block.dt_proj.bias._no_reinit


@pytest.mark.parametrize("dt_init", ["random", "constant"])
def test_dt_projection_initialisation(dt_init):
    torch.manual_seed(0)
    dt_min, dt_max, scale = 0.002, 0.05, 1.5
    block = rnnkern.nn.Mamba(32, expand=4, dt_init=dt_init, dt_min=dt_min, dt_max=dt_max, dt_scale=scale)
    std = block.dt_rank**-0.5 * scale  # dt_rank = 2
    weight = block.dt_proj.weight.detach()
    if dt_init == "constant":
        assert torch.equal(weight, torch.full_like(weight, std))
    else:
        assert weight.abs().max() <= std and weight.abs().max() > 0.9 * std
    dt = F.softplus(block.dt_proj.bias.detach().double())  # the initial time steps, log-uniform
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    log_dt = dt.log()
    assert log_dt.min() < math.log(dt_min) + 1 and log_dt.max() > math.log(dt_max) - 1  # spread over the range


def test_dt_init_floor_clamps_the_time_steps():
    block = rnnkern.nn.Mamba(16, dt_min=1e-5, dt_max=1e-2, dt_init_floor=5e-3)
    dt = F.softplus(block.dt_proj.bias.detach().double())
    assert dt.min() >= 5e-3 * (1 - 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_parameter_dtypes(dtype):
    """A_log and D stay in float32 (float64 for fp64), as mamba_ssm keeps them; the rest in dtype."""
    block = rnnkern.nn.Mamba(16, d_state=4, dtype=dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for name, parameter in block.named_parameters():
        assert parameter.dtype == (wide if name in ("A_log", "D") else dtype), name


def test_state_dict_round_trip():
    source, target = make_block(CONFIGS["M12-N4-K4"], seed=0), make_block(CONFIGS["M12-N4-K4"], seed=5)
    target.load_state_dict(source.state_dict(), strict=True)
    x = sequence(2, 5, source)
    assert torch.equal(target(x), source(x))


# --- forward and gradients against the math --------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_the_block_from_its_math_fp64(device, backend, config):
    block = make_block(config, device, backend=backend)
    x = sequence(2, 9, block)
    params = dict(block.named_parameters())
    actual = outputs_and_grads(block, x, params)
    expected = outputs_and_grads(lambda u: mamba_math(params, u, block.d_state, block.dt_rank), x, params)
    assert_all_close(actual, expected, torch.float64)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients_reach_every_parameter(device, backend):
    block = make_block(CONFIGS["M10-N1-K2-bias"], device, dtype=torch.float32, backend=backend)
    block(sequence(2, 7, block)).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_single_token_and_batch_one(device, backend):
    block = make_block(CONFIGS["M12-N4-K4"], device, backend=backend)
    x = sequence(1, 1, block)
    assert_close(block(x), mamba_math(block.state_dict(), x, 4, block.dt_rank), torch.float64, "output")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bf16_forward_against_fp64(device, backend):
    """A bf16 block (A_log, D in fp32) against the same weights in fp64, within bf16 tolerance."""
    block = make_block(CONFIGS["M12-N4-K4"], device, dtype=torch.bfloat16, backend=backend)
    x = sequence(2, 33, block)
    output = block(x)
    assert output.dtype == torch.bfloat16
    expected = mamba_math(block.state_dict(), x, block.d_state, block.dt_rank)
    assert_close(output, expected, torch.bfloat16, "output")


# --- decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_step_by_step_decoding_equals_forward(device, backend, config, dtype):
    block = make_block(config, device, dtype=dtype, backend=backend)
    x = sequence(2, 11, block)
    decoded, conv_state, ssm_state = decode(block, x)
    assert decoded.shape == x.shape and decoded.dtype == dtype
    assert_close(decoded, block(x), dtype, "output")
    # the conv state holds the last d_conv inputs of the convolution, newest last
    inner = x @ block.in_proj.weight.T + (block.in_proj.bias if block.in_proj.bias is not None else 0)
    assert_close(conv_state, inner[:, -block.d_conv :, : block.d_inner].transpose(1, 2), dtype, "conv_state")
    assert ssm_state.shape == (2, block.d_inner, block.d_state)


@pytest.mark.parametrize("prompt", [2, 7], ids=["prompt-shorter-than-d_conv", "prompt-7"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_prefill_then_steps_equal_forward(device, backend, config, prompt):
    """prefill returns forward's output and the states step() continues from."""
    block = make_block(config, device, backend=backend)
    x = sequence(2, 11, block)
    with torch.no_grad():
        head, conv_state, ssm_state = block.prefill(x[:, :prompt])
        assert_close(head, block(x[:, :prompt]), torch.float64, "prefill output")
        _, decoded_conv, decoded_ssm = decode(block, x[:, :prompt])
        assert_close(conv_state, decoded_conv, torch.float64, "conv_state")
        assert_close(ssm_state, decoded_ssm, torch.float64, "ssm_state")
        tail = []
        for t in range(prompt, x.shape[1]):
            y_t, conv_state, ssm_state = block.step(x[:, t : t + 1], conv_state, ssm_state)
            tail.append(y_t)
    assert_close(torch.cat([head, *tail], dim=1), block(x), torch.float64, "prefill + steps")


def test_allocate_inference_cache():
    block = rnnkern.nn.Mamba(12, d_state=5, d_conv=3, dtype=torch.bfloat16)
    conv_state, ssm_state = block.allocate_inference_cache(4, max_seqlen=100)
    assert conv_state.shape == (4, 24, 3) and conv_state.dtype == torch.bfloat16
    assert ssm_state.shape == (4, 24, 5) and ssm_state.dtype == torch.float32
    assert not conv_state.any() and not ssm_state.any()
    conv_state, ssm_state = block.allocate_inference_cache(4, 100, dtype=torch.float32)
    assert conv_state.dtype == ssm_state.dtype == torch.float32


def test_step_updates_the_states_in_place():
    block = make_block(CONFIGS["M12-N4-K4"])
    conv_state, ssm_state = block.allocate_inference_cache(2, 1)
    with torch.no_grad():
        y, conv_out, ssm_out = block.step(sequence(2, 1, block), conv_state, ssm_state)
    assert y.shape == (2, 1, 12)
    assert conv_out is conv_state and ssm_out is ssm_state
    assert conv_state.any() and ssm_state.any()


# --- torch integration ----------------------------------------------------------------


class TinyModel(torch.nn.Module):
    """Two Mamba blocks with residual connections and norms, and a head."""

    def __init__(self, backend=None):
        super().__init__()
        self.embed = torch.nn.Linear(3, 8)
        self.blocks = torch.nn.ModuleList(
            rnnkern.nn.Mamba(8, d_state=4, layer_idx=i, backend=backend) for i in range(2)
        )
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(8) for _ in range(2))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):  # (B, L, 3) -> (B, L, 2)
        h = self.embed(x)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(h)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph_forward_and_backward(device, backend):
    torch.manual_seed(0)
    eager = TinyModel(backend).to(device)
    compiled_model = TinyModel(backend).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 13, 3, device=device)
    eager_loss, compiled_loss = eager(x).square().mean(), compiled(x).square().mean()
    assert_close(compiled_loss, eager_loss, torch.float32, "loss")
    eager_loss.backward()
    compiled_loss.backward()
    for (name, expected), actual in zip(eager.named_parameters(), compiled_model.parameters()):
        assert_close(actual.grad, expected.grad, torch.float32, f"grad {name}")


@pytest.mark.slow  # inductor compiles the whole block: about 30 s on 2 cores
def test_compile_fullgraph_with_inductor():
    torch.manual_seed(0)
    model = TinyModel().eval()
    x = torch.randn(2, 9, 3)
    with torch.no_grad():
        assert_close(torch.compile(model, fullgraph=True)(x), model(x), torch.float32, "output")


TRITON = [p for p in backend_params(SELECTIVE_SCAN) if p.values[1] == "triton"]


@pytest.mark.parametrize("device,backend", TRITON)
def test_triton_backend_matches_reference(device, backend):
    """One tiny case of the Triton kernels (interpreted on CPU without a GPU) inside the block."""
    config = dict(d_model=6, d_state=2, d_conv=2)
    triton_block = make_block(config, device, dtype=torch.float32, backend=backend)
    reference_block = make_block(config, device, dtype=torch.float32, backend="reference")
    x = sequence(1, 5, triton_block)
    params = dict(triton_block.named_parameters())
    actual = outputs_and_grads(triton_block, x, params)
    expected = outputs_and_grads(reference_block, x, dict(reference_block.named_parameters()))
    assert_all_close(actual, expected, torch.float32)


# --- bad input ------------------------------------------------------------------------

BLOCK = rnnkern.nn.Mamba(8, d_state=4, d_conv=3)
X = torch.randn(2, 5, 8)
BAD_INPUTS = {
    "not-a-tensor": (X.tolist(), TypeError, r"Mamba: input must be a torch\.Tensor of shape \(B, L, d_model\), got list"),
    "2d": (X[0], ValueError, r"Mamba: input must have shape \(B, L, d_model\), got shape \(5, 8\)"),
    "features": (X[..., :7], ValueError, r"Mamba: input must have d_model=8 features .* got shape \(2, 5, 7\)"),
    "dtype": (X.double(), TypeError, r"Mamba: input must have the dtype of the parameters \(torch\.float32\), got torch\.float64"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_clear_error(case):
    x, error, message = case
    with pytest.raises(error, match=message):
        BLOCK(x)


CONV_STATE, SSM_STATE = BLOCK.allocate_inference_cache(2, 5)
BAD_STEPS = {
    "two-tokens": (dict(x=X[:, :2]), ValueError, r"Mamba: step takes one token, input \(B, 1, d_model\), got \(2, 2, 8\)"),
    "conv-state-shape": (dict(conv_state=CONV_STATE[..., :2]), ValueError, r"Mamba: conv_state must have shape \(2, 16, 3\), got \(2, 16, 2\)"),
    "ssm-state-batch": (dict(ssm_state=SSM_STATE[:1]), ValueError, r"Mamba: ssm_state must have shape \(2, 16, 4\), got \(1, 16, 4\)"),
    "ssm-state-type": (dict(ssm_state=None), TypeError, r"Mamba: ssm_state must be a torch\.Tensor of shape \(2, 16, 4\), got NoneType"),
    "conv-state-dtype": (dict(conv_state=CONV_STATE.double()), TypeError, r"conv_state must be torch\.float32, got torch\.float64"),
}


@pytest.mark.parametrize("case", BAD_STEPS.values(), ids=BAD_STEPS.keys())
def test_bad_step_input_is_a_clear_error(case):
    overrides, error, message = case
    kwargs = {"x": X[:, :1], "conv_state": CONV_STATE, "ssm_state": SSM_STATE, **overrides}
    with torch.no_grad(), pytest.raises(error, match=message):
        BLOCK.step(kwargs["x"], kwargs["conv_state"], kwargs["ssm_state"])


def test_bad_dt_init_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Mamba: dt_init must be 'random' or 'constant', got 'normal'"):
        rnnkern.nn.Mamba(8, dt_init="normal")
