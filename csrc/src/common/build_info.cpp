#include "common/backends.h"
#include "expertflow/error.h"

namespace expertflow {

std::shared_ptr<Backend> make_backend(DeviceKind kind, int device, LinkModel link) {
  if (kind == DeviceKind::kCpu) {
    EF_CHECK(device == 0, "the CPU backend has one device, 0; got device ", device);
    return make_cpu_backend(link);
  }
  EF_CHECK(
      link.gbps == 0.0 && link.latency_us == 0.0,
      "a link model emulates a link on the CPU backend only; the CUDA backend uses the real one");
#ifdef EXPERTFLOW_WITH_CUDA
  return make_cuda_backend(device);
#else
  EF_THROW(InvalidArgument,
           "CUDA requested but this expertflow was built without the CUDA backend "
           "(no CUDA toolkit found, or EXPERTFLOW_CUDA=OFF); reinstall with the toolkit on PATH "
           "or CUDAToolkit_ROOT set, or use device \"cpu\"");
#endif
}

BuildInfo build_info() {
  BuildInfo info;
  info.version = EXPERTFLOW_VERSION;
  BackendInfo cpu;
  cpu.name = "cpu";
  cpu.built = cpu.usable = true;
  cpu.device_count = 1;
  info.backends.push_back(cpu);
#ifdef EXPERTFLOW_WITH_CUDA
  info.backends.push_back(cuda_backend_info(&info.cuda_runtime));
#else
  BackendInfo cuda;
  cuda.name = "cuda";
  cuda.reason = "not built: no CUDA toolkit was found at build time, or EXPERTFLOW_CUDA=OFF";
  info.backends.push_back(cuda);
#endif
  return info;
}

}  // namespace expertflow
