// The interface each backend (CPU, CUDA) supplies: memory, streams, fences and copies.
//
// The caching logic (ExpertCache, TransferEngine, the policies) is written once against
// this interface, in the manner of PyTorch's CachingHostAllocator: shared logic, and
// per-backend allocate / free / record / query.
//
// Streams and fences follow CUDA's model. A stream is an ordered queue of device work,
// named by an integer handle (a cudaStream_t on CUDA; 0 is the default stream). A fence
// marks a point in a stream: record() places it, wait() makes another stream wait for
// it without blocking the host, synchronize() blocks the host (sleeping, not spinning, on
// CUDA), query() asks without blocking. A timer is a fence that also notes when it
// completed, so that the time a stream spent between two timers can be read.
//
// Devices: every entry point of a device backend works on the backend's device and
// restores the caller's current device before it returns (c10's CUDAGuard is the model),
// so building or using a pool never changes which device the caller's thread is on.
//
// On the CPU backend the "device" is host memory and a stream is the host thread that
// issues the work, which runs synchronously: work is complete when record() returns, so
// fences are always complete and waits return at once. Ordering between host threads is
// the caller's job (ExpertCache does it under its lock).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace expertflow {

enum class DeviceKind { kCpu, kCuda };

// A stream handle as an integer: a cudaStream_t on CUDA, 0 on the CPU.
using StreamHandle = std::uintptr_t;

// An emulated host-to-device link for the CPU backend, so that CPU runs can stand in for
// a PCIe link in experiments. Zero bandwidth means no model: copies run at memcpy speed.
struct LinkModel {
  double gbps = 0.0;        // bandwidth, 1e9 bytes per second
  double latency_us = 0.0;  // fixed cost per copy
};

// A point in a stream. Opaque; created by its backend and only used with it.
class Fence {
 public:
  virtual ~Fence() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual DeviceKind kind() const = 0;
  virtual std::string name() const = 0;  // "cpu", "cuda:0"

  // Host memory that the copy engine reads at full speed (page-locked on CUDA).
  // Aligned to at least 4096 bytes. Throws OutOfMemory.
  virtual void* alloc_host(std::size_t bytes) = 0;
  virtual void free_host(void* ptr) noexcept = 0;
  // Page-locks memory that already holds data, without copying it.
  virtual void register_host(void* ptr, std::size_t bytes) = 0;
  virtual void unregister_host(void* ptr) noexcept = 0;

  virtual void* alloc_device(std::size_t bytes) = 0;
  virtual void free_device(void* ptr) noexcept = 0;

  // A new non-blocking stream; high priority work is scheduled first where supported.
  virtual StreamHandle create_stream(bool high_priority) = 0;
  virtual void destroy_stream(StreamHandle stream) noexcept = 0;
  // Throws InvalidArgument naming the handle and both devices if work cannot be enqueued on
  // it here: a stream of another device, a default stream (0, per-thread) while the
  // caller's current device is another one, or any stream but 0 on the CPU. stream_device
  // is the device the caller knows the stream belongs to (a torch stream's), or -1 when
  // unknown. A raw handle must name a live stream: that is the caller's contract, since no
  // runtime call can tell a stale or made-up handle from a real one without undefined
  // behaviour.
  virtual void check_stream(StreamHandle stream, int stream_device) const = 0;

  virtual std::unique_ptr<Fence> create_fence() = 0;
  // A fence that also notes when it completed, for elapsed_seconds().
  virtual std::unique_ptr<Fence> create_timer() = 0;
  virtual void record(Fence& fence, StreamHandle stream) = 0;
  virtual void wait(StreamHandle stream, Fence& fence) = 0;  // the stream waits, not the host
  virtual void synchronize(Fence& fence) = 0;                // the host waits
  // Whether the work before the fence's last record has completed (a fence never recorded
  // has). Never blocks.
  virtual bool query(Fence& fence) = 0;
  // Seconds between two timers recorded in that order on one stream, once the later has
  // completed; nullopt before. Never blocks.
  virtual std::optional<double> elapsed_seconds(Fence& start, Fence& end) = 0;

  // Enqueues a host-to-device copy on the stream; the host memory must stay valid until
  // a fence recorded after it completes.
  virtual void copy_to_device(void* dst, const void* src, std::size_t bytes,
                              StreamHandle stream) = 0;
};

// Creates a backend. CUDA: throws InvalidArgument when the build has no CUDA backend or
// no usable device has that index, with the reason and what to do.
std::shared_ptr<Backend> make_backend(DeviceKind kind, int device = 0, LinkModel link = {});

// What this build contains and what works on this machine now.
struct BackendInfo {
  std::string name;     // "cpu", "cuda"
  bool built = false;   // compiled into this build
  bool usable = false;  // built, and a device is present now
  std::string reason;   // why not usable, empty when usable
  int device_count = 0;
};
struct BuildInfo {
  std::string version;
  std::string cuda_runtime;  // version linked, empty without CUDA
  std::vector<BackendInfo> backends;
};
BuildInfo build_info();

}  // namespace expertflow
