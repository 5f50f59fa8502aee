// The CUDA backend: page-locked host memory, one device allocation for the slots,
// non-blocking streams with priorities, and events as fences. Runtime API only.
#include <cuda_runtime.h>

#include <sstream>
#include <string>

#include "common/backends.h"
#include "expertflow/backend.h"
#include "expertflow/error.h"

// Throws BackendError (OutOfMemory for allocation failures) naming the call and the error.
#define EF_CUDA_CHECK(call)                                                       \
  do {                                                                            \
    cudaError_t ef_status = (call);                                               \
    if (ef_status != cudaSuccess) {                                               \
      if (ef_status == cudaErrorMemoryAllocation) {                               \
        EF_THROW(OutOfMemory, #call, " failed: ", cudaGetErrorString(ef_status)); \
      }                                                                           \
      EF_THROW(BackendError, #call, " failed: ", cudaGetErrorString(ef_status));  \
    }                                                                             \
  } while (0)

// For destructors and free paths: warns and carries on.
#define EF_CUDA_CHECK_WARN(call)                                                            \
  do {                                                                                      \
    cudaError_t ef_status = (call);                                                         \
    if (ef_status != cudaSuccess) {                                                         \
      ::expertflow::warn(std::string(#call) + " failed: " + cudaGetErrorString(ef_status)); \
    }                                                                                       \
  } while (0)

namespace expertflow {

namespace {

// Makes `device` current for a scope and gives the caller's device back at its end, as
// c10's CUDAGuard does; cudaSetDevice only when they differ, so that the usual case (the
// caller already on the backend's device) costs one cudaGetDevice, a thread-local read.
// A quiet guard (free paths, destructors) warns instead of throwing.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device, bool quiet = false) {
    if (quiet) {
      changed_ = cudaGetDevice(&previous_) == cudaSuccess && previous_ != device &&
                 cudaSetDevice(device) == cudaSuccess;
      return;
    }
    EF_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      EF_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) EF_CUDA_CHECK_WARN(cudaSetDevice(previous_));
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool changed_ = false;
};

// Every event the host may wait on blocks the waiting thread instead of spinning a core
// (cudaEventBlockingSync). Plain fences skip timing, which makes record and wait cheaper.
class CudaFence final : public Fence {
 public:
  CudaFence(int device, bool timing) : device_(device) {
    DeviceGuard guard(device);  // an event belongs to the device current at its creation
    unsigned flags = cudaEventBlockingSync | (timing ? 0u : unsigned{cudaEventDisableTiming});
    EF_CUDA_CHECK(cudaEventCreateWithFlags(&event_, flags));
  }
  ~CudaFence() override {
    DeviceGuard guard(device_, /*quiet=*/true);
    EF_CUDA_CHECK_WARN(cudaEventDestroy(event_));
  }
  cudaEvent_t event() const { return event_; }

 private:
  int device_;
  cudaEvent_t event_ = nullptr;
};

cudaEvent_t event_of(Fence& fence) { return static_cast<CudaFence&>(fence).event(); }
cudaStream_t stream_of(StreamHandle stream) { return reinterpret_cast<cudaStream_t>(stream); }

std::string hex(StreamHandle stream) {
  std::ostringstream out;
  out << "0x" << std::hex << stream;
  return out.str();
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    EF_CHECK(status == cudaSuccess,
             "CUDA requested but no CUDA device is usable: ", cudaGetErrorString(status),
             "; use device \"cpu\"");
    EF_CHECK(device >= 0 && device < count, "CUDA device ", device, " does not exist (", count,
             " device(s) present)");
  }

  DeviceKind kind() const override { return DeviceKind::kCuda; }
  std::string name() const override { return "cuda:" + std::to_string(device_); }

  void* alloc_host(std::size_t bytes) override {
    EF_CHECK(bytes > 0, "cannot allocate 0 bytes of pinned host memory");
    DeviceGuard guard(device_);
    void* ptr = nullptr;
    cudaError_t status = cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable);
    if (status != cudaSuccess) {
      EF_THROW(OutOfMemory, "cudaHostAlloc of ", bytes,
               " bytes failed: ", cudaGetErrorString(status));
    }
    return ptr;
  }
  void free_host(void* ptr) noexcept override {
    DeviceGuard guard(device_, /*quiet=*/true);
    EF_CUDA_CHECK_WARN(cudaFreeHost(ptr));
  }
  void register_host(void* ptr, std::size_t bytes) override {
    DeviceGuard guard(device_);
    EF_CUDA_CHECK(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable));
  }
  void unregister_host(void* ptr) noexcept override {
    DeviceGuard guard(device_, /*quiet=*/true);
    EF_CUDA_CHECK_WARN(cudaHostUnregister(ptr));
  }

  void* alloc_device(std::size_t bytes) override {
    EF_CHECK(bytes > 0, "cannot allocate 0 bytes of device memory");
    DeviceGuard guard(device_);
    void* ptr = nullptr;
    cudaError_t status = cudaMalloc(&ptr, bytes);
    if (status != cudaSuccess) {
      EF_THROW(OutOfMemory, "cudaMalloc of ", bytes, " bytes on cuda:", device_,
               " failed: ", cudaGetErrorString(status));
    }
    return ptr;
  }
  // cudaFree synchronises the device: callers never hold a lock around it.
  void free_device(void* ptr) noexcept override {
    DeviceGuard guard(device_, /*quiet=*/true);
    EF_CUDA_CHECK_WARN(cudaFree(ptr));
  }

  StreamHandle create_stream(bool high_priority) override {
    DeviceGuard guard(device_);
    int lowest = 0, highest = 0;
    EF_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lowest, &highest));
    cudaStream_t stream = nullptr;
    EF_CUDA_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking,
                                               high_priority ? highest : lowest));
    return reinterpret_cast<StreamHandle>(stream);
  }
  void destroy_stream(StreamHandle stream) noexcept override {
    DeviceGuard guard(device_, /*quiet=*/true);
    EF_CUDA_CHECK_WARN(cudaStreamDestroy(stream_of(stream)));
  }

  void check_stream(StreamHandle stream, int stream_device) const override {
    // A device the caller knows (a torch stream's) settles it without touching the handle.
    if (stream_device >= 0) {
      EF_CHECK(stream_device == device_, "stream ", hex(stream), " belongs to cuda:", stream_device,
               ", not to this cache's cuda:", device_);
      return;
    }
    if (stream == 0 || stream == reinterpret_cast<StreamHandle>(cudaStreamPerThread)) {
      // A default stream means the caller's current device's: ordering it here, on ours,
      // would not order the caller's work.
      int current = -1;
      EF_CUDA_CHECK(cudaGetDevice(&current));
      EF_CHECK(current == device_, "the default stream ", hex(stream),
               " belongs to the current device cuda:", current,
               ", not to this cache's cuda:", device_, "; make cuda:", device_,
               " current or pass a stream of it");
      return;
    }
    // A raw handle of unknown device. The cache is about to record on it and make it wait,
    // which needs a live stream anyway (the caller's contract); asking its device first adds
    // no risk beyond that and turns a live stream of another device into a clear error
    // instead of cudaErrorInvalidResourceHandle, or a wait ordered on the wrong device.
    int device = -1;
    cudaError_t status = cudaStreamGetDevice(stream_of(stream), &device);
    EF_CHECK(status == cudaSuccess, "stream ", hex(stream),
             " is not a valid CUDA stream: ", cudaGetErrorString(status));
    EF_CHECK(device == device_, "stream ", hex(stream), " belongs to cuda:", device,
             ", not to this cache's cuda:", device_);
  }

  std::unique_ptr<Fence> create_fence() override {
    return std::make_unique<CudaFence>(device_, /*timing=*/false);
  }
  std::unique_ptr<Fence> create_timer() override {
    return std::make_unique<CudaFence>(device_, /*timing=*/true);
  }
  void record(Fence& fence, StreamHandle stream) override {
    DeviceGuard guard(device_);  // the legacy default stream is the current device's
    EF_CUDA_CHECK(cudaEventRecord(event_of(fence), stream_of(stream)));
  }
  void wait(StreamHandle stream, Fence& fence) override {
    DeviceGuard guard(device_);
    EF_CUDA_CHECK(cudaStreamWaitEvent(stream_of(stream), event_of(fence), 0));
  }
  void synchronize(Fence& fence) override {
    DeviceGuard guard(device_);
    EF_CUDA_CHECK(cudaEventSynchronize(event_of(fence)));
  }
  bool query(Fence& fence) override {
    DeviceGuard guard(device_);
    cudaError_t status = cudaEventQuery(event_of(fence));
    if (status == cudaErrorNotReady) return false;
    EF_CUDA_CHECK(status);
    return true;
  }
  std::optional<double> elapsed_seconds(Fence& start, Fence& end) override {
    // start precedes end on one stream, so end complete means both are; polling with
    // cudaEventQuery first is what the runtime documents.
    if (!query(end)) return std::nullopt;
    DeviceGuard guard(device_);
    float ms = 0.0f;
    cudaError_t status = cudaEventElapsedTime(&ms, event_of(start), event_of(end));
    if (status == cudaErrorNotReady) return std::nullopt;
    EF_CUDA_CHECK(status);
    return static_cast<double>(ms) * 1e-3;
  }

  void copy_to_device(void* dst, const void* src, std::size_t bytes, StreamHandle stream) override {
    DeviceGuard guard(device_);
    EF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_of(stream)));
  }

 private:
  int device_;
};

}  // namespace

std::shared_ptr<Backend> make_cuda_backend(int device) {
  return std::make_shared<CudaBackend>(device);
}

BackendInfo cuda_backend_info(std::string* runtime_version) {
  BackendInfo info;
  info.name = "cuda";
  info.built = true;
  int version = 0;
  if (cudaRuntimeGetVersion(&version) == cudaSuccess) {
    *runtime_version = std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
  }
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaErrorInsufficientDriver) {
    info.reason = "no CUDA driver, or one older than the CUDA " + *runtime_version +
                  " runtime this build links (" + cudaGetErrorString(status) + ")";
  } else if (status != cudaSuccess) {
    info.reason = std::string("no usable CUDA device: ") + cudaGetErrorString(status);
  } else if (count == 0) {
    info.reason = "no CUDA device present";
  } else {
    info.usable = true;
    info.device_count = count;
  }
  return info;
}

}  // namespace expertflow
