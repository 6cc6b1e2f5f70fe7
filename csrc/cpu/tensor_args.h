// The host entry points' handling of their tensor arguments: checks (the Python layer
// validates its inputs, but a direct torch.ops call must not make a kernel read the wrong
// memory) and the small conversions every kernel makes before it takes raw pointers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace rnnkern::cpu {

// ---------------------------------------------------------------------------------------
// Checks; each error names the op and the argument.

inline void check_shape(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(x.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", x.sizes());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", x.scalar_type());
}

inline void check_tensor(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef shape,
                         at::ScalarType dtype) {
  check_shape(op, name, x, shape);
  check_dtype(op, name, x, dtype);
}

// check_tensor where the argument is given.
inline void check_optional(const char* op, const char* name, const std::optional<at::Tensor>& x,
                           at::IntArrayRef shape, at::ScalarType dtype) {
  if (x.has_value()) check_tensor(op, name, *x, shape, dtype);
}

// The dtypes of the kernels without a half-precision path.
inline void check_float_or_double(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
}

// A (batch,) int32/int64 tensor as contiguous int64 with every value in [low, high], or undefined.
inline at::Tensor checked_int64(const char* op, const char* name, const std::optional<at::Tensor>& x, int64_t batch,
                                int64_t low, int64_t high) {
  if (!x.has_value()) return at::Tensor();
  TORCH_CHECK(x->dim() == 1 && x->size(0) == batch, op, ": ", name, " must have shape (", batch, ",), got ",
              x->sizes());
  TORCH_CHECK(x->scalar_type() == at::kInt || x->scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", x->scalar_type());
  at::Tensor values = x->to(at::kLong).contiguous();
  if (batch > 0) {
    TORCH_CHECK(values.min().item<int64_t>() >= low && values.max().item<int64_t>() <= high, op, ": ", name,
                " must lie in [", low, ", ", high, "]");
  }
  return values;
}

// lengths as a contiguous int64 tensor with every value in [0, steps], or undefined.
inline at::Tensor checked_lengths(const char* op, const std::optional<at::Tensor>& lengths, int64_t batch,
                                  int64_t steps) {
  return checked_int64(op, "lengths", lengths, batch, 0, steps);
}

// ---------------------------------------------------------------------------------------
// Layout conversions.

inline at::Tensor unit_last_stride(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

// An optional argument made contiguous, or undefined when absent.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->contiguous() : at::Tensor();
}

// The data of a tensor that may be undefined: null for an absent argument.
template <typename T>
T* data_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

// x's shape with its last dimension replaced by `last`: an output (..., N) for an input (..., K).
inline std::vector<int64_t> with_last_dim(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = last;
  return shape;
}

}  // namespace rnnkern::cpu
