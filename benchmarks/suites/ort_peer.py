"""ONNX Runtime as a peer of the LSTM and GRU suites: torch.nn's module, exported, run by ORT.

Methods:
  export   the torch.nn.LSTM/GRU a case compares against, once per case, with
           ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter, which emits ONNX's own
           LSTM/GRU nodes) into an in-memory buffer, at the case's static shapes; the forward
           takes x only (zero initial state, as ``module(x)``), the step takes x and the state
  session  CPUExecutionProvider, intra_op_num_threads = torch.get_num_threads() (the threads
           torch uses), inter_op_num_threads = 1, spinning disabled
           (``session.intra_op.allow_spinning`` = "0", the inter-op one too): ORT's worker
           threads otherwise keep spinning after each run and take the cores from whichever
           contender runs next in the interleaved timing
  timing   ``session.run`` with numpy inputs built outside the timer (for a step, the state is
           fed with every call, as the modules get it); its outputs come back as new numpy
           arrays, which the timing includes
  check    once at creation, on random inputs (and random state for a step), every output
           against torch.nn's within TOLERANCE, so a wrong export is never timed
ORT has no backward: it is not timed on forward + backward.
"""
import functools
import importlib.util
import io
import warnings
from typing import Any, Callable, Optional, Union

import torch

TOLERANCE = 1e-4  # max |ORT - torch.nn| over every output element, fp32

METHOD = ("onnxruntime: torch.nn's module exported with torch.onnx.export(dynamo=False), "
          "CPUExecutionProvider, intra_op_num_threads = torch.get_num_threads(), inter_op_num_threads = 1, "
          "spinning disabled (session.intra_op.allow_spinning = 0: spinning workers would take the cores "
          "of the contender timed next); session.run on numpy inputs built outside the timer; "
          f"outputs checked against torch.nn's within {TOLERANCE:g} at creation")

State = Union[None, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # none, a GRU's h, an LSTM's (h, c)


def _tensors(state: State) -> list[torch.Tensor]:
    return [] if state is None else [state] if isinstance(state, torch.Tensor) else list(state)


class OutputMismatch(ValueError):
    """ORT's outputs differ from torch.nn's by more than TOLERANCE."""


def unavailable() -> Optional[str]:
    """Why the peer cannot run here, or None."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (it is in the bench extra)"
    return None


def create(reference: torch.nn.Module, x: torch.Tensor, state: State) -> Union["OnnxRuntimePeer", str]:
    """`reference` exported and checked on (x, state) (random values, the timed shapes); a string
    saying why where onnxruntime is absent or the outputs differ."""
    reason = unavailable()
    if reason is not None:
        return reason
    peer = OnnxRuntimePeer(export(reference, x, state))
    try:
        peer.check(reference, x, state)
    except OutputMismatch as err:
        return str(err)
    return peer


def export(module: torch.nn.Module, x: torch.Tensor, state: State) -> bytes:
    """The ONNX model of module(x) or module(x, state), at these shapes."""
    args = (x,) if state is None else (x, state)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The exporter's notes on itself: the TorchScript exporter is the legacy one (chosen
        # here for its standard LSTM/GRU nodes; it also deprecates a logging helper it calls),
        # and the traced shapes, batch size included, are fixed into the model (they are meant
        # to be: one export per case, at the case's shapes).
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export",
                                DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size other than 1", UserWarning)
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        torch.onnx.export(module, args, buffer, dynamo=False,
                          input_names=["x", *("h0", "c0")[:len(_tensors(state))]],
                          output_names=["y", *("h_n", "c_n")[:2 if isinstance(module, torch.nn.LSTM) else 1]])
    return buffer.getvalue()


class OnnxRuntimePeer:
    """An ONNX model of an LSTM/GRU in an ORT session set up as the module docstring says."""

    def __init__(self, model: bytes) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]

    def feeds(self, x: torch.Tensor, state: State) -> dict[str, Any]:
        """The session's inputs as numpy arrays."""
        tensors = [x, *_tensors(state)]
        if len(tensors) != len(self.input_names):
            raise ValueError(f"the model takes {self.input_names}, got {len(tensors)} tensors")
        return {name: tensor.detach().cpu().numpy() for name, tensor in zip(self.input_names, tensors)}

    def timed_call(self, x: torch.Tensor, state: State) -> Callable[[], Any]:
        """``session.run`` on (x, state), converted to numpy here, outside the timer."""
        return functools.partial(self.session.run, None, self.feeds(x, state))

    def check(self, reference: torch.nn.Module, x: torch.Tensor, state: State) -> None:
        """Raises OutputMismatch unless every output is within TOLERANCE of reference(x, state)'s."""
        with torch.no_grad():
            y, final = reference(x, state)
        expected = [y, *_tensors(final)]
        got = self.session.run(None, self.feeds(x, state))
        names = [node.name for node in self.session.get_outputs()]
        if len(got) != len(expected):
            raise OutputMismatch(f"onnxruntime gave {len(got)} outputs {names}, torch.nn {len(expected)}")
        for name, want, have in zip(names, expected, got):
            if tuple(have.shape) != tuple(want.shape):
                raise OutputMismatch(f"onnxruntime's {name} has shape {have.shape}, torch.nn's {tuple(want.shape)}")
            error = (torch.from_numpy(have) - want).abs().max().item()
            if not error <= TOLERANCE:
                raise OutputMismatch(f"onnxruntime's {name} differs from torch.nn's by {error:.3g} (> {TOLERANCE:g})")
