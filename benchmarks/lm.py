"""Small decoder language models for the KV-cache comparison, built from torch and rnnkern.

Every model maps tokens (B, T) to logits (B, T, V) and decodes one token at a time:

    state = model.prefill(tokens, capacity)  # (B, T) -> the decode state after T tokens
    logits, state = model.step(token, state) # token (B,) -> logits (B, V), the next state
    model.state_tensors(state)               # the tensors the state holds, to measure

A transformer's state is its KV cache, which grows with the context; the recurrent models
(LSTM, GRU: rnnkern.nn; Mamba, Mamba-2: rnnkern.nn.Mamba, Mamba2) carry a state of fixed size. Sizes are set
so that all models have about the same parameter count (see CONFIGS; checked in the suite).
"""
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rnnkern.nn

VOCAB = 256  # byte-level tokens


@dataclass(frozen=True)
class Config:
    d_model: int
    layers: int
    heads: int = 0  # transformer only


# ~3.3-3.6 M parameters each (within 25% of one another; the suite records the counts)
CONFIGS = {
    "transformer": Config(d_model=256, layers=4, heads=4),
    "lstm": Config(d_model=448, layers=2),
    "gru": Config(d_model=512, layers=2),
    "mamba": Config(d_model=256, layers=8),
    "mamba2": Config(d_model=256, layers=8),  # d_state 64, 8 heads of 64 channels (MIXERS)
}


MAX_PARAMETER_RATIO = 1.25


def checked_parameter_counts(models: dict) -> dict[str, int]:
    """{name: parameter count}; raises if the largest model exceeds the smallest by over 25%."""
    counts = {name: model.parameter_count() for name, model in models.items()}
    if max(counts.values()) > MAX_PARAMETER_RATIO * min(counts.values()):
        raise ValueError(f"the models' sizes are not matched within 25%: {counts}")
    return counts


def build(name: str, cache: str = "preallocated", device=None, dtype=None) -> "LanguageModel":
    """The model `name` of CONFIGS (`cache` picks the transformer's KV-cache layout)."""
    config = CONFIGS[name]
    factory = {"device": device, "dtype": dtype}
    if name == "transformer":
        return TransformerLM(config, cache, **factory).eval()
    if name in MIXERS:
        return MambaLM(config, MIXERS[name], **factory).eval()
    return RecurrentLM(name, config, **factory).eval()


