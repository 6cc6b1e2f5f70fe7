"""The whole-block decode steps: the cpu kernel against the reference (reference.py, itself the
blocks' one-step ops in sequence), over the blocks' options, and their errors."""
import math

import pytest
import torch

import rnnkern.nn
from rnnkern.ops.mamba_block_step import mamba2_block_step, mamba_block_step
from tests.conftest import perturb_parameters
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.float64]


def dtype_id(dtype) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[dtype]


def random_states(block, batch: int, seed: int) -> tuple:
    conv_state, ssm_state = block.allocate_inference_cache(batch, 1)
    gen = torch.Generator().manual_seed(seed)
    conv_state.copy_(torch.randn(conv_state.shape, generator=gen, dtype=torch.float64))
    ssm_state.copy_(torch.randn(ssm_state.shape, generator=gen, dtype=torch.float64))
    return conv_state, ssm_state


def run_both(step, u, states, *args) -> None:
    """The reference and the cpu kernel from the same states: outputs and new states agree."""
    dtype = u.dtype
    ref_states = tuple(s.clone() for s in states)
    expected = step(u, *ref_states, *args, backend="reference")
    actual = step(u, *states, *args, backend="cpu")
    assert actual.shape == u.shape[:-1] + expected.shape[-1:] and actual.dtype == dtype
    assert_close(actual, expected, dtype, "out")
    for name, new, ref in zip(("conv_state", "ssm_state"), states, ref_states):
        assert_close(new, ref, dtype, name)


def mamba_parameters(block) -> list:
    return [block.in_proj.weight, block.in_proj.bias, block.conv1d.weight, block.conv1d.bias, block.x_proj.weight,
            block.dt_proj.weight, block.dt_proj.bias, -torch.exp(block.A_log), block.D, block.out_proj.weight,
            block.out_proj.bias]


def mamba2_parameters(block) -> list:
    return [block.in_proj.weight, block.in_proj.bias, block.conv1d.weight, block.conv1d.bias, block.dt_bias,
            -torch.exp(block.A_log), block.D, block.norm.weight if block.rmsnorm else None, block.out_proj.weight,
            block.out_proj.bias]


