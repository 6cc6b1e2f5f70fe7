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
#include "gemv.h"
#include "phases.h"
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

// One step of a depthwise causal convolution: `window` (the last W inputs, newest last)
// shifted by one to take x; returns bias + weights . window.
template <typename T>
T conv_step(T* __restrict window, T x, const T* __restrict weights, T bias, int64_t width) {
  std::copy(window + 1, window + width, window);
  window[width - 1] = x;
  T sum = bias;
  for (int64_t k = 0; k < width; ++k) sum += weights[k] * window[k];
  return sum;
}

// conv_step over `count` channels, x (count,) in place: the window of channel c is
// windows[c W : (c + 1) W], its taps taps[c W : (c + 1) W]; then silu. The default width of 4
// is unrolled (a loop of 4 with a shift costs more than the multiply-adds).
template <typename T>
RNNKERN_VECTORIZED void convolve_channels(T* __restrict x, T* __restrict windows, const T* __restrict taps,
                                          const T* __restrict bias, int64_t count, int64_t width) {
  if (width == 4) {
    for (int64_t c = 0; c < count; ++c) {
      T* __restrict window = windows + 4 * c;
      const T* __restrict k = taps + 4 * c;
      const T w1 = window[1], w2 = window[2], w3 = window[3], newest = x[c];
      window[0] = w1, window[1] = w2, window[2] = w3, window[3] = newest;
      x[c] = (bias ? bias[c] : T(0)) + k[0] * w1 + k[1] * w2 + k[2] * w3 + k[3] * newest;
    }
  } else {
    for (int64_t c = 0; c < count; ++c) {
      x[c] = conv_step(windows + c * width, x[c], taps + c * width, bias ? bias[c] : T(0), width);
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < count; ++c) x[c] = math::silu(x[c]);
}

// The block steps' state updates run in two passes: the states advanced (vectorised along N,
// no reduction), then read out, y = C . h per channel, as a matrix-vector product (gemv.h) of
// the (channels, N) states with C. A sum over N = 16 per channel inside the first loop left
// GCC a lane-by-lane reduction per channel that took half the update's time.

// Mamba, `count` channels of one row: dt (in `step`) through softplus, the gate z through silu
// (both in place), then each channel's N states h = e^{step A} h + step x B.
template <typename T>
RNNKERN_VECTORIZED void advance_channels(T* __restrict h, const T* __restrict A, const T* __restrict B,
                                         const T* __restrict x, T* __restrict step, T* __restrict z, int64_t count,
                                         int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < count; ++c) {
    step[c] = math::softplus_branchless(step[c]);
    z[c] = math::silu(z[c]);
  }
  for (int64_t c = 0; c < count; ++c) {
    const T dt = step[c], drive = dt * x[c];
    T* __restrict h_row = h + c * n;
    const T* __restrict a_row = A + c * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h_row[i] = math::exp(dt * a_row[i]) * h_row[i] + drive * B[i];
  }
}

// Mamba-2, one head of P channels: h (P, N) = decay h + step x B^T.
template <typename T>
RNNKERN_VECTORIZED void advance_head(T* __restrict h, T decay, T step, const T* __restrict B, const T* __restrict x,
                                     int64_t p_count, int64_t n) {
  for (int64_t p = 0; p < p_count; ++p) {
    const T drive = step * x[p];
    T* __restrict h_row = h + p * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h_row[i] = decay * h_row[i] + drive * B[i];
  }
}

// y += D x, D per channel (d_stride 1) or one value (d_stride 0); then y *= gate where given.
template <typename T>
RNNKERN_VECTORIZED void add_skip(T* __restrict y, const T* __restrict D, int64_t d_stride, const T* __restrict x,
                                 const T* __restrict gate, int64_t count) {
#pragma omp simd
  for (int64_t c = 0; c < count; ++c) y[c] += D[c * d_stride] * x[c];
  if (gate) {
#pragma omp simd
    for (int64_t c = 0; c < count; ++c) y[c] *= gate[c];
  }
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

// ---------------------------------------------------------------------------------------
// Whole-block decode steps: one call per block and token. At one token the block is four
// (Mamba) or two (Mamba-2) matrix-vector products around a few thousand pointwise operations,
// so the step runs at the speed its weights stream from cache or memory once the op dispatches
// and temporaries of the op-by-op form are gone. Each phase below is a parallel loop over
// independent rows (weight rows, channels or heads); a phase reads the whole output of the one
// before, so they are separate loops.

// Rows of a (..., D) tensor: the product of its leading dimensions.
int64_t leading_rows(const at::Tensor& t) { return c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)); }

