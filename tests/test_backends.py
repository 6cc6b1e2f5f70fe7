"""Backend selection: forcing, refusing with reasons, and imports without optional parts."""
import subprocess
import sys

import pytest
import torch

import rnnkern
from rnnkern import _backends


def test_default_cpu_backend_is_the_compiled_one():
    """The README's install builds rnnkern._C, so CPU tensors go to its kernels."""
    assert _backends.unavailable_reason("cpu") is None
    assert _backends.select("linear_scan", torch.device("cpu"), torch.float32, _no_op_reasons) == "cpu"


def _no_op_reasons(backend, device, dtype):
    return None


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("RNNKERN_BACKEND", "reference")
    assert _backends.select("linear_scan", torch.device("cpu"), torch.float32, _no_op_reasons) == "reference"
    monkeypatch.setenv("RNNKERN_BACKEND", "cuda")
    with pytest.raises(rnnkern.BackendError, match="backend 'cuda' cannot run this input: runs on CUDA tensors only"):
        rnnkern.linear_scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2))


def test_keyword_overrides_environment_variable(monkeypatch):
    monkeypatch.setenv("RNNKERN_BACKEND", "cuda")
    assert _backends.select("linear_scan", torch.device("cpu"), torch.float32, _no_op_reasons, "reference") == "reference"


def test_forced_backend_that_cannot_run_lists_every_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(rnnkern.BackendError) as info:
        rnnkern.linear_scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2), backend="triton")
    message = str(info.value)
    assert "backend 'triton' cannot run this input" in message
    for name in rnnkern.BACKENDS:
        assert f"  {name}: " in message


def test_op_specific_refusal_is_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = torch.rand(1, 3, 2, dtype=torch.float64)
    with pytest.raises(rnnkern.BackendError, match="float64 is not supported"):
        rnnkern.linear_scan(a, a, backend="triton")


def _run_isolated(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_works_without_triton_and_without_extension():
    out = _run_isolated(
        "import sys\n"
        "sys.modules['triton'] = None\n"  # makes `import triton` fail
        "sys.modules['rnnkern._C'] = None\n"
        "import torch, rnnkern\n"
        "from rnnkern import _backends\n"
        "a = torch.rand(1, 4, 2)\n"
        "h = rnnkern.linear_scan(a, a)\n"
        "print(_backends.select('linear_scan', a.device, a.dtype, lambda *args: None))\n"
        "for name in ('cpu', 'triton'):\n"
        "    try:\n"
        "        rnnkern.linear_scan(a, a, backend=name)\n"
        "    except rnnkern.BackendError as err:\n"
        "        print(str(err).splitlines()[0])\n"
    )
    lines = out.splitlines()
    assert lines[0] == "reference"
    assert "backend 'cpu' cannot run this input: the compiled extension rnnkern._C is not importable" in lines[1]
    assert "backend 'triton' cannot run this input: triton is not installed" in lines[2]
