#include "expertflow/eviction_policy.h"

#include <algorithm>
#include <limits>
#include <unordered_set>

#include "expertflow/error.h"

namespace expertflow {

namespace {

// The candidate that minimises `rank` (a tuple, compared lexicographically); the lowest
// slot index wins ties.
template <typename Rank>
int argmin_candidate(const VictimQuery& query, Rank rank) {
  int best = -1;
  decltype(rank(0)) best_rank{};
  for (int slot = 0; slot < static_cast<int>(query.slots.size()); ++slot) {
    if (!query.candidate(slot)) continue;
    auto r = rank(slot);
    if (best < 0 || r < best_rank) {
      best = slot;
      best_rank = r;
    }
  }
  return best;
}

class LruPolicy final : public EvictionPolicy {
 public:
  std::string name() const override { return "lru"; }
  int choose_victim(const VictimQuery& query) override {
    return argmin_candidate(query, [&](int slot) { return query.slots[slot].last_use; });
  }
};

class LfuPolicy final : public EvictionPolicy {
 public:
  LfuPolicy(double decay, std::uint64_t period) : decay_(decay), period_(period) {
    EF_CHECK(decay > 0.0 && decay <= 1.0, "lfu decay must be in (0, 1], got ", decay);
  }
  std::string name() const override { return "lfu"; }
  void bind(int num_keys) override {
    counts_.assign(num_keys, 0.0);
    last_access_.assign(num_keys, 0);
  }
  void on_access(const std::vector<int>& keys, std::uint64_t) override {
    for (int key : keys) {
      counts_[key] += 1.0;
      last_access_[key] = ++accesses_;
      if (period_ > 0 && accesses_ % period_ == 0) {
        for (double& count : counts_) count *= decay_;
      }
    }
  }
  int choose_victim(const VictimQuery& query) override {
    return argmin_candidate(query, [&](int slot) {
      const SlotView& s = query.slots[slot];
      return std::make_pair(counts_[s.key], last_access_[s.key]);
    });
  }

 private:
  double decay_;
  std::uint64_t period_;
  std::uint64_t accesses_ = 0;
  std::vector<double> counts_;              // per key, kept across evictions
  std::vector<std::uint64_t> last_access_;  // per key: its last access, in the order asked
};

class StaticPolicy final : public EvictionPolicy {
 public:
  explicit StaticPolicy(std::vector<int> keys) : keys_(std::move(keys)) {}
  std::string name() const override { return "static"; }
  void bind(int num_keys) override {
    in_set_.assign(num_keys, false);
    for (int key : keys_) {
      EF_CHECK(key >= 0 && key < num_keys, "static key ", key, " out of range [0, ", num_keys, ")");
      EF_CHECK(!in_set_[key], "static key ", key, " appears twice");
      in_set_[key] = true;
    }
  }
  bool retains(int key) const override { return in_set_[key]; }
  bool may_evict(int key) const override { return !in_set_[key]; }
  // Only the slots that stream other experts are candidates.
  int choose_victim(const VictimQuery& query) override {
    return argmin_candidate(query, [&](int slot) { return query.slots[slot].last_use; });
  }

 private:
  std::vector<int> keys_;
  std::vector<bool> in_set_;
};

class ExpertflowPolicy final : public EvictionPolicy {
 public:
  std::string name() const override { return "expertflow"; }
  int choose_victim(const VictimQuery& query) override {
    return argmin_candidate(query, [&](int slot) {
      const SlotView& s = query.slots[slot];
      if (!query.predicted(s.key)) {
        return std::make_tuple(0, 0, 0.0f, s.last_use);
      }
      // Farthest predicted use first, then lowest confidence, then least recent.
      return std::make_tuple(1, -query.distance(s.layer), query.confidence[s.key], s.last_use);
    });
  }
};

class BeladyPolicy final : public EvictionPolicy {
 public:
  explicit BeladyPolicy(std::vector<std::vector<int>> future) : future_(std::move(future)) {}
  std::string name() const override { return "belady"; }
  void bind(int num_keys) override {
    uses_.assign(num_keys, {});
    for (std::size_t step = 0; step < future_.size(); ++step) {
      for (int key : future_[step]) {
        EF_CHECK(key >= 0 && key < num_keys, "belady future key ", key, " at step ", step,
                 " out of range [0, ", num_keys, ")");
        uses_[key].push_back(step);
      }
    }
    next_.assign(num_keys, 0);
    step_ = 0;
  }
  void check_access(const std::vector<int>& keys) const override {
    EF_CHECK(step_ < future_.size(), "belady knows ", future_.size(),
             " acquires but was asked for acquire ", step_ + 1);
    std::vector<int> expected = future_[step_], got = keys;
    std::sort(expected.begin(), expected.end());
    std::sort(got.begin(), got.end());
    EF_CHECK(expected == got, "acquire ", step_, " differs from the future belady was given");
  }
  void on_access(const std::vector<int>& keys, std::uint64_t) override {
    for (int key : keys) ++next_[key];
    ++step_;
  }
  int choose_victim(const VictimQuery& query) override {
    return argmin_candidate(query, [&](int slot) {
      int key = query.slots[slot].key;
      const std::vector<std::size_t>& uses = uses_[key];
      std::size_t next =
          next_[key] < uses.size() ? uses[next_[key]] : std::numeric_limits<std::size_t>::max();
      return std::numeric_limits<std::size_t>::max() - next;  // farthest next use first
    });
  }

 private:
  std::vector<std::vector<int>> future_;
  std::vector<std::vector<std::size_t>> uses_;  // per key: the steps that use it
  std::vector<std::size_t> next_;               // per key: index of its next use in uses_
  std::size_t step_ = 0;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_policy(const PolicyOptions& options) {
  const std::string& name = options.name;
  if (name == "lru") return std::make_unique<LruPolicy>();
  if (name == "lfu")
    return std::make_unique<LfuPolicy>(options.lfu_decay, options.lfu_decay_period);
  if (name == "static") return std::make_unique<StaticPolicy>(options.static_keys);
  if (name == "expertflow") return std::make_unique<ExpertflowPolicy>();
  if (name == "belady") return std::make_unique<BeladyPolicy>(options.future);
  EF_THROW(InvalidArgument, "unknown eviction policy \"", name,
           "\"; choose lru, lfu, static, expertflow or belady");
}

}  // namespace expertflow
