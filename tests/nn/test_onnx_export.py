"""Deployment: rnnkern.nn's LSTM and GRU through torch.onnx.export(dynamo=True) run in ONNX
Runtime with the eager outputs, as standard ONNX LSTM/GRU nodes (an ONNX Scan for proj_size),
and so do Mamba and Mamba2 (static shapes: an ONNX Conv and a Scan each);
torch.export.export of LSTM, GRU, Mamba and Mamba2 gives the eager outputs.

Small sizes (I = H = 8, T = 5, B = 2) and a chosen set of configurations that sets every
option at least once per module: each ONNX export takes seconds."""
import functools

import pytest
import torch
from torch.utils import _pytree

import rnnkern.nn
from tests.conftest import perturb_parameters
from tests.tolerances import assert_close

# ONNX Runtime's LSTM/GRU nodes against the eager modules, fp32: what a deployment may expect
ORT_TOLERANCE = 1e-5

SIZE, STEPS, BATCH = 8, 5, 2
# id: (module, num_layers, bidirectional, batch_first, proj_size, initial states, dynamic T and B)
CASES = {
    "lstm-L1": ("LSTM", 1, False, False, 0, False, False),
    "lstm-L2-bi-bf-hx": ("LSTM", 2, True, True, 0, True, False),
    "lstm-L1-bi-hx-dyn": ("LSTM", 1, True, False, 0, True, True),
    "lstm-L2-bf-dyn": ("LSTM", 2, False, True, 0, False, True),
    "lstm-L1-bi-bf-proj-hx-dyn": ("LSTM", 1, True, True, 4, True, True),
    "lstm-L2-proj": ("LSTM", 2, False, False, 4, False, False),
    "gru-L1": ("GRU", 1, False, False, 0, False, False),
    "gru-L2-bi-bf-hx": ("GRU", 2, True, True, 0, True, False),
    "gru-L1-bi-bf-dyn": ("GRU", 1, True, True, 0, False, True),
    "gru-L2-hx-dyn": ("GRU", 2, False, False, 0, True, True),
}


def make_model(case: str) -> torch.nn.Module:
    kind, layers, bidirectional, batch_first, proj_size, _, _ = CASES[case]
    torch.manual_seed(0)
    config = {"proj_size": proj_size} if kind == "LSTM" else {}
    return getattr(rnnkern.nn, kind)(
        SIZE, SIZE, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **config
    ).eval()


def make_inputs(case: str, steps: int = STEPS, batch: int = BATCH) -> tuple:
    """The forward's arguments: x, and hx when the case passes initial states."""
    kind, layers, bidirectional, batch_first, proj_size, with_states, _ = CASES[case]
    x = torch.randn(batch, steps, SIZE) if batch_first else torch.randn(steps, batch, SIZE)
    if not with_states:
        return (x,)
    rows = layers * (2 if bidirectional else 1)
    h0 = torch.randn(rows, batch, proj_size or SIZE)
    return (x, (h0, torch.randn(rows, batch, SIZE)) if kind == "LSTM" else h0)


def dynamic_shapes(case: str):
    """torch.export's dynamic_shapes for a case: T and B of x and B of every state, or None."""
    kind, _, _, batch_first, _, with_states, dynamic = CASES[case]
    if not dynamic:
        return None
    steps, batch = torch.export.Dim("T"), torch.export.Dim("B")
    x = {0: batch, 1: steps} if batch_first else {0: steps, 1: batch}
    if not with_states:
        return (x,)
    return (x, ({1: batch}, {1: batch}) if kind == "LSTM" else {1: batch})


@functools.cache
def exported(case: str):
    """(model, ONNX program) of a case, exported once for every test that reads it."""
    pytest.importorskip("onnx", reason="ONNX export needs onnx")
    pytest.importorskip("onnxscript", reason="ONNX export with dynamo=True needs onnxscript")
    model = make_model(case)
    program = torch.onnx.export(model, make_inputs(case), dynamo=True, dynamic_shapes=dynamic_shapes(case))
    return model, program


@pytest.mark.parametrize("case", CASES)
def test_onnx_runtime_matches_eager(case):
    ort = pytest.importorskip("onnxruntime", reason="running the exported model needs onnxruntime")
    model, program = exported(case)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    shapes = [(STEPS, BATCH), (3, 3)] if CASES[case][-1] else [(STEPS, BATCH)]
    for steps, batch in shapes:
        inputs = make_inputs(case, steps, batch)
        feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), _pytree.tree_leaves(inputs))}
        outputs = session.run(None, feeds)
        with torch.no_grad():
            expected = _pytree.tree_leaves(model(*inputs))  # y, h_n (, c_n)
        assert len(outputs) == len(expected)
        for name, actual, wanted in zip(("y", "h_n", "c_n"), outputs, expected):
            torch.testing.assert_close(torch.from_numpy(actual), wanted, rtol=ORT_TOLERANCE, atol=ORT_TOLERANCE,
                                       msg=lambda m, name=name: f"{name} at T={steps}, B={batch}: {m}")


