// CPU kernels of the linear recurrence h_t = a_t * h_{t-1} + b_t.
//
// The recurrence is memory-bound: a step reads a_t and b_t and writes h_t, a few FLOPs per
// element, so the kernels are built around the traffic. Work splits into (sequence, channel
// block) tasks run by at::parallel_for; each task walks its sequence in time order with the
// block's state in an fp32 (fp64 for double) array. Whole rows are the default block: row t of
// a (B, T, D) tensor is followed in memory by row t + 1, so a task reads each tensor as one
// sequential stream (the hardware prefetchers keep up; software prefetches a few rows ahead
// only slowed both passes on a Zen 3). The forward writes an h too large to stay in cache with
// streaming (non-temporal) stores, which skip reading the lines they overwrite: 10% faster
// there. The backward does not: with its two outputs streamed it ran 3x slower. Half and
// bfloat16 convert in registers (F16C; bfloat16 by bit shifts), or, on a CPU without F16C,
// through fp32 rows (convert.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops.h"
#include "convert.h"
#include "cpu_features.h"
#include "sequences.h"
#include "tensor_args.h"
#include "vectorized.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RNNKERN_STREAMING_STORES 1
#endif

namespace rnnkern {
namespace {

// Channel blocks: whole rows unless the sequences are too few to share among the threads
// evenly, then halves, quarters, ... down to kMinChannelBlock channels.
constexpr int64_t kMinChannelBlock = 64;
// Outputs of at least this many bytes are written with streaming stores: larger than a core's
// share of a last-level cache, they would leave it before anything read them.
constexpr int64_t kStreamingBytes = int64_t{16} << 20;

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

// Channels per task: all D while the (sequence, block) tasks share evenly among the threads or
// are many, else the widest power-of-two split of D that makes them so.
int64_t channel_block(int64_t num_sequences, int64_t dim) {
  const int64_t threads = at::get_num_threads();
  int64_t block = std::max<int64_t>(dim, 1);
  auto balanced = [&](int64_t width) {
    const int64_t tasks = num_sequences * ((dim + width - 1) / width);
    return tasks % threads == 0 || tasks >= 4 * threads;
  };
  while (!balanced(block) && block / 2 >= kMinChannelBlock) block = (block + 1) / 2;
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
#ifdef RNNKERN_STREAMING_STORES
    _mm_sfence();  // streaming stores are weakly ordered: drain them before the join
#endif
  });
}

// One step over a block: state = a state + b, h = state.
template <typename scalar_t, typename acc_t>
RNNKERN_VECTORIZED void forward_row(acc_t* __restrict state, const scalar_t* __restrict a,
                                    const scalar_t* __restrict b, scalar_t* __restrict h, int64_t width) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    state[j] = static_cast<acc_t>(a[j]) * state[j] + static_cast<acc_t>(b[j]);
    h[j] = static_cast<scalar_t>(state[j]);
  }
}

// One step of the backward over a block (see scan_backward): g += dh, db = g, da = g h_prev,
// then g *= a for the step before.
template <typename scalar_t, typename acc_t, typename prev_t>
RNNKERN_VECTORIZED void backward_row(acc_t* __restrict g, const scalar_t* __restrict a,
                                     const scalar_t* __restrict dh, const prev_t* __restrict h_prev,
                                     scalar_t* __restrict da, scalar_t* __restrict db, int64_t width) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const acc_t grad = g[j] + static_cast<acc_t>(dh[j]);
    db[j] = static_cast<scalar_t>(grad);
    da[j] = static_cast<scalar_t>(grad * static_cast<acc_t>(h_prev[j]));
    g[j] = grad * static_cast<acc_t>(a[j]);
  }
}

#ifdef RNNKERN_STREAMING_STORES

// The first j from which out + j is aligned to `bytes` (streaming stores need it), at most width.
template <typename T>
inline int64_t aligned_start(const T* out, int64_t width, int64_t bytes) {
  const int64_t per_vector = bytes / static_cast<int64_t>(sizeof(T));
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) / sizeof(T)) % per_vector;
  return std::min(width, misaligned == 0 ? 0 : per_vector - misaligned);
}

