// Pieces shared by the CPU LSTM and GRU kernels: sigmoid/tanh written so that loops calling
// them vectorise, per-sequence time indexing, the split of the batch between threads, the
// GEMM each thread runs on its rows, and argument checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "panel_gemm.h"

namespace rnnkern::cpu {

// ---------------------------------------------------------------------------------------
// Activations. The float versions are branch-free, so `#pragma omp simd` loops over them
// vectorise; they stay within 2.5 ulp of the exact value, like ATen's own. The double
// versions are the C library's. The float ones are forced inline: GCC otherwise leaves
// exp_clamped as a call (it is called five times per LSTM unit), and a loop with a call in it
// stays scalar.

// cond ? a : b as a bit blend: under the default -ftrapping-math the compiler keeps a ?:
// between floating-point values as a branch, and the loop around it scalar.
C10_ALWAYS_INLINE float select(bool cond, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return c10::bit_cast<float>((c10::bit_cast<uint32_t>(a) & mask) | (c10::bit_cast<uint32_t>(b) & ~mask));
}

// e^x for float x clamped to [-87, 88], where e^x is a normal float; the clamp saturates
// sigmoid and tanh correctly, and NaN goes through.
C10_ALWAYS_INLINE float exp_clamped(float x) {
  constexpr float kLog2e = 1.44269504f;
  constexpr float kLn2High = 0.693359375f;  // ln 2 = kLn2High + kLn2Low; n * kLn2High is exact
  constexpr float kLn2Low = -2.12194440e-4f;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: v + kShifter holds round(v) in its low bits
  x = select(x < -87.0f, -87.0f, select(x > 88.0f, 88.0f, x));
  const float shifted = x * kLog2e + kShifter;
  const float n = shifted - kShifter;  // round(x / ln 2)
  const float r = (x - n * kLn2High) - n * kLn2Low;  // |r| <= ln(2) / 2
  // Taylor series of e^r to r^7: truncation error below 1e-8 relative.
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n: the biased exponent n + 127 moved into place (unsigned, so NaN's bits are harmless)
  const uint32_t biased = c10::bit_cast<uint32_t>(shifted) - c10::bit_cast<uint32_t>(kShifter) + 127u;
  return p * c10::bit_cast<float>(biased << 23);
}

C10_ALWAYS_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// tanh: an odd Taylor polynomial (to x^17) near 0, (1 - e^{-2|x|}) / (1 + e^{-2|x|}) elsewhere;
// 0.625 is where both stay below 2 ulp.
C10_ALWAYS_INLINE float tanh(float x) {
  const float x2 = x * x;
  float p = static_cast<float>(6404582.0 / 10854718875.0);
  p = p * x2 - static_cast<float>(929569.0 / 638512875.0);
  p = p * x2 + static_cast<float>(21844.0 / 6081075.0);
  p = p * x2 - static_cast<float>(1382.0 / 155925.0);
  p = p * x2 + static_cast<float>(62.0 / 2835.0);
  p = p * x2 - static_cast<float>(17.0 / 315.0);
  p = p * x2 + static_cast<float>(2.0 / 15.0);
  p = p * x2 - static_cast<float>(1.0 / 3.0);
  const float near_zero = x + x * x2 * p;
  const float e = exp_clamped(-2.0f * std::fabs(x));
  const float far = std::copysign((1.0f - e) / (1.0f + e), x);
  return select(std::fabs(x) < 0.625f, near_zero, far);
}
inline double tanh(double x) { return std::tanh(x); }

// ---------------------------------------------------------------------------------------
// Time. Sequence b runs lengths[b] steps; its step s is at time s, or lengths[b] - 1 - s in
// reverse. At steps past its end (s >= lengths[b]) it sits at time s: the kernels fill that
// padding slot of the outputs with zeros and leave the state alone.
struct Schedule {
  const int64_t* lengths;  // (B,), or null when every sequence runs all `steps`
  int64_t steps;
  bool reverse;

  // lengths: undefined, or as returned by checked_lengths
  static Schedule of(const at::Tensor& lengths, int64_t steps, bool reverse) {
    return {lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr, steps, reverse};
  }
  int64_t length(int64_t b) const { return lengths ? lengths[b] : steps; }
  bool active(int64_t b, int64_t s) const { return s < length(b); }
  int64_t time(int64_t b, int64_t s) const { return reverse && active(b, s) ? length(b) - 1 - s : s; }
  // time of the step before s, for 0 < s < length(b)
  int64_t previous_time(int64_t b, int64_t s) const { return time(b, s) + (reverse ? 1 : -1); }
};

// A (B, T, D) tensor whose last stride is 1.
template <typename T>
struct Rows {
  T* data;
  int64_t stride_batch;
  int64_t stride_time;

  static Rows of(const at::Tensor& x) {
    return {x.data_ptr<std::remove_const_t<T>>(), x.stride(0), x.stride(1)};
  }
  T* at(int64_t b, int64_t t) const { return data + b * stride_batch + t * stride_time; }
};

inline at::Tensor unit_last_stride(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

// x's shape with its last dimension replaced by `last`: an output (..., N) for an input (..., K).
inline std::vector<int64_t> with_last_dim(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = last;
  return shape;
}

// ---------------------------------------------------------------------------------------
// Work split: the batch rows divide into one group per thread, and each group runs the whole
// time loop on its own rows (its GEMMs included), so threads never wait for each other.
struct RowGroups {
  int64_t rows;
  int64_t count;

  static RowGroups of(int64_t rows) {
    return {rows, std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()))};
  }
  int64_t begin(int64_t group) const { return rows * group / count; }
};

// Runs fn(first_row, end_row) for every group, the groups in parallel.
template <typename Fn>
void for_each_row_group(int64_t rows, const Fn& fn) {
  const RowGroups groups = RowGroups::of(rows);
  at::parallel_for(0, groups.count, 1, [&](int64_t first, int64_t last) {
    for (int64_t group = first; group < last; ++group) fn(groups.begin(group), groups.begin(group + 1));
  });
}

// The pointwise row functions are compiled for AVX-512 and AVX2 as well as for the baseline
// ISA, and the loader picks one (function multiversioning), so their loops run 16 or 8 floats
// wide where the CPU allows without the build having to target it. (The AVX-512 version made
// the LSTM forward's recurrence 7% faster on a Zen 4; GCC names the x86-64-v4 level from 11 on.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && __GNUC__ >= 11
#define RNNKERN_VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define RNNKERN_VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RNNKERN_VECTORIZED
#endif

// ---------------------------------------------------------------------------------------
// GEMM on row-major operands with leading dimensions: c (m, n) = a (m, k) @ b (k, n). Called
// from inside a row group, so it runs on the calling thread: oneDNN's small-matrix kernel for
// float (about twice as fast as a BLAS call at these shapes), BLAS for double.
// BLAS through at::mm_out on views: b (k, n) has strides (ldb_k, ldb_n), so a transposed
// operand needs no copy.
template <typename T>
void blas_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb_k,
               int64_t ldb_n, T* c, int64_t ldc) {
  if (m == 0) return;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a_view = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, options);
  const at::Tensor b_view = at::from_blob(const_cast<T*>(b), {k, n}, {ldb_k, ldb_n}, options);
  at::Tensor c_view = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::mm_out(c_view, a_view, b_view);
}

inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32  // torch versions that export oneDNN's float kernel
  if (m == 0) return;
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/false, a, b, c, /*is_vnni=*/false);
#else
  blas_gemm(m, n, k, a, lda, b, ldb, 1, c, ldc);
#endif
}

inline void gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                 double* c, int64_t ldc) {
  blas_gemm(m, n, k, a, lda, b, ldb, 1, c, ldc);
}

// The right operand B (k, n) of a product c = a @ B that a kernel repeats `uses` times, kept in
// the layout its GEMM wants. Over many uses a copy pays for itself: packed panels for the AVX2
// kernel where that is the fastest (panel_gemm.h), else B's rows contiguous for the small-matrix
// GEMM. For a few uses, such as decoding one token, B goes to BLAS as it is, with no copy.
constexpr int64_t kCopyMinUses = 4;

template <typename T>
class RightOperand {
 public:
  // b (k, n) of dtype T, any strides; a weight W (n, k) as torch.nn stores it gives W.t()
  static RightOperand of(const at::Tensor& b, int64_t uses) {
    if (uses < kCopyMinUses) return {b, Layout::kStrided};
    if constexpr (std::is_same_v<T, float>) {
      if (panel_gemm_preferred()) return {pack_panels(b), Layout::kPanels, b.size(0), b.size(1)};
    }
    return {b.contiguous(), Layout::kRowMajor};
  }

  // c (m, n) = a (m, k) @ B
  void multiply(int64_t m, const T* a, int64_t lda, T* c, int64_t ldc) const {
    switch (layout_) {
      case Layout::kPanels:
        if constexpr (std::is_same_v<T, float>) panel_gemm(m, n_, k_, a, lda, data_, c, ldc);
        break;
      case Layout::kRowMajor:
        gemm(m, n_, k_, a, lda, data_, n_, c, ldc);
        break;
      case Layout::kStrided:
        blas_gemm(m, n_, k_, a, lda, data_, storage_.stride(0), storage_.stride(1), c, ldc);
        break;
    }
  }

 private:
  enum class Layout { kPanels, kRowMajor, kStrided };

  RightOperand(at::Tensor storage, Layout layout)
      : RightOperand(storage, layout, storage.size(0), storage.size(1)) {}
  RightOperand(at::Tensor storage, Layout layout, int64_t k, int64_t n)
      : storage_(std::move(storage)), data_(storage_.data_ptr<T>()), layout_(layout), k_(k), n_(n) {}

  at::Tensor storage_;
  const T* data_;  // storage_'s, read once: multiply runs every step
  Layout layout_;
  int64_t k_, n_;
};

// ---------------------------------------------------------------------------------------
// Argument checks: the Python layer validates its inputs, but a direct torch.ops call must
// not make a kernel read the wrong memory.

inline void check_shape(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(x.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", x.sizes());
}

inline void check_tensor(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef shape,
                         at::ScalarType dtype) {
  check_shape(op, name, x, shape);
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", x.scalar_type());
}

// lengths as a contiguous int64 tensor with every value in [0, steps], or undefined.
inline at::Tensor checked_lengths(const char* op, const std::optional<at::Tensor>& lengths, int64_t batch,
                                  int64_t steps) {
  if (!lengths.has_value()) return at::Tensor();
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == batch, op, ": lengths must have shape (", batch,
              ",), got ", lengths->sizes());
  at::Tensor values = lengths->to(at::kLong).contiguous();
  if (batch > 0) {
    TORCH_CHECK(values.min().item<int64_t>() >= 0 && values.max().item<int64_t>() <= steps, op,
                ": lengths must lie in [0, ", steps, "]");
  }
  return values;
}

}  // namespace rnnkern::cpu
