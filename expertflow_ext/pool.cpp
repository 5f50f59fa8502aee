#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "bindings.h"
#include "expertflow/host_pool.h"

namespace py = pybind11;

namespace expertflow::python {

void register_pool(py::module_& m) {
  py::class_<ExpertLayout>(m, "ExpertLayout")
      .def(py::init<int, int, std::size_t>(), py::arg("num_layers"), py::arg("experts_per_layer"),
           py::arg("expert_bytes"))
      .def(py::init<int, int, std::vector<std::size_t>>(), py::arg("num_layers"),
           py::arg("experts_per_layer"), py::arg("expert_bytes"))
      .def_property_readonly("num_layers", &ExpertLayout::num_layers)
      .def_property_readonly("experts_per_layer", &ExpertLayout::experts_per_layer)
      .def_property_readonly("max_bytes", &ExpertLayout::max_bytes)
      .def_property_readonly("total_bytes", &ExpertLayout::total_bytes)
      .def("key", &ExpertLayout::key, py::arg("layer"), py::arg("expert"))
      .def(
          "offset",
          [](const ExpertLayout& l, int layer, int expert) {
            return l.offset(l.key(layer, expert));
          },
          py::arg("layer"), py::arg("expert"))
      .def(
          "bytes",
          [](const ExpertLayout& l, int layer, int expert) {
            return l.bytes(l.key(layer, expert));
          },
          py::arg("layer"), py::arg("expert"));

  // Pinning host memory (cudaHostAlloc, cudaHostRegister) takes seconds for a large pool:
  // other Python threads run meanwhile.
  using Release = py::call_guard<py::gil_scoped_release>;
  py::class_<HostPool, std::shared_ptr<HostPool>>(m, "HostPool", py::buffer_protocol())
      .def(py::init<std::shared_ptr<Backend>, ExpertLayout>(), py::arg("backend"),
           py::arg("layout"), Release())
      .def(py::init([](std::shared_ptr<Backend> backend, ExpertLayout layout,
                       std::uintptr_t address, std::size_t nbytes) {
             return std::make_shared<HostPool>(std::move(backend), std::move(layout),
                                               reinterpret_cast<void*>(address), nbytes);
           }),
           py::arg("backend"), py::arg("layout"), py::arg("address"), py::arg("nbytes"), Release())
      .def_property_readonly("layout", &HostPool::layout,
                             py::return_value_policy::reference_internal)
      .def_property_readonly(
          "address", [](const HostPool& p) { return reinterpret_cast<std::uintptr_t>(p.data()); })
      .def_property_readonly("nbytes", &HostPool::bytes)
      .def_property_readonly("owns_memory", &HostPool::owns_memory)
      .def(
          "blob_address",
          [](const HostPool& p, int layer, int expert) {
            return reinterpret_cast<std::uintptr_t>(p.blob(p.layout().key(layer, expert)));
          },
          py::arg("layer"), py::arg("expert"))
      .def_buffer([](HostPool& p) {
        return py::buffer_info(p.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {p.bytes()}, {1});
      });
}

}  // namespace expertflow::python
