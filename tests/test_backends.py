"""Backend selection: forcing, refusing with reasons, and imports without optional parts."""
import subprocess
import sys

import pytest
import torch

import rnnkern
from rnnkern import _backends
from rnnkern.ops.linear_scan import LINEAR_SCAN
from rnnkern.ops.lstm import LSTM_STEP


CPU = torch.device("cpu")


def test_default_cpu_backend_is_the_compiled_one():
    """The README's install builds rnnkern._C, so CPU tensors go to its kernels."""
    assert _backends.unavailable_reason("cpu") is None
    assert _backends.select(LINEAR_SCAN, CPU, torch.float32) == "cpu"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("RNNKERN_BACKEND", "reference")
    assert _backends.select(LINEAR_SCAN, CPU, torch.float32) == "reference"
    monkeypatch.setenv("RNNKERN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(rnnkern.BackendError, match="backend 'triton' cannot run this input: runs on CUDA tensors"):
        rnnkern.linear_scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2))


def test_keyword_overrides_environment_variable(monkeypatch):
    monkeypatch.setenv("RNNKERN_BACKEND", "triton")
    assert _backends.select(LINEAR_SCAN, CPU, torch.float32, "reference") == "reference"


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("RNNKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"linear_scan: unknown backend 'cuda'; expected one of \('reference', 'cpu', 'triton'\)"):
        rnnkern.linear_scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2))


def test_backend_without_a_kernel_for_the_op_is_refused_with_a_reason():
    """The one-token LSTM kernel exists on the cpu backend alone, for fp32 and fp64."""
    assert _backends.select(LSTM_STEP, CPU, torch.float32) == "cpu"
    with pytest.raises(rnnkern.BackendError, match="backend 'reference' cannot run this input: has no lstm_step kernel"):
        _backends.select(LSTM_STEP, CPU, torch.float32, "reference")
    with pytest.raises(rnnkern.BackendError, match="backend 'cpu' cannot run this input: torch.bfloat16 is not supported "
                                                   r"by its lstm_step kernel \(it runs float32, float64\)"):
        _backends.select(LSTM_STEP, CPU, torch.bfloat16, "cpu")


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
        "from rnnkern.ops.linear_scan import LINEAR_SCAN\n"
        "print(_backends.select(LINEAR_SCAN, a.device, a.dtype))\n"
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
