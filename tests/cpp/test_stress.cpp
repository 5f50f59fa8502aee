// Several threads acquiring, prefetching and releasing on one shared cache, checking the
// bytes of every slot they are given, for every live policy; then the counters agree.
// And close() racing acquires: the arena must outlive every acquire that began before the
// close (ThreadSanitizer and AddressSanitizer builds catch a slot address read from an
// arena being freed).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cache_fixture.h"
#include "ef_test.h"
#include "expertflow/error.h"
#include "expertflow/expert_cache.h"

namespace ef = expertflow;
using ef_fixture::holds;

namespace {

constexpr int kLayers = 4;
constexpr int kExperts = 16;
constexpr int kSlots = 12;
constexpr int kThreads = 4;
constexpr int kIterations = 5000;
constexpr std::size_t kBlob = 4096;

// Ends the process if a run takes far longer than it should (a deadlock), so that the
// failure names the policy instead of surfacing as a ctest timeout.
class Watchdog {
 public:
  Watchdog(std::string what, std::chrono::seconds limit)
      : thread_([this, what, limit] {
          std::unique_lock<std::mutex> lock(mutex_);
          if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
            std::fprintf(stderr, "FAILED: %s still running after %llds: deadlock?\n", what.c_str(),
                         static_cast<long long>(limit.count()));
            std::_Exit(1);
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

void stress(const ef::PolicyOptions& options, int max_per_acquire) {
  Watchdog watchdog("stress " + options.name, std::chrono::seconds(60));
  auto pool = ef_fixture::make_pool(kLayers, kExperts, kBlob);
  ef::ExpertCache cache(pool, kSlots, options, 2);
  std::atomic<std::uint64_t> acquired{0};
  std::atomic<int> wrong{0};
  std::atomic<int> errors{0};

  auto worker = [&](unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<int> all(kExperts);
    for (int e = 0; e < kExperts; ++e) all[e] = e;
    for (int it = 0; it < kIterations; ++it) {
      try {
        if (rng() % 3 == 0) {
          int layer = static_cast<int>(rng() % kLayers);
          std::shuffle(all.begin(), all.end(), rng);
          std::vector<int> experts(all.begin(), all.begin() + 1 + rng() % 4);
          std::vector<float> scores;
          if (rng() % 2)
            for (std::size_t i = 0; i < experts.size(); ++i)
              scores.push_back(static_cast<float>(rng() % 1000) / 1000.0f);
          cache.prefetch(layer, experts, scores);
        }
        int layer = static_cast<int>(rng() % kLayers);
        std::shuffle(all.begin(), all.end(), rng);
        std::vector<int> experts(all.begin(), all.begin() + 1 + rng() % max_per_acquire);
        std::vector<void*> addrs = cache.acquire(layer, experts, 0);
        acquired += experts.size();
        if (addrs.size() != experts.size()) {
          ++wrong;
        } else {
          for (std::size_t i = 0; i < experts.size(); ++i) {
            int key = layer * kExperts + experts[i];
            if (std::memcmp(addrs[i], pool->blob(key), kBlob) != 0 ||
                !holds(addrs[i], key, kBlob, 61))
              ++wrong;
            if (it % 16 == 0 && !cache.resident(layer, experts[i])) ++wrong;
          }
        }
        // Release in one call or two, in any order.
        if (experts.size() > 1 && rng() % 2) {
          std::vector<int> first(experts.begin(), experts.begin() + 1);
          std::vector<int> rest(experts.begin() + 1, experts.end());
          cache.release(layer, rest, 0);
          // The still-pinned expert keeps its bytes while others come and go.
          if (std::memcmp(addrs[0], pool->blob(layer * kExperts + experts[0]), kBlob) != 0) ++wrong;
          cache.release(layer, first, 0);
        } else {
          cache.release(layer, experts, 0);
        }
      } catch (const std::exception& e) {
        if (errors++ < 5) ef_test::fail(__FILE__, __LINE__, options.name + ": " + e.what());
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, 1000u + static_cast<unsigned>(t));
  for (std::thread& t : threads) t.join();

  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(errors.load(), 0);
  ef::CacheStats s = cache.stats();
  EXPECT_EQ(s.hits + s.misses, acquired.load());
  EXPECT_TRUE(s.hits > 0 && s.misses > 0);
  EXPECT_TRUE(s.prefetch_hits <= s.hits);
  // Late prefetches (acquired before their copy started) are hits copied on demand.
  EXPECT_EQ(s.bytes_demand, (s.misses + s.prefetch_late) * kBlob);
  ASSERT_TRUE(s.layers.size() == static_cast<std::size_t>(kLayers));
  std::uint64_t layer_hits = 0, layer_misses = 0, layer_prefetch_hits = 0;
  for (const ef::LayerStats& l : s.layers) {
    layer_hits += l.hits;
    layer_misses += l.misses;
    layer_prefetch_hits += l.prefetch_hits;
  }
  EXPECT_EQ(layer_hits, s.hits);
  EXPECT_EQ(layer_misses, s.misses);
  EXPECT_EQ(layer_prefetch_hits, s.prefetch_hits);

  cache.close();  // settles every prefetch: done or cancelled
  s = cache.stats();
  EXPECT_TRUE(s.prefetch_issued > 0);
  EXPECT_EQ(s.prefetch_used, s.prefetch_hits);
  EXPECT_TRUE(s.prefetch_used + s.prefetch_wasted <= s.prefetch_issued);
  EXPECT_TRUE(s.prefetch_cancelled <= s.prefetch_wasted);
  EXPECT_TRUE(s.bytes_prefetch <= s.prefetch_issued * kBlob);
  EXPECT_TRUE(s.prefetch_late <= s.prefetch_used);
  EXPECT_TRUE(s.bytes_prefetch >=
              (s.prefetch_issued - s.prefetch_cancelled - s.prefetch_late) * kBlob);
  std::fprintf(
      stderr,
      "  %s: %llu experts, %llu hits (%llu prefetched), %llu misses, %llu evictions, "
      "%llu prefetches (%llu wasted, %llu dropped)\n",
      options.name.c_str(), static_cast<unsigned long long>(acquired.load()),
      static_cast<unsigned long long>(s.hits), static_cast<unsigned long long>(s.prefetch_hits),
      static_cast<unsigned long long>(s.misses), static_cast<unsigned long long>(s.evictions),
      static_cast<unsigned long long>(s.prefetch_issued),
      static_cast<unsigned long long>(s.prefetch_wasted),
      static_cast<unsigned long long>(s.prefetch_dropped));
}

}  // namespace

// Threads acquire and release until the cache is closed under them; each call either
// completes or throws StateError. (The slots' bytes are not read: a caller that closes
// while it still uses slots is at fault, and close() does not wait for unreleased reads.)
TEST(close_during_acquires) {
  for (int round = 0; round < 30; ++round) {
    Watchdog watchdog("close_during_acquires", std::chrono::seconds(60));
    auto pool = ef_fixture::make_pool(kLayers, kExperts, kBlob);
    ef::ExpertCache cache(pool, kSlots, ef_fixture::policy("lru"));
    std::atomic<int> started{0}, wrong{0}, other_errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937 rng(round * kThreads + t);
        ++started;
        for (;;) {
          int layer = static_cast<int>(rng() % kLayers);
          std::vector<int> experts = {static_cast<int>(rng() % kExperts)};
          try {
            std::vector<void*> addrs = cache.acquire(layer, experts, 0);
            if (addrs.size() != 1 || addrs[0] == nullptr) ++wrong;
            cache.release(layer, experts, 0);
          } catch (const ef::StateError&) {
            return;  // closed
          } catch (const std::exception&) {
            ++other_errors;
            return;
          }
        }
      });
    }
    while (started < kThreads) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::microseconds(200 * (round % 5)));
    cache.close();
    for (std::thread& thread : threads) thread.join();
    EXPECT_EQ(other_errors.load(), 0);
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_TRUE(cache.closed());
    EXPECT_THROW(cache.acquire(0, {0}, 0), ef::StateError);
  }
}

TEST(stress_lru) { stress(ef_fixture::policy("lru"), 3); }

TEST(stress_lfu) {
  ef::PolicyOptions options = ef_fixture::policy("lfu");
  options.lfu_decay = 0.9;
  options.lfu_decay_period = 64;
  stress(options, 3);
}

TEST(stress_expertflow) { stress(ef_fixture::policy("expertflow"), 3); }

TEST(stress_static) {
  // 4 static keys leave 8 slots to stream through: at most 4 threads x 2 pinned experts,
  // so an acquire can always find a slot once the others release.
  ef::PolicyOptions options = ef_fixture::policy("static");
  options.static_keys = {0, 17, 34, 51};
  stress(options, 2);
}

EF_TEST_MAIN()
