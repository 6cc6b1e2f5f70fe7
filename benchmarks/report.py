"""Output of a benchmark run: progress lines, environment metadata, the table, results.json."""
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

import rnnkern
from benchmarks import memory, timing
from benchmarks.suites import ort_peer

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
GBPS_METHOD = "bytes_moved / ms_median: the (B, T, D) tensors the op must read or write once each"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def environment(settings: timing.Settings) -> dict[str, Any]:
    """Where and how the numbers were taken: device, versions, commit, date and methods."""
    device = settings.device.type
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(settings.device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "onnxruntime": _package_version("onnxruntime"),
        "rnnkern": rnnkern.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "quick": settings.quick,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "timing_method": timing.METHOD[device],
        "memory_method": memory.METHOD[device],
        "gbps_method": GBPS_METHOD,
        "onnxruntime_method": ort_peer.METHOD,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or platform.machine()


def _cpu_model() -> Optional[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else None


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def write_json(directory: Path, results: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Table of kernel records.

IDENTITY_COLUMNS = ("op", "backend", "dir", "shape", "dtype")

# A suite's metric columns: (header, record -> cell text).
Columns = list[tuple[str, Callable[[dict[str, Any]], str]]]
TIMING_COLUMNS: Columns = [
    ("median ms", lambda r: f"{r['ms_median']:.4g}"),
    ("min ms", lambda r: f"{r['ms_min']:.4g}"),
    ("IQR ms", lambda r: f"{r['ms_q3'] - r['ms_q1']:.2g}"),
]
PEAK_MEMORY_COLUMN = ("peak MiB", lambda r: "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}")


# The backends with kernels of their own, per device: what the kernel suites time.
KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton",)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def drop_refused(contenders: dict, refusal: Callable[[str], Optional[str]],
                 identity: Callable[[str], dict]) -> list[dict[str, Any]]:
    """Removes from `contenders` each one for which `refusal(name)` gives a reason; returns their
    records (`identity(name)` plus the reason) for the results' table."""
    skipped = []
    for name in list(contenders):
        reason = refusal(name)
        if reason is not None:
            skipped.append({**identity(name), "skipped": reason})
            del contenders[name]
    return skipped


def speedup_columns(header: str, key: str, *optional: tuple[str, str]) -> Columns:
    """The timing columns, a ratio column `header` from record[key], one more per (header, key)
    of `optional` ("-" where a record has no such key), and peak memory."""
    ratios = [(header, lambda r: f"{r[key]:.2f}")]
    ratios += [(more_header, functools.partial(_optional_ratio, more_key)) for more_header, more_key in optional]
    return [*TIMING_COLUMNS, *ratios, PEAK_MEMORY_COLUMN]


def _optional_ratio(key: str, record: dict[str, Any]) -> str:
    return f"{record[key]:.2f}" if key in record else "-"


def table(records: list[dict[str, Any]], columns: Columns, legend: str) -> str:
    """One line per record, skipped ones with their reason, then the suite's legend."""
    identities = [IDENTITY_COLUMNS] + [_identity_cells(record) for record in records]
    metrics = [tuple(header for header, _ in columns)] + [_metric_cells(record, columns) for record in records]
    identity_widths = _widths(identities)
    metric_widths = _widths([cells for cells in metrics if isinstance(cells, tuple)])
    lines = []
    for identity, metric in zip(identities, metrics):
        left = "  ".join(cell.ljust(width) for cell, width in zip(identity, identity_widths))
        right = metric if isinstance(metric, str) else "  ".join(map(str.rjust, metric, metric_widths))
        lines.append(f"{left}  {right}")
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], "", legend])


def _widths(rows: list[tuple[str, ...]]) -> list[int]:
    return [max(map(len, column)) for column in zip(*rows)]


def _identity_cells(record: dict[str, Any]) -> tuple[str, ...]:
    shape = "x".join(map(str, record["shape"]))
    return record["op"], record["backend"], record["direction"], shape, record["dtype"]


def _metric_cells(record: dict[str, Any], columns: Columns) -> Union[tuple[str, ...], str]:
    """The measured values as cells, or one string saying why the benchmark was skipped."""
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    return tuple(cell(record) for _, cell in columns)
