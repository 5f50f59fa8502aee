#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "ExpertFlow native core: host pool, device slots, expert cache, transfer engine";
  expertflow::python::register_errors(m);
  expertflow::python::register_backend(m);
  expertflow::python::register_pool(m);
  expertflow::python::register_cache(m);
  expertflow::python::register_predictor(m);
  expertflow::python::register_replay(m);
}
