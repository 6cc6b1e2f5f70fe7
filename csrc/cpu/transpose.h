// Matrix transposes for the kernels' tiles: dst (cols, rows) = src (rows, cols)^T, row-major with
// leading dimensions. Float runs 8 x 8 blocks in AVX registers where the CPU has AVX2 (a scalar
// transpose of the SSD scan's 64 x 64 tiles took a quarter of its backward on a 2-core Xeon).
#pragma once

#include <cstdint>

namespace rnnkern::cpu {

void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst);

inline void transpose(const double* src, int64_t ld_src, int64_t rows, int64_t cols, double* dst, int64_t ld_dst) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

}  // namespace rnnkern::cpu
