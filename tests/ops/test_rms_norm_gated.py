"""rms_norm_gated against mamba_ssm's and HF's formulas written out in fp64, gradients, bad input."""
import pytest
import torch
import torch.nn.functional as F

import rnnkern
from rnnkern.ops.rms_norm_gated import reference
from tests.conftest import ran_op
from tests.tolerances import assert_close


def norm_math(x, weight, bias, z, eps, group_size, norm_before_gate):
    """x (..., d) normalised per group of `group_size`, gated by silu(z) before or after, in fp64."""
    x = x.double()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.double())
    groups = x.unflatten(-1, (-1, group_size))
    out = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.double()
    if bias is not None:
        out = out + bias.double()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.double())
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("group_size", [None, 4, 12])
@pytest.mark.parametrize("gate", ["none", "before", "after"])
def test_matches_the_formula(dtype, group_size, gate):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=gen).to(dtype)
    weight, bias = torch.randn(12, generator=gen).to(dtype), torch.randn(12, generator=gen).to(dtype)
    z = None if gate == "none" else torch.randn(3, 5, 12, generator=gen).to(dtype)
    out = rnnkern.rms_norm_gated(x, weight, bias, z, eps=1e-5, group_size=group_size,
                                 norm_before_gate=gate == "before")
    expected = norm_math(x, weight, bias, z, 1e-5, group_size or 12, gate == "before")
    assert out.dtype == dtype
    assert_close(out, expected.to(dtype), dtype, "out")


def test_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x, z = (torch.randn(2, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    for before in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, z, w: rnnkern.rms_norm_gated(x, w, None, z, group_size=4, norm_before_gate=before),
            (x, z, weight))


def test_module_is_mamba_ssm_shaped():
    norm = rnnkern.nn.RMSNormGated(16, group_size=8, norm_before_gate=False)
    assert list(norm.state_dict()) == ["weight"] and torch.equal(norm.weight, torch.ones(16))
    x, z = torch.randn(2, 16), torch.randn(2, 16)
    torch.testing.assert_close(norm(x, z), norm_math(x, norm.weight, None, z, 1e-5, 8, False).float())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(group_size=5), ValueError, "group_size must be a positive int dividing d=12"),
    (dict(weight=torch.ones(10)), ValueError, "weight must have shape \\(12,\\)"),
    (dict(z=torch.randn(3, 11)), ValueError, "z must have the shape of x"),
    (dict(eps=-1.0), ValueError, "eps must be a float >= 0"),
    (dict(x=torch.ones(3, 12, dtype=torch.int64)), TypeError, "x must be float16"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(x=torch.randn(3, 12), weight=torch.ones(12))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rnnkern.rms_norm_gated(**args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_kernel_runs_without_grad_and_matches_the_reference(dtype):
    """fp32/fp64 CPU calls with nothing to differentiate take the C++ kernel (what the tests
    above compare to the formula); with a gradient to record, the reference's torch ops."""
    gen = torch.Generator().manual_seed(2)
    x, z = (torch.randn(4, 24, generator=gen, dtype=dtype) for _ in range(2))
    weight, bias = torch.randn(24, generator=gen, dtype=dtype), torch.randn(24, generator=gen, dtype=dtype)
    args = (x, weight, bias, z, 1e-5, 8, False)
    with torch.no_grad():
        assert ran_op("rnnkern_C::rms_norm_gated", lambda: rnnkern.rms_norm_gated(*args))
    assert not ran_op("rnnkern_C::rms_norm_gated", lambda: rnnkern.rms_norm_gated(x, weight.requires_grad_(), *args[2:]))
    with torch.no_grad():
        assert_close(rnnkern.rms_norm_gated(*args), reference.rms_norm_gated(*args), dtype, "out")
