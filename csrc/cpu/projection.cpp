// The input projection of a recurrent layer on CPU, fp32: gx = x W^T + bias for all steps at
// once, one large GEMM, on oneDNN's small-matrix kernel (cpublas::brgemm). Each thread takes a
// range of rows and walks W^T in panels of kPanel columns, running every row block of its
// range against one panel while the panel sits in its L2. Where the BLAS behind at::linear
// takes a narrower vector path than the CPU has (MKL on AMD: AVX2 on an AVX-512 CPU) this is
// faster: (4096, 256) x (256, 1024) on a 2-core Zen 4 took 10.5-11.0 ms against 12.9-13.3 ms.
// Other dtypes, and torch builds without the float brgemm kernel, use at::linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../ops.h"
#include "recurrence.h"

namespace rnnkern {
namespace {

constexpr int64_t kRowsPerBlock = 64;
constexpr int64_t kPanel = 128;  // columns of W^T per panel: K x 128 floats, 128 KiB at K = 256

RNNKERN_VECTORIZED void add_bias(float* __restrict tile, int64_t rows, int64_t cols, int64_t ld,
                                 const float* __restrict bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict row = tile + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] += bias[j];
  }
}

}  // namespace

at::Tensor input_projection_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "input_projection: x (..., K) and weight (N, K) must agree in K, got ", x.sizes(), " and ",
              weight.sizes());
  if (bias.has_value()) cpu::check_shape("input_projection", "bias", *bias, {weight.size(0)});
#ifdef CPUBLAS_BRGEMM_F32F32F32
  const bool all_float = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                         (!bias.has_value() || bias->scalar_type() == at::kFloat);
  if (all_float) {
    const int64_t k = weight.size(1), n = weight.size(0);
    const at::Tensor a = x.reshape({-1, k}).contiguous();  // (M, K)
    const at::Tensor b = weight.t().contiguous();           // (K, N)
    const at::Tensor bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
    const int64_t m = a.size(0);
    at::Tensor out = at::empty({m, n}, a.options());
    const float *a_data = a.data_ptr<float>(), *b_data = b.data_ptr<float>();
    const float* bias_data = bias_values.defined() ? bias_values.data_ptr<float>() : nullptr;
    float* out_data = out.data_ptr<float>();
    at::parallel_for(0, m, kRowsPerBlock, [&](int64_t r0, int64_t r1) {
      for (int64_t p = 0; p < n; p += kPanel) {
        const int64_t cols = std::min(kPanel, n - p);
        for (int64_t r = r0; r < r1; r += kRowsPerBlock) {
          const int64_t rows = std::min(kRowsPerBlock, r1 - r);
          float* tile = out_data + r * n + p;
          at::native::cpublas::brgemm(rows, cols, k, k, n, n, /*add_C=*/false, a_data + r * k, b_data + p, tile,
                                      /*is_vnni=*/false);
          if (bias_data) add_bias(tile, rows, cols, n, bias_data + p);  // while the tile is in cache
        }
      }
    });
    auto shape = x.sizes().vec();
    shape.back() = n;
    return out.view(shape);
  }
#endif
  return at::linear(x, weight, bias);
}

}  // namespace rnnkern
