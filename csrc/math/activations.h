// Activation functions of the kernels, with no torch types, for CPU loops and (through
// RNNKERN_HOST_DEVICE) CUDA kernels alike.
//
// The float versions are branch-free, so `#pragma omp simd` loops over them vectorise; they
// stay within 2.5 ulp of the exact value, like ATen's own. The double versions are the C
// library's. Everything is forced inline: GCC otherwise leaves exp_clamped as a call (it is
// called five times per LSTM unit), and a loop with a call in it stays scalar.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RNNKERN_HOST_DEVICE __host__ __device__
#define RNNKERN_FORCE_INLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define RNNKERN_HOST_DEVICE
#define RNNKERN_FORCE_INLINE inline __attribute__((always_inline))
#else
#define RNNKERN_HOST_DEVICE
#define RNNKERN_FORCE_INLINE inline
#endif

namespace rnnkern::math {

// The bits of `from` as a To of the same size (compilers turn the copy into a register move).
template <typename To, typename From>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// cond ? a : b as a bit blend: under the default -ftrapping-math the compiler keeps a ?:
// between floating-point values as a branch, and the loop around it scalar.
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE float select(bool cond, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return bit_cast<float>((bit_cast<uint32_t>(a) & mask) | (bit_cast<uint32_t>(b) & ~mask));
}
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE double select(bool cond, double a, double b) {
  const uint64_t mask = uint64_t{0} - static_cast<uint64_t>(cond);
  return bit_cast<double>((bit_cast<uint64_t>(a) & mask) | (bit_cast<uint64_t>(b) & ~mask));
}

// e^x for float x clamped to [-87, 88], where e^x is a normal float; the clamp saturates
// sigmoid and tanh correctly, and NaN goes through.
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE float exp_clamped(float x) {
  constexpr float kLog2e = 1.44269504f;
  constexpr float kLn2High = 0.693359375f;  // ln 2 = kLn2High + kLn2Low; n * kLn2High is exact
  constexpr float kLn2Low = -2.12194440e-4f;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: v + kShifter holds round(v) in its low bits
  x = select(x < -87.0f, -87.0f, select(x > 88.0f, 88.0f, x));
  const float shifted = x * kLog2e + kShifter;
  const float n = shifted - kShifter;  // round(x / ln 2)
  const float r = (x - n * kLn2High) - n * kLn2Low;  // |r| <= ln(2) / 2
  // Taylor series of e^r to r^7: truncation error below 1e-8 relative.
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n: the biased exponent n + 127 moved into place (unsigned, so NaN's bits are harmless)
  const uint32_t biased = bit_cast<uint32_t>(shifted) - bit_cast<uint32_t>(kShifter) + 127u;
  return p * bit_cast<float>(biased << 23);
}

// e^x: exp_clamped for float (its clamp changes nothing the kernels' decay factors and
// sigmoids can show), the C library's for double.
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE float exp(float x) { return exp_clamped(x); }
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE double exp(double x) { return std::exp(x); }

RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// tanh: an odd Taylor polynomial (to x^17) near 0, (1 - e^{-2|x|}) / (1 + e^{-2|x|}) elsewhere;
// 0.625 is where both stay below 2 ulp.
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE float tanh(float x) {
  const float x2 = x * x;
  float p = static_cast<float>(6404582.0 / 10854718875.0);
  p = p * x2 - static_cast<float>(929569.0 / 638512875.0);
  p = p * x2 + static_cast<float>(21844.0 / 6081075.0);
  p = p * x2 - static_cast<float>(1382.0 / 155925.0);
  p = p * x2 + static_cast<float>(62.0 / 2835.0);
  p = p * x2 - static_cast<float>(17.0 / 315.0);
  p = p * x2 + static_cast<float>(2.0 / 15.0);
  p = p * x2 - static_cast<float>(1.0 / 3.0);
  const float near_zero = x + x * x2 * p;
  const float e = exp_clamped(-2.0f * std::fabs(x));
  const float far = std::copysign((1.0f - e) / (1.0f + e), x);
  return select(std::fabs(x) < 0.625f, near_zero, far);
}
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE double tanh(double x) { return std::tanh(x); }

// silu(x) = x sigmoid(x)
template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T silu(T x) {
  return x * sigmoid(x);
}

// softplus(x) = log(1 + e^x), and x itself above this threshold, as in
// torch.nn.functional.softplus (and mamba_ssm).
constexpr double kSoftplusThreshold = 20.0;

template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T softplus(T x) {
  return x > T(kSoftplusThreshold) ? x : std::log1p(std::exp(x));
}

// log(1 + t) for float t in [0, 1], branch-free: u = 1 + t rounded, reduced to m in
// [sqrt(1/2), sqrt(2)) with log m = 2 atanh((m - 1) / (m + 1)) as an odd series (to s^11,
// |s| <= 0.172), then scaled by t / (u - 1) (exact: u - 1 is), which undoes the rounding of
// 1 + t for small t.
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE float log1p_unit(float t) {
  constexpr float kSqrt2 = 1.41421356f, kLn2 = 0.693147181f;
  const float u = 1.0f + t;
  const bool halve = u > kSqrt2;
  const float m = select(halve, 0.5f * u, u);
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float p = 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  const float log_u = 2.0f * s * p + select(halve, kLn2, 0.0f);
  const float rounded = u - 1.0f;
  return select(rounded == 0.0f, t, log_u * (t / select(rounded == 0.0f, 1.0f, rounded)));
}

// softplus for float as max(x, 0) + log1p(e^{-|x|}), branch-free, for `#pragma omp simd`
// loops over many values (a scalar call is faster through the C library: softplus above).
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE float softplus_branchless(float x) {
  const float smooth = select(x > 0.0f, x, 0.0f) + log1p_unit(exp_clamped(-std::fabs(x)));
  return select(x > static_cast<float>(kSoftplusThreshold), x, smooth);
}
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE double softplus_branchless(double x) { return softplus(x); }

// d softplus(x) / dx: sigmoid(x) (the C library's exp), 1 above the threshold (and for NaN).
template <typename T>
RNNKERN_HOST_DEVICE RNNKERN_FORCE_INLINE T softplus_slope(T x) {
  return x <= T(kSoftplusThreshold) ? T(1) / (T(1) + std::exp(-x)) : T(1);
}

}  // namespace rnnkern::math
