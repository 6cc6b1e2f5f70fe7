"""PNG plots of a results.json: the KV-cache comparison and the kernel speedups (matplotlib)."""
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SPEEDUP_FIELDS = ("speedup_vs_torch", "speedup_vs_loop")
BASELINES = ("torch", "torch.nn", "torch_loop")  # backends of the baseline records


def write_all(results: dict[str, Any], directory: Path) -> list[Path]:
    """Every plot the results have data for; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    measured = [r for r in results.get("kv_cache", []) if "skipped" not in r]
    decode = [r for r in measured if r["direction"] == "decode"]
    throughput = [r for r in measured if r["direction"] == "throughput"]
    kernels = [r for r in results.get("kernels", []) if _speedup(r) is not None and r["backend"] not in BASELINES]
    title = f"{results['meta']['device_name']}, torch {results['meta']['torch']}"
    written = []
    if decode:
        written.append(_lines(decode, "context", "ms_per_token", "context (tokens)", "ms per token (decode)",
                              f"Per-token decode latency vs context\n{title}", directory / "kv_latency.png"))
        written.append(_lines(decode, "context", "state_bytes", "context (tokens)", "decode state per sequence (bytes)",
                              f"Decode state held per sequence\n{title}", directory / "kv_state.png"))
    if throughput:
        written.append(_lines(throughput, "batch", "tokens_per_s", "batch (sequences)", "tokens/s (decode)",
                              f"Decode throughput within a fixed state budget\n{title}", directory / "kv_throughput.png",
                              log_y=False))
    if kernels:
        written.append(_speedups(kernels, f"Kernel speedups over the in-process baseline\n{title}",
                                 directory / "kernels.png"))
    return written


def _label(record: dict[str, Any]) -> str:
    return record["model"] + (f" ({record['cache']} KV cache)" if record.get("cache") else "")


def _lines(records, x_key, y_key, x_label, y_label, title, path: Path, log_y: bool = True) -> Path:
    series = defaultdict(list)
    for record in records:
        series[_label(record)].append((record[x_key], record[y_key]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=x_label, ylabel=y_label, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _speedup(record: dict[str, Any]):
    return next((record[field] for field in SPEEDUP_FIELDS if field in record), None)


def _speedups(records, title: str, path: Path) -> Path:
    labels = [f"{r['op']} {r['direction']} [{r['backend']}] {'x'.join(map(str, r['shape']))}" for r in records]
    values = [_speedup(r) for r in records]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(records) + 1.5))
    ax.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set(xlabel="speedup over the baseline (torch.nn or the PyTorch loop; log scale)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
