"""Shared helpers for the LSTM and GRU op tests: one adapter per kind of recurrence."""
import importlib
from dataclasses import dataclass
from typing import Optional

import torch

import rnnkern
from rnnkern import _backends
from rnnkern.ops.gru import GRU_LAYER
from rnnkern.ops.lstm import LSTM_LAYER


@dataclass(frozen=True)
class Kind:
    name: str  # "lstm" or "gru"
    gates: int

    @property
    def layer_op(self) -> _backends.Op:
        """The registry entry of rnnkern.lstm_layer / gru_layer."""
        return LSTM_LAYER if self.name == "lstm" else GRU_LAYER

    @property
    def triton(self):
        """The Triton launchers' module (imports triton)."""
        return importlib.import_module(f"rnnkern.ops.{self.name}.triton")

    def module(self, features, hidden, proj=0, **kwargs) -> torch.nn.Module:
        if self.name == "lstm":
            return torch.nn.LSTM(features, hidden, proj_size=proj, batch_first=True, **kwargs)
        return torch.nn.GRU(features, hidden, batch_first=True, **kwargs)

    def weights(self, module, direction: int = 0) -> list:
        """[w_ih, w_hh, b_ih, b_hh] (+ [w_hr] for a projected LSTM) of layer 0."""
        suffix = "_reverse" if direction else ""
        names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
        if getattr(module, "proj_size", 0):
            names.append("weight_hr")
        return [getattr(module, f"{name}_l0{suffix}") for name in names]

    def states(self, batch, hidden, proj, dtype, device, gen) -> list:
        """Random initial states: [h0, c0] or [h0]."""
        shapes = [(batch, proj or hidden), (batch, hidden)] if self.name == "lstm" else [(batch, hidden)]
        return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]

    def layer(self, x, states, weights, lengths=None, reverse=False, backend=None) -> list:
        """[y, h_T] (+ [c_T] for LSTM) from the rnnkern layer op."""
        if self.name == "lstm":
            y, (h, c) = rnnkern.lstm_layer(x, tuple(states), *weights, lengths=lengths, reverse=reverse,
                                           backend=backend)
            return [y, h, c]
        y, h = rnnkern.gru_layer(x, states[0], *weights, lengths=lengths, reverse=reverse, backend=backend)
        return [y, h]

    def cell(self, x, states, weights, backend=None) -> list:
        if self.name == "lstm":
            return list(rnnkern.lstm_cell(x, tuple(states), *weights, backend=backend))
        return [rnnkern.gru_cell(x, states[0], *weights, backend=backend)]


LSTM, GRU = Kind("lstm", 4), Kind("gru", 3)
KINDS = [LSTM, GRU]


def random_weights(kind: Kind, features, hidden, proj, dtype, device, gen, bias=True) -> list:
    rows, scale = kind.gates * hidden, hidden**-0.5
    shapes = [(rows, features), (rows, proj or hidden)] + ([(rows,), (rows,)] if bias else [])
    weights = [scale * (2 * torch.rand(s, generator=gen, dtype=torch.float64) - 1) for s in shapes]
    if not bias:
        weights += [None, None]
    if proj:
        weights.append(scale * (2 * torch.rand((proj, hidden), generator=gen, dtype=torch.float64) - 1))
    return [w if w is None else w.to(device, dtype) for w in weights]


def outputs_and_grads(kind, x, states, weights, seed=7, **kwargs) -> dict:
    """Every output, and the gradient of every tensor input under fixed random cotangents."""
    leaves = [t.detach().requires_grad_() for t in [x, *states]]
    params = [w if w is None else w.detach().requires_grad_() for w in weights]
    outs = kind.layer(leaves[0], leaves[1:], params, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    inputs = leaves + [p for p in params if p is not None]
    grads = torch.autograd.grad(outs, inputs, cotangents)
    names = ["y", "h_T", "c_T"][: len(outs)]
    result = dict(zip(names, outs))
    result.update({f"grad_{i}": g for i, g in enumerate(grads)})
    return result


def lengths_tensor(values, device) -> Optional[torch.Tensor]:
    return None if values is None else torch.tensor(values, dtype=torch.int64, device=device)
