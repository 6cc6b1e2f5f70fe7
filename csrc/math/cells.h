// The LSTM and GRU cells, one hidden unit at a time, with no torch types: the sequence
// kernels and the one-token steps on CPU call these from their vectorised loops, and a CUDA
// kernel can call them per thread. T is the state type (float, or double for fp64).
//
// The expressions are the kernels' exact arithmetic (the same operations in the same
// order), so every kernel that uses them rounds alike.
#pragma once

#include "activations.h"

namespace rnnkern::math {

// ---------------------------------------------------------------------------------------
// LSTM: gates i, f, g, o from their pre-activations (x W_ih^T + h W_hh^T + biases), then
//   c' = f c + i g,   m = o tanh(c')
// (m is the output h', or its projection m W_hr^T).

template <typename T>
struct LstmGates {
  T i, f, g, o;  // activated
};

template <typename T>
struct LstmState {
  T c;  // c'
  T m;  // o tanh(c')
};

// The activations one gate at a time, for loops that take one gate kind per pass: the input,
// forget and output gates are sigmoids, the candidate g a tanh.
template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T lstm_sigmoid_gate(T pre) {
  return sigmoid(pre);
}

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T lstm_candidate(T pre) {
  return tanh(pre);
}

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE LstmGates<T> lstm_gates(T pre_i, T pre_f, T pre_g, T pre_o) {
  return {lstm_sigmoid_gate(pre_i), lstm_sigmoid_gate(pre_f), lstm_candidate(pre_g), lstm_sigmoid_gate(pre_o)};
}

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE LstmState<T> lstm_state(const LstmGates<T>& gate, T c) {
  const T c_new = gate.f * c + gate.i * gate.g;
  return {c_new, gate.o * tanh(c_new)};
}

// Gradients of one unit's step, from the step's gates, its new cell c', the previous cell
// c and the gradients dc' (carried from the later step) and dm.
template <typename T>
struct LstmGrads {
  LstmGates<T> pre;  // d of the gate pre-activations
  T c;               // dL/dc, carried to the earlier step
};

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE LstmGrads<T> lstm_backward(const LstmGates<T>& gate, T c_new, T c,
                                                                     T dc_new, T dm) {
  const T tanh_c = tanh(c_new);
  const T dc_t = dc_new + dm * gate.o * (1 - tanh_c * tanh_c);  // all of dL/dc'
  const LstmGates<T> d_pre{dc_t * gate.g * gate.i * (1 - gate.i), dc_t * c * gate.f * (1 - gate.f),
                           dc_t * gate.i * (1 - gate.g * gate.g), dm * tanh_c * gate.o * (1 - gate.o)};
  return {d_pre, dc_t * gate.f};
}

// ---------------------------------------------------------------------------------------
// GRU: with gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh split into their r, z, n parts,
//   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r gh_n)
//   h' = (1 - z) n + z h

template <typename T>
struct GruGates {
  T r, z, n;  // activated
};

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE GruGates<T> gru_gates(T gi_r, T gh_r, T gi_z, T gh_z, T gi_n, T gh_n) {
  const T r = sigmoid(gi_r + gh_r);
  const T z = sigmoid(gi_z + gh_z);
  return {r, z, tanh(gi_n + r * gh_n)};
}

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T gru_state(const GruGates<T>& gate, T h) {
  return (1 - gate.z) * gate.n + gate.z * h;
}

// Gradients of one unit's step, from the step's gates, its gh_n, the state h it started
// from and dL/dh'.
template <typename T>
struct GruGrads {
  T gi_r, gi_z, gi_n;  // d of gi; d gh_r and d gh_z equal d gi_r and d gi_z
  T gh_n;
  T h;                 // the part of dL/dh through h' = ... + z h
};

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE GruGrads<T> gru_backward(const GruGates<T>& gate, T gh_n, T h, T dh_new) {
  const T d_n = dh_new * (1 - gate.z) * (1 - gate.n * gate.n);
  const T d_z = dh_new * (h - gate.n) * gate.z * (1 - gate.z);
  const T d_r = d_n * gh_n * gate.r * (1 - gate.r);
  return {d_r, d_z, d_n, d_n * gate.r, dh_new * gate.z};
}

}  // namespace rnnkern::math
