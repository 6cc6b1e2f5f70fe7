"""mamba_chunk_scan's triton backend against the reference: forward and the gradients of every
input, in Triton's interpreter on CPU tensors here (on cuda tensors where CUDA is present).
Small shapes: chunks that do and do not divide l, tail chunks, chunks padded to a tile, p and
n not powers of two, grouped B/C, packed sequences."""
import pytest
import torch

import rnnkern
from rnnkern.ops.mamba_chunk_scan import MAMBA_CHUNK_SCAN
from tests.conftest import backend_params
from tests.tolerances import assert_close

pytest.importorskip("triton", reason="triton is not installed: no Triton kernels")

DEVICES = [p.values[0] for p in backend_params(MAMBA_CHUNK_SCAN) if p.values[1] == "triton" and not p.marks]
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# (batch, length, heads, dim, state, groups, chunk_size, options, dtype)
CASES = [
    (1, 1, 2, 4, 4, 1, 8, ("D",), torch.float32),
    (2, 37, 4, 5, 6, 2, 8, ("D", "z", "initial", "seq_idx"), torch.float32),
    (1, 70, 2, 16, 16, 1, 32, ("D", "z", "cu_seqlens"), torch.float32),
    (2, 70, 4, 8, 8, 4, 16, ("z", "initial", "seq_idx", "softplus"), torch.float32),
    (1, 70, 2, 4, 8, 2, 37, ("D", "initial", "cu_seqlens"), torch.float32),
    (2, 37, 3, 16, 4, 1, 64, ("D", "z", "softplus"), torch.float32),
    (1, 37, 2, 8, 8, 1, 16, ("D", "z", "initial"), torch.bfloat16),
    (2, 37, 2, 4, 4, 1, 8, ("D", "initial", "seq_idx"), torch.float16),
]


def case_id(case) -> str:
    batch, length, heads, dim, state, groups, chunk, options, dtype = case
    return "-".join([f"B{batch}-L{length}-H{heads}-P{dim}-N{state}-G{groups}-Q{chunk}", *options, DTYPE_IDS[dtype]])


def make_inputs(case, device, seed=0) -> dict:
    batch, length, heads, dim, state, groups, chunk, options, dtype = case
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=dtype, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    softplus = "softplus" in options
    inputs = dict(
        x=randn(batch, length, heads, dim), B=randn(batch, length, groups, state), C=randn(batch, length, groups, state),
        dt=(randn(batch, length, heads, dtype=torch.float32) if softplus
            else 0.05 + torch.rand(batch, length, heads, generator=gen).to(device) * 0.4),
        A=-(0.5 + torch.rand(heads, generator=gen)).to(device),
        D=randn(heads, dim, dtype=torch.float32) if "D" in options else None,
        z=randn(batch, length, heads, dim) if "z" in options else None,
        dt_bias=randn(heads, dtype=torch.float32, scale=0.5) - 1.0 if softplus else None,
        initial_states=randn(batch, heads, dim, state, dtype=torch.float32) if "initial" in options else None,
    )
    inputs["seq_idx"] = (torch.sort(torch.randint(0, 4, (batch, length), generator=gen), dim=1).values.to(device)
                         if "seq_idx" in options else None)
    inputs["cu_seqlens"] = (torch.tensor([0, length // 3, length // 3, length - 5, length], device=device)
                            if "cu_seqlens" in options else None)
    return inputs


def run(backend, case, inputs: dict) -> tuple:
    chunk = case[6]
    return rnnkern.mamba_chunk_scan(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk, D=inputs["D"], z=inputs["z"],
        dt_bias=inputs["dt_bias"], initial_states=inputs["initial_states"], seq_idx=inputs["seq_idx"],
        cu_seqlens=inputs["cu_seqlens"], dt_softplus=inputs["dt_bias"] is not None, return_final_states=True,
        backend=backend)


DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def outputs_and_grads(backend, case, inputs) -> dict:
    leaves = {k: v.detach().clone().requires_grad_(k in DIFFERENTIABLE) if v is not None else None
              for k, v in inputs.items()}
    out, final = run(backend, case, leaves)
    gen = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype) for t in (out, final)]
    names = [k for k in DIFFERENTIABLE if leaves[k] is not None]
    grads = torch.autograd.grad((out, final), [leaves[k] for k in names], cotangents)
    return {"out": out, "final_states": final, **{f"d{k}": g for k, g in zip(names, grads)}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_the_reference(device, case):
    inputs = make_inputs(case, device)
    actual, expected = (outputs_and_grads(backend, case, inputs) for backend in ("triton", "reference"))
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert_close(actual[name], expected[name], case[-1], f"{case_id(case)} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_inference_and_varlen_states(device):
    """Without gradients no chunk states are kept; the packed sequences' final states come from
    the triton backend's chunk states when asked for."""
    case = (1, 70, 2, 8, 8, 1, 16, ("D", "cu_seqlens"), torch.float32)
    inputs = make_inputs(case, device)
    with torch.no_grad():
        for varlen in (False, True):
            results = [rnnkern.mamba_chunk_scan(
                inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 16, D=inputs["D"],
                cu_seqlens=inputs["cu_seqlens"], return_final_states=True, return_varlen_states=varlen,
                backend=backend) for backend in ("triton", "reference")]
            for index, (got, want) in enumerate(zip(*results)):
                assert_close(got, want, torch.float32, f"varlen={varlen} result {index}")


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_reproducible(device):
    """Under torch.use_deterministic_algorithms(True) the group's heads store dB/dC in slots:
    two runs are bitwise equal, and equal the reference within tolerance."""
    case = (1, 37, 4, 4, 8, 2, 16, ("D", "z"), torch.float32)
    inputs = make_inputs(case, device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (outputs_and_grads("triton", case, inputs) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(previous)
    expected = outputs_and_grads("reference", case, inputs)
    for name in expected:
        assert torch.equal(first[name], second[name]), name
        assert_close(first[name], expected[name], torch.float32, name)
