// CPU kernels of Mamba-2's SSD chunk scan (rnnkern/ops/mamba_chunk_scan/reference.py states the
// contract). Per sequence b and head h, which reads group h / (H / G) of B and C, the state S is
// (P, N) and
//
//   S_t = e^{dt_t A_h} keep_t S_{t-1} + dt_t x_t B_t^T,   y_t = S_t C_t + D_h x_t,   out_t = y_t silu(z_t)
//
// with keep_t = 0 where seq_idx changes at t (a packed sequence starts from zeros), else 1.
//
// The kernels cut each chunk of chunk_size positions into tiles of at most kTile positions and
// run a tile as a few GEMMs (the SSD form). For a tile of q positions t0 .. t0 + q - 1 entered
// with the state S0, and cs_i = A_h (dt_{t0} + ... + dt_{t0+i}):
//
//   K_ij = e^{cs_i - cs_j} for j <= i in i's sequence, else 0       the decay from j to i (q, q)
//   e_i  = e^{cs_i} where S0's sequence still runs at i, else 0      the decay of S0 to i
//   w_j  = K_{q-1,j}                                                the decay from j to the end
//
//   Y  = [diag(e) C | (K o C B^T) diag(dt)] [S0^T ; X]     (q, n + q) (n + q, p): y_t before D, z
//   S1 = e_{q-1} S0 + X^T diag(w o dt) B                   (p, q) (q, n): the state leaving the tile
//
// Tasks own a block of the heads of one group of one sequence (HeadBlocks): the heads share the
// group's B, C and C B^T. Forward: each head carries S^T (n, p) through the tiles in order, copied
// out at each chunk's start (chunk_states). Backward: see ChunkScanBackward. Every GEMM is on fp32
// (fp64) tiles; fp16/bf16 inputs are converted as a tile is loaded.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../math/activations.h"
#include "../ops.h"
#include "gemm.h"
#include "row_groups.h"
#include "tensor_args.h"
#include "transpose.h"
#include "vectorized.h"

namespace rnnkern {
namespace {

// Positions per tile: the GEMMs' (q, q) scores and the state's (n, q) x (q, p) update balance
// at 64 for n = p = 64 (chunk_size only decides where the states are kept).
constexpr int64_t kTile = 64;

struct ScanDims {
  int64_t batch, length, heads, dim, groups, state, chunk;  // b, l, h, p, g, n, chunk_size

  int64_t chunks() const { return (length + chunk - 1) / chunk; }
  int64_t chunk_end(int64_t c) const { return std::min(length, (c + 1) * chunk); }
  // tiles of the longest chunk
  int64_t tiles_per_chunk() const { return (std::min(length, chunk) + kTile - 1) / kTile; }
  // the row of (b, t, head) in a (b, l, h, p) tensor; rows of successive t are heads * dim apart
  template <typename T>
  T* head_row(T* data, int64_t b, int64_t t, int64_t head) const {
    return data + ((b * length + t) * heads + head) * dim;
  }
  // the row of (b, t) of head's group in a (b, l, g, n) tensor; groups * state apart along t
  template <typename T>
  T* group_row(T* data, int64_t b, int64_t t, int64_t head) const {
    return data + ((b * length + t) * groups + head / (heads / groups)) * state;
  }
  // head's (p, n) state in a (b, [chunks,] h, p, n) tensor
  template <typename T>
  T* state_of(T* data, int64_t b, int64_t c, int64_t head, int64_t chunks_kept) const {
    return data + ((b * chunks_kept + c) * heads + head) * dim * state;
  }
};

// The inputs as both kernels read them: contiguous, x, B, C, z in scalar_t, the rest in acc_t.
template <typename scalar_t, typename acc_t>
struct ScanInputs {
  ScanDims dims;
  const scalar_t* x;        // (b, l, h, p)
  const acc_t* dt;          // (b, l, h)
  const acc_t* A;           // (h,)
  const scalar_t* B;        // (b, l, g, n)
  const scalar_t* C;        // (b, l, g, n)
  const acc_t* D;           // (h, p) or null
  const scalar_t* z;        // (b, l, h, p) or null
  const int32_t* seq_idx;   // (b, l) or null
};

// The decays of one tile: positions t0 .. t0 + q - 1 of head `head` of sequence b, in one chunk.
template <typename acc_t>
struct Tile {
  int64_t b, head, t0, q;
  acc_t dt[kTile];     // the time steps
  // A (dt_{t0} + ... + dt_{t0+i}), the log-decay from the tile's start through i, in double: the
  // decays are differences of these, which in fp32 lost |cs| ulps (a few e-6 at cs = -30)
  double cs[kTile];
  int32_t run[kTile];  // sequence starts at t0 .. t0 + i (t0 counts where one starts there)

  template <typename scalar_t>
  static Tile at(const ScanInputs<scalar_t, acc_t>& in, int64_t b, int64_t head, int64_t t0, int64_t q) {
    const ScanDims& d = in.dims;
    Tile t{b, head, t0, q, {}, {}, {}};
    const acc_t A = in.A[head];
    const int32_t* seq = in.seq_idx ? in.seq_idx + b * d.length : nullptr;
    double steps = 0;
    int32_t run = 0;
    for (int64_t i = 0; i < q; ++i) {
      const int64_t pos = t0 + i;
      t.dt[i] = in.dt[(b * d.length + pos) * d.heads + head];
      steps += t.dt[i];
      t.cs[i] = A * steps;
      run += seq && pos > 0 && seq[pos] != seq[pos - 1];
      t.run[i] = run;
    }
    return t;
  }

