"""What only a CUDA device shows (ladder step 6): launches on the inputs' device, no host
syncs in an op call, decode steps captured in a CUDA graph. Skipped without CUDA; the rest of
the suite also runs on cuda tensors there (tests/conftest.py)."""
import pytest
import torch

import rnnkern
from tests.tolerances import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _randn(*shape, device, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device, dtype)


def _every_sequence_op(device):
    """(name, thunk) per sequence op on `device`, with packed lengths / cu_seqlens on the
    device; each thunk runs forward and backward and returns the outputs and gradients."""
    torch.manual_seed(0)

    def grads(outputs, leaves):
        outputs = [o for o in outputs if o.requires_grad]
        return list(outputs) + list(torch.autograd.grad([o.float().sum() for o in outputs], leaves))

    def linear_scan():
        a = torch.rand(1, 600, 64, device=device).requires_grad_()
        b = _randn(1, 600, 64, device=device).requires_grad_()
        cu_seqlens = torch.tensor([0, 100, 600], device=device, dtype=torch.int32)
        h, final = rnnkern.linear_scan(a, b, cu_seqlens=cu_seqlens, output_final_state=True)
        return grads([h, final], [a, b])

    def selective_scan():
        u, delta = _randn(2, 64, 300, device=device).requires_grad_(), _randn(2, 64, 300, device=device)
        A = -torch.rand(64, 16, device=device)
        B, C = _randn(2, 1, 16, 300, device=device), _randn(2, 1, 16, 300, device=device)
        out, last = rnnkern.selective_scan(u, delta.requires_grad_(), A, B, C, delta_softplus=True,
                                           return_last_state=True)
        return grads([out, last], [u, delta])

    def mamba_chunk_scan():
        x = _randn(1, 600, 4, 64, device=device).requires_grad_()
        dt, A = torch.rand(1, 600, 4, device=device).requires_grad_(), -torch.rand(4, device=device)
        B, C = _randn(1, 600, 1, 128, device=device), _randn(1, 600, 1, 128, device=device)
        cu_seqlens = torch.tensor([0, 100, 600], device=device, dtype=torch.int32)
        out, final = rnnkern.mamba_chunk_scan(x, dt, A, B, C, 256, cu_seqlens=cu_seqlens, dt_softplus=True,
                                              return_final_states=True)
        return grads([out, final], [x, dt])

    def recurrence(layer, gates, hidden):
        def run():
            x = _randn(4, 50, 8, device=device).requires_grad_()
            w_ih, w_hh = _randn(gates * hidden, 8, device=device, scale=0.3), _randn(gates * hidden, hidden,
                                                                                     device=device, scale=0.1)
            lengths = torch.tensor([50, 3, 17, 1], device=device)
            y, _ = layer(x, None, w_ih, w_hh, lengths=lengths)
            return grads([y], [x])
        return run

    return [("linear_scan", linear_scan), ("selective_scan", selective_scan), ("mamba_chunk_scan", mamba_chunk_scan),
            ("lstm_persistent", recurrence(rnnkern.lstm_layer, 4, 32)),
            ("lstm_alternating", recurrence(rnnkern.lstm_layer, 4, 96)),
            ("gru_persistent", recurrence(rnnkern.gru_layer, 3, 32)),
            ("gru_alternating", recurrence(rnnkern.gru_layer, 3, 96))]


SEQUENCE_OPS = [name for name, _ in _every_sequence_op("cpu")]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("index", range(len(SEQUENCE_OPS)), ids=SEQUENCE_OPS)
def test_launches_run_on_the_inputs_device(index):
    """Tensors on cuda:1 while cuda:0 is current give cuda:1's results of the same op."""
    name, on_second = _every_sequence_op("cuda:1")[index]
    torch.cuda.set_device(0)
    actual = on_second()
    with torch.cuda.device(1):
        expected = _every_sequence_op("cuda:1")[index][1]()
    for a, e in zip(actual, expected):
        assert a.device == torch.device("cuda:1")
        assert_close(a, e, torch.float32, name)


