// Host entry points of every compiled kernel, registered as torch ops in bindings.cpp.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace rnnkern {

// Linear recurrence h_t = a_t * h_{t-1} + b_t over (B, T, D) tensors (see
// rnnkern/ops/linear_scan/reference.py for the exact contract).
std::tuple<at::Tensor, at::Tensor> linear_scan_fwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, bool reverse);

// linear_scan_fwd with h written into `out` (B, T, D), a's dtype; returns the final state.
at::Tensor linear_scan_fwd_out_cpu(const at::Tensor& a, const at::Tensor& b,
                                   const std::optional<at::Tensor>& initial_state,
                                   const std::optional<at::Tensor>& cu_seqlens, bool reverse, at::Tensor& out);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_bwd_cpu(
    const at::Tensor& a, const at::Tensor& h, const std::optional<at::Tensor>& initial_state,
    const at::Tensor& grad_h, const std::optional<at::Tensor>& grad_final,
    const std::optional<at::Tensor>& cu_seqlens, bool reverse);

// linear_scan_bwd with grad_a, grad_b written into the given (B, T, D) buffers (unit stride
// along D); returns grad_initial. For callers that keep their gradient buffers between calls.
at::Tensor linear_scan_bwd_out_cpu(const at::Tensor& a, const at::Tensor& h,
                                   const std::optional<at::Tensor>& initial_state, const at::Tensor& grad_h,
                                   const std::optional<at::Tensor>& grad_final,
                                   const std::optional<at::Tensor>& cu_seqlens, bool reverse, at::Tensor& grad_a,
                                   at::Tensor& grad_b);

// LSTM recurrence over gx = x W_ih^T + biases (B, T, 4H), optionally projected by w_hr (see
// rnnkern/ops/lstm/reference.py for the exact contract).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& gx, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths, bool reverse,
    bool training);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const at::Tensor& c0, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const std::optional<at::Tensor>& lengths, bool reverse);

// GRU recurrence over gx = x W_ih^T + b_ih (B, T, 3H) (see rnnkern/ops/gru/reference.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd_cpu(
    const at::Tensor& gx, const at::Tensor& h0, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& lengths, bool reverse, bool training);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd_cpu(
    const at::Tensor& w_hh, const at::Tensor& gates, const at::Tensor& ghn, const at::Tensor& h_prev,
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const std::optional<at::Tensor>& lengths, bool reverse);

// Mamba's selective scan over u, delta (Bt, Dm, L) with B/C variable (Bt, G, N, L) or fixed
// (Dm, N), optionally packed sequences along L (cu_seqlens, Bt == 1; see
// rnnkern/ops/selective_scan/reference.py for the exact contract). The forward
// returns (out, last_state, checkpoints), checkpoints empty unless training; the backward
// returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state).
std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens, bool training);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                       const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens,
                       const at::Tensor& checkpoints, const at::Tensor& grad_out, const at::Tensor& grad_last_state);

// Mamba-2's SSD chunk scan over x (b, l, h, p) with B/C (b, l, g, n) (see
// rnnkern/ops/mamba_chunk_scan/reference.py for the exact contract). The forward returns
// (out, final_states, chunk_states), chunk_states empty unless kept; the backward returns
// (dx, ddt, dA, dB, dC, dD, dz, dinitial_states), empty tensors for absent inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mamba_chunk_scan_fwd_cpu(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& initial_states, const std::optional<at::Tensor>& seq_idx, int64_t chunk_size,
    bool keep_chunk_states);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mamba_chunk_scan_bwd_cpu(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& initial_states,
                         const std::optional<at::Tensor>& seq_idx, int64_t chunk_size,
                         const at::Tensor& chunk_states, const at::Tensor& grad_out,
                         const at::Tensor& grad_final_states);

// x (..., K) W^T + bias for a weight W (N, K): a recurrent layer's input projection.
at::Tensor input_projection_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// a (M, K) @ b (K, N) in float on the AVX2 panel kernel (cpu/panel_gemm.h), whichever GEMM the
// recurrences prefer on this CPU: it lets the tests check the kernel on any CPU that has AVX2.
at::Tensor panel_matmul_cpu(const at::Tensor& a, const at::Tensor& b);

// One-token steps for fp32/fp64 without autograd, the weights used in place: x (..., I) and
// the states (..., H) hold B rows each under any leading dimensions; returns (y, h', c') for
// the LSTM (no projection), (y, h') for the GRU, y shaped like x with H last and holding h' as
// the layer's output, the new states shaped like the old; biases optional.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_step_cpu(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh);

std::tuple<at::Tensor, at::Tensor> gru_step_cpu(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh);

// lstm_step / gru_step through a stack of L layers in one call: states (L, ..., H), weights
// (w_ih, w_hh, b_ih, b_hh) per layer (biases None without bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_stack_step_cpu(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& c, const c10::List<std::optional<at::Tensor>>& weights);
std::tuple<at::Tensor, at::Tensor> gru_stack_step_cpu(const at::Tensor& x, const at::Tensor& h,
                                                      const c10::List<std::optional<at::Tensor>>& weights);

// One-token Mamba decode steps for fp32/fp64, the states updated in place (see
// rnnkern/ops/causal_conv1d/reference.py and rnnkern/ops/selective_scan/reference.py); the
// selective scan's in the multi-head form, x (B, H, P) and state (slots, H, P, N).
at::Tensor causal_conv1d_update_cpu(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    std::optional<c10::string_view> activation);

at::Tensor selective_state_update_cpu(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                      const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                      const std::optional<at::Tensor>& state_batch_indices);

// Whole-block decode steps of Mamba and Mamba-2 for fp32/fp64, no autograd: u (..., d_model)
// and the parameters as the modules hold them (see rnnkern/ops/mamba_block_step/reference.py);
// the states are updated in place, the block's output (..., d_model) returned.
at::Tensor mamba_block_step_cpu(const at::Tensor& u, at::Tensor& conv_state, at::Tensor& ssm_state,
                                const c10::List<std::optional<at::Tensor>>& parameters);

at::Tensor mamba2_block_step_cpu(const at::Tensor& u, at::Tensor& conv_state, at::Tensor& ssm_state,
                                 const c10::List<std::optional<at::Tensor>>& parameters, int64_t norm_group_size,
                                 bool norm_before_gate, double norm_eps, double dt_min, double dt_max);

// Mamba-2's gated RMSNorm (rnnkern/ops/rms_norm_gated/reference.py) for fp32/fp64, no autograd.
at::Tensor rms_norm_gated_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& z, double eps, int64_t group_size,
                              bool norm_before_gate);

}  // namespace rnnkern
