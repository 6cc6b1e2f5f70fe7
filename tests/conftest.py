import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rnnkern import _backends  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def ran_op(name: str, run) -> bool:
    """Whether calling run() dispatched the op `name` (e.g. "rnnkern_C::lstm_step")."""
    with torch.autograd.profiler.profile() as prof:
        run()
    return any(event.name == name for event in prof.function_events)


def interpreted_as_slow(params: list) -> list:
    """`params` (device, backend) with the triton ones marked slow where Triton's interpreter
    runs them: for the cases whose size costs the interpreter minutes."""
    if not _backends.triton_interpreted():
        return params
    return [pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow]) if p.values[1] == "triton" else p
            for p in params]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params(op: _backends.Op, dtype: torch.dtype = torch.float32) -> list:
    """pytest params (device, backend) for every backend that implements the registry entry
    `op`, on every device here.

    Backends that never run on a device are left out; those this machine cannot run (for
    `dtype`) are reported as skips with the reason.
    """
    params = []
    for device in devices():
        dev = torch.device(device)
        for backend in _backends.BACKENDS:
            if backend not in op.kernels or (backend == "cpu" and device != "cpu"):
                continue
            reason = op.refusal(backend, dev, dtype)
            marks = [pytest.mark.skip(reason=f"{backend}: {reason}")] if reason else []
            if device == "cuda":
                marks.append(pytest.mark.gpu)
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def perturb_parameters(module: torch.nn.Module, seed: int, scale: float) -> None:
    """Moves every parameter of `module` off its initial value by `scale` times fp64 noise drawn
    from `seed`, so that structured initial values (ones, log(1..N)) do not hide a wrong use."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=gen, dtype=torch.float64)
            parameter.add_((scale * noise).to(parameter))


def backend_case_params(backends: list, cases: list, interpreted: list, case_id) -> list:
    """(device, backend, case) params: every backend param of `backends` with every case, Triton's
    interpreter (triton on CPU tensors) with the `interpreted` cases only; ids from `case_id`."""
    params = []
    for backend_param in backends:
        device, backend = backend_param.values
        slow = backend == "triton" and device == "cpu"
        for case in cases:
            if slow and case not in interpreted:
                continue
            params.append(pytest.param(device, backend, case, id=f"{backend_param.id}-{case_id(case)}",
                                       marks=backend_param.marks))
    return params


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton backend: float64 is not supported")
