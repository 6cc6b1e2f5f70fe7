"""Drop-in torch.nn.LSTM and torch.nn.GRU running on rnnkern's layer ops.

Same constructor, parameter names, shapes, registration order, initialisation and return
conventions as torch.nn; a model can swap one for the other and keep its state_dict. Each
layer and direction is one call of :func:`rnnkern.lstm_layer` / :func:`rnnkern.gru_layer`
(batch-first); a PackedSequence becomes a padded batch plus lengths, so the ops never need
sorted input. The modules subclass ``nn.Module`` directly, so ``torch.compile(fullgraph=True)``
traces them.
"""
import numbers
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkern.nn import _checks, _onnx, _packed
from rnnkern.nn._params import PARAMETER_NAMES, reset_uniform
from rnnkern.nn._step_cache import StepCache
from rnnkern.ops._sequences import streaming_step
from rnnkern.ops.gru import GRU_STACK_STEP, GRU_STEP, gru_layer
from rnnkern.ops.lstm import LSTM_STACK_STEP, LSTM_STEP, lstm_layer

__all__ = ["LSTM", "GRU"]

States = tuple[Tensor, ...]  # (h,) for GRU, (h, c) for LSTM; each (num_layers * D, B, size)


class _Recurrent(nn.Module):
    """A stack of ``num_layers`` recurrent layers, each in one or two directions.

    Subclasses set ``_gates`` (gate blocks per hidden unit), ``_state_names`` (the tensors of
    hx, as errors name them), ``_step_op`` and ``_stack_step_op`` (the registry entries of the
    one-token kernels of a layer and of a stack of layers), and implement ``_layer`` (one
    functional layer call), ``_onnx_layer`` (one layer, every direction, as ONNX export writes
    it), ``_state_tensors`` (hx to a tuple of tensors), ``_state_sizes`` and ``_hidden_output``
    (final states to the returned hx).
    """

    _gates: int

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_config(hidden_size, num_layers, dropout, proj_size)
        self._step_weights_cache = StepCache()  # _step_weights() between streaming calls
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = backend
        self.num_directions = 2 if bidirectional else 1
        # per (layer, direction), in torch.nn's order: {op argument: parameter name}
        self._weight_names = [
            self._register_layer(layer, direction, {"device": device, "dtype": dtype})
            for layer in range(num_layers)
            for direction in range(self.num_directions)
        ]
        self.reset_parameters()

    def _register_layer(self, layer: int, direction: int, factory: dict) -> dict[str, str]:
        """Registers one layer-direction's parameters as torch.nn does; returns their names."""
        output_size = self.proj_size or self.hidden_size
        layer_input = self.input_size if layer == 0 else output_size * self.num_directions
        rows = self._gates * self.hidden_size
        shapes = {"w_ih": (rows, layer_input), "w_hh": (rows, output_size)}
        if self.bias:
            shapes.update(b_ih=(rows,), b_hh=(rows,))
        if self.proj_size:
            shapes["w_hr"] = (self.proj_size, self.hidden_size)
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = {}
        for argument, shape in shapes.items():
            names[argument] = PARAMETER_NAMES[argument] + suffix
            self.register_parameter(names[argument], nn.Parameter(torch.empty(shape, **factory)))
        return names

    def reset_parameters(self) -> None:
        """U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every parameter, as torch.nn."""
        reset_uniform(self, self.hidden_size)

    def flatten_parameters(self) -> None:
        """No-op, for compatibility with torch.nn (the ops need no flat weight buffer)."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters of each layer and direction, in registration order (as torch.nn)."""
        return [[getattr(self, name) for name in names.values()] for names in self._weight_names]

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        options = {
            "proj_size": (self.proj_size, 0),
            "num_layers": (self.num_layers, 1),
            "bias": (self.bias, True),
            "batch_first": (self.batch_first, False),
            "dropout": (self.dropout, 0.0),
            "bidirectional": (self.bidirectional, False),
            "backend": (self.backend, None),
        }
        for name, (value, default) in options.items():
            if value != default:
                text += f", {name}={value!r}" if name == "backend" else f", {name}={value}"
        return text

    def forward(self, input: Union[Tensor, PackedSequence], hx=None):
        """Runs the stack over `input`; see the class docstring for shapes."""
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        return self._forward_padded(input, hx)

    def _forward_padded(self, input: Tensor, hx):
        step = self._streaming_step(input, hx)
        if step is not None:
            return step
        doc = "(B, T, input_size) or (T, input_size)" if self.batch_first else "(T, B, input_size) or (T, input_size)"
        self._check_input(input, (2, 3), doc)
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(0)  # (1, T, I)
        else:
            x = input if self.batch_first else input.transpose(0, 1)  # (B, T, I)
        states = self._initial_states(hx, x, batched)
        y, finals = self._run(x, states, lengths=None)  # (B, T, D * out)
        if not batched:
            return y.squeeze(0), self._hidden_output(tuple(s.squeeze(1) for s in finals))
        return (y if self.batch_first else y.transpose(0, 1)), self._hidden_output(finals)

    def _streaming_step(self, input: Tensor, hx):
        """A one-token call (T = 1) of a one-direction, unprojected module straight to the cpu
        backend's step kernel, layer by layer, without the generic path's Python, which at
        H = 256 costs about as much as the kernel. None for any other call, for training-mode
        dropout between layers, and for any input the cheap checks here do not accept: the
        generic path then runs it and raises its errors.

        The checks are attribute reads and comparisons, with few function calls: in a
        streaming loop each Python call costs a microsecond or more (several times what it
        costs timed alone), and a select() per token cost about as much as the rest."""
        if (self.bidirectional or self.proj_size or not isinstance(input, Tensor) or input.dim() != 3
                or input.shape[2] != self.input_size or not input.is_cpu
                or (self.training and self.dropout > 0 and self.num_layers > 1)):
            return None
        batch, steps = (input.shape[0], input.shape[1]) if self.batch_first else (input.shape[1], input.shape[0])
        if steps != 1:
            return None
        weights = self._step_weights_cache.get(self._step_weights)
        if weights is None or input.dtype != weights[0][0].dtype:
            return None
        states = self._step_states(hx, input, batch)
        if states is None:
            return None
        result = streaming_step(self._step_op, self._stack_step_op, self.backend, input, states, weights)
        if result is None:
            return None
        y, *finals = result  # y like input, finals (L, B, size) each
        return y, self._hidden_output(finals)

    def _step_weights(self) -> Optional[list[tuple]]:
        """Per layer, (w_ih, w_hh, b_ih, b_hh) as registered parameters (biases None without
        bias), or None where one is not a registered parameter (a parametrization, say), for
        the generic path's getattr to resolve. For a one-direction stack."""
        parameters, layers = self._parameters, []
        for names in self._weight_names:
            w_ih, w_hh = parameters.get(names["w_ih"]), parameters.get(names["w_hh"])
            b_ih, b_hh = (parameters.get(names["b_ih"]), parameters.get(names["b_hh"])) if self.bias else (None, None)
            if w_ih is None or w_hh is None or (self.bias and (b_ih is None or b_hh is None)):
                return None
            layers.append((w_ih, w_hh, b_ih, b_hh))
        return layers

    def _step_states(self, hx, x: Tensor, batch: int) -> Optional[States]:
        """hx as (L, B, H) tensors for a one-direction, unprojected streaming call on x (zeros
        for None), or None unless every state is an (L, B, H) tensor of x's dtype."""
        shape = (self.num_layers, batch, self.hidden_size)
        if hx is None:
            return (x.new_zeros(shape),) * len(self._state_names)
        states = hx if isinstance(hx, (tuple, list)) else (hx,)
        if len(states) != len(self._state_names):
            return None
        for state in states:
            if not isinstance(state, Tensor) or state.dtype != x.dtype or state.shape != shape:
                return None
        return tuple(states)

    def _forward_packed(self, input: PackedSequence, hx):
        self._check_input(input.data, (2,), "(N, input_size) packed data")
        rows, times = _packed.positions(input)
        x, lengths = _packed.unpack(input, rows, times)  # (B, T, I), (B,) in the original order
        y, finals = self._run(x, self._initial_states(hx, x, batched=True), lengths)
        # hx and the final states stay in the original batch order, as torch.nn returns them
        return _packed.pack(y, input, rows, times), self._hidden_output(finals)

    def _check_input(self, x, ndims: tuple, doc: str) -> None:
        _checks.input_tensor(type(self).__name__, x, ndims, doc, self.input_size, self.weight_ih_l0)

    def _initial_states(self, hx, x: Tensor, batched: bool) -> Optional[States]:
        """Validated hx as (num_layers * D, B, size) tensors for the batch-first x (B, T, I)."""
        if hx is None:
            return None
        states = self._state_tensors(hx)
        stacked = self.num_layers * self.num_directions
        for (name, size), state in zip(self._state_sizes().items(), states):
            shape = (stacked, x.shape[0], size) if batched else (stacked, size)
            _checks.state(type(self).__name__, name, state, shape, x)
        return states if batched else tuple(s.unsqueeze(1) for s in states)

    def _run(self, x: Tensor, states: Optional[States], lengths: Optional[Tensor]) -> tuple[Tensor, States]:
        """x (B, T, I) through every layer -> y (B, T, D * out) and final states (L * D, B, size)."""
        if lengths is None and _onnx.exporting():
            return self._run_onnx(x, states)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0:
                x = F.dropout(x, self.dropout, training=True)
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                state = None if states is None else tuple(s[index] for s in states)
                y, final = self._layer(x, state, self._weights(index), lengths, direction == 1)
                outputs.append(y)
                finals.append(final)
            x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        if len(finals) == 1:  # one layer, one direction: a view instead of a copy
            return x, tuple(state.unsqueeze(0) for state in finals[0])
        return x, tuple(torch.stack(parts) for parts in zip(*finals))

    def _run_onnx(self, x: Tensor, states: Optional[States]) -> tuple[Tensor, States]:
        """_run as torch.onnx.export traces it: one standard ONNX node per layer (see _onnx)."""
        directions, finals = self.num_directions, []
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0:
                x = F.dropout(x, self.dropout, training=True)
            rows = slice(layer * directions, (layer + 1) * directions)
            layer_states = None if states is None else tuple(s[rows] for s in states)  # (D, B, size) each
            weights = [self._weights(index) for index in range(rows.start, rows.stop)]
            x, layer_finals = self._onnx_layer(x, layer_states, weights)
            finals.append(layer_finals)
        return x, tuple(torch.cat(parts) for parts in zip(*finals))

    def _weights(self, index: int) -> dict[str, Tensor]:
        return {argument: getattr(self, name) for argument, name in self._weight_names[index].items()}


