// Rows of 16-bit floats to and from fp32, vectorised: the memory-bound kernels convert a row
// of half or bfloat16 values into an fp32 scratch row, compute, and convert the result back.
// c10::Half and c10::BFloat16 convert one value at a time through scalar code (half without
// F16C, bfloat16 with a NaN branch), which left a linear scan over bfloat16 at a fifth of its
// fp32 speed per byte and over half at a twelfth.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace rnnkern::cpu {

template <typename T>
constexpr bool is_16_bit_float = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// dst[i] = float(src[i]) for i < n
void to_float(const c10::Half* src, float* dst, int64_t n);
void to_float(const c10::BFloat16* src, float* dst, int64_t n);

// dst[i] = src[i] rounded to nearest even (NaN stays NaN), as c10's conversions round
void from_float(const float* src, c10::Half* dst, int64_t n);
void from_float(const float* src, c10::BFloat16* dst, int64_t n);

}  // namespace rnnkern::cpu
