// Each eviction policy on a tiny layout, driven through ExpertCache, with every hit and
// victim worked out by hand.
//
// Notation: kN is key N = layer * experts_per_layer + expert; sN is slot N; tN is the
// cache's tick (one per acquire call) and so the last_use of the slots that call touched.
// Empty slots fill first, lowest index first; policies only rank the rest.
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "cache_fixture.h"
#include "ef_test.h"
#include "expertflow/error.h"
#include "expertflow/eviction_policy.h"
#include "expertflow/expert_cache.h"

namespace ef = expertflow;
using ef_fixture::make_pool;
using ef_fixture::policy;
using ef_fixture::residency;
using ef_fixture::use;

namespace {

constexpr std::size_t kBlob = 1000;

}  // namespace

TEST(make_policy_names) {
  for (const char* name : {"lru", "lfu", "static", "expertflow", "belady"}) {
    auto p = ef::make_policy(policy(name));
    ASSERT_TRUE(p != nullptr);
    EXPECT_EQ(p->name(), std::string(name));
  }
  EXPECT_THROW_MSG(ef::make_policy(policy("nope")), ef::InvalidArgument, "nope");
  EXPECT_THROW_MSG(ef::make_policy(policy("")), ef::InvalidArgument, "");
  auto pool = make_pool(1, 4, kBlob);
  EXPECT_THROW_MSG((void)ef::ExpertCache(pool, 2, policy("mru")), ef::InvalidArgument, "mru");
}

TEST(lru) {
  // 2 layers x 4 experts, 3 slots.
  ef::ExpertCache cache(make_pool(2, 4, kBlob), 3, policy("lru"));
  EXPECT_EQ(cache.policy_name(), std::string("lru"));
  EXPECT_EQ(use(cache, 0, {0}), 0);  // t1 k0 miss -> s0
  EXPECT_EQ(use(cache, 0, {1}), 0);  // t2 k1 miss -> s1
  EXPECT_EQ(use(cache, 1, {0}), 0);  // t3 k4 miss -> s2
  EXPECT_EQ(use(cache, 0, {0}), 0);  // t4 k0 hit: s0=k0@4 s1=k1@2 s2=k4@3
  EXPECT_EQ(use(cache, 1, {1}), 0);  // t5 k5 miss, victim k1 (@2) -> s1
  EXPECT_EQ(residency(cache), "10001100");
  EXPECT_EQ(use(cache, 0, {1}), 0);  // t6 k1 miss, victim k4 (@3) -> s2
  EXPECT_EQ(residency(cache), "11000100");
  // t7: k0 is the least recently used (@4) but is a hit of this very call, so it is
  // pinned: k2's victim is the next one, k5 (@5) -> s1.
  EXPECT_EQ(use(cache, 0, {0, 2}), 0);
  EXPECT_EQ(residency(cache), "11100000");
  EXPECT_EQ(use(cache, 1, {2}), 0);  // t8 k6 miss, victim k1 (@6) -> s2
  EXPECT_EQ(residency(cache), "10100010");

  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 2u);       // t4, t7(k0)
  EXPECT_EQ(s.misses, 7u);     // t1 t2 t3 t5 t6 t7(k2) t8
  EXPECT_EQ(s.evictions, 4u);  // t5 t6 t7 t8
  EXPECT_EQ(s.bytes_demand, 7u * kBlob);
  ASSERT_TRUE(s.layers.size() == 2);
  EXPECT_EQ(s.layers[0].hits, 2u);
  EXPECT_EQ(s.layers[0].misses, 4u);  // t1 t2 t6 t7
  EXPECT_EQ(s.layers[1].hits, 0u);
  EXPECT_EQ(s.layers[1].misses, 3u);  // t3 t5 t8
  EXPECT_EQ(s.prefetch_issued, 0u);

  cache.reset_stats();
  s = cache.stats();
  EXPECT_EQ(s.hits, 0u);
  EXPECT_EQ(s.misses, 0u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(residency(cache), "10100010");  // reset_stats leaves the slots alone
}

