// One test per invariant of expert_cache.h, on the CPU backend, plus the error paths and
// the prefetch counters.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cache_fixture.h"
#include "ef_test.h"
#include "expertflow/backend.h"
#include "expertflow/error.h"
#include "expertflow/expert_cache.h"

namespace ef = expertflow;
using ef_fixture::holds;
using ef_fixture::make_pool;
using ef_fixture::policy;
using ef_fixture::residency;
using ef_fixture::use;
using ef_fixture::wait_until;

namespace {

constexpr std::size_t kBlob = 2048;

// The counters a rejected call must leave alone.
std::vector<std::uint64_t> counters(const ef::CacheStats& s) {
  return {s.acquires,        s.hits,          s.prefetch_hits,   s.misses,           s.evictions,
          s.prefetch_issued, s.prefetch_used, s.prefetch_wasted, s.prefetch_dropped, s.bytes_demand,
          s.bytes_prefetch};
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

// A victim's slot receives exactly the new expert's bytes, for blobs of many sizes.
TEST(slot_content_after_acquire) {
  std::vector<std::size_t> sizes;
  for (int k = 0; k < 12; ++k) sizes.push_back(1000 + 97 * static_cast<std::size_t>(k));
  for (const char* name : {"lru", "lfu", "expertflow"}) {
    ef::ExpertCache cache(make_pool(ef::ExpertLayout(2, 6, sizes)), 4, policy(name));
    EXPECT_TRUE(cache.slot_bytes() >= 1000 + 97 * 11);
    std::mt19937 rng(1234);
    for (int step = 0; step < 300; ++step) {
      int layer = static_cast<int>(rng() % 2);
      std::vector<int> experts = {0, 1, 2, 3, 4, 5};
      std::shuffle(experts.begin(), experts.end(), rng);
      experts.resize(1 + rng() % 3);
      if (step % 5 == 0) cache.prefetch(1 - layer, {static_cast<int>(rng() % 6)}, {});
      std::vector<void*> addrs = cache.acquire(layer, experts, 0);
      ASSERT_TRUE(addrs.size() == experts.size());
      std::set<void*> distinct(addrs.begin(), addrs.end());
      EXPECT_EQ(distinct.size(), experts.size());
      for (std::size_t i = 0; i < experts.size(); ++i) {
        EXPECT_EQ(reinterpret_cast<std::uintptr_t>(addrs[i]) % 256, std::uintptr_t{0});
        EXPECT_TRUE(holds(cache, addrs[i], layer, experts[i]));
        EXPECT_TRUE(cache.resident(layer, experts[i]));
      }
      cache.release(layer, experts, 0);
    }
    ef::CacheStats s = cache.stats();
    EXPECT_TRUE(s.misses > 0 && s.hits > 0 && s.evictions > 0);
  }
}

// Acquiring more experts than slots fails before anything is evicted or counted.
TEST(acquire_more_than_slots_changes_nothing) {
  ef::ExpertCache cache(make_pool(2, 8, kBlob), 3, policy("lru"));
  EXPECT_EQ(use(cache, 0, {0, 1, 2}), 0);
  std::string before = residency(cache);
  auto stats_before = counters(cache.stats());
  EXPECT_THROW(cache.acquire(0, {3, 4, 5, 6}, 0), ef::InvalidArgument);
  EXPECT_THROW(cache.acquire(1, {0, 1, 2, 3, 4, 5, 6, 7}, 0), ef::InvalidArgument);
  EXPECT_EQ(residency(cache), before);
  EXPECT_TRUE(counters(cache.stats()) == stats_before);
  // The residents were not touched, and exactly num_slots experts is fine.
  EXPECT_EQ(use(cache, 0, {0, 1, 2}), 0);
  EXPECT_EQ(cache.stats().hits, 3u);
  EXPECT_EQ(use(cache, 1, {5, 6, 7}), 0);
}

// A pinned slot is never a victim, even when the policy ranks it first.
TEST(pinned_slots_never_victims) {
  for (const char* name : {"lru", "lfu", "expertflow"}) {
    ef::ExpertCache cache(make_pool(2, 8, kBlob), 3, policy(name));
    // k0 is acquired once (lowest count) and first (least recent), then held.
    std::vector<void*> held = cache.acquire(0, {0}, 0);
    // A second acquire of a pinned expert returns the same slot and pins it again.
    std::vector<void*> again = cache.acquire(0, {0}, 0);
    EXPECT_TRUE(held[0] == again[0]);
    for (int round = 0; round < 3; ++round) {
      for (int e = 0; e < 8; ++e) {
        EXPECT_EQ(use(cache, 1, {e}), 0);
        EXPECT_EQ(use(cache, 1, {e}), 0);
      }
      for (int e = 1; e < 8; ++e) EXPECT_EQ(use(cache, 0, {e}), 0);
      EXPECT_TRUE(cache.resident(0, 0));
      EXPECT_TRUE(holds(cache, held[0], 0, 0));
    }
    cache.release(0, {0}, 0);
    // Still pinned by the second acquire.
    for (int e = 0; e < 8; ++e) EXPECT_EQ(use(cache, 1, {e}), 0);
    EXPECT_TRUE(cache.resident(0, 0));
    EXPECT_TRUE(holds(cache, held[0], 0, 0));
    cache.release(0, {0}, 0);
    EXPECT_TRUE(cache.stats().evictions > 20);
    // Now it may go; and it comes back with the right bytes.
    for (int e = 0; e < 8; ++e) EXPECT_EQ(use(cache, 1, {e}), 0);
    EXPECT_TRUE(!cache.resident(0, 0));
    EXPECT_EQ(use(cache, 0, {0}), 0);
  }
}

// With every slot pinned a prefetch is dropped: it evicts nothing and copies nothing.
TEST(prefetch_never_evicts_pinned) {
  ef::ExpertCache cache(make_pool(4, 4, kBlob), 2, policy("lru"));
  std::vector<void*> held = cache.acquire(0, {0, 1}, 0);
  cache.prefetch(1, {0, 1}, {});
  cache.prefetch(2, {3}, {0.5f});
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.prefetch_issued, 0u);
  EXPECT_EQ(s.prefetch_dropped, 3u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(residency(cache), "1100000000000000");
  EXPECT_TRUE(holds(cache, held[0], 0, 0));
  EXPECT_TRUE(holds(cache, held[1], 0, 1));
  cache.release(0, {0, 1}, 0);
}

// A prefetch never evicts a slot predicted for a sooner use (or as soon, with at least
// its confidence). Each step leaves exactly one candidate or none, so the outcome is the
// same under every policy.
TEST(prefetch_never_evicts_predicted_sooner) {
  for (const char* name : {"lru", "lfu", "expertflow"}) {
    // 4 layers x 4 experts, 3 slots; kN = layer * 4 + expert.
    ef::ExpertCache cache(make_pool(4, 4, kBlob), 3, policy(name));
    EXPECT_EQ(use(cache, 1, {0}), 0);  // k4 -> s0
    EXPECT_EQ(use(cache, 2, {0}), 0);  // k8 -> s1
    EXPECT_EQ(use(cache, 0, {0}), 0);  // k0 -> s2; current layer 0: distances L1 1, L2 2, L3 3
    cache.prefetch(1, {0}, {});        // k4 predicted at distance 1 (resident: no copy)
    cache.prefetch(2, {0}, {});        // k8 predicted at distance 2, confidence 1
    EXPECT_EQ(cache.stats().prefetch_issued, 0u);

    // k9 (distance 2, confidence 1): k4 is sooner, k8 as soon and as confident; only the
    // unpredicted k0 may go.
    cache.prefetch(2, {1}, {1.0f});
    EXPECT_EQ(residency(cache), "0000100011000000");
    // k12 (distance 3): every slot is predicted sooner (or in flight): dropped.
    cache.prefetch(3, {0}, {});
    // k10 (distance 2, confidence 0.5): k8 and k9 are as soon and more confident: dropped.
    cache.prefetch(2, {2}, {0.5f});
    EXPECT_EQ(residency(cache), "0000100011000000");
    ef::CacheStats s = cache.stats();
    EXPECT_EQ(s.prefetch_issued, 1u);
    EXPECT_EQ(s.prefetch_dropped, 2u);
    // Lower k8's confidence below k10's: now k8 (and only k8) may go.
    cache.prefetch(2, {0}, {0.2f});
    cache.prefetch(2, {2}, {0.5f});
    EXPECT_EQ(residency(cache), "0000100001100000");
    // Let both copies run: an acquire may cancel a prefetch still queued and copy on demand.
    EXPECT_TRUE(wait_until([&] { return cache.stats().bytes_prefetch == 2 * kBlob; }));

    EXPECT_EQ(use(cache, 1, {0}), 0);     // k4: hit
    EXPECT_EQ(use(cache, 2, {1, 2}), 0);  // k9, k10: prefetch hits
    s = cache.stats();
    EXPECT_EQ(s.hits, 3u);
    EXPECT_EQ(s.prefetch_hits, 2u);
    EXPECT_EQ(s.misses, 3u);
    EXPECT_EQ(s.evictions, 2u);  // k0 and k8, both by prefetches
    EXPECT_EQ(s.prefetch_issued, 2u);
    EXPECT_EQ(s.prefetch_used, 2u);
    EXPECT_EQ(s.prefetch_wasted, 0u);
    EXPECT_EQ(s.bytes_prefetch, 2 * kBlob);
    EXPECT_EQ(s.bytes_demand, 3 * kBlob);
  }
}

// Acquiring layer l clears the predictions made for layer l.
TEST(predictions_age_out) {
  // 2 layers x 4 experts, 3 slots: k0 -> s0 @1, k1 -> s1 @2, k4 -> s2 @3.
  auto setup = [](ef::ExpertCache& cache) {
    EXPECT_EQ(use(cache, 0, {0}), 0);
    EXPECT_EQ(use(cache, 0, {1}), 0);
    EXPECT_EQ(use(cache, 1, {0}), 0);
    cache.prefetch(0, {0}, {});  // k0 predicted for layer 0's next run
  };
  {
    // Control: while the prediction stands, k0 is kept and the LRU of the unpredicted,
    // k1 (@2), goes.
    ef::ExpertCache cache(make_pool(2, 4, kBlob), 3, policy("expertflow"));
    setup(cache);
    EXPECT_EQ(use(cache, 1, {1}), 0);
    EXPECT_EQ(residency(cache), "10001100");
  }
  {
    // Layer 0 runs (k1 hit, @4) without k0: the prediction is spent, so k0 (@1) is now
    // the least recent unpredicted expert and goes.
    ef::ExpertCache cache(make_pool(2, 4, kBlob), 3, policy("expertflow"));
    setup(cache);
    EXPECT_EQ(use(cache, 0, {1}), 0);
    EXPECT_EQ(use(cache, 1, {1}), 0);
    EXPECT_EQ(residency(cache), "01001100");
  }
}

// Releasing what is not acquired is rejected and changes nothing.
TEST(bad_release) {
  ef::ExpertCache cache(make_pool(2, 4, kBlob), 3, policy("lru"));
  EXPECT_THROW(cache.release(0, {2}, 0), ef::InvalidArgument);  // never acquired
  EXPECT_EQ(use(cache, 0, {1}), 0);
  EXPECT_THROW(cache.release(0, {1}, 0), ef::InvalidArgument);  // already released
  std::vector<void*> held = cache.acquire(0, {0}, 0);
  // One bad entry: nothing is released, so k0 stays pinned.
  EXPECT_THROW(cache.release(0, {0, 3}, 0), ef::InvalidArgument);
  EXPECT_THROW(cache.release(1, {0}, 0), ef::InvalidArgument);  // the same expert id, other layer
  for (int e = 0; e < 4; ++e) EXPECT_EQ(use(cache, 1, {e}), 0);
  EXPECT_TRUE(cache.resident(0, 0));
  EXPECT_TRUE(holds(cache, held[0], 0, 0));
  cache.release(0, {0}, 0);
  EXPECT_THROW(cache.release(0, {0}, 0), ef::InvalidArgument);
  EXPECT_EQ(use(cache, 0, {0, 1, 2}), 0);
}

// Unknown ids, duplicates and bad scores are rejected, naming the value, and change nothing.
TEST(bad_input_changes_nothing) {
  ef::ExpertCache cache(make_pool(2, 4, kBlob), 4, policy("expertflow"));
  EXPECT_EQ(use(cache, 0, {0, 1}), 0);
  std::string before = residency(cache);
  auto stats_before = counters(cache.stats());

  EXPECT_THROW_MSG(cache.acquire(77, {0}, 0), ef::InvalidArgument, "77");
  EXPECT_THROW_MSG(cache.acquire(-3, {0}, 0), ef::InvalidArgument, "-3");
  EXPECT_THROW_MSG(cache.acquire(1, {2, 42}, 0), ef::InvalidArgument, "42");
  EXPECT_THROW_MSG(cache.acquire(1, {-5}, 0), ef::InvalidArgument, "-5");
  EXPECT_THROW(cache.acquire(1, {3, 3}, 0), ef::InvalidArgument);
  EXPECT_THROW(cache.acquire(0, {2, 1, 2}, 0), ef::InvalidArgument);
  EXPECT_THROW_MSG(cache.prefetch(55, {0}, {}), ef::InvalidArgument, "55");
  EXPECT_THROW_MSG(cache.prefetch(1, {0, 66}, {}), ef::InvalidArgument, "66");
  EXPECT_THROW(cache.prefetch(1, {0, 1}, {0.5f, -0.25f}), ef::InvalidArgument);
  EXPECT_THROW(cache.prefetch(1, {0, 1}, {0.5f}), ef::InvalidArgument);
  EXPECT_THROW(cache.prefetch(1, {0}, {0.5f, 0.5f}), ef::InvalidArgument);
  EXPECT_THROW_MSG(cache.release(9, {0}, 0), ef::InvalidArgument, "9");
  EXPECT_THROW_MSG(cache.release(0, {88}, 0), ef::InvalidArgument, "88");
  // An empty expert list still names a layer, and a wrong one is refused (found by fuzzing).
  EXPECT_THROW_MSG(cache.acquire(-3, {}, 0), ef::InvalidArgument, "layer -3");
  EXPECT_THROW_MSG(cache.prefetch(7, {}, {}), ef::InvalidArgument, "layer 7");
  EXPECT_THROW_MSG(cache.predict(-1, {}, {}), ef::InvalidArgument, "layer -1");
  EXPECT_THROW_MSG(cache.release(2, {}, 0), ef::InvalidArgument, "layer 2");

  EXPECT_EQ(residency(cache), before);
  EXPECT_TRUE(counters(cache.stats()) == stats_before);
  // Nothing was predicted by the rejected prefetches: both layer-1 experts still miss and
  // none was copied.
  EXPECT_EQ(use(cache, 1, {0, 1}), 0);
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.misses, 4u);
  EXPECT_EQ(s.prefetch_hits, 0u);
  EXPECT_EQ(s.prefetch_issued, 0u);
  EXPECT_EQ(use(cache, 0, {0, 1}), 0);
  EXPECT_EQ(cache.stats().hits, 2u);
}

TEST(zero_slots_rejected) {
  auto pool = make_pool(2, 4, kBlob);
  EXPECT_THROW((void)ef::ExpertCache(pool, 0, policy("lru")), ef::InvalidArgument);
  EXPECT_THROW((void)ef::ExpertCache(pool, -1, policy("lru")), ef::InvalidArgument);
}

TEST(closed_cache) {
  ef::ExpertCache cache(make_pool(2, 4, kBlob), 3, policy("lru"));
  EXPECT_EQ(use(cache, 0, {0}), 0);
  cache.prefetch(1, {0, 1, 2}, {});  // queued or in flight while closing
  EXPECT_TRUE(!cache.closed());
  cache.close();
  EXPECT_TRUE(cache.closed());
  EXPECT_THROW(cache.acquire(0, {0}, 0), ef::StateError);
  EXPECT_THROW(cache.prefetch(0, {1}, {}), ef::StateError);
  EXPECT_THROW(cache.release(0, {0}, 0), ef::StateError);
  EXPECT_THROW(cache.resident(0, 0), ef::StateError);
  EXPECT_THROW(cache.reset_stats(), ef::StateError);
  ef::CacheStats s = cache.stats();  // still allowed
  EXPECT_EQ(s.misses, 1u);
  EXPECT_TRUE(s.prefetch_cancelled <= s.prefetch_issued);
}

// On the CPU backend only stream 0 exists.
TEST(stream_nonzero_on_cpu) {
  ef::ExpertCache cache(make_pool(2, 4, kBlob), 3, policy("lru"));
  auto stats_before = counters(cache.stats());
  EXPECT_THROW(cache.acquire(0, {0}, 1), ef::InvalidArgument);
  EXPECT_THROW(cache.acquire(0, {0}, 0xdeadbeef), ef::InvalidArgument);
  EXPECT_TRUE(!cache.resident(0, 0));
  EXPECT_TRUE(counters(cache.stats()) == stats_before);
  std::vector<void*> held = cache.acquire(0, {0}, 0);
  EXPECT_THROW(cache.release(0, {0}, 7), ef::InvalidArgument);
  cache.release(0, {0}, 0);  // still pinned after the rejected release
  EXPECT_THROW(cache.release(0, {0}, 0), ef::InvalidArgument);
}

TEST(cuda_request_without_cuda) {
  for (const ef::BackendInfo& b : ef::build_info().backends)
    if (b.name == "cuda" && b.usable) return;  // a CUDA machine: test_cuda covers it
  try {
    ef::make_backend(ef::DeviceKind::kCuda);
    ef_test::fail(__FILE__, __LINE__, "make_backend(kCuda) did not throw");
  } catch (const ef::InvalidArgument& e) {
    EXPECT_TRUE(lower(e.what()).find("cuda") != std::string::npos);
  }
}

// The first acquire of a prefetched expert counts as a prefetch hit; later ones as hits.
TEST(prefetch_then_acquire) {
  ef::ExpertCache cache(make_pool(2, 4, kBlob), 4, policy("lru"));
  EXPECT_EQ(use(cache, 0, {0}), 0);
  cache.prefetch(1, {0, 1}, {0.9f, 0.1f});
  EXPECT_TRUE(cache.resident(1, 0));
  EXPECT_TRUE(cache.resident(1, 1));
  EXPECT_EQ(cache.stats().prefetch_issued, 2u);
  // Let both copies run: an acquire may cancel a prefetch still queued and copy on demand.
  EXPECT_TRUE(wait_until([&] { return cache.stats().bytes_prefetch == 2 * kBlob; }));
  EXPECT_EQ(use(cache, 1, {0, 1}), 0);
  EXPECT_EQ(use(cache, 1, {1, 0}), 0);
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 4u);
  EXPECT_EQ(s.prefetch_hits, 2u);
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.prefetch_used, 2u);
  EXPECT_EQ(s.prefetch_wasted, 0u);
  ASSERT_TRUE(s.layers.size() == 2);
  EXPECT_EQ(s.layers[1].hits, 4u);
  EXPECT_EQ(s.layers[1].prefetch_hits, 2u);
  EXPECT_EQ(s.layers[0].prefetch_hits, 0u);
  EXPECT_EQ(s.bytes_demand, kBlob);
  EXPECT_EQ(s.bytes_prefetch, 2 * kBlob);
  // A prefetch of a resident expert copies nothing.
  cache.prefetch(1, {0}, {});
  EXPECT_EQ(cache.stats().prefetch_issued, 2u);
}

