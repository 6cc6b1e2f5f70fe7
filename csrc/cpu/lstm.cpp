// CPU kernels of the LSTM recurrence (rnnkern/ops/lstm/reference.py states the contract).
//
// The whole time loop runs here. The batch splits into one group of rows per thread; per
// step a group multiplies its rows of h_{t-1} by W_hh^T (one small GEMM) and then runs one
// fused, vectorised pass over its (rows, 4H) gate pre-activations for the gates, the cell
// update and the output (rows of finished sequences get zeros and keep their state). The
// backward walks the steps the other way, around dh_{t-1} = d_gates_t W_hh, in the same way.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <optional>

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

constexpr int64_t kGates = 4;  // i, f, g, o; gate q of unit j is column q * H + j

// Rows [r0, r1) of `in` (B, k) times the projection, into `out` (B, n); returns `out`, or
// `in` itself when the layer has no projection (null).
template <typename T>
const T* project(const cpu::RightOperand<T>* projection, int64_t r0, int64_t r1, const T* in, int64_t k, T* out,
                 int64_t n) {
  if (!projection) return in;
  projection->multiply(r1 - r0, in + r0 * k, k, out + r0 * n, n);
  return out;
}

template <typename scalar_t, typename acc_t>
struct LstmForward {
  int64_t steps, hidden, proj;
  Schedule schedule;
  Rows<const scalar_t> gx;  // (B, T, 4H)
  cpu::RightOperand<acc_t> w_hh_t;  // W_hh^T (P, 4H)
  const cpu::RightOperand<acc_t>* w_hr_t;  // W_hr^T (H, P), or null
  Rows<scalar_t> y;         // (B, T, P)
  acc_t* gates;             // (B, T, 4H) activated; (B, 1, 4H) scratch when not kept
  acc_t* cells;             // (B, T, H); (B, 1, H) scratch when not kept
  bool keep;                // whether gates and cells are kept for a backward
  acc_t* c;                 // (B, H) cell state
  acc_t* h;                 // (B, P) h_{t-1}, the GEMM operand (values of scalar_t)
  acc_t* pre;               // (B, 4H) h_{t-1} W_hh^T
  acc_t* m;                 // (B, H) m_t rounded to scalar_t
  acc_t* projected;         // (B, P) m_t W_hr^T

  // Rows [r0, r1) through every step.
  void run(int64_t r0, int64_t r1) {
    const int64_t width = kGates * hidden;
    for (int64_t s = 0; s < steps; ++s) {
      w_hh_t.multiply(r1 - r0, h + r0 * proj, proj, pre + r0 * width, width);
      for (int64_t b = r0; b < r1; ++b) cell_row(b, s);
      const acc_t* h_new = project(w_hr_t, r0, r1, m, hidden, projected, proj);  // (B, P)
      for (int64_t b = r0; b < r1; ++b) emit_row(b, s, h_new + b * proj);
    }
  }

  RNNKERN_VECTORIZED void cell_row(int64_t b, int64_t s) {
    const int64_t t = schedule.time(b, s), H = hidden;
    const int64_t slot = keep ? b * steps + t : b;
    acc_t* __restrict gate = gates + slot * kGates * H;
    acc_t* __restrict cell = cells + slot * H;
    acc_t* __restrict m_row = m + b * H;
    if (!schedule.active(b, s)) {  // past the sequence's end: zeros, the state kept
      std::fill_n(gate, kGates * H, acc_t(0));
      std::fill_n(cell, H, acc_t(0));
      std::fill_n(m_row, H, acc_t(0));
      return;
    }
    const scalar_t* __restrict x = gx.at(b, t);
    const acc_t* __restrict p = pre + b * kGates * H;
    acc_t* __restrict c_row = c + b * H;
    // One pass per activation, then the state: each loop body is short enough for the CPU
    // to overlap its iterations, where one fused body of five activations ran 2-4% slower
    // (whole recurrence, B=16 H=256 on a Zen 3). The gate row stays in L1 between passes.
#pragma omp simd
    for (int64_t j = 0; j < 2 * H; ++j) gate[j] = math::lstm_sigmoid_gate(static_cast<acc_t>(x[j]) + p[j]);  // i, f
#pragma omp simd
    for (int64_t j = 2 * H; j < 3 * H; ++j) gate[j] = math::lstm_candidate(static_cast<acc_t>(x[j]) + p[j]);  // g
#pragma omp simd
    for (int64_t j = 3 * H; j < 4 * H; ++j) gate[j] = math::lstm_sigmoid_gate(static_cast<acc_t>(x[j]) + p[j]);  // o
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      acc_t c_new, m_new;
      math::lstm_state(gate[j], gate[H + j], gate[2 * H + j], gate[3 * H + j], c_row[j], c_new, m_new);
      cell[j] = c_row[j] = c_new;
      m_row[j] = static_cast<acc_t>(static_cast<scalar_t>(m_new));
    }
  }

  // h_t = `h_new` (m_t, or its projection) rounded to scalar_t, into y and the state; past the
  // sequence's end, a zero output and the state kept.
  RNNKERN_VECTORIZED void emit_row(int64_t b, int64_t s, const acc_t* __restrict h_new) {
    scalar_t* __restrict out = y.at(b, schedule.time(b, s));
    acc_t* __restrict h_row = h + b * proj;
    if (!schedule.active(b, s)) {
      std::fill_n(out, proj, static_cast<scalar_t>(0));
      return;
    }
#pragma omp simd
    for (int64_t j = 0; j < proj; ++j) {
      out[j] = static_cast<scalar_t>(h_new[j]);
      h_row[j] = static_cast<acc_t>(out[j]);
    }
  }
};

