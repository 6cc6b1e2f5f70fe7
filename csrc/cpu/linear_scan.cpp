// CPU kernels of the linear recurrence h_t = a_t * h_{t-1} + b_t.
//
// Work splits into (sequence, channel block) tasks run by at::parallel_for; each task walks
// its sequence in time order and keeps the block's state in a small fp32 (fp64 for double)
// array, so the inner loop over channels is contiguous and vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../ops.h"
#include "sequences.h"
#include "tensor_args.h"

namespace rnnkern {
namespace {

// Channels per task: wide blocks keep more cache lines in flight per time step (each step
// of a (B, T, D) tensor is a new row, often a new page, so hardware prefetch helps little);
// narrower blocks when there would otherwise be too few tasks for the threads.
constexpr int64_t kMinChannelBlock = 64;
constexpr int64_t kMaxChannelBlock = 512;

// Where each sequence lives: rows [begin, begin + length) of batch entry `batch`.
struct Sequences {
  int64_t count;
  int64_t dense_length;        // T, when not packed
  const int64_t* cu_seqlens;   // (count + 1,) offsets into the packed time axis, or null

  int64_t batch(int64_t n) const { return cu_seqlens ? 0 : n; }
  int64_t begin(int64_t n) const { return cu_seqlens ? cu_seqlens[n] : 0; }
  int64_t length(int64_t n) const { return cu_seqlens ? cu_seqlens[n + 1] - cu_seqlens[n] : dense_length; }
};

using cpu::Rows;

// Time index of the s-th step taken: steps run forward, or backward when `reverse`.
inline int64_t time_of_step(int64_t s, int64_t length, bool reverse) {
  return reverse ? length - 1 - s : s;
}

Sequences sequences_of(const at::Tensor& a, const at::Tensor& cu_seqlens_long) {
  if (cu_seqlens_long.defined()) {
    return {cu_seqlens_long.numel() - 1, 0, cu_seqlens_long.data_ptr<int64_t>()};
  }
  return {a.size(0), a.size(1), nullptr};
}

// The (N, D) states travel in the state dtype; the Python layer converts them, but a direct
// torch.ops call must not read the wrong memory.
void check_state(const char* name, const std::optional<at::Tensor>& state, const at::Tensor& a,
                 int64_t num_sequences) {
  if (!state.has_value()) return;
  TORCH_CHECK(state->scalar_type() == at::toOpMathType(a.scalar_type()) && state->is_contiguous(), name,
              " must be a contiguous ", at::toOpMathType(a.scalar_type()), " tensor");
  TORCH_CHECK(state->dim() == 2 && state->size(0) == num_sequences && state->size(1) == a.size(2), name,
              " must have shape (", num_sequences, ", ", a.size(2), ")");
}

at::Tensor long_offsets(const std::optional<at::Tensor>& cu_seqlens) {
  return cu_seqlens.has_value() ? cu_seqlens->to(at::kLong).contiguous() : at::Tensor();
}

int64_t channel_block(int64_t num_sequences, int64_t dim) {
  const int64_t min_tasks = 4 * at::get_num_threads();
  int64_t block = kMaxChannelBlock;
  while (block > kMinChannelBlock && num_sequences * ((dim + block - 1) / block) < min_tasks) block /= 2;
  return block;
}

// Runs fn(sequence, first_channel, block_width) over every (sequence, channel block) task.
template <typename Fn>
void for_each_block(int64_t num_sequences, int64_t dim, const Fn& fn) {
  const int64_t block = channel_block(num_sequences, dim);
  const int64_t blocks = (dim + block - 1) / block;
  at::parallel_for(0, num_sequences * blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t d0 = (task % blocks) * block;
      fn(task / blocks, d0, std::min(block, dim - d0));
    }
  });
}

template <typename scalar_t, typename acc_t>
void scan_forward(Rows<const scalar_t> a, Rows<const scalar_t> b, Rows<scalar_t> h,
                  const acc_t* initial_state, acc_t* final_state, const Sequences& seqs,
                  int64_t dim, bool reverse) {
  for_each_block(seqs.count, dim, [&](int64_t n, int64_t d0, int64_t width) {
    acc_t state[kMaxChannelBlock];
    for (int64_t j = 0; j < width; ++j) {
      state[j] = initial_state ? initial_state[n * dim + d0 + j] : acc_t(0);
    }
    const int64_t batch = seqs.batch(n), begin = seqs.begin(n), length = seqs.length(n);
    for (int64_t s = 0; s < length; ++s) {
      const int64_t t = begin + time_of_step(s, length, reverse);
      const scalar_t* a_t = a.at(batch, t) + d0;
      const scalar_t* b_t = b.at(batch, t) + d0;
      scalar_t* h_t = h.at(batch, t) + d0;
      for (int64_t j = 0; j < width; ++j) {
        state[j] = static_cast<acc_t>(a_t[j]) * state[j] + static_cast<acc_t>(b_t[j]);
        h_t[j] = static_cast<scalar_t>(state[j]);
      }
    }
    std::copy(state, state + width, final_state + n * dim + d0);
  });
}

