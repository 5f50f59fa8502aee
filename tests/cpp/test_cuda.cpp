// The cache on the CUDA backend: slot contents read back from the device, and a prefetch.
// Exits 77 (skipped) when this build or this machine has no usable CUDA device.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "cache_fixture.h"
#include "ef_test.h"
#include "expertflow/backend.h"
#include "expertflow/error.h"
#include "expertflow/expert_cache.h"

#ifdef EXPERTFLOW_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ef = expertflow;

namespace {

// Why CUDA cannot be tested here, or empty when it can.
std::string cuda_unusable_reason() {
  for (const ef::BackendInfo& b : ef::build_info().backends)
    if (b.name == "cuda") return b.usable ? std::string() : "cuda backend not usable: " + b.reason;
  return "this build has no cuda backend";
}

}  // namespace

#ifdef EXPERTFLOW_WITH_CUDA

namespace {

constexpr std::size_t kBlob = 64 * 1024 + 300;

struct Stream {
  Stream() { cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); }
  ~Stream() { cudaStreamDestroy(stream); }
  ef::StreamHandle handle() const { return reinterpret_cast<ef::StreamHandle>(stream); }
  cudaStream_t stream = nullptr;
};

// Copies a device slot back on the stream the cache made safe, and checks its bytes.
bool device_holds(const void* addr, int key, std::size_t bytes, cudaStream_t stream) {
  std::vector<std::uint8_t> host(bytes);
  if (cudaMemcpyAsync(host.data(), addr, bytes, cudaMemcpyDeviceToHost, stream) != cudaSuccess)
    return false;
  if (cudaStreamSynchronize(stream) != cudaSuccess) return false;
  return ef_fixture::holds(host.data(), key, bytes);
}

std::shared_ptr<ef::HostPool> cuda_pool(int layers, int experts) {
  auto pool = std::make_shared<ef::HostPool>(ef::make_backend(ef::DeviceKind::kCuda, 0),
                                             ef::ExpertLayout(layers, experts, kBlob));
  ef_fixture::fill_pattern(*pool);
  return pool;
}

}  // namespace

TEST(cuda_backend_basics) {
  auto backend = ef::make_backend(ef::DeviceKind::kCuda, 0);
  EXPECT_TRUE(backend->kind() == ef::DeviceKind::kCuda);
  EXPECT_TRUE(backend->name().rfind("cuda", 0) == 0);
  EXPECT_THROW(ef::make_backend(ef::DeviceKind::kCuda, 9999), ef::InvalidArgument);
}

TEST(cuda_slot_content) {
  Stream stream;
  ASSERT_TRUE(stream.stream != nullptr);
  auto pool = cuda_pool(2, 8);
  ef::ExpertCache cache(pool, 4, ef_fixture::policy("lru"));
  int step = 0;
  for (int round = 0; round < 3; ++round) {
    for (int layer = 0; layer < 2; ++layer) {
      for (int e = 0; e + 2 < 8; e += 2) {
        std::vector<int> experts = {e, (e + 3) % 8, (e + 5 + round) % 8};
        if (experts[2] == experts[0] || experts[2] == experts[1]) experts.pop_back();
        // Alternate between a created stream and the default stream.
        cudaStream_t s = (step++ % 2) ? stream.stream : nullptr;
        ef::StreamHandle h = reinterpret_cast<ef::StreamHandle>(s);
        std::vector<void*> addrs = cache.acquire(layer, experts, h);
        ASSERT_TRUE(addrs.size() == experts.size());
        for (std::size_t i = 0; i < experts.size(); ++i)
          EXPECT_TRUE(device_holds(addrs[i], layer * 8 + experts[i], kBlob, s));
        cache.release(layer, experts, h);
      }
    }
  }
  ef::CacheStats st = cache.stats();
  EXPECT_TRUE(st.misses > 0 && st.evictions > 0);
  EXPECT_EQ(st.bytes_demand, st.misses * kBlob);
}

TEST(cuda_prefetch) {
  Stream stream;
  auto pool = cuda_pool(2, 8);
  ef::ExpertCache cache(pool, 4, ef_fixture::policy("expertflow"), 2);
  std::vector<void*> a = cache.acquire(0, {0, 1}, stream.handle());
  EXPECT_TRUE(device_holds(a[0], 0, kBlob, stream.stream));
  cache.release(0, {0, 1}, stream.handle());
  cache.prefetch(1, {2, 5}, {0.9f, 0.4f});
  EXPECT_EQ(cache.stats().prefetch_issued, 2u);
  // Let both copies be issued: an acquire may cancel a prefetch still queued.
  EXPECT_TRUE(ef_fixture::wait_until([&] { return cache.stats().bytes_prefetch == 2 * kBlob; }));
  std::vector<void*> b = cache.acquire(1, {5, 2}, stream.handle());
  EXPECT_TRUE(device_holds(b[0], 8 + 5, kBlob, stream.stream));
  EXPECT_TRUE(device_holds(b[1], 8 + 2, kBlob, stream.stream));
  cache.release(1, {5, 2}, stream.handle());
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.prefetch_hits, 2u);
  EXPECT_EQ(s.misses, 2u);
  cache.close();
  EXPECT_THROW(cache.acquire(0, {0}, stream.handle()), ef::StateError);
}

TEST(cuda_registered_pool) {
  // Caller memory holding the weights is page-locked in place, not copied.
  ef::ExpertLayout layout(1, 4, kBlob);
  std::size_t bytes = (layout.total_bytes() + 4095) / 4096 * 4096;
  auto* base = static_cast<std::byte*>(std::aligned_alloc(4096, bytes));
  ASSERT_TRUE(base != nullptr);
  {
    auto pool = std::make_shared<ef::HostPool>(ef::make_backend(ef::DeviceKind::kCuda, 0), layout,
                                               base, bytes);
    EXPECT_TRUE(!pool->owns_memory());
    ef_fixture::fill_pattern(*pool);
    Stream stream;
    ef::ExpertCache cache(pool, 2, ef_fixture::policy("lru"));
    for (int e = 0; e < 4; ++e) {
      std::vector<void*> a = cache.acquire(0, {e}, stream.handle());
      EXPECT_TRUE(device_holds(a[0], e, kBlob, stream.stream));
      cache.release(0, {e}, stream.handle());
    }
  }
  std::free(base);
}

#endif  // EXPERTFLOW_WITH_CUDA

int main(int argc, char** argv) {
  std::string reason = cuda_unusable_reason();
  if (!reason.empty()) EF_SKIP_ALL(reason);
  return ef_test::run_all(argc, argv);
}