  acc_t entering(int64_t i) const { return run[i] == 0 ? decay(cs[i]) : acc_t(0); }               // e_i
  acc_t to_end(int64_t j) const { return run[j] == run[q - 1] ? decay(cs[q - 1] - cs[j]) : acc_t(0); }  // w_j
  static acc_t decay(double log_decay) { return math::exp(static_cast<acc_t>(log_decay)); }
};

// K_i. (q,): e^{cs_i - cs_j} for j <= i in i's sequence, else 0.
template <typename acc_t>
RNNKERN_VECTORIZED void decay_row(const Tile<acc_t>& t, int64_t i, acc_t* __restrict k) {
  const double cs_i = t.cs[i];
  const int32_t run_i = t.run[i];
#pragma omp simd
  for (int64_t j = 0; j <= i; ++j) k[j] = math::select(t.run[j] == run_i, Tile<acc_t>::decay(cs_i - t.cs[j]), acc_t(0));
  std::fill(k + i + 1, k + t.q, acc_t(0));
}

// dst (rows, cols) with leading dimension ld = src's rows, `stride` apart, as acc_t.
template <typename acc_t, typename scalar_t>
RNNKERN_VECTORIZED void load_rows(const scalar_t* __restrict src, int64_t stride, int64_t rows, int64_t cols,
                                  acc_t* __restrict dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = static_cast<acc_t>(src[r * stride + c]);
  }
}

template <typename T>
RNNKERN_VECTORIZED T dot(const T* __restrict a, const T* __restrict b, int64_t size) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < size; ++i) sum += a[i] * b[i];
  return sum;
}

// The tile's x rows (q, p), as acc_t.
template <typename scalar_t, typename acc_t>
void load_x(const ScanInputs<scalar_t, acc_t>& in, const Tile<acc_t>& t, acc_t* x) {
  const ScanDims& d = in.dims;
  load_rows(d.head_row(in.x, t.b, t.t0, t.head), d.heads * d.dim, t.q, d.dim, x, d.dim);
}

// B's rows t0 .. t0 + q - 1 of head's group (q, n) and B^T (n, kTile), as acc_t.
template <typename scalar_t, typename acc_t>
void load_b(const ScanInputs<scalar_t, acc_t>& in, int64_t b, int64_t head, int64_t t0, int64_t q, acc_t* b_rows,
            acc_t* bt) {
  const ScanDims& d = in.dims;
  load_rows(d.group_row(in.B, b, t0, head), d.groups * d.state, q, d.state, b_rows, d.state);
  cpu::transpose(b_rows, d.state, q, d.state, bt, kTile);
}

// C's rows t0 .. t0 + q - 1 of head's group (q, n), as acc_t.
template <typename scalar_t, typename acc_t>
void load_c(const ScanInputs<scalar_t, acc_t>& in, int64_t b, int64_t head, int64_t t0, int64_t q, acc_t* c) {
  const ScanDims& d = in.dims;
  load_rows(d.group_row(in.C, b, t0, head), d.groups * d.state, q, d.state, c, d.state);
}

// s1 (n, p) = e_{q-1} s0 + (B^T diag(w o dt)) X: the transposed state after the tile from the one
// before (s1 may be s0); bw (n, kTile) and update (n, p) are scratch.
template <typename acc_t>
void advance_state(const Tile<acc_t>& t, int64_t n, int64_t p, const acc_t* bt, acc_t* bw, const acc_t* x,
                   const acc_t* s0, acc_t* s1, acc_t* update) {
  acc_t weight[kTile];
  for (int64_t j = 0; j < t.q; ++j) weight[j] = t.to_end(j) * t.dt[j];
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t j = 0; j < t.q; ++j) bw[k * kTile + j] = bt[k * kTile + j] * weight[j];
  }
  cpu::gemm(n, p, t.q, bw, kTile, x, p, update, p);
  const acc_t decay = t.entering(t.q - 1);
  for (int64_t i = 0; i < n * p; ++i) s1[i] = decay * s0[i] + update[i];
}

// A task: heads [begin, end) of one group of sequence b. The heads share B, C and C B^T; their
// gradients of B and C go to the task's slot, summed over slots afterwards.
struct HeadBlock {
  int64_t b, begin, end, slot;
};

// The tasks: every group of every sequence split into `blocks` blocks of its heads, as many as
// the threads need.
struct HeadBlocks {
  int64_t groups, heads_per_group, blocks;

  explicit HeadBlocks(const ScanDims& d)
      : groups(d.groups), heads_per_group(d.heads / d.groups),
        blocks(cpu::blocks_per_pair(d.batch * d.groups, d.heads / d.groups)) {}

  int64_t max_heads() const { return (heads_per_group + blocks - 1) / blocks; }
  HeadBlock operator[](int64_t task) const {
    const int64_t block = task % blocks, pair = task / blocks, first = (pair % groups) * heads_per_group;
    return {pair / groups, first + heads_per_group * block / blocks, first + heads_per_group * (block + 1) / blocks,
            block};
  }
};

// ---------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, typename acc_t>
struct ChunkScanForward {
  ScanInputs<scalar_t, acc_t> in;
  const acc_t* initial_states;  // (b, h, p, n) or null (zeros)
  scalar_t* out;                // (b, l, h, p)
  acc_t* final_states;          // (b, h, p, n)
  acc_t* chunk_states;          // (b, chunks, h, p, n), or null when not kept

  struct Workspace {
    int64_t stack_size;
    std::vector<acc_t> stacks;  // per head of the task: [S^T ; X] (n + kTile, p), the state on the tile's x
    std::vector<acc_t> b, c;    // B and C rows (kTile, n)
    std::vector<acc_t> bt, bw;  // B^T, B^T diag(w o dt) (n, kTile)
    std::vector<acc_t> scores;  // C B^T (kTile, kTile)
    std::vector<acc_t> lhs;     // [diag(e) C | (K o C B^T) diag(dt)] (kTile, n + kTile)
    std::vector<acc_t> y;       // (kTile, p)
    std::vector<acc_t> update;  // (n, p)

