// A float GEMM for CPUs with AVX2 and FMA but no AVX-512: c (m, n) = a (m, k) @ B (k, n), with
// B packed once into panels of 16 columns so the inner loop streams it in order.
//
// Why: on such CPUs oneDNN's small-matrix kernel (cpublas::brgemm) reached about a third of a
// 91 GFLOP/s-per-core FMA peak at the recurrences' shapes, and MKL's about 40%, on a 2-core
// Zen 3 (per-step (8, 256) x (256, 1024) products); a 6 x 16 register tile over a packed panel
// reaches about 90% of it. (On a later host of the same kind an FMA-only loop ran at 112 GFLOP/s
// per core, and the tile, its k loop unrolled, at 73-80% of that from L1.)
// On AVX-512 CPUs brgemm is at peak, and the kernels keep it there.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rnnkern::cpu {

constexpr int64_t kPanelWidth = 16;

// Whether this CPU can run the panel kernel: AVX2 and FMA.
bool panel_gemm_supported();

// Whether the kernels use it: supported, and no AVX-512F.
bool panel_gemm_preferred();

// B (k, n), any strides, float -> (ceil(n / 16), k, 16) panels; columns past n are zero.
at::Tensor pack_panels(const at::Tensor& b);

// c (m, n) = a (m, k) @ B (+ bias (n,) on every row, unless null), B as pack_panels returned
// it; runs on the calling thread. Only where panel_gemm_supported().
void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* c,
                int64_t ldc, const float* bias = nullptr);

}  // namespace rnnkern::cpu
