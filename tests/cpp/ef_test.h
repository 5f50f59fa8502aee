// A tiny test harness for the core's ctest executables (no gtest on the build machines).
//
// TEST(name) { ... } registers a test; EXPECT_* record a failure with file:line and carry
// on; ASSERT_TRUE returns from the test. EF_TEST_MAIN() defines main(), which runs every
// test (or those whose name contains argv[1]) and exits 1 if any expectation failed. A
// binary that needs a device this machine lacks calls EF_SKIP_ALL(reason): exit code 77,
// which ctest reports as skipped (SKIP_RETURN_CODE). Expectations may be used from threads.
#pragma once

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace ef_test {

struct Case {
  const char* name;
  void (*fn)();
};
inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}
inline std::atomic<int>& failures() {
  static std::atomic<int> count{0};
  return count;
}
struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

inline void fail(const char* file, int line, const std::string& message) {
  static std::mutex mutex;
  ++failures();
  std::lock_guard<std::mutex> lock(mutex);
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, message.c_str());
}

template <typename T, typename = void>
struct Printable : std::false_type {};
template <typename T>
struct Printable<T,
                 std::void_t<decltype(std::declval<std::ostream&>() << std::declval<const T&>())>>
    : std::true_type {};
template <typename T>
std::string show(const T& value) {
  if constexpr (Printable<T>::value) {
    std::ostringstream out;
    out << value;
    return out.str();
  } else {
    return "<unprintable>";
  }
}

inline int run_all(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : "";
  int ran = 0;
  for (const Case& c : registry()) {
    if (std::strstr(c.name, filter) == nullptr) continue;
    int before = failures();
    std::fprintf(stderr, "[ RUN  ] %s\n", c.name);
    try {
      c.fn();
    } catch (const std::exception& e) {
      fail(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      fail(__FILE__, __LINE__, "uncaught non-std exception");
    }
    std::fprintf(stderr, "[ %s ] %s\n", failures() == before ? " OK " : "FAIL", c.name);
    ++ran;
  }
  std::fprintf(stderr, "%d tests, %d failed expectations\n", ran, failures().load());
  return failures() == 0 ? 0 : 1;
}

}  // namespace ef_test

#define TEST(name)                                                                 \
  static void ef_test_##name();                                                    \
  static const ::ef_test::Register ef_test_register_##name(#name, ef_test_##name); \
  static void ef_test_##name()

#define EXPECT_TRUE(cond) \
  ((cond) ? (void)0 : ::ef_test::fail(__FILE__, __LINE__, "expected true: " #cond))

#define ASSERT_TRUE(cond)                                              \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ::ef_test::fail(__FILE__, __LINE__, "assertion failed: " #cond); \
      return;                                                          \
    }                                                                  \
  } while (0)

#define EXPECT_EQ(a, b)                                                                     \
  do {                                                                                      \
    const auto& ef_a_ = (a);                                                                \
    const auto& ef_b_ = (b);                                                                \
    if (!(ef_a_ == ef_b_))                                                                  \
      ::ef_test::fail(__FILE__, __LINE__,                                                   \
                      "expected " #a " == " #b ", got " + ::ef_test::show(ef_a_) + " vs " + \
                          ::ef_test::show(ef_b_));                                          \
  } while (0)

// Expects `stmt` to throw `Type`; when `substr` is non-empty, the message must contain it.
#define EXPECT_THROW_MSG(stmt, Type, substr)                                                    \
  do {                                                                                          \
    try {                                                                                       \
      stmt;                                                                                     \
      ::ef_test::fail(__FILE__, __LINE__, "expected " #Type " from: " #stmt);                   \
    } catch (const Type& ef_e_) {                                                               \
      if (std::string(ef_e_.what()).find(substr) == std::string::npos)                          \
        ::ef_test::fail(__FILE__, __LINE__,                                                     \
                        std::string("message lacks \"") + (substr) + "\": " + ef_e_.what());    \
    } catch (const std::exception& ef_e_) {                                                     \
      ::ef_test::fail(__FILE__, __LINE__,                                                       \
                      "expected " #Type " from: " #stmt ", got: " + std::string(ef_e_.what())); \
    }                                                                                           \
  } while (0)
#define EXPECT_THROW(stmt, Type) EXPECT_THROW_MSG(stmt, Type, "")

#define EF_SKIP_ALL(reason)                                             \
  do {                                                                  \
    std::fprintf(stderr, "SKIPPED: %s\n", std::string(reason).c_str()); \
    std::exit(77);                                                      \
  } while (0)

#define EF_TEST_MAIN() \
  int main(int argc, char** argv) { return ::ef_test::run_all(argc, argv); }
