"""rnnkern.nn.Mamba2: mamba_ssm's parameters and initialisation, forward against the block
written from its math (fp64 loop), packed sequences, decoding (step, prefill), gradients,
torch.compile, HF transformers' Mamba2 mixer weights, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import rnnkern.nn
from rnnkern.ops.mamba_chunk_scan import MAMBA_CHUNK_SCAN
from tests.conftest import backend_params, perturb_parameters
from tests.tolerances import assert_close

# The Triton interpreter is slow: the block runs on the reference and cpu backends here
# (the triton scan is checked op by op in tests/ops).
BACKENDS = [p for p in backend_params(MAMBA_CHUNK_SCAN) if p.values[1] != "triton"]
CONFIGS = {  # id: constructor arguments; d_inner = expand * d_model, H = d_inner / headdim
    "M16-H4-G2-N8": dict(d_model=16, d_state=8, headdim=8, ngroups=2, chunk_size=8),
    "M12-H3-N4-Dp-K3-bias": dict(d_model=12, d_state=4, d_conv=3, headdim=8, D_has_hdim=True, bias=True,
                                 chunk_size=5),
    "M8-H4-nonorm-limit": dict(d_model=8, d_state=4, headdim=4, rmsnorm=False, dt_limit=(0.01, 0.5),
                               conv_bias=False, chunk_size=16),
    "M8-H2-G2-normfirst": dict(d_model=8, d_state=6, headdim=8, ngroups=2, norm_before_gate=True, chunk_size=4),
}


def make_block(config, dtype=torch.float64, backend=None, seed=0, perturb=True):
    """A Mamba2 block; with `perturb` every parameter is moved off its initial value (D = 1,
    norm.weight = 1) so that each one is exercised."""
    torch.manual_seed(seed)
    block = rnnkern.nn.Mamba2(**config, dtype=dtype, backend=backend)
    if perturb:
        perturb_parameters(block, seed + 1, 0.2)
    return block


def sequence(batch, steps, block, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, steps, block.d_model), generator=gen, dtype=torch.float64).to(block.in_proj.weight)


def mamba2_math(block, u):
    """The Mamba-2 block from its equations, in fp64, the scan an explicit loop over time."""
    p = {name: value.double() for name, value in block.state_dict().items()}
    E, G, N, H, P = block.d_inner, block.ngroups, block.d_state, block.nheads, block.headdim
    steps = u.shape[1]
    proj = u.double() @ p["in_proj.weight"].T + p.get("in_proj.bias", 0.0)
    z, xBC, dt = proj[..., :E], proj[..., E:2 * E + 2 * G * N], proj[..., 2 * E + 2 * G * N:]
    taps = p["conv1d.weight"][:, 0, :]  # (E + 2GN, K)
    width = taps.shape[1]
    padded = torch.cat([xBC.new_zeros(xBC.shape[0], width - 1, xBC.shape[2]), xBC], dim=1)
    xBC = sum(taps[:, k] * padded[:, k:k + steps] for k in range(width)) + p.get("conv1d.bias", 0.0)
    xBC = xBC * torch.sigmoid(xBC)
    x, B, C = xBC[..., :E], xBC[..., E:E + G * N], xBC[..., E + G * N:]
    dt = F.softplus(dt + p["dt_bias"])  # (B, L, H)
    if block.dt_limit != (0.0, math.inf):
        dt = dt.clamp(*block.dt_limit)
    A = -torch.exp(p["A_log"])  # (H,)
    D = p["D"].view(H, P) if block.D_has_hdim else p["D"][:, None]
    s = x.new_zeros(x.shape[0], H, P, N)
    ys = []
    for t in range(steps):
        xt = x[:, t].view(-1, H, P)
        Bt = B[:, t].view(-1, G, N).repeat_interleave(H // G, dim=1)  # (B, H, N)
        Ct = C[:, t].view(-1, G, N).repeat_interleave(H // G, dim=1)
        s = torch.exp(dt[:, t] * A)[..., None, None] * s + (dt[:, t, :, None] * xt)[..., None] * Bt[:, :, None]
        ys.append(((s * Ct[:, :, None]).sum(-1) + D * xt).flatten(1))  # (B, E)
    y = torch.stack(ys, dim=1)
    if not block.rmsnorm:
        y = y * F.silu(z)
    else:
        if not block.norm_before_gate:
            y = y * F.silu(z)
        groups = y.unflatten(-1, (G, E // G))
        y = (groups / torch.sqrt(groups.square().mean(-1, keepdim=True) + 1e-5)).flatten(-2) * p["norm.weight"]
        if block.norm_before_gate:
            y = y * F.silu(z)
    return y @ p["out_proj.weight"].T + p.get("out_proj.bias", 0.0)


# ---------------------------------------------------------------------------------------
# Parameters.


def test_parameters_match_mamba_ssm_names_and_shapes():
    block = rnnkern.nn.Mamba2(d_model=16, d_state=8, headdim=8, ngroups=2)
    E, G, N, H = 32, 2, 8, 4
    shapes = {name: tuple(t.shape) for name, t in block.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * E + 2 * G * N + H, 16), "conv1d.weight": (E + 2 * G * N, 1, 4),
        "conv1d.bias": (E + 2 * G * N,), "dt_bias": (H,), "A_log": (H,), "D": (H,), "norm.weight": (E,),
        "out_proj.weight": (16, E),
    }
    A = torch.exp(block.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(block.dt_bias)
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()
    assert torch.equal(block.D, torch.ones(H)) and torch.equal(block.norm.weight, torch.ones(E))
    assert all(getattr(p, "_no_weight_decay", False) for p in (block.dt_bias, block.A_log, block.D))


def test_D_has_hdim_and_no_rmsnorm_change_the_parameters():
    block = rnnkern.nn.Mamba2(d_model=8, d_state=4, headdim=4, D_has_hdim=True, rmsnorm=False)
    assert tuple(block.D.shape) == (16,) and "norm.weight" not in block.state_dict()


# ---------------------------------------------------------------------------------------
# Forward.


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_forward_matches_the_block_math(device, backend, config):
    block = make_block(config, backend=backend)
    u = sequence(2, 11, block)
    assert_close(block(u), mamba2_math(block, u), torch.float64, "out")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fp32_forward_and_gradients_match_fp64(device, backend):
    config = CONFIGS["M16-H4-G2-N8"]
    wide, narrow = make_block(config, backend=backend), make_block(config, dtype=torch.float32, backend=backend)
    narrow.load_state_dict(wide.state_dict())  # the same values, rounded to fp32
    u = sequence(2, 20, wide)
    out64, out32 = wide(u), narrow(u.float())
    assert_close(out32, out64, torch.float32, "out")
    out64.square().sum().backward()
    out32.square().sum().backward()
    for (name, p64), p32 in zip(wide.named_parameters(), narrow.parameters()):
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_gradcheck_of_the_block_on_the_cpu_backend():
    block = make_block(CONFIGS["M8-H2-G2-normfirst"], backend="cpu")
    u = sequence(1, 6, block).requires_grad_()
    params = tuple(block.parameters())

    def forward(u, *values):
        return torch.func.functional_call(block, dict(zip([n for n, _ in block.named_parameters()], values)), (u,))

    assert torch.autograd.gradcheck(forward, (u, *params))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_packed_sequences_equal_each_alone(device, backend):
    block = make_block(CONFIGS["M16-H4-G2-N8"], backend=backend)
    lengths = [3, 1, 9, 6]
    u = sequence(1, sum(lengths), block)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out, conv_state, ssm_state = block.prefill(u, cu_seqlens=cu_seqlens)
    assert torch.equal(block(u, cu_seqlens=cu_seqlens), out)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        alone, conv_alone, ssm_alone = block.prefill(u[:, start:end])
        assert_close(out[:, start:end], alone, torch.float64, f"sequence {i}")
        assert_close(conv_state[i], conv_alone[0], torch.float64, f"conv_state {i}")
        assert_close(ssm_state[i], ssm_alone[0], torch.float64, f"ssm_state {i}")


# ---------------------------------------------------------------------------------------
# Decoding.


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_steps_from_zero_states_equal_forward(device, backend, config):
    block = make_block(config, backend=backend)
    u = sequence(2, 7, block)
    conv_state, ssm_state = block.allocate_inference_cache(2, max_seqlen=7)
    with torch.no_grad():
        steps = [block.step(u[:, t:t + 1], conv_state, ssm_state)[0] for t in range(7)]
        expected = block(u)
    assert_close(torch.cat(steps, dim=1), expected, torch.float64, "steps")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_prefill_then_step_continues_the_sequence(device, backend):
    block = make_block(CONFIGS["M12-H3-N4-Dp-K3-bias"], backend=backend)
    u = sequence(2, 12, block)
    with torch.no_grad():
        head, conv_state, ssm_state = block.prefill(u[:, :2])  # shorter than d_conv: zero-padded state
        tail = [block.step(u[:, t:t + 1], conv_state, ssm_state)[0] for t in range(2, 12)]
        expected = block(u)
    assert_close(torch.cat([head, *tail], dim=1), expected, torch.float64, "prefill + steps")


def test_inference_cache_shapes_and_dtypes():
    block = rnnkern.nn.Mamba2(d_model=16, d_state=8, headdim=8, ngroups=2, dtype=torch.bfloat16)
    conv_state, ssm_state = block.allocate_inference_cache(3, max_seqlen=100)
    assert conv_state.shape == (3, 64, 4) and conv_state.dtype == torch.bfloat16
    assert ssm_state.shape == (3, 4, 8, 8) and ssm_state.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# torch.compile, HF transformers, bad input.


def test_compile_fullgraph_matches_eager():
    block = make_block(CONFIGS["M16-H4-G2-N8"], dtype=torch.float32)
    u = sequence(2, 13, block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(u), block(u))


def test_loads_hf_transformers_mamba2_mixer_and_matches_it():
    transformers = pytest.importorskip("transformers", reason="HF transformers is not installed (optional peer)")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    config = transformers.Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, expand=2, state_size=16,
                                       n_groups=2, conv_kernel=4, chunk_size=16, num_hidden_layers=1,
                                       vocab_size=16, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(config, layer_idx=0).eval()
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    block = rnnkern.nn.Mamba2(d_model=32, d_state=16, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=16)
    block.load_state_dict(mixer.state_dict(), strict=True)
    u = torch.randn(2, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(u), mixer(u), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=10, headdim=8), "headdim=8 must divide d_inner"),
    (dict(d_model=16, headdim=8, ngroups=3), "ngroups=3 must divide the 4 heads"),
    (dict(d_model=16, headdim=8, A_init_range=(0, 1)), "A_init_range"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rnnkern.nn.Mamba2(**kwargs)


def test_bad_inputs_name_the_problem():
    block = rnnkern.nn.Mamba2(d_model=16, d_state=8, headdim=8)
    with pytest.raises(ValueError, match="d_model"):
        block(torch.randn(2, 5, 12))
    conv_state, ssm_state = block.allocate_inference_cache(2, 5)
    with pytest.raises(ValueError, match="one token"):
        block.step(torch.randn(2, 3, 16), conv_state, ssm_state)
    with pytest.raises(ValueError, match="ssm_state"):
        block.step(torch.randn(2, 1, 16), conv_state, ssm_state[:1])
    with pytest.raises(ValueError, match="seq_idx needs cu_seqlens"):
        block(torch.randn(1, 5, 16), seq_idx=torch.zeros(1, 5, dtype=torch.int32))
