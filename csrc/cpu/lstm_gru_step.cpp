// One-token LSTM and GRU steps (decoding, streaming) for fp32/fp64 without autograd: the
// same math as one step of lstm_layer_fwd/gru_layer_fwd, with nothing prepared per call. The weights stay
// as torch.nn stores them, (gates * H, K) row-major, so a gate block's rows for a range of
// units are contiguous and are read in place: no transposed copy, no concatenation of W_ih
// and W_hh, no summed bias. The hidden units split between threads; each thread multiplies
// its units' gate rows and then runs the pointwise update of those units.
//
// The tensors may carry any leading dimensions around their B rows, x (..., I) and the states
// (..., H), so that a layer's (B, 1, I) and a module's (1, B, I) and (1, B, H) come in as they
// are: y comes back shaped like x and the new states like the old, with no view made in
// Python (a view op costs microseconds there, against a 25 us step).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>

#include "../math/cells.h"
#include "../ops.h"
#include "gemv.h"
#include "tensor_args.h"
#include "vectorized.h"

namespace rnnkern {
namespace {

// Units per thread below which splitting further costs more than it saves.
constexpr int64_t kMinUnitsPerThread = 64;

// Rows of a (..., D) tensor: the product of its leading dimensions.
int64_t leading_rows(const at::Tensor& t) { return c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)); }

// x (..., I) and h (..., H) must hold the same number of rows B; the weights are checked
// against I and H.
void check_step_inputs(const char* op, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                       const std::optional<at::Tensor>& b_hh, int64_t gates) {
  TORCH_CHECK(x.dim() >= 1 && h.dim() >= 1, op, ": x (..., I) and h (..., H) need a last dimension, got ", x.sizes(),
              " and ", h.sizes());
  cpu::check_float_or_double(op, "x", x);
  TORCH_CHECK(leading_rows(x) == leading_rows(h), op, ": x ", x.sizes(), " and h ", h.sizes(),
              " must hold the same number of rows (the product of their leading dimensions)");
  const int64_t hidden = h.size(-1);
  const auto dtype = x.scalar_type();
  cpu::check_dtype(op, "h", h, dtype);
  cpu::check_tensor(op, "w_ih", w_ih, {gates * hidden, x.size(-1)}, dtype);
  cpu::check_tensor(op, "w_hh", w_hh, {gates * hidden, hidden}, dtype);
  cpu::check_optional(op, "b_ih", b_ih, {gates * hidden}, dtype);
  cpu::check_optional(op, "b_hh", b_hh, {gates * hidden}, dtype);
}

// The gate pre-activations of units [j0, j1): gi = b_ih + x W_ih^T and gh = b_hh + h W_hh^T
// on those units' rows of every gate block (gate q of unit j is row q * H + j).
template <typename T>
struct GateProjections {
  int64_t batch, input, hidden, gates;
  const T *x, *h, *w_ih, *w_hh, *b_ih, *b_hh;  // x (B, I), h (B, H), weights (gates * H, .)
  T *gi, *gh;                                   // (B, gates * H) scratch

  void operator()(int64_t j0, int64_t j1) const {
    const int64_t n = j1 - j0, width = gates * hidden;
    for (int64_t q = 0; q < gates; ++q) {
      const int64_t row0 = q * hidden + j0;
      cpu::project_rows(w_ih, input, row0, n, b_ih, x, input, batch, gi + row0, width);
      cpu::project_rows(w_hh, hidden, row0, n, b_hh, h, hidden, batch, gh + row0, width);
    }
  }
};

// Units [j0, j1) of every row: their gate pre-activations, then `Update`'s pointwise step of
// those units, row by row, with row b's operands: gi and gh (gates * H), h, y and h' (H).
template <typename T, typename Update>
struct UnitStep {
  GateProjections<T> pre;
  T *y, *h_out;  // (B, H) rows each: y holds h' too, as the layer's output
  Update update;

  void operator()(int64_t j0, int64_t j1) const {
    pre(j0, j1);
    const int64_t H = pre.hidden, width = pre.gates * H;
    for (int64_t b = 0; b < pre.batch; ++b) {
      update(b, j0, j1, H, pre.gi + b * width, pre.gh + b * width, pre.h + b * H, y + b * H, h_out + b * H);
    }
  }
};

