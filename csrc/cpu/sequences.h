// How the sequence kernels address time: per-sequence step order (lengths, reverse) and rows
// of (B, T, D) tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>

namespace rnnkern::cpu {

// Sequence b runs lengths[b] steps; its step s is at time s, or lengths[b] - 1 - s in
// reverse. At steps past its end (s >= lengths[b]) it sits at time s: the kernels fill that
// padding slot of the outputs with zeros and leave the state alone.
struct Schedule {
  const int64_t* lengths;  // (B,), or null when every sequence runs all `steps`
  int64_t steps;
  bool reverse;

  // lengths: undefined, or as returned by checked_lengths (tensor_args.h)
  static Schedule of(const at::Tensor& lengths, int64_t steps, bool reverse) {
    return {lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr, steps, reverse};
  }
  int64_t length(int64_t b) const { return lengths ? lengths[b] : steps; }
  bool active(int64_t b, int64_t s) const { return s < length(b); }
  int64_t time(int64_t b, int64_t s) const { return reverse && active(b, s) ? length(b) - 1 - s : s; }
  // time of the step before s, for 0 < s < length(b)
  int64_t previous_time(int64_t b, int64_t s) const { return time(b, s) + (reverse ? 1 : -1); }
};

// A (B, T, D) tensor whose last stride is 1.
template <typename T>
struct Rows {
  T* data;
  int64_t stride_batch;
  int64_t stride_time;

  static Rows of(const at::Tensor& x) {
    return {x.data_ptr<std::remove_const_t<T>>(), x.stride(0), x.stride(1)};
  }
  T* at(int64_t b, int64_t t) const { return data + b * stride_batch + t * stride_time; }
};

}  // namespace rnnkern::cpu
