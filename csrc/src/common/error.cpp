#include "expertflow/error.h"

#include <cstdio>

namespace expertflow {

void warn(const std::string& message) noexcept {
  std::fprintf(stderr, "expertflow warning: %s\n", message.c_str());
}

}  // namespace expertflow
