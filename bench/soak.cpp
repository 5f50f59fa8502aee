// Soak: millions of acquire / prefetch / release operations from four threads with random
// patterns on one cache, every acquired slot's bytes verified, resident memory read at the
// start and the end. Prints and writes operations per second and the RSS figures.
//
//   ./build/test/soak [--ops 1000000] [--out bench/results/soak_cpu.json]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "expertflow/expert_cache.h"
#include "expertflow/host_pool.h"

namespace ef = expertflow;

namespace {

std::uint8_t pattern(int key, std::size_t i) {
  return static_cast<std::uint8_t>(key * 131 + i * 7 + 17);
}

long rss_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  long total_ops = 1000000;
  std::string out = "bench/results/soak_cpu.json";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--ops") == 0) total_ops = std::stol(argv[i + 1]);
    if (std::strcmp(argv[i], "--out") == 0) out = argv[i + 1];
  }
  constexpr int kLayers = 8, kExperts = 32, kSlots = 48, kThreads = 4;
  constexpr std::size_t kBlob = 2048;
  auto pool = std::make_shared<ef::HostPool>(ef::make_backend(ef::DeviceKind::kCpu),
                                             ef::ExpertLayout(kLayers, kExperts, kBlob));
  for (int key = 0; key < kLayers * kExperts; ++key) {
    auto* blob = reinterpret_cast<std::uint8_t*>(pool->blob(key));
    for (std::size_t i = 0; i < kBlob; ++i) blob[i] = pattern(key, i);
  }
  ef::PolicyOptions policy;
  policy.name = "expertflow";
  ef::ExpertCache cache(pool, kSlots, policy, 2);

  std::atomic<long> ops{0}, wrong{0}, errors{0};
  long rss_start = 0;
  auto worker = [&](unsigned seed) {
    std::mt19937 rng(seed);
    while (ops.load(std::memory_order_relaxed) < total_ops) {
      int layer = static_cast<int>(rng() % kLayers);
      std::vector<int> experts;
      while (experts.size() < 1 + rng() % 3) {
        int e = static_cast<int>(rng() % kExperts);
        if (std::find(experts.begin(), experts.end(), e) == experts.end()) experts.push_back(e);
      }
      try {
        if (rng() % 3 == 0) {
          cache.prefetch((layer + 1) % kLayers, experts, {});
          ++ops;
        }
        auto addresses = cache.acquire(layer, experts, 0);
        for (std::size_t i = 0; i < experts.size(); ++i) {
          const auto* p = static_cast<const std::uint8_t*>(addresses[i]);
          int key = layer * kExperts + experts[i];
          for (std::size_t b = 0; b < kBlob; b += 97) wrong += p[b] != pattern(key, b);
        }
        cache.release(layer, experts, 0);
        ops += 2;
      } catch (const std::exception& e) {
        ++errors;
        std::fprintf(stderr, "error: %s\n", e.what());
      }
    }
  };
  // Warm up to a steady state, then measure RSS from there.
  {
    std::thread(worker, 7u).join();
  }
  ops = 0;
  rss_start = rss_kib();
  auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, 100u + t);
  for (auto& t : threads) t.join();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  long rss_end = rss_kib();
  ef::CacheStats s = cache.stats();
  double per_second = ops / seconds;
  std::printf("%ld operations from %d threads in %.2f s: %.0f ops/s; %ld wrong bytes, %ld errors\n",
              ops.load(), kThreads, seconds, per_second, wrong.load(), errors.load());
  std::printf(
      "RSS %ld KiB at the start, %ld KiB at the end; %llu hits, %llu misses, %llu prefetches\n",
      rss_start, rss_end, static_cast<unsigned long long>(s.hits),
      static_cast<unsigned long long>(s.misses),
      static_cast<unsigned long long>(s.prefetch_issued));
  std::ofstream json(out);
  json << "{\n  \"operations\": " << ops << ",\n  \"threads\": " << kThreads
       << ",\n  \"seconds\": " << seconds << ",\n  \"operations_per_second\": " << per_second
       << ",\n  \"wrong_bytes\": " << wrong << ",\n  \"errors\": " << errors
       << ",\n  \"rss_kib_start\": " << rss_start << ",\n  \"rss_kib_end\": " << rss_end
       << ",\n  \"hits\": " << s.hits << ",\n  \"misses\": " << s.misses
       << ",\n  \"prefetch_issued\": " << s.prefetch_issued
       << ",\n  \"setup\": \"8 layers x 32 experts of 2 KiB, 48 slots, expertflow, 2 prefetch "
          "streams; each op an acquire+release pair counts 2, a prefetch 1\"\n}\n";
  std::printf("wrote %s\n", out.c_str());
  return wrong == 0 && errors == 0 ? 0 : 1;
}
