#include "expertflow/error.h"

#include <cstdio>

namespace expertflow {

namespace detail {

std::string source_location(const char* file, int line) {
  std::string path(file);
  for (const char* top : {"/csrc/", "/expertflow_ext/"}) {
    const auto at = path.rfind(top);
    if (at != std::string::npos) {
      path.erase(0, at + 1);
      break;
    }
  }
  return concat(path, ":", line);
}

}  // namespace detail

void warn(const std::string& message) noexcept {
  std::fprintf(stderr, "expertflow warning: %s\n", message.c_str());
}

}  // namespace expertflow
