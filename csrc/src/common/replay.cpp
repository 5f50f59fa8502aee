#include "expertflow/replay.h"

#include <algorithm>
#include <memory>
#include <sstream>
#include <thread>

#include "expertflow/error.h"
#include "expertflow/timeline.h"
#include "expertflow/transfer_engine.h"
#include "expertflow/transition_predictor.h"

namespace expertflow {

namespace {

using StepIt = std::vector<ReplayStep>::const_iterator;

enum class Misses { kCopy, kCpu, kHybrid };
enum class Guess { kNone, kHistory, kOracle, kOracleWhenIdle };

struct Strategy {
  std::string name;
  std::string policy;  // the cache's; empty: no cache
  Misses misses = Misses::kCopy;
  Guess guess = Guess::kNone;
  bool hot_set = false;  // static_cpu: the calibrated set stays on the device
};

const std::vector<Strategy>& known_strategies() {
  static const std::vector<Strategy> table = {
      {"none", "", Misses::kCopy},
      {"lru", "lru", Misses::kCopy},
      {"lfu", "lfu", Misses::kCopy},
      {"static", "static", Misses::kCopy},
      {"belady", "belady", Misses::kCopy},
      {"expertflow", "expertflow", Misses::kCopy, Guess::kHistory},
      {"cpu", "", Misses::kCpu},
      {"static_cpu", "", Misses::kCpu, Guess::kNone, true},
      {"lru_spec", "lru", Misses::kCopy, Guess::kOracle},
      {"hybrid", "expertflow", Misses::kHybrid, Guess::kOracleWhenIdle},
  };
  return table;
}

const Strategy& strategy_named(const std::string& name) {
  for (const Strategy& s : known_strategies()) {
    if (s.name == name) return s;
  }
  std::ostringstream known;
  for (const std::string& n : strategy_names()) known << " " << n;
  EF_THROW(InvalidArgument, "unknown strategy \"", name, "\"; known:", known.str());
}

void check_steps(int num_layers, int experts_per_layer, const std::vector<ReplayStep>& steps) {
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const ReplayStep& step = steps[i];
    EF_CHECK(step.layer >= 0 && step.layer < num_layers, "step ", i, ": layer ", step.layer,
             " out of range [0, ", num_layers, ")");
    for (int e : step.experts) {
      EF_CHECK(e >= 0 && e < experts_per_layer, "step ", i, ": expert id ", e, " out of range [0, ",
               experts_per_layer, ")");
    }
  }
}

// The first `keep` calibration keys, in all or per layer.
std::vector<int> static_set(const ReplayOptions& options, int num_layers, int experts, int keep) {
  std::vector<int> kept;
  std::vector<int> per_layer(num_layers, 0);
  for (int k : options.policy.static_keys) {
    EF_CHECK(k >= 0 && k < num_layers * experts, "static key ", k, " out of range [0, ",
             num_layers * experts, ")");
    int& count = options.per_layer ? per_layer[k / experts] : per_layer[0];
    if (count < keep) {
      kept.push_back(k);
      ++count;
    }
  }
  return kept;
}

// The caches of one request (or of the whole trace): one, or one per layer.
class Caches {
 public:
  Caches(int num_layers, int experts, const ReplayOptions& options, const std::string& policy_name,
         const std::vector<int>& static_keys, StepIt begin, StepIt end)
      : per_layer_(options.per_layer), experts_(experts) {
    auto backend = make_backend(DeviceKind::kCpu);
    int caches = per_layer_ ? num_layers : 1;
    auto pool =
        std::make_shared<HostPool>(backend, ExpertLayout(per_layer_ ? 1 : num_layers, experts, 1));
    for (int c = 0; c < caches; ++c) {
      PolicyOptions policy = options.policy;
      policy.name = policy_name;
      policy.static_keys.clear();
      for (int k : static_keys) {  // a layer's cache knows its own experts only
        if (!per_layer_) policy.static_keys.push_back(k);
        if (per_layer_ && k / experts == c) policy.static_keys.push_back(k % experts);
      }
      if (policy.name == "belady") policy.future = future(c, begin, end);
      caches_.push_back(std::make_unique<ExpertCache>(pool, options.capacity, policy));
    }
  }

