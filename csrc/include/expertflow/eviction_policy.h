// EvictionPolicy: which resident expert to overwrite.
//
// A policy is a pure function of the cache's state (the slot table, recency, the
// predictions) and its own counters, so trace replay reproduces live decisions. The
// cache decides which slots may be victims at all (never pinned or in-flight ones, and
// for a prefetch never one predicted for a sooner use) and always fills empty slots
// first; the policy only ranks the candidates it is shown.
//
// Policies:
//   lru        least recently used.
//   lfu        least frequently used; counts are kept for evicted experts too, decay
//              multiplies every count by `decay` each `decay_period` accesses; ties go
//              to the least recently accessed, counting accesses in the order asked.
//   static     a fixed set (from calibration frequencies) stays once loaded; any other
//              expert streams through a slot outside the set and is dropped on release.
//   expertflow LRU plus prediction: unpredicted experts first, least recently used
//              first; then predicted ones, farthest predicted use and lowest confidence
//              first.
//   belady     the offline optimum (MIN), for replay: evicts the expert whose next use in
//              the known future is farthest.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace expertflow {

// What a policy sees of one slot.
struct SlotView {
  int key = -1;  // -1: empty
  int layer = -1;
  std::uint64_t last_use = 0;  // tick of its last use (acquire ticks hits, then misses)
  bool evictable = false;      // not pinned, not in flight, and the policy may evict it
};

// The state a victim is chosen from. Prediction of a key: confidence[key] >= 0, for the
// next time its layer runs, which is distance() layers ahead (1 = the next layer).
struct VictimQuery {
  const std::vector<SlotView>& slots;
  const std::vector<float>& confidence;  // per key; < 0: no prediction
  int current_layer;                     // the last layer acquired, -1 before any
  int num_layers;
  // For a prefetch: slots predicted for a sooner use than this one (or as soon, with at
  // least this confidence) are not candidates. max_distance 0: no such limit.
  int max_distance = 0;
  float min_confidence = 0.0f;

  int distance(int layer) const {
    int d = (layer - current_layer - 1) % num_layers;
    return (d < 0 ? d + num_layers : d) + 1;
  }
  bool predicted(int key) const { return confidence[key] >= 0.0f; }
  bool candidate(int slot) const {
    const SlotView& s = slots[slot];
    if (!s.evictable) return false;
    if (max_distance == 0 || !predicted(s.key)) return true;
    int d = distance(s.layer);
    return d > max_distance || (d == max_distance && confidence[s.key] < min_confidence);
  }
};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual std::string name() const = 0;

  // Called once by the cache before use, with the number of keys in its layout.
  virtual void bind(int num_keys) { (void)num_keys; }
  // Whether an acquire of `keys` may go ahead: throws InvalidArgument if the policy cannot
  // serve it (belady: not the acquire its future names next). Changes nothing.
  virtual void check_access(const std::vector<int>& keys) const { (void)keys; }
  // Every acquire, hit or miss, with all the keys it asked for, in call order, once its
  // copies were issued: an acquire that fails leaves the policy as it was. Follows a
  // check_access() of the same keys; does not throw.
  virtual void on_access(const std::vector<int>& keys, std::uint64_t tick) {
    (void)keys;
    (void)tick;
  }
  // Whether a key stays resident after its last release.
  virtual bool retains(int key) const {
    (void)key;
    return true;
  }
  // Whether a resident key may ever be a victim; the cache shows only such slots.
  virtual bool may_evict(int key) const {
    (void)key;
    return true;
  }
  // A candidate slot to overwrite (query.candidate(slot) is true), or -1 when none may be.
  virtual int choose_victim(const VictimQuery& query) = 0;
};

struct PolicyOptions {
  std::string name = "lru";              // lru | lfu | static | expertflow | belady
  double lfu_decay = 1.0;                // lfu: multiply counts by this...
  std::uint64_t lfu_decay_period = 0;    // ...every this many accesses (0: never)
  std::vector<int> static_keys;          // static: the keys kept resident
  std::vector<std::vector<int>> future;  // belady: the keys of every acquire, in order
};

// Throws InvalidArgument naming the unknown name or the bad option.
std::unique_ptr<EvictionPolicy> make_policy(const PolicyOptions& options);

}  // namespace expertflow
