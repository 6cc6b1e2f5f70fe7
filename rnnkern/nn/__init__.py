"""Drop-in nn.Modules on rnnkern's ops: torch.nn signatures, parameter names and state_dicts."""
from rnnkern.nn.cell import GRUCell, LSTMCell
from rnnkern.nn.convert import convert
from rnnkern.nn.mamba import Mamba
from rnnkern.nn.mamba2 import Mamba2
from rnnkern.nn.norm import RMSNormGated
from rnnkern.nn.rnn import GRU, LSTM

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "Mamba", "Mamba2", "RMSNormGated", "convert"]
