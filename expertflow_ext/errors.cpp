#include <pybind11/pybind11.h>

#include <cstdlib>
#include <string>

#include "bindings.h"
#include "expertflow/error.h"

namespace py = pybind11;

namespace expertflow::python {

namespace {

// A user reads the message; where the core threw it matters only for a bug report, so it
// goes to the exception's notes (shown under a traceback, not in str(error)), or into the
// message itself with EXPERTFLOW_DEBUG=1.
bool debug_locations() {
  const char* value = std::getenv("EXPERTFLOW_DEBUG");
  return value != nullptr && *value != '\0' && std::string(value) != "0";
}

void set_error(PyObject* type, const Error& error) {
  if (debug_locations() || error.location().empty()) {
    PyErr_SetString(type, error.what());
    return;
  }
  py::object exception = py::reinterpret_borrow<py::object>(type)(error.message());
  py::list notes;
  notes.append("raised in the expertflow core at " + error.location() +
               " (EXPERTFLOW_DEBUG=1 puts it in the message)");
  py::setattr(exception, "__notes__", notes);
  PyErr_SetObject(type, exception.ptr());
}

}  // namespace

void register_errors(py::module_& m) {
  (void)m;
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const InvalidArgument& e) {
      set_error(PyExc_ValueError, e);
    } catch (const OutOfMemory& e) {
      set_error(PyExc_MemoryError, e);
    } catch (const Error& e) {
      set_error(PyExc_RuntimeError, e);
    }
  });
}

}  // namespace expertflow::python
