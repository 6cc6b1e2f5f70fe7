"""Benchmark suites, one module each.

A suite module exposes ``SECTION`` (the key of results.json its records go under),
``COLUMNS`` and ``LEGEND`` (its table) and
``run(settings) -> list[dict]`` (one record per measured or skipped benchmark).
"""
import importlib
from types import ModuleType

SUITES = ("scan", "lstm", "gru", "selective", "mamba2", "decode", "kvcache", "hfmamba")


def load(name: str) -> ModuleType:
    """The suite module `name` (imported on demand, so one suite's extras never block another)."""
    return importlib.import_module(f"benchmarks.suites.{name}")
