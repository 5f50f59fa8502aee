#include "expertflow/replay.h"

#include <memory>
#include <thread>

#include "expertflow/error.h"
#include "expertflow/transition_predictor.h"

namespace expertflow {

namespace {

// The caches of one request (or of the whole trace): one, or one per layer.
class Caches {
 public:
  Caches(int num_layers, int experts, const ReplayOptions& options,
         std::vector<ReplayStep>::const_iterator begin, std::vector<ReplayStep>::const_iterator end)
      : per_layer_(options.per_layer) {
    auto backend = make_backend(DeviceKind::kCpu);
    int caches = per_layer_ ? num_layers : 1;
    auto pool =
        std::make_shared<HostPool>(backend, ExpertLayout(per_layer_ ? 1 : num_layers, experts, 1));
    for (int c = 0; c < caches; ++c) {
      PolicyOptions policy = options.policy;
      if (per_layer_) {  // a layer's cache knows its own experts only
        policy.static_keys.clear();
        for (int k : options.policy.static_keys) {
          if (k / experts == c) policy.static_keys.push_back(k % experts);
        }
      }
      if (policy.name == "belady") {
        policy.future.clear();
        for (auto step = begin; step != end; ++step) {
          if (per_layer_ && step->layer != c) continue;
          std::vector<int> keys;
          for (int e : step->experts) keys.push_back(key(step->layer, e, experts));
          policy.future.push_back(std::move(keys));
        }
      }
      caches_.push_back(std::make_unique<ExpertCache>(pool, options.capacity, policy));
    }
  }

  ExpertCache& of(int layer) { return *caches_[per_layer_ ? layer : 0]; }
  int layer_in(int layer) const { return per_layer_ ? 0 : layer; }

  void add_stats(LayerStats& total) {
    for (auto& cache : caches_) total += cache->stats();
  }

 private:
  int key(int layer, int expert, int experts) const {
    return per_layer_ ? expert : layer * experts + expert;
  }

  bool per_layer_;
  std::vector<std::unique_ptr<ExpertCache>> caches_;
};

}  // namespace

ReplayResult replay(int num_layers, int experts_per_layer, const std::vector<ReplayStep>& steps,
                    const ReplayOptions& options) {
  EF_CHECK(options.capacity > 0, "replay capacity must be positive, got ", options.capacity);
  EF_CHECK(options.link_gbps > 0.0, "link bandwidth must be positive, got ", options.link_gbps);
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const ReplayStep& step = steps[i];
    EF_CHECK(step.layer >= 0 && step.layer < num_layers, "step ", i, ": layer ", step.layer,
             " out of range [0, ", num_layers, ")");
    for (int e : step.experts) {
      EF_CHECK(e >= 0 && e < experts_per_layer, "step ", i, ": expert id ", e, " out of range [0, ",
               experts_per_layer, ")");
    }
  }

  ReplayResult result;
  TransitionPredictor history(num_layers, experts_per_layer);
  const double copy_seconds = static_cast<double>(options.expert_bytes) / (options.link_gbps * 1e9);
  auto begin = steps.begin();
  while (begin != steps.end()) {
    auto end = begin;
    if (options.reset_per_request) {
      while (end != steps.end() && end->request == begin->request) ++end;
      history.new_request();
    } else {
      end = steps.end();
    }
    Caches caches(num_layers, experts_per_layer, options, begin, end);
    for (auto step = begin; step != end; ++step) {
      ExpertCache& cache = caches.of(step->layer);
      int layer = caches.layer_in(step->layer);
      bool counted = step->token >= options.warmup_tokens;
      if (counted) {
        std::uint64_t hits = 0;
        for (int e : step->experts) hits += cache.resident(layer, e);
        std::uint64_t misses = step->experts.size() - hits;
        ++result.steps;
        result.accesses += step->experts.size();
        result.hits += hits;
        result.misses += misses;
        result.modelled_seconds += options.layer_compute_us * 1e-6 + misses * copy_seconds;
        result.link_floor_seconds += misses * copy_seconds;
      }
      cache.acquire(layer, step->experts, 0);
      cache.release(layer, step->experts, 0);
      if (options.history) {
        history.observe(step->layer, step->experts);
        int next = step->layer + 1;
        if (next < num_layers) {
          int top = options.prefetch_top > 0 ? options.prefetch_top
                                             : static_cast<int>(step->experts.size());
          std::vector<int> experts;
          std::vector<float> scores;
          for (auto [e, score] : history.predict(next, top)) {
            experts.push_back(e);
            scores.push_back(score);
          }
          ExpertCache& target = caches.of(next);
          target.prefetch(caches.layer_in(next), experts, scores);
          // Replay is deterministic: each prefetch lands before the next step.
          while (target.pending_prefetches() > 0) std::this_thread::yield();
        }
      }
    }
    caches.add_stats(result.cache);
    begin = end;
  }
  result.bytes_demand = static_cast<double>(result.misses) * options.expert_bytes;
  return result;
}

}  // namespace expertflow