// Walks the steps backwards. Per step: dL/dh_t = grad_y_t + d_gates_{t+1} W_hh (grad_h_n
// instead at a sequence's last step), dL/dm_t = dL/dh_t (W_hr), then the cell's gradients.
template <typename acc_t>
struct LstmBackward {
  int64_t steps, hidden, proj;
  Schedule schedule;
  cpu::RightOperand<acc_t> w_hh;         // W_hh (4H, P)
  const cpu::RightOperand<acc_t>* w_hr;  // W_hr (P, H), or null
  const acc_t* c0;           // (B, H)
  const acc_t* gates;        // (B, T, 4H) activated i, f, g, o
  const acc_t* cells;        // (B, T, H)
  Rows<const acc_t> grad_y;  // (B, T, P)
  const acc_t* grad_h_n;     // (B, P)
  acc_t* d_gates;            // (B, T, 4H) out
  acc_t* d_h;                // (B, T, P) out
  acc_t* grad_h0;            // (B, P) out
  acc_t* dc;                 // (B, H) dL/dc_t; starts as grad_c_n, ends as dL/dc0
  acc_t* dh;                 // (B, P) dL/dh_t
  acc_t* dh_rec;             // (B, P) d_gates_{t+1} W_hh
  acc_t* dm;                 // (B, H) dL/dm_t, with a projection
  acc_t* d_pre;              // (B, 4H) d_gates of the step

  void run(int64_t r0, int64_t r1) {
    for (int64_t s = steps - 1; s >= 0; --s) {
      if (s + 1 < steps) recurrent_gemm(r0, r1);
      for (int64_t b = r0; b < r1; ++b) gather_row(b, s);
      const acc_t* d_m = project(w_hr, r0, r1, dh, proj, dm, hidden);  // (B, H)
      for (int64_t b = r0; b < r1; ++b) cell_row(b, s, d_m + b * hidden);
    }
    if (steps > 0) recurrent_gemm(r0, r1);
    for (int64_t b = r0; b < r1; ++b) {  // a sequence of no steps passes grad_h_n through
      const acc_t* from = (schedule.length(b) > 0 ? dh_rec : grad_h_n) + b * proj;
      std::copy(from, from + proj, grad_h0 + b * proj);
    }
  }

  // dh_rec = d_gates W_hh on rows [r0, r1)
  void recurrent_gemm(int64_t r0, int64_t r1) {
    const int64_t width = kGates * hidden;
    w_hh.multiply(r1 - r0, d_pre + r0 * width, width, dh_rec + r0 * proj, proj);
  }

  RNNKERN_VECTORIZED void gather_row(int64_t b, int64_t s) {
    const int64_t t = schedule.time(b, s);
    acc_t* __restrict dh_row = dh + b * proj;
    acc_t* __restrict out = d_h + (b * steps + t) * proj;
    if (!schedule.active(b, s)) {
      std::fill_n(dh_row, proj, acc_t(0));
      std::fill_n(out, proj, acc_t(0));
      return;
    }
    const bool last = s == schedule.length(b) - 1;
    const acc_t* __restrict carry = (last ? grad_h_n : dh_rec) + b * proj;
    const acc_t* __restrict grad = grad_y.at(b, t);
#pragma omp simd
    for (int64_t j = 0; j < proj; ++j) {
      dh_row[j] = carry[j] + grad[j];
      out[j] = dh_row[j];
    }
  }

