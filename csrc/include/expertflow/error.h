// One error vocabulary for the whole core.
//
// Library code never exits, aborts or prints and carries on: it throws one of the
// classes below, which the Python bindings map to ValueError (InvalidArgument),
// MemoryError (OutOfMemory) and RuntimeError (the rest). Destructors and free paths
// never throw: they report through warn() and carry on.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace expertflow {

// what() is the message followed by " (file:line)" where it was thrown, for C++ users and
// logs; message() and location() keep the two apart, so that the Python bindings can show
// users the message alone and keep the location for bug reports.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : Error(message, std::string()) {}
  Error(const std::string& message, const std::string& location)
      : std::runtime_error(location.empty() ? message : message + " (" + location + ")"),
        message_(message),
        location_(location) {}
  const std::string& message() const noexcept { return message_; }
  const std::string& location() const noexcept { return location_; }

 private:
  std::string message_;
  std::string location_;
};

// A value passed by the caller is wrong; the object it was passed to is unchanged.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// An allocation (host, pinned or device) failed.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

// The backend (CUDA runtime, a copy worker) reported a failure.
class BackendError : public Error {
 public:
  using Error::Error;
};

// The object was used in a state that does not allow the call (closed, for example).
class StateError : public Error {
 public:
  using Error::Error;
};

namespace detail {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// "csrc/src/common/x.cpp:12" from __FILE__ and __LINE__: the path from the source tree's
// top, not the build machine's absolute path.
std::string source_location(const char* file, int line);

template <typename E, typename... Args>
[[noreturn]] void raise(const char* file, int line, const Args&... args) {
  throw E(concat(args...), source_location(file, line));
}

}  // namespace detail

// Writes a warning to stderr. For destructors and free paths, which must not throw.
void warn(const std::string& message) noexcept;

}  // namespace expertflow

#define EF_THROW(ErrorType, ...) \
  ::expertflow::detail::raise<::expertflow::ErrorType>(__FILE__, __LINE__, __VA_ARGS__)

// Throws InvalidArgument with the message when cond is false.
#define EF_CHECK(cond, ...)                              \
  do {                                                   \
    if (!(cond)) EF_THROW(InvalidArgument, __VA_ARGS__); \
  } while (0)
