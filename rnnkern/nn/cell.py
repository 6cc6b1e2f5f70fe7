"""Drop-in torch.nn.LSTMCell and torch.nn.GRUCell running on rnnkern's cell ops.

Same constructor, parameter names (weight_ih, weight_hh, bias_ih, bias_hh), initialisation,
unbatched input and optional state as torch.nn.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from rnnkern.nn import _checks
from rnnkern.nn._params import reset_uniform
from rnnkern.ops.gru import gru_cell
from rnnkern.ops.lstm import lstm_cell

__all__ = ["LSTMCell", "GRUCell"]


class _Cell(nn.Module):
    """One recurrent step with torch.nn's cell parameters; subclasses set ``_gates``."""

    _gates: int

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        rows = self._gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((rows, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((rows, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every parameter, as torch.nn."""
        reset_uniform(self, self.hidden_size)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            text += f", bias={self.bias}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text

    def _batched_input(self, input: Tensor) -> Tensor:
        """Validated input as (B, input_size)."""
        owner = type(self).__name__
        _checks.input_tensor(owner, input, (1, 2), "(B, input_size) or (input_size,)", self.input_size, self.weight_ih)
        return input if input.dim() == 2 else input.unsqueeze(0)

    def _batched_state(self, name: str, state, x: Tensor, batched: bool) -> Tensor:
        """Validated state as (B, hidden_size)."""
        shape = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        _checks.state(type(self).__name__, name, state, shape, x)
        return state if batched else state.unsqueeze(0)

    def _weights(self) -> tuple:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh


class LSTMCell(_Cell):
    """One LSTM step, a drop-in ``torch.nn.LSTMCell`` running on :func:`rnnkern.lstm_cell`.

    ``i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)``; ``c' = sigmoid(f) c + sigmoid(i) tanh(g)``;
    ``h' = sigmoid(o) tanh(c')``.

    Shapes: input ``(B, input_size)`` or unbatched ``(input_size,)``; hx optional ``(h, c)``,
    each ``(B, hidden_size)`` (``(hidden_size,)`` unbatched), zeros when None; returns
    ``(h', c')`` shaped like hx.

    Example::

        >>> cell = rnnkern.nn.LSTMCell(16, 32)
        >>> h, c = cell(torch.randn(4, 16))
        >>> h, c = cell(torch.randn(4, 16), (h, c))
    """

    _gates = 4

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        x = self._batched_input(input)  # (B, I)
        batched = input.dim() == 2
        if hx is not None:
            h, c = _checks.state_pair(type(self).__name__, hx)
            hx = (self._batched_state("hx[0] (h_0)", h, x, batched), self._batched_state("hx[1] (c_0)", c, x, batched))
        h, c = lstm_cell(x, hx, *self._weights(), backend=self.backend)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_Cell):
    """One GRU step, a drop-in ``torch.nn.GRUCell`` running on :func:`rnnkern.gru_cell`.

    ``r, z = sigmoid(W_i{r,z} x + b_i{r,z} + W_h{r,z} h + b_h{r,z})``;
    ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``; ``h' = (1 - z) n + z h``.

    Shapes: input ``(B, input_size)`` or unbatched ``(input_size,)``; hx optional
    ``(B, hidden_size)`` (``(hidden_size,)`` unbatched), zeros when None; returns h' shaped
    like hx.

    Example::

        >>> cell = rnnkern.nn.GRUCell(16, 32)
        >>> h = cell(torch.randn(4, 16))
        >>> h = cell(torch.randn(4, 16), h)
    """

    _gates = 3

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x = self._batched_input(input)  # (B, I)
        batched = input.dim() == 2
        if hx is not None:
            hx = self._batched_state("hx", hx, x, batched)
        h = gru_cell(x, hx, *self._weights(), backend=self.backend)
        return h if batched else h.squeeze(0)
