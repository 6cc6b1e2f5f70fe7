"""Ahead-of-time compile checks, verification ladder step 4 (no GPU needed).

Every Triton kernel variant the launchers choose for realistic problems compiles for sm_80
and sm_90 with ``triton.compile``, which reports its shared memory, registers and spilled
bytes (from cuobjdump). ``python -m rnnkern.aot`` prints the table.

The variants are not listed by hand: each Triton module's ``aot_problems()`` yields calls of
its launchers on meta tensors of realistic shapes (no memory, nothing runs); every kernel
launch they make is recorded and specialised by Triton's own argument binder as the JIT
would specialise it at run time (16-byte divisibility of pointers and integers, integers
equal to 1 folded in, the launch's constexprs; lengths the kernels mark ``do_not_specialize``
stay plain), so the table describes the code that will run. Meta tensors stand for fresh
allocations, which are 16-byte aligned.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

TRITON_MODULES = (
    "rnnkern.ops.linear_scan.triton", "rnnkern.ops.lstm.triton", "rnnkern.ops.gru.triton",
    "rnnkern.ops.selective_scan.triton", "rnnkern.ops.selective_scan.triton_update",
    "rnnkern.ops.mamba_chunk_scan.triton",
)
TARGETS = (80, 90)


# ---------------------------------------------------------------------------------------
# Recording the launches a launcher makes.


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, and every argument by name."""

    kernel: object  # triton.JITFunction (or the interpreter's stand-in)
    grid: tuple
    arguments: dict
    options: tuple = ()  # launch options given (num_warps, num_stages), sorted (name, value)

    @property
    def kernel_name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def constexprs(self) -> dict:
        """The arguments the kernel declares tl.constexpr: what picks its variant."""
        return {name: self.arguments[name] for name in constexpr_names(self.kernel)}

    @property
    def variant(self) -> tuple:
        """(kernel name, sorted constexprs): equal for launches of the same compiled variant,
        up to the JIT's specialisation of the other arguments."""
        return self.kernel_name, tuple(sorted(self.constexprs.items())) + self.options


def constexpr_names(kernel) -> list[str]:
    annotations = inspect.get_annotations(kernel.fn)
    return [name for name in inspect.signature(kernel.fn).parameters
            if "constexpr" in str(annotations.get(name, ""))]


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class _Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the launch, then runs it unless
    `run` is False."""

    def __init__(self, kernel, launches: list, run: bool):
        self.kernel, self.launches, self.run = kernel, launches, run
        self.fn = kernel.fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = tuple(sorted((k, kwargs[k]) for k in LAUNCH_OPTIONS if k in kwargs))
            given = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
            bound = inspect.signature(self.kernel.fn).bind(*args, **given)
            self.launches.append(Launch(self.kernel, tuple(grid), dict(bound.arguments), options))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
        return launch


def kernels_of(module) -> dict:
    """The module's Triton kernels by attribute name (``*_kernel`` objects with a ``fn``)."""
    return {name: obj for name, obj in vars(module).items() if name.endswith("_kernel") and hasattr(obj, "fn")}


@contextlib.contextmanager
def recording(module_names: Iterable[str] = TRITON_MODULES, run: bool = False):
    """Within the block, every kernel launch of the modules is appended to the yielded list;
    with `run` the kernels also run (else the launchers may be given meta tensors)."""
    launches: list[Launch] = []
    patched = []
    try:
        for module in map(importlib.import_module, module_names):
            for name, kernel in kernels_of(module).items():
                patched.append((module, name, kernel))
                setattr(module, name, _Recorder(kernel, launches, run))
        yield launches
    finally:
        for module, name, kernel in patched:
            setattr(module, name, kernel)


def realistic_launches(module_names: Iterable[str] = TRITON_MODULES) -> list[Launch]:
    """The launches of every module's ``aot_problems()``, one per distinct variant and
    argument specialisation."""
    module_names = tuple(module_names)
    with recording(module_names) as launches:
        for module in map(importlib.import_module, module_names):
            for problem in module.aot_problems():
                problem()
    unique = {}
    for launch in launches:
        unique.setdefault((launch.variant, _specialisation_key(launch)), launch)
    return list(unique.values())


def _specialisation_key(launch: Launch) -> tuple:
    """What the JIT specialises the plain arguments on: a tensor's dtype (its alignment: meta
    tensors are all aligned), None, and an integer's == 1 and divisibility by 16, except for
    the integers the kernel marks do_not_specialize."""
    plain = set(_do_not_specialize(launch.kernel))
    key = []
    for name, value in launch.arguments.items():
        if hasattr(value, "dtype"):
            key.append((name, str(value.dtype)))
        elif isinstance(value, bool) or value is None:
            key.append((name, value))
        elif isinstance(value, int) and name not in plain:
            key.append((name, value == 1, value % 16 == 0, value >= 2**31))
    return tuple(key)


