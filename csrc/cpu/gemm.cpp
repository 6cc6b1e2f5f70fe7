// The float GEMM choice of gemm.h, and the one use of oneDNN's small-matrix kernel
// (at::native::cpublas::brgemm, a private ATen API): a torch without it builds, and runs
// BLAS instead.
#include "gemm.h"

#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <string_view>

#include "panel_gemm.h"

namespace rnnkern::cpu {
namespace {

// The guard: torch versions whose CPUBlas.h declares the float kernel define this macro.
#ifdef CPUBLAS_BRGEMM_F32F32F32
constexpr bool kHaveSmallMatrixGemm = true;

void small_matrix_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                       float* c, int64_t ldc) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/false, a, b, c, /*is_vnni=*/false);
}
#else  // float_gemm() never picks it then; BLAS keeps gemm() whole
constexpr bool kHaveSmallMatrixGemm = false;

void small_matrix_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                       float* c, int64_t ldc) {
  blas_gemm(m, n, k, a, lda, b, ldb, 1, c, ldc);
}
#endif

FloatGemm choose_float_gemm() {
  const char* setting = std::getenv("RNNKERN_CPU_GEMM");
  const std::string_view forced = setting ? setting : "";
  TORCH_CHECK(forced.empty() || forced == "auto" || forced == "blas",
              "RNNKERN_CPU_GEMM must be 'blas', 'auto' or unset, got '", forced, "'");
  if (forced == "blas") return FloatGemm::kBlas;
  if (panel_gemm_preferred()) return FloatGemm::kPanels;
  return kHaveSmallMatrixGemm ? FloatGemm::kSmallMatrix : FloatGemm::kBlas;
}

}  // namespace

FloatGemm float_gemm() {
  static const FloatGemm chosen = choose_float_gemm();
  return chosen;
}

void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc) {
  if (m == 0) return;
  if (float_gemm() == FloatGemm::kSmallMatrix) {
    small_matrix_gemm(m, n, k, a, lda, b, ldb, c, ldc);
  } else {
    blas_gemm(m, n, k, a, lda, b, ldb, 1, c, ldc);
  }
}

}  // namespace rnnkern::cpu
