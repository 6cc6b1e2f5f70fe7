"""Decode suite: one token through a whole Mamba or Mamba-2 block, the streaming call.

``block.step(u, conv_state, ssm_state)`` of rnnkern.nn.Mamba (d_model 256, d_state 16) and
Mamba2 (d_model 256, d_state 64, headdim 64), fp32, under torch.no_grad, the states carried
from call to call. On the cpu backend the step is one C++ call for the block
(rnnkern.ops.mamba_block_step). Baseline, timed in the same process taking turns:
  torch    the same block's step as the chain of torch ops it is made of
           (rnnkern.ops.mamba_block_step.reference: F.linear, the conv and state-update
           one-step ops in plain PyTorch, the gate), on the same parameters and states.

Beside each time: the bytes a token must read, the block's parameters once plus its states
read and written (the floor a step cannot go below is these bytes at the memory's speed),
and the GB/s that time achieves.
"""
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

import rnnkern.nn
from benchmarks import report
from benchmarks.report import progress, speedup_columns
from benchmarks.timing import Settings, measure_together
from rnnkern.ops.mamba_block_step import reference

SECTION = "kernels"
COLUMNS = [*speedup_columns("vs torch", "speedup_vs_torch")[:-1],
           ("KiB/token", lambda r: f"{r['bytes_per_token'] / 2**10:.0f}"),
           ("GB/s", lambda r: f"{r['bytes_per_token'] / r['ms_median'] / 1e6:.1f}")]
LEGEND = ("vs torch: the torch ops' median / this median (above 1: faster); KiB/token: parameters read once\n"
          "plus the states read and written; GB/s: those bytes over the median")

BLOCKS = {  # name: d_model -> block
    "mamba": lambda d_model: rnnkern.nn.Mamba(d_model),
    "mamba2": lambda d_model: rnnkern.nn.Mamba2(d_model, d_state=64, headdim=64),
}


@dataclass(frozen=True)
class Case:
    block: str
    batch: int
    d_model: int


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cpu":
        return []  # the fused step is a CPU kernel; on a GPU the blocks step op by op
    batches = (1,) if quick else (1, 16)
    return [Case(block, batch, 256) for block in BLOCKS for batch in batches]


def run(settings: Settings) -> list[dict[str, Any]]:
    records = []
    for case in cases(settings.device, settings.quick):
        torch.manual_seed(0)
        block = BLOCKS[case.block](case.d_model).eval()
        progress(f"decode {case.block} B{case.batch}-d{case.d_model}: torch, cpu")
        with torch.no_grad():
            records += _measure(block, case, settings)
    return records


def _measure(block: torch.nn.Module, case: Case, settings: Settings) -> list[dict[str, Any]]:
    u = torch.randn(case.batch, 1, case.d_model)
    torch_states, states = block.allocate_inference_cache(case.batch, 1), block.allocate_inference_cache(case.batch, 1)
    calls = [functools.partial(_torch_step(block), u, *torch_states), functools.partial(block.step, u, *states)]
    timings = measure_together(calls, settings)
    moved = _bytes_per_token(block, states)
    baseline_ms = timings[0].median_ms
    return [{**_identity(name, case), **timing.as_record(), "speedup_vs_torch": baseline_ms / timing.median_ms,
             "bytes_per_token": moved, "peak_mem_bytes": None}
            for name, timing in zip(("torch", "cpu"), timings)]


def _torch_step(block: torch.nn.Module) -> Callable:
    """The block's step as reference.py's chain of torch ops, on the parameter list (the order
    reference.py documents) made once."""
    A = -torch.exp(block.A_log)
    linears = [block.in_proj.weight, block.in_proj.bias, block.conv1d.weight, block.conv1d.bias]
    outputs = [block.out_proj.weight, block.out_proj.bias]
    if isinstance(block, rnnkern.nn.Mamba2):
        parameters = [*linears, block.dt_bias, A, block.D, block.norm.weight, *outputs]
        norm = (block.d_inner // block.ngroups, block.norm_before_gate, block.norm.eps, *block.dt_limit)
        return lambda u, conv_state, ssm_state: reference.mamba2_block_step(u, conv_state, ssm_state, parameters,
                                                                            *norm)
    parameters = [*linears, block.x_proj.weight, block.dt_proj.weight, block.dt_proj.bias, A, block.D, *outputs]
    return lambda u, conv_state, ssm_state: reference.mamba_block_step(u, conv_state, ssm_state, parameters)


def _bytes_per_token(block: torch.nn.Module, states: tuple) -> int:
    parameters = sum(p.numel() * p.element_size() for p in block.parameters())
    return parameters + 2 * sum(s.numel() * s.element_size() for s in states)


def _identity(backend: str, case: Case) -> dict[str, Any]:
    return {"suite": "decode", "op": f"{case.block}_step", "backend": backend, "direction": "step",
            "shape": [case.batch, case.d_model], "dtype": report.dtype_name(torch.float32), "device": "cpu"}