    Workspace(const ScanDims& d, int64_t heads)
        : stack_size((d.state + kTile) * d.dim), stacks(heads * stack_size), b(kTile * d.state), c(kTile * d.state),
          bt(d.state * kTile), bw(d.state * kTile), scores(kTile * kTile), lhs(kTile * (d.state + kTile)),
          y(kTile * d.dim), update(d.state * d.dim) {}

    acc_t* stack(int64_t k) { return stacks.data() + k * stack_size; }
  };

  void run(const HeadBlock& task, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, chunks = d.chunks(), heads = task.end - task.begin;
    for (int64_t k = 0; k < heads; ++k) {
      if (initial_states) {
        cpu::transpose(d.state_of(initial_states, task.b, 0, task.begin + k, 1), n, p, n, w.stack(k), p);
      } else {
        std::fill_n(w.stack(k), n * p, acc_t(0));
      }
    }
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t k = 0; k < heads && chunk_states; ++k) {
        cpu::transpose(w.stack(k), p, n, p, d.state_of(chunk_states, task.b, c, task.begin + k, chunks), n);
      }
      for (int64_t t0 = c * d.chunk; t0 < d.chunk_end(c); t0 += kTile) {
        const int64_t q = std::min(kTile, d.chunk_end(c) - t0);
        load_b(in, task.b, task.begin, t0, q, w.b.data(), w.bt.data());
        load_c(in, task.b, task.begin, t0, q, w.c.data());
        cpu::gemm(q, q, n, w.c.data(), n, w.bt.data(), kTile, w.scores.data(), kTile);  // C B^T
        for (int64_t k = 0; k < heads; ++k) tile(Tile<acc_t>::at(in, task.b, task.begin + k, t0, q), w.stack(k), w);
      }
    }
    for (int64_t k = 0; k < heads; ++k) {
      cpu::transpose(w.stack(k), p, n, p, d.state_of(final_states, task.b, 0, task.begin + k, 1), n);
    }
  }

  // One head's tile: out at its positions, and its S^T (rows 0..n of stack) advanced past it.
  void tile(const Tile<acc_t>& t, acc_t* stack, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim, q = t.q, ld = n + kTile;
    acc_t* x = stack + n * p;
    load_x(in, t, x);
    for (int64_t i = 0; i < q; ++i) {
      weigh_row(t, i, w.c.data() + i * n, w.scores.data() + i * kTile, w.lhs.data() + i * ld);
    }
    cpu::gemm(q, p, n + q, w.lhs.data(), ld, stack, p, w.y.data(), p);  // Y
    write_out(t, w.y.data(), x);
    advance_state(t, n, p, w.bt.data(), w.bw.data(), x, stack, stack, w.update.data());
  }

  // Row i of lhs: e_i C_i, then (C B^T)_i. o K_i. o dt.
  RNNKERN_VECTORIZED void weigh_row(const Tile<acc_t>& t, int64_t i, const acc_t* __restrict c,
                                    const acc_t* __restrict scores, acc_t* __restrict row) const {
    const int64_t n = in.dims.state;
    acc_t k[kTile];
    decay_row(t, i, k);
    acc_t* __restrict weighted = row + n;
#pragma omp simd
    for (int64_t j = 0; j < t.q; ++j) weighted[j] = scores[j] * k[j] * t.dt[j];
    const acc_t e = t.entering(i);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = e * c[j];
  }

  // out = (y + D x) silu(z) at the tile's positions; y is scratch.
  void write_out(const Tile<acc_t>& t, acc_t* y, const acc_t* x) const {
    const ScanDims& d = in.dims;
    const int64_t p = d.dim;
    for (int64_t i = 0; i < t.q; ++i) {
      const scalar_t* z = in.z ? d.head_row(in.z, t.b, t.t0 + i, t.head) : nullptr;
      finish_row(y + i * p, x + i * p, in.D ? in.D + t.head * p : nullptr, z, d.head_row(out, t.b, t.t0 + i, t.head),
                 p);
    }
  }

  static RNNKERN_VECTORIZED void finish_row(acc_t* __restrict y, const acc_t* __restrict x,
                                            const acc_t* __restrict skip, const scalar_t* __restrict z,
                                            scalar_t* __restrict out_row, int64_t p) {
    if (skip) {
#pragma omp simd
      for (int64_t k = 0; k < p; ++k) y[k] += skip[k] * x[k];
    }
    if (z) {
#pragma omp simd
      for (int64_t k = 0; k < p; ++k) y[k] *= math::silu(static_cast<acc_t>(z[k]));
    }
#pragma omp simd
    for (int64_t k = 0; k < p; ++k) out_row[k] = static_cast<scalar_t>(y[k]);
  }
};

// ---------------------------------------------------------------------------------------
// Backward. A task walks its heads' chunks last to first: it recomputes the states entering the
// chunk's tiles from the kept chunk state, then runs the tiles backwards, each head carrying dS,
// the gradient of the state leaving the tile. With gy = dout silu(z), P = GY X^T (q, q) and
// M = K o C B^T:
//
//   dG  = K o P diag(dt)                          the gradient of C B^T
//   dC  = diag(e) GY S0 + dG B                     (q, p) (p, n) + (q, q) (q, n)
//   dB  = [diag(w o dt) X | dG^T] [dS ; C]         (q, p + q) (p + q, n)
//   U   = diag(w) B dS^T + M^T GY                  (q, n) (n, p) + (q, q) (q, p):  dx = diag(dt) U + D gy
//   dS0 = e_{q-1} dS + C^T diag(e) GY              becomes dS of the tile before
//
// and through the decays ddt_j = x_j . U_j + A g_j, dA = sum_j dt_j g_j, where g_j = sum_{i >= j}
// d(loss)/d(cs_i) is summed from its parts through K, e and w (position_gradients). (As the
// difference C_i . dC_i - B_i . dB_i of two GEMM results it lost four digits in fp32.)