// forward_row for float with streaming stores of h, the same arithmetic (a multiply, then an add).
__attribute__((target("avx2"))) void forward_row_streaming(float* __restrict state, const float* __restrict a,
                                                           const float* __restrict b, float* __restrict h,
                                                           int64_t width) {
  const int64_t head = aligned_start(h, width, 32);
  forward_row(state, a, b, h, head);
  int64_t j = head;
  for (; j + 8 <= width; j += 8) {
    const __m256 s = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(state + j)),
                                   _mm256_loadu_ps(b + j));
    _mm256_storeu_ps(state + j, s);
    _mm256_stream_ps(h + j, s);
  }
  forward_row(state + j, a + j, b + j, h + j, width - j);
}

// Eight 16-bit floats to fp32 lanes and back (rounded to nearest even, NaN kept), in registers.
#define RNNKERN_F16C_INLINE __attribute__((target("avx2,f16c"), always_inline)) inline

struct HalfLanes {
  using type = c10::Half;
  static RNNKERN_F16C_INLINE __m256 load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static RNNKERN_F16C_INLINE __m128i pack(__m256 v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
};

struct BFloat16Lanes {
  using type = c10::BFloat16;
  static RNNKERN_F16C_INLINE __m256 load(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static RNNKERN_F16C_INLINE __m128i pack(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit lane: x0..3 x0..3 | x4..7 x4..7
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
};

// forward_row for half or bfloat16 with the conversions in registers; streaming stores of h when
// `streaming`.
template <typename Lanes>
__attribute__((target("avx2,f16c"))) void forward_row_16_bit(float* __restrict state,
                                                             const typename Lanes::type* __restrict a,
                                                             const typename Lanes::type* __restrict b,
                                                             typename Lanes::type* __restrict h, int64_t width,
                                                             bool streaming) {
  const int64_t head = streaming ? aligned_start(h, width, 16) : 0;
  forward_row(state, a, b, h, head);
  int64_t j = head;
  for (; j + 8 <= width; j += 8) {
    const __m256 s = _mm256_add_ps(_mm256_mul_ps(Lanes::load(a + j), _mm256_loadu_ps(state + j)), Lanes::load(b + j));
    _mm256_storeu_ps(state + j, s);
    __m128i* out = reinterpret_cast<__m128i*>(h + j);
    if (streaming) {
      _mm_stream_si128(out, Lanes::pack(s));
    } else {
      _mm_storeu_si128(out, Lanes::pack(s));
    }
  }
  forward_row(state + j, a + j, b + j, h + j, width - j);
}

// Eight values of the previous step's h: 16-bit like the tensors, or the fp32 initial state.
template <typename Lanes>
RNNKERN_F16C_INLINE __m256 load_lanes(const typename Lanes::type* p) {
  return Lanes::load(p);
}
template <typename Lanes>
RNNKERN_F16C_INLINE __m256 load_lanes(const float* p) {
  return _mm256_loadu_ps(p);
}

// backward_row for half or bfloat16 with the conversions in registers.
template <typename Lanes, typename prev_t>
__attribute__((target("avx2,f16c"))) void backward_row_16_bit(float* __restrict g,
                                                              const typename Lanes::type* __restrict a,
                                                              const typename Lanes::type* __restrict dh,
                                                              const prev_t* __restrict h_prev,
                                                              typename Lanes::type* __restrict da,
                                                              typename Lanes::type* __restrict db, int64_t width) {
  int64_t j = 0;
  for (; j + 8 <= width; j += 8) {
    const __m256 grad = _mm256_add_ps(_mm256_loadu_ps(g + j), Lanes::load(dh + j));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(db + j), Lanes::pack(grad));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(da + j), Lanes::pack(_mm256_mul_ps(grad, load_lanes<Lanes>(h_prev + j))));
    _mm256_storeu_ps(g + j, _mm256_mul_ps(grad, Lanes::load(a + j)));
  }
  backward_row(g + j, a + j, dh + j, h_prev + j, da + j, db + j, width - j);
}

#endif

// Whether outputs of `bytes` each (and of this type) are written with streaming stores.
template <typename scalar_t>
bool streams(size_t bytes) {
#ifdef RNNKERN_STREAMING_STORES
  return (std::is_same_v<scalar_t, float> || cpu::is_16_bit_float<scalar_t>) &&
         bytes >= static_cast<size_t>(kStreamingBytes) && cpu::has_avx2();
#else
  return false;
#endif
}

template <typename scalar_t, typename acc_t>
void scan_forward(Rows<const scalar_t> a, Rows<const scalar_t> b, Rows<scalar_t> h,
                  const acc_t* initial_state, acc_t* final_state, const Sequences& seqs,
                  int64_t dim, bool reverse, bool streaming) {
  for_each_block(seqs.count, dim, [&](int64_t n, int64_t d0, int64_t width) {
    std::vector<acc_t> state(width);
    for (int64_t j = 0; j < width; ++j) {
      state[j] = initial_state ? initial_state[n * dim + d0 + j] : acc_t(0);
    }
    const int64_t batch = seqs.batch(n), begin = seqs.begin(n), length = seqs.length(n);
    // a, b, h of a step in fp32, for 16-bit rows on a CPU without F16C
    std::vector<float> rows(cpu::is_16_bit_float<scalar_t> && !cpu::has_avx2_f16c() ? 3 * width : 0);
    for (int64_t s = 0; s < length; ++s) {
      const int64_t t = begin + time_of_step(s, length, reverse);
      const scalar_t* a_t = a.at(batch, t) + d0;
      const scalar_t* b_t = b.at(batch, t) + d0;
      scalar_t* h_t = h.at(batch, t) + d0;
#ifdef RNNKERN_STREAMING_STORES
      if constexpr (cpu::is_16_bit_float<scalar_t>) {
        if (cpu::has_avx2_f16c()) {
          using Lanes = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, HalfLanes, BFloat16Lanes>;
          forward_row_16_bit<Lanes>(state.data(), a_t, b_t, h_t, width, streaming);
          continue;
        }
      }
#endif
      if constexpr (cpu::is_16_bit_float<scalar_t>) {  // without F16C: through fp32 rows
        float *a_row = rows.data(), *b_row = a_row + width, *h_row = b_row + width;
        cpu::to_float(a_t, a_row, width);
        cpu::to_float(b_t, b_row, width);
        forward_row(state.data(), a_row, b_row, h_row, width);
        cpu::from_float(h_row, h_t, width);
        continue;
      }
#ifdef RNNKERN_STREAMING_STORES
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (streaming) {
          forward_row_streaming(state.data(), a_t, b_t, h_t, width);
          continue;
        }
      }
#endif
      forward_row(state.data(), a_t, b_t, h_t, width);
    }
    std::copy(state.begin(), state.end(), final_state + n * dim + d0);
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
    std::vector<acc_t> g(width), h_init(width);
    for (int64_t j = 0; j < width; ++j) {
      g[j] = grad_final ? grad_final[n * dim + d0 + j] : acc_t(0);
      h_init[j] = initial_state ? initial_state[n * dim + d0 + j] : acc_t(0);
    }
    const int64_t batch = seqs.batch(n), begin = seqs.begin(n), length = seqs.length(n);
    // a, dh, h_prev, da, db in fp32, for 16-bit rows on a CPU without F16C
    std::vector<float> rows(cpu::is_16_bit_float<scalar_t> && !cpu::has_avx2_f16c() ? 5 * width : 0);
    auto time = [&](int64_t s) { return begin + time_of_step(s, length, reverse); };
    auto step = [&](int64_t s, const auto* h_prev) {
      const int64_t t = time(s);
      const scalar_t* a_t = a.at(batch, t) + d0;
      const scalar_t* dh_t = grad_h.at(batch, t) + d0;
      scalar_t* da_t = grad_a.at(batch, t) + d0;
      scalar_t* db_t = grad_b.at(batch, t) + d0;
#ifdef RNNKERN_STREAMING_STORES
      if constexpr (cpu::is_16_bit_float<scalar_t>) {
        if (cpu::has_avx2_f16c()) {
          using Lanes = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, HalfLanes, BFloat16Lanes>;
          return backward_row_16_bit<Lanes>(g.data(), a_t, dh_t, h_prev, da_t, db_t, width);
        }
      }
#endif
      if constexpr (cpu::is_16_bit_float<scalar_t>) {  // without F16C: through fp32 rows
        float *a_row = rows.data(), *dh_row = a_row + width, *h_row = dh_row + width;
        float *da_row = h_row + width, *db_row = da_row + width;
        cpu::to_float(a_t, a_row, width);
        cpu::to_float(dh_t, dh_row, width);
        if constexpr (std::is_same_v<std::decay_t<decltype(*h_prev)>, scalar_t>) {
          cpu::to_float(h_prev, h_row, width);
        } else {
          std::copy(h_prev, h_prev + width, h_row);  // the fp32 initial state
        }
        backward_row(g.data(), a_row, dh_row, static_cast<const float*>(h_row), da_row, db_row, width);
        cpu::from_float(da_row, da_t, width);
        cpu::from_float(db_row, db_t, width);
      } else {
        backward_row(g.data(), a_t, dh_t, h_prev, da_t, db_t, width);
      }
    };
    for (int64_t s = length - 1; s > 0; --s) step(s, h.at(batch, time(s - 1)) + d0);
    if (length > 0) step(0, h_init.data());
    std::copy(g.begin(), g.end(), grad_initial + n * dim + d0);
  });
}

}  // namespace

