// CPU kernels of Mamba's selective scan (rnnkern/ops/selective_scan/reference.py states the
// contract). Per channel d of sequence b, with delta' = softplus?(delta + delta_bias):
//
//   x_t = exp(delta'_t A_d) * x_{t-1} + delta'_t u_t B_t     (x: N values, x_{-1} = initial_state)
//   y_t = C_t . x_t + D_d u_t,        out_t = y_t * silu(z_t)  (when z is given)
//
// Forward: one task per (sequence, channel) pair; the task keeps the channel's N state
// values in a small array and walks the sequence in time order, kChunk steps at a time: the
// chunk's discretisation first, vectorised, then its steps; when training, it stores the
// state before every chunk.
//
// Backward: tasks own (sequence, group, block of the group's channels), so the gradients of
// B and C, summed over a group's channels, need no atomics. Each task walks the chunks from
// last to first; per channel it recomputes the chunk's states from the stored checkpoint
// into a (kChunk + 1, N) scratch buffer and runs the chunk's steps backwards. No tensor of
// shape (Bt, Dm, L, N) is ever allocated.
//
// Packed sequences (cu_seqlens, Bt == 1): a step that starts a sequence reads that sequence's
// initial state (or zeros) as x_{t-1}, a step that ends one stores its last state; backwards,
// the end of a sequence sets h to d(last_state) instead of carrying it, and its start hands
// a_t h to d(initial_state). Checkpoints stay the packed stream's state before every kChunk-th
// step, so a chunk may hold several sequences.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../math/activations.h"
#include "../ops.h"
#include "gemv.h"
#include "row_groups.h"
#include "tensor_args.h"
#include "vectorized.h"

namespace rnnkern {
namespace {

// Steps between stored states; CHUNK in rnnkern/ops/selective_scan/reference.py.
constexpr int64_t kChunk = 64;

int64_t num_chunks(int64_t length) { return (length + kChunk - 1) / kChunk; }

// delta' = softplus(delta + bias) with delta_softplus, else delta + bias.
template <typename acc_t>
acc_t step_size(acc_t delta, acc_t bias, bool softplus) {
  const acc_t x = delta + bias;
  return softplus ? math::softplus(x) : x;
}

// d(delta') / d(delta), for the backward.
template <typename acc_t>
acc_t step_size_slope(acc_t delta, acc_t bias, bool softplus) {
  const acc_t x = delta + bias;
  return softplus ? math::softplus_slope(x) : acc_t(1);
}

// B or C (or their gradient): the N values that step t of channel d of sequence b reads.
//   variable (Bt, G, L, N):  batch_stride G*L*N, group_stride L*N, time_stride N, Dm / G channels a group
//   fixed (Dm, N):           batch_stride 0, group_stride N, time_stride 0, one channel a group
// A gradient adds `slot_stride`: tasks that share a group write separate slots, summed afterwards.
template <typename T>
struct StateOperand {
  T* data;
  int64_t batch_stride, group_stride, time_stride, channels_per_group, slot_stride;

  static StateOperand variable(T* data, int64_t groups, int64_t dim, int64_t length, int64_t n) {
    return {data, groups * length * n, length * n, n, dim / groups, 0};
  }
  static StateOperand fixed(T* data, int64_t n) { return {data, 0, n, 0, 1, 0}; }
  // the gradient of a fixed operand as one (Dm, N) partial sum per sequence: (Bt, Dm, N)
  static StateOperand per_sequence(T* data, int64_t dim, int64_t n) { return {data, dim * n, n, 0, 1, 0}; }

