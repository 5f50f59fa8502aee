// Test instruments, not for production use:
//  - fault injection makes the CPU backend fail or slow down on purpose, so that tests can
//    check that a failed copy, allocation or stream creation raises a clear error and
//    leaves the cache correct and usable;
//  - CountingBackend wraps a backend and counts the calls made to it, so that tests can
//    hold the number of driver calls per acquire and release to what the design allows.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "expertflow/backend.h"

namespace expertflow::testing {

struct CpuFaults {
  int fail_copy = 0;           // the Nth copy from now throws BackendError (1: the next; 0: none)
  double copy_delay_us = 0.0;  // every copy takes at least this long
  bool fail_alloc = false;     // the next host or device allocation throws OutOfMemory
  int fail_stream = 0;         // the Nth stream created from now throws BackendError
};

// Replaces the CPU backend's faults. Throws InvalidArgument for any other backend.
void inject_faults(Backend& backend, const CpuFaults& faults);

// Calls made through a CountingBackend.
struct CallCounts {
  std::atomic<int> fences_created{0};  // fences and timers
  std::atomic<int> records{0};
  std::atomic<int> waits{0};
  std::atomic<int> synchronizes{0};
  std::atomic<int> queries{0};
  std::atomic<int> copies{0};
  std::atomic<int> streams_created{0};
  std::atomic<int> streams_destroyed{0};
};

// Forwards every call to `inner` and counts it. With fences_complete false, query() says
// no fence has completed (whatever the inner backend says), so that every wait the cache
// would make on a device whose copies are still running is made and counted.
class CountingBackend final : public Backend {
 public:
  explicit CountingBackend(std::shared_ptr<Backend> inner, bool fences_complete = true);

  const CallCounts& counts() const { return counts_; }
  Backend& inner() const { return *inner_; }
  // What elapsed_seconds() reports from now on instead of the inner backend's answer, so
  // that tests can follow device stall times through the cache's accounting.
  void report_elapsed(double seconds) { elapsed_ = seconds; }

  DeviceKind kind() const override;
  std::string name() const override;
  void* alloc_host(std::size_t bytes) override;
  void free_host(void* ptr) noexcept override;
  void register_host(void* ptr, std::size_t bytes) override;
  void unregister_host(void* ptr) noexcept override;
  void* alloc_device(std::size_t bytes) override;
  void free_device(void* ptr) noexcept override;
  StreamHandle create_stream(bool high_priority) override;
  void destroy_stream(StreamHandle stream) noexcept override;
  void check_stream(StreamHandle stream, int stream_device) const override;
  std::unique_ptr<Fence> create_fence() override;
  std::unique_ptr<Fence> create_timer() override;
  void record(Fence& fence, StreamHandle stream) override;
  void wait(StreamHandle stream, Fence& fence) override;
  void synchronize(Fence& fence) override;
  bool query(Fence& fence) override;
  std::optional<double> elapsed_seconds(Fence& start, Fence& end) override;
  void copy_to_device(void* dst, const void* src, std::size_t bytes, StreamHandle stream) override;

 private:
  std::shared_ptr<Backend> inner_;
  bool fences_complete_;
  std::atomic<double> elapsed_{-1.0};  // < 0: the inner backend's
  CallCounts counts_;
};

}  // namespace expertflow::testing