namespace {

// h (B, T, D) with a unit last stride <- the scan of a, b; returns the final state.
at::Tensor scan_into(const at::Tensor& a_in, const at::Tensor& b_in, const std::optional<at::Tensor>& initial_state,
                     const std::optional<at::Tensor>& cu_seqlens, bool reverse, at::Tensor& h) {
  const at::Tensor a = cpu::unit_last_stride(a_in), b = cpu::unit_last_stride(b_in);
  const at::Tensor offsets = long_offsets(cu_seqlens);
  const Sequences seqs = sequences_of(a, offsets);
  check_state("initial_state", initial_state, a, seqs.count);
  const int64_t dim = a.size(2);
  at::Tensor final_state = at::empty({seqs.count, dim}, a.options().dtype(at::toOpMathType(a.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "linear_scan_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* h0 = initial_state.has_value() ? initial_state->data_ptr<acc_t>() : nullptr;
    scan_forward<scalar_t, acc_t>(Rows<const scalar_t>::of(a), Rows<const scalar_t>::of(b), Rows<scalar_t>::of(h),
                                  h0, final_state.data_ptr<acc_t>(), seqs, dim, reverse,
                                  streams<scalar_t>(h.nbytes()));
  });
  return final_state;
}

void check_inputs(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 3 && a.sizes() == b.sizes(), op, ": a, b must be (B, T, D) tensors of one shape, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must have one dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_scan_fwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, bool reverse) {
  check_inputs("linear_scan_fwd", a, b);
  at::Tensor h = at::empty(a.sizes(), a.options());
  at::Tensor final_state = scan_into(a, b, initial_state, cu_seqlens, reverse, h);
  return {h, final_state};
}

at::Tensor linear_scan_fwd_out_cpu(const at::Tensor& a, const at::Tensor& b,
                                   const std::optional<at::Tensor>& initial_state,
                                   const std::optional<at::Tensor>& cu_seqlens, bool reverse, at::Tensor& out) {
  const char* op = "linear_scan_fwd_out";
  check_inputs(op, a, b);
  TORCH_CHECK(out.sizes() == a.sizes() && out.scalar_type() == a.scalar_type() && out.device() == a.device(), op,
              ": out must be a ", a.scalar_type(), " tensor of shape ", a.sizes(), " on ", a.device(), ", got ",
              out.scalar_type(), " ", out.sizes(), " on ", out.device());
  if (out.stride(2) == 1 || out.size(2) <= 1) return scan_into(a, b, initial_state, cu_seqlens, reverse, out);
  at::Tensor h = at::empty(a.sizes(), a.options());  // out's channels are strided: scan, then copy
  at::Tensor final_state = scan_into(a, b, initial_state, cu_seqlens, reverse, h);
  out.copy_(h);
  return final_state;
}

namespace {

// grad_a, grad_b (B, T, D) with unit last strides <- the backward; returns grad_initial.
at::Tensor gradients_into(const at::Tensor& a_in, const at::Tensor& h_in, const std::optional<at::Tensor>& initial_state,
                          const at::Tensor& grad_h_in, const std::optional<at::Tensor>& grad_final,
                          const std::optional<at::Tensor>& cu_seqlens, bool reverse, at::Tensor& grad_a,
                          at::Tensor& grad_b) {
  const at::Tensor a = cpu::unit_last_stride(a_in), h = cpu::unit_last_stride(h_in);
  const at::Tensor grad_h = cpu::unit_last_stride(grad_h_in);
  const at::Tensor offsets = long_offsets(cu_seqlens);
  const Sequences seqs = sequences_of(a, offsets);
  check_state("initial_state", initial_state, a, seqs.count);
  const int64_t dim = a.size(2);
  const auto acc_dtype = at::toOpMathType(a.scalar_type());
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
                                   Rows<scalar_t>::of(grad_b), h0, dfinal, grad_initial.data_ptr<acc_t>(), seqs,
                                   dim, reverse);
  });
  return grad_initial;
}

