// Fault injection: a failed copy or allocation raises a clear error, and afterwards every
// expert is correct, no slot is left pinned or in flight, and the cache keeps working.
// (The sanitizer build of this file also checks that nothing leaks.)
#include "cache_fixture.h"
#include "expertflow/testing.h"

namespace {

namespace ef = expertflow;
using ef::testing::CpuFaults;

struct Rig {
  std::shared_ptr<ef::HostPool> pool = ef_fixture::make_pool(2, 6, 4096);
  std::unique_ptr<ef::ExpertCache> cache;
  explicit Rig(int slots = 4) {
    cache = std::make_unique<ef::ExpertCache>(pool, slots, ef_fixture::policy("lru"));
  }
  void inject(CpuFaults faults) { ef::testing::inject_faults(pool->backend(), faults); }
  // Every slot can be acquired at once (nothing pinned or in flight) and holds the right bytes.
  void expect_healthy() {
    EXPECT_TRUE(ef_fixture::wait_until([&] { return cache->pending_prefetches() == 0; }));
    EXPECT_EQ(ef_fixture::use(*cache, 1, {0, 1, 2, 3}), 0);
    EXPECT_EQ(ef_fixture::use(*cache, 0, {5, 4, 3, 2}), 0);
  }
};

TEST(failed_demand_copy_raises_and_the_cache_recovers) {
  Rig rig;
  EXPECT_EQ(ef_fixture::use(*rig.cache, 0, {0}), 0);
  rig.inject({.fail_copy = 1});
  EXPECT_THROW_MSG(rig.cache->acquire(0, {1}, 0), ef::BackendError, "injected failure of a copy");
  EXPECT_TRUE(!rig.cache->resident(0, 1));
  EXPECT_TRUE(rig.cache->resident(0, 0));
  EXPECT_EQ(ef_fixture::use(*rig.cache, 0, {1}), 0);  // copied again, correctly
  rig.expect_healthy();
}

TEST(failure_midway_through_an_acquire_unpins_everything) {
  Rig rig;
  rig.inject({.fail_copy = 2});  // the first of three misses copies, the second fails
  EXPECT_THROW(rig.cache->acquire(0, {1, 2, 3}, 0), ef::BackendError);
  EXPECT_EQ(rig.cache->stats().misses, 3u);
  rig.expect_healthy();
}

TEST(failed_prefetch_is_copied_on_demand_later) {
  Rig rig;
  rig.inject({.fail_copy = 1});
  rig.cache->prefetch(1, {4}, {});
  EXPECT_TRUE(ef_fixture::wait_until([&] { return rig.cache->pending_prefetches() == 0; }));
  EXPECT_EQ(rig.cache->stats().prefetch_failed, 1u);
  EXPECT_EQ(ef_fixture::use(*rig.cache, 1, {4}), 0);
  EXPECT_EQ(rig.cache->stats().bytes_demand, 4096u);
  rig.expect_healthy();
}

TEST(slow_copies_are_waited_for) {
  Rig rig;
  rig.inject({.copy_delay_us = 20000});
  rig.cache->prefetch(1, {2, 3}, {});
  EXPECT_EQ(ef_fixture::use(*rig.cache, 1, {2, 3, 5}), 0);  // in flight, queued, or missing
  rig.inject({});
  rig.expect_healthy();
}

TEST(failed_allocations_raise_out_of_memory_and_leave_nothing_behind) {
  auto backend = ef::make_backend(ef::DeviceKind::kCpu);
  ef::testing::inject_faults(*backend, {.fail_alloc = true});
  EXPECT_THROW_MSG(ef::HostPool(backend, ef::ExpertLayout(1, 2, 256)), ef::OutOfMemory,
                   "injected failure of a host allocation");
  auto pool = std::make_shared<ef::HostPool>(backend, ef::ExpertLayout(1, 2, 256));
  ef::testing::inject_faults(*backend, {.fail_alloc = true});
  EXPECT_THROW_MSG(ef::ExpertCache(pool, 2, ef_fixture::policy("lru")), ef::OutOfMemory,
                   "device arena");
  ef::ExpertCache cache(pool, 2, ef_fixture::policy("lru"));
  cache.acquire(0, {0, 1}, 0);
  cache.release(0, {0, 1}, 0);
}

// Policy state is committed once the copies were issued: a failed copy leaves it as it was.
TEST(a_failed_copy_leaves_belady_at_its_position) {
  auto pool = ef_fixture::make_pool(1, 6, 4096);
  ef::PolicyOptions options = ef_fixture::policy("belady");
  options.future = {{0}, {1}, {2}, {0}};
  ef::ExpertCache cache(pool, 2, options);
  EXPECT_EQ(ef_fixture::use(cache, 0, {0}), 0);
  ef::testing::inject_faults(pool->backend(), {.fail_copy = 1});
  EXPECT_THROW(cache.acquire(0, {1}, 0), ef::BackendError);
  // Still at the second acquire of its future: the retry is the one it expects.
  EXPECT_EQ(ef_fixture::use(cache, 0, {1}), 0);
  EXPECT_EQ(ef_fixture::use(cache, 0, {2}), 0);
  EXPECT_EQ(ef_fixture::use(cache, 0, {0}), 0);
}

TEST(a_failed_copy_leaves_lfu_counts_as_they_were) {
  Rig rig(2);
  rig.cache = std::make_unique<ef::ExpertCache>(rig.pool, 2, ef_fixture::policy("lfu"));
  const int a = 0, b = 1, c = 2, d = 3;
  for (int e : {a, a, b}) EXPECT_EQ(ef_fixture::use(*rig.cache, 0, {e}), 0);  // a: 2, b: 1
  rig.inject({.fail_copy = 1});
  EXPECT_THROW(rig.cache->acquire(0, {c}, 0), ef::BackendError);  // c: still 0
  EXPECT_EQ(ef_fixture::use(*rig.cache, 0, {c}), 0);              // c: 1
  // d evicts the least frequently used: c (1 < 2). Had the failed acquire counted, c would
  // tie with a at 2 and a, the less recently accessed, would go.
  EXPECT_EQ(ef_fixture::use(*rig.cache, 0, {d}), 0);
  EXPECT_TRUE(rig.cache->resident(0, a));
  EXPECT_TRUE(!rig.cache->resident(0, c));
  EXPECT_EQ(ef_fixture::use(*rig.cache, 1, {4, 5}), 0);
  EXPECT_EQ(ef_fixture::use(*rig.cache, 0, {c, a}), 0);
}

TEST(fault_injection_needs_the_cpu_backend) {
  // A backend that is not the CPU one is refused by name.
  class Other final : public ef::Backend {
   public:
    ef::DeviceKind kind() const override { return ef::DeviceKind::kCuda; }
    std::string name() const override { return "other"; }
    void* alloc_host(std::size_t) override { return nullptr; }
    void free_host(void*) noexcept override {}
    void register_host(void*, std::size_t) override {}
    void unregister_host(void*) noexcept override {}
    void* alloc_device(std::size_t) override { return nullptr; }
    void free_device(void*) noexcept override {}
    ef::StreamHandle create_stream(bool) override { return 0; }
    void destroy_stream(ef::StreamHandle) noexcept override {}
    void check_stream(ef::StreamHandle, int) const override {}
    std::unique_ptr<ef::Fence> create_fence() override { return nullptr; }
    std::unique_ptr<ef::Fence> create_timer() override { return nullptr; }
    void record(ef::Fence&, ef::StreamHandle) override {}
    void wait(ef::StreamHandle, ef::Fence&) override {}
    void synchronize(ef::Fence&) override {}
    bool query(ef::Fence&) override { return true; }
    std::optional<double> elapsed_seconds(ef::Fence&, ef::Fence&) override { return 0.0; }
    void copy_to_device(void*, const void*, std::size_t, ef::StreamHandle) override {}
  } other;
  EXPECT_THROW_MSG(ef::testing::inject_faults(other, {}), ef::InvalidArgument, "other");
}

}  // namespace

EF_TEST_MAIN()
