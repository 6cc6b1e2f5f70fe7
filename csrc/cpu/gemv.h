// Matrix-vector products for the one-token kernels: a few rows of activations times the
// rows of a weight as torch.nn stores it, (out_features, in_features) row-major, read in
// place. At one token the weight is read once per call and every multiply-add waits on its
// load, so the product runs at the speed the weight streams from cache or memory; BLAS is not
// reachable from an extension without a tensor per call, which costs more than the product
// at these sizes.
#pragma once

#include <cstdint>

namespace rnnkern::cpu {

// out (B, n) with row stride ldo = bias[row0 + j] + v (B, k; row stride ldv) @ W[row0 + j]^T
// for the rows [row0, row0 + n) of a weight W (., k), or without the bias when it is null.
void project_rows(const float* w, int64_t k, int64_t row0, int64_t n, const float* bias, const float* v,
                  int64_t ldv, int64_t batch, float* out, int64_t ldo);
void project_rows(const double* w, int64_t k, int64_t row0, int64_t n, const double* bias, const double* v,
                  int64_t ldv, int64_t batch, double* out, int64_t ldo);

}  // namespace rnnkern::cpu