template <typename scalar_t, typename acc_t>
struct ChunkScanBackward {
  ScanInputs<scalar_t, acc_t> in;
  const acc_t* chunk_states;       // (b, chunks, h, p, n)
  const scalar_t* grad_out;        // (b, l, h, p)
  const acc_t* grad_final_states;  // (b, h, p, n)
  acc_t* dx;                       // (b, l, h, p)
  acc_t* ddt;                      // (b, l, h)
  acc_t* dz;                       // (b, l, h, p) or null
  acc_t* dB;                       // (slots, b, l, g, n), zeroed
  acc_t* dC;                       // (slots, b, l, g, n), zeroed
  int64_t slot_size;               // b * l * g * n
  acc_t* dA;                       // (b, h), zeroed: summed over b afterwards
  acc_t* dD;                       // (b, h, p) zeroed, or null
  acc_t* dinitial_states;          // (b, h, p, n) or null

  struct Workspace {
    int64_t tiles_per_chunk, state_size;
    std::vector<Tile<acc_t>> tiles;  // (heads, tiles_per_chunk): the chunk's tiles of each head of the task
    std::vector<acc_t> states;       // (heads, tiles_per_chunk, n, p): S^T entering each tile
    std::vector<acc_t> state_grads;  // (heads, n, p): dS^T
    // shared by the heads
    std::vector<acc_t> s_b;          // [S0 ; B]    (p + kTile, n)
    std::vector<acc_t> ds_c;         // [dS ; C]    (p + kTile, n)
    std::vector<acc_t> bt, bw;       // B^T, B^T diag(w o dt) (n, kTile)
    std::vector<acc_t> ct;           // C^T (n, kTile)
    std::vector<acc_t> scores;       // C B^T (kTile, kTile)
    // one head's, in turn
    std::vector<acc_t> s_x;          // [S0^T ; X]  (n + kTile, p)
    std::vector<acc_t> ds_gy;        // [dS^T ; GY] (n + kTile, p)
    std::vector<acc_t> cet;          // (diag(e) C)^T (n, kTile)
    std::vector<acc_t> xt;           // X^T (p, kTile)
    std::vector<acc_t> decayed;      // M (kTile, kTile)
    std::vector<acc_t> products;     // P (kTile, kTile)
    std::vector<acc_t> lhs_c, lhs_b;  // (kTile, p + kTile)
    std::vector<acc_t> lhs_x, lhs_y;  // (kTile, n + kTile); lhs_y: Y's, for dz
    std::vector<acc_t> d_c, d_b;     // the head's dC, dB (kTile, n)
    std::vector<acc_t> c_entering;   // dC's part diag(e) GY S0 (kTile, n)
    std::vector<acc_t> u, y, dout;   // (kTile, p)
    std::vector<acc_t> u_leaving;    // U's part diag(w) B dS^T (kTile, p)
    std::vector<acc_t> within;       // the decay gradient through K (kTile,), straddling_sums
    std::vector<acc_t> update;       // (n, p)

    Workspace(const ScanDims& d, int64_t heads)
        : tiles_per_chunk(d.tiles_per_chunk()), state_size(d.state * d.dim), tiles(heads * tiles_per_chunk),
          states(heads * tiles_per_chunk * state_size), state_grads(heads * state_size),
          s_b((d.dim + kTile) * d.state), ds_c((d.dim + kTile) * d.state), bt(d.state * kTile),
          bw(d.state * kTile), ct(d.state * kTile), scores(kTile * kTile), s_x((d.state + kTile) * d.dim),
          ds_gy((d.state + kTile) * d.dim), cet(d.state * kTile), xt(d.dim * kTile), decayed(kTile * kTile),
          products(kTile * kTile), lhs_c(kTile * (d.dim + kTile)), lhs_b(kTile * (d.dim + kTile)),
          lhs_x(kTile * (d.state + kTile)), lhs_y(kTile * (d.state + kTile)), d_c(kTile * d.state),
          d_b(kTile * d.state), c_entering(kTile * d.state), u(kTile * d.dim), y(kTile * d.dim),
          dout(kTile * d.dim), u_leaving(kTile * d.dim), within(kTile), update(state_size) {}

    Tile<acc_t>& tile(int64_t head, int64_t k) { return tiles[head * tiles_per_chunk + k]; }
    acc_t* state(int64_t head, int64_t k) { return states.data() + (head * tiles_per_chunk + k) * state_size; }
    acc_t* state_grad(int64_t head) { return state_grads.data() + head * state_size; }
  };

  void run(const HeadBlock& task, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, heads = task.end - task.begin;
    for (int64_t k = 0; k < heads; ++k) {
      cpu::transpose(d.state_of(grad_final_states, task.b, 0, task.begin + k, 1), n, p, n, w.state_grad(k), p);
    }
    for (int64_t c = d.chunks() - 1; c >= 0; --c) {
      for (int64_t k = recompute_states(task, c, w) - 1; k >= 0; --k) {
        const int64_t t0 = w.tile(0, k).t0, q = w.tile(0, k).q;
        acc_t* c_rows = w.ds_c.data() + p * n;
        load_b(in, task.b, task.begin, t0, q, w.s_b.data() + p * n, w.bt.data());
        load_c(in, task.b, task.begin, t0, q, c_rows);
        cpu::transpose(c_rows, n, q, n, w.ct.data(), kTile);
        cpu::gemm(q, q, n, c_rows, n, w.bt.data(), kTile, w.scores.data(), kTile);  // C B^T
        for (int64_t h = 0; h < heads; ++h) {
          tile(w.tile(h, k), w.state(h, k), w.state_grad(h), task.slot, w);
        }
      }
    }
    for (int64_t k = 0; k < heads && dinitial_states; ++k) {
      cpu::transpose(w.state_grad(k), p, n, p, d.state_of(dinitial_states, task.b, 0, task.begin + k, 1), n);
    }
  }