// How the phases of a block step split (cpu/phases.h): a few chunks per thread, so a thread
// that wakes late takes fewer; weight rows in project_rows' blocks of 4 and at least kMinRows
// per chunk, channels in whole vectors and at least kMinChannels.
constexpr int64_t kChunksPerThread = 2;
constexpr int64_t kRowBlock = 4;
constexpr int64_t kMinRows = 16;
constexpr int64_t kVectorWidth = 16;
constexpr int64_t kMinChannels = 64;

// A depthwise conv weight, torch.nn.Conv1d's (C, 1, W) or the ops' (C, W), contiguous: its data
// is (C, W) row-major either way.
at::Tensor conv_taps(const char* op, const at::Tensor& weight, int64_t channels, at::ScalarType dtype) {
  TORCH_CHECK((weight.dim() == 2 || (weight.dim() == 3 && weight.size(1) == 1)) && weight.size(0) == channels &&
                  weight.size(-1) > 0,
              op, ": conv_weight must have shape (", channels, ", 1, W) or (", channels, ", W), got ", weight.sizes());
  cpu::check_dtype(op, "conv_weight", weight, dtype);
  return weight.contiguous();
}

// Pointwise passes over a row of channels, vectorised (the activations are branch-free).
template <typename T>
RNNKERN_VECTORIZED void silu_in_place(T* __restrict v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = math::silu(v[i]);
}

template <typename T>
RNNKERN_VECTORIZED void softplus_in_place(T* __restrict v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = math::softplus_branchless(v[i]);
}

// y *= silu(z)
template <typename T>
RNNKERN_VECTORIZED void multiply_silu(T* __restrict y, const T* __restrict z, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= math::silu(z[i]);
}

// y += v
template <typename T>
RNNKERN_VECTORIZED void add_in_place(T* __restrict y, const T* __restrict v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += v[i];
}

