// Direct Python entry points of the one-token kernels, for the modules' eager streaming calls:
// rnnkern._C.lstm_step, gru_step, lstm_stack_step, gru_stack_step, mamba_block_step,
// mamba2_block_step and rms_norm_gated, with the arguments of the rnnkern_C ops of the same
// names. A torch.ops call spends about 10 us parsing its arguments against the schema and
// dispatching, as much as a small step's whole kernel; these take positional arguments, call
// the same kernels and bump the version counters of the states they update in place, as the
// dispatcher's in-place handling does. They record no autograd: the modules call them only
// with grad mode off, and the registered ops otherwise. The profiler sees each under its op's
// name (rnnkern_C::lstm_step, ...).
#include "python_calls.h"

#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>

#include "ops.h"

namespace rnnkern {
namespace {

void check_count(const char* fn, Py_ssize_t nargs, Py_ssize_t expected) {
  if (nargs != expected) {
    throw torch::TypeError(std::string(fn) + " takes " + std::to_string(expected) + " arguments, got " +
                           std::to_string(nargs));
  }
}

const at::Tensor& tensor(const char* fn, PyObject* const* args, Py_ssize_t i) {
  if (!THPVariable_Check(args[i])) {
    throw torch::TypeError(std::string(fn) + ": argument " + std::to_string(i) + " must be a Tensor, got " +
                           Py_TYPE(args[i])->tp_name);
  }
  return THPVariable_Unpack(args[i]);
}

std::optional<at::Tensor> optional_tensor(const char* fn, PyObject* const* args, Py_ssize_t i) {
  if (args[i] == Py_None) return std::nullopt;
  return tensor(fn, args, i);
}

// A list of tensors or None, as the ops' Tensor?[] argument.
c10::List<std::optional<at::Tensor>> tensor_list(const char* fn, PyObject* const* args, Py_ssize_t i) {
  if (!PyList_Check(args[i])) {
    throw torch::TypeError(std::string(fn) + ": argument " + std::to_string(i) + " must be a list, got " +
                           Py_TYPE(args[i])->tp_name);
  }
  c10::List<std::optional<at::Tensor>> list;
  const Py_ssize_t size = PyList_GET_SIZE(args[i]);
  list.reserve(size);
  for (Py_ssize_t j = 0; j < size; ++j) {
    PyObject* item = PyList_GET_ITEM(args[i], j);
    list.push_back(item == Py_None ? std::nullopt : std::optional<at::Tensor>(tensor(fn, &item, 0)));
  }
  return list;
}

// A tuple of new references to `tensors`' Python objects.
template <typename... Tensors>
PyObject* tuple_of(Tensors&&... tensors) {
  PyObject* items[] = {THPVariable_Wrap(std::forward<Tensors>(tensors))...};
  PyObject* result = PyTuple_New(sizeof...(Tensors));
  for (size_t k = 0; k < sizeof...(Tensors); ++k) PyTuple_SET_ITEM(result, k, items[k]);
  return result;
}

PyObject* lstm_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* fn = "lstm_step";
  RECORD_FUNCTION("rnnkern_C::lstm_step", std::vector<c10::IValue>());
  check_count(fn, nargs, 7);
  auto [y, h, c] = lstm_step_cpu(tensor(fn, args, 0), tensor(fn, args, 1), tensor(fn, args, 2), tensor(fn, args, 3),
                                 tensor(fn, args, 4), optional_tensor(fn, args, 5), optional_tensor(fn, args, 6));
  return tuple_of(std::move(y), std::move(h), std::move(c));
  END_HANDLE_TH_ERRORS
}

PyObject* gru_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* fn = "gru_step";
  RECORD_FUNCTION("rnnkern_C::gru_step", std::vector<c10::IValue>());
  check_count(fn, nargs, 6);
  auto [y, h] = gru_step_cpu(tensor(fn, args, 0), tensor(fn, args, 1), tensor(fn, args, 2), tensor(fn, args, 3),
                             optional_tensor(fn, args, 4), optional_tensor(fn, args, 5));
  return tuple_of(std::move(y), std::move(h));
  END_HANDLE_TH_ERRORS
}

PyObject* lstm_stack_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* fn = "lstm_stack_step";
  RECORD_FUNCTION("rnnkern_C::lstm_stack_step", std::vector<c10::IValue>());
  check_count(fn, nargs, 4);
  auto [y, h, c] = lstm_stack_step_cpu(tensor(fn, args, 0), tensor(fn, args, 1), tensor(fn, args, 2),
                                       tensor_list(fn, args, 3));
  return tuple_of(std::move(y), std::move(h), std::move(c));
  END_HANDLE_TH_ERRORS
}

PyObject* gru_stack_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* fn = "gru_stack_step";
  RECORD_FUNCTION("rnnkern_C::gru_stack_step", std::vector<c10::IValue>());
  check_count(fn, nargs, 3);
  auto [y, h] = gru_stack_step_cpu(tensor(fn, args, 0), tensor(fn, args, 1), tensor_list(fn, args, 2));
  return tuple_of(std::move(y), std::move(h));
  END_HANDLE_TH_ERRORS
}

// The states a block step updated in place, marked changed as the dispatcher would.
void bump_versions(const at::Tensor& conv_state, const at::Tensor& ssm_state) {
  conv_state.unsafeGetTensorImpl()->bump_version();
  ssm_state.unsafeGetTensorImpl()->bump_version();
}

PyObject* mamba_block_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* fn = "mamba_block_step";
  RECORD_FUNCTION("rnnkern_C::mamba_block_step", std::vector<c10::IValue>());
  check_count(fn, nargs, 4);
  at::Tensor conv_state = tensor(fn, args, 1), ssm_state = tensor(fn, args, 2);
  at::Tensor out = mamba_block_step_cpu(tensor(fn, args, 0), conv_state, ssm_state, tensor_list(fn, args, 3));
  bump_versions(conv_state, ssm_state);
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* mamba2_block_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* fn = "mamba2_block_step";
  RECORD_FUNCTION("rnnkern_C::mamba2_block_step", std::vector<c10::IValue>());
  check_count(fn, nargs, 9);
  at::Tensor conv_state = tensor(fn, args, 1), ssm_state = tensor(fn, args, 2);
  const int64_t norm_group_size = PyLong_AsLongLong(args[4]);
  const int norm_before_gate = PyObject_IsTrue(args[5]);
  const double norm_eps = PyFloat_AsDouble(args[6]), dt_min = PyFloat_AsDouble(args[7]);
  const double dt_max = PyFloat_AsDouble(args[8]);
  if (PyErr_Occurred()) return nullptr;  // a number argument of the wrong type
  at::Tensor out = mamba2_block_step_cpu(tensor(fn, args, 0), conv_state, ssm_state, tensor_list(fn, args, 3),
                                         norm_group_size, norm_before_gate != 0, norm_eps, dt_min, dt_max);
  bump_versions(conv_state, ssm_state);
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* rms_norm_gated(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* fn = "rms_norm_gated";
  RECORD_FUNCTION("rnnkern_C::rms_norm_gated", std::vector<c10::IValue>());
  check_count(fn, nargs, 7);
  const double eps = PyFloat_AsDouble(args[4]);
  const int64_t group_size = PyLong_AsLongLong(args[5]);
  const int norm_before_gate = PyObject_IsTrue(args[6]);
  if (PyErr_Occurred()) return nullptr;
  return THPVariable_Wrap(rms_norm_gated_cpu(tensor(fn, args, 0), tensor(fn, args, 1), optional_tensor(fn, args, 2),
                                             optional_tensor(fn, args, 3), eps, group_size, norm_before_gate != 0));
  END_HANDLE_TH_ERRORS
}

template <auto function>
constexpr PyCFunction fastcall() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(function));
}

PyMethodDef methods[] = {
    {"lstm_step", fastcall<lstm_step>(), METH_FASTCALL, "rnnkern_C::lstm_step without the dispatcher"},
    {"gru_step", fastcall<gru_step>(), METH_FASTCALL, "rnnkern_C::gru_step without the dispatcher"},
    {"lstm_stack_step", fastcall<lstm_stack_step>(), METH_FASTCALL,
     "rnnkern_C::lstm_stack_step without the dispatcher"},
    {"gru_stack_step", fastcall<gru_stack_step>(), METH_FASTCALL, "rnnkern_C::gru_stack_step without the dispatcher"},
    {"mamba_block_step", fastcall<mamba_block_step>(), METH_FASTCALL,
     "rnnkern_C::mamba_block_step without the dispatcher"},
    {"mamba2_block_step", fastcall<mamba2_block_step>(), METH_FASTCALL,
     "rnnkern_C::mamba2_block_step without the dispatcher"},
    {"rms_norm_gated", fastcall<rms_norm_gated>(), METH_FASTCALL, "rnnkern_C::rms_norm_gated without the dispatcher"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* python_calls() { return methods; }

}  // namespace rnnkern
