// project_rows (gemv.h): dot products, four weight rows at a time (four independent sums hide
// the FMA latency), each block of rows used for every batch row while it sits in L1.
#include "gemv.h"

#include "vectorized.h"

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

}  // namespace

void project_rows(const float* w, int64_t k, int64_t row0, int64_t n, const float* bias, const float* v,
                  int64_t ldv, int64_t batch, float* out, int64_t ldo) {
  project_rows_impl(w, k, row0, n, bias, v, ldv, batch, out, ldo);
}

void project_rows(const double* w, int64_t k, int64_t row0, int64_t n, const double* bias, const double* v,
                  int64_t ldv, int64_t batch, double* out, int64_t ldo) {
  project_rows_impl(w, k, row0, n, bias, v, ldv, batch, out, ldo);
}

}  // namespace rnnkern::cpu