// A prefetched expert evicted before anyone acquired it is wasted.
TEST(prefetch_wasted) {
  // 2 layers x 4 experts, 2 slots: k0 held in s0, k4 prefetched into s1, then k1 needs
  // a slot and s1 (once its copy is done, or cancelled) is the only candidate.
  ef::ExpertCache cache(make_pool(2, 4, kBlob), 2, policy("lru"));
  std::vector<void*> held = cache.acquire(0, {0}, 0);
  cache.prefetch(1, {0}, {});
  EXPECT_EQ(cache.stats().prefetch_issued, 1u);
  std::vector<void*> second = cache.acquire(0, {1}, 0);
  EXPECT_TRUE(holds(cache, second[0], 0, 1));
  EXPECT_TRUE(holds(cache, held[0], 0, 0));
  cache.release(0, {0}, 0);
  cache.release(0, {1}, 0);
  EXPECT_TRUE(!cache.resident(1, 0));
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.prefetch_wasted, 1u);
  EXPECT_EQ(s.prefetch_used, 0u);
  EXPECT_EQ(s.prefetch_hits, 0u);
  EXPECT_EQ(s.misses, 2u);
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_TRUE(s.prefetch_cancelled <= 1u);
  EXPECT_TRUE(s.bytes_prefetch <= kBlob);
}

