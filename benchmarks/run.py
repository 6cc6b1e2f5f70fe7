"""Benchmark CLI: times rnnkern's kernels against PyTorch baselines in one process.

    python benchmarks/run.py [--suite scan|lstm|gru|selective|mamba2|decode|kvcache|hfmamba|all] [--quick]
                             [--device cpu|cuda] [--out DIR]

Prints one table per suite to stdout, progress to stderr, and writes DIR/results.json:
{"schema_version", "meta": environment, "kernels": [records], "kv_cache": [records]} (one
top-level list per section that the chosen suites fill) and PNG plots of them into DIR.
"""
import argparse
import sys
from pathlib import Path

import torch

# Run as a script, this file's folder is on sys.path instead of the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import plots, report, suites, timing  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=(*suites.SUITES, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats (CI)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    settings = timing.Settings.create(torch.device(args.device), args.quick)
    results = {"schema_version": report.SCHEMA_VERSION, "meta": report.environment(settings), "kernels": []}
    for name in suites.SUITES if args.suite == "all" else (args.suite,):
        suite = suites.load(name)
        records = suite.run(settings)
        results.setdefault(suite.SECTION, []).extend(records)
        print(f"\n[{name}]\n" + report.table(records, suite.COLUMNS, suite.LEGEND), flush=True)
    report.progress(f"wrote {report.write_json(args.out, results)}")
    for path in plots.write_all(results, args.out):
        report.progress(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