@pytest.mark.parametrize("index", range(len(SEQUENCE_OPS)), ids=SEQUENCE_OPS)
def test_an_op_call_never_waits_for_the_gpu(index):
    """No host sync in forward and backward (lengths and cu_seqlens are checked on the device):
    torch's sync debug mode makes any synchronising call an error."""
    name, run = _every_sequence_op("cuda")[index]
    run()  # compile first: the sync check is about the calls, not Triton's first load
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _decode_steps(device):
    """(name, inputs, step) per one-token op: step(*inputs) -> output, updating states in place."""
    batch, dim, state, width = 2, 64, 16, 4

    def selective_update(state_, x, dt, A, B, C, D, z, dt_bias):
        return rnnkern.selective_state_update(state_, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)

    def conv_update(x, conv_state, weight, bias):
        return rnnkern.causal_conv1d_update(x, conv_state, weight, bias, activation="silu")

    def lstm_step(x, h, c, w_ih, w_hh, b):
        h_new, c_new = rnnkern.lstm_cell(x, (h, c), w_ih, w_hh, b, b)
        h.copy_(h_new)
        c.copy_(c_new)
        return h_new

    def gru_step(x, h, w_ih, w_hh, b):
        h_new = rnnkern.gru_cell(x, h, w_ih, w_hh, b, b)
        h.copy_(h_new)
        return h_new

    r = lambda *shape, scale=1.0: _randn(*shape, device=device, scale=scale)  # noqa: E731
    return [
        ("selective_state_update", selective_update,
         [r(batch, dim, state), r(batch, dim), r(batch, dim), -torch.rand(dim, state, device=device),
          r(batch, state), r(batch, state), r(dim), r(batch, dim), r(dim)]),
        ("causal_conv1d_update", conv_update, [r(batch, dim), r(batch, dim, width), r(dim, width), r(dim)]),
        ("lstm_cell", lstm_step, [r(batch, 8), r(batch, 96), r(batch, 96), r(384, 8, scale=0.3),
                                  r(384, 96, scale=0.1), r(384)]),
        ("gru_cell", gru_step, [r(batch, 8), r(batch, 96), r(288, 8, scale=0.3), r(288, 96, scale=0.1), r(288)]),
    ]


@pytest.mark.parametrize("index", range(4), ids=[name for name, _, _ in _decode_steps("cpu")])
def test_decode_step_replays_from_a_cuda_graph(index):
    """Three tokens captured once, replayed on fresh inputs: the same outputs and states as
    running the steps eagerly."""
    name, step, inputs = _decode_steps("cuda")[index]
    eager = [x.clone() for x in inputs]
    static = [x.clone() for x in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) outside the capture
        step(*[x.clone() for x in inputs])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(*static)
    for token in range(3):
        new_x = _randn(*inputs[0].shape, device="cuda")  # first input: this token's x
        eager[0].copy_(new_x)
        static[0].copy_(new_x)
        expected = step(*eager)
        graph.replay()
        assert_close(static_out, expected, torch.float32, f"{name} token {token}")
        for s, e in zip(static[1:], eager[1:]):
            assert_close(s, e, torch.float32, f"{name} state after token {token}")


def _alternating_layer(kind, batch, steps, proj=0, seed=0):
    """run() -> outputs and the gradients of x, h0 and the weights of an alternating-path layer
    (H = 96; a projection to `proj` for the LSTM), with packed lengths on the device."""
    gates, hidden = (4 if kind == "lstm" else 3), 96
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: (torch.randn(shape, generator=gen) * scale).cuda()  # noqa: E731
    x, h0 = randn(batch, steps, 8), randn(batch, proj or hidden)
    weights = [randn(gates * hidden, 8, scale=0.3), randn(gates * hidden, proj or hidden, scale=0.1)]
    w_hr = randn(proj, hidden, scale=0.1) if proj else None
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen).cuda()
    leaves = [t.requires_grad_() for t in (x, h0, *weights)] + ([w_hr.requires_grad_()] if proj else [])

    def run():
        if kind == "lstm":
            c0 = torch.zeros(batch, hidden, device="cuda")
            y, (h, c) = rnnkern.lstm_layer(x, (h0, c0), *weights, w_hr=w_hr, lengths=lengths, reverse=True)
            outputs = [y, h, c]
        else:
            outputs = list(rnnkern.gru_layer(x, h0, *weights, lengths=lengths, reverse=True))
        return outputs + list(torch.autograd.grad([o.square().sum() for o in outputs], leaves))
    return run