// y = y / sqrt(mean(y^2) + eps) * weight
template <typename T>
RNNKERN_VECTORIZED void rms_normalise(T* __restrict y, const T* __restrict weight, T eps, int64_t n) {
  T squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) squares += y[i] * y[i];
  const T scale = T(1) / std::sqrt(squares / T(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= scale * weight[i];
}

// Mamba (selective SSM) block, per row b: E channels, N states, R time-step ranks.
template <typename T>
struct MambaBlockStep {
  int64_t batch, d_model, E, W, R, N;
  const T *u, *w_in, *b_in, *w_conv, *b_conv, *w_x, *w_dt, *b_dt, *A, *D, *w_out, *b_out;
  T *conv_state, *ssm_state;  // (B, E, W), (B, E, N), updated in place
  T *x, *z, *xdbl, *y, *out;  // (B, E), (B, E), (B, R + 2N), (B, E); out (B, d_model)

  int64_t xdbl_width() const { return R + 2 * N; }

  // channels [e0, e1): x and z rows of in_proj, then the conv step and silu on x
  void project_and_convolve(int64_t e0, int64_t e1) const {
    cpu::project_rows(w_in, d_model, e0, e1 - e0, b_in, u, d_model, batch, x + e0, E);
    cpu::project_rows(w_in, d_model, E + e0, e1 - e0, b_in, u, d_model, batch, z + e0, E);
    for (int64_t b = 0; b < batch; ++b) {
      convolve_channels(x + b * E + e0, conv_state + (b * E + e0) * W, w_conv + e0 * W, b_conv ? b_conv + e0 : nullptr,
                        e1 - e0, W);
    }
  }

  // rows [r0, r1) of x_proj: (dt, B, C) before dt_proj
  void project_x(int64_t r0, int64_t r1) const {
    cpu::project_rows(w_x, E, r0, r1 - r0, nullptr, x, E, batch, xdbl + r0, xdbl_width());
  }

  // channels [e0, e1): dt_proj, then softplus, the state update, the D skip and the z gate
  void update(int64_t e0, int64_t e1) const {
    const int64_t width = xdbl_width();
    cpu::project_rows(w_dt, R, e0, e1 - e0, b_dt, xdbl, width, batch, y + e0, E);  // y holds dt until overwritten
    for (int64_t b = 0; b < batch; ++b) {
      const T* B_row = xdbl + b * width + R;
      const int64_t i = b * E + e0, count = e1 - e0;
      T* h = ssm_state + i * N;
      advance_channels(h, A + e0 * N, B_row, x + i, y + i, z + i, count, N);
      cpu::project_rows(h, N, 0, count, nullptr, B_row + N, N, 1, y + i, count);  // y = C . h
      add_skip(y + i, D + e0, 1, x + i, z + i, count);
    }
  }

  // rows [r0, r1) of out_proj
  void project_out(int64_t r0, int64_t r1) const {
    cpu::project_rows(w_out, E, r0, r1 - r0, b_out, y, E, batch, out + r0, d_model);
  }

  void operator()() const {
    const int64_t threads = at::get_num_threads();
    const int64_t channels = cpu::chunk_for(E, threads, kChunksPerThread, kVectorWidth, kMinChannels);
    cpu::run_phases({
        {E, channels, [&](int64_t a, int64_t b) { project_and_convolve(a, b); }},
        {xdbl_width(), cpu::chunk_for(xdbl_width(), threads, 1, kRowBlock, kMinRows),
         [&](int64_t a, int64_t b) { project_x(a, b); }},
        {E, channels, [&](int64_t a, int64_t b) { update(a, b); }},
        {d_model, cpu::chunk_for(d_model, threads, kChunksPerThread, kRowBlock, kMinRows),
         [&](int64_t a, int64_t b) { project_out(a, b); }},
    });
  }
};

// Mamba-2 (SSD) block, per row b: H heads of P channels (E = H P), G groups of N states;
// in_proj's rows are [z (E), x (E), B (G N), C (G N), dt (H)], the conv runs over x, B, C.
template <typename T>
struct Mamba2BlockStep {
  int64_t batch, d_model, H, P, G, N, W, norm_group;  // norm_group: channels per norm group, 0 without the norm
  const T *u, *w_in, *b_in, *w_conv, *b_conv, *dt_bias, *A, *D, *norm_w, *w_out, *b_out;
  bool D_per_channel, norm_before_gate;
  T norm_eps, dt_min, dt_max;
  T *conv_state, *ssm_state;  // (B, E + 2GN, W), (B, H, P, N), updated in place
  T *zxbcdt, *y, *out;        // (B, in_width), (B, E); out (B, d_model)

  int64_t E() const { return H * P; }
  int64_t conv_width() const { return E() + 2 * G * N; }
  int64_t in_width() const { return 2 * E() + 2 * G * N + H; }

  void project_in(int64_t r0, int64_t r1) const {
    cpu::project_rows(w_in, d_model, r0, r1 - r0, b_in, u, d_model, batch, zxbcdt + r0, in_width());
  }

  // conv channels [c0, c1) of x, B, C: the conv step and silu, in place in zxbcdt
  void convolve(int64_t c0, int64_t c1) const {
    const int64_t channels = conv_width();
    for (int64_t b = 0; b < batch; ++b) {
      T* xbc = zxbcdt + b * in_width() + E();
      convolve_channels(xbc + c0, conv_state + (b * channels + c0) * W, w_conv + c0 * W,
                        b_conv ? b_conv + c0 : nullptr, c1 - c0, W);
    }
  }

  // pairs [q0, q1) of (row b, head h): the time step, the state update, D, and the z gate
  // unless the norm applies it
  void update(int64_t q0, int64_t q1) const {
    const int64_t heads_per_group = H / G;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = q / H, h = q % H, g = h / heads_per_group;
      const T* row = zxbcdt + b * in_width();
      const T *z = row + h * P, *x = row + E() + h * P, *Bg = row + 2 * E() + g * N, *Cg = Bg + G * N;
      const T step = std::min(std::max(math::softplus(row[in_width() - H + h] + dt_bias[h]), dt_min), dt_max);
      T* y_head = y + b * E() + h * P;
      T* h_head = ssm_state + q * P * N;
      advance_head(h_head, math::exp(step * A[h]), step, Bg, x, P, N);
      cpu::project_rows(h_head, N, 0, P, nullptr, Cg, N, 1, y_head, P);  // y = C . h
      add_skip(y_head, D_per_channel ? D + h * P : D + h, D_per_channel ? 1 : 0, x, static_cast<const T*>(nullptr), P);
      if (!norm_group) multiply_silu(y_head, z, P);
    }
  }

  // rows [b0, b1): the gated RMSNorm of y, group by group
  void normalise(int64_t b0, int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b) {
      const T* z = zxbcdt + b * in_width();
      T* y_row = y + b * E();
      for (int64_t c = 0; c < E(); c += norm_group) {
        if (!norm_before_gate) multiply_silu(y_row + c, z + c, norm_group);
        rms_normalise(y_row + c, norm_w + c, norm_eps, norm_group);
        if (norm_before_gate) multiply_silu(y_row + c, z + c, norm_group);
      }
    }
  }

  void project_out(int64_t r0, int64_t r1) const {
    cpu::project_rows(w_out, E(), r0, r1 - r0, b_out, y, E(), batch, out + r0, d_model);
  }

  void operator()() const {
    const int64_t threads = at::get_num_threads();
    const int64_t heads = batch * H;
    cpu::run_phases({
        {in_width(), cpu::chunk_for(in_width(), threads, kChunksPerThread, kRowBlock, kMinRows),
         [&](int64_t a, int64_t b) { project_in(a, b); }},
        {conv_width(), cpu::chunk_for(conv_width(), threads, 1, kVectorWidth, kMinChannels),
         [&](int64_t a, int64_t b) { convolve(a, b); }},
        {heads, cpu::chunk_for(heads, threads, kChunksPerThread, 1, std::max<int64_t>(1, kMinChannels / P)),
         [&](int64_t a, int64_t b) { update(a, b); }},
        {norm_group ? batch : 0, 1, [&](int64_t a, int64_t b) { normalise(a, b); }},
        {d_model, cpu::chunk_for(d_model, threads, kChunksPerThread, kRowBlock, kMinRows),
         [&](int64_t a, int64_t b) { project_out(a, b); }},
    });
  }
};