// Walks each sequence against the direction of the forward pass, carrying g = dL/dh_t:
//   g_t = grad_h_t + a_{t+1} g_{t+1},  db_t = g_t,  da_t = g_t h_{t-1},  dh_init = a_first g_first
// ("t+1"/"t-1" meaning the next/previous step of the forward pass).
template <typename scalar_t, typename acc_t>
void scan_backward(Rows<const scalar_t> a, Rows<const scalar_t> h, Rows<const scalar_t> grad_h,
                   Rows<scalar_t> grad_a, Rows<scalar_t> grad_b, const acc_t* initial_state,
                   const acc_t* grad_final, acc_t* grad_initial, const Sequences& seqs,
                   int64_t dim, bool reverse) {
  for_each_block(seqs.count, dim, [&](int64_t n, int64_t d0, int64_t width) {
    acc_t g[kMaxChannelBlock];
    acc_t h_init[kMaxChannelBlock];
    for (int64_t j = 0; j < width; ++j) {
      g[j] = grad_final ? grad_final[n * dim + d0 + j] : acc_t(0);
      h_init[j] = initial_state ? initial_state[n * dim + d0 + j] : acc_t(0);
    }
    const int64_t batch = seqs.batch(n), begin = seqs.begin(n), length = seqs.length(n);
    auto step = [&](int64_t s, const auto* h_prev) {
      const int64_t t = begin + time_of_step(s, length, reverse);
      const scalar_t* a_t = a.at(batch, t) + d0;
      const scalar_t* dh_t = grad_h.at(batch, t) + d0;
      scalar_t* da_t = grad_a.at(batch, t) + d0;
      scalar_t* db_t = grad_b.at(batch, t) + d0;
      for (int64_t j = 0; j < width; ++j) {
        g[j] += static_cast<acc_t>(dh_t[j]);
        db_t[j] = static_cast<scalar_t>(g[j]);
        da_t[j] = static_cast<scalar_t>(g[j] * static_cast<acc_t>(h_prev[j]));
        g[j] *= static_cast<acc_t>(a_t[j]);
      }
    };
    for (int64_t s = length - 1; s > 0; --s) {
      step(s, h.at(batch, begin + time_of_step(s - 1, length, reverse)) + d0);
    }
    if (length > 0) step(0, h_init);
    std::copy(g, g + width, grad_initial + n * dim + d0);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_scan_fwd_cpu(
    const at::Tensor& a_in, const at::Tensor& b_in, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, bool reverse) {
  TORCH_CHECK(a_in.dim() == 3 && a_in.sizes() == b_in.sizes(), "linear_scan_fwd: a, b must be (B, T, D)");
  const at::Tensor a = cpu::unit_last_stride(a_in), b = cpu::unit_last_stride(b_in);
  const at::Tensor offsets = long_offsets(cu_seqlens);
  const Sequences seqs = sequences_of(a, offsets);
  check_state("initial_state", initial_state, a, seqs.count);
  const int64_t dim = a.size(2);
  const auto acc_dtype = at::toOpMathType(a.scalar_type());
  at::Tensor h = at::empty(a.sizes(), a.options());
  at::Tensor final_state = at::empty({seqs.count, dim}, a.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "linear_scan_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* h0 = initial_state.has_value() ? initial_state->data_ptr<acc_t>() : nullptr;
    scan_forward<scalar_t, acc_t>(Rows<const scalar_t>::of(a), Rows<const scalar_t>::of(b),
                                  Rows<scalar_t>::of(h), h0, final_state.data_ptr<acc_t>(), seqs,
                                  dim, reverse);
  });
  return {h, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_bwd_cpu(
    const at::Tensor& a_in, const at::Tensor& h_in, const std::optional<at::Tensor>& initial_state,
    const at::Tensor& grad_h_in, const std::optional<at::Tensor>& grad_final,
    const std::optional<at::Tensor>& cu_seqlens, bool reverse) {
  const at::Tensor a = cpu::unit_last_stride(a_in), h = cpu::unit_last_stride(h_in);
  const at::Tensor grad_h = cpu::unit_last_stride(grad_h_in);
  const at::Tensor offsets = long_offsets(cu_seqlens);
  const Sequences seqs = sequences_of(a, offsets);
  check_state("initial_state", initial_state, a, seqs.count);
  TORCH_CHECK(h.sizes() == a.sizes() && grad_h.sizes() == a.sizes(), "linear_scan_bwd: a, h, grad_h must match");
  const int64_t dim = a.size(2);
  const auto acc_dtype = at::toOpMathType(a.scalar_type());
  at::Tensor grad_a = at::empty(a.sizes(), a.options());
  at::Tensor grad_b = at::empty(a.sizes(), a.options());
  at::Tensor grad_initial = at::empty({seqs.count, dim}, a.options().dtype(acc_dtype));
  const std::optional<at::Tensor> grad_final_c =
      grad_final.has_value() ? std::optional<at::Tensor>(grad_final->to(acc_dtype).contiguous()) : std::nullopt;
  check_state("grad_final", grad_final_c, a, seqs.count);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "linear_scan_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* h0 = initial_state.has_value() ? initial_state->data_ptr<acc_t>() : nullptr;
    const acc_t* dfinal = grad_final_c.has_value() ? grad_final_c->data_ptr<acc_t>() : nullptr;
    scan_backward<scalar_t, acc_t>(Rows<const scalar_t>::of(a), Rows<const scalar_t>::of(h),
                                   Rows<const scalar_t>::of(grad_h), Rows<scalar_t>::of(grad_a),
                                   Rows<scalar_t>::of(grad_b), h0, dfinal,
                                   grad_initial.data_ptr<acc_t>(), seqs, dim, reverse);
  });
  return {grad_a, grad_b, grad_initial};
}

}  // namespace rnnkern
