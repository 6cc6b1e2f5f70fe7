"""rnnkern.nn.convert: swaps torch.nn's recurrent modules for rnnkern's, keeping the weights."""
import pytest
import torch

import rnnkern.nn
from tests.tolerances import assert_close


class Decoder(torch.nn.Module):
    """A custom module holding a GRUCell, run over time in a Python loop."""

    def __init__(self):
        super().__init__()
        self.cell = torch.nn.GRUCell(6, 5)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):  # x (T, B, 6) -> (T, B, 2)
        h, outputs = None, []
        for x_t in x:
            h = self.cell(x_t, h)
            outputs.append(self.head(h))
        return torch.stack(outputs)


class Model(torch.nn.Module):
    """Recurrent modules at several depths: in a Sequential, a ModuleDict and a custom module."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        self.rnns = torch.nn.ModuleDict({
            "lstm": torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3),
            "gru": torch.nn.GRU(6, 3, batch_first=True),
        })
        self.cells = torch.nn.ModuleList([torch.nn.LSTMCell(3, 3), Decoder()])

    def forward(self, x):  # x (T, B, 3)
        y, (h, c) = self.rnns["lstm"](self.encoder(x))  # (T, B, 6)
        z, g = self.rnns["gru"](y.transpose(0, 1))  # (B, T, 3)
        hc = self.cells[0](z[:, -1], (g[0], g[0]))
        return self.cells[1](y), h, c, g, hc[0], hc[1]


def build(dtype=torch.float64):
    torch.manual_seed(0)
    return Model().to(dtype)


def outputs_and_grads(model, x) -> list:
    x = x.detach().requires_grad_()
    outputs = model(x)
    loss = sum((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() for out in outputs)
    grads = torch.autograd.grad(loss, [x] + list(model.parameters()))
    return list(outputs) + list(grads)


RECURRENT = (torch.nn.LSTM, torch.nn.GRU, torch.nn.LSTMCell, torch.nn.GRUCell)


def test_nested_model_gives_the_same_outputs_and_gradients():
    model = build()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    expected = outputs_and_grads(model, x)
    before = dict(model.named_parameters())
    converted = rnnkern.nn.convert(model, backend="reference")
    assert converted is model
    assert type(model.rnns["lstm"]) is rnnkern.nn.LSTM
    assert type(model.rnns["gru"]) is rnnkern.nn.GRU
    assert type(model.cells[0]) is rnnkern.nn.LSTMCell
    assert type(model.cells[1].cell) is rnnkern.nn.GRUCell
    assert not any(isinstance(m, RECURRENT) for m in model.modules())
    assert model.rnns["gru"].batch_first and model.rnns["lstm"].proj_size == 3
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    assert all(after[name] is before[name] for name in before), "parameters must be the same objects"
    for actual, wanted in zip(outputs_and_grads(model, x), expected):
        assert_close(actual, wanted, torch.float64, "converted model")


def test_state_dict_keys_are_unchanged():
    model = build()
    keys = list(model.state_dict())
    rnnkern.nn.convert(model)
    assert list(model.state_dict()) == keys
    build().load_state_dict(model.state_dict(), strict=True)


def test_training_mode_device_and_dtype_are_kept():
    model = build(torch.float32)
    model.rnns.eval()
    rnnkern.nn.convert(model)
    assert not model.rnns["lstm"].training and not model.rnns["gru"].training
    assert model.cells[0].training and model.cells[1].cell.training
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.float32, "cpu")}


@pytest.mark.parametrize("module,expected_type", [
    (torch.nn.LSTM(3, 4, dropout=0.2, num_layers=2), rnnkern.nn.LSTM),
    (torch.nn.GRU(3, 4, bias=False), rnnkern.nn.GRU),
    (torch.nn.LSTMCell(3, 4), rnnkern.nn.LSTMCell),
    (torch.nn.GRUCell(3, 4, bias=False), rnnkern.nn.GRUCell),
], ids=["lstm", "gru", "lstm-cell", "gru-cell"])
def test_a_recurrent_module_itself_is_replaced(module, expected_type):
    module.eval()
    replacement = rnnkern.nn.convert(module, backend="reference")
    assert type(replacement) is expected_type
    assert not replacement.training and replacement.backend == "reference"
    assert repr(replacement) == repr(module).replace(")", ", backend='reference')")
    assert all(a is b for a, b in zip(replacement.parameters(), module.parameters()))


def test_shared_module_is_replaced_by_one_shared_module():
    lstm = torch.nn.LSTM(3, 4)
    model = torch.nn.ModuleDict({"a": lstm, "b": torch.nn.Sequential(lstm)})
    rnnkern.nn.convert(model)
    assert type(model["a"]) is rnnkern.nn.LSTM
    assert model["b"][0] is model["a"]


def test_subclasses_are_left_alone():
    class CustomLSTM(torch.nn.LSTM):
        pass

    model = torch.nn.Sequential(CustomLSTM(3, 4), torch.nn.GRU(4, 4))
    rnnkern.nn.convert(model)
    assert type(model[0]) is CustomLSTM
    assert type(model[1]) is rnnkern.nn.GRU
