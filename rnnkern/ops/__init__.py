"""One sub-package per op: reference.py (the math), kernels, and the public function."""