// Every expert an acquire returns counts once, as a hit or a miss, also when another
// thread's acquire of it is still copying. Slow copies (50 ms each) make the overlap
// likely: A acquires {k0, k1} and copies k0 first; meanwhile B acquires {k1}.
TEST(concurrent_acquires_each_counted_once) {
  ef::ExpertCache cache(make_pool(1, 4, kBlob, ef::LinkModel{100.0, 50000.0}), 3, policy("lru"));
  std::atomic<int> wrong{0};
  std::thread a([&] { wrong += use(cache, 0, {0, 1}); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::thread b([&] { wrong += use(cache, 0, {1}); });
  a.join();
  b.join();
  EXPECT_EQ(wrong.load(), 0);
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits + s.misses, 3u);
  EXPECT_EQ(s.layers[0].hits + s.layers[0].misses, 3u);
  EXPECT_EQ(s.misses, 2u);  // one demand copy per expert
}

// The CPU link model: a miss takes at least bytes / bandwidth plus the latency.
TEST(cpu_link_model_lower_bound) {
  using Clock = std::chrono::steady_clock;
  const std::size_t blob = 1 << 20;
  {
    ef::LinkModel link{0.5, 0.0};  // 0.5e9 B/s: 1 MiB takes >= 2.1 ms
    ef::ExpertCache cache(make_pool(1, 4, blob, link), 2, policy("lru"));
    const double floor_s = static_cast<double>(blob) / (link.gbps * 1e9);
    for (int e = 0; e < 4; ++e) {
      auto start = Clock::now();
      std::vector<void*> addrs = cache.acquire(0, {e}, 0);
      double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      EXPECT_TRUE(elapsed >= floor_s * 0.99);
      EXPECT_TRUE(holds(cache, addrs[0], 0, e));
      cache.release(0, {e}, 0);
    }
    EXPECT_EQ(cache.stats().misses, 4u);
  }
  {
    ef::LinkModel link{100.0, 3000.0};  // 3 ms per copy
    ef::ExpertCache cache(make_pool(1, 4, kBlob, link), 2, policy("lru"));
    auto start = Clock::now();
    EXPECT_EQ(use(cache, 0, {0}), 0);
    double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_TRUE(elapsed >= 3e-3 * 0.99);
  }
}

EF_TEST_MAIN()
