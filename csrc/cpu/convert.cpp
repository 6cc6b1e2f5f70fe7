// to_float / from_float (convert.h). Half: the F16C conversions, 8 values an instruction, on a
// CPU that has them; bfloat16: the top half of an fp32's bits, with the rounding and NaN case
// as selects so that the loops vectorise.
#include "convert.h"

#include <cstring>

#include "cpu_features.h"
#include "vectorized.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RNNKERN_F16C 1
#endif

namespace rnnkern::cpu {
namespace {

inline uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

RNNKERN_VECTORIZED void bfloat16_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = float_of(static_cast<uint32_t>(src[i]) << 16);
}

RNNKERN_VECTORIZED void float_to_bfloat16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = bits_of(src[i]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // to nearest, ties to even
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  }
}

#ifdef RNNKERN_F16C

__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

#endif

}  // namespace

void to_float(const c10::Half* src, float* dst, int64_t n) {
#ifdef RNNKERN_F16C
  if (has_avx2_f16c()) return half_to_float_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  bfloat16_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
}

void from_float(const float* src, c10::Half* dst, int64_t n) {
#ifdef RNNKERN_F16C
  if (has_avx2_f16c()) return float_to_half_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  float_to_bfloat16(src, reinterpret_cast<uint16_t*>(dst), n);
}

}  // namespace rnnkern::cpu