@pytest.mark.parametrize("kind,proj", [("lstm", 0), ("lstm", 40), ("gru", 0)], ids=["lstm", "lstm-proj", "gru"])
def test_alternating_steps_replay_from_a_cuda_graph(kind, proj, monkeypatch):
    """The alternating path's step loops replay from captured CUDA graphs: the same results as
    the eager launches (RNNKERN_STEP_GRAPHS=0), a cache hit on a second call, a new capture
    when the sequence length changes, none while the caller captures a graph itself."""
    from rnnkern.ops import _triton

    _triton._step_graphs.clear()
    for seed, (steps, captured) in enumerate(((7, 2), (7, 2), (12, 4))):  # a forward and a backward loop per T
        run = _alternating_layer(kind, 20, steps, proj, seed)
        monkeypatch.setenv("RNNKERN_STEP_GRAPHS", "0")
        eager = run()
        monkeypatch.setenv("RNNKERN_STEP_GRAPHS", "1")
        replayed = run()
        for index, (got, want) in enumerate(zip(replayed, eager)):
            assert torch.equal(got, want), f"{kind} T={steps} output/gradient {index}"
        assert len(_triton._step_graphs) == captured
    names = [key[0] for key in _triton._step_graphs]
    assert names == [f"{kind}_fwd_alternating", f"{kind}_bwd_alternating"] * 2

    assert not _triton.step_graphs_enabled(torch.device("cpu"))
    graph, stream, static = torch.cuda.CUDAGraph(), torch.cuda.Stream(), torch.zeros(1, device="cuda")
    with torch.cuda.graph(graph, stream=stream):
        static.add_(1)
        assert not _triton.step_graphs_enabled(torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_mamba_chunk_scan_at_mamba2_tiles(dtype, deterministic):
    """The triton backend at Mamba-2's tiles (head dim 64, state 128, chunk 256: BLOCK_Q 64, all
    of p and n) over three chunks, 3 heads a group, packed sequences, z, D and initial states:
    forward and every gradient against the reference (the deterministic backward bitwise equal
    from run to run)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=dtype, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to("cuda", dtype)

    inputs = [randn(2, 700, 6, 64), randn(2, 700, 6, dtype=torch.float32), -torch.rand(6, generator=gen).cuda() - 0.5,
              randn(2, 700, 2, 128, scale=0.3), randn(2, 700, 2, 128, scale=0.3), randn(6, 64, dtype=torch.float32),
              randn(2, 700, 6, 64), randn(2, 6, 64, 128, dtype=torch.float32)]
    seq_idx = (torch.arange(700, device="cuda") >= 300).to(torch.int32)[None].expand(2, -1)

    def run(backend):
        leaves = [t.detach().requires_grad_() for t in inputs]
        x, dt, A, B, C, D, z, h0 = leaves
        out, final = rnnkern.mamba_chunk_scan(x, dt, A, B, C, 256, D=D, z=z, initial_states=h0, seq_idx=seq_idx,
                                              dt_softplus=True, return_final_states=True, backend=backend)
        cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to("cuda", t.dtype) for t in (out, final)]
        return [out, final, *torch.autograd.grad((out, final), leaves, cotangents)]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        gen.manual_seed(1)
        actual = run("triton")
        if deterministic:
            gen.manual_seed(1)
            for a, b in zip(actual, run("triton")):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)
    gen.manual_seed(1)
    expected = run("reference")
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, dtype, f"output/gradient {index}")
