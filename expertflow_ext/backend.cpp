#include "expertflow/backend.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "expertflow/error.h"

namespace py = pybind11;

namespace expertflow::python {

void register_backend(py::module_& m) {
  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend")
      .def_property_readonly("name", &Backend::name)
      .def("__repr__", [](const Backend& b) { return "<expertflow._C.Backend " + b.name() + ">"; });

  m.def(
      "make_backend",
      [](const std::string& kind, int device, double link_gbps, double link_latency_us) {
        EF_CHECK(kind == "cpu" || kind == "cuda", "unknown backend \"", kind,
                 "\"; choose \"cpu\" or \"cuda\"");
        return make_backend(kind == "cpu" ? DeviceKind::kCpu : DeviceKind::kCuda, device,
                            LinkModel{link_gbps, link_latency_us});
      },
      py::arg("kind"), py::arg("device") = 0, py::arg("link_gbps") = 0.0,
      py::arg("link_latency_us") = 0.0);

  m.def("build_info", [] {
    BuildInfo info = build_info();
    py::dict backends;
    for (const BackendInfo& b : info.backends) {
      backends[py::str(b.name)] =
          py::dict(py::arg("built") = b.built, py::arg("usable") = b.usable,
                   py::arg("reason") = b.reason, py::arg("device_count") = b.device_count);
    }
    return py::dict(py::arg("version") = info.version, py::arg("cuda_runtime") = info.cuda_runtime,
                    py::arg("backends") = backends);
  });
}

}  // namespace expertflow::python