MAMBA_CASES = {  # id: (batch, Mamba kwargs)
    "B1": (1, dict(d_model=16, d_state=4)),
    "B3-bias": (3, dict(d_model=16, d_state=8, bias=True)),
    "B2-no-conv-bias-wide": (2, dict(d_model=40, d_state=16, d_conv=3, conv_bias=False, expand=3)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MAMBA_CASES.values(), ids=MAMBA_CASES.keys())
def test_mamba_block_step_matches_reference(case, dtype):
    batch, kwargs = case
    block = rnnkern.nn.Mamba(**kwargs, dtype=dtype)
    perturb_parameters(block, seed=1, scale=0.1)
    u = torch.randn(batch, 1, kwargs["d_model"], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for seed in range(3):  # three sets of random states
            run_both(mamba_block_step, u.to(dtype), random_states(block, batch, seed),
                     mamba_parameters(block))


@pytest.fixture
def thread_count(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


# The kernels' phases split into chunks per thread (csrc/cpu/phases.h); at the blocks' default
# sizes each phase has several chunks, and one thread runs them all in turn.
@pytest.mark.parametrize("thread_count", [1, 2], indirect=True, ids=lambda n: f"{n}-threads")
@pytest.mark.parametrize("block_type", [rnnkern.nn.Mamba, rnnkern.nn.Mamba2], ids=lambda t: t.__name__)
def test_block_steps_at_default_sizes_on_any_thread_count(block_type, thread_count):
    block = block_type(d_model=256)
    perturb_parameters(block, seed=5, scale=0.1)
    u = torch.randn(4, 1, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        if block_type is rnnkern.nn.Mamba:
            run_both(mamba_block_step, u, random_states(block, 4, 0), mamba_parameters(block))
        else:
            norm = (block.d_inner // block.ngroups, block.norm_before_gate, 1e-5, *block.dt_limit)
            run_both(mamba2_block_step, u, random_states(block, 4, 0), mamba2_parameters(block), *norm)


def test_mamba_block_step_takes_rows_without_a_time_dimension():
    block = rnnkern.nn.Mamba(d_model=16, d_state=4)
    with torch.no_grad():
        run_both(mamba_block_step, torch.randn(3, 16), random_states(block, 3, 0), mamba_parameters(block))


MAMBA2_CASES = {  # id: (batch, Mamba2 kwargs, dt_limit)
    "norm-after-gate": (1, dict(d_model=32, d_state=8, headdim=16), (0.0, math.inf)),
    "norm-before-gate-groups": (2, dict(d_model=32, d_state=8, headdim=8, ngroups=2, norm_before_gate=True,
                                        bias=True), (0.0, math.inf)),
    "no-norm-D-per-channel": (3, dict(d_model=24, d_state=4, headdim=12, rmsnorm=False, D_has_hdim=True,
                                      conv_bias=False), (0.0, math.inf)),
    "dt-clamped": (2, dict(d_model=32, d_state=8, headdim=16, ngroups=2), (0.05, 0.3)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MAMBA2_CASES.values(), ids=MAMBA2_CASES.keys())
def test_mamba2_block_step_matches_reference(case, dtype):
    batch, kwargs, (dt_min, dt_max) = case
    block = rnnkern.nn.Mamba2(**kwargs, dtype=dtype)
    perturb_parameters(block, seed=3, scale=0.1)
    u = torch.randn(batch, 1, kwargs["d_model"], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    norm = (block.d_inner // block.ngroups, block.norm_before_gate, 1e-5)
    with torch.no_grad():
        for seed in range(3):
            run_both(mamba2_block_step, u.to(dtype), random_states(block, batch, seed),
                     mamba2_parameters(block), *norm, dt_min, dt_max)


def test_missing_required_parameter_is_a_clear_error():
    block = rnnkern.nn.Mamba(d_model=16, d_state=4)
    parameters = mamba_parameters(block)
    parameters[4] = None  # x_proj.weight
    with pytest.raises(RuntimeError, match=r"mamba_block_step: parameter 4 \(x_proj_weight\) is required"):
        mamba_block_step(torch.randn(1, 1, 16), *block.allocate_inference_cache(1, 1), parameters, backend="cpu")


def test_wrong_parameter_count_is_a_clear_error():
    block = rnnkern.nn.Mamba2(d_model=32, d_state=8, headdim=16)
    with pytest.raises(RuntimeError, match="mamba2_block_step: expected 10 parameters, got 9"):
        mamba2_block_step(torch.randn(1, 1, 32), *block.allocate_inference_cache(1, 1), mamba2_parameters(block)[:9],
                          64, False, 1e-5, 0.0, math.inf, backend="cpu")


BAD_STATES = {  # id: (which state, how it is made wrong, message)
    "conv-width": (0, lambda s: s[..., :2].contiguous(), r"conv_state must have shape \[2, 32, 4\]"),
    "ssm-batch": (1, lambda s: s[:1], r"ssm_state must have shape \[2, 32, 4\]"),
    "ssm-dtype": (1, lambda s: s.double(), r"ssm_state must be (torch\.)?[Ff]loat"),
    "ssm-strided": (1, lambda s: s.transpose(1, 2).contiguous().transpose(1, 2), r"ssm_state must be contiguous"),
}


@pytest.mark.parametrize("case", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_bad_state_is_a_clear_error(case):
    which, spoil, message = case
    block = rnnkern.nn.Mamba(d_model=16, d_state=4)
    states = list(block.allocate_inference_cache(2, 1))
    states[which] = spoil(states[which])
    with pytest.raises(RuntimeError, match="mamba_block_step: " + message):
        mamba_block_step(torch.randn(2, 1, 16), *states, mamba_parameters(block), backend="cpu")


def test_mamba_block_step_softplus_over_its_whole_range():
    """Time steps from e^-25 to 25 (dt_proj's bias spans [-25, 25]): the kernel's branch-free
    softplus against F.softplus, across the threshold (20) and far into its exponential tail."""
    block = rnnkern.nn.Mamba(d_model=16, d_state=4, expand=4)
    with torch.no_grad():
        block.dt_proj.bias.copy_(torch.linspace(-25, 25, block.d_inner))
        run_both(mamba_block_step, torch.randn(2, 1, 16), random_states(block, 2, 0), mamba_parameters(block))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_registered_ops_pass_opcheck_and_compile(backend):
    """The torch.library ops torch.compile sees: opcheck (schema, mutations, fake tensors), and
    a fullgraph compile of the public functions giving the eager results."""
    from rnnkern.ops.mamba_block_step import _mamba2_block_step_op, _mamba_block_step_op
    mamba, mamba2 = rnnkern.nn.Mamba(d_model=16, d_state=4), rnnkern.nn.Mamba2(d_model=32, d_state=8, headdim=16)
    u = torch.randn(2, 1, 16)
    def detached(parameters):
        return [p if p is None else p.detach() for p in parameters]

    cases = [(_mamba_block_step_op, mamba_block_step, mamba, u, detached(mamba_parameters(mamba)), ()),
             (_mamba2_block_step_op, mamba2_block_step, mamba2, torch.randn(2, 1, 32),
              detached(mamba2_parameters(mamba2)), (64, False, 1e-5, 0.0, math.inf))]
    for op, public, block, x, parameters, settings in cases:
        torch.library.opcheck(op, (x, *random_states(block, 2, 0), parameters, *settings, backend))
        compiled = torch.compile(lambda *args: public(*args, backend=backend), fullgraph=True)
        eager_states, compiled_states = random_states(block, 2, 1), random_states(block, 2, 1)
        expected = public(x, *eager_states, parameters, *settings, backend=backend)
        assert_close(compiled(x, *compiled_states, parameters, *settings), expected, torch.float32, "out")
        for state, eager in zip(compiled_states, eager_states):
            assert_close(state, eager, torch.float32, "state")
