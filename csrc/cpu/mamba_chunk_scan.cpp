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
// Forward: one task per (b, h) carries S^T (n, p) through the tiles in order and copies it out
// at each chunk's start (chunk_states). Backward: see ChunkScanBackward. Every GEMM is on fp32
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
  acc_t steps[kTile];  // dt_{t0} + ... + dt_{t0+i}
  acc_t cs[kTile];     // A steps_i: the log-decay from the tile's start through i
  int32_t run[kTile];  // sequence starts at t0 .. t0 + i (t0 counts where one starts there)

  template <typename scalar_t>
  static Tile at(const ScanInputs<scalar_t, acc_t>& in, int64_t b, int64_t head, int64_t t0, int64_t q) {
    const ScanDims& d = in.dims;
    Tile t{b, head, t0, q, {}, {}, {}, {}};
    const acc_t A = in.A[head];
    const int32_t* seq = in.seq_idx ? in.seq_idx + b * d.length : nullptr;
    acc_t steps = 0;
    int32_t run = 0;
    for (int64_t i = 0; i < q; ++i) {
      const int64_t pos = t0 + i;
      t.dt[i] = in.dt[(b * d.length + pos) * d.heads + head];
      steps += t.dt[i];
      t.steps[i] = steps;
      t.cs[i] = A * steps;
      run += seq && pos > 0 && seq[pos] != seq[pos - 1];
      t.run[i] = run;
    }
    return t;
  }

  acc_t entering(int64_t i) const { return run[i] == 0 ? math::exp(cs[i]) : acc_t(0); }         // e_i
  acc_t to_end(int64_t j) const { return run[j] == run[q - 1] ? math::exp(cs[q - 1] - cs[j]) : acc_t(0); }  // w_j
};

// K_i. (q,): e^{cs_i - cs_j} for j <= i in i's sequence, else 0.
template <typename acc_t>
RNNKERN_VECTORIZED void decay_row(const Tile<acc_t>& t, int64_t i, acc_t* __restrict k) {
  const acc_t cs_i = t.cs[i];
  const int32_t run_i = t.run[i];
#pragma omp simd
  for (int64_t j = 0; j <= i; ++j) k[j] = math::select(t.run[j] == run_i, math::exp(cs_i - t.cs[j]), acc_t(0));
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

// dst (cols, rows) = src (rows, cols)^T, leading dimensions ld_src and ld_dst.
template <typename T>
void transpose(const T* __restrict src, int64_t ld_src, int64_t rows, int64_t cols, T* __restrict dst,
               int64_t ld_dst) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

template <typename T>
RNNKERN_VECTORIZED T dot(const T* __restrict a, const T* __restrict b, int64_t size) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < size; ++i) sum += a[i] * b[i];
  return sum;
}

// The tile's x rows (q, p) and B^T (n, kTile), as acc_t; b_rows (q, n) is B's rows on the way.
template <typename scalar_t, typename acc_t>
void load_x_and_bt(const ScanInputs<scalar_t, acc_t>& in, const Tile<acc_t>& t, acc_t* x, acc_t* b_rows,
                   acc_t* bt) {
  const ScanDims& d = in.dims;
  load_rows(d.head_row(in.x, t.b, t.t0, t.head), d.heads * d.dim, t.q, d.dim, x, d.dim);
  load_rows(d.group_row(in.B, t.b, t.t0, t.head), d.groups * d.state, t.q, d.state, b_rows, d.state);
  transpose(b_rows, d.state, t.q, d.state, bt, kTile);
}

// The tile's C rows (q, n), as acc_t.
template <typename scalar_t, typename acc_t>
void load_c(const ScanInputs<scalar_t, acc_t>& in, const Tile<acc_t>& t, acc_t* c) {
  const ScanDims& d = in.dims;
  load_rows(d.group_row(in.C, t.b, t.t0, t.head), d.groups * d.state, t.q, d.state, c, d.state);
}

