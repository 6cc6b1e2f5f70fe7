"""KV-cache suite: decoding with a transformer's growing KV cache against recurrent states.

Models (benchmarks/lm.py, ~3.3-3.6 M parameters each): a pre-LN transformer LM with a
preallocated KV cache and the same model growing its cache with torch.cat; LSTM and GRU LMs
(rnnkern.nn) and Mamba and Mamba-2 LMs (rnnkern.nn.Mamba, Mamba2), which carry a state of fixed size.

What is measured, all under torch.no_grad, batch 1 unless stated:
  prefill   one call of ``model.prefill(tokens)`` on `context` tokens (timed once: it is long)
  decode    one ``model.step(token, state)`` per call, the state carried from call to call,
            starting at `context` tokens: the per-token latency at that context (median)
  state     bytes of the tensors the decode state holds after the prefill, per sequence (for
            the preallocated cache: its filled positions), measured from the tensors; the
            transformer's record also carries 2 x layers x heads x head_dim x context x bytes
  throughput  tokens/s of decode steps at batch sizes whose decode state fits a fixed
            budget (BUDGET_BYTES) at THROUGHPUT_CONTEXT: a growing cache limits the batch
"""
import time
from typing import Any, Callable

import torch

from benchmarks import lm
from benchmarks.report import progress
from benchmarks.timing import Settings, measure

SECTION = "kv_cache"
COLUMNS = [
    ("ms/token", lambda r: f"{r['ms_per_token']:.4g}"),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:.4g}"),
    ("state KiB/seq", lambda r: f"{r['state_bytes'] / 2**10:.1f}"),
    ("prefill ms", lambda r: f"{r['prefill_ms']:.4g}" if r.get("prefill_ms") is not None else "-"),
    ("params M", lambda r: f"{r['params'] / 1e6:.2f}"),
]
LEGEND = (
    "shape: batch x context; decode: median ms of one token at that context; throughput: batch / ms per step\n"
    "at the batches whose decode state fits the budget (8 sequences of the transformer's KV cache at that\n"
    "context); state: decode-state bytes per sequence, measured from the tensors"
)

MODELS = (("transformer", "preallocated"), ("transformer", "concat"), ("lstm", "cpu"), ("gru", "cpu"),
          ("mamba", "cpu"), ("mamba2", "cpu"))
BATCHES = (1, 4, 16, 64, 256)


def contexts(device: torch.device, quick: bool) -> tuple[int, ...]:
    if device.type == "cuda":
        return (128, 1024, 8192) if quick else (128, 1024, 8192, 32768, 65536)
    return (128, 1024, 8192) if quick else (128, 1024, 4096, 8192, 16384)


def throughput_context(quick: bool) -> int:
    return 1024 if quick else 4096


def budget_bytes(quick: bool) -> int:
    """Eight sequences of the transformer's fp32 KV cache at the throughput context."""
    return 8 * lm.kv_cache_formula_bytes(throughput_context(quick), 1, torch.float32)


def run(settings: Settings) -> list[dict[str, Any]]:
    records = []
    lm.checked_parameter_counts({name: lm.build(name) for name in lm.CONFIGS})
    for name, layout in MODELS:
        model = lm.build(name, layout, device=settings.device)
        for context in contexts(settings.device, settings.quick):
            records.append(_decode_record(model, name, layout, context, settings))
        records.extend(_throughput_records(model, name, layout, settings))
    return records


def _identity(model, name: str, layout: str, direction: str, batch: int, context: int) -> dict[str, Any]:
    return {"suite": "kvcache", "op": name, "backend": layout, "direction": direction, "shape": [batch, context],
            "dtype": "float32", "model": name, "cache": layout if name == "transformer" else None,
            "context": context, "batch": batch, "params": model.parameter_count()}


def _tokens(batch: int, steps: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(steps)
    return torch.randint(0, lm.VOCAB, (batch, steps), generator=gen, device=device)


def _decoder(model, state: Any, token: torch.Tensor) -> Callable[[], None]:
    """One decode step per call, the state carried between calls."""
    carried = [state]

    def step() -> None:
        _, carried[0] = model.step(token, carried[0])

    return step


def _prefill(model, tokens: torch.Tensor, capacity: int, device: torch.device) -> tuple[Any, float]:
    _synchronize(device)
    start = time.perf_counter()
    state = model.prefill(tokens, capacity)
    _synchronize(device)
    return state, (time.perf_counter() - start) * 1e3


def _decode_record(model, name, layout, context, settings) -> dict[str, Any]:
    progress(f"kvcache decode {name}[{layout}] context {context}")
    steps = settings.warmup + settings.repeats
    with torch.no_grad():
        state, prefill_ms = _prefill(model, _tokens(1, context, settings.device), context + steps, settings.device)
        state_bytes = lm.state_bytes(model, state)
        timing = measure(_decoder(model, state, _tokens(1, 1, settings.device)[:, 0]), settings)
    record = {**_identity(model, name, layout, "decode", 1, context), **timing.as_record(),
              "ms_per_token": timing.median_ms, "tokens_per_s": 1e3 / timing.median_ms,
              "state_bytes": state_bytes, "prefill_ms": prefill_ms}
    if name == "transformer":
        record["state_bytes_formula"] = lm.kv_cache_formula_bytes(context, 1, torch.float32)
    return record


def _throughput_records(model, name, layout, settings) -> list[dict[str, Any]]:
    """Decode tokens/s per batch size, for the batches whose state fits the budget."""
    context, budget = throughput_context(settings.quick), budget_bytes(settings.quick)
    steps = settings.warmup + settings.repeats
    records = []
    for batch in BATCHES:
        progress(f"kvcache throughput {name}[{layout}] batch {batch}")
        with torch.no_grad():
            # a recurrent state is the same size after any prefill: a short one builds it
            prefill_steps = context if name == "transformer" else 16
            state, _ = _prefill(model, _tokens(batch, prefill_steps, settings.device), prefill_steps + steps,
                                settings.device)
            state_bytes = lm.state_bytes(model, state)
            if state_bytes > budget:
                break
            timing = measure(_decoder(model, state, _tokens(batch, 1, settings.device)[:, 0]), settings)
        records.append({**_identity(model, name, layout, "throughput", batch, context), **timing.as_record(),
                        "ms_per_token": timing.median_ms, "tokens_per_s": batch * 1e3 / timing.median_ms,
                        "state_bytes": state_bytes // batch, "budget_bytes": budget})
    return records


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
