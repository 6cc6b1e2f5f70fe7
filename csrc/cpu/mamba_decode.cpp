// One-token decode steps of a Mamba block on CPU, fp32/fp64: the causal conv's rolling-state
// update and the selective scan's state update (rnnkern/ops/causal_conv1d/reference.py and
// rnnkern/ops/selective_scan/reference.py state the contracts). A decode step is a few
// thousand multiply-adds; as a chain of torch ops it costs tens of op dispatches, so here
// each step is one loop over (batch, channel) pairs, the states updated in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "../math/activations.h"
#include "../ops.h"
#include "tensor_args.h"
#include "vectorized.h"

namespace rnnkern {
namespace {

// (batch, channel) pairs per parallel task: one pair is only N (or W) multiply-adds, but also
// a softplus and a silu (a Mamba block of 512 channels still decodes faster on two threads).
constexpr int64_t kPairsPerTask = 256;

// One channel's state update, h (N,) in place: h = e^{step A} h + drive B; returns C . h.
template <typename T>
RNNKERN_VECTORIZED T update_state(T* __restrict h, const T* __restrict a, const T* __restrict b,
                                  const T* __restrict c, T step, T drive, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    h[i] = math::exp(step * a[i]) * h[i] + drive * b[i];
    sum += c[i] * h[i];
  }
  return sum;
}

// update_state for an A constant along n: h = decay h + drive B, one exp for the channel.
template <typename T>
RNNKERN_VECTORIZED T update_state_uniform(T* __restrict h, T decay, const T* __restrict b, const T* __restrict c,
                                          T drive, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    h[i] = decay * h[i] + drive * b[i];
    sum += c[i] * h[i];
  }
  return sum;
}

void check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape (B, D), got ", x.sizes());
  cpu::check_float_or_double(op, "x", x);
}

void check_state(const char* op, const char* name, const at::Tensor& state, at::IntArrayRef shape,
                 at::ScalarType dtype) {
  cpu::check_tensor(op, name, state, shape, dtype);
  TORCH_CHECK(state.is_contiguous(), op, ": ", name, " must be contiguous (it is updated in place)");
}

}  // namespace

at::Tensor causal_conv1d_update_cpu(const at::Tensor& x_in, at::Tensor& conv_state, const at::Tensor& weight_in,
                                    const std::optional<at::Tensor>& bias_in,
                                    std::optional<c10::string_view> activation) {
  const char* op = "causal_conv1d_update";
  check_input(op, x_in);
  TORCH_CHECK(!activation.has_value() || *activation == "silu", op, ": activation must be None or 'silu', got '",
              std::string(*activation), "'");
  const bool silu_activation = activation.has_value();
  const int64_t batch = x_in.size(0), dims = x_in.size(1);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == dims && weight_in.size(1) > 0, op,
              ": weight must have shape (", dims, ", W), got ", weight_in.sizes());
  const int64_t width = weight_in.size(1);
  cpu::check_dtype(op, "weight", weight_in, dtype);
  cpu::check_optional(op, "bias", bias_in, {dims}, dtype);
  check_state(op, "conv_state", conv_state, {batch, dims, width}, dtype);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = cpu::contiguous_or_undefined(bias_in);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(dtype, "causal_conv1d_update_cpu", [&] {
    const scalar_t *xs = x.data_ptr<scalar_t>(), *w = weight.data_ptr<scalar_t>();
    const scalar_t* b = cpu::data_or_null<scalar_t>(bias);
    scalar_t *states = conv_state.data_ptr<scalar_t>(), *y = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * dims, kPairsPerTask, [&](int64_t first, int64_t last) {
      for (int64_t pair = first; pair < last; ++pair) {
        const int64_t d = pair % dims;
        scalar_t* window = states + pair * width;  // the last W inputs, newest last
        std::copy(window + 1, window + width, window);
        window[width - 1] = xs[pair];
        scalar_t sum = b ? b[d] : scalar_t(0);
        for (int64_t k = 0; k < width; ++k) sum += w[d * width + k] * window[k];
        y[pair] = silu_activation ? math::silu(sum) : sum;
      }
    });
  });
  return out;
}

