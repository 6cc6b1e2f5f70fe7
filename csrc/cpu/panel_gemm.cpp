// The AVX2 panel GEMM of panel_gemm.h. Each panel of B is k rows of 16 floats. A tile of up to
// six rows of a times one panel accumulates in twelve ymm registers: per k, two loads of the
// panel row, one broadcast per row of a and two FMAs per row. All row tiles of a panel run
// back to back, so the panel (16 KiB at k = 256) is read from L1 after the first.
#include "panel_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "../ops.h"
#include "cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RNNKERN_PANEL_GEMM 1
#define RNNKERN_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace rnnkern::cpu {

at::Tensor pack_panels(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kFloat, "pack_panels: B must be a float matrix");
  const int64_t k = b.size(0), n = b.size(1);
  const int64_t panels = (n + kPanelWidth - 1) / kPanelWidth;
  at::Tensor packed = at::empty({panels, k, kPanelWidth}, b.options());
  const float* source = b.data_ptr<float>();
  const int64_t stride_k = b.stride(0), stride_n = b.stride(1);
  float* destination = packed.data_ptr<float>();
  // One column of B at a time into its slot of the panel, which stays in L1 meanwhile: for a
  // weight W (n, k) passed as W.t() each column is a contiguous row of W. (A copy_ of the
  // permuted view took 0.3 ms per 1 MiB weight on a Zen 3.)
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      float* panel = destination + p * k * kPanelWidth;
      const int64_t cols = std::min(kPanelWidth, n - p * kPanelWidth);
      for (int64_t j = 0; j < cols; ++j) {
        const float* column = source + (p * kPanelWidth + j) * stride_n;
        for (int64_t row = 0; row < k; ++row) panel[row * kPanelWidth + j] = column[row * stride_k];
      }
      for (int64_t j = cols; j < kPanelWidth; ++j) {  // columns past n are zeros
        for (int64_t row = 0; row < k; ++row) panel[row * kPanelWidth + j] = 0.0f;
      }
    }
  });
  return packed;
}

#ifdef RNNKERN_PANEL_GEMM

bool panel_gemm_supported() { return has_avx2_fma(); }

bool panel_gemm_preferred() {
  static const bool preferred = panel_gemm_supported() && !__builtin_cpu_supports("avx512f");
  return preferred;
}