class LanguageModel(nn.Module):
    def __init__(self, d_model: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(VOCAB, d_model, **factory)
        self.head = nn.Linear(d_model, VOCAB, bias=False, **factory)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------
# Transformer: pre-LN blocks, multi-head attention through F.scaled_dot_product_attention.


@dataclass
class KVCache:
    """Keys and values per layer, each (B, heads, capacity, head_dim); `length` positions hold data.

    "preallocated": capacity fixed up front, each step writes its position in place.
    "concat": the tensors hold exactly `length` positions; each step grows them with torch.cat
    (what code without a cache class tends to do: it copies the whole cache every token).
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int
    layout: str

    def filled(self) -> list[Tensor]:
        return [t[:, :, :self.length] for t in self.keys + self.values]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Adds k, v (B, heads, 1, head_dim) of the current position; returns the layer's filled K, V."""
        if self.layout == "concat":
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
            return self.keys[layer], self.values[layer]
        self.keys[layer][:, :, self.length] = k[:, :, 0]
        self.values[layer][:, :, self.length] = v[:, :, 0]
        return self.keys[layer][:, :, :self.length + 1], self.values[layer][:, :, :self.length + 1]


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model, **factory)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False, **factory)
        self.out = nn.Linear(d_model, d_model, bias=False, **factory)
        self.norm2 = nn.LayerNorm(d_model, **factory)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, **factory), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, **factory))

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, d_model) -> q, k, v, each (B, heads, T, head_dim)."""
        batch, steps, _ = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, T, head_dim)
        x = x + self.out(attended.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


def positions(index: Tensor, x_like: Tensor) -> Tensor:
    """Sinusoidal position encodings (T,) -> (T, d_model): no parameters, any length."""
    half = x_like.shape[1] // 2
    frequencies = torch.exp(torch.arange(half, device=index.device) * (-9.2103 / half))  # 10000^(-i/half)
    angles = index[:, None].to(torch.float32) * frequencies  # (T, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(x_like.dtype)


class TransformerLM(LanguageModel):
    def __init__(self, config: Config, cache: str, device=None, dtype=None) -> None:
        super().__init__(config.d_model, device, dtype)
        self.cache_layout = cache
        self.blocks = nn.ModuleList(Block(config.d_model, config.heads, device, dtype) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.d_model, device=device, dtype=dtype)

    def prefill(self, tokens: Tensor, capacity: int) -> KVCache:
        """Runs tokens (B, T) causally; the cache holds their keys and values (room for `capacity`)."""
        batch, steps = tokens.shape
        x = self.embed(tokens) + positions(torch.arange(steps, device=tokens.device), x_like=self.head.weight)
        keys, values = [], []
        for block in self.blocks:
            q, k, v = block.split_heads(block.norm1(x))
            x = block.attend(x, q, k, v, causal=True)
            keys.append(self._stored(k, capacity))
            values.append(self._stored(v, capacity))
        return KVCache(keys, values, steps, self.cache_layout)

    def _stored(self, t: Tensor, capacity: int) -> Tensor:
        if self.cache_layout == "concat":
            return t.contiguous()
        room = t.new_empty((*t.shape[:2], max(capacity, t.shape[2]), t.shape[3]))
        room[:, :, :t.shape[2]] = t
        return room

    def step(self, token: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        if self.cache_layout == "preallocated" and cache.length >= cache.keys[0].shape[2]:
            raise ValueError(f"the KV cache is full ({cache.length} positions); prefill with a larger capacity")
        position = torch.full((1,), cache.length, device=token.device)
        x = (self.embed(token) + positions(position, x_like=self.head.weight))[:, None]  # (B, 1, d_model)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.split_heads(block.norm1(x))
            keys, values = cache.append(layer, k, v)
            x = block.attend(x, q, keys, values, causal=False)  # the one query sees every position
        cache.length += 1
        return self.head(self.norm(x[:, 0])), cache

    @staticmethod
    def state_tensors(cache: KVCache) -> list[Tensor]:
        return cache.filled()


# ---------------------------------------------------------------------------------------
# Recurrent models.


class RecurrentLM(LanguageModel):
    """Embedding -> rnnkern.nn.LSTM or GRU (batch_first) -> linear head."""

    def __init__(self, kind: str, config: Config, device=None, dtype=None) -> None:
        super().__init__(config.d_model, device, dtype)
        cls = rnnkern.nn.LSTM if kind == "lstm" else rnnkern.nn.GRU
        self.rnn = cls(config.d_model, config.d_model, num_layers=config.layers, batch_first=True,
                       device=device, dtype=dtype)

    def prefill(self, tokens: Tensor, capacity: int = 0) -> Any:
        _, state = self.rnn(self.embed(tokens))
        return state

    def step(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        y, state = self.rnn(self.embed(token)[:, None], state)
        return self.head(y[:, 0]), state

    @staticmethod
    def state_tensors(state: Any) -> list[Tensor]:
        return list(state) if isinstance(state, tuple) else [state]


# The state-space blocks of the Mamba LMs: (d_model, layer_idx, device, dtype) -> block
MIXERS = {
    "mamba": rnnkern.nn.Mamba,
    "mamba2": functools.partial(rnnkern.nn.Mamba2, d_state=64, headdim=64),
}


class MambaLM(LanguageModel):
    """Embedding -> pre-LN residual state-space blocks (rnnkern.nn.Mamba or Mamba2) -> linear head."""

    def __init__(self, config: Config, mixer: Callable[..., nn.Module], device=None, dtype=None) -> None:
        super().__init__(config.d_model, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.norms = nn.ModuleList(nn.LayerNorm(config.d_model, **factory) for _ in range(config.layers))
        self.mixers = nn.ModuleList(mixer(config.d_model, layer_idx=i, **factory) for i in range(config.layers))
        self.norm = nn.LayerNorm(config.d_model, **factory)

    def prefill(self, tokens: Tensor, capacity: int = 0) -> list[tuple[Tensor, Tensor]]:
        """Each layer's (conv_state, ssm_state) after tokens (B, T), from its parallel forward."""
        x = self.embed(tokens)
        states = []
        for norm, mixer in zip(self.norms, self.mixers):
            y, conv_state, ssm_state = mixer.prefill(norm(x))
            states.append((conv_state, ssm_state))
            x = x + y
        return states

    def step(self, token: Tensor, states: list) -> tuple[Tensor, list]:
        x = self.embed(token)[:, None]  # (B, 1, d_model)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
            y, conv_state, ssm_state = mixer.step(norm(x), *states[i])
            states[i] = (conv_state, ssm_state)
            x = x + y
        return self.head(self.norm(x[:, 0])), states

    @staticmethod
    def state_tensors(states: list) -> list[Tensor]:
        return [t for pair in states for t in pair]


def state_bytes(model: LanguageModel, state: Any) -> int:
    """Bytes of the decode state's tensors (for a preallocated KV cache: the filled positions)."""
    return sum(t.numel() * t.element_size() for t in model.state_tensors(state))


def kv_cache_formula_bytes(context: int, batch: int, dtype: torch.dtype) -> int:
    """2 x layers x heads x head_dim x context x bytes, per the transformer's config."""
    config = CONFIGS["transformer"]
    return 2 * config.layers * config.d_model * context * batch * torch.empty((), dtype=dtype).element_size()