// s1 (n, p) = e_{q-1} s0 + (B^T diag(w o dt)) X: the transposed state after the tile, from the one
// before (s1 may be s0); bt (n, kTile) is scaled in place, update (n, p) is scratch.
template <typename acc_t>
void advance_state(const Tile<acc_t>& t, int64_t n, int64_t p, acc_t* bt, const acc_t* x, const acc_t* s0,
                   acc_t* s1, acc_t* update) {
  acc_t weight[kTile];
  for (int64_t j = 0; j < t.q; ++j) weight[j] = t.to_end(j) * t.dt[j];
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t j = 0; j < t.q; ++j) bt[k * kTile + j] *= weight[j];
  }
  cpu::gemm(n, p, t.q, bt, kTile, x, p, update, p);
  const acc_t decay = t.entering(t.q - 1);
  for (int64_t i = 0; i < n * p; ++i) s1[i] = decay * s0[i] + update[i];
}

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
    std::vector<acc_t> state_x;  // [S^T ; X] (n + kTile, p): the carried state on the tile's x rows
    std::vector<acc_t> lhs;      // [diag(e) C | (K o C B^T) diag(dt)] (kTile, n + kTile)
    std::vector<acc_t> c, b;     // C and B rows (kTile, n)
    std::vector<acc_t> bt;       // B^T (n, kTile)
    std::vector<acc_t> y;        // (kTile, p)
    std::vector<acc_t> update;   // (n, p)

    explicit Workspace(const ScanDims& d)
        : state_x((d.state + kTile) * d.dim), lhs(kTile * (d.state + kTile)), c(kTile * d.state),
          b(kTile * d.state), bt(d.state * kTile), y(kTile * d.dim), update(d.state * d.dim) {}
  };

  void run(int64_t b, int64_t head, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, chunks = d.chunks();
    acc_t* state = w.state_x.data();  // S^T (n, p)
    if (initial_states) {
      transpose(d.state_of(initial_states, b, 0, head, 1), n, p, n, state, p);
    } else {
      std::fill_n(state, n * p, acc_t(0));
    }
    for (int64_t c = 0; c < chunks; ++c) {
      if (chunk_states) transpose(state, p, n, p, d.state_of(chunk_states, b, c, head, chunks), n);
      for (int64_t t0 = c * d.chunk; t0 < d.chunk_end(c); t0 += kTile) {
        tile(Tile<acc_t>::at(in, b, head, t0, std::min(kTile, d.chunk_end(c) - t0)), w);
      }
    }
    transpose(state, p, n, p, d.state_of(final_states, b, 0, head, 1), n);
  }

  // out at the tile's positions; S^T (rows 0..n of state_x) advanced past the tile.
  void tile(const Tile<acc_t>& t, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim, q = t.q, ld = n + kTile;
    acc_t* x = w.state_x.data() + n * p;
    load_x_and_bt(in, t, x, w.b.data(), w.bt.data());
    load_c(in, t, w.c.data());
    cpu::gemm(q, q, n, w.c.data(), n, w.bt.data(), kTile, w.lhs.data() + n, ld);  // C B^T
    for (int64_t i = 0; i < q; ++i) weigh_row(t, i, w.c.data() + i * n, w.lhs.data() + i * ld);
    cpu::gemm(q, p, n + q, w.lhs.data(), ld, w.state_x.data(), p, w.y.data(), p);  // Y
    write_out(t, w.y.data(), x);
    advance_state(t, n, p, w.bt.data(), x, w.state_x.data(), w.state_x.data(), w.update.data());
  }

  // Row i of lhs: e_i C_i, then its scores (C B^T)_i. times K_i. o dt.
  RNNKERN_VECTORIZED void weigh_row(const Tile<acc_t>& t, int64_t i, const acc_t* __restrict c,
                                    acc_t* __restrict row) const {
    const int64_t n = in.dims.state;
    acc_t k[kTile];
    decay_row(t, i, k);
    acc_t* __restrict scores = row + n;
#pragma omp simd
    for (int64_t j = 0; j < t.q; ++j) scores[j] *= k[j] * t.dt[j];
    const acc_t e = t.entering(i);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = e * c[j];
  }

  // out = (y + D x) silu(z) at the tile's positions.
  RNNKERN_VECTORIZED void write_out(const Tile<acc_t>& t, const acc_t* __restrict y, const acc_t* __restrict x) const {
    const ScanDims& d = in.dims;
    const int64_t p = d.dim;
    const acc_t* skip = in.D ? in.D + t.head * p : nullptr;
    for (int64_t i = 0; i < t.q; ++i) {
      scalar_t* __restrict o = d.head_row(out, t.b, t.t0 + i, t.head);
      const scalar_t* __restrict z = in.z ? d.head_row(in.z, t.b, t.t0 + i, t.head) : nullptr;
      const acc_t* __restrict y_i = y + i * p;
      const acc_t* __restrict x_i = x + i * p;
#pragma omp simd
      for (int64_t k = 0; k < p; ++k) {
        const acc_t value = y_i[k] + (skip ? skip[k] * x_i[k] : acc_t(0));
        o[k] = static_cast<scalar_t>(z ? value * math::silu(static_cast<acc_t>(z[k])) : value);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Backward. A task owns heads [h0, h1) of one group of sequence b, and walks each head's chunks
// last to first: it recomputes the states entering the chunk's tiles from the kept chunk state,
// then runs the tiles backwards carrying dS, the gradient of the state leaving the tile. With
// gy = dout silu(z), P = GY X^T (q, q) and M = K o C B^T:
//
//   dG  = K o P diag(dt)                                    the gradient of C B^T
//   dC  = [diag(e) GY | dG]          [S0 ; B]               (q, p + q) (p + q, n)
//   dB  = [diag(w o dt) X | dG^T]    [dS ; C]               (q, p + q) (p + q, n)
//   U   = [diag(w) B | M^T]          [dS^T ; GY]            (q, n + q) (n + q, p): dx = diag(dt) U + D gy
//   dS0 = e_{q-1} dS + GY^T diag(e) C                       becomes dS of the tile before
//
// and through the decays, with dcs_i = C_i . dC_i - B_i . dB_i (+ <dS, S1> at i = q - 1), the
// gradient of cs_i: ddt_j = x_j . U_j + A sum_{i >= j} dcs_i, dA = sum_i dcs_i steps_i.
// dB and dC go to the task's slot (heads of one group share them); dA and dD to per-(b, h) rows.

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
  acc_t* dA;                       // (b, h), zeroed
  acc_t* dD;                       // (b, h, p) zeroed, or null
  acc_t* dinitial_states;          // (b, h, p, n) or null

  struct Workspace {
    std::vector<Tile<acc_t>> tiles;  // of the chunk
    std::vector<acc_t> states;       // (tiles + 1, n, p): S^T entering each tile, and leaving the last
    std::vector<acc_t> s_x;          // [S0^T ; X]  (n + kTile, p)
    std::vector<acc_t> s_b;          // [S0 ; B]    (p + kTile, n)
    std::vector<acc_t> ds_c;         // [dS ; C]    (p + kTile, n)
    std::vector<acc_t> ds_gy;        // [dS^T ; GY] (n + kTile, p)
    std::vector<acc_t> bt, ct;       // B^T, (diag(e) C)^T (n, kTile)
    std::vector<acc_t> xt;           // X^T (p, kTile)
    std::vector<acc_t> scores;       // C B^T, then M (kTile, kTile)
    std::vector<acc_t> products;     // P = GY X^T (kTile, kTile)
    std::vector<acc_t> lhs_c, lhs_b;  // (kTile, p + kTile)
    std::vector<acc_t> lhs_x, lhs_y;  // (kTile, n + kTile); lhs_y = Y's lhs, for dz
    std::vector<acc_t> d_c, d_b;     // this head's dC, dB (kTile, n)
    std::vector<acc_t> u, y, dout;   // (kTile, p)
    std::vector<acc_t> update;       // (n, p)

    explicit Workspace(const ScanDims& d)
        : tiles(d.tiles_per_chunk()), states((d.tiles_per_chunk() + 1) * d.state * d.dim),
          s_x((d.state + kTile) * d.dim), s_b((d.dim + kTile) * d.state), ds_c((d.dim + kTile) * d.state),
          ds_gy((d.state + kTile) * d.dim), bt(d.state * kTile), ct(d.state * kTile), xt(d.dim * kTile),
          scores(kTile * kTile), products(kTile * kTile), lhs_c(kTile * (d.dim + kTile)),
          lhs_b(kTile * (d.dim + kTile)), lhs_x(kTile * (d.state + kTile)), lhs_y(kTile * (d.state + kTile)),
          d_c(kTile * d.state), d_b(kTile * d.state), u(kTile * d.dim), y(kTile * d.dim), dout(kTile * d.dim),
          update(d.state * d.dim) {}

    acc_t* state_grad() { return ds_c.data(); }       // dS (p, n)
    acc_t* state_grad_t() { return ds_gy.data(); }    // dS^T (n, p)
  };

  void run(int64_t b, int64_t head, int64_t slot, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim;
    std::copy_n(d.state_of(grad_final_states, b, 0, head, 1), p * n, w.state_grad());
    transpose(w.state_grad(), n, p, n, w.state_grad_t(), p);
    for (int64_t c = d.chunks() - 1; c >= 0; --c) {
      const int64_t tiles = recompute_states(b, head, c, w);
      for (int64_t k = tiles - 1; k >= 0; --k) {
        tile(w.tiles[k], w.states.data() + k * n * p, w.states.data() + (k + 1) * n * p, slot, w);
      }
    }
    if (dinitial_states) std::copy_n(w.state_grad(), p * n, d.state_of(dinitial_states, b, 0, head, 1));
  }

  // The chunk's tiles into w.tiles, the transposed states entering them (and leaving the last)
  // into w.states; returns the tile count.
  int64_t recompute_states(int64_t b, int64_t head, int64_t c, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim;
    transpose(d.state_of(chunk_states, b, c, head, d.chunks()), n, p, n, w.states.data(), p);
    int64_t k = 0;
    for (int64_t t0 = c * d.chunk; t0 < d.chunk_end(c); t0 += kTile, ++k) {
      w.tiles[k] = Tile<acc_t>::at(in, b, head, t0, std::min(kTile, d.chunk_end(c) - t0));
      acc_t* x = w.s_x.data() + n * p;
      load_x_and_bt(in, w.tiles[k], x, w.s_b.data() + p * n, w.bt.data());
      acc_t* s0 = w.states.data() + k * n * p;
      advance_state(w.tiles[k], n, p, w.bt.data(), x, s0, s0 + n * p, w.update.data());
    }
    return k;
  }

  // One tile: s0t, s1t (n, p) the transposed states entering and leaving it.
  void tile(const Tile<acc_t>& t, const acc_t* s0t, const acc_t* s1t, int64_t slot, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim;
    load(t, s0t, w);
    score_gradients(t, w);
    if (in.z) gate_gradient(t, w);
    const acc_t end_term = dot(w.state_grad_t(), s1t, n * p);  // <dS, S1>
    matrix_gradients(t, w);
    position_gradients(t, end_term, w);
    add_group_gradients(t, slot, w);
    carry_state_gradient(t, w);
  }

  // X, B, C, gy = dout silu(z) (and dout itself with z) into their slots, S0 on top of X and B.
  void load(const Tile<acc_t>& t, const acc_t* s0t, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, q = t.q;
    acc_t* x = w.s_x.data() + n * p;
    load_x_and_bt(in, t, x, w.s_b.data() + p * n, w.bt.data());
    load_c(in, t, w.ds_c.data() + p * n);
    transpose(x, p, q, p, w.xt.data(), kTile);
    std::copy_n(s0t, n * p, w.s_x.data());
    transpose(s0t, p, n, p, w.s_b.data(), n);
    acc_t* gy = w.ds_gy.data() + n * p;
    load_rows(d.head_row(grad_out, t.b, t.t0, t.head), d.heads * p, q, p, in.z ? w.dout.data() : gy, p);
    if (in.z) {
      for (int64_t i = 0; i < q; ++i) gate_row(d.head_row(in.z, t.b, t.t0 + i, t.head), w.dout.data() + i * p,
                                               gy + i * p, p);
    }
  }

  // gy = dout silu(z) for one position.
  static RNNKERN_VECTORIZED void gate_row(const scalar_t* __restrict z, const acc_t* __restrict dout,
                                          acc_t* __restrict gy, int64_t p) {
#pragma omp simd
    for (int64_t k = 0; k < p; ++k) gy[k] = dout[k] * math::silu(static_cast<acc_t>(z[k]));
  }

  // C B^T and P = GY X^T, then lhs_c's dG, lhs_b's dG^T, lhs_x's M^T and lhs_y's M diag(dt).
  void score_gradients(const Tile<acc_t>& t, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim, q = t.q;
    acc_t* scores = w.scores.data();
    cpu::gemm(q, q, n, w.ds_c.data() + p * n, n, w.bt.data(), kTile, scores, kTile);
    cpu::gemm(q, q, p, w.ds_gy.data() + n * p, p, w.xt.data(), kTile, w.products.data(), kTile);
    for (int64_t i = 0; i < q; ++i) {
      score_gradient_row(t, i, scores + i * kTile, w.products.data() + i * kTile, w.lhs_c.data() + i * (p + kTile) + p,
                         w.lhs_y.data() + i * (n + kTile) + n);
    }
    transpose(scores, kTile, q, q, w.lhs_x.data() + n, n + kTile);
    transpose(w.lhs_c.data() + p, p + kTile, q, q, w.lhs_b.data() + p, p + kTile);
  }

  // Row i: scores (C B^T)_i. -> M_i. = K_i. o (C B^T)_i., dg = K_i. o P_i. o dt, m_dt = M_i. o dt.
  static RNNKERN_VECTORIZED void score_gradient_row(const Tile<acc_t>& t, int64_t i, acc_t* __restrict scores,
                                                    const acc_t* __restrict products, acc_t* __restrict dg,
                                                    acc_t* __restrict m_dt) {
    acc_t k[kTile];
    decay_row(t, i, k);
#pragma omp simd
    for (int64_t j = 0; j < t.q; ++j) {
      scores[j] *= k[j];
      m_dt[j] = scores[j] * t.dt[j];
      dg[j] = k[j] * products[j] * t.dt[j];
    }
  }

  // dz = dout (y + D x) silu'(z), y recomputed as the forward does: [diag(e) C | M diag(dt)] [S0^T ; X].
  void gate_gradient(const Tile<acc_t>& t, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim, q = t.q, ld = n + kTile;
    const acc_t* c = w.ds_c.data() + p * n;
    for (int64_t i = 0; i < q; ++i) {
      const acc_t e = t.entering(i);
      for (int64_t j = 0; j < n; ++j) w.lhs_y[i * ld + j] = e * c[i * n + j];
    }
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

  // The left columns of lhs_c, lhs_b, lhs_x and (diag(e) C)^T, then dC, dB and U.
  void matrix_gradients(const Tile<acc_t>& t, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim, q = t.q;
    const acc_t* x = w.s_x.data() + n * p;
    const acc_t* b_rows = w.s_b.data() + p * n;
    const acc_t* c = w.ds_c.data() + p * n;
    const acc_t* gy = w.ds_gy.data() + n * p;
    for (int64_t i = 0; i < q; ++i) {
      const acc_t e = t.entering(i), to_end = t.to_end(i), weight = to_end * t.dt[i];
      scaled_copy(gy + i * p, e, p, w.lhs_c.data() + i * (p + kTile));
      scaled_copy(x + i * p, weight, p, w.lhs_b.data() + i * (p + kTile));
      scaled_copy(b_rows + i * n, to_end, n, w.lhs_x.data() + i * (n + kTile));
      for (int64_t k = 0; k < n; ++k) w.ct[k * kTile + i] = e * c[i * n + k];
    }
    cpu::gemm(q, n, p + q, w.lhs_c.data(), p + kTile, w.s_b.data(), n, w.d_c.data(), n);    // dC
    cpu::gemm(q, n, p + q, w.lhs_b.data(), p + kTile, w.ds_c.data(), n, w.d_b.data(), n);   // dB
    cpu::gemm(q, p, n + q, w.lhs_x.data(), n + kTile, w.ds_gy.data(), p, w.u.data(), p);    // U
  }

  static RNNKERN_VECTORIZED void scaled_copy(const acc_t* __restrict src, acc_t scale, int64_t size,
                                             acc_t* __restrict dst) {
#pragma omp simd
    for (int64_t k = 0; k < size; ++k) dst[k] = scale * src[k];
  }

  // dx, ddt, and the tile's share of dA and dD.
  void position_gradients(const Tile<acc_t>& t, acc_t end_term, Workspace& w) const {
    const ScanDims& d = in.dims;
    const int64_t n = d.state, p = d.dim;
    const acc_t* x = w.s_x.data() + n * p;
    const acc_t* b_rows = w.s_b.data() + p * n;
    const acc_t* c = w.ds_c.data() + p * n;
    const acc_t* gy = w.ds_gy.data() + n * p;
    const acc_t* skip = in.D ? in.D + t.head * p : nullptr;
    acc_t* d_skip = dD ? dD + (t.b * d.heads + t.head) * p : nullptr;
    const acc_t A = in.A[t.head];
    acc_t later = 0, d_A = 0;  // later: sum_{i' >= i} dcs_i'
    for (int64_t i = t.q - 1; i >= 0; --i) {
      const acc_t dcs = dot(c + i * n, w.d_c.data() + i * n, n) - dot(b_rows + i * n, w.d_b.data() + i * n, n) +
                        (i == t.q - 1 ? end_term : acc_t(0));
      later += dcs;
      d_A += dcs * t.steps[i];
      const acc_t* u = w.u.data() + i * p;
      ddt[(t.b * d.length + t.t0 + i) * d.heads + t.head] = dot(x + i * p, u, p) + A * later;
      input_gradient_row(u, t.dt[i], gy + i * p, x + i * p, skip, d_skip, d.head_row(dx, t.b, t.t0 + i, t.head), p);
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

  // This head's dB, dC into the task's slot of its group's rows.
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

  // dS <- e_{q-1} dS + GY^T diag(e) C, in both layouts: the gradient of the state entering the tile.
  void carry_state_gradient(const Tile<acc_t>& t, Workspace& w) const {
    const int64_t n = in.dims.state, p = in.dims.dim;
    cpu::gemm(n, p, t.q, w.ct.data(), kTile, w.ds_gy.data() + n * p, p, w.update.data(), p);
    const acc_t decay = t.entering(t.q - 1);
    acc_t* ds_t = w.state_grad_t();
    for (int64_t i = 0; i < n * p; ++i) ds_t[i] = decay * ds_t[i] + w.update[i];
    transpose(ds_t, p, n, p, w.state_grad(), n);
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
    at::parallel_for(0, dims.batch * dims.heads, 1, [&](int64_t first, int64_t last) {
      typename Kernel::Workspace workspace(dims);
      for (int64_t row = first; row < last; ++row) kernel.run(row / dims.heads, row % dims.heads, workspace);
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

  // Tasks own (sequence, group, block of the group's heads); a block's dB, dC go to its slot.
  const int64_t heads_per_group = heads / groups;
  const int64_t blocks = cpu::blocks_per_pair(batch * groups, heads_per_group);
  const auto options = x.options().dtype(acc);
  auto none = [&] { return at::empty({0}, options); };
  at::Tensor dB = at::zeros({blocks, batch, length, groups, dims.state}, options);
  at::Tensor dC = at::zeros({blocks, batch, length, groups, dims.state}, options);
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
                        cpu::data_or_null<acc_t>(dD), initial_states.has_value() ? dinitial.data_ptr<acc_t>() : nullptr};
    at::parallel_for(0, batch * groups * blocks, 1, [&](int64_t first, int64_t last) {
      typename Kernel::Workspace workspace(dims);
      for (int64_t task = first; task < last; ++task) {
        const int64_t block = task % blocks, pair = task / blocks, head0 = (pair % groups) * heads_per_group;
        const int64_t begin = head0 + heads_per_group * block / blocks;
        const int64_t end = head0 + heads_per_group * (block + 1) / blocks;
        for (int64_t head = begin; head < end; ++head) kernel.run(pair / groups, head, block, workspace);
      }
    });
  });
  return {dx, ddt, dA.sum(0), dB.sum(0), dC.sum(0), D.has_value() ? dD.sum(0) : none(), dz, dinitial};
}

}  // namespace rnnkern
