// The LSTM and GRU cells, one hidden unit at a time, with no torch types: the sequence
// kernels and the one-token steps on CPU call these from their vectorised loops, and a CUDA
// kernel can call them per thread. T is the state type (float, or double for fp64).
//
// The expressions are the kernels' exact arithmetic (the same operations in the same
// order), so every kernel that uses them rounds alike. Results come back as scalars or through
// scalar references, never as structs: `#pragma omp simd` gives every local of its loop body
// one copy per lane before inlining, and GCC leaves a loop with a struct local scalar.
#pragma once

#include "activations.h"

namespace rnnkern::math {

// ---------------------------------------------------------------------------------------
// LSTM: gates i, f, g, o from their pre-activations (x W_ih^T + h W_hh^T + biases), then
//   c' = f c + i g,   m = o tanh(c')
// (m is the output h', or its projection m W_hr^T).

// The input, forget and output gates are sigmoids of their pre-activations, the candidate g a tanh.
template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T lstm_sigmoid_gate(T pre) {
  return sigmoid(pre);
}

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T lstm_candidate(T pre) {
  return tanh(pre);
}

// c_new = c', m = o tanh(c') from the activated gates and the cell state c.
template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE void lstm_state(T i, T f, T g, T o, T c, T& c_new, T& m) {
  c_new = f * c + i * g;
  m = o * tanh(c_new);
}

// The step's gradients from its gates, its new cell c', the previous cell c and the gradients
// dc' (carried from the later step) and dm: d_i .. d_o of the gate pre-activations, and
// dc = dL/dc, carried to the earlier step.
template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE void lstm_backward(T i, T f, T g, T o, T c_new, T c, T dc_new, T dm,
                                                            T& d_i, T& d_f, T& d_g, T& d_o, T& dc) {
  const T tanh_c = tanh(c_new);
  const T dc_t = dc_new + dm * o * (1 - tanh_c * tanh_c);  // all of dL/dc'
  d_i = dc_t * g * i * (1 - i);
  d_f = dc_t * c * f * (1 - f);
  d_g = dc_t * i * (1 - g * g);
  d_o = dm * tanh_c * o * (1 - o);
  dc = dc_t * f;
}

// ---------------------------------------------------------------------------------------
// GRU: with gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh split into their r, z, n parts,
//   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r gh_n)
//   h' = (1 - z) n + z h

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE void gru_gates(T gi_r, T gh_r, T gi_z, T gh_z, T gi_n, T gh_n, T& r, T& z,
                                                        T& n) {
  r = sigmoid(gi_r + gh_r);
  z = sigmoid(gi_z + gh_z);
  n = tanh(gi_n + r * gh_n);
}

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T gru_state(T z, T n, T h) {
  return (1 - z) * n + z * h;
}

// The step's gradients from its gates, its gh_n, the state h it started from and dL/dh':
// d_r, d_z, d_n of gi (d gh_r and d gh_z are d_r and d_z), d_gh_n, and dh, the part of dL/dh
// through h' = ... + z h.
template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE void gru_backward(T r, T z, T n, T gh_n, T h, T dh_new, T& d_r, T& d_z,
                                                           T& d_n, T& d_gh_n, T& dh) {
  d_n = dh_new * (1 - z) * (1 - n * n);
  d_z = dh_new * (h - n) * z * (1 - z);
  d_r = d_n * gh_n * r * (1 - r);
  d_gh_n = d_n * r;
  dh = dh_new * z;
}

}  // namespace rnnkern::math
