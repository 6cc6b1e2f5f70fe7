// CPU kernels of the GRU recurrence (rnnkern/ops/gru/reference.py states the contract).
//
// Organised like csrc/cpu/lstm.cpp: the time loop runs here, the batch splits into one group
// of rows per thread, and per step a group runs one small GEMM (h_{t-1} W_hh^T forward,
// d_gh W_hh backward) and one fused, vectorised pass over its rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "../math/cells.h"
#include "../ops.h"
#include "gemm.h"
#include "row_groups.h"
#include "sequences.h"
#include "tensor_args.h"
#include "vectorized.h"

namespace rnnkern {
namespace {

using cpu::Rows;
using cpu::Schedule;

constexpr int64_t kGates = 3;  // r, z, n; gate q of unit j is column q * H + j

template <typename scalar_t, typename acc_t>
struct GruForward {
  int64_t steps, hidden;
  Schedule schedule;
  Rows<const scalar_t> gx;  // (B, T, 3H)
  cpu::RightOperand<acc_t> w_hh_t;  // W_hh^T (H, 3H)
  const acc_t* b_hh;        // (3H,), zeros when the layer has none
  Rows<scalar_t> y;         // (B, T, H)
  acc_t* gates;             // (B, T, 3H) activated r, z, n; (B, 1, 3H) scratch when not kept
  acc_t* ghn;               // (B, T, H) the n part of gh_t = h_{t-1} W_hh^T + b_hh; or (B, 1, H)
  bool keep;                // whether gates and ghn are kept for a backward
  acc_t* h;                 // (B, H) h_{t-1}, the GEMM operand (values of scalar_t)
  acc_t* gh;                // (B, 3H) h_{t-1} W_hh^T

  // Rows [r0, r1) through every step.
  void run(int64_t r0, int64_t r1) {
    const int64_t width = kGates * hidden;
    for (int64_t s = 0; s < steps; ++s) {
      w_hh_t.multiply(r1 - r0, h + r0 * hidden, hidden, gh + r0 * width, width);
      for (int64_t b = r0; b < r1; ++b) cell_row(b, s);
    }
  }

  RNNKERN_VECTORIZED void cell_row(int64_t b, int64_t s) {
    const int64_t t = schedule.time(b, s), H = hidden;
    const int64_t slot = keep ? b * steps + t : b;
    acc_t* __restrict gate = gates + slot * kGates * H;
    acc_t* __restrict ghn_row = ghn + slot * H;
    scalar_t* __restrict out = y.at(b, t);
    if (!schedule.active(b, s)) {  // past the sequence's end: zeros, the state kept
      std::fill_n(gate, kGates * H, acc_t(0));
      std::fill_n(ghn_row, H, acc_t(0));
      std::fill_n(out, H, static_cast<scalar_t>(0));
      return;
    }
    const scalar_t* __restrict x = gx.at(b, t);
    const acc_t* __restrict p = gh + b * kGates * H;
    acc_t* __restrict h_row = h + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const acc_t gh_n = p[2 * H + j] + b_hh[2 * H + j];
      acc_t r, z, n;
      math::gru_gates(static_cast<acc_t>(x[j]), p[j] + b_hh[j], static_cast<acc_t>(x[H + j]), p[H + j] + b_hh[H + j],
                      static_cast<acc_t>(x[2 * H + j]), gh_n, r, z, n);
      gate[j] = r;
      gate[H + j] = z;
      gate[2 * H + j] = n;
      ghn_row[j] = gh_n;
      out[j] = static_cast<scalar_t>(math::gru_state(z, n, h_row[j]));
      h_row[j] = static_cast<acc_t>(out[j]);
    }
  }
};

// Walks the steps backwards. Per step: dL/dh_t = grad_y_t + the later step's dh z + d_gh W_hh,
// then the gradients of the gates.
template <typename acc_t>
struct GruBackward {
  int64_t steps, hidden;
  Schedule schedule;
  cpu::RightOperand<acc_t> w_hh;  // W_hh (3H, H)
  const acc_t* gates;        // (B, T, 3H) activated r, z, n
  const acc_t* ghn;          // (B, T, H)
  Rows<const acc_t> h_prev;  // (B, T, H) the state each step started from
  Rows<const acc_t> grad_y;  // (B, T, H)
  acc_t* d_gx;               // (B, T, 3H) out
  acc_t* d_gh;               // (B, T, 3H) out
  acc_t* grad_h0;            // (B, H) out
  // dL/dh_{t-1} = dh_direct + dh_rec. Until a sequence's last step its rows hold grad_h_n + 0:
  // dh_direct starts as grad_h_n, and d_gh (so dh_rec) is zero past the end.
  acc_t* dh_direct;          // (B, H) dL/dh_t z
  acc_t* dh_rec;             // (B, H) d_gh_{t+1} W_hh, zeros before the first GEMM
  acc_t* d_pre;              // (B, 3H) d_gh of the step

