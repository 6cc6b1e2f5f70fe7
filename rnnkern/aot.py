"""Ahead-of-time compile checks, verification ladder step 4 (no GPU needed).

Every Triton kernel compiles for sm_80 and sm_90 with ``triton.compile`` and reports its
shared memory, registers and spilled bytes (from cuobjdump). ``python -m rnnkern.aot`` prints
the table. (Step 5, nvcc on the CUDA sources, arrives with the first .cu file.)

A new Triton kernel joins the check by being yielded from its module's ``aot_specs()``,
and a new module by being listed in ``TRITON_MODULES``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

TRITON_MODULES = (
    "rnnkern.ops.linear_scan.triton", "rnnkern.ops.lstm.triton", "rnnkern.ops.gru.triton",
    "rnnkern.ops.selective_scan.triton",
)
TARGETS = (80, 90)


@dataclasses.dataclass(frozen=True)
class TritonCase:
    kernel: object  # triton.JITFunction
    types: dict  # argument name -> Triton type ("*bf16", "i32"); constexprs excluded
    constexprs: dict

    @property
    def name(self) -> str:
        floats = [t.lstrip("*") for t in self.types.values() if t.startswith(("*fp", "*bf"))]
        dtype = floats[0] if floats else "?"
        flags = [k.lower() if v is True else f"{k}={v}" for k, v in self.constexprs.items() if v is not False]
        return f"{self.kernel.fn.__name__}[{'-'.join([dtype] + flags)}]"


@dataclasses.dataclass(frozen=True)
class Report:
    name: str
    target: int
    shared_bytes: Optional[int]
    registers: Optional[int]
    spill_bytes: Optional[int]
    error: Optional[str] = None


def triton_cases() -> list[TritonCase]:
    cases = []
    for module in TRITON_MODULES:
        for kernel, types, constexprs in importlib.import_module(module).aot_specs():
            cases.append(TritonCase(kernel, types, constexprs))
    return cases


def compile_triton(case: TritonCase, target: int) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: case.types.get(name, "constexpr") for name in case.kernel.arg_names}
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in case.constexprs]
    if missing:
        raise ValueError(f"{case.name}: no type or constexpr value for {missing}")
    source = ASTSource(fn=case.kernel, signature=signature, constexprs=case.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", target, 32))
    registers, spills = _cubin_usage(compiled.asm["cubin"])
    return Report(case.name, target, compiled.metadata.shared, registers, spills)


def _cubin_usage(cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    """Registers and local-memory (spill) bytes of a compiled kernel, read by cuobjdump."""
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        result = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    registers = _max_int(re.findall(r"REG:(\d+)", result.stdout))
    local = _max_int(re.findall(r"LOCAL:(\d+)", result.stdout))
    return registers, local


def _nvidia_tool(name: str) -> Optional[str]:
    """A CUDA binary tool: the one shipped with triton, else the one on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _max_int(values: list[str]) -> Optional[int]:
    return max(int(v) for v in values) if values else None


def check_all() -> list[Report]:
    """Compiles every registered kernel for every target; a failure is kept as an error."""
    jobs = [(case.name, lambda c=case, t=target: compile_triton(c, t), target)
            for case in triton_cases() for target in TARGETS]
    reports = []
    for name, job, target in jobs:
        try:
            reports.append(job())
        except Exception as err:  # reported per kernel, so one failure does not hide the rest
            reports.append(Report(name, target, None, None, None, error=f"{type(err).__name__}: {err}"))
    return reports


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    reports = check_all()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    else:
        _print_table(reports)
    return 1 if any(r.error for r in reports) else 0


def _print_table(reports: list[Report]) -> None:
    print(f"{'kernel':<72} {'sm':>3} {'smem B':>7} {'regs':>5} {'local B':>7}")
    for r in reports:
        usage = f"{r.shared_bytes!s:>7} {r.registers!s:>5} {r.spill_bytes!s:>7}" if not r.error else r.error
        print(f"{r.name:<72} {r.target:>3} {usage}")


if __name__ == "__main__":
    sys.exit(main())