  // the row of step 0; step t is at + t * time_stride
  T* channel(int64_t b, int64_t d, int64_t slot = 0) const {
    return data + slot * slot_stride + b * batch_stride + (d / channels_per_group) * group_stride;
  }
};

// B/C as the kernels read them: variable ones transposed to (Bt, G, L, N) so that one step's
// N values are contiguous; fixed ones (Dm, N) as they are. Both in the state dtype.
template <typename acc_t>
StateOperand<const acc_t> operand_of(const at::Tensor& x, int64_t dim, int64_t length) {
  const acc_t* data = x.data_ptr<acc_t>();
  if (x.dim() == 2) return StateOperand<const acc_t>::fixed(data, x.size(1));
  return StateOperand<const acc_t>::variable(data, x.size(1), dim, length, x.size(3));
}

at::Tensor kernel_layout(const at::Tensor& x, at::ScalarType acc) {
  return x.dim() == 2 ? x.to(acc).contiguous() : x.to(acc).transpose(-1, -2).contiguous();
}

// Which sequence each step belongs to: row b is sequence b, or row 0 holds packed sequences
// (index[t] for step t; empty ones own no step).
template <typename acc_t>
struct Sequences {
  const int64_t* index;        // (L,), or null when not packed
  int64_t dim, length, state_size;  // Dm, L, N
  const acc_t* initial_state;  // (Bt | S, Dm, N) or null
  const acc_t* zeros;          // (N,)

  int64_t of(int64_t b, int64_t t) const { return index ? index[t] : b; }
  bool starts(int64_t t) const { return t == 0 || (index && index[t] != index[t - 1]); }
  bool ends(int64_t t) const { return t == length - 1 || (index && index[t] != index[t + 1]); }
  // row (sequence, d) of a (Bt | S, Dm, N) tensor
  int64_t row(int64_t sequence, int64_t d) const { return (sequence * dim + d) * state_size; }
  // what channel d of `sequence` starts from
  const acc_t* initial(int64_t sequence, int64_t d) const {
    return initial_state ? initial_state + row(sequence, d) : zeros;
  }
};

// ---------------------------------------------------------------------------------------
// The scan's inputs as both kernels read them: u, delta and z in input_t (the input dtype in
// the forward, the state dtype in the backward), the parameters in the state dtype.
template <typename input_t, typename acc_t>
struct ScanInputs {
  const input_t* u;          // (Bt, Dm, L)
  const input_t* delta;      // (Bt, Dm, L)
  const input_t* z;          // (Bt, Dm, L) or null
  const acc_t* A;            // (Dm, N)
  StateOperand<const acc_t> B, C;
  const acc_t* D;            // (Dm,) or null
  const acc_t* delta_bias;   // (Dm,) or null
  bool softplus;

  acc_t skip(int64_t d) const { return D ? D[d] : acc_t(0); }
  acc_t bias(int64_t d) const { return delta_bias ? delta_bias[d] : acc_t(0); }
};

// The forward's per-task scratch for kChunk steps of one channel (N states).
template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> dt, drive, gate;  // (kChunk,): delta', delta' u, silu(z) (1 without z)
  std::vector<acc_t> decay, readout;   // (kChunk, N): exp(delta' A), C_t * x_t
  std::vector<acc_t> y, ones;          // (kChunk,): C_t . x_t; (N,): ones

  explicit ForwardScratch(int64_t n)
      : dt(kChunk), drive(kChunk), gate(kChunk), decay(kChunk * n), readout(kChunk * n), y(kChunk), ones(n, 1) {}
};

template <typename scalar_t, typename acc_t>
struct ScanForward {
  int64_t dim, length, state_size;  // Dm, L, N
  ScanInputs<scalar_t, acc_t> in;
  Sequences<acc_t> seqs;
  scalar_t* out;                     // (Bt, Dm, L)
  acc_t* last_state;                 // (Bt | S, Dm, N)
  acc_t* checkpoints;                // (Bt, Dm, chunks, N), or null when not training

