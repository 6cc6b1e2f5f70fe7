// The GEMMs of the CPU kernels. One entry point, gemm(), multiplies on the calling thread
// (the recurrences call it from inside their row groups, the projection from inside its row
// blocks); RightOperand keeps a right operand that a kernel multiplies by many times in the
// layout its GEMM wants. Which float kernel runs is decided once per process (float_gemm()):
// the AVX2 panel kernel (panel_gemm.h), oneDNN's small-matrix kernel, or BLAS, which every
// build has and which RNNKERN_CPU_GEMM=blas forces.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "panel_gemm.h"

namespace rnnkern::cpu {

enum class FloatGemm {
  kPanels,       // the AVX2 panel kernel: AVX2 and FMA but no AVX-512F
  kSmallMatrix,  // oneDNN's small-matrix kernel (at::native::cpublas::brgemm), where torch has it
  kBlas,         // BLAS through ATen: the fallback, and what RNNKERN_CPU_GEMM=blas picks
};

// The float kernel of this process: read once, from RNNKERN_CPU_GEMM ("blas", or unset or
// "auto" for the fastest this CPU and build have).
FloatGemm float_gemm();

// BLAS through at::mm_out on views: c (m, n) = a (m, k) @ b (k, n), b with strides
// (ldb_k, ldb_n), so a transposed operand needs no copy.
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

// c (m, n) = a (m, k) @ b (k, n) on row-major operands with leading dimensions, on the calling
// thread: for float the small-matrix kernel where float_gemm() is kSmallMatrix (about twice as
// fast as a BLAS call at the recurrences' shapes), else BLAS; BLAS for double.
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc);

inline void gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                 double* c, int64_t ldc) {
  blas_gemm(m, n, k, a, lda, b, ldb, 1, c, ldc);
}

// The right operand B (k, n) of a product c = a @ B that a kernel repeats `uses` times, kept in
// the layout its GEMM wants. Over many uses a copy pays for itself: packed panels where the
// panel kernel runs, else B's rows contiguous for gemm(). For a few uses, such as decoding one
// token, B goes to BLAS as it is, with no copy.
constexpr int64_t kCopyMinUses = 4;

template <typename T>
class RightOperand {
 public:
  // b (k, n) of dtype T, any strides; a weight W (n, k) as torch.nn stores it gives W.t()
  static RightOperand of(const at::Tensor& b, int64_t uses) {
    if (uses < kCopyMinUses) return {b, Layout::kStrided};
    if constexpr (std::is_same_v<T, float>) {
      if (float_gemm() == FloatGemm::kPanels) return {pack_panels(b), Layout::kPanels, b.size(0), b.size(1)};
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

}  // namespace rnnkern::cpu