  // Chunk c's tiles of every head into w.tiles, the states entering them into w.states; returns
  // the chunk's tile count.
  int64_t recompute_states(const HeadBlock& task, int64_t c, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, heads = task.end - task.begin;
    for (int64_t h = 0; h < heads; ++h) {
      cpu::transpose(d.state_of(chunk_states, task.b, c, task.begin + h, d.chunks()), n, p, n, w.state(h, 0), p);
    }
    acc_t* x = w.s_x.data() + n * p;
    const int64_t start = c * d.chunk, end = d.chunk_end(c), tiles = (end - start + kTile - 1) / kTile;
    for (int64_t k = 0; k < tiles; ++k) {
      const int64_t t0 = start + k * kTile, q = std::min(kTile, end - t0);
      const bool last = k == tiles - 1;  // the state leaving it is not needed
      if (!last) load_b(in, task.b, task.begin, t0, q, w.s_b.data() + p * n, w.bt.data());
      for (int64_t h = 0; h < heads; ++h) {
        const Tile<acc_t>& t = w.tile(h, k) = Tile<acc_t>::at(in, task.b, task.begin + h, t0, q);
        if (last) continue;
        load_x(in, t, x);
        advance_state(t, n, p, w.bt.data(), w.bw.data(), x, w.state(h, k), w.state(h, k + 1), w.update.data());
      }
    }
    return tiles;
  }

  // One head's tile: s0t (n, p) the transposed state entering it, ds_t (n, p) the gradient of the
  // one leaving it, replaced by the gradient of the one entering it.
  void tile(const Tile<acc_t>& t, const acc_t* s0t, acc_t* ds_t, int64_t slot, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim;
    load(t, s0t, ds_t, w);
    score_gradients(t, w);
    if (in.z) gate_gradient(t, w);
    const acc_t carried = t.entering(t.q - 1) * dot(ds_t, s0t, n * p);  // e_{q-1} <dS, S0>
    matrix_gradients(t, w);
    position_gradients(t, carried, w);
    add_group_gradients(t, slot, w);
    carry_state_gradient(t, ds_t, w);
  }

  // The head's rows into the stacks: X (and X^T), S0^T (for dz) and S0, dS^T and dS, gy = dout silu(z)
  // (dout itself with z).
  void load(const Tile<acc_t>& t, const acc_t* s0t, const acc_t* ds_t, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, q = t.q;
    acc_t* x = w.s_x.data() + n * p;
    load_x(in, t, x);
    cpu::transpose(x, p, q, p, w.xt.data(), kTile);
    if (in.z) std::copy_n(s0t, n * p, w.s_x.data());
    cpu::transpose(s0t, p, n, p, w.s_b.data(), n);
    std::copy_n(ds_t, n * p, w.ds_gy.data());
    cpu::transpose(ds_t, p, n, p, w.ds_c.data(), n);
    acc_t* gy = w.ds_gy.data() + n * p;
    load_rows(d.head_row(grad_out, t.b, t.t0, t.head), d.heads * p, q, p, in.z ? w.dout.data() : gy, p);
    for (int64_t i = 0; i < q && in.z; ++i) {
      gate_row(d.head_row(in.z, t.b, t.t0 + i, t.head), w.dout.data() + i * p, gy + i * p, p);
    }
  }

  // gy = dout silu(z) for one position.
  static RNNKERN_VECTORIZED void gate_row(const scalar_t* __restrict z, const acc_t* __restrict dout,
                                          acc_t* __restrict gy, int64_t p) {
#pragma omp simd
    for (int64_t k = 0; k < p; ++k) gy[k] = dout[k] * math::silu(static_cast<acc_t>(z[k]));
  }

  // P = GY X^T, then lhs_c's dG, lhs_b's dG^T, lhs_x's M^T, lhs_y's M diag(dt), and the decay
  // gradient through K.
  void score_gradients(const Tile<acc_t>& t, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim, q = t.q;
    cpu::gemm(q, q, p, w.ds_gy.data() + n * p, p, w.xt.data(), kTile, w.products.data(), kTile);
    for (int64_t i = 0; i < q; ++i) {
      score_gradient_row(t, i, w.scores.data() + i * kTile, w.products.data() + i * kTile,
                         w.decayed.data() + i * kTile, w.lhs_c.data() + i * (p + kTile) + p,
                         w.lhs_y.data() + i * (n + kTile) + n);
    }
    straddling_sums(q, w.lhs_c.data() + p, p + kTile, w.scores.data(), w.within.data());
    cpu::transpose(w.decayed.data(), kTile, q, q, w.lhs_x.data() + n, n + kTile);
    cpu::transpose(w.lhs_c.data() + p, p + kTile, q, q, w.lhs_b.data() + p, p + kTile);
  }

  // Row i: m = K_i. o (C B^T)_i., dg = K_i. o P_i. o dt, m_dt = m o dt.
  static RNNKERN_VECTORIZED void score_gradient_row(const Tile<acc_t>& t, int64_t i, const acc_t* __restrict scores,
                                                    const acc_t* __restrict products, acc_t* __restrict m,
                                                    acc_t* __restrict dg, acc_t* __restrict m_dt) {
    acc_t k[kTile];
    decay_row(t, i, k);
#pragma omp simd
    for (int64_t j = 0; j < t.q; ++j) {
      m[j] = k[j] * scores[j];
      m_dt[j] = m[j] * t.dt[j];
      dg[j] = k[j] * products[j] * t.dt[j];
    }
  }