  // Channel d of row b through every step, kChunk steps at a time: first the chunk's
  // discretisation, vectorised along time (delta', the gate) and along (time, N) (the
  // decays), then the recurrence, the only part that must go step by step, and last the
  // read-out C_t . x_t of every step as one product (project_rows: a sum over N inside the
  // step loop left GCC a lane-by-lane reduction per step). x: scratch for the N states.
  RNNKERN_VECTORIZED void run(int64_t b, int64_t d, acc_t* __restrict x, ForwardScratch<acc_t>& scratch) const {
    const int64_t N = state_size, row = b * dim + d;
    // x_{-1}: row b's initial state, zeros when packed (step 0 starts a sequence)
    std::copy_n(seqs.index ? seqs.zeros : seqs.initial(b, d), N, x);
    const acc_t* b_row = in.B.channel(b, d);
    const acc_t* c_row = in.C.channel(b, d);
    const acc_t skip = in.skip(d);
    const scalar_t* u_row = in.u + row * length;
    scalar_t* out_row = out + row * length;
    for (int64_t t0 = 0; t0 < length; t0 += kChunk) {
      const int64_t steps = std::min(kChunk, length - t0);
      discretise(row, d, t0, steps, scratch);
      if (checkpoints) std::copy_n(x, N, checkpoints + (row * num_chunks(length) + t0 / kChunk) * N);
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t t = t0 + s;
        if (seqs.index && seqs.starts(t)) std::copy_n(seqs.initial(seqs.of(b, t), d), N, x);
        const acc_t* __restrict decay = scratch.decay.data() + s * N;
        const acc_t* __restrict b_t = b_row + t * in.B.time_stride;
        const acc_t* __restrict c_t = c_row + t * in.C.time_stride;
        acc_t* __restrict readout = scratch.readout.data() + s * N;
        const acc_t drive = scratch.drive[s];
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          x[n] = decay[n] * x[n] + drive * b_t[n];
          readout[n] = c_t[n] * x[n];
        }
        if (seqs.ends(t)) std::copy_n(x, N, last_state + seqs.row(seqs.of(b, t), d));
      }
      cpu::project_rows(scratch.readout.data(), N, 0, steps, nullptr, scratch.ones.data(), N, 1, scratch.y.data(),
                        steps);  // y_t = sum over N of C_t * x_t
      const acc_t* __restrict y = scratch.y.data();
      const acc_t* __restrict gate = scratch.gate.data();
#pragma omp simd
      for (int64_t s = 0; s < steps; ++s) {
        out_row[t0 + s] = static_cast<scalar_t>((y[s] + skip * static_cast<acc_t>(u_row[t0 + s])) * gate[s]);
      }
    }
  }

  // Steps [t0, t0 + steps) of channel d (row `row`): delta', delta' u, the gate, exp(delta' A).
  RNNKERN_VECTORIZED void discretise(int64_t row, int64_t d, int64_t t0, int64_t steps,
                                     ForwardScratch<acc_t>& scratch) const {
    const int64_t N = state_size;
    const scalar_t* __restrict delta = in.delta + row * length + t0;
    const scalar_t* __restrict u = in.u + row * length + t0;
    acc_t* __restrict dt = scratch.dt.data();
    acc_t* __restrict drive = scratch.drive.data();
    acc_t* __restrict gate = scratch.gate.data();
    const acc_t bias = in.bias(d);
    if (in.softplus) {
#pragma omp simd
      for (int64_t s = 0; s < steps; ++s) dt[s] = math::softplus_branchless(static_cast<acc_t>(delta[s]) + bias);
    } else {
#pragma omp simd
      for (int64_t s = 0; s < steps; ++s) dt[s] = static_cast<acc_t>(delta[s]) + bias;
    }
#pragma omp simd
    for (int64_t s = 0; s < steps; ++s) drive[s] = dt[s] * static_cast<acc_t>(u[s]);
    if (in.z) {
      const scalar_t* __restrict z = in.z + row * length + t0;
#pragma omp simd
      for (int64_t s = 0; s < steps; ++s) gate[s] = math::silu(static_cast<acc_t>(z[s]));
    } else {
      std::fill_n(gate, steps, acc_t(1));
    }
    const acc_t* __restrict a_row = in.A + d * N;
    acc_t* __restrict decay = scratch.decay.data();
    for (int64_t s = 0; s < steps; ++s) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) decay[s * N + n] = math::exp(dt[s] * a_row[n]);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Walks the steps backwards carrying h = dL/dx_t. With a_t = exp(delta'_t A), per step:
//   dy = grad_out * silu(z)     dz = grad_out * y * silu'(z)      dD += dy u
//   h += dy C_t                  dC_t += dy x_t
//   dB_t += h delta' u           du = dy D + delta' (h . B_t)
//   d(delta') = (h . (A a_t x_{t-1})) + u (h . B_t)               dA += delta' h a_t x_{t-1}
//   h = a_t h                    (so h at a sequence's start is d(initial_state))
// with h = d(last_state) at the last step of each sequence, before that step's terms.
template <typename acc_t>
struct ScanBackward {
  int64_t batch, dim, length, state_size;       // Bt, Dm, L, N
  ScanInputs<acc_t, acc_t> in;
  Sequences<acc_t> seqs;
  const acc_t* checkpoints;                     // (Bt, Dm, chunks, N)
  const acc_t* grad_out;                        // (Bt, Dm, L)
  const acc_t* grad_last_state;                 // (Bt | S, Dm, N)
  acc_t* du;                                    // (Bt, Dm, L)
  acc_t* ddelta;                                // (Bt, Dm, L)
  acc_t* dz;                                    // (Bt, Dm, L) or null
  StateOperand<acc_t> dB, dC;                   // zeroed; summed over slots afterwards
  acc_t* dA;                                    // (Bt, Dm, N) zeroed, summed over Bt afterwards
  acc_t* dD;                                    // (Bt, Dm) zeroed, or null
  acc_t* ddelta_bias;                           // (Bt, Dm) zeroed, or null
  acc_t* dinitial_state;                        // (Bt | S, Dm, N)

  // Per-task scratch for one chunk of one channel.
  struct Scratch {
    std::vector<acc_t> states;  // (kChunk + 1, N): x_{t0-1} .. x_{t0+kChunk-1}
    std::vector<acc_t> decays;  // (kChunk, N): a_t
    std::vector<acc_t> y;       // (kChunk,): C_t . x_t + D u_t
    acc_t dt[kChunk];           // delta'
    acc_t slope[kChunk];        // d(delta')/d(delta)
  };

  // Channels [d0, d1) of row b; their B/C gradients go to `slot`. h: (d1 - d0, N), set at
  // the last step (which ends a sequence).
  void run(int64_t b, int64_t d0, int64_t d1, int64_t slot, acc_t* h, Scratch& scratch) const {
    for (int64_t c = num_chunks(length) - 1; c >= 0; --c) {
      for (int64_t d = d0; d < d1; ++d) {
        recompute_chunk(b, d, c, scratch);
        backward_chunk(b, d, c, slot, h + (d - d0) * state_size, scratch);
      }
    }
  }

  // x_{t-1} of step t0 + s, from the chunk's recomputed states or, at a sequence start, its initial state.
  const acc_t* previous(int64_t b, int64_t d, int64_t t, int64_t s, const Scratch& scratch) const {
    return seqs.index && seqs.starts(t) ? seqs.initial(seqs.of(b, t), d) : scratch.states.data() + s * state_size;
  }

  RNNKERN_VECTORIZED void recompute_chunk(int64_t b, int64_t d, int64_t c, Scratch& scratch) const {
    const int64_t N = state_size, row = b * dim + d, t0 = c * kChunk;
    const int64_t steps = std::min(kChunk, length - t0);
    const acc_t* __restrict a_row = in.A + d * N;
    const acc_t* b_row = in.B.channel(b, d);
    const acc_t* c_row = in.C.channel(b, d);
    const acc_t skip = in.skip(d), bias = in.bias(d);
    std::copy_n(checkpoints + (row * num_chunks(length) + c) * N, N, scratch.states.data());
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = t0 + s;
      const acc_t dt = step_size(in.delta[row * length + t], bias, in.softplus);
      scratch.dt[s] = dt;
      scratch.slope[s] = step_size_slope(in.delta[row * length + t], bias, in.softplus);
      const acc_t u_t = in.u[row * length + t];
      const acc_t dt_u = dt * u_t;
      const acc_t* __restrict b_t = b_row + t * in.B.time_stride;
      const acc_t* __restrict c_t = c_row + t * in.C.time_stride;
      const acc_t* __restrict x_prev = previous(b, d, t, s, scratch);
      acc_t* __restrict x = scratch.states.data() + (s + 1) * N;
      acc_t* __restrict a = scratch.decays.data() + s * N;
      acc_t y = 0;
#pragma omp simd reduction(+ : y)
      for (int64_t n = 0; n < N; ++n) {
        a[n] = math::exp(dt * a_row[n]);
        x[n] = a[n] * x_prev[n] + dt_u * b_t[n];
        y += c_t[n] * x[n];
      }
      scratch.y[s] = y + skip * u_t;
    }
  }

  RNNKERN_VECTORIZED void backward_chunk(int64_t b, int64_t d, int64_t c, int64_t slot, acc_t* __restrict h,
                                         const Scratch& scratch) const {
    const int64_t N = state_size, row = b * dim + d, t0 = c * kChunk;
    const int64_t steps = std::min(kChunk, length - t0);
    const acc_t* __restrict a_row = in.A + d * N;
    const acc_t* b_row = in.B.channel(b, d);
    const acc_t* c_row = in.C.channel(b, d);
    acc_t* db_row = dB.channel(b, d, slot);
    acc_t* dc_row = dC.channel(b, d, slot);
    acc_t* __restrict da = dA + row * N;
    const acc_t skip = in.skip(d);
    acc_t d_skip = 0, d_bias = 0;
    for (int64_t s = steps - 1; s >= 0; --s) {
      const int64_t t = t0 + s;
      if (seqs.ends(t)) std::copy_n(grad_last_state + seqs.row(seqs.of(b, t), d), N, h);
      const acc_t u_t = in.u[row * length + t], g = grad_out[row * length + t];
      const acc_t dt = scratch.dt[s];
      acc_t dy = g;
      if (in.z) {
        const acc_t z_t = in.z[row * length + t], gate = math::sigmoid(z_t);
        dy = g * z_t * gate;
        dz[row * length + t] = g * scratch.y[s] * gate * (acc_t(1) + z_t * (acc_t(1) - gate));
      }
      d_skip += dy * u_t;
      const acc_t dt_u = dt * u_t;
      const acc_t* __restrict b_t = b_row + t * in.B.time_stride;
      const acc_t* __restrict c_t = c_row + t * in.C.time_stride;
      acc_t* __restrict db_t = db_row + t * dB.time_stride;
      acc_t* __restrict dc_t = dc_row + t * dC.time_stride;
      const acc_t* __restrict x_prev = previous(b, d, t, s, scratch);
      const acc_t* __restrict x = scratch.states.data() + (s + 1) * N;
      const acc_t* __restrict a = scratch.decays.data() + s * N;
      acc_t h_b = 0, h_decay = 0;  // h . B_t and h . (A a_t x_{t-1})
#pragma omp simd reduction(+ : h_b, h_decay)
      for (int64_t n = 0; n < N; ++n) {
        const acc_t h_n = h[n] + dy * c_t[n];
        dc_t[n] += dy * x[n];
        db_t[n] += h_n * dt_u;
        h_b += h_n * b_t[n];
        const acc_t carried = h_n * a[n] * x_prev[n];
        h_decay += carried * a_row[n];
        da[n] += dt * carried;
        h[n] = h_n * a[n];
      }
      du[row * length + t] = dy * skip + dt * h_b;
      const acc_t d_delta = (h_decay + u_t * h_b) * scratch.slope[s];
      ddelta[row * length + t] = d_delta;
      d_bias += d_delta;
      if (seqs.starts(t)) std::copy_n(h, N, dinitial_state + seqs.row(seqs.of(b, t), d));
    }
    if (dD) dD[row] += d_skip;
    if (ddelta_bias) ddelta_bias[row] += d_bias;
  }
};

