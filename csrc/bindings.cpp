// Registers the compiled kernels as torch ops in the `rnnkern_C` namespace. The Python
// layer (rnnkern/ops/*) wraps them in the public `rnnkern::*` custom ops with autograd.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"
#include "python_calls.h"

// Importing rnnkern._C runs the static registrations below; the module itself holds only the
// direct entry points of the one-token kernels (python_calls.cpp).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, rnnkern::python_calls()};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(rnnkern_C, m) {
  m.def(
      "linear_scan_fwd(Tensor a, Tensor b, Tensor? initial_state, Tensor? cu_seqlens, "
      "bool reverse) -> (Tensor, Tensor)");
  m.def(
      "linear_scan_fwd_out(Tensor a, Tensor b, Tensor? initial_state, Tensor? cu_seqlens, "
      "bool reverse, Tensor(a!) out) -> Tensor");
  m.def(
      "linear_scan_bwd(Tensor a, Tensor h, Tensor? initial_state, Tensor grad_h, "
      "Tensor? grad_final, Tensor? cu_seqlens, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_scan_bwd_out(Tensor a, Tensor h, Tensor? initial_state, Tensor grad_h, Tensor? grad_final, "
      "Tensor? cu_seqlens, bool reverse, Tensor(a!) grad_a, Tensor(b!) grad_b) -> Tensor");
  m.def(
      "lstm_layer_fwd(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
      "bool training) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_layer_bwd(Tensor w_hh, Tensor? w_hr, Tensor c0, Tensor gates, Tensor cells, Tensor grad_y, "
      "Tensor grad_h_n, Tensor grad_c_n, Tensor? lengths, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_layer_fwd(Tensor gx, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? lengths, bool reverse, bool training) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_layer_bwd(Tensor w_hh, Tensor gates, Tensor ghn, Tensor h_prev, Tensor grad_y, Tensor grad_h_n, "
      "Tensor? lengths, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, Tensor? cu_seqlens, bool training) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, Tensor? cu_seqlens, Tensor checkpoints, "
      "Tensor grad_out, "
      "Tensor grad_last_state) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mamba_chunk_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? initial_states, Tensor? seq_idx, int chunk_size, bool keep_chunk_states) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mamba_chunk_scan_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? initial_states, Tensor? seq_idx, int chunk_size, Tensor chunk_states, Tensor grad_out, "
      "Tensor grad_final_states) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_step(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("gru_step(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> (Tensor, Tensor)");
  m.def("lstm_stack_step(Tensor x, Tensor h, Tensor c, Tensor?[] weights) -> (Tensor, Tensor, Tensor)");
  m.def("gru_stack_step(Tensor x, Tensor h, Tensor?[] weights) -> (Tensor, Tensor)");
  m.def("input_projection(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("panel_matmul(Tensor a, Tensor b) -> Tensor");
  m.def("causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, str? activation) -> Tensor");
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices) -> Tensor");
  m.def("mamba_block_step(Tensor u, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor?[] parameters) -> Tensor");
  m.def(
      "mamba2_block_step(Tensor u, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor?[] parameters, "
      "int norm_group_size, bool norm_before_gate, float norm_eps, float dt_min, float dt_max) -> Tensor");
  m.def(
      "rms_norm_gated(Tensor x, Tensor weight, Tensor? bias, Tensor? z, float eps, int group_size, "
      "bool norm_before_gate) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnkern_C, CPU, m) {
  m.impl("linear_scan_fwd", &rnnkern::linear_scan_fwd_cpu);
  m.impl("linear_scan_fwd_out", &rnnkern::linear_scan_fwd_out_cpu);
  m.impl("linear_scan_bwd", &rnnkern::linear_scan_bwd_cpu);
  m.impl("linear_scan_bwd_out", &rnnkern::linear_scan_bwd_out_cpu);
  m.impl("lstm_layer_fwd", &rnnkern::lstm_layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &rnnkern::lstm_layer_bwd_cpu);
  m.impl("gru_layer_fwd", &rnnkern::gru_layer_fwd_cpu);
  m.impl("gru_layer_bwd", &rnnkern::gru_layer_bwd_cpu);
  m.impl("selective_scan_fwd", &rnnkern::selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &rnnkern::selective_scan_bwd_cpu);
  m.impl("mamba_chunk_scan_fwd", &rnnkern::mamba_chunk_scan_fwd_cpu);
  m.impl("mamba_chunk_scan_bwd", &rnnkern::mamba_chunk_scan_bwd_cpu);
  m.impl("lstm_step", &rnnkern::lstm_step_cpu);
  m.impl("gru_step", &rnnkern::gru_step_cpu);
  m.impl("lstm_stack_step", &rnnkern::lstm_stack_step_cpu);
  m.impl("gru_stack_step", &rnnkern::gru_stack_step_cpu);
  m.impl("input_projection", &rnnkern::input_projection_cpu);
  m.impl("panel_matmul", &rnnkern::panel_matmul_cpu);
  m.impl("causal_conv1d_update", &rnnkern::causal_conv1d_update_cpu);
  m.impl("selective_state_update", &rnnkern::selective_state_update_cpu);
  m.impl("mamba_block_step", &rnnkern::mamba_block_step_cpu);
  m.impl("mamba2_block_step", &rnnkern::mamba2_block_step_cpu);
  m.impl("rms_norm_gated", &rnnkern::rms_norm_gated_cpu);
}