// Checks of a block step's tensors common to both blocks: u (..., d_model) and out_proj.
void check_block_input(const char* op, const at::Tensor& u, const at::Tensor& in_proj_weight, int64_t in_rows,
                       const std::optional<at::Tensor>& in_proj_bias) {
  TORCH_CHECK(u.dim() >= 1, op, ": u must have shape (..., d_model), got ", u.sizes());
  cpu::check_float_or_double(op, "u", u);
  cpu::check_tensor(op, "in_proj_weight", in_proj_weight, {in_rows, u.size(-1)}, u.scalar_type());
  cpu::check_optional(op, "in_proj_bias", in_proj_bias, {in_rows}, u.scalar_type());
}

void check_out_proj(const char* op, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t d_model,
                    int64_t channels, at::ScalarType dtype) {
  cpu::check_tensor(op, "out_proj_weight", weight, {d_model, channels}, dtype);
  cpu::check_optional(op, "out_proj_bias", bias, {d_model}, dtype);
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
        const scalar_t sum = conv_step(states + pair * width, xs[pair], w + d * width, b ? b[d] : scalar_t(0), width);
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

namespace {

at::Tensor mamba_block_step(const at::Tensor& u_in, at::Tensor& conv_state, at::Tensor& ssm_state,
                            const at::Tensor& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                            const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                            const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                            const at::Tensor& dt_proj_bias, const at::Tensor& A, const at::Tensor& D,
                            const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias) {
  const char* op = "mamba_block_step";
  TORCH_CHECK(in_proj_weight.dim() == 2 && in_proj_weight.size(0) % 2 == 0, op,
              ": in_proj_weight must have shape (2E, d_model), got ", in_proj_weight.sizes());
  const int64_t E = in_proj_weight.size(0) / 2;
  check_block_input(op, u_in, in_proj_weight, 2 * E, in_proj_bias);
  const auto dtype = u_in.scalar_type();
  const int64_t batch = leading_rows(u_in), d_model = u_in.size(-1);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == E, op, ": A must have shape (", E, ", N), got ", A.sizes());
  const int64_t N = A.size(1);
  TORCH_CHECK(dt_proj_weight.dim() == 2 && dt_proj_weight.size(0) == E, op, ": dt_proj_weight must have shape (", E,
              ", R), got ", dt_proj_weight.sizes());
  const int64_t R = dt_proj_weight.size(1);
  const at::Tensor taps = conv_taps(op, conv_weight, E, dtype);
  const int64_t W = taps.size(-1);
  cpu::check_optional(op, "conv_bias", conv_bias, {E}, dtype);
  cpu::check_tensor(op, "x_proj_weight", x_proj_weight, {R + 2 * N, E}, dtype);
  cpu::check_dtype(op, "dt_proj_weight", dt_proj_weight, dtype);
  cpu::check_tensor(op, "dt_proj_bias", dt_proj_bias, {E}, dtype);
  cpu::check_dtype(op, "A", A, dtype);
  cpu::check_tensor(op, "D", D, {E}, dtype);
  check_out_proj(op, out_proj_weight, out_proj_bias, d_model, E, dtype);
  check_state(op, "conv_state", conv_state, {batch, E, W}, dtype);
  check_state(op, "ssm_state", ssm_state, {batch, E, N}, dtype);
  const at::Tensor u = u_in.contiguous(), w_in = in_proj_weight.contiguous(), w_x = x_proj_weight.contiguous();
  const at::Tensor w_dt = dt_proj_weight.contiguous(), b_dt = dt_proj_bias.contiguous(), a = A.contiguous();
  const at::Tensor d = D.contiguous(), w_out = out_proj_weight.contiguous();
  const at::Tensor b_in = cpu::contiguous_or_undefined(in_proj_bias), b_conv = cpu::contiguous_or_undefined(conv_bias);
  const at::Tensor b_out = cpu::contiguous_or_undefined(out_proj_bias);
  at::Tensor scratch = at::empty({batch, 3 * E + R + 2 * N}, u.options());
  at::Tensor out = at::empty(cpu::with_last_dim(u_in, d_model), u.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "mamba_block_step_cpu", [&] {
    scalar_t* work = scratch.data_ptr<scalar_t>();
    const MambaBlockStep<scalar_t> step{
        batch, d_model, E, W, R, N,
        u.data_ptr<scalar_t>(), w_in.data_ptr<scalar_t>(), cpu::data_or_null<scalar_t>(b_in),
        taps.data_ptr<scalar_t>(), cpu::data_or_null<scalar_t>(b_conv), w_x.data_ptr<scalar_t>(),
        w_dt.data_ptr<scalar_t>(), b_dt.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
        w_out.data_ptr<scalar_t>(), cpu::data_or_null<scalar_t>(b_out),
        conv_state.data_ptr<scalar_t>(), ssm_state.data_ptr<scalar_t>(),
        work, work + batch * E, work + 2 * batch * E, work + batch * (2 * E + R + 2 * N), out.data_ptr<scalar_t>()};
    step();
  });
  return out;
}

at::Tensor mamba2_block_step(const at::Tensor& u_in, at::Tensor& conv_state, at::Tensor& ssm_state,
                             const at::Tensor& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                             const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                             const at::Tensor& dt_bias, const at::Tensor& A, const at::Tensor& D,
                             const std::optional<at::Tensor>& norm_weight, double norm_eps,
                             int64_t norm_group_size, bool norm_before_gate, double dt_min, double dt_max,
                             const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias) {
  const char* op = "mamba2_block_step";
  TORCH_CHECK(ssm_state.dim() == 4, op, ": ssm_state must have shape (B, H, P, N), got ", ssm_state.sizes());
  const int64_t H = ssm_state.size(1), P = ssm_state.size(2), N = ssm_state.size(3), E = H * P;
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(1) > E && (conv_state.size(1) - E) % (2 * N) == 0 &&
                  H % ((conv_state.size(1) - E) / (2 * N)) == 0,
              op, ": conv_state must have shape (B, E + 2 G N, W) with E = ", E, ", N = ", N,
              " and G dividing H = ", H, ", got ", conv_state.sizes());
  const int64_t G = (conv_state.size(1) - E) / (2 * N), channels = E + 2 * G * N, in_rows = 2 * E + 2 * G * N + H;
  check_block_input(op, u_in, in_proj_weight, in_rows, in_proj_bias);
  const auto dtype = u_in.scalar_type();
  const int64_t batch = leading_rows(u_in), d_model = u_in.size(-1);
  const at::Tensor taps = conv_taps(op, conv_weight, channels, dtype);
  const int64_t W = taps.size(-1);
  cpu::check_optional(op, "conv_bias", conv_bias, {channels}, dtype);
  cpu::check_tensor(op, "dt_bias", dt_bias, {H}, dtype);
  cpu::check_tensor(op, "A", A, {H}, dtype);
  TORCH_CHECK(D.dim() == 1 && (D.size(0) == H || D.size(0) == E), op, ": D must have shape (", H, ",) or (", E,
              ",), got ", D.sizes());
  cpu::check_dtype(op, "D", D, dtype);
  cpu::check_optional(op, "norm_weight", norm_weight, {E}, dtype);
  TORCH_CHECK(!norm_weight.has_value() || (norm_group_size > 0 && E % norm_group_size == 0), op,
              ": norm_group_size must divide E = ", E, ", got ", norm_group_size);
  TORCH_CHECK(dt_min <= dt_max, op, ": dt_min must not exceed dt_max, got ", dt_min, " and ", dt_max);
  check_out_proj(op, out_proj_weight, out_proj_bias, d_model, E, dtype);
  check_state(op, "conv_state", conv_state, {batch, channels, W}, dtype);
  check_state(op, "ssm_state", ssm_state, {batch, H, P, N}, dtype);
  const at::Tensor u = u_in.contiguous(), w_in = in_proj_weight.contiguous(), bias_dt = dt_bias.contiguous();
  const at::Tensor a = A.contiguous(), d = D.contiguous(), w_out = out_proj_weight.contiguous();
  const at::Tensor b_in = cpu::contiguous_or_undefined(in_proj_bias), b_conv = cpu::contiguous_or_undefined(conv_bias);
  const at::Tensor w_norm = cpu::contiguous_or_undefined(norm_weight), b_out = cpu::contiguous_or_undefined(out_proj_bias);
  at::Tensor scratch = at::empty({batch, in_rows + E}, u.options());
  at::Tensor out = at::empty(cpu::with_last_dim(u_in, d_model), u.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "mamba2_block_step_cpu", [&] {
    scalar_t* work = scratch.data_ptr<scalar_t>();
    const Mamba2BlockStep<scalar_t> step{
        batch, d_model, H, P, G, N, W, norm_weight.has_value() ? norm_group_size : 0,
        u.data_ptr<scalar_t>(), w_in.data_ptr<scalar_t>(), cpu::data_or_null<scalar_t>(b_in),
        taps.data_ptr<scalar_t>(), cpu::data_or_null<scalar_t>(b_conv), bias_dt.data_ptr<scalar_t>(),
        a.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), cpu::data_or_null<scalar_t>(w_norm),
        w_out.data_ptr<scalar_t>(), cpu::data_or_null<scalar_t>(b_out),
        D.size(0) == E && E != H, norm_before_gate,
        static_cast<scalar_t>(norm_eps), static_cast<scalar_t>(dt_min), static_cast<scalar_t>(dt_max),
        conv_state.data_ptr<scalar_t>(), ssm_state.data_ptr<scalar_t>(),
        work, work + batch * in_rows, out.data_ptr<scalar_t>()};
    step();
  });
  return out;
}