// ---------------------------------------------------------------------------------------
// Argument checks: the Python layer validates its inputs, but a direct torch.ops call must
// not make a kernel read the wrong memory.

void check_float(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be a real floating-point tensor, got ",
              x.scalar_type());
}

// B or C: (Bt, G, N, L) with G dividing Dm, or (Dm, N); returns G (0 when fixed).
int64_t check_state_operand(const char* op, const char* name, const at::Tensor& x, int64_t batch, int64_t dim,
                            int64_t length, int64_t n) {
  check_float(op, name, x);
  if (x.dim() == 2) {
    cpu::check_shape(op, name, x, {dim, n});
    return 0;
  }
  TORCH_CHECK(x.dim() == 4 && x.size(0) == batch && x.size(2) == n && x.size(3) == length, op, ": ", name,
              " must have shape (", batch, ", G, ", n, ", ", length, ") or (", dim, ", ", n, "), got ", x.sizes());
  TORCH_CHECK(x.size(1) > 0 && dim % x.size(1) == 0, op, ": ", name, "'s group count ", x.size(1),
              " must divide the channel count ", dim);
  return x.size(1);
}

struct ScanShape {
  int64_t batch, dim, length, state_size, groups;  // groups: of the variable B/C, 0 when both fixed
};

ScanShape check_inputs(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.dim() == 3, op, ": u must have shape (Bt, Dm, L), got ", u.sizes());
  check_float(op, "u", u);
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2);
  cpu::check_tensor(op, "delta", delta, u.sizes(), u.scalar_type());
  TORCH_CHECK(!A.is_complex(), op, ": A must be real; complex A is not supported");
  check_float(op, "A", A);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, op, ": A must have shape (", dim, ", N), got ", A.sizes());
  const int64_t n = A.size(1);
  const int64_t groups_b = check_state_operand(op, "B", B, batch, dim, length, n);
  const int64_t groups_c = check_state_operand(op, "C", C, batch, dim, length, n);
  TORCH_CHECK(groups_b == 0 || groups_c == 0 || groups_b == groups_c, op,
              ": B and C must have the same group count, got ", groups_b, " and ", groups_c);
  if (D.has_value()) {
    check_float(op, "D", *D);
    cpu::check_shape(op, "D", *D, {dim});
  }
  if (delta_bias.has_value()) {
    check_float(op, "delta_bias", *delta_bias);
    cpu::check_shape(op, "delta_bias", *delta_bias, {dim});
  }
  cpu::check_optional(op, "z", z, u.sizes(), u.scalar_type());
  return {batch, dim, length, n, std::max(groups_b, groups_c)};
}