  // through_k_j = sum_{i >= j > k} Z_ik for Z = dG o C B^T (dG's rows ld apart): the gradient of
  // sum_{i >= j} cs_i through K, the pairs that straddle j. (Summing rows minus columns of Z
  // instead cancels the pairs on one side of j, and lost three digits in fp32.)
  static RNNKERN_VECTORIZED void straddling_sums(int64_t q, const acc_t* __restrict dg, int64_t ld,
                                                 const acc_t* __restrict scores, acc_t* __restrict through_k) {
    acc_t below[kTile] = {};  // below[k] = sum_{i >= j} Z_ik
    for (int64_t j = q - 1; j >= 0; --j) {
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < j; ++k) {
        below[k] += dg[j * ld + k] * scores[j * kTile + k];
        sum += below[k];
      }
      through_k[j] = sum;
    }
  }

  // dz = dout (y + D x) silu'(z), y recomputed as the forward does: [diag(e) C | M diag(dt)] [S0^T ; X].
  void gate_gradient(const Tile<acc_t>& t, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, q = t.q, ld = n + kTile;
    const acc_t* c = w.ds_c.data() + p * n;
    for (int64_t i = 0; i < q; ++i) scaled_copy(c + i * n, t.entering(i), n, w.lhs_y.data() + i * ld);
    cpu::gemm(q, p, n + q, w.lhs_y.data(), ld, w.s_x.data(), p, w.y.data(), p);
    const acc_t* x = w.s_x.data() + n * p;
    const acc_t* skip = in.D ? in.D + t.head * p : nullptr;
    for (int64_t i = 0; i < q; ++i) {
      gate_gradient_row(d.head_row(in.z, t.b, t.t0 + i, t.head), w.dout.data() + i * p, w.y.data() + i * p,
                        x + i * p, skip, d.head_row(dz, t.b, t.t0 + i, t.head), p);
    }
  }

  static RNNKERN_VECTORIZED void gate_gradient_row(const scalar_t* __restrict z, const acc_t* __restrict dout,
                                                   const acc_t* __restrict y, const acc_t* __restrict x,
                                                   const acc_t* __restrict skip, acc_t* __restrict dz_row,
                                                   int64_t p) {
#pragma omp simd
    for (int64_t k = 0; k < p; ++k) {
      const acc_t z_k = static_cast<acc_t>(z[k]), gate = math::sigmoid(z_k);
      const acc_t value = y[k] + (skip ? skip[k] * x[k] : acc_t(0));
      dz_row[k] = dout[k] * value * gate * (acc_t(1) + z_k * (acc_t(1) - gate));
    }
  }

  // The left columns of lhs_c, lhs_b, lhs_x and (diag(e) C)^T, then dC and U in their two parts
  // (c_entering = diag(e) GY S0, u_leaving = diag(w) B dS^T, added in position_gradients) and dB.
  void matrix_gradients(const Tile<acc_t>& t, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim, q = t.q;
    const acc_t* x = w.s_x.data() + n * p;
    const acc_t* b_rows = w.s_b.data() + p * n;
    const acc_t* gy = w.ds_gy.data() + n * p;
    acc_t e[kTile];
    for (int64_t i = 0; i < q; ++i) {
      const acc_t to_end = t.to_end(i);
      e[i] = t.entering(i);
      scaled_copy(gy + i * p, e[i], p, w.lhs_c.data() + i * (p + kTile));
      scaled_copy(x + i * p, to_end * t.dt[i], p, w.lhs_b.data() + i * (p + kTile));
      scaled_copy(b_rows + i * n, to_end, n, w.lhs_x.data() + i * (n + kTile));
    }
    for (int64_t k = 0; k < n; ++k) scale_columns(w.ct.data() + k * kTile, e, q, w.cet.data() + k * kTile);
    cpu::gemm(q, n, p, w.lhs_c.data(), p + kTile, w.s_b.data(), n, w.c_entering.data(), n);
    cpu::gemm(q, n, q, w.lhs_c.data() + p, p + kTile, b_rows, n, w.d_c.data(), n);           // dG B
    cpu::gemm(q, n, p + q, w.lhs_b.data(), p + kTile, w.ds_c.data(), n, w.d_b.data(), n);   // dB
    cpu::gemm(q, p, n, w.lhs_x.data(), n + kTile, w.ds_gy.data(), p, w.u_leaving.data(), p);
    cpu::gemm(q, p, q, w.lhs_x.data() + n, n + kTile, gy, p, w.u.data(), p);                 // M^T GY
  }

  static RNNKERN_VECTORIZED void scale_columns(const acc_t* __restrict src, const acc_t* __restrict scale,
                                               int64_t size, acc_t* __restrict dst) {
#pragma omp simd
    for (int64_t k = 0; k < size; ++k) dst[k] = scale[k] * src[k];
  }

  static RNNKERN_VECTORIZED void scaled_copy(const acc_t* __restrict src, acc_t scale, int64_t size,
                                             acc_t* __restrict dst) {
#pragma omp simd
    for (int64_t k = 0; k < size; ++k) dst[k] = scale * src[k];
  }

  // dx, ddt, the tile's share of dA and dD, and dC, U made whole. The gradient of the log-decay
  // at j, sum_{i >= j} dcs_i, is summed in three parts, each free of the others' cancellation:
  //   through K:  within_j (straddling_sums)
  //   through e:  sum_{i >= j} e_i gy_i . (S0 C_i) = C_i . c_entering_i
  //   through w:  e_{q-1} <dS, S0> + sum_{i < j} V_i,   V_i = dt_i x_i . u_leaving_i
  void position_gradients(const Tile<acc_t>& t, acc_t carried, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, q = t.q;
    const acc_t* x = w.s_x.data() + n * p;
    const acc_t* c = w.ds_c.data() + p * n;
    const acc_t* gy = w.ds_gy.data() + n * p;
    const acc_t* skip = in.D ? in.D + t.head * p : nullptr;
    acc_t* d_skip = dD ? dD + (t.b * d.heads + t.head) * p : nullptr;
    acc_t later[kTile];  // the parts through K and e
    acc_t sum = 0;       // the part through e
    for (int64_t i = q - 1; i >= 0; --i) {
      const acc_t* entering = w.c_entering.data() + i * n;
      sum += dot(c + i * n, entering, n);
      later[i] = w.within[i] + sum;
      add(entering, n, w.d_c.data() + i * n);
    }
    const acc_t A = in.A[t.head];
    acc_t leaving = carried, d_A = 0;
    for (int64_t j = 0; j < q; ++j) {
      const acc_t d_log_decay = later[j] + leaving;
      const acc_t* u_leaving = w.u_leaving.data() + j * p;
      acc_t* u = w.u.data() + j * p;
      leaving += t.dt[j] * dot(x + j * p, u_leaving, p);
      add(u_leaving, p, u);
      ddt[(t.b * d.length + t.t0 + j) * d.heads + t.head] = dot(x + j * p, u, p) + A * d_log_decay;
      d_A += t.dt[j] * d_log_decay;
      input_gradient_row(u, t.dt[j], gy + j * p, x + j * p, skip, d_skip, d.head_row(dx, t.b, t.t0 + j, t.head), p);
    }
    dA[t.b * d.heads + t.head] += d_A;
  }

  // dx = dt u + D gy, dD += gy x for one position.
  static RNNKERN_VECTORIZED void input_gradient_row(const acc_t* __restrict u, acc_t dt, const acc_t* __restrict gy,
                                                    const acc_t* __restrict x, const acc_t* __restrict skip,
                                                    acc_t* __restrict d_skip, acc_t* __restrict dx_row, int64_t p) {
    if (skip) {
#pragma omp simd
      for (int64_t k = 0; k < p; ++k) {
        dx_row[k] = dt * u[k] + skip[k] * gy[k];
        d_skip[k] += gy[k] * x[k];
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < p; ++k) dx_row[k] = dt * u[k];
    }
  }

  // The head's dB, dC into the task's slot of its group's rows.
  void add_group_gradients(const Tile<acc_t>& t, int64_t slot, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state;
    for (int64_t i = 0; i < t.q; ++i) {
      add(w.d_b.data() + i * n, n, d.group_row(dB + slot * slot_size, t.b, t.t0 + i, t.head));
      add(w.d_c.data() + i * n, n, d.group_row(dC + slot * slot_size, t.b, t.t0 + i, t.head));
    }
  }

  static RNNKERN_VECTORIZED void add(const acc_t* __restrict src, int64_t size, acc_t* __restrict dst) {
#pragma omp simd
    for (int64_t k = 0; k < size; ++k) dst[k] += src[k];
  }

  // ds_t <- e_{q-1} ds_t + ((diag(e) C)^T GY): the gradient of the state entering the tile.
  void carry_state_gradient(const Tile<acc_t>& t, acc_t* ds_t, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim;
    cpu::gemm(n, p, t.q, w.cet.data(), kTile, w.ds_gy.data() + n * p, p, w.update.data(), p);
    const acc_t decay = t.entering(t.q - 1);
    for (int64_t i = 0; i < n * p; ++i) ds_t[i] = decay * ds_t[i] + w.update[i];
  }
};

