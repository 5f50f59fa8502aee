// The pybind11 module expertflow._C: type conversion, GIL release and error mapping
// only. Each register_* adds one concept of the core.
#pragma once

#include <pybind11/pybind11.h>

namespace expertflow::python {

void register_errors(pybind11::module_& m);
void register_backend(pybind11::module_& m);
void register_pool(pybind11::module_& m);
void register_cache(pybind11::module_& m);
void register_predictor(pybind11::module_& m);
void register_replay(pybind11::module_& m);

}  // namespace expertflow::python
