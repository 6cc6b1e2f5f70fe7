"""Verification ladder step 4: every Triton kernel variant the launchers choose for realistic
shapes compiles for sm_80 and sm_90 without a GPU, specialised as the JIT will specialise it."""
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnnkern import aot

triton = pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to compile")

NAMES = [name for name, _ in aot.named_launches()]
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}  # per block: A100 and H100 limits


@pytest.fixture(scope="module")
def reports() -> dict:
    """Every kernel compiled once, in a process without the Triton interpreter."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "rnnkern.aot", "--json"], env=env, capture_output=True, text=True)
    assert result.stdout, result.stderr
    return {(r["name"], r["target"]): r for r in json.loads(result.stdout)}


def _report(reports, name, target) -> dict:
    report = reports[(name, target)]
    print(f"{name} sm_{target}: {report['shared_bytes']} B shared, {report['registers']} registers, "
          f"{report['spill_bytes']} B spilled")
    assert report["error"] is None, report["error"]
    return report


@pytest.mark.slow  # the fixture compiles every kernel for both targets: about 2 minutes
@pytest.mark.parametrize("target", aot.TARGETS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("name", NAMES)
def test_triton_kernel_compiles(reports, name, target):
    report = _report(reports, name, target)
    assert report["shared_bytes"] <= MAX_SHARED_BYTES[target]


def test_every_triton_kernel_is_registered():
    ops = Path(aot.__file__).parent / "ops"
    modules = {f"rnnkern.ops.{path.parent.name}.{path.stem}" for path in ops.glob("*/triton*.py")}
    assert modules == set(aot.TRITON_MODULES)
    registered = {launch.kernel_name for _, launch in aot.named_launches()}
    for module in modules:
        kernels = {name for name, obj in vars(importlib.import_module(module)).items()
                   if name.endswith("_kernel") and hasattr(obj, "fn")}
        assert kernels and kernels <= registered, f"{module}: a kernel no aot_problems() call launches"


_SPECIALISATIONS = """
import json
from rnnkern import aot
print(json.dumps([dict(name=c.name, signature=c.signature, attrs={str(i): a for (i,), a in c.attrs.items()},
                       plain=aot._do_not_specialize(c.kernel)) for c in aot.triton_cases()]))
"""


@pytest.fixture(scope="module")
def specialisations() -> list:
    """Every case's signature and attributes as rnnkern.aot builds them (nothing compiled)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SPECIALISATIONS], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_aot_specialises_arguments_as_the_jit_does(specialisations):
    """Pointers of fresh allocations carry 16-byte divisibility, lengths marked do_not_specialize
    stay plain integers (a new length compiles nothing), unit strides are folded to 1."""
    folded_unit_stride = False
    for case in specialisations:
        names = list(case["signature"])
        for name, kind in case["signature"].items():
            attrs = case["attrs"].get(str(names.index(name)), [])
            if kind.startswith("*"):
                assert ["tt.divisibility", 16] in attrs, (case["name"], name)
            if name in case["plain"]:
                assert kind in ("i32", "i64") and attrs == [], (case["name"], name, kind, attrs)
        folded_unit_stride |= case["signature"].get("stride_a_d") == "constexpr"
    assert folded_unit_stride  # the linear scan's channel stride is 1 in every contiguous input


LENGTH_ARGUMENTS = {"T", "L", "steps", "step", "chunk", "num_chunks"}  # vary with the input's length


@pytest.mark.parametrize("module", aot.TRITON_MODULES)
def test_lengths_are_not_specialised_on(module):
    """A new prompt or sequence length must not compile a new variant: every kernel argument
    that carries a length is do_not_specialize (else the JIT specialises it on == 1 and on
    divisibility by 16)."""
    for name, kernel in aot.kernels_of(importlib.import_module(module)).items():
        lengths = LENGTH_ARGUMENTS & set(inspect.signature(kernel.fn).parameters)
        assert lengths <= set(aot._do_not_specialize(kernel)), (name, lengths - set(aot._do_not_specialize(kernel)))


def _persistent_estimate(launch) -> int:
    """The launcher module's persistent_shared_bytes for the launch's padded sizes and dtype."""
    module = importlib.import_module(launch.kernel.fn.__module__)
    sizes, dtype = launch.constexprs, launch.arguments["w_hh_ptr"].dtype
    backward = "_bwd_" in launch.kernel_name
    if "BLOCK_P" in sizes:  # the LSTM: P only with a projection
        return module.persistent_shared_bytes(sizes["BLOCK_H"], sizes["BLOCK_P"] if sizes["HAS_PROJ"] else 0, dtype,
                                              backward)
    return module.persistent_shared_bytes(sizes["BLOCK_H"], dtype, backward)


@pytest.mark.slow  # the reports fixture compiles every kernel
def test_persistent_shared_memory_estimate_bounds_the_compiled(reports):
    """The path choice trusts persistent_shared_bytes: it is at least what triton.compile reports
    for every realistic persistent variant on sm_80 and sm_90, and within twice it (so devices
    with less shared memory are not sent to the alternating path needlessly)."""
    persistent = [(name, launch) for name, launch in aot.named_launches() if "persistent" in launch.kernel_name]
    assert persistent
    for name, launch in persistent:
        compiled = [_report(reports, name, target)["shared_bytes"] for target in aot.TARGETS]
        estimate = _persistent_estimate(launch)
        print(f"{name}: estimate {estimate} B, compiled {compiled} B (sm_80, sm_90)")
        assert max(compiled) <= estimate <= 2 * max(compiled), name
