"""rnnkern: fast recurrence kernels for PyTorch."""
from rnnkern._backends import BACKENDS, BackendError
from rnnkern.ops.linear_scan import linear_scan

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "linear_scan", "__version__"]