// The parameters arrive as one list, in the order below (one list argument costs the
// dispatcher about what one tensor argument does; a decode step cannot afford twelve).
at::Tensor required(const c10::List<std::optional<at::Tensor>>& parameters, size_t index, const char* op,
                    const char* name) {
  std::optional<at::Tensor> parameter = parameters.get(index);
  TORCH_CHECK(parameter.has_value(), op, ": parameter ", index, " (", name, ") is required, got None");
  return *std::move(parameter);
}

void check_count(const c10::List<std::optional<at::Tensor>>& parameters, size_t count, const char* op) {
  TORCH_CHECK(parameters.size() == count, op, ": expected ", count, " parameters, got ", parameters.size());
}

}  // namespace

at::Tensor mamba_block_step_cpu(const at::Tensor& u, at::Tensor& conv_state, at::Tensor& ssm_state,
                                const c10::List<std::optional<at::Tensor>>& parameters) {
  // in_proj.weight, in_proj.bias, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight,
  // dt_proj.bias, A (= -exp(A_log)), D, out_proj.weight, out_proj.bias
  const char* op = "mamba_block_step";
  check_count(parameters, 11, op);
  return mamba_block_step(u, conv_state, ssm_state, required(parameters, 0, op, "in_proj_weight"), parameters.get(1),
                          required(parameters, 2, op, "conv_weight"), parameters.get(3),
                          required(parameters, 4, op, "x_proj_weight"), required(parameters, 5, op, "dt_proj_weight"),
                          required(parameters, 6, op, "dt_proj_bias"), required(parameters, 7, op, "A"),
                          required(parameters, 8, op, "D"), required(parameters, 9, op, "out_proj_weight"),
                          parameters.get(10));
}