// (L,) int64: the packed sequence of every step, from cu_seqlens (S + 1,) checked to start at 0,
// never decrease and end at L; undefined when not packed.
at::Tensor sequence_index(const char* op, const std::optional<at::Tensor>& cu_seqlens, int64_t batch,
                          int64_t length) {
  if (!cu_seqlens.has_value()) return at::Tensor();
  TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt || cu_seqlens->scalar_type() == at::kLong, op,
              ": cu_seqlens must be int32 or int64, got ", cu_seqlens->scalar_type());
  TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 2, op,
              ": cu_seqlens must have shape (S + 1,) with S >= 1, got ", cu_seqlens->sizes());
  TORCH_CHECK(batch == 1, op, ": with cu_seqlens the batch size must be 1, got ", batch);
  const at::Tensor bounds = cu_seqlens->to(at::kLong).contiguous();
  const int64_t* cu = bounds.data_ptr<int64_t>();
  const int64_t count = bounds.numel() - 1;
  TORCH_CHECK(cu[0] == 0 && cu[count] == length, op, ": cu_seqlens must start at 0 and end at L=", length);
  at::Tensor index = at::empty({length}, bounds.options());
  int64_t* seq = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(cu[i] <= cu[i + 1] && cu[i + 1] <= length, op, ": cu_seqlens must be non-decreasing");
    std::fill(seq + cu[i], seq + cu[i + 1], i);
  }
  return index;
}

