#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "expertflow/transition_predictor.h"

namespace py = pybind11;

namespace expertflow::python {

void register_predictor(py::module_& m) {
  py::class_<TransitionPredictor>(m, "TransitionPredictor")
      .def(py::init<int, int, double>(), py::arg("num_layers"), py::arg("experts_per_layer"),
           py::arg("request_weight") = 0.5)
      .def("observe", &TransitionPredictor::observe, py::arg("layer"), py::arg("experts"))
      .def("predict", &TransitionPredictor::predict, py::arg("layer"), py::arg("count"))
      .def("new_request", &TransitionPredictor::new_request)
      .def_property_readonly("num_layers", &TransitionPredictor::num_layers)
      .def_property_readonly("experts_per_layer", &TransitionPredictor::experts_per_layer);
}

}  // namespace expertflow::python
