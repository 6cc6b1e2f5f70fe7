"""Mamba.step and Mamba2.step on the cpu backend run one fused C++ call per block and token:
it gives what the one-step ops give, and its cached parameters follow every change of them."""
import pytest
import torch
from torch import nn

import rnnkern.nn
from tests.conftest import perturb_parameters, ran_op
from tests.tolerances import assert_close

BLOCKS = {  # id: (constructor, fused op)
    "Mamba": (lambda **kw: rnnkern.nn.Mamba(d_model=16, d_state=4, **kw), "rnnkern_C::mamba_block_step"),
    "Mamba2": (lambda **kw: rnnkern.nn.Mamba2(d_model=32, d_state=8, headdim=16, **kw),
               "rnnkern_C::mamba2_block_step"),
}
TOKENS = torch.randn(4, 2, 1, 32, generator=torch.Generator().manual_seed(0))  # 4 tokens, batch 2


def tokens(block) -> torch.Tensor:
    return TOKENS[..., : block.d_model].to(block.in_proj.weight.dtype)


def decode(block, states=None) -> tuple[torch.Tensor, tuple]:
    """Every token of TOKENS through block.step from zero states (or `states`, updated in place)."""
    states = states or block.allocate_inference_cache(2, 4)
    with torch.no_grad():
        ys = [block.step(u, *states)[0] for u in tokens(block)]
    return torch.cat(ys, dim=1), states


@pytest.fixture(params=BLOCKS.values(), ids=BLOCKS.keys())
def block_and_op(request):
    make, op = request.param
    torch.manual_seed(0)
    block = make()
    perturb_parameters(block, seed=1, scale=0.2)
    return block, make, op


def test_fused_step_runs_and_matches_the_one_step_ops(block_and_op):
    block, make, op = block_and_op
    reference = make(backend="reference")
    reference.load_state_dict(block.state_dict())
    assert takes_fused_step(block, op) and not takes_fused_step(reference, op)
    (y, states), (y_ref, states_ref) = decode(block), decode(reference)
    assert_close(y, y_ref, torch.float32, "out")
    for state, state_ref in zip(states, states_ref):
        assert_close(state, state_ref, torch.float32, "state")


def test_fused_step_equals_forward_over_the_sequence(block_and_op):
    block, _, _ = block_and_op
    y, _ = decode(block)
    with torch.no_grad():
        assert_close(y, block(tokens(block)[:, :, 0].transpose(0, 1)), torch.float32, "out")


def takes_fused_step(block, op: str) -> bool:
    """Whether block.step runs the fused kernel `op`, with grad mode off (rnnkern._C's direct
    entry point) and on (the registered op); the profiler sees both under the op's name."""
    def step():
        block.step(tokens(block)[0], *block.allocate_inference_cache(2, 1))

    with torch.no_grad():
        direct = ran_op(op, step)
    assert direct == ran_op(op, step), "the fused step ran with grad mode on or off only"
    return direct


def assert_decodes_like(block, other) -> None:
    """block's step gives what a fresh block holding the same parameters gives."""
    assert_close(decode(block)[0], decode(other)[0], block.in_proj.weight.dtype, "out")


def holding(other, block):
    """`other` with block's parameters, copied in place (no registration: a module built after
    the cache was filled would clear it by its own registrations, hiding a missed change)."""
    other.load_state_dict(block.state_dict())
    return other


def test_cache_follows_load_state_dict(block_and_op):
    block, make, _ = block_and_op
    other = make()
    perturb_parameters(other, seed=5, scale=0.3)
    decode(block)  # fills the cache
    block.load_state_dict(other.state_dict())
    assert_decodes_like(block, other)


def test_cache_follows_an_in_place_change_of_A_log(block_and_op):
    block, make, _ = block_and_op
    other = make()
    decode(block)
    with torch.no_grad():
        block.A_log.mul_(0.5)
    assert_decodes_like(block, holding(other, block))


def test_cache_follows_a_dtype_change(block_and_op):
    block, make, _ = block_and_op
    other = make(dtype=torch.float64)
    decode(block)
    block.double()
    assert decode(block)[0].dtype == torch.float64
    assert_decodes_like(block, holding(other, block))


def test_cache_follows_a_replaced_parameter(block_and_op):
    block, make, _ = block_and_op
    other, weight = make(), nn.Parameter(torch.randn_like(block.out_proj.weight))
    decode(block)
    block.out_proj.weight = weight
    assert_decodes_like(block, holding(other, block))


def test_cache_follows_a_replaced_submodule(block_and_op):
    block, make, _ = block_and_op
    old = block.in_proj
    other, in_proj = make(), nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    decode(block)
    block.in_proj = in_proj
    assert_decodes_like(block, holding(other, block))


def test_parametrized_weight_takes_the_one_step_ops(block_and_op):
    block, make, op = block_and_op
    reference = holding(make(), block)
    torch.nn.utils.parametrize.register_parametrization(block.out_proj, "weight", _Doubled())
    with torch.no_grad():
        reference.out_proj.weight.mul_(2)
    assert not takes_fused_step(block, op)
    assert_decodes_like(block, reference)


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight
