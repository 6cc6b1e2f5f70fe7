// The methods of the rnnkern._C module: direct Python entry points of the one-token kernels.
#pragma once

#include <Python.h>

namespace rnnkern {

// The module's method table, null-terminated.
PyMethodDef* python_calls();

}  // namespace rnnkern
