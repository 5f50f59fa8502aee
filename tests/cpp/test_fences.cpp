// Driver calls per acquire and release, counted on the CPU backend through a
// CountingBackend: one fence per batch of demand copies and per release, one wait per
// distinct fence still running, fences reused rather than created per call; prefetches
// in chunks with two in flight; a TransferEngine that fails halfway through its
// construction leaks no stream; device stall times reach the layer's stall_seconds.
#include "cache_fixture.h"
#include "expertflow/testing.h"
#include "expertflow/transfer_engine.h"

namespace {

namespace ef = expertflow;
using ef::testing::CountingBackend;

struct Rig {
  std::shared_ptr<CountingBackend> backend;
  std::shared_ptr<ef::HostPool> pool;
  std::unique_ptr<ef::ExpertCache> cache;
  Rig(bool fences_complete, int slots, ef::ExpertLayout layout = ef::ExpertLayout(2, 16, 4096)) {
    backend =
        std::make_shared<CountingBackend>(ef::make_backend(ef::DeviceKind::kCpu), fences_complete);
    pool = std::make_shared<ef::HostPool>(backend, std::move(layout));
    ef_fixture::fill_pattern(*pool);
    cache = std::make_unique<ef::ExpertCache>(pool, slots, ef_fixture::policy("lru"));
  }
  const ef::testing::CallCounts& counts() const { return backend->counts(); }
};

struct Delta {
  int records, waits, created;
};
template <typename F>
Delta calls_made(const Rig& rig, F&& f) {
  const auto& c = rig.counts();
  Delta before{c.records, c.waits, c.fences_created};
  f();
  return Delta{c.records - before.records, c.waits - before.waits,
               c.fences_created - before.created};
}

std::vector<int> experts_from(int first, int k) {
  std::vector<int> experts;
  for (int e = first; e < first + k; ++e) experts.push_back(e);
  return experts;
}

TEST(an_acquire_of_k_misses_records_and_waits_a_constant_number_of_times) {
  for (int k : {1, 8}) {
    Rig rig(/*fences_complete=*/false, k);
    // Empty slots: one copy fence, recorded once; the caller's stream waits on it once,
    // between the two timer records that measure the wait.
    Delta first = calls_made(rig, [&] { rig.cache->acquire(0, experts_from(0, k), 0); });
    EXPECT_EQ(first.records, 3);
    EXPECT_EQ(first.waits, 1);
    Delta release = calls_made(rig, [&] { rig.cache->release(0, experts_from(0, k), 0); });
    EXPECT_EQ(release.records, 1);
    EXPECT_TRUE(release.created <= 1);
    // Evicting them all: the copies wait once on their shared previous copy fence and
    // once on the shared release fence, the caller's stream once on the new copy fence.
    Delta second = calls_made(rig, [&] { rig.cache->acquire(1, experts_from(0, k), 0); });
    EXPECT_EQ(second.records, 3);
    EXPECT_EQ(second.waits, 3);
    rig.cache->release(1, experts_from(0, k), 0);
    EXPECT_EQ(rig.cache->stats().misses, static_cast<std::uint64_t>(2 * k));
  }
}

TEST(fences_already_complete_are_not_waited_on) {
  Rig rig(/*fences_complete=*/true, 8);
  for (int layer : {0, 1, 0}) {
    Delta acquire = calls_made(rig, [&] { rig.cache->acquire(layer, experts_from(2, 6), 0); });
    EXPECT_EQ(acquire.waits, 0);
    EXPECT_EQ(acquire.records, 1);  // the copy fence only: no wait, so nothing to time
    rig.cache->release(layer, experts_from(2, 6), 0);
  }
}

TEST(steady_decoding_creates_no_fences) {
  Rig rig(/*fences_complete=*/false, 6);
  auto step = [&](int round) {
    for (int layer = 0; layer < 2; ++layer) {
      std::vector<int> experts = {round % 16, (round + 5) % 16, (round + 9) % 16};
      EXPECT_EQ(ef_fixture::use(*rig.cache, layer, experts), 0);
    }
  };
  for (int round = 0; round < 4; ++round) step(round);
  int created = rig.counts().fences_created;
  for (int round = 4; round < 40; ++round) step(round);
  EXPECT_EQ(rig.counts().fences_created, created);
  EXPECT_TRUE(rig.cache->stats().misses > 60u);
}

TEST(device_stall_times_reach_the_layer_that_waited) {
  Rig rig(/*fences_complete=*/false, 4);
  rig.backend->report_elapsed(0.25);
  EXPECT_EQ(ef_fixture::use(*rig.cache, 1, {3, 4}), 0);  // waits, timed: 0.25 s
  EXPECT_EQ(ef_fixture::use(*rig.cache, 1, {3}), 0);     // waits on the same copy, timed
  ef::CacheStats stats = rig.cache->stats();
  EXPECT_TRUE(stats.layers[1].stall_seconds >= 0.5 && stats.layers[1].stall_seconds < 0.51);
  EXPECT_EQ(stats.layers[0].stall_seconds, 0.0);
  EXPECT_TRUE(stats.stall_seconds >= 0.5 && stats.stall_seconds < 0.51);
  rig.cache->reset_stats();
  EXPECT_EQ(rig.cache->stats().stall_seconds, 0.0);
}

TEST(a_prefetch_of_several_chunks_keeps_two_in_flight_and_arrives_whole) {
  constexpr std::size_t kChunk = ef::TransferEngine::kPrefetchChunkBytes;
  const std::size_t blob = 3 * kChunk + kChunk / 2 + 300;  // four chunks, the last short
  Rig rig(/*fences_complete=*/true, 2, ef::ExpertLayout(1, 3, blob));
  int copies = rig.counts().copies, syncs = rig.counts().synchronizes;
  rig.cache->prefetch(0, {1}, {});
  EXPECT_TRUE(ef_fixture::wait_until([&] { return rig.cache->pending_prefetches() == 0; }));
  EXPECT_EQ(rig.counts().copies - copies, 4);
  // The host waits for chunk n - 2 before issuing chunk n (chunks 2 and 3), then for the
  // whole copy: never for the chunk just issued.
  EXPECT_EQ(rig.counts().synchronizes - syncs, 3);
  EXPECT_EQ(rig.cache->stats().bytes_prefetch, blob);
  std::vector<void*> addrs = rig.cache->acquire(0, {1}, 0);
  EXPECT_TRUE(ef_fixture::holds(addrs[0], 1, blob));
  rig.cache->release(0, {1}, 0);
  EXPECT_EQ(rig.cache->stats().prefetch_hits, 1u);
}

TEST(a_transfer_engine_that_fails_to_start_releases_its_streams) {
  auto cpu = ef::make_backend(ef::DeviceKind::kCpu);
  auto backend = std::make_shared<CountingBackend>(cpu);
  ef::testing::inject_faults(*cpu, {.fail_stream = 3});  // demand, one prefetch stream, then
  EXPECT_THROW_MSG(ef::TransferEngine(backend, 3), ef::BackendError, "stream creation");
  EXPECT_EQ(backend->counts().streams_created, 2);
  EXPECT_EQ(backend->counts().streams_destroyed, 2);
  ef::testing::inject_faults(*cpu, {.fail_stream = 1});
  auto pool = std::make_shared<ef::HostPool>(backend, ef::ExpertLayout(1, 4, 4096));
  EXPECT_THROW(ef::ExpertCache(pool, 2, ef_fixture::policy("lru")), ef::BackendError);
  EXPECT_EQ(backend->counts().streams_destroyed, backend->counts().streams_created);
  ef::ExpertCache cache(pool, 2, ef_fixture::policy("lru"));  // and the next one works
  ef_fixture::fill_pattern(*pool);
  EXPECT_EQ(ef_fixture::use(cache, 0, {1, 2}), 0);
}

}  // namespace

EF_TEST_MAIN()
