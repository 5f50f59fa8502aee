// The CUDA backend: page-locked host memory, one device allocation for the slots,
// non-blocking streams with priorities, and events as fences. Runtime API only.
#include <cuda_runtime.h>

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

class CudaFence final : public Fence {
 public:
  CudaFence() { EF_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~CudaFence() override { EF_CUDA_CHECK_WARN(cudaEventDestroy(event_)); }
  cudaEvent_t event() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

cudaEvent_t event_of(Fence& fence) { return static_cast<CudaFence&>(fence).event(); }
cudaStream_t stream_of(StreamHandle stream) { return reinterpret_cast<cudaStream_t>(stream); }

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
    select();
    void* ptr = nullptr;
    cudaError_t status = cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable);
    if (status != cudaSuccess) {
      EF_THROW(OutOfMemory, "cudaHostAlloc of ", bytes,
               " bytes failed: ", cudaGetErrorString(status));
    }
    return ptr;
  }
  void free_host(void* ptr) noexcept override { EF_CUDA_CHECK_WARN(cudaFreeHost(ptr)); }
  void register_host(void* ptr, std::size_t bytes) override {
    select();
    EF_CUDA_CHECK(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable));
  }
  void unregister_host(void* ptr) noexcept override { EF_CUDA_CHECK_WARN(cudaHostUnregister(ptr)); }

  void* alloc_device(std::size_t bytes) override {
    EF_CHECK(bytes > 0, "cannot allocate 0 bytes of device memory");
    select();
    void* ptr = nullptr;
    cudaError_t status = cudaMalloc(&ptr, bytes);
    if (status != cudaSuccess) {
      EF_THROW(OutOfMemory, "cudaMalloc of ", bytes, " bytes on cuda:", device_,
               " failed: ", cudaGetErrorString(status));
    }
    return ptr;
  }
  void free_device(void* ptr) noexcept override { EF_CUDA_CHECK_WARN(cudaFree(ptr)); }

  StreamHandle create_stream(bool high_priority) override {
    select();
    int lowest = 0, highest = 0;
    EF_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lowest, &highest));
    cudaStream_t stream = nullptr;
    EF_CUDA_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking,
                                               high_priority ? highest : lowest));
    return reinterpret_cast<StreamHandle>(stream);
  }
  void destroy_stream(StreamHandle stream) noexcept override {
    EF_CUDA_CHECK_WARN(cudaStreamDestroy(stream_of(stream)));
  }
  void check_stream(StreamHandle stream) const override {
    // The legacy (0) and per-thread (2) default streams belong to the current device.
    if (stream == 0 || stream == reinterpret_cast<StreamHandle>(cudaStreamPerThread)) return;
    int device = -1;
    cudaError_t status = cudaStreamGetDevice(stream_of(stream), &device);
    EF_CHECK(status == cudaSuccess, "stream 0x", std::hex, stream, std::dec,
             " is not a valid CUDA stream: ", cudaGetErrorString(status));
    EF_CHECK(device == device_, "stream 0x", std::hex, stream, std::dec,
             " belongs to cuda:", device, ", not to this cache's cuda:", device_);
  }

  std::unique_ptr<Fence> create_fence() override {
    select();
    return std::make_unique<CudaFence>();
  }
  void record(Fence& fence, StreamHandle stream) override {
    select();
    EF_CUDA_CHECK(cudaEventRecord(event_of(fence), stream_of(stream)));
  }
  void wait(StreamHandle stream, Fence& fence) override {
    select();
    EF_CUDA_CHECK(cudaStreamWaitEvent(stream_of(stream), event_of(fence), 0));
  }
  void synchronize(Fence& fence) override { EF_CUDA_CHECK(cudaEventSynchronize(event_of(fence))); }

  void copy_to_device(void* dst, const void* src, std::size_t bytes, StreamHandle stream) override {
    select();
    EF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_of(stream)));
  }

 private:
  // The runtime's current device is per thread; every entry point sets it.
  void select() const { EF_CUDA_CHECK(cudaSetDevice(device_)); }

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
