"""The recurrent layers' input projection (rnnkern/ops/_projection.py) against F.linear."""
import pytest
import torch
import torch.nn.functional as F

from rnnkern.ops import _projection
from tests.conftest import ran_op
from tests.tolerances import assert_close

_KERNEL_REASON = _projection.INPUT_PROJECTION.refusal("cpu", torch.device("cpu"), torch.float32)
needs_kernel = pytest.mark.skipif(_KERNEL_REASON is not None, reason=f"cpu backend: {_KERNEL_REASON}")


def _inputs(rows: int, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, rows // 2, 37), generator=gen, dtype=dtype)  # K = 37: not a multiple of a vector
    weight = torch.randn((300, 37), generator=gen, dtype=dtype)  # N = 300: not a multiple of the panel
    return x, weight, torch.randn(300, generator=gen, dtype=dtype) if bias else None


@needs_kernel
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("rows", [_projection.MIN_ROWS, 4098])
def test_matches_linear_with_gradients(rows, bias):
    x, weight, b = _inputs(rows, bias=bias)
    leaves = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    got = _projection.input_projection(x, weight, b, "cpu")
    want = F.linear(x, weight, b)
    assert_close(got, want, torch.float32, "output")
    cotangent = torch.randn_like(want)
    for name, g, w in zip(["x", "weight", "bias"], torch.autograd.grad(got, leaves, cotangent),
                          torch.autograd.grad(want, leaves, cotangent)):
        assert_close(g, w, torch.float32, f"grad of {name}")


def _ran_kernel(run) -> bool:
    return ran_op("rnnkern_C::input_projection", run)


@needs_kernel
def test_the_kernel_runs_only_where_it_pays():
    big, small = _inputs(_projection.MIN_ROWS), _inputs(_projection.MIN_ROWS - 2)
    assert _ran_kernel(lambda: _projection.input_projection(*big, "cpu"))
    assert not _ran_kernel(lambda: _projection.input_projection(*small, "cpu"))
    assert not _ran_kernel(lambda: _projection.input_projection(*big, "reference"))
    bf16 = [t.bfloat16() for t in big]
    assert not _ran_kernel(lambda: _projection.input_projection(*bf16, "cpu"))


@needs_kernel
def test_gradcheck_and_opcheck():
    x, weight, b = _inputs(6, dtype=torch.float64)  # the op's own autograd, the GEMM in fp64
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    assert torch.autograd.gradcheck(_projection._projection_op, leaves)
    torch.library.opcheck(_projection._projection_op, _inputs(8))


def _panel_kernel_reason():
    if _KERNEL_REASON is not None:
        return _KERNEL_REASON
    try:
        torch.ops.rnnkern_C.panel_matmul(torch.zeros(1, 1), torch.zeros(1, 1))
    except RuntimeError as error:
        return str(error)
    return None


@pytest.mark.skipif(_panel_kernel_reason() is not None, reason=str(_panel_kernel_reason()))
@pytest.mark.parametrize("k", [0, 1, 37, 256])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 48, 300])
def test_panel_gemm_matches_matmul(n, k):
    """The AVX2 panel GEMM behind the recurrences (csrc/cpu/panel_gemm.h), called directly so that
    CPUs whose kernels prefer another GEMM check it too: every tile height (1-8 rows and the
    splits above), whole and partial panels, and a transposed right operand as the layers pass."""
    gen = torch.Generator().manual_seed(n * 1000 + k)
    b = torch.randn((n, k), generator=gen).t()  # (k, n) with strides (1, k), like W^T
    for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16]:
        a = torch.randn((m, k), generator=gen)
        got = torch.ops.rnnkern_C.panel_matmul(a, b)
        assert_close(got, (a.double() @ b.double()).float(), torch.float32, f"m={m}")