class LSTM(_Recurrent):
    """Multi-layer LSTM, a drop-in ``torch.nn.LSTM`` running on :func:`rnnkern.lstm_layer`.

    Per layer and direction (gate order i, f, g, o, as torch.nn)::

        i, f, g, o = split(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = W_hr (sigmoid(o) * tanh(c_t))      (W_hr only with proj_size > 0)

    Args: as ``torch.nn.LSTM`` (input_size, hidden_size, num_layers, bias, batch_first,
    dropout, bidirectional, proj_size, device, dtype), plus ``backend`` passed to every op.

    Shapes (D = 2 if bidirectional else 1, P = proj_size or hidden_size, L = num_layers):
        input: ``(T, B, input_size)``, ``(B, T, input_size)`` with batch_first, unbatched
            ``(T, input_size)``, or a PackedSequence.
        hx: optional ``(h_0, c_0)``, h_0 ``(L * D, B, P)``, c_0 ``(L * D, B, hidden_size)``
            (without the B dimension for unbatched input); zeros when None.
        returns ``output, (h_n, c_n)``: output ``(T, B, D * P)`` (batch_first: ``(B, T, D * P)``;
            a PackedSequence for packed input), h_n and c_n shaped like h_0 and c_0.

    Example::

        >>> lstm = rnnkern.nn.LSTM(16, 32, num_layers=2, batch_first=True)
        >>> y, (h, c) = lstm(torch.randn(4, 100, 16))      # y: (4, 100, 32)
        >>> y_next, (h, c) = lstm(torch.randn(4, 1, 16), (h, c))  # continue one step
    """

    _gates, _state_names = 4, ("hx[0] (h_0)", "hx[1] (c_0)")
    _step_op, _stack_step_op = LSTM_STEP, LSTM_STACK_STEP

    def _layer(self, x, state, weights, lengths, reverse):
        y, (h, c) = lstm_layer(x, state, **weights, lengths=lengths, reverse=reverse, backend=self.backend)
        return y, (h, c)

    def _onnx_layer(self, x, states, weights):
        return _onnx.lstm_layer(x, states, weights)

    def _state_tensors(self, hx) -> States:
        return _checks.state_pair(type(self).__name__, hx)

    def _state_sizes(self) -> dict[str, int]:
        return dict(zip(self._state_names, (self.proj_size or self.hidden_size, self.hidden_size)))

    def _hidden_output(self, finals: States):
        return finals[0], finals[1]


