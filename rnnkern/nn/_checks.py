"""Input validation of the modules: clear errors naming the argument, before any op runs."""
from torch import Tensor


def input_tensor(
    owner: str, x, ndims: tuple, shape_doc: str, features: int, weight: Tensor, features_name: str = "input_size"
) -> None:
    """`x` is a tensor of `ndims` dimensions, `features` wide, with the dtype and device of `weight`."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: input must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() not in ndims:
        raise ValueError(f"{owner}: input must have shape {shape_doc}, got shape {tuple(x.shape)}")
    if x.shape[-1] != features:
        raise ValueError(
            f"{owner}: input must have {features_name}={features} features in its last dimension, "
            f"got shape {tuple(x.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"{owner}: input must have the dtype of the parameters ({weight.dtype}), got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{owner}: input must be on the device of the parameters ({weight.device}), got {x.device}")


def state(owner: str, name: str, s, shape: tuple, x: Tensor) -> None:
    """A state tensor of exactly `shape`, with the dtype and device of the input `x`."""
    doc = str(tuple(shape))
    if not isinstance(s, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor of shape {doc}, got {type(s).__name__}")
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{owner}: {name} must have shape {doc}, got {tuple(s.shape)}")
    if s.dtype != x.dtype:
        raise TypeError(f"{owner}: {name} must have the dtype of input ({x.dtype}), got {s.dtype}")
    if s.device != x.device:
        raise ValueError(f"{owner}: {name} must be on the device of input ({x.device}), got {s.device}")


def state_pair(owner: str, hx) -> tuple:
    """An LSTM's hx: a (h, c) pair of tensors."""
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{owner}: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
    return tuple(hx)
