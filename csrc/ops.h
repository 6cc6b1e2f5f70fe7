// Host entry points of every compiled kernel, registered as torch ops in bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace rnnkern {

// Linear recurrence h_t = a_t * h_{t-1} + b_t over (B, T, D) tensors (see
// rnnkern/ops/linear_scan/reference.py for the exact contract).
std::tuple<at::Tensor, at::Tensor> linear_scan_fwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, bool reverse);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_bwd_cpu(
    const at::Tensor& a, const at::Tensor& h, const std::optional<at::Tensor>& initial_state,
    const at::Tensor& grad_h, const std::optional<at::Tensor>& grad_final,
    const std::optional<at::Tensor>& cu_seqlens, bool reverse);

}  // namespace rnnkern