TEST(lfu_without_decay) {
  // 1 layer x 4 experts, 2 slots. Counts per key, kept across eviction.
  ef::ExpertCache cache(make_pool(1, 4, kBlob), 2, policy("lfu"));
  EXPECT_EQ(use(cache, 0, {0}), 0);  // t1 k0 miss -> s0          c0=1
  EXPECT_EQ(use(cache, 0, {0}), 0);  // t2 k0 hit                 c0=2
  EXPECT_EQ(use(cache, 0, {1}), 0);  // t3 k1 miss -> s1          c1=1
  // t4 k2 miss: k0 (c2 @2) vs k1 (c1 @3): victim k1 (LRU would take k0).
  EXPECT_EQ(use(cache, 0, {2}), 0);
  EXPECT_EQ(residency(cache), "1010");
  // t5 k1 miss (c1=2): k0 (c2 @2) vs k2 (c1 @4): victim k2.
  EXPECT_EQ(use(cache, 0, {1}), 0);
  EXPECT_EQ(residency(cache), "1100");
  // t6 k2 miss (c2=2): k0 (c2 @2) vs k1 (c2 @5): a tie on count, so the least recently
  // used, k0. (Had k1's count been reset when it was evicted at t4, k1 would go.)
  EXPECT_EQ(use(cache, 0, {2}), 0);
  EXPECT_EQ(residency(cache), "0110");
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses, 5u);
  EXPECT_EQ(s.evictions, 3u);
}

// 1 layer x 4 experts, 2 slots; keys 0,0,0,1,1,2 one per acquire. Without decay k0 has
// count 3 and k1 count 2, so k2 evicts k1. With counts halved every 2 accesses the older
// accesses of k0 weigh less than k1's recent ones (whether the halving comes just before
// or just after the 2nd/4th/6th increment: e.g. after: c0 1,2->1,2, then c0 2->1 c1 1->.5,
// c1 1.5; k0 < k1), so k2 evicts k0.
void run_decay_sequence(ef::ExpertCache& cache) {
  EXPECT_EQ(use(cache, 0, {0}), 0);  // miss -> s0
  EXPECT_EQ(use(cache, 0, {0}), 0);  // hit
  EXPECT_EQ(use(cache, 0, {0}), 0);  // hit
  EXPECT_EQ(use(cache, 0, {1}), 0);  // miss -> s1
  EXPECT_EQ(use(cache, 0, {1}), 0);  // hit
  EXPECT_EQ(use(cache, 0, {2}), 0);  // miss, victim depends on decay
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 3u);
  EXPECT_EQ(s.misses, 3u);
  EXPECT_EQ(s.evictions, 1u);
}

TEST(lfu_decay_off_keeps_old_counts) {
  ef::PolicyOptions options = policy("lfu");
  options.lfu_decay = 0.5;
  options.lfu_decay_period = 0;  // never
  ef::ExpertCache cache(make_pool(1, 4, kBlob), 2, options);
  run_decay_sequence(cache);
  EXPECT_EQ(residency(cache), "1010");  // k1 evicted
}

TEST(lfu_with_decay) {
  ef::PolicyOptions options = policy("lfu");
  options.lfu_decay = 0.5;
  options.lfu_decay_period = 2;
  ef::ExpertCache cache(make_pool(1, 4, kBlob), 2, options);
  run_decay_sequence(cache);
  EXPECT_EQ(residency(cache), "0110");  // k0 evicted
}