  ExpertCache& of(int layer) { return *caches_[per_layer_ ? layer : 0]; }
  int layer_in(int layer) const { return per_layer_ ? 0 : layer; }
  bool resident(int layer, int expert) { return of(layer).resident(layer_in(layer), expert); }

  void add_stats(LayerStats& total) {
    for (auto& cache : caches_) total += cache->stats();
  }

 private:
  std::vector<std::vector<int>> future(int cache, StepIt begin, StepIt end) const {
    std::vector<std::vector<int>> keys;
    for (auto step = begin; step != end; ++step) {
      if (per_layer_ && step->layer != cache) continue;
      std::vector<int> step_keys;
      for (int e : step->experts) step_keys.push_back(per_layer_ ? e : step->layer * experts_ + e);
      keys.push_back(std::move(step_keys));
    }
    return keys;
  }

  bool per_layer_;
  int experts_;
  std::vector<std::unique_ptr<ExpertCache>> caches_;
};

std::uint64_t mix(std::uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// lru_spec's guess of `next`'s experts: each one with probability `recall`, then wrong
// experts up to as many as `next` uses.
std::vector<int> oracle_guess(const ReplayStep& next, int experts, double recall,
                              std::uint64_t seed) {
  std::uint64_t h = mix(seed ^ mix(static_cast<std::uint64_t>(next.request) << 32 ^
                                   static_cast<std::uint64_t>(next.token) << 8 ^
                                   static_cast<std::uint64_t>(next.layer)));
  std::vector<int> guess;
  for (int e : next.experts) {
    h = mix(h);
    if (static_cast<double>(h >> 11) * 0x1.0p-53 < recall) guess.push_back(e);
  }
  int offset = static_cast<int>(mix(h) % static_cast<std::uint64_t>(experts));
  for (int j = 0; j < experts && guess.size() < next.experts.size(); ++j) {
    int e = (offset + j) % experts;
    auto in = [e](const std::vector<int>& v) {
      return std::find(v.begin(), v.end(), e) != v.end();
    };
    if (!in(next.experts) && !in(guess)) guess.push_back(e);
  }
  return guess;
}

// One strategy over the steps: the caches, predictor and timeline of each request in turn.
class Run {
 public:
  Run(int num_layers, int experts, const ReplayOptions& options, const Strategy& strategy,
      int top_k)
      : num_layers_(num_layers),
        experts_(experts),
        options_(options),
        strategy_(strategy),
        history_(num_layers, experts) {
    result_.strategy = strategy.name;
    if (strategy.policy == "static") {
      static_keys_ = static_set(options, num_layers, experts, options.capacity - top_k);
    }
    if (strategy.hot_set || strategy.misses == Misses::kHybrid) {
      hot_.assign(static_cast<std::size_t>(num_layers) * experts, 0);
      hot_of_layer_.resize(num_layers);
      for (int k : static_set(options, num_layers, experts, options.capacity)) {
        hot_[k] = 1;
        hot_of_layer_[k / experts].push_back(k % experts);
      }
      calibrated_ = !options.policy.static_keys.empty();
    }
  }

  void request(StepIt begin, StepIt end) {
    std::size_t keys = static_cast<std::size_t>(num_layers_) * experts_;
    arrival_.assign(keys, 0.0);
    pending_.assign(keys, -1);
    loaded_.assign(keys, 0);
    history_.new_request();
    if (!strategy_.policy.empty()) {
      caches_ = std::make_unique<Caches>(num_layers_, experts_, options_, strategy_.policy,
                                         static_keys_, begin, end);
    }
    PassTimeline timeline(options_.rates, options_.model,
                          static_cast<double>(TransferEngine::kPrefetchChunkBytes));
    timeline_ = &timeline;
    bool counted = false;
    for (auto step = begin; step != end; ++step) {
      auto next = step + 1;
      counted = run_step(*step, next != end ? &*next : nullptr);
    }
    // The request is over: queued prefetches are cancelled, as closing its cache does.
    double dropped = timeline.link().cancel_queued(timeline.layer_end());
    double end_time = timeline.finish();
    if (counted) {
      result_.modelled_seconds += end_time - timeline.layer_end();
      result_.bytes_prefetch -= dropped;  // issued by the last, counted, steps
    }
    if (caches_) caches_->add_stats(result_.cache);
    caches_.reset();
    timeline_ = nullptr;
  }

  ReplayResult finish() {
    const HardwareRates& rates = options_.rates;
    result_.link_busy_seconds = copy_seconds(result_.bytes_demand + result_.bytes_prefetch, rates);
    result_.bound_seconds = std::max(
        {result_.device_busy_seconds, result_.link_busy_seconds, result_.cpu_busy_seconds});
    double dense = dense_seconds(options_.model, rates);
    double device = device_expert_seconds(options_.model, 1, rates);
    double cpu = cpu_expert_seconds(options_.model, 1, rates);
    double accesses = static_cast<double>(result_.accesses);
    double device_all = result_.steps * dense + accesses * device;
    double on_cpu = std::clamp(device_all / (device + cpu), 0.0, accesses);
    result_.compute_floor_seconds = std::max(device_all - on_cpu * device, on_cpu * cpu);
    return result_;
  }

 private:
  enum class Where { kDevice, kCopy, kCpu };

  bool holds(int layer, int expert) const {
    if (caches_) return caches_->resident(layer, expert);
    std::size_t k = key(layer, expert);
    return !hot_.empty() && hot_[k] && loaded_[k];
  }
  std::size_t key(int layer, int expert) const {
    return static_cast<std::size_t>(layer) * experts_ + expert;
  }

  // When a resident expert's weights are on the device; a prefetch still queued becomes a
  // demand copy.
  double arrival(std::size_t k) {
    if (pending_[k] >= 0) {
      arrival_[k] = timeline_->link().arrival(pending_[k], timeline_->routed());
      pending_[k] = -1;
    }
    return arrival_[k];
  }

  Where place(int layer, int expert) {
    if (strategy_.misses == Misses::kCpu && !strategy_.hot_set) return Where::kCpu;
    std::size_t k = key(layer, expert);
    if (holds(layer, expert)) {
      double available = arrival(k);
      if (strategy_.misses == Misses::kHybrid &&
          timeline_->cpu_finish_if() < timeline_->device_finish_if(available)) {
        return Where::kCpu;
      }
      timeline_->on_device(available, -1);
      return Where::kDevice;
    }
    if (strategy_.hot_set && !hot_[k]) return Where::kCpu;
    if (strategy_.misses == Misses::kHybrid && timeline_->place_miss().where == Placement::kCpu) {
      return Where::kCpu;
    }
    loaded_[k] = 1;
    // Layers run one after another here, so a victim's reads ended before this layer
    // began: the copy need not wait for its slot (slot -1).
    arrival_[k] = timeline_->copy(-1);
    pending_[k] = -1;
    return Where::kCopy;
  }

  bool run_step(const ReplayStep& step, const ReplayStep* next) {
    bool counted = step.token >= options_.warmup_tokens;
    double start = timeline_->layer_end();
    double device0 = timeline_->device_busy(), cpu0 = timeline_->cpu_busy();
    timeline_->begin_layer();
    std::vector<int> on_device, cpu_misses;
    std::uint64_t hits = 0, copies = 0, cpu = 0;
    for (int e : step.experts) {
      bool resident = holds(step.layer, e);
      Where where = place(step.layer, e);
      hits += resident && where == Where::kDevice;
      copies += where == Where::kCopy;
      if (where == Where::kCpu) {
        timeline_->on_cpu();
        ++cpu;
        if (!resident && strategy_.misses == Misses::kHybrid) cpu_misses.push_back(e);
      } else {
        on_device.push_back(e);
      }
    }
    history_.observe(step.layer, step.experts);
    double prefetched = cache_step(step, next, on_device, cpu_misses);
    double end = timeline_->end_layer();
    if (!counted) return false;
    if (step.token != last_token_ || step.request != last_request_) ++result_.tokens;
    last_token_ = step.token;
    last_request_ = step.request;
    ++result_.steps;
    result_.accesses += step.experts.size();
    result_.hits += hits;
    result_.misses += step.experts.size() - hits;
    result_.cpu_experts += cpu;
    result_.bytes_demand += copies * options_.model.expert_bytes;
    result_.bytes_prefetch += prefetched;
    result_.modelled_seconds += end - start;
    result_.device_busy_seconds += timeline_->device_busy() - device0;
    result_.cpu_busy_seconds += timeline_->cpu_busy() - cpu0;
    return true;
  }

  // Acquires the device experts, issues the next layer's prefetches while they are pinned
  // (as live), releases them. Hybrid then copies the misses it computed on the CPU into
  // the cache if the link is still idle, so that its cache learns what the CPU served.
  // Returns the bytes prefetched.
  double cache_step(const ReplayStep& step, const ReplayStep* next,
                    const std::vector<int>& on_device, const std::vector<int>& cpu_misses) {
    if (!caches_) return 0.0;
    ExpertCache& cache = caches_->of(step.layer);
    int layer = caches_->layer_in(step.layer);
    if (!on_device.empty()) cache.acquire(layer, on_device, 0);
    double bytes = 0.0;
    if (step.layer + 1 < num_layers_) {
      protect_hot(step.layer + 1);
      std::vector<float> scores;
      std::vector<int> experts = guess(step, next, scores);
      bytes += copy_ahead(step.layer + 1, experts, scores);
    }
    if (!on_device.empty()) cache.release(layer, on_device, 0);
    if (timeline_->link().queue_empty(timeline_->routed())) {
      bytes += copy_ahead(step.layer, admitted(step.layer, cpu_misses), {});
    }
    return bytes;
  }

  std::vector<int> guess(const ReplayStep& step, const ReplayStep* next,
                         std::vector<float>& scores) {
    int top =
        options_.prefetch_top > 0 ? options_.prefetch_top : static_cast<int>(step.experts.size());
    std::vector<int> experts;
    switch (strategy_.guess) {
      case Guess::kNone:
        break;
      case Guess::kHistory:
        for (auto [e, score] : history_.predict(step.layer + 1, top)) {
          experts.push_back(e);
          scores.push_back(score);
        }
        break;
      case Guess::kOracleWhenIdle:
        if (!prefetch_pays()) break;
        [[fallthrough]];
      case Guess::kOracle:
        if (next && next->request == step.request && next->token == step.token &&
            next->layer == step.layer + 1) {
          experts = oracle_guess(*next, experts_, options_.speculative_recall, options_.seed);
          scores.assign(experts.size(), static_cast<float>(options_.speculative_recall));
        }
        break;
    }
    return experts;
  }

  // Hybrid with a calibration predicts the next layer's hot experts at half a guess's
  // confidence (the unpredicted go first, a guess outranks them) where a miss would go to
  // the CPU: there a cold expert's misses cost CPU time whatever the cache holds, so the
  // hot set stays as static_cpu's does while guesses still get their slots. Where a miss
  // would be copied, every miss costs a copy, and recency (lru_spec's ranking) is the
  // better guess of the next use: ranking the calibrated set above it evicts an expert
  // this request uses often but the calibration found cold (on Mixtral at 7 of 8 experts
  // per layer, a layer's coldest expert in one problem is often the other's most used).
  void protect_hot(int layer) {
    if (!calibrated_ || hot_of_layer_[layer].empty()) return;
    if (timeline_->place_miss().where != Placement::kCpu) return;
    float confidence = 0.5f * static_cast<float>(options_.speculative_recall);
    std::vector<float> scores(hot_of_layer_[layer].size(), confidence);
    caches_->of(layer).predict(caches_->layer_in(layer), hot_of_layer_[layer], scores);
  }

  // The CPU-served misses hybrid copies into its cache when the link is idle: with a
  // calibration, only the hot ones, so that cold experts do not displace them.
  std::vector<int> admitted(int layer, const std::vector<int>& cpu_misses) const {
    if (!calibrated_) return cpu_misses;
    std::vector<int> hot;
    for (int e : cpu_misses) {
      if (hot_[key(layer, e)]) hot.push_back(e);
    }
    return hot;
  }

  // Whether a guess for the next layer is worth the link: when no prefetch is waiting, or
  // by the design's pay-off rule, with p the guess's recall and h the share of its copy,
  // started after what the link owes, done before the next layer needs it:
  // p h >= (1 - p)(1 - h).
  bool prefetch_pays() {
    PassTimeline& t = *timeline_;
    if (t.link().queue_empty(t.routed())) return true;
    double needed = t.expected_end() + dense_seconds(t.model(), t.rates());
    double copy = copy_seconds(t.model().expert_bytes, t.rates());
    double h = std::clamp((needed - t.link().backlog_end(t.routed())) / copy, 0.0, 1.0);
    double p = options_.speculative_recall;
    return p * h >= (1.0 - p) * (1.0 - h);
  }

  // Prefetches `experts` of `layer` into the cache and onto the link; returns the bytes.
  double copy_ahead(int layer, const std::vector<int>& experts, const std::vector<float>& scores) {
    if (experts.empty()) return 0.0;
    std::vector<char> before;
    for (int e : experts) before.push_back(holds(layer, e));
    ExpertCache& target = caches_->of(layer);
    target.prefetch(caches_->layer_in(layer), experts, scores);
    // Replay is deterministic: each prefetch lands before the next step.
    while (target.pending_prefetches() > 0) std::this_thread::yield();
    double bytes = 0.0;
    for (std::size_t i = 0; i < experts.size(); ++i) {
      if (before[i] || !holds(layer, experts[i])) continue;  // resident already, or dropped
      std::size_t k = key(layer, experts[i]);
      pending_[k] = timeline_->link().prefetch(timeline_->routed(), options_.model.expert_bytes);
      bytes += options_.model.expert_bytes;
    }
    return bytes;
  }

  int num_layers_;
  int experts_;
  const ReplayOptions& options_;
  const Strategy& strategy_;
  TransitionPredictor history_;
  std::vector<int> static_keys_;
  std::vector<char> hot_;
  std::vector<std::vector<int>> hot_of_layer_;  // hybrid: the calibrated set, per layer
  bool calibrated_ = false;
  std::vector<char> loaded_;
  std::vector<double> arrival_;
  std::vector<int> pending_;
  std::unique_ptr<Caches> caches_;
  PassTimeline* timeline_ = nullptr;
  int last_request_ = -1;
  int last_token_ = -1;
  ReplayResult result_;
};

ReplayResult run(int num_layers, int experts, const std::vector<ReplayStep>& steps,
                 const ReplayOptions& options, const Strategy& strategy) {
  std::size_t top_k = 1;
  for (const ReplayStep& step : steps) top_k = std::max(top_k, step.experts.size());
  Run run(num_layers, experts, options, strategy, static_cast<int>(top_k));
  auto begin = steps.begin();
  while (begin != steps.end()) {
    auto end = begin;
    if (options.reset_per_request) {
      while (end != steps.end() && end->request == begin->request) ++end;
    } else {
      end = steps.end();
    }
    run.request(begin, end);
    begin = end;
  }
  return run.finish();
}

void check_options(int num_layers, int experts, const std::vector<ReplayStep>& steps,
                   const ReplayOptions& options) {
  EF_CHECK(options.capacity > 0, "replay capacity must be positive, got ", options.capacity);
  EF_CHECK(options.speculative_recall >= 0.0 && options.speculative_recall <= 1.0,
           "speculative recall must be in [0, 1], got ", options.speculative_recall);
  check_costs(options.rates, options.model);
  check_steps(num_layers, experts, steps);
}

}  // namespace

std::vector<std::string> strategy_names() {
  std::vector<std::string> names;
  for (const Strategy& s : known_strategies()) names.push_back(s.name);
  return names;
}

}  // namespace expertflow

namespace expertflow {

ReplayResult replay(int num_layers, int experts_per_layer, const std::vector<ReplayStep>& steps,
                    const ReplayOptions& options) {
  check_options(num_layers, experts_per_layer, steps, options);
  Strategy strategy{options.policy.name, options.policy.name, Misses::kCopy,
                    options.history ? Guess::kHistory : Guess::kNone};
  return run(num_layers, experts_per_layer, steps, options, strategy);
}

std::vector<ReplayResult> replay_strategies(int num_layers, int experts_per_layer,
                                            const std::vector<ReplayStep>& steps,
                                            const ReplayOptions& options,
                                            const std::vector<std::string>& strategies) {
  std::vector<const Strategy*> chosen;
  for (const std::string& name : strategies) chosen.push_back(&strategy_named(name));
  check_options(num_layers, experts_per_layer, steps, options);
  std::vector<ReplayResult> results;
  for (const Strategy* strategy : chosen) {
    results.push_back(run(num_layers, experts_per_layer, steps, options, *strategy));
  }
  return results;
}

}  // namespace expertflow
