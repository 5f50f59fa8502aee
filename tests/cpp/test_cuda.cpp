// The cache on the CUDA backend: slot contents read back from the device, prefetches of
// one and of several chunks, the caller's current device left as it was, streams of
// another device refused, close racing acquires, and stall time measured on the stream.
// Exits 77 (skipped) when this build or this machine has no usable CUDA device; tests that
// need two devices return early, saying so, on a machine with one.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "cache_fixture.h"
#include "ef_test.h"
#include "expertflow/backend.h"
#include "expertflow/error.h"
#include "expertflow/expert_cache.h"
#include "expertflow/transfer_engine.h"

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

std::shared_ptr<ef::HostPool> cuda_pool(int layers, int experts, std::size_t blob = kBlob) {
  auto pool = std::make_shared<ef::HostPool>(ef::make_backend(ef::DeviceKind::kCuda, 0),
                                             ef::ExpertLayout(layers, experts, blob));
  ef_fixture::fill_pattern(*pool);
  return pool;
}

int device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

int current_device() {
  int device = -1;
  return cudaGetDevice(&device) == cudaSuccess ? device : -1;
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

TEST(cuda_current_device_is_left_as_it_was) {
  // On a machine with one device the caller's device is also the cache's; the test still
  // runs every entry point and checks nothing moved.
  const int last = device_count() - 1;
  ASSERT_TRUE(cudaSetDevice(0) == cudaSuccess);
  Stream stream;  // a stream of cuda:0, the cache's device
  ASSERT_TRUE(cudaSetDevice(last) == cudaSuccess);
  {
    auto pool = cuda_pool(2, 8, 2 * ef::TransferEngine::kPrefetchChunkBytes + 4096);
    EXPECT_EQ(current_device(), last);
    ef::ExpertCache cache(pool, 4, ef_fixture::policy("expertflow"), 2);
    EXPECT_EQ(current_device(), last);
    cache.prefetch(1, {2, 3}, {});
    EXPECT_TRUE(ef_fixture::wait_until([&] { return cache.pending_prefetches() == 0; }));
    for (int layer : {0, 1}) {
      std::vector<void*> a = cache.acquire(layer, {0, 2}, stream.handle());
      EXPECT_EQ(current_device(), last);
      cache.release(layer, {0, 2}, stream.handle());
      EXPECT_EQ(current_device(), last);
    }
    (void)cache.stats();
    cache.close();
    EXPECT_EQ(current_device(), last);
  }  // the free paths: arena, pool, streams, events
  EXPECT_EQ(current_device(), last);
  ASSERT_TRUE(cudaSetDevice(0) == cudaSuccess);
}

TEST(cuda_stream_of_a_named_other_device_is_refused_without_touching_it) {
  auto pool = cuda_pool(1, 4);
  ef::ExpertCache cache(pool, 2, ef_fixture::policy("lru"));
  // A made-up handle: the named device settles it, so no CUDA call may see the handle.
  EXPECT_THROW_MSG(cache.acquire(0, {0}, 0xdead0, 1), ef::InvalidArgument,
                   "belongs to cuda:1, not to this cache's cuda:0");
  Stream stream;
  std::vector<void*> a = cache.acquire(0, {0}, stream.handle(), 0);
  EXPECT_TRUE(device_holds(a[0], 0, kBlob, stream.stream));
  EXPECT_THROW_MSG(cache.release(0, {0}, 0xdead0, 1), ef::InvalidArgument, "cuda:1");
  cache.release(0, {0}, stream.handle(), 0);
}

TEST(cuda_streams_of_another_device_are_refused) {
  if (device_count() < 2) {
    std::fprintf(stderr, "needs two CUDA devices; this machine has %d\n", device_count());
    return;
  }
  ASSERT_TRUE(cudaSetDevice(1) == cudaSuccess);
  Stream other;  // of cuda:1
  ASSERT_TRUE(cudaSetDevice(0) == cudaSuccess);
  auto pool = cuda_pool(1, 4);
  ef::ExpertCache cache(pool, 2, ef_fixture::policy("lru"));
  EXPECT_THROW_MSG(cache.acquire(0, {0}, other.handle()), ef::InvalidArgument,
                   "belongs to cuda:1, not to this cache's cuda:0");
  ASSERT_TRUE(cudaSetDevice(1) == cudaSuccess);
  EXPECT_THROW_MSG(cache.acquire(0, {0}, 0), ef::InvalidArgument,
                   "current device cuda:1, not to this cache's cuda:0");
  EXPECT_EQ(current_device(), 1);
  ASSERT_TRUE(cudaSetDevice(0) == cudaSuccess);
  std::vector<void*> a = cache.acquire(0, {0}, 0);  // still usable
  EXPECT_TRUE(device_holds(a[0], 0, kBlob, nullptr));
  cache.release(0, {0}, 0);
}

TEST(cuda_prefetch_of_several_chunks_arrives_whole) {
  constexpr std::size_t kChunk = ef::TransferEngine::kPrefetchChunkBytes;
  const std::size_t blob = 3 * kChunk + kChunk / 2 + 300;
  Stream stream;
  auto pool = cuda_pool(1, 3, blob);
  ef::ExpertCache cache(pool, 2, ef_fixture::policy("lru"));
  cache.prefetch(0, {1}, {});
  EXPECT_TRUE(ef_fixture::wait_until([&] { return cache.pending_prefetches() == 0; }));
  EXPECT_EQ(cache.stats().bytes_prefetch, blob);
  std::vector<void*> a = cache.acquire(0, {1, 2}, stream.handle());  // a hit and a miss
  EXPECT_TRUE(device_holds(a[0], 1, blob, stream.stream));
  EXPECT_TRUE(device_holds(a[1], 2, blob, stream.stream));
  cache.release(0, {1, 2}, stream.handle());
  EXPECT_EQ(cache.stats().prefetch_hits, 1u);
}

TEST(cuda_stall_is_the_time_the_stream_waited) {
  constexpr std::size_t kBig = std::size_t{32} << 20;  // about a millisecond over PCIe 5
  Stream stream;
  auto pool = cuda_pool(2, 2, kBig);
  ef::ExpertCache cache(pool, 2, ef_fixture::policy("lru"));
  cache.acquire(1, {0, 1}, stream.handle());  // two misses: the stream waits for 64 MiB
  cache.release(1, {0, 1}, stream.handle());
  ef::CacheStats stats = cache.stats();  // waits for the stream's timers
  EXPECT_TRUE(stats.layers[1].stall_seconds > 1e-5);
  EXPECT_EQ(stats.layers[0].stall_seconds, 0.0);
  EXPECT_TRUE(stats.stall_seconds < 5.0);
}

TEST(cuda_close_during_acquires) {
  for (int round = 0; round < 10; ++round) {
    auto pool = cuda_pool(2, 8);
    ef::ExpertCache cache(pool, 6, ef_fixture::policy("lru"));
    std::atomic<int> started{0}, other_errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        cudaSetDevice(0);
        Stream stream;
        ++started;
        for (int i = 0;; ++i) {
          std::vector<int> experts = {(t + i) % 8};
          try {
            cache.acquire(i % 2, experts, stream.handle());
            cache.release(i % 2, experts, stream.handle());
          } catch (const ef::StateError&) {
            break;
          } catch (const std::exception& e) {
            std::fprintf(stderr, "unexpected: %s\n", e.what());
            ++other_errors;
            break;
          }
        }
        cudaStreamSynchronize(stream.stream);
      });
    }
    while (started < 4) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::microseconds(300 * round));
    cache.close();
    for (std::thread& thread : threads) thread.join();
    EXPECT_EQ(other_errors.load(), 0);
    EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);  // no copy faulted on a freed slot
  }
}

#endif  // EXPERTFLOW_WITH_CUDA

int main(int argc, char** argv) {
  std::string reason = cuda_unusable_reason();
  if (!reason.empty()) EF_SKIP_ALL(reason);
  return ef_test::run_all(argc, argv);
}
