"""Parameter naming and initialisation shared by the recurrent modules (torch.nn's conventions)."""
import math

from torch import nn

# functional op argument -> torch.nn parameter name prefix
PARAMETER_NAMES = {
    "w_ih": "weight_ih",
    "w_hh": "weight_hh",
    "b_ih": "bias_ih",
    "b_hh": "bias_hh",
    "w_hr": "weight_hr",
}


def reset_uniform(module: nn.Module, hidden_size: int) -> None:
    """Draws every parameter from U(-1/sqrt(H), 1/sqrt(H)) in registration order, as torch.nn does."""
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    for parameter in module.parameters():
        nn.init.uniform_(parameter, -bound, bound)