template <typename T>
struct LstmUpdate {
  const T* c;  // (B, H)
  T* c_out;    // (B, H)

  RNNKERN_VECTORIZED void operator()(int64_t b, int64_t j0, int64_t j1, int64_t H, const T* __restrict a,
                                     const T* __restrict p, const T*, T* __restrict y, T* __restrict h_new) const {
    const T* __restrict c_row = c + b * H;
    T* __restrict c_new = c_out + b * H;
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      const T i = math::lstm_sigmoid_gate(a[j] + p[j]);
      const T f = math::lstm_sigmoid_gate(a[H + j] + p[H + j]);
      const T g = math::lstm_candidate(a[2 * H + j] + p[2 * H + j]);
      const T o = math::lstm_sigmoid_gate(a[3 * H + j] + p[3 * H + j]);
      T m;
      math::lstm_state(i, f, g, o, c_row[j], c_new[j], m);
      y[j] = h_new[j] = m;
    }
  }
};

template <typename T>
struct GruUpdate {
  RNNKERN_VECTORIZED void operator()(int64_t, int64_t j0, int64_t j1, int64_t H, const T* __restrict a,
                                     const T* __restrict p, const T* __restrict h, T* __restrict y,
                                     T* __restrict h_new) const {
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      T r, z, n;
      math::gru_gates(a[j], p[j], a[H + j], p[H + j], a[2 * H + j], p[2 * H + j], r, z, n);
      y[j] = h_new[j] = math::gru_state(z, n, h[j]);
    }
  }
};

// A step's operands made contiguous (absent biases undefined), and scratch for its gate
// pre-activations.
struct StepOperands {
  at::Tensor x, h, w_ih, w_hh, b_ih, b_hh, gi, gh;
  int64_t gates;

  StepOperands(const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
               const std::optional<at::Tensor>& b_ih_in, const std::optional<at::Tensor>& b_hh_in, int64_t gates)
      : x(x_in.reshape({leading_rows(x_in), x_in.size(-1)}).contiguous()),
        h(h_in.reshape({leading_rows(h_in), h_in.size(-1)}).contiguous()), w_ih(w_ih_in.contiguous()),
        w_hh(w_hh_in.contiguous()),
        b_ih(cpu::contiguous_or_undefined(b_ih_in)), b_hh(cpu::contiguous_or_undefined(b_hh_in)),
        gi(at::empty({x.size(0), gates * h.size(1)}, x.options())), gh(at::empty_like(gi)), gates(gates) {}

  template <typename T>
  GateProjections<T> projections() const {
    return {x.size(0), x.size(1), h.size(1), gates, x.data_ptr<T>(), h.data_ptr<T>(), w_ih.data_ptr<T>(),
            w_hh.data_ptr<T>(), cpu::data_or_null<T>(b_ih), cpu::data_or_null<T>(b_hh), gi.data_ptr<T>(),
            gh.data_ptr<T>()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_step_cpu(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& c_in, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  check_step_inputs("lstm_step", x, h, w_ih, w_hh, b_ih, b_hh, 4);
  cpu::check_tensor("lstm_step", "c", c_in, h.sizes(), x.scalar_type());
  const StepOperands operands(x, h, w_ih, w_hh, b_ih, b_hh, 4);
  const at::Tensor c = c_in.contiguous();
  at::Tensor y = x.new_empty(cpu::with_last_dim(x, h.size(-1)));
  at::Tensor h_out = at::empty(h.sizes(), h.options()), c_out = at::empty(c.sizes(), c.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_step_cpu", [&] {
    const UnitStep<scalar_t, LstmUpdate<scalar_t>> step{operands.projections<scalar_t>(), y.data_ptr<scalar_t>(),
                                                         h_out.data_ptr<scalar_t>(),
                                                         {c.data_ptr<scalar_t>(), c_out.data_ptr<scalar_t>()}};
    at::parallel_for(0, h.size(-1), kMinUnitsPerThread, step);
  });
  return {y, h_out, c_out};
}

std::tuple<at::Tensor, at::Tensor> gru_step_cpu(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  check_step_inputs("gru_step", x, h, w_ih, w_hh, b_ih, b_hh, 3);
  const StepOperands operands(x, h, w_ih, w_hh, b_ih, b_hh, 3);
  at::Tensor y = x.new_empty(cpu::with_last_dim(x, h.size(-1)));
  at::Tensor h_out = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_step_cpu", [&] {
    const UnitStep<scalar_t, GruUpdate<scalar_t>> step{operands.projections<scalar_t>(), y.data_ptr<scalar_t>(),
                                                        h_out.data_ptr<scalar_t>(), {}};
    at::parallel_for(0, h.size(-1), kMinUnitsPerThread, step);
  });
  return {y, h_out};
}

