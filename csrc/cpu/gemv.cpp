// project_rows (gemv.h): dot products, four weight rows at a time (four independent sums hide
// the FMA latency), each block of rows used for every batch row while it sits in L1. Float on
// a CPU with AVX2 and FMA takes an intrinsics version that also prefetches the next block of
// rows: with the weights in L3 or memory (a stack of layers decoding one token), the portable
// loop ran at a quarter of the speed a plain read of the same bytes reaches on a Zen 3.
#include "gemv.h"

#include "cpu_features.h"
#include "vectorized.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RNNKERN_AVX2_GEMV 1
#endif

namespace rnnkern::cpu {
namespace {

template <typename T>
RNNKERN_VECTORIZED void project_rows_impl(const T* __restrict w, int64_t k, int64_t row0, int64_t n,
                                          const T* __restrict bias, const T* __restrict v, int64_t ldv,
                                          int64_t batch, T* __restrict out, int64_t ldo) {
  constexpr int64_t kRows = 4;
  int64_t i = 0;
  for (; i + kRows <= n; i += kRows) {
    const T* __restrict w0 = w + (row0 + i) * k;
    const T *__restrict w1 = w0 + k, *__restrict w2 = w1 + k, *__restrict w3 = w2 + k;
    int64_t b = 0;
    for (; b + 2 <= batch; b += 2) {  // two batch rows per pass: 6 loads per 8 FMAs
      const T *__restrict v0 = v + b * ldv, *__restrict v1 = v0 + ldv;
      T s00 = 0, s01 = 0, s10 = 0, s11 = 0, s20 = 0, s21 = 0, s30 = 0, s31 = 0;
#pragma omp simd reduction(+ : s00, s01, s10, s11, s20, s21, s30, s31)
      for (int64_t kk = 0; kk < k; ++kk) {
        s00 += w0[kk] * v0[kk];
        s01 += w0[kk] * v1[kk];
        s10 += w1[kk] * v0[kk];
        s11 += w1[kk] * v1[kk];
        s20 += w2[kk] * v0[kk];
        s21 += w2[kk] * v1[kk];
        s30 += w3[kk] * v0[kk];
        s31 += w3[kk] * v1[kk];
      }
      T* __restrict o0 = out + b * ldo + i;
      T* __restrict o1 = o0 + ldo;
      o0[0] = s00, o0[1] = s10, o0[2] = s20, o0[3] = s30;
      o1[0] = s01, o1[1] = s11, o1[2] = s21, o1[3] = s31;
    }
    for (; b < batch; ++b) {
      const T* __restrict v_row = v + b * ldv;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t kk = 0; kk < k; ++kk) {
        s0 += w0[kk] * v_row[kk];
        s1 += w1[kk] * v_row[kk];
        s2 += w2[kk] * v_row[kk];
        s3 += w3[kk] * v_row[kk];
      }
      T* __restrict o = out + b * ldo + i;
      o[0] = s0, o[1] = s1, o[2] = s2, o[3] = s3;
    }
  }
  for (; i < n; ++i) {
    const T* __restrict w_row = w + (row0 + i) * k;
    for (int64_t b = 0; b < batch; ++b) {
      const T* __restrict v_row = v + b * ldv;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t kk = 0; kk < k; ++kk) sum += w_row[kk] * v_row[kk];
      out[b * ldo + i] = sum;
    }
  }
  if (bias) {
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < n; ++j) out[b * ldo + j] += bias[row0 + j];
    }
  }
}

#ifdef RNNKERN_AVX2_GEMV

// The four sums of a0..a3 (8 lanes each), in order.
__attribute__((target("avx2,fma"))) __m128 sum_lanes(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// Four rows w0 (and w0 + k, ...) dotted with v: the k % 8 tail element by element.
__attribute__((target("avx2,fma"))) __m128 dot_four_rows(const float* w0, int64_t k, const float* v,
                                                          bool prefetch_next) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  const float *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    if (prefetch_next && kk % 16 == 0) {  // the next four rows, a cache line each per row
      for (int r = 4; r < 8; ++r) __builtin_prefetch(w0 + r * k + kk);
    }
    const __m256 x = _mm256_loadu_ps(v + kk);
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + kk), x, s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + kk), x, s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + kk), x, s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + kk), x, s3);
  }
  __m128 sums = sum_lanes(s0, s1, s2, s3);
  if (kk < k) {
    float tail[4] = {0, 0, 0, 0};
    for (; kk < k; ++kk) {
      tail[0] += w0[kk] * v[kk], tail[1] += w1[kk] * v[kk], tail[2] += w2[kk] * v[kk], tail[3] += w3[kk] * v[kk];
    }
    sums = _mm_add_ps(sums, _mm_loadu_ps(tail));
  }
  return sums;
}

__attribute__((target("avx2,fma"))) void project_rows_avx2(const float* w, int64_t k, int64_t row0, int64_t n,
                                                            const float* bias, const float* v, int64_t ldv,
                                                            int64_t batch, float* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* w0 = w + (row0 + i) * k;
    const bool more = i + 8 <= n;
    for (int64_t b = 0; b < batch; ++b) {
      __m128 sums = dot_four_rows(w0, k, v + b * ldv, more && b == 0);
      if (bias) sums = _mm_add_ps(sums, _mm_loadu_ps(bias + row0 + i));
      _mm_storeu_ps(out + b * ldo + i, sums);
    }
  }
  if (i < n) project_rows_impl(w, k, row0 + i, n - i, bias, v, ldv, batch, out + i, ldo);
}

#endif

}  // namespace

void project_rows(const float* w, int64_t k, int64_t row0, int64_t n, const float* bias, const float* v,
                  int64_t ldv, int64_t batch, float* out, int64_t ldo) {
#ifdef RNNKERN_AVX2_GEMV
  if (has_avx2_fma()) return project_rows_avx2(w, k, row0, n, bias, v, ldv, batch, out, ldo);
#endif
  project_rows_impl(w, k, row0, n, bias, v, ldv, batch, out, ldo);
}

void project_rows(const double* w, int64_t k, int64_t row0, int64_t n, const double* bias, const double* v,
                  int64_t ldv, int64_t batch, double* out, int64_t ldo) {
  project_rows_impl(w, k, row0, n, bias, v, ldv, batch, out, ldo);
}

}  // namespace rnnkern::cpu
