"""rnnkern benchmark suite: a CLI (run.py) and pytest-benchmark tests for the same cases."""
