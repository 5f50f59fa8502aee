// The backend factories behind make_backend(); private to the core.
#pragma once

#include <memory>
#include <string>

#include "expertflow/backend.h"

namespace expertflow {

std::shared_ptr<Backend> make_cpu_backend(LinkModel link);
#ifdef EXPERTFLOW_WITH_CUDA
std::shared_ptr<Backend> make_cuda_backend(int device);
// Whether CUDA is usable now; sets *runtime_version to the linked runtime's version.
BackendInfo cuda_backend_info(std::string* runtime_version);
#endif

}  // namespace expertflow