// ---------------------------------------------------------------------------------------
// Host side.

ScanDims check_inputs(const char* op, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                      const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                      const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& initial_states,
                      const std::optional<at::Tensor>& seq_idx, int64_t chunk_size) {
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (b, l, h, p), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  const int64_t batch = x.size(0), length = x.size(1), heads = x.size(2), dim = x.size(3);
  const auto acc = at::toOpMathType(x.scalar_type());
  cpu::check_tensor(op, "dt", dt, {batch, length, heads}, acc);
  cpu::check_tensor(op, "A", A, {heads}, acc);
  TORCH_CHECK(B.dim() == 4 && B.size(0) == batch && B.size(1) == length && B.size(2) > 0 && heads % B.size(2) == 0,
              op, ": B must have shape (", batch, ", ", length, ", g, n) with g dividing h = ", heads, ", got ",
              B.sizes());
  cpu::check_dtype(op, "B", B, x.scalar_type());
  cpu::check_tensor(op, "C", C, B.sizes(), x.scalar_type());
  const int64_t n = B.size(3);
  cpu::check_optional(op, "D", D, {heads, dim}, acc);
  cpu::check_optional(op, "z", z, x.sizes(), x.scalar_type());
  cpu::check_optional(op, "initial_states", initial_states, {batch, heads, dim, n}, acc);
  cpu::check_optional(op, "seq_idx", seq_idx, {batch, length}, at::kInt);
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  return {batch, length, heads, dim, B.size(2), n, chunk_size};
}

// The inputs made contiguous, held while the kernels read them.
struct ContiguousInputs {
  at::Tensor x, dt, A, B, C, D, z, seq_idx;

  ContiguousInputs(const at::Tensor& x_in, const at::Tensor& dt_in, const at::Tensor& A_in, const at::Tensor& B_in,
                   const at::Tensor& C_in, const std::optional<at::Tensor>& D_in,
                   const std::optional<at::Tensor>& z_in, const std::optional<at::Tensor>& seq_idx_in)
      : x(x_in.contiguous()), dt(dt_in.contiguous()), A(A_in.contiguous()), B(B_in.contiguous()),
        C(C_in.contiguous()), D(cpu::contiguous_or_undefined(D_in)), z(cpu::contiguous_or_undefined(z_in)),
        seq_idx(cpu::contiguous_or_undefined(seq_idx_in)) {}