  void run(int64_t r0, int64_t r1) {
    for (int64_t s = steps - 1; s >= 0; --s) {
      if (s + 1 < steps) recurrent_gemm(r0, r1);
      for (int64_t b = r0; b < r1; ++b) cell_row(b, s);
    }
    if (steps > 0) recurrent_gemm(r0, r1);
    for (int64_t i = r0 * hidden; i < r1 * hidden; ++i) grad_h0[i] = dh_direct[i] + dh_rec[i];
  }

  // dh_rec = d_gh W_hh on rows [r0, r1)
  void recurrent_gemm(int64_t r0, int64_t r1) {
    const int64_t width = kGates * hidden;
    w_hh.multiply(r1 - r0, d_pre + r0 * width, width, dh_rec + r0 * hidden, hidden);
  }

  RNNKERN_VECTORIZED void cell_row(int64_t b, int64_t s) {
    const int64_t H = hidden;
    acc_t* __restrict d_row = d_pre + b * kGates * H;
    if (!schedule.active(b, s)) {
      for (acc_t* row : {d_gx + (b * steps + s) * kGates * H, d_gh + (b * steps + s) * kGates * H, d_row}) {
        std::fill_n(row, kGates * H, acc_t(0));
      }
      return;
    }
    const int64_t t = schedule.time(b, s);
    const acc_t* __restrict grad = grad_y.at(b, t);
    const acc_t* __restrict h = h_prev.at(b, t);
    const acc_t* __restrict gate = gates + (b * steps + t) * kGates * H;
    const acc_t* __restrict ghn_row = ghn + (b * steps + t) * H;
    const acc_t* __restrict rec = dh_rec + b * H;
    acc_t* __restrict direct = dh_direct + b * H;
    acc_t* __restrict out_x = d_gx + (b * steps + t) * kGates * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const acc_t dh_t = (direct[j] + rec[j]) + grad[j];
      acc_t d_r, d_z, d_n;
      math::gru_backward(gate[j], gate[H + j], gate[2 * H + j], ghn_row[j], h[j], dh_t, d_r, d_z, d_n,
                         d_row[2 * H + j], direct[j]);
      out_x[j] = d_row[j] = d_r;
      out_x[H + j] = d_row[H + j] = d_z;
      out_x[2 * H + j] = d_n;
    }
    std::copy(d_row, d_row + kGates * H, d_gh + (b * steps + t) * kGates * H);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd_cpu(
    const at::Tensor& gx_in, const at::Tensor& h0, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& lengths, bool reverse, bool training) {
  TORCH_CHECK(gx_in.dim() == 3 && gx_in.size(2) > 0 && gx_in.size(2) % kGates == 0,
              "gru_layer_fwd: gx must have shape (B, T, 3H), got ", gx_in.sizes());
  const at::Tensor gx = cpu::unit_last_stride(gx_in);
  const int64_t batch = gx.size(0), steps = gx.size(1), hidden = gx.size(2) / kGates;
  const auto dtype = gx.scalar_type();
  cpu::check_tensor("gru_layer_fwd", "h0", h0, {batch, hidden}, dtype);
  cpu::check_tensor("gru_layer_fwd", "w_hh", w_hh, {kGates * hidden, hidden}, dtype);
  cpu::check_optional("gru_layer_fwd", "b_hh", b_hh, {kGates * hidden}, dtype);
  const at::Tensor lens = cpu::checked_lengths("gru_layer_fwd", lengths, batch, steps);

  const auto acc = at::toOpMathType(dtype);
  const auto acc_options = gx.options().dtype(acc);
  const at::Tensor bias = b_hh.has_value() ? b_hh->to(acc).contiguous() : at::zeros({kGates * hidden}, acc_options);
  at::Tensor y = at::empty({batch, steps, hidden}, gx.options());
  const int64_t kept_steps = training ? steps : 1;  // without a backward, one scratch slot per row
  at::Tensor gates = at::empty({batch, kept_steps, kGates * hidden}, acc_options);
  at::Tensor ghn = at::empty({batch, kept_steps, hidden}, acc_options);
  at::Tensor h = h0.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor gh = at::empty({batch, kGates * hidden}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gru_layer_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GruForward<scalar_t, acc_t> kernel{
        steps, hidden, Schedule::of(lens, steps, reverse), Rows<const scalar_t>::of(gx),
        cpu::RightOperand<acc_t>::of(w_hh.to(acc).t(), steps), bias.data_ptr<acc_t>(),
        Rows<scalar_t>::of(y), gates.data_ptr<acc_t>(), ghn.data_ptr<acc_t>(), training, h.data_ptr<acc_t>(),
        gh.data_ptr<acc_t>()};
    cpu::for_each_row_group(batch, [&](int64_t r0, int64_t r1) { kernel.run(r0, r1); });
  });
  if (!training) return {y, h.to(dtype), gates.new_empty({0}), ghn.new_empty({0})};
  return {y, h.to(dtype), gates, ghn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd_cpu(
    const at::Tensor& w_hh, const at::Tensor& gates_in, const at::Tensor& ghn_in, const at::Tensor& h_prev_in,
    const at::Tensor& grad_y_in, const at::Tensor& grad_h_n, const std::optional<at::Tensor>& lengths,
    bool reverse) {
  TORCH_CHECK(gates_in.dim() == 3 && gates_in.size(2) > 0 && gates_in.size(2) % kGates == 0,
              "gru_layer_bwd: gates must have shape (B, T, 3H), got ", gates_in.sizes());
  const int64_t batch = gates_in.size(0), steps = gates_in.size(1), hidden = gates_in.size(2) / kGates;
  const auto acc = at::toOpMathType(w_hh.scalar_type());
  cpu::check_tensor("gru_layer_bwd", "w_hh", w_hh, {kGates * hidden, hidden}, w_hh.scalar_type());
  cpu::check_tensor("gru_layer_bwd", "gates", gates_in, {batch, steps, kGates * hidden}, acc);
  cpu::check_tensor("gru_layer_bwd", "ghn", ghn_in, {batch, steps, hidden}, acc);
  cpu::check_shape("gru_layer_bwd", "h_prev", h_prev_in, {batch, steps, hidden});
  cpu::check_shape("gru_layer_bwd", "grad_y", grad_y_in, {batch, steps, hidden});
  cpu::check_shape("gru_layer_bwd", "grad_h_n", grad_h_n, {batch, hidden});
  const at::Tensor lens = cpu::checked_lengths("gru_layer_bwd", lengths, batch, steps);

  const auto acc_options = gates_in.options();
  const at::Tensor gates = gates_in.contiguous(), ghn = ghn_in.contiguous();
  const at::Tensor h_prev = cpu::unit_last_stride(h_prev_in.to(acc));
  const at::Tensor grad_y = cpu::unit_last_stride(grad_y_in.to(acc));
  at::Tensor d_gx = at::empty({batch, steps, kGates * hidden}, acc_options);
  at::Tensor d_gh = at::empty({batch, steps, kGates * hidden}, acc_options);
  at::Tensor grad_h0 = at::empty({batch, hidden}, acc_options);
  at::Tensor dh_direct = grad_h_n.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor dh_rec = at::zeros({batch, hidden}, acc_options);
  at::Tensor d_pre = at::empty({batch, kGates * hidden}, acc_options);

  AT_DISPATCH_FLOATING_TYPES(acc, "gru_layer_bwd_cpu", [&] {
    GruBackward<scalar_t> kernel{
        steps, hidden, Schedule::of(lens, steps, reverse), cpu::RightOperand<scalar_t>::of(w_hh.to(acc), steps + 1),
        gates.data_ptr<scalar_t>(), ghn.data_ptr<scalar_t>(), Rows<const scalar_t>::of(h_prev),
        Rows<const scalar_t>::of(grad_y), d_gx.data_ptr<scalar_t>(), d_gh.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(), dh_direct.data_ptr<scalar_t>(), dh_rec.data_ptr<scalar_t>(),
        d_pre.data_ptr<scalar_t>()};
    cpu::for_each_row_group(batch, [&](int64_t r0, int64_t r1) { kernel.run(r0, r1); });
  });
  return {d_gx, d_gh, grad_h0};
}

}  // namespace rnnkern