at::Tensor selective_state_update_cpu(at::Tensor& state, const at::Tensor& x_in, const at::Tensor& dt_in,
                                      const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& C_in,
                                      const std::optional<at::Tensor>& D_in, const std::optional<at::Tensor>& z_in,
                                      const std::optional<at::Tensor>& dt_bias_in, bool dt_softplus,
                                      const std::optional<at::Tensor>& state_batch_indices) {
  const char* op = "selective_state_update";
  TORCH_CHECK(x_in.dim() == 3, op, ": x must have shape (B, H, P), got ", x_in.sizes());
  cpu::check_float_or_double(op, "x", x_in);
  const int64_t batch = x_in.size(0), heads = x_in.size(1), dim = x_in.size(2);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(A_in.dim() == 3 && A_in.size(0) == heads && A_in.size(1) == dim, op, ": A must have shape (", heads,
              ", ", dim, ", N), got ", A_in.sizes());
  const int64_t n = A_in.size(2);
  cpu::check_dtype(op, "A", A_in, dtype);
  cpu::check_tensor(op, "dt", dt_in, {batch, heads, dim}, dtype);
  TORCH_CHECK(B_in.dim() == 3 && B_in.size(0) == batch && B_in.size(1) > 0 && heads % B_in.size(1) == 0 &&
                  B_in.size(2) == n,
              op, ": B must have shape (", batch, ", G, ", n, ") with G dividing ", heads, ", got ", B_in.sizes());
  const int64_t groups = B_in.size(1);
  cpu::check_tensor(op, "B", B_in, {batch, groups, n}, dtype);
  cpu::check_tensor(op, "C", C_in, {batch, groups, n}, dtype);
  cpu::check_optional(op, "D", D_in, {heads, dim}, dtype);
  cpu::check_optional(op, "z", z_in, {batch, heads, dim}, dtype);
  cpu::check_optional(op, "dt_bias", dt_bias_in, {heads, dim}, dtype);
  const int64_t slots = state_batch_indices.has_value() ? state.size(0) : batch;
  cpu::check_tensor(op, "state", state, {slots, heads, dim, n}, dtype);
  TORCH_CHECK(state.stride(3) == 1 || n == 1, op, ": state must have unit stride along N (it is updated in place)");
  const at::Tensor slot_of = cpu::checked_int64(op, "state_batch_indices", state_batch_indices, batch, -1, slots - 1);
  // A row by row: unit stride along n, or one value per (h, p) (Mamba-2's per-head scalar expanded with stride 0)
  const bool uniform_A = A_in.stride(2) == 0 || n == 1;
  const at::Tensor A = uniform_A || A_in.stride(2) == 1 ? A_in : A_in.contiguous();
  const at::Tensor x = x_in.contiguous(), dt = dt_in.contiguous();
  const at::Tensor B = B_in.contiguous(), C = C_in.contiguous();
  const at::Tensor D = cpu::contiguous_or_undefined(D_in), z = cpu::contiguous_or_undefined(z_in);
  const at::Tensor dt_bias = cpu::contiguous_or_undefined(dt_bias_in);
  at::Tensor out = at::empty_like(x);
  const int64_t channels = heads * dim, heads_per_group = heads / groups;
  const int64_t a_stride_h = A.stride(0), a_stride_p = A.stride(1);
  const int64_t h_stride_s = state.stride(0), h_stride_h = state.stride(1), h_stride_p = state.stride(2);
  AT_DISPATCH_FLOATING_TYPES(dtype, "selective_state_update_cpu", [&] {
    const scalar_t *xs = x.data_ptr<scalar_t>(), *dts = dt.data_ptr<scalar_t>(), *a = A.data_ptr<scalar_t>();
    const scalar_t *bs = B.data_ptr<scalar_t>(), *cs = C.data_ptr<scalar_t>();
    const scalar_t *skip = cpu::data_or_null<scalar_t>(D), *gate = cpu::data_or_null<scalar_t>(z);
    const scalar_t* bias = cpu::data_or_null<scalar_t>(dt_bias);
    const int64_t* slot_rows = cpu::data_or_null<int64_t>(slot_of);
    scalar_t *h = state.data_ptr<scalar_t>(), *y = out.data_ptr<scalar_t>();
    // rows (b, h, p) of x: channel c = h * P + p of sequence b, reading group h / (H / G)
    at::parallel_for(0, batch * channels, kPairsPerTask, [&](int64_t first, int64_t last) {
      for (int64_t row = first; row < last; ++row) {
        const int64_t b = row / channels, c = row % channels, head = c / dim, p = c % dim;
        const int64_t slot = slot_rows ? slot_rows[b] : b;
        if (slot < 0) {  // a padding row: no state read or written
          y[row] = 0;
          continue;
        }
        scalar_t step = dts[row] + (bias ? bias[c] : scalar_t(0));
        if (dt_softplus) step = math::softplus(step);
        const scalar_t drive = step * xs[row];
        const scalar_t* a_row = a + head * a_stride_h + p * a_stride_p;
        const int64_t group_row = (b * groups + head / heads_per_group) * n;
        scalar_t* h_row = h + slot * h_stride_s + head * h_stride_h + p * h_stride_p;
        const scalar_t *b_row = bs + group_row, *c_row = cs + group_row;
        scalar_t sum = uniform_A ? update_state_uniform(h_row, math::exp(step * a_row[0]), b_row, c_row, drive, n)
                                 : update_state(h_row, a_row, b_row, c_row, step, drive, n);
        if (skip) sum += skip[c] * xs[row];
        y[row] = gate ? sum * math::silu(gate[row]) : sum;
      }
    });
  });
  return out;
}

}  // namespace rnnkern
