// The float transpose of transpose.h: whole 8 x 8 blocks through AVX shuffles (8 loads, 24
// shuffles, 8 stores), the edges element by element.
#include "transpose.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RNNKERN_AVX_TRANSPOSE 1
#endif

namespace rnnkern::cpu {
namespace {

void transpose_elements(const float* src, int64_t ld_src, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                        float* dst, int64_t ld_dst) {
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

#ifdef RNNKERN_AVX_TRANSPOSE

bool avx2_supported() {
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
}

__attribute__((target("avx2"))) void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {  // t: pairs of rows interleaved
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // r: columns of four rows, within each 128-bit half
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {  // the halves of rows 0-3 and 4-7 joined
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

#endif

}  // namespace

void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  int64_t whole_rows = 0, whole_cols = 0;
#ifdef RNNKERN_AVX_TRANSPOSE
  if (avx2_supported()) {
    whole_rows = rows / 8 * 8;
    whole_cols = cols / 8 * 8;
    for (int64_t r = 0; r < whole_rows; r += 8) {
      for (int64_t c = 0; c < whole_cols; c += 8) {
        transpose_block(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
      }
    }
  }
#endif
  transpose_elements(src, ld_src, 0, whole_rows, whole_cols, cols, dst, ld_dst);
  transpose_elements(src, ld_src, whole_rows, rows, 0, cols, dst, ld_dst);
}

}  // namespace rnnkern::cpu