// Optional (Dm,) vectors in the state dtype, or undefined.
at::Tensor acc_or_undefined(const std::optional<at::Tensor>& x, at::ScalarType acc) {
  return x.has_value() ? x->to(acc).contiguous() : at::Tensor();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cpu(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens, bool training) {
  constexpr const char* op = "selective_scan_fwd";
  const ScanShape shape = check_inputs(op, u_in, delta_in, A, B, C, D, z, delta_bias);
  const int64_t batch = shape.batch, dim = shape.dim, length = shape.length, N = shape.state_size;
  const auto dtype = u_in.scalar_type();
  const auto acc = at::toOpMathType(dtype);
  const at::Tensor index = sequence_index(op, cu_seqlens, batch, length);
  const int64_t sequences = index.defined() ? cu_seqlens->size(0) - 1 : batch;
  cpu::check_optional(op, "initial_state", initial_state, {sequences, dim, N}, acc);

  const at::Tensor u = u_in.contiguous(), delta = delta_in.contiguous();
  const at::Tensor z_c = cpu::contiguous_or_undefined(z);
  const at::Tensor A_acc = A.to(acc).contiguous(), B_k = kernel_layout(B, acc), C_k = kernel_layout(C, acc);
  const at::Tensor D_acc = acc_or_undefined(D, acc), bias = acc_or_undefined(delta_bias, acc);
  const at::Tensor h0 = cpu::contiguous_or_undefined(initial_state);
  const auto acc_options = u.options().dtype(acc);
  const at::Tensor zeros = at::zeros({N}, acc_options);
  at::Tensor out = at::empty(u.sizes(), u.options());
  // an empty packed sequence ends where it starts; the kernel writes every other row
  at::Tensor last_state = h0.defined() ? h0.clone() : at::zeros({sequences, dim, N}, acc_options);
  at::Tensor checkpoints = training ? at::empty({batch, dim, num_chunks(length), N}, acc_options)
                                    : at::empty({0}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "selective_scan_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ScanForward<scalar_t, acc_t> kernel{
        dim, length, N,
        {u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), cpu::data_or_null<scalar_t>(z_c), A_acc.data_ptr<acc_t>(),
         operand_of<acc_t>(B_k, dim, length), operand_of<acc_t>(C_k, dim, length), cpu::data_or_null<acc_t>(D_acc),
         cpu::data_or_null<acc_t>(bias), delta_softplus},
        {cpu::data_or_null<int64_t>(index), dim, length, N, cpu::data_or_null<acc_t>(h0), zeros.data_ptr<acc_t>()},
        out.data_ptr<scalar_t>(), last_state.data_ptr<acc_t>(),
        training ? checkpoints.data_ptr<acc_t>() : nullptr};
    at::parallel_for(0, batch * dim, 1, [&](int64_t first, int64_t last) {
      std::vector<acc_t> x(N);
      ForwardScratch<acc_t> scratch(N);
      for (int64_t row = first; row < last; ++row) kernel.run(row / dim, row % dim, x.data(), scratch);
    });
  });
  return {out, last_state, checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd_cpu(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                       bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                       const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& checkpoints_in,
                       const at::Tensor& grad_out_in, const at::Tensor& grad_last_state) {
  constexpr const char* op = "selective_scan_bwd";
  const ScanShape shape = check_inputs(op, u_in, delta_in, A, B, C, D, z, delta_bias);
  const int64_t batch = shape.batch, dim = shape.dim, length = shape.length, N = shape.state_size;
  const auto acc = at::toOpMathType(u_in.scalar_type());
  const at::Tensor index = sequence_index(op, cu_seqlens, batch, length);
  const int64_t sequences = index.defined() ? cu_seqlens->size(0) - 1 : batch;
  cpu::check_optional(op, "initial_state", initial_state, {sequences, dim, N}, acc);
  cpu::check_tensor(op, "checkpoints", checkpoints_in, {batch, dim, num_chunks(length), N}, acc);
  cpu::check_shape(op, "grad_out", grad_out_in, u_in.sizes());
  check_float(op, "grad_out", grad_out_in);
  cpu::check_shape(op, "grad_last_state", grad_last_state, {sequences, dim, N});

  const auto acc_options = u_in.options().dtype(acc);
  const at::Tensor u = u_in.to(acc).contiguous(), delta = delta_in.to(acc).contiguous();
  const at::Tensor z_acc = acc_or_undefined(z, acc);
  const at::Tensor A_acc = A.to(acc).contiguous(), B_k = kernel_layout(B, acc), C_k = kernel_layout(C, acc);
  const at::Tensor D_acc = acc_or_undefined(D, acc), bias = acc_or_undefined(delta_bias, acc);
  const at::Tensor h0 = cpu::contiguous_or_undefined(initial_state), zeros = at::zeros({N}, acc_options);
  const at::Tensor checkpoints = checkpoints_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(acc).contiguous();
  const at::Tensor grad_last = grad_last_state.to(acc).contiguous();

  // Work split: (sequence, group, block) tasks; both-fixed B/C count as one group.
  const int64_t groups = std::max<int64_t>(shape.groups, 1), channels_per_group = dim / groups;
  // Tasks own (sequence, group, block of the group's channels): each extra block of a
  // variable B/C costs one more gradient slot of B's size.
  const int64_t blocks = cpu::blocks_per_pair(batch * groups, channels_per_group);
  // Gradient buffers: variable B/C get one slot per block, in the kernel layout
  // (blocks, Bt, G, L, N); fixed ones a per-sequence partial (Bt, Dm, N).
  auto grad_buffer = [&](const at::Tensor& x) {
    return x.dim() == 2 ? at::zeros({batch, dim, N}, acc_options)
                        : at::zeros({blocks, batch, groups, length, N}, acc_options);
  };
  at::Tensor dB_k = grad_buffer(B), dC_k = grad_buffer(C);
  at::Tensor du = at::empty({batch, dim, length}, acc_options);
  at::Tensor ddelta = at::empty({batch, dim, length}, acc_options);
  at::Tensor dz = z.has_value() ? at::empty({batch, dim, length}, acc_options) : at::empty({0}, acc_options);
  at::Tensor dA = at::zeros({batch, dim, N}, acc_options);
  at::Tensor dD = D.has_value() ? at::zeros({batch, dim}, acc_options) : at::Tensor();
  at::Tensor dbias = delta_bias.has_value() ? at::zeros({batch, dim}, acc_options) : at::Tensor();
  // an empty packed sequence passes d(last_state) on; the kernel writes every other row
  at::Tensor dinitial = grad_last.clone();

  AT_DISPATCH_FLOATING_TYPES(acc, "selective_scan_bwd_cpu", [&] {
    using acc_t = scalar_t;
    auto grad_operand = [&](at::Tensor& g) {
      if (g.dim() == 3) return StateOperand<acc_t>::per_sequence(g.data_ptr<acc_t>(), dim, N);
      StateOperand<acc_t> operand = StateOperand<acc_t>::variable(g.data_ptr<acc_t>(), groups, dim, length, N);
      operand.slot_stride = batch * groups * length * N;
      return operand;
    };
    const ScanBackward<acc_t> kernel{
        batch, dim, length, N,
        {u.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), cpu::data_or_null<acc_t>(z_acc), A_acc.data_ptr<acc_t>(),
         operand_of<acc_t>(B_k, dim, length), operand_of<acc_t>(C_k, dim, length), cpu::data_or_null<acc_t>(D_acc),
         cpu::data_or_null<acc_t>(bias), delta_softplus},
        {cpu::data_or_null<int64_t>(index), dim, length, N, cpu::data_or_null<acc_t>(h0), zeros.data_ptr<acc_t>()},
        checkpoints.data_ptr<acc_t>(),
        grad_out.data_ptr<acc_t>(), grad_last.data_ptr<acc_t>(), du.data_ptr<acc_t>(), ddelta.data_ptr<acc_t>(),
        cpu::data_or_null<acc_t>(dz), grad_operand(dB_k), grad_operand(dC_k), dA.data_ptr<acc_t>(),
        cpu::data_or_null<acc_t>(dD), cpu::data_or_null<acc_t>(dbias), dinitial.data_ptr<acc_t>()};
    at::parallel_for(0, batch * groups * blocks, 1, [&](int64_t first, int64_t last) {
      typename ScanBackward<acc_t>::Scratch scratch{std::vector<acc_t>((kChunk + 1) * N),
                                                     std::vector<acc_t>(kChunk * N), std::vector<acc_t>(kChunk)};
      std::vector<acc_t> h;
      for (int64_t task = first; task < last; ++task) {
        const int64_t block = task % blocks, pair = task / blocks;
        const int64_t g0 = (pair % groups) * channels_per_group;
        const int64_t d0 = g0 + channels_per_group * block / blocks;
        const int64_t d1 = g0 + channels_per_group * (block + 1) / blocks;
        h.resize((d1 - d0) * N);
        kernel.run(pair / groups, d0, d1, block, h.data(), scratch);
      }
    });
  });

  // Back to the contract's shapes: slots and sequences summed, variable B/C as (Bt, G, N, L);
  // an absent input gets its own empty tensor (outputs of a torch op must not alias).
  auto finish = [&](const at::Tensor& g) {
    return g.dim() == 3 ? g.sum(0) : g.sum(0).transpose(-1, -2).contiguous();
  };
  auto none = [&] { return at::empty({0}, acc_options); };
  return {du,
          ddelta,
          dA.sum(0),
          finish(dB_k),
          finish(dC_k),
          D.has_value() ? dD.sum(0) : none(),
          dz,
          delta_bias.has_value() ? dbias.sum(0) : none(),
          dinitial};
}

}  // namespace rnnkern