namespace {

// One row of the tile: acc_r0/acc_r1 += a[r][p] * panel row p (columns 0-7 and 8-15).
#define RNNKERN_TILE_ROW(r)                                              \
  if constexpr (kRows > r) {                                             \
    const __m256 a_rp = _mm256_broadcast_ss(a_p + r * lda);              \
    acc_##r##0 = _mm256_fmadd_ps(a_rp, b_lo, acc_##r##0);                \
    acc_##r##1 = _mm256_fmadd_ps(a_rp, b_hi, acc_##r##1);                \
  }

#define RNNKERN_TILE_STORE(r)                                            \
  if constexpr (kRows > r) {                                             \
    _mm256_storeu_ps(out + r * ld_out, acc_##r##0);                      \
    _mm256_storeu_ps(out + r * ld_out + 8, acc_##r##1);                  \
  }

constexpr int64_t kPrefetchRows = 32;

// c (kRows, cols) = start + a (kRows, k) @ panel (k, 16)[:, :cols], where start (16,) is added
// to every row. The accumulators are named registers, not an array: GCC keeps an array of
// them in memory and stores it every step.
template <int kRows>
RNNKERN_AVX2 void tile(int64_t k, const float* a, int64_t lda, const float* panel, const float* start, float* c,
                       int64_t ldc, int64_t cols) {
  const __m256 start_lo = _mm256_load_ps(start), start_hi = _mm256_load_ps(start + 8);
  __m256 acc_00 = start_lo, acc_01 = start_hi, acc_10 = start_lo, acc_11 = start_hi;
  __m256 acc_20 = start_lo, acc_21 = start_hi, acc_30 = start_lo, acc_31 = start_hi;
  __m256 acc_40 = start_lo, acc_41 = start_hi, acc_50 = start_lo, acc_51 = start_hi;
  // Four steps of p per trip: the loop's own counter, compare and branch then cost a quarter,
  // which the three-row tile (six FMAs a step) feels most. LSTM layer forward, B=16 T=256
  // H=256 on a 2-core Zen 3, builds alternating process by process: medians 44.0 -> 39.3,
  // 43.2 -> 41.4 and 42.1 -> 39.8 ms; unrolling by 8 gained no more.
#pragma GCC unroll 4
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b_lo = _mm256_load_ps(panel + p * kPanelWidth);
    const __m256 b_hi = _mm256_load_ps(panel + p * kPanelWidth + 8);
    // the panel 32 rows ahead, which runs into the next panel at the end: the hardware
    // prefetcher alone left the recurrences' tiles waiting on L3 (about 7% on a Zen 3)
    _mm_prefetch(reinterpret_cast<const char*>(panel + (p + kPrefetchRows) * kPanelWidth), _MM_HINT_T0);
    const float* a_p = a + p;
    RNNKERN_TILE_ROW(0)
    RNNKERN_TILE_ROW(1)
    RNNKERN_TILE_ROW(2)
    RNNKERN_TILE_ROW(3)
    RNNKERN_TILE_ROW(4)
    RNNKERN_TILE_ROW(5)
  }
  alignas(32) float partial[6 * kPanelWidth];
  const bool whole = cols == kPanelWidth;
  float* out = whole ? c : partial;
  const int64_t ld_out = whole ? ldc : kPanelWidth;
  RNNKERN_TILE_STORE(0)
  RNNKERN_TILE_STORE(1)
  RNNKERN_TILE_STORE(2)
  RNNKERN_TILE_STORE(3)
  RNNKERN_TILE_STORE(4)
  RNNKERN_TILE_STORE(5)
  if (!whole) {
    for (int r = 0; r < kRows; ++r) std::copy_n(partial + r * kPanelWidth, cols, c + r * ldc);
  }
}

#undef RNNKERN_TILE_ROW
#undef RNNKERN_TILE_STORE

using Tile = void (*)(int64_t, const float*, int64_t, const float*, const float*, float*, int64_t, int64_t);
constexpr Tile kTiles[] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

// Rows in the next tile: six, except that 7 left split as 4 + 3 and 8 as 5 + 3, because a
// tile of one or two rows has too few accumulators to hide the FMA latency. Of the splits of
// 8 (each thread's rows of a 16-row batch on 2 cores), 5 + 3 ran the LSTM recurrence 12-15%
// faster than 4 + 4 on a 2-core Zen 3 (forward 28.4 -> 24.1 ms, backward 29.3 -> 25.7 ms,
// medians of five processes each); 6 + 2 fell in between. The first tile of a panel waits on
// the panel's loads from L3, and five rows' ten accumulators leave it slack that four lack.
int64_t tile_rows(int64_t left) {
  if (left == 8) return 5;
  if (left == 7) return 4;
  return std::min<int64_t>(left, 6);
}

}  // namespace

void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* c,
                int64_t ldc, const float* bias) {
  alignas(32) float start[kPanelWidth];  // the panel's bias columns, zeros past n or without one
  for (int64_t col = 0; col < n; col += kPanelWidth) {
    const float* panel = panels + (col / kPanelWidth) * k * kPanelWidth;
    const int64_t cols = std::min(kPanelWidth, n - col);
    std::fill_n(start, kPanelWidth, 0.0f);
    if (bias) std::copy_n(bias + col, cols, start);
    for (int64_t row = 0; row < m;) {
      const int64_t rows = tile_rows(m - row);
      kTiles[rows](k, a + row * lda, lda, panel, start, c + row * ldc + col, ldc, cols);
      row += rows;
    }
  }
}

#else  // not x86-64 with GCC or clang: the kernels use their other GEMMs

bool panel_gemm_supported() { return false; }
bool panel_gemm_preferred() { return false; }

void panel_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, const float*) {
  TORCH_CHECK(false, "panel_gemm: this build has no AVX2 kernel");
}

#endif

}  // namespace rnnkern::cpu

namespace rnnkern {

at::Tensor panel_matmul_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(cpu::panel_gemm_supported(), "panel_matmul: this CPU (or build) has no AVX2 and FMA");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "panel_matmul: a (M, K) and b (K, N) must ",
              "agree in K, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "panel_matmul: a and b must be float");
  const at::Tensor rows = a.contiguous();
  const at::Tensor panels = cpu::pack_panels(b);
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  cpu::panel_gemm(a.size(0), b.size(1), a.size(1), rows.data_ptr<float>(), a.size(1), panels.data_ptr<float>(),
                  c.data_ptr<float>(), b.size(1));
  return c;
}

}  // namespace rnnkern
