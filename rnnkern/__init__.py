"""rnnkern: fast recurrence kernels for PyTorch."""
from rnnkern._backends import BACKENDS, BackendError
from rnnkern.ops.gru import gru_cell, gru_layer
from rnnkern.ops.linear_scan import linear_scan
from rnnkern.ops.lstm import lstm_cell, lstm_layer
from rnnkern import nn  # noqa: I001  (after the ops it wraps)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "gru_cell", "gru_layer", "linear_scan", "lstm_cell", "lstm_layer", "nn",
           "__version__"]