  template <typename scalar_t, typename acc_t>
  ScanInputs<scalar_t, acc_t> view(const ScanDims& dims) const {
    return {dims, x.data_ptr<scalar_t>(), dt.data_ptr<acc_t>(), A.data_ptr<acc_t>(), B.data_ptr<scalar_t>(),
            C.data_ptr<scalar_t>(), cpu::data_or_null<acc_t>(D), cpu::data_or_null<scalar_t>(z),
            cpu::data_or_null<int32_t>(seq_idx)};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mamba_chunk_scan_fwd_cpu(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& initial_states, const std::optional<at::Tensor>& seq_idx, int64_t chunk_size,
    bool keep_chunk_states) {
  const ScanDims dims = check_inputs("mamba_chunk_scan_fwd", x, dt, A, B, C, D, z, initial_states, seq_idx,
                                     chunk_size);
  const ContiguousInputs inputs(x, dt, A, B, C, D, z, seq_idx);
  const at::Tensor h0 = cpu::contiguous_or_undefined(initial_states);
  const auto acc_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor final_states = at::empty({dims.batch, dims.heads, dims.dim, dims.state}, acc_options);
  at::Tensor chunk_states =
      keep_chunk_states ? at::empty({dims.batch, dims.chunks(), dims.heads, dims.dim, dims.state}, acc_options)
                        : at::empty({0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mamba_chunk_scan_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Kernel = ChunkScanForward<scalar_t, acc_t>;
    const Kernel kernel{inputs.view<scalar_t, acc_t>(dims), cpu::data_or_null<acc_t>(h0), out.data_ptr<scalar_t>(),
                        final_states.data_ptr<acc_t>(),
                        keep_chunk_states ? chunk_states.data_ptr<acc_t>() : nullptr};
    const HeadBlocks tasks(dims);
    at::parallel_for(0, dims.batch * dims.groups * tasks.blocks, 1, [&](int64_t first, int64_t last) {
      typename Kernel::Workspace workspace(dims, tasks.max_heads());
      for (int64_t task = first; task < last; ++task) kernel.run(tasks[task], workspace);
    });
  });
  return {out, final_states, chunk_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mamba_chunk_scan_bwd_cpu(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& initial_states,
                         const std::optional<at::Tensor>& seq_idx, int64_t chunk_size,
                         const at::Tensor& chunk_states_in, const at::Tensor& grad_out_in,
                         const at::Tensor& grad_final_states_in) {
  constexpr const char* op = "mamba_chunk_scan_bwd";
  const ScanDims dims = check_inputs(op, x, dt, A, B, C, D, z, initial_states, seq_idx, chunk_size);
  const int64_t batch = dims.batch, length = dims.length, heads = dims.heads, groups = dims.groups;
  const auto acc = at::toOpMathType(x.scalar_type());
  const std::vector<int64_t> states = {batch, heads, dims.dim, dims.state};
  cpu::check_tensor(op, "chunk_states", chunk_states_in, {batch, dims.chunks(), heads, dims.dim, dims.state}, acc);
  cpu::check_tensor(op, "grad_out", grad_out_in, x.sizes(), x.scalar_type());
  cpu::check_tensor(op, "grad_final_states", grad_final_states_in, states, acc);
  const ContiguousInputs inputs(x, dt, A, B, C, D, z, seq_idx);
  const at::Tensor chunk_states = chunk_states_in.contiguous(), grad_out = grad_out_in.contiguous();
  const at::Tensor grad_final_states = grad_final_states_in.contiguous();

  const HeadBlocks tasks(dims);
  const auto options = x.options().dtype(acc);
  auto none = [&] { return at::empty({0}, options); };
  at::Tensor dB = at::zeros({tasks.blocks, batch, length, groups, dims.state}, options);
  at::Tensor dC = at::zeros({tasks.blocks, batch, length, groups, dims.state}, options);
  at::Tensor dx = at::empty(x.sizes(), options), ddt = at::empty({batch, length, heads}, options);
  at::Tensor dz = z.has_value() ? at::empty(x.sizes(), options) : none();
  at::Tensor dA = at::zeros({batch, heads}, options);
  at::Tensor dD = D.has_value() ? at::zeros({batch, heads, dims.dim}, options) : at::Tensor();
  at::Tensor dinitial = initial_states.has_value() ? at::empty(states, options) : none();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mamba_chunk_scan_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Kernel = ChunkScanBackward<scalar_t, acc_t>;
    const Kernel kernel{inputs.view<scalar_t, acc_t>(dims), chunk_states.data_ptr<acc_t>(),
                        grad_out.data_ptr<scalar_t>(), grad_final_states.data_ptr<acc_t>(), dx.data_ptr<acc_t>(),
                        ddt.data_ptr<acc_t>(), cpu::data_or_null<acc_t>(dz), dB.data_ptr<acc_t>(),
                        dC.data_ptr<acc_t>(), batch * length * groups * dims.state, dA.data_ptr<acc_t>(),
                        cpu::data_or_null<acc_t>(dD),
                        initial_states.has_value() ? dinitial.data_ptr<acc_t>() : nullptr};
    at::parallel_for(0, batch * groups * tasks.blocks, 1, [&](int64_t first, int64_t last) {
      typename Kernel::Workspace workspace(dims, tasks.max_heads());
      for (int64_t task = first; task < last; ++task) kernel.run(tasks[task], workspace);
    });
  });
  return {dx, ddt, dA.sum(0), dB.sum(0), dC.sum(0), D.has_value() ? dD.sum(0) : none(), dz, dinitial};
}

}  // namespace rnnkern