TEST(static_set) {
  // 1 layer x 6 experts, 3 slots, static {k0, k1}: loaded on first use, then never victims;
  // other keys stream through a slot and are dropped on their last release.
  ef::PolicyOptions options = policy("static");
  options.static_keys = {0, 1};
  ef::ExpertCache cache(make_pool(1, 6, kBlob), 3, options);
  EXPECT_EQ(residency(cache), "000000");
  EXPECT_EQ(use(cache, 0, {0}), 0);  // k0 miss, stays
  EXPECT_EQ(residency(cache), "100000");

  std::vector<void*> a = cache.acquire(0, {2}, 0);  // k2 miss
  EXPECT_TRUE(cache.resident(0, 2));                // resident while pinned
  EXPECT_TRUE(ef_fixture::holds(cache, a[0], 0, 2));
  cache.release(0, {2}, 0);
  EXPECT_EQ(residency(cache), "100000");  // dropped on release

  EXPECT_EQ(use(cache, 0, {1}), 0);  // k1 miss, stays
  EXPECT_EQ(use(cache, 0, {3}), 0);  // k3 miss, dropped
  EXPECT_EQ(residency(cache), "110000");
  EXPECT_EQ(use(cache, 0, {0, 1}), 0);                           // 2 hits
  EXPECT_EQ(use(cache, 0, {0, 3}), 0);                           // k0 hit, k3 miss (it was dropped)
  for (int e = 2; e < 6; ++e) EXPECT_EQ(use(cache, 0, {e}), 0);  // 4 misses
  EXPECT_EQ(residency(cache), "110000");
  EXPECT_EQ(use(cache, 0, {1}), 0);  // hit
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 4u);
  EXPECT_EQ(s.misses, 9u);
}

