// The input projection of a recurrent layer on CPU, fp32: gx = x W^T + bias for all steps at
// once, one large GEMM, on the float kernel gemm.h chose for this process:
// - the small-matrix kernel (on AVX-512 CPUs, where torch has it): each thread takes a range
//   of rows and walks W^T in panels of kPanel columns, running every row block of its range
//   against one panel while the panel sits in its L2. Where the BLAS behind at::linear takes a
//   narrower vector path than the CPU has (MKL on AMD: AVX2 on an AVX-512 CPU) this is faster:
//   (4096, 256) x (256, 1024) on a 2-core Zen 4 took 10.5-11.0 ms against 12.9-13.3 ms.
// - the panel kernel of panel_gemm.h (on AVX2 CPUs, where brgemm ran at half MKL's speed).
// - BLAS: at::linear, as for every other dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../ops.h"
#include "gemm.h"
#include "tensor_args.h"
#include "vectorized.h"

namespace rnnkern {
namespace {

constexpr int64_t kRowsPerBlock = 64;
constexpr int64_t kPanel = 128;  // columns of W^T per panel: K x 128 floats, 128 KiB at K = 256

// tile (rows, cols), rows ld apart, += bias (cols,) on every row
RNNKERN_VECTORIZED void add_bias(float* __restrict tile, int64_t rows, int64_t cols, int64_t ld,
                                 const float* __restrict bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict row = tile + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] += bias[j];
  }
}

// out (m, n) = a (m, k) @ W^T + bias (or null): W^T in 128-column panels for the small-matrix
// kernel, the bias added while a tile is in cache.
void project_small_matrix(const at::Tensor& a, const at::Tensor& weight, const float* bias, float* out_data) {
  const int64_t m = a.size(0), k = a.size(1), n = weight.size(0);
  const at::Tensor b = weight.t().contiguous();  // (K, N)
  const float *a_data = a.data_ptr<float>(), *b_data = b.data_ptr<float>();
  at::parallel_for(0, m, kRowsPerBlock, [&](int64_t r0, int64_t r1) {
    for (int64_t p = 0; p < n; p += kPanel) {
      const int64_t cols = std::min(kPanel, n - p);
      for (int64_t r = r0; r < r1; r += kRowsPerBlock) {
        const int64_t rows = std::min(kRowsPerBlock, r1 - r);
        float* tile = out_data + r * n + p;
        cpu::gemm(rows, cols, k, a_data + r * k, k, b_data + p, n, tile, n);
        if (bias) add_bias(tile, rows, cols, n, bias + p);
      }
    }
  });
}

// The same on the AVX2 panel kernel: each block of rows runs against every 16-column panel,
// whose tiles start from the bias.
void project_panels(const at::Tensor& a, const at::Tensor& weight, const float* bias, float* out_data) {
  const int64_t m = a.size(0), k = a.size(1), n = weight.size(0);
  const at::Tensor panels = cpu::pack_panels(weight.t());
  const float *a_data = a.data_ptr<float>(), *panel_data = panels.data_ptr<float>();
  at::parallel_for(0, m, kRowsPerBlock, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += kRowsPerBlock) {
      const int64_t rows = std::min(kRowsPerBlock, r1 - r);
      float* block = out_data + r * n;
      cpu::panel_gemm(rows, n, k, a_data + r * k, k, panel_data, block, n, bias);
    }
  });
}

}  // namespace

at::Tensor input_projection_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "input_projection: x (..., K) and weight (N, K) must agree in K, got ", x.sizes(), " and ",
              weight.sizes());
  if (bias.has_value()) cpu::check_shape("input_projection", "bias", *bias, {weight.size(0)});
  const bool all_float = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                         (!bias.has_value() || bias->scalar_type() == at::kFloat);
  const cpu::FloatGemm kernel = all_float ? cpu::float_gemm() : cpu::FloatGemm::kBlas;
  if (kernel == cpu::FloatGemm::kBlas) return at::linear(x, weight, bias);

  const int64_t k = weight.size(1), n = weight.size(0);
  const at::Tensor a = x.reshape({-1, k}).contiguous();  // (M, K)
  const at::Tensor bias_values = cpu::contiguous_or_undefined(bias);
  const float* bias_data = cpu::data_or_null<float>(bias_values);
  at::Tensor out = at::empty({a.size(0), n}, a.options());
  if (kernel == cpu::FloatGemm::kPanels) {
    project_panels(a, weight, bias_data, out.data_ptr<float>());
  } else {
    project_small_matrix(a, weight, bias_data, out.data_ptr<float>());
  }
  return out.view(cpu::with_last_dim(x, n));
}

}  // namespace rnnkern