// A stack of L one-direction layers, one token: layer l takes layer l - 1's output. The
// states are (L, ..., H), layer l's at index l; `weights` holds (w_ih, w_hh, b_ih, b_hh) per
// layer. Returns y (x's shape, last dimension H) and the new states (L, ..., H).
namespace {

const at::Tensor& stack_weight(const std::vector<std::optional<at::Tensor>>& weights, size_t index, const char* op) {
  TORCH_CHECK(weights[index].has_value(), op, ": weight ", index, " (w_ih or w_hh of layer ", index / 4,
              ") is required, got None");
  return *weights[index];
}

std::vector<std::optional<at::Tensor>> stack_weights(const c10::List<std::optional<at::Tensor>>& list,
                                                     const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.dim() >= 2, op, ": the states must have shape (L, ..., H), got ", h.sizes());
  TORCH_CHECK(static_cast<int64_t>(list.size()) == 4 * h.size(0), op, ": expected 4 weights per layer for ",
              h.size(0), " layers, got ", list.size());
  return list.vec();
}

// The layer's new state into row `layer` of `stacked` (contiguous, the layer's shape).
void put_layer(at::Tensor& stacked, int64_t layer, const at::Tensor& state) {
  const at::Tensor source = state.contiguous();
  const int64_t count = source.numel();
  AT_DISPATCH_FLOATING_TYPES(source.scalar_type(), "put_layer", [&] {
    std::copy_n(source.data_ptr<scalar_t>(), count, stacked.data_ptr<scalar_t>() + layer * count);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_stack_step_cpu(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
    const c10::List<std::optional<at::Tensor>>& weight_list) {
  const char* op = "lstm_stack_step";
  const auto weights = stack_weights(weight_list, h, op);
  cpu::check_tensor(op, "c", c, h.sizes(), h.scalar_type());
  at::Tensor h_out = at::empty(h.sizes(), h.options()), c_out = at::empty(c.sizes(), c.options());
  at::Tensor y = x;
  for (int64_t layer = 0; layer < h.size(0); ++layer) {
    auto [y_l, h_l, c_l] = lstm_step_cpu(y, h[layer], c[layer], stack_weight(weights, 4 * layer, op),
                                         stack_weight(weights, 4 * layer + 1, op), weights[4 * layer + 2],
                                         weights[4 * layer + 3]);
    put_layer(h_out, layer, h_l);
    put_layer(c_out, layer, c_l);
    y = std::move(y_l);
  }
  return {y, h_out, c_out};
}

std::tuple<at::Tensor, at::Tensor> gru_stack_step_cpu(const at::Tensor& x, const at::Tensor& h,
                                                      const c10::List<std::optional<at::Tensor>>& weight_list) {
  const char* op = "gru_stack_step";
  const auto weights = stack_weights(weight_list, h, op);
  at::Tensor h_out = at::empty(h.sizes(), h.options());
  at::Tensor y = x;
  for (int64_t layer = 0; layer < h.size(0); ++layer) {
    auto [y_l, h_l] = gru_step_cpu(y, h[layer], stack_weight(weights, 4 * layer, op),
                                   stack_weight(weights, 4 * layer + 1, op), weights[4 * layer + 2],
                                   weights[4 * layer + 3]);
    put_layer(h_out, layer, h_l);
    y = std::move(y_l);
  }
  return {y, h_out};
}

}  // namespace rnnkern