// With the streaming slots pinned by another thread, an acquire of a non-static expert
// waits for a release, as it does under every other policy; the static slots are
// unpinned but are not victims, and the caller's input is valid.
TEST(static_waits_for_streaming_slot) {
  ef::PolicyOptions options = policy("static");
  options.static_keys = {0, 1};
  ef::ExpertCache cache(make_pool(1, 6, kBlob), 3, options);
  EXPECT_EQ(use(cache, 0, {0, 1}), 0);                 // the static set is loaded
  std::vector<void*> held = cache.acquire(0, {2}, 0);  // the one streaming slot
  std::atomic<int> result{-1};
  std::thread other([&] {
    try {
      result = use(cache, 0, {3});
    } catch (const std::exception& e) {
      ef_test::fail(__FILE__, __LINE__, std::string("acquire of k3 threw: ") + e.what());
      result = 100;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_TRUE(ef_fixture::holds(cache, held[0], 0, 2));
  cache.release(0, {2}, 0);
  other.join();
  EXPECT_EQ(result.load(), 0);
  EXPECT_TRUE(cache.resident(0, 0));
  EXPECT_TRUE(cache.resident(0, 1));
}

TEST(static_set_options_checked) {
  auto pool = make_pool(1, 6, kBlob);
  ef::PolicyOptions options = policy("static");
  options.static_keys = {0, 1, 2};  // 3 > num_slots - 1
  EXPECT_THROW((void)ef::ExpertCache(pool, 3, options), ef::InvalidArgument);
  options.static_keys = {0, 99};  // key out of range
  EXPECT_THROW_MSG((void)ef::ExpertCache(pool, 3, options), ef::InvalidArgument, "99");
  options.static_keys = {0, 1};  // num_slots - 1 is fine
  ef::ExpertCache ok(pool, 3, options);
  EXPECT_EQ(use(ok, 0, {5}), 0);
}

TEST(expertflow) {
  // 4 layers x 4 experts, 3 slots. distance(layer) = (layer - current - 1) mod 4 + 1.
  ef::ExpertCache cache(make_pool(4, 4, kBlob), 3, policy("expertflow"));
  EXPECT_EQ(use(cache, 0, {0}), 0);  // t1 k0 -> s0
  EXPECT_EQ(use(cache, 0, {1}), 0);  // t2 k1 -> s1
  EXPECT_EQ(use(cache, 1, {0}), 0);  // t3 k4 -> s2; current layer 1
  // Predictions for resident experts only: no copies.
  cache.prefetch(0, {0, 1}, {0.9f, 0.3f});
  cache.prefetch(1, {0}, {});
  EXPECT_EQ(cache.stats().prefetch_issued, 0u);

  // t4 k8 (layer 2) miss, held. Every resident expert is predicted; the farthest use is
  // layer 1's k4 (distance 4 from layer 1, or 3 from layer 2, against 3 or 2 for layer
  // 0), so k4 goes although it is the most recent. LRU would take k0.
  std::vector<void*> held = cache.acquire(2, {0}, 0);
  EXPECT_TRUE(ef_fixture::holds(cache, held[0], 2, 0));
  EXPECT_EQ(residency(cache), "1100000010000000");
  // t5 k12 (layer 3) miss with k8 pinned: k0 and k1 are both predicted for layer 0, at
  // the same distance; the lower confidence (k1, 0.3) goes. LRU would take k0.
  EXPECT_EQ(use(cache, 3, {0}), 0);
  EXPECT_EQ(residency(cache), "1000000010001000");
  cache.release(2, {0}, 0);

  // s0=k0 predicted @1, s1=k12 @5, s2=k8 @4. Unpredicted experts go first, least recent
  // first: t6 k5 evicts k8, t7 k6 evicts k12; k0 survives on its prediction.
  EXPECT_EQ(use(cache, 1, {1}), 0);
  EXPECT_EQ(residency(cache), "1000010000001000");
  EXPECT_EQ(use(cache, 1, {2}), 0);
  EXPECT_EQ(residency(cache), "1000011000000000");

  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 0u);
  EXPECT_EQ(s.misses, 7u);
  EXPECT_EQ(s.evictions, 4u);
  EXPECT_EQ(s.prefetch_issued, 0u);
}

TEST(belady) {
  // 1 layer x 4 experts, 3 slots; the future is 0 1 2 3 0 1 3 2, one key per acquire.
  ef::PolicyOptions options = policy("belady");
  options.future = {{0}, {1}, {2}, {3}, {0}, {1}, {3}, {2}};
  ef::ExpertCache cache(make_pool(1, 4, kBlob), 3, options);
  EXPECT_EQ(use(cache, 0, {0}), 0);  // step 0 miss -> s0
  EXPECT_EQ(use(cache, 0, {1}), 0);  // step 1 miss -> s1
  EXPECT_EQ(use(cache, 0, {2}), 0);  // step 2 miss -> s2
  // step 3 k3 miss: next uses k0 at 4, k1 at 5, k2 at 7: victim k2 (LRU would take k0).
  EXPECT_EQ(use(cache, 0, {3}), 0);
  EXPECT_EQ(residency(cache), "1101");
  EXPECT_EQ(use(cache, 0, {0}), 0);  // step 4 hit
  EXPECT_EQ(use(cache, 0, {1}), 0);  // step 5 hit
  EXPECT_EQ(use(cache, 0, {3}), 0);  // step 6 hit
  // step 7 k2 miss: no resident key is used again, a tie; the lowest slot (s0, k0) goes.
  EXPECT_EQ(use(cache, 0, {2}), 0);
  EXPECT_EQ(residency(cache), "0111");
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 3u);
  EXPECT_EQ(s.misses, 5u);
  EXPECT_EQ(s.evictions, 2u);
  // Past the end of the known future.
  EXPECT_THROW(cache.acquire(0, {1}, 0), ef::InvalidArgument);
}

TEST(belady_mismatch) {
  ef::PolicyOptions options = policy("belady");
  options.future = {{0}, {1}, {2, 3}};
  ef::ExpertCache cache(make_pool(1, 4, kBlob), 3, options);
  EXPECT_EQ(use(cache, 0, {0}), 0);
  EXPECT_THROW(cache.acquire(0, {2}, 0), ef::InvalidArgument);  // expected {1}
  EXPECT_TRUE(!cache.resident(0, 2));
  EXPECT_EQ(cache.stats().misses, 1u);
  // The failed call changed nothing: the future still expects {1}, then {2, 3}.
  EXPECT_EQ(use(cache, 0, {1}), 0);
  EXPECT_EQ(use(cache, 0, {2, 3}), 0);
  EXPECT_EQ(cache.stats().misses, 4u);
}

EF_TEST_MAIN()