  RNNKERN_VECTORIZED void cell_row(int64_t b, int64_t s, const acc_t* __restrict d_m) {
    const int64_t H = hidden;
    acc_t* __restrict d_row = d_pre + b * kGates * H;
    if (!schedule.active(b, s)) {
      std::fill_n(d_gates + (b * steps + s) * kGates * H, kGates * H, acc_t(0));
      std::fill_n(d_row, kGates * H, acc_t(0));
      return;
    }
    const int64_t t = schedule.time(b, s);
    const acc_t* __restrict gate = gates + (b * steps + t) * kGates * H;
    const acc_t* __restrict cell = cells + (b * steps + t) * H;
    const acc_t* __restrict c_prev = s == 0 ? c0 + b * H : cells + (b * steps + schedule.previous_time(b, s)) * H;
    acc_t* __restrict out = d_gates + (b * steps + t) * kGates * H;
    acc_t* __restrict dc_row = dc + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      math::lstm_backward(gate[j], gate[H + j], gate[2 * H + j], gate[3 * H + j], cell[j], c_prev[j], dc_row[j],
                          d_m[j], d_row[j], d_row[H + j], d_row[2 * H + j], d_row[3 * H + j], dc_row[j]);
    }
    std::copy(d_row, d_row + kGates * H, out);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& gx_in, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths, bool reverse,
    bool training) {
  TORCH_CHECK(gx_in.dim() == 3 && gx_in.size(2) > 0 && gx_in.size(2) % kGates == 0,
              "lstm_layer_fwd: gx must have shape (B, T, 4H), got ", gx_in.sizes());
  const at::Tensor gx = cpu::unit_last_stride(gx_in);
  const int64_t batch = gx.size(0), steps = gx.size(1), hidden = gx.size(2) / kGates;
  const int64_t proj = w_hr.has_value() ? w_hr->size(0) : hidden;
  const auto dtype = gx.scalar_type();
  cpu::check_tensor("lstm_layer_fwd", "h0", h0, {batch, proj}, dtype);
  cpu::check_tensor("lstm_layer_fwd", "c0", c0, {batch, hidden}, dtype);
  cpu::check_tensor("lstm_layer_fwd", "w_hh", w_hh, {kGates * hidden, proj}, dtype);
  cpu::check_optional("lstm_layer_fwd", "w_hr", w_hr, {proj, hidden}, dtype);
  const at::Tensor lens = cpu::checked_lengths("lstm_layer_fwd", lengths, batch, steps);

  const auto acc = at::toOpMathType(dtype);
  const auto acc_options = gx.options().dtype(acc);
  at::Tensor y = at::empty({batch, steps, proj}, gx.options());
  const int64_t kept_steps = training ? steps : 1;  // without a backward, one scratch slot per row
  at::Tensor gates = at::empty({batch, kept_steps, kGates * hidden}, acc_options);
  at::Tensor cells = at::empty({batch, kept_steps, hidden}, acc_options);
  at::Tensor c = c0.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor h = h0.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor pre = at::empty({batch, kGates * hidden}, acc_options);
  at::Tensor m = at::empty({batch, hidden}, acc_options);
  at::Tensor projected = at::empty({batch, proj}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_layer_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Operand = cpu::RightOperand<acc_t>;
    const std::optional<Operand> w_hr_t =
        w_hr.has_value() ? std::optional(Operand::of(w_hr->to(acc).t(), steps)) : std::nullopt;
    LstmForward<scalar_t, acc_t> kernel{
        steps, hidden, proj, Schedule::of(lens, steps, reverse), Rows<const scalar_t>::of(gx),
        Operand::of(w_hh.to(acc).t(), steps), w_hr_t ? &*w_hr_t : nullptr, Rows<scalar_t>::of(y),
        gates.data_ptr<acc_t>(), cells.data_ptr<acc_t>(), training, c.data_ptr<acc_t>(), h.data_ptr<acc_t>(),
        pre.data_ptr<acc_t>(), m.data_ptr<acc_t>(), projected.data_ptr<acc_t>()};
    cpu::for_each_row_group(batch, [&](int64_t r0, int64_t r1) { kernel.run(r0, r1); });
  });
  if (!training) return {y, h.to(dtype), c.to(dtype), gates.new_empty({0}), cells.new_empty({0})};
  return {y, h.to(dtype), c.to(dtype), gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const at::Tensor& c0,
    const at::Tensor& gates_in, const at::Tensor& cells_in, const at::Tensor& grad_y_in,
    const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const std::optional<at::Tensor>& lengths,
    bool reverse) {
  TORCH_CHECK(gates_in.dim() == 3 && gates_in.size(2) > 0 && gates_in.size(2) % kGates == 0,
              "lstm_layer_bwd: gates must have shape (B, T, 4H), got ", gates_in.sizes());
  const int64_t batch = gates_in.size(0), steps = gates_in.size(1), hidden = gates_in.size(2) / kGates;
  TORCH_CHECK(w_hh.dim() == 2, "lstm_layer_bwd: w_hh must have shape (4H, P), got ", w_hh.sizes());
  const int64_t proj = w_hh.size(1);
  const auto acc = at::toOpMathType(w_hh.scalar_type());
  cpu::check_tensor("lstm_layer_bwd", "w_hh", w_hh, {kGates * hidden, proj}, w_hh.scalar_type());
  cpu::check_optional("lstm_layer_bwd", "w_hr", w_hr, {proj, hidden}, w_hh.scalar_type());
  cpu::check_tensor("lstm_layer_bwd", "gates", gates_in, {batch, steps, kGates * hidden}, acc);
  cpu::check_tensor("lstm_layer_bwd", "cells", cells_in, {batch, steps, hidden}, acc);
  cpu::check_shape("lstm_layer_bwd", "c0", c0, {batch, hidden});
  cpu::check_shape("lstm_layer_bwd", "grad_y", grad_y_in, {batch, steps, proj});
  cpu::check_shape("lstm_layer_bwd", "grad_h_n", grad_h_n, {batch, proj});
  cpu::check_shape("lstm_layer_bwd", "grad_c_n", grad_c_n, {batch, hidden});
  const at::Tensor lens = cpu::checked_lengths("lstm_layer_bwd", lengths, batch, steps);

  const auto acc_options = gates_in.options();
  const at::Tensor gates = gates_in.contiguous(), cells = cells_in.contiguous();
  const at::Tensor grad_y = cpu::unit_last_stride(grad_y_in.to(acc));
  const at::Tensor c0_acc = c0.to(acc).contiguous(), grad_h_n_acc = grad_h_n.to(acc).contiguous();
  at::Tensor d_gates = at::empty({batch, steps, kGates * hidden}, acc_options);
  at::Tensor d_h = at::empty({batch, steps, proj}, acc_options);
  at::Tensor grad_h0 = at::empty({batch, proj}, acc_options);
  at::Tensor dc = grad_c_n.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor dh = at::empty({batch, proj}, acc_options);
  at::Tensor dh_rec = at::empty({batch, proj}, acc_options);
  at::Tensor dm = at::empty({batch, hidden}, acc_options);
  at::Tensor d_pre = at::empty({batch, kGates * hidden}, acc_options);

  AT_DISPATCH_FLOATING_TYPES(acc, "lstm_layer_bwd_cpu", [&] {
    using Operand = cpu::RightOperand<scalar_t>;
    const int64_t uses = steps + 1;
    const std::optional<Operand> w_hr_operand =
        w_hr.has_value() ? std::optional(Operand::of(w_hr->to(acc), uses)) : std::nullopt;
    LstmBackward<scalar_t> kernel{
        steps, hidden, proj, Schedule::of(lens, steps, reverse), Operand::of(w_hh.to(acc), uses),
        w_hr_operand ? &*w_hr_operand : nullptr, c0_acc.data_ptr<scalar_t>(),
        gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(), Rows<const scalar_t>::of(grad_y),
        grad_h_n_acc.data_ptr<scalar_t>(), d_gates.data_ptr<scalar_t>(), d_h.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(),
        dh_rec.data_ptr<scalar_t>(), dm.data_ptr<scalar_t>(), d_pre.data_ptr<scalar_t>()};
    cpu::for_each_row_group(batch, [&](int64_t r0, int64_t r1) { kernel.run(r0, r1); });
  });
  return {d_gates, d_h, grad_h0, dc};
}

}  // namespace rnnkern
