"""Random shapes, strides and packings: the cpu backend against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnkern
from rnnkern import _backends
from tests.tolerances import assert_close

pytestmark = pytest.mark.skipif(_backends.unavailable_reason("cpu") is not None, reason="no compiled extension")


@st.composite
def scan_inputs(draw):
    packed = draw(st.booleans())
    batch = 1 if packed else draw(st.integers(1, 3))
    steps = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 600))  # crosses the channel block sizes (64 ... 512)
    cu_seqlens = None
    if packed:
        cuts = sorted(draw(st.lists(st.integers(0, steps), max_size=4)))
        cu_seqlens = torch.tensor([0, *cuts, steps])
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, steps, dim, cu_seqlens, draw(st.booleans()), draw(st.booleans()), seed


@settings(max_examples=40, deadline=None)
@given(scan_inputs(), st.sampled_from([torch.float32, torch.float64]))
def test_cpu_matches_reference_on_random_inputs(inputs, dtype):
    batch, steps, dim, cu_seqlens, reverse, transpose, seed = inputs
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, dim, steps) if transpose else (batch, steps, dim)
    a = 2 * torch.rand(shape, generator=gen, dtype=dtype) - 1
    b = torch.randn(shape, generator=gen, dtype=dtype)
    if transpose:  # channel stride != 1
        a, b = a.transpose(1, 2), b.transpose(1, 2)
    states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = torch.randn(states, dim, generator=gen, dtype=dtype)
    results = {}
    for backend in ("cpu", "reference"):
        leaves = [x.clone().requires_grad_() for x in (a, b, h0)]
        h, final = rnnkern.linear_scan(*leaves, reverse=reverse, cu_seqlens=cu_seqlens, output_final_state=True,
                                       backend=backend)
        (h.sum() + 2 * final.sum()).backward()
        results[backend] = [h, final] + [x.grad for x in leaves]
    for name, got, want in zip(["h", "final", "grad_a", "grad_b", "grad_h0"], results["cpu"], results["reference"]):
        assert_close(got, want, dtype, name)
