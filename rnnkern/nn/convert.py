"""convert(model): swap torch.nn's LSTM/GRU/LSTMCell/GRUCell for rnnkern's modules in place."""
from typing import Optional

import torch
from torch import nn

from rnnkern.nn.cell import GRUCell, LSTMCell
from rnnkern.nn.rnn import GRU, LSTM

__all__ = ["convert"]

# torch.nn class -> (rnnkern class, constructor arguments copied from the torch.nn module)
_RNN_CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_CELL_CONFIG = ("input_size", "hidden_size", "bias")
_REPLACEMENTS = {
    torch.nn.LSTM: (LSTM, _RNN_CONFIG + ("proj_size",)),
    torch.nn.GRU: (GRU, _RNN_CONFIG),
    torch.nn.LSTMCell: (LSTMCell, _CELL_CONFIG),
    torch.nn.GRUCell: (GRUCell, _CELL_CONFIG),
}


def convert(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Replaces every torch.nn LSTM, GRU, LSTMCell and GRUCell inside `model` by rnnkern's.

    The replacement holds the very same Parameter objects (so device, dtype, requires_grad
    and any optimizer built on them carry over), has the same state_dict keys, and keeps the
    training mode. Only those exact classes are replaced: a subclass may override forward,
    so it is left alone. A module reached twice is replaced by one shared module.

    Args:
        model: any module, at any nesting depth; ``model`` itself may be one of the four.
        backend: passed to every replacement (None: the default backend selection).

    Returns:
        ``model``, changed in place, or the replacement when ``model`` itself is replaced.

    Example::

        >>> model = rnnkern.nn.convert(MyModel())   # its nn.LSTM layers now run on rnnkern
    """
    return _convert(model, backend, {})


def _convert(module: nn.Module, backend: Optional[str], done: dict) -> nn.Module:
    if id(module) in done:
        return done[id(module)]
    replacement = _replacement(module, backend)
    if replacement is None:
        replacement = module
        for name, child in list(module.named_children()):
            setattr(module, name, _convert(child, backend, done))
    done[id(module)] = replacement
    return replacement


def _replacement(module: nn.Module, backend: Optional[str]) -> Optional[nn.Module]:
    """The rnnkern module sharing `module`'s parameters, or None if `module` is not replaced."""
    if type(module) not in _REPLACEMENTS:
        return None
    cls, config = _REPLACEMENTS[type(module)]
    new = cls(**{name: getattr(module, name) for name in config}, device="meta", backend=backend)
    if list(dict(new.named_parameters()).keys()) != list(dict(module.named_parameters()).keys()):
        raise RuntimeError(f"convert: parameters of {type(module).__name__} differ from rnnkern's {cls.__name__}")
    for name, parameter in module.named_parameters(recurse=False):
        setattr(new, name, parameter)
    return new.train(module.training)