at::Tensor mamba2_block_step_cpu(const at::Tensor& u, at::Tensor& conv_state, at::Tensor& ssm_state,
                                 const c10::List<std::optional<at::Tensor>>& parameters, int64_t norm_group_size,
                                 bool norm_before_gate, double norm_eps, double dt_min, double dt_max) {
  // in_proj.weight, in_proj.bias, conv1d.weight, conv1d.bias, dt_bias, A (= -exp(A_log)), D,
  // norm.weight (None without the norm), out_proj.weight, out_proj.bias
  const char* op = "mamba2_block_step";
  check_count(parameters, 10, op);
  return mamba2_block_step(u, conv_state, ssm_state, required(parameters, 0, op, "in_proj_weight"), parameters.get(1),
                           required(parameters, 2, op, "conv_weight"), parameters.get(3),
                           required(parameters, 4, op, "dt_bias"), required(parameters, 5, op, "A"),
                           required(parameters, 6, op, "D"), parameters.get(7), norm_eps, norm_group_size,
                           norm_before_gate, dt_min, dt_max, required(parameters, 8, op, "out_proj_weight"),
                           parameters.get(9));
}

at::Tensor rms_norm_gated_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                              const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& z_in,
                              double eps, int64_t group_size, bool norm_before_gate) {
  const char* op = "rms_norm_gated";
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have shape (..., d), got ", x_in.sizes());
  cpu::check_float_or_double(op, "x", x_in);
  const int64_t dim = x_in.size(-1), rows = leading_rows(x_in);
  const auto dtype = x_in.scalar_type();
  cpu::check_tensor(op, "weight", weight_in, {dim}, dtype);
  cpu::check_optional(op, "bias", bias_in, {dim}, dtype);
  TORCH_CHECK(!z_in.has_value() || z_in->sizes() == x_in.sizes(), op, ": z must have x's shape ", x_in.sizes());
  if (z_in.has_value()) cpu::check_dtype(op, "z", *z_in, dtype);
  TORCH_CHECK(group_size > 0 && dim % group_size == 0, op, ": group_size must divide d = ", dim, ", got ",
              group_size);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = cpu::contiguous_or_undefined(bias_in), z = cpu::contiguous_or_undefined(z_in);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(dtype, "rms_norm_gated_cpu", [&] {
    const scalar_t *xs = x.data_ptr<scalar_t>(), *w = weight.data_ptr<scalar_t>();
    const scalar_t *b = cpu::data_or_null<scalar_t>(bias), *gate = cpu::data_or_null<scalar_t>(z);
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 8 * kMinChannels / dim), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        std::copy_n(xs + r * dim, dim, y + r * dim);
        for (int64_t c = r * dim; c < (r + 1) * dim; c += group_size) {
          if (gate && !norm_before_gate) multiply_silu(y + c, gate + c, group_size);
          rms_normalise(y + c, w + c % dim, static_cast<scalar_t>(eps), group_size);
          if (b) add_in_place(y + c, b + c % dim, group_size);
          if (gate && norm_before_gate) multiply_silu(y + c, gate + c, group_size);
        }
      }
    });
  });
  return out;
}

}  // namespace rnnkern
