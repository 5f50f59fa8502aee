// The CPU backend: host memory stands in for the device, the calling thread is the
// stream, and copies are memcpy, optionally paced by an emulated link.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "common/backends.h"
#include "expertflow/backend.h"
#include "expertflow/error.h"
#include "expertflow/testing.h"

namespace expertflow {

namespace {

constexpr std::size_t kPageBytes = 4096;

class CpuFence final : public Fence {};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(LinkModel link) : link_(link) {
    EF_CHECK(link.gbps >= 0.0, "link bandwidth must be >= 0 GB/s, got ", link.gbps);
    EF_CHECK(link.latency_us >= 0.0, "link latency must be >= 0 us, got ", link.latency_us);
  }

  DeviceKind kind() const override { return DeviceKind::kCpu; }
  std::string name() const override { return "cpu"; }

  void* alloc_host(std::size_t bytes) override {
    injected_alloc_failure("host");
    return allocate(bytes, "host");
  }
  void free_host(void* ptr) noexcept override { std::free(ptr); }
  void register_host(void*, std::size_t) override {}
  void unregister_host(void*) noexcept override {}
  void* alloc_device(std::size_t bytes) override {
    injected_alloc_failure("device arena");
    return allocate(bytes, "device arena");
  }
  void free_device(void* ptr) noexcept override { std::free(ptr); }

  StreamHandle create_stream(bool) override {
    injected_stream_failure();
    return 0;
  }
  void destroy_stream(StreamHandle) noexcept override {}
  void check_stream(StreamHandle stream, int stream_device) const override {
    EF_CHECK(stream_device < 0, "a stream of cuda:", stream_device,
             " cannot be used with the CPU backend; pass stream 0");
    EF_CHECK(stream == 0, "the CPU backend has no streams: pass stream 0, got ", stream);
  }

  std::unique_ptr<Fence> create_fence() override { return std::make_unique<CpuFence>(); }
  std::unique_ptr<Fence> create_timer() override { return std::make_unique<CpuFence>(); }
  // Work on the CPU "stream" ran synchronously on the thread that issued it: every fence
  // is complete when recorded, and a stream never waits on the device side (the host time
  // it waited is the caller's to measure).
  void record(Fence&, StreamHandle) override {}
  void wait(StreamHandle, Fence&) override {}
  void synchronize(Fence&) override {}
  bool query(Fence&) override { return true; }
  std::optional<double> elapsed_seconds(Fence&, Fence&) override { return 0.0; }

  void copy_to_device(void* dst, const void* src, std::size_t bytes, StreamHandle) override {
    injected_copy_fault();
    if (link_.gbps <= 0.0) {
      std::memcpy(dst, src, bytes);
      return;
    }
    // Copies share one emulated link: each takes its turn, then lasts latency plus
    // bytes over bandwidth, however fast the memcpy itself was.
    using Clock = std::chrono::steady_clock;
    auto duration = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
        link_.latency_us * 1e-6 + static_cast<double>(bytes) / (link_.gbps * 1e9)));
    Clock::time_point end;
    {
      std::lock_guard<std::mutex> lock(link_mutex_);
      end = std::max(Clock::now(), link_free_at_) + duration;
      link_free_at_ = end;
    }
    std::memcpy(dst, src, bytes);
    std::this_thread::sleep_until(end);
  }

 private:
  static void* allocate(std::size_t bytes, const char* what) {
    EF_CHECK(bytes > 0, "cannot allocate 0 bytes of ", what, " memory");
    std::size_t rounded = (bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    void* ptr = std::aligned_alloc(kPageBytes, rounded);
    if (ptr == nullptr)
      EF_THROW(OutOfMemory, "could not allocate ", bytes, " bytes of ", what, " memory");
    return ptr;
  }

  void injected_alloc_failure(const char* what) {
    std::lock_guard<std::mutex> lock(fault_mutex_);
    if (!faults_.fail_alloc) return;
    faults_.fail_alloc = false;
    EF_THROW(OutOfMemory, "injected failure of a ", what, " allocation");
  }
  void injected_stream_failure() {
    std::lock_guard<std::mutex> lock(fault_mutex_);
    if (faults_.fail_stream > 0 && --faults_.fail_stream == 0) {
      EF_THROW(BackendError, "injected failure of a stream creation");
    }
  }
  void injected_copy_fault() {
    double delay_us;
    {
      std::lock_guard<std::mutex> lock(fault_mutex_);
      delay_us = faults_.copy_delay_us;
      if (faults_.fail_copy > 0 && --faults_.fail_copy == 0) {
        EF_THROW(BackendError, "injected failure of a copy");
      }
    }
    if (delay_us > 0.0)
      std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(delay_us));
  }

  LinkModel link_;
  std::mutex link_mutex_;
  std::chrono::steady_clock::time_point link_free_at_{};
  std::mutex fault_mutex_;
  testing::CpuFaults faults_;

  friend void testing::inject_faults(Backend&, const testing::CpuFaults&);
};

}  // namespace

std::shared_ptr<Backend> make_cpu_backend(LinkModel link) {
  return std::make_shared<CpuBackend>(link);
}

void testing::inject_faults(Backend& backend, const CpuFaults& faults) {
  auto* cpu = dynamic_cast<CpuBackend*>(&backend);
  EF_CHECK(cpu != nullptr, "fault injection needs the CPU backend, got ", backend.name());
  std::lock_guard<std::mutex> lock(cpu->fault_mutex_);
  cpu->faults_ = faults;
}

}  // namespace expertflow
