"""rnnkern: fast recurrence kernels for PyTorch."""
from rnnkern._backends import BACKENDS, BackendError
from rnnkern.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from rnnkern.ops.gru import gru_cell, gru_layer
from rnnkern.ops.linear_scan import linear_scan
from rnnkern.ops.lstm import lstm_cell, lstm_layer
from rnnkern.ops.mamba_chunk_scan import mamba_chunk_scan
from rnnkern.ops.rms_norm_gated import rms_norm_gated
from rnnkern.ops.selective_scan import selective_scan, selective_state_update
from rnnkern import nn  # noqa: I001  (after the ops it wraps)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "causal_conv1d", "causal_conv1d_update", "gru_cell", "gru_layer",
           "linear_scan", "lstm_cell", "lstm_layer", "mamba_chunk_scan", "nn", "rms_norm_gated", "selective_scan", "selective_state_update",
           "__version__"]
