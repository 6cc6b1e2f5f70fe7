// Registers the compiled kernels as torch ops in the `rnnkern_C` namespace. The Python
// layer (rnnkern/ops/*) wraps them in the public `rnnkern::*` custom ops with autograd.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// Importing rnnkern._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(rnnkern_C, m) {
  m.def(
      "linear_scan_fwd(Tensor a, Tensor b, Tensor? initial_state, Tensor? cu_seqlens, "
      "bool reverse) -> (Tensor, Tensor)");
  m.def(
      "linear_scan_bwd(Tensor a, Tensor h, Tensor? initial_state, Tensor grad_h, "
      "Tensor? grad_final, Tensor? cu_seqlens, bool reverse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnnkern_C, CPU, m) {
  m.impl("linear_scan_fwd", &rnnkern::linear_scan_fwd_cpu);
  m.impl("linear_scan_bwd", &rnnkern::linear_scan_bwd_cpu);
}