void check_backward_inputs(const char* op, const at::Tensor& a, const at::Tensor& h, const at::Tensor& grad_h) {
  TORCH_CHECK(a.dim() == 3 && h.sizes() == a.sizes() && grad_h.sizes() == a.sizes(), op,
              ": a, h, grad_h must be (B, T, D) tensors of one shape, got ", a.sizes(), ", ", h.sizes(), " and ",
              grad_h.sizes());
  TORCH_CHECK(h.scalar_type() == a.scalar_type() && grad_h.scalar_type() == a.scalar_type(), op,
              ": a, h, grad_h must have one dtype, got ", a.scalar_type(), ", ", h.scalar_type(), " and ",
              grad_h.scalar_type());
}

void check_gradient_buffer(const char* op, const char* name, const at::Tensor& buffer, const at::Tensor& a) {
  TORCH_CHECK(buffer.sizes() == a.sizes() && buffer.scalar_type() == a.scalar_type() && buffer.device() == a.device(),
              op, ": ", name, " must be a ", a.scalar_type(), " tensor of shape ", a.sizes(), " on ", a.device(),
              ", got ", buffer.scalar_type(), " ", buffer.sizes(), " on ", buffer.device());
  TORCH_CHECK(buffer.stride(2) == 1 || buffer.size(2) <= 1, op, ": ", name, " must have unit stride along D");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_bwd_cpu(
    const at::Tensor& a, const at::Tensor& h, const std::optional<at::Tensor>& initial_state,
    const at::Tensor& grad_h, const std::optional<at::Tensor>& grad_final,
    const std::optional<at::Tensor>& cu_seqlens, bool reverse) {
  check_backward_inputs("linear_scan_bwd", a, h, grad_h);
  at::Tensor grad_a = at::empty(a.sizes(), a.options()), grad_b = at::empty(a.sizes(), a.options());
  at::Tensor grad_initial = gradients_into(a, h, initial_state, grad_h, grad_final, cu_seqlens, reverse, grad_a, grad_b);
  return {grad_a, grad_b, grad_initial};
}

at::Tensor linear_scan_bwd_out_cpu(const at::Tensor& a, const at::Tensor& h,
                                   const std::optional<at::Tensor>& initial_state, const at::Tensor& grad_h,
                                   const std::optional<at::Tensor>& grad_final,
                                   const std::optional<at::Tensor>& cu_seqlens, bool reverse, at::Tensor& grad_a,
                                   at::Tensor& grad_b) {
  const char* op = "linear_scan_bwd_out";
  check_backward_inputs(op, a, h, grad_h);
  check_gradient_buffer(op, "grad_a", grad_a, a);
  check_gradient_buffer(op, "grad_b", grad_b, a);
  return gradients_into(a, h, initial_state, grad_h, grad_final, cu_seqlens, reverse, grad_a, grad_b);
}

}  // namespace rnnkern
