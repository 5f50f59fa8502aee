// Shared helpers for the cache tests: pools whose blobs carry a byte pattern derived from
// their key, so that any slot's content can be checked against the key it should hold.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "ef_test.h"
#include "expertflow/backend.h"
#include "expertflow/error.h"
#include "expertflow/eviction_policy.h"
#include "expertflow/expert_cache.h"
#include "expertflow/host_pool.h"

namespace ef_fixture {

namespace ef = expertflow;

// Byte i of key k's blob. 131 is odd, so two keys below 256 differ at every position.
inline std::uint8_t pattern_byte(int key, std::size_t i) {
  return static_cast<std::uint8_t>(key * 131 + i * 7 + (i >> 8) * 3 + 17);
}

inline void fill_pattern(ef::HostPool& pool) {
  const ef::ExpertLayout& layout = pool.layout();
  for (int key = 0; key < layout.num_keys(); ++key) {
    auto* blob = reinterpret_cast<std::uint8_t*>(pool.blob(key));
    for (std::size_t i = 0; i < layout.bytes(key); ++i) blob[i] = pattern_byte(key, i);
  }
}

inline std::shared_ptr<ef::HostPool> make_pool(const ef::ExpertLayout& layout,
                                               ef::LinkModel link = {}) {
  auto pool =
      std::make_shared<ef::HostPool>(ef::make_backend(ef::DeviceKind::kCpu, 0, link), layout);
  fill_pattern(*pool);
  return pool;
}

inline std::shared_ptr<ef::HostPool> make_pool(int layers, int experts, std::size_t bytes,
                                               ef::LinkModel link = {}) {
  return make_pool(ef::ExpertLayout(layers, experts, bytes), link);
}

inline ef::PolicyOptions policy(const std::string& name) {
  ef::PolicyOptions options;
  options.name = name;
  return options;
}

// Whether host-readable `addr` holds key's blob: every byte when `stride` is 1, otherwise
// the first, middle and last bytes plus every stride-th one.
inline bool holds(const void* addr, int key, std::size_t bytes, std::size_t stride = 1) {
  if (addr == nullptr) return false;
  const auto* p = static_cast<const std::uint8_t*>(addr);
  if (p[0] != pattern_byte(key, 0) || p[bytes / 2] != pattern_byte(key, bytes / 2) ||
      p[bytes - 1] != pattern_byte(key, bytes - 1))
    return false;
  for (std::size_t i = 0; i < bytes; i += stride)
    if (p[i] != pattern_byte(key, i)) return false;
  return true;
}

inline bool holds(const ef::ExpertCache& cache, const void* addr, int layer, int expert) {
  const ef::ExpertLayout& layout = cache.pool().layout();
  int key = layout.key(layer, expert);
  return holds(addr, key, layout.bytes(key));
}

// Acquires, checks every returned slot's bytes, releases. Returns the number of slots whose
// bytes were wrong.
inline int use(ef::ExpertCache& cache, int layer, const std::vector<int>& experts) {
  std::vector<void*> addrs = cache.acquire(layer, experts, 0);
  int wrong = addrs.size() == experts.size() ? 0 : 1;
  for (std::size_t i = 0; i < addrs.size() && i < experts.size(); ++i)
    if (!holds(cache, addrs[i], layer, experts[i])) ++wrong;
  cache.release(layer, experts, 0);
  return wrong;
}

// Which (layer, expert) pairs are resident, as a string of 0/1 per key.
inline std::string residency(const ef::ExpertCache& cache) {
  const ef::ExpertLayout& layout = cache.pool().layout();
  std::string out;
  for (int key = 0; key < layout.num_keys(); ++key)
    out += cache.resident(layout.layer_of(key), layout.expert_of(key)) ? '1' : '0';
  return out;
}

// Polls `pred` until it holds or `seconds` pass: for counters updated by prefetch workers.
template <typename Pred>
bool wait_until(Pred pred, double seconds = 5.0) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

}  // namespace ef_fixture