@pytest.mark.parametrize("case", ["lstm-L2-bi-bf-hx", "gru-L2-bi-bf-hx", "lstm-L2-proj"])
def test_onnx_graph_holds_standard_nodes(case):
    """One ONNX LSTM/GRU node per layer (both directions in it); a Scan per projected layer."""
    kind, layers, _, _, proj_size, _, _ = CASES[case]
    _, program = exported(case)
    op_types = [node.op_type for node in program.model.graph]
    expected = "Scan" if proj_size else kind
    assert op_types.count(expected) == layers, op_types
    assert not [node for node in program.model.graph if node.domain.startswith("rnnkern")]


MAMBA2 = {"d_model": 32, "d_state": 8, "headdim": 8}  # E = 64: H = 8 heads of P = 8
TORCH_EXPORT_MODELS = {  # id: (model factory, input shape)
    "lstm-L2-bi-proj": (lambda: rnnkern.nn.LSTM(SIZE, SIZE, num_layers=2, bidirectional=True, proj_size=4),
                        (STEPS, BATCH, SIZE)),
    "gru-bf": (lambda: rnnkern.nn.GRU(SIZE, SIZE, batch_first=True), (BATCH, STEPS, SIZE)),
    "mamba": (lambda: rnnkern.nn.Mamba(d_model=SIZE, d_state=4), (BATCH, STEPS, SIZE)),
    "mamba2": (lambda: rnnkern.nn.Mamba2(**MAMBA2), (BATCH, STEPS, 32)),
}


@pytest.mark.parametrize("name", TORCH_EXPORT_MODELS)
def test_torch_export_matches_eager(name):
    factory, shape = TORCH_EXPORT_MODELS[name]
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(shape)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        for actual, expected in zip(_pytree.tree_leaves(program.module()(x)), _pytree.tree_leaves(model(x))):
            assert_close(actual, expected, torch.float32, name)


ONNX_MAMBA_MODELS = {  # id: model factory (static shapes: input (BATCH, MAMBA_STEPS, d_model))
    "mamba": lambda: rnnkern.nn.Mamba(d_model=SIZE, d_state=4),
    "mamba2-rmsnorm-G2": lambda: rnnkern.nn.Mamba2(**MAMBA2, ngroups=2),
    "mamba2-gate-G2-Dhdim-limit": lambda: rnnkern.nn.Mamba2(**MAMBA2, ngroups=2, rmsnorm=False, D_has_hdim=True,
                                                            dt_limit=(0.0, 0.05)),
}
MAMBA_STEPS = 6


@pytest.mark.parametrize("name", ONNX_MAMBA_MODELS)
def test_mamba_onnx_runtime_matches_eager(name):
    """Mamba and Mamba2 export with static shapes: the causal conv as an ONNX Conv, the scan as
    a Scan, no rnnkern nodes; ONNX Runtime gives the eager output."""
    pytest.importorskip("onnxscript", reason="ONNX export with dynamo=True needs onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="running the exported model needs onnxruntime")
    torch.manual_seed(0)
    model = ONNX_MAMBA_MODELS[name]().eval()
    perturb_parameters(model, 1, 0.2)  # D, the norm's weight off their ones, so that a wrong use shows
    x = torch.randn(BATCH, MAMBA_STEPS, model.d_model)
    program = torch.onnx.export(model, (x,), dynamo=True)
    assert {"Conv", "Scan"} <= {node.op_type for node in program.model.graph}
    assert not [node for node in program.model.graph if node.domain.startswith("rnnkern")]
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(actual), model(x), torch.float32, "out")


def test_mamba2_export_refuses_packed_sequences(monkeypatch):
    """cu_seqlens (and seq_idx) have no ONNX translation: a clear error while exporting."""
    monkeypatch.setattr(rnnkern.nn._onnx, "exporting", lambda: True)
    model = rnnkern.nn.Mamba2(**MAMBA2)
    with pytest.raises(ValueError, match="ONNX export takes no seq_idx or cu_seqlens"):
        model(torch.randn(1, MAMBA_STEPS, 32), cu_seqlens=torch.tensor([0, 2, MAMBA_STEPS], dtype=torch.int32))