class GRU(_Recurrent):
    """Multi-layer GRU, a drop-in ``torch.nn.GRU`` running on :func:`rnnkern.gru_layer`.

    Per layer and direction (gate order r, z, n, as torch.nn)::

        r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}

    Args: as ``torch.nn.GRU`` (input_size, hidden_size, num_layers, bias, batch_first,
    dropout, bidirectional, device, dtype), plus ``backend`` passed to every op.

    Shapes (D = 2 if bidirectional else 1, H = hidden_size, L = num_layers):
        input: ``(T, B, input_size)``, ``(B, T, input_size)`` with batch_first, unbatched
            ``(T, input_size)``, or a PackedSequence.
        hx: optional h_0 ``(L * D, B, H)`` (``(L * D, H)`` unbatched); zeros when None.
        returns ``output, h_n``: output ``(T, B, D * H)`` (batch_first: ``(B, T, D * H)``;
            a PackedSequence for packed input), h_n shaped like h_0.

    Example::

        >>> gru = rnnkern.nn.GRU(16, 32, bidirectional=True)
        >>> y, h = gru(torch.randn(100, 4, 16))             # y: (100, 4, 64), h: (2, 4, 32)
    """

    _gates, _state_names = 3, ("hx (h_0)",)
    _step_op, _stack_step_op = GRU_STEP, GRU_STACK_STEP

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            proj_size=0, device=device, dtype=dtype, backend=backend,
        )

    def _layer(self, x, state, weights, lengths, reverse):
        h0 = None if state is None else state[0]
        y, h = gru_layer(x, h0, **weights, lengths=lengths, reverse=reverse, backend=self.backend)
        return y, (h,)

    def _onnx_layer(self, x, states, weights):
        y, h_n = _onnx.gru_layer(x, None if states is None else states[0], weights)
        return y, (h_n,)

    def _state_tensors(self, hx) -> States:
        return (hx,)

    def _state_sizes(self) -> dict[str, int]:
        return {self._state_names[0]: self.hidden_size}

    def _hidden_output(self, finals: States):
        return finals[0]


def _check_config(hidden_size, num_layers, dropout, proj_size) -> None:
    """The constructor checks of torch.nn's recurrent modules."""
    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("proj_size", proj_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be greater than zero, got {hidden_size}")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be greater than zero, got {num_layers}")
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    if proj_size < 0:
        raise ValueError(f"proj_size must be zero (no projection) or positive, got {proj_size}")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}")
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            f"dropout={dropout} has no effect with num_layers=1: it is applied to the output of every "
            "layer except the last",
            stacklevel=3,
        )
