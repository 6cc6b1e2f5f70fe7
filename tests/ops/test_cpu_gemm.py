"""The CPU kernels' BLAS fallback GEMM, the path a torch without oneDNN's small-matrix kernel
(or a CPU without AVX2) takes: RNNKERN_CPU_GEMM=blas forces it. The switch is read once per
process, so the checks run in a fresh interpreter with it set: the LSTM and GRU layers
(forward and backward, fp32) and the input projection against the reference, and the torch
profiler shows the BLAS calls (aten::mm, aten::linear) inside the compiled ops."""
import os
import subprocess
import sys
import textwrap

import pytest

from rnnkern import _backends

pytestmark = pytest.mark.skipif(
    _backends.unavailable_reason("cpu") is not None, reason=f"cpu backend: {_backends.unavailable_reason('cpu')}"
)

CHECKS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch.profiler import profile

    import rnnkern
    from tests.tolerances import assert_close

    def ops_run(fn):
        with profile() as prof:
            fn()
        return {event.name for event in prof.events()}

    def layer(kind, x, states, weights, lengths, reverse, backend):
        if kind == "lstm":
            y, (h, c) = rnnkern.lstm_layer(x, tuple(states), *weights, lengths=lengths, reverse=reverse,
                                           backend=backend)
            return [y, h, c]
        y, h = rnnkern.gru_layer(x, states[0], *weights, lengths=lengths, reverse=reverse, backend=backend)
        return [y, h]

    def outputs_and_grads(kind, x, states, weights, lengths, reverse, backend):
        leaves = [t.detach().requires_grad_() for t in [x, *states, *weights]]
        outs = layer(kind, leaves[0], leaves[1:len(states) + 1], leaves[len(states) + 1:], lengths, reverse,
                     backend)
        gen = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=gen) for o in outs]
        return outs + list(torch.autograd.grad(outs, leaves, cotangents))

    gen = torch.Generator().manual_seed(0)
    batch, steps, features, hidden, proj = 5, 12, 16, 24, 16
    lengths = torch.tensor([12, 7, 1, 12, 3])
    for kind, gates, p in (("lstm", 4, 0), ("lstm", 4, proj), ("gru", 3, 0)):
        out = p or hidden
        x = torch.randn(batch, steps, features, generator=gen)
        states = [torch.randn(batch, out, generator=gen)] + ([torch.randn(batch, hidden, generator=gen)]
                                                             if kind == "lstm" else [])
        rows = gates * hidden
        shapes = ((rows, features), (rows, out), (rows,), (rows,))  # w_ih, w_hh, b_ih, b_hh
        weights = [0.2 * torch.randn(shape, generator=gen) for shape in shapes]
        if p:
            weights.append(0.2 * torch.randn(p, hidden, generator=gen))
        for lens, reverse in ((None, False), (lengths, True)):
            got = outputs_and_grads(kind, x, states, weights, lens, reverse, "cpu")
            want = outputs_and_grads(kind, x, states, weights, lens, reverse, "reference")
            for i, (g, w) in enumerate(zip(got, want)):
                assert_close(g, w, torch.float32, f"{kind} proj={p} lengths={lens is not None} output/grad {i}")
        gx = torch.randn(batch, steps, rows, generator=gen)
        if kind == "lstm":
            def forward():
                torch.ops.rnnkern_C.lstm_layer_fwd(gx, *states, weights[1], weights[4] if p else None, None, False,
                                                   True)
        else:
            def forward():
                torch.ops.rnnkern_C.gru_layer_fwd(gx, *states, weights[1], weights[3], None, False, True)
        assert "aten::mm" in ops_run(forward), f"{kind}_layer_fwd ran no BLAS GEMM"

    x, weight = torch.randn(300, 37, generator=gen), torch.randn(70, 37, generator=gen)
    bias = torch.randn(70, generator=gen)
    for b in (bias, None):
        assert_close(torch.ops.rnnkern_C.input_projection(x, weight, b), F.linear(x, weight, b), torch.float32,
                     "input_projection")
    assert "aten::linear" in ops_run(lambda: torch.ops.rnnkern_C.input_projection(x, weight, bias))
    print("fallback checked")
    """
)


def _run(code: str, setting: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with RNNKERN_CPU_GEMM=setting, importing what this one does."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, RNNKERN_CPU_GEMM=setting, PYTHONPATH=os.pathsep.join([root, *filter(None, sys.path)]))
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def test_blas_fallback_matches_the_reference():
    result = _run(CHECKS, "blas")
    assert result.returncode == 0 and "fallback checked" in result.stdout, result.stdout + result.stderr


def test_an_unknown_setting_is_an_error():
    code = "import torch, rnnkern._C; torch.ops.rnnkern_C.input_projection(torch.ones(2, 3), torch.ones(4, 3), None)"
    result = _run(code, "fast")
    assert result.returncode != 0 and "RNNKERN_CPU_GEMM must be 'blas', 'auto' or unset" in result.stderr