def _do_not_specialize(kernel) -> list[str]:
    """The kernel's do_not_specialize arguments by name (the JIT keeps them as given; the
    interpreter's stand-in keeps its jit keyword arguments)."""
    given = getattr(kernel, "do_not_specialize", None)
    if given is None:
        given = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    names = list(inspect.signature(kernel.fn).parameters)
    return [names[g] if isinstance(g, int) else g for g in given]


# ---------------------------------------------------------------------------------------
# Compiling the recorded variants.


@dataclasses.dataclass(frozen=True)
class TritonCase:
    """One compiled variant: what ASTSource takes, as the JIT would build it."""

    kernel: object  # triton.JITFunction
    signature: dict  # argument name -> Triton type ("*bf16", "i32") or "constexpr"
    constexprs: dict  # (argument index,) -> value
    attrs: dict  # (argument index,) -> [["tt.divisibility", 16]] or []
    name: str
    options: dict = dataclasses.field(default_factory=dict)  # num_warps, num_stages as launched


def _jit_specialisation(launch: Launch, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch, from Triton's own argument binder."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(**launch.arguments)
    values = list(bound.values())
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, (kind, spec)) in enumerate(zip(kernel.params, specialization)):
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = values[index]
        elif isinstance(spec, str):
            attrs[(index,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs


_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def _case_name(launch: Launch) -> str:
    """kernel[dtype-flags]: the input dtype, the flags that are set and the block sizes."""
    dtypes = {_DTYPE_NAMES[str(v.dtype)] for v in launch.arguments.values()
              if hasattr(v, "dtype") and str(v.dtype) in _DTYPE_NAMES}
    dtypes = sorted(dtypes - {"fp32"}) or sorted(dtypes)  # a 16-bit kernel has fp32 workspaces too
    flags = [k.lower() if v is True else f"{k}={v}" for k, v in launch.constexprs.items()
             if v is not False and v is not None] + [f"{k}={v}" for k, v in launch.options]
    return f"{launch.kernel_name}[{'-'.join(dtypes[:1] + flags)}]"


def named_launches() -> list[tuple[str, Launch]]:
    """The realistic launches with their case names (a suffix #2, #3 ... where launches of one
    variant differ in the specialisation of their other arguments). Works in the interpreter
    too: nothing is compiled."""
    named, seen = [], {}
    for launch in realistic_launches():
        name = _case_name(launch)
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name}#{seen[name]}", launch))
    return named


def triton_cases() -> list[TritonCase]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", TARGETS[-1], 32))
    return [TritonCase(launch.kernel, *_jit_specialisation(launch, backend), name, dict(launch.options))
            for name, launch in named_launches()]


@dataclasses.dataclass(frozen=True)
class Report:
    name: str
    target: int
    shared_bytes: Optional[int]
    registers: Optional[int]
    spill_bytes: Optional[int]  # the thread's stack frame plus local memory: where ptxas spills
    error: Optional[str] = None


def compile_triton(case: TritonCase, target: int) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=case.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", target, 32), options=case.options or None)
    registers, spills = _cubin_usage(compiled.asm["cubin"])
    return Report(case.name, target, compiled.metadata.shared, registers, spills)


def _cubin_usage(cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    """Registers and spilled bytes (stack frame + local memory) of a compiled kernel, read by
    cuobjdump."""
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        result = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    registers = _max_int(re.findall(r"REG:(\d+)", result.stdout))
    stack = _max_int(re.findall(r"STACK:(\d+)", result.stdout)) or 0
    local = _max_int(re.findall(r"LOCAL:(\d+)", result.stdout)) or 0
    return registers, stack + local


def _nvidia_tool(name: str) -> Optional[str]:
    """A CUDA binary tool: the one shipped with triton, else the one on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _max_int(values: list[str]) -> Optional[int]:
    return max(int(v) for v in values) if values else None


def check_all(cases: Optional[list[TritonCase]] = None) -> list[Report]:
    """Compiles every case for every target; a failure is kept as an error."""
    jobs: list[tuple[str, Callable[[], Report], int]] = [
        (case.name, lambda c=case, t=target: compile_triton(c, t), target)
        for case in (triton_cases() if cases is None else cases) for target in TARGETS]
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
    print(f"{'kernel':<88} {'sm':>3} {'smem B':>7} {'regs':>5} {'spill B':>7}")
    for r in reports:
        usage = f"{r.shared_bytes!s:>7} {r.registers!s:>5} {r.spill_bytes!s:>7}" if not r.error else r.error
        print(f"{r.name:<88} {r.target:>3} {usage}")


if __name__ == "__main__":
    sys.exit(main())
