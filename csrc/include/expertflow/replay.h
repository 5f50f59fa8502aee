// Trace replay: a recorded routing run through the same ExpertCache, policies and
// predictor as live runs, on the CPU backend with one-byte experts, so that policies are
// compared on real routing at millions of expert accesses per second.
//
// Each step is one token at one MoE layer. Its device experts are acquired together (so
// they are never victims of each other), the next layer's prefetches are issued while they
// are pinned (as live), and they are released. A step counts once its token index reaches
// warmup_tokens.
//
// Time comes from a PassTimeline (timeline.h) fed with the cost model's numbers: every
// step is one layer of one token's pass, after the previous step; every byte a strategy
// moves, demand or prefetch, takes link time, and a request's time includes draining its
// link queue. Strategies (strategy_names()):
//   none        no cache: every expert copied every time it runs (accelerate's offload)
//   lru lfu static belady
//               a cache of that policy; misses copied on demand
//   expertflow  the expertflow policy, and the history predictor's next-layer experts
//               prefetched
//   cpu         every expert computed on the CPU (llama.cpp --cpu-moe)
//   static_cpu  the calibrated hot set on the device (loaded on first use), the rest on
//               the CPU (llama.cpp --n-cpu-moe, kTransformers)
//   lru_spec    lru plus a speculative guess of the next layer's experts, prefetched
//               (mixtral-offloading). Traces hold no hidden states, so the guess is an
//               oracle with recall `speculative_recall`: each true expert is guessed with
//               that probability, the rest of the guess is wrong experts.
//   hybrid      ExpertFlow: the expertflow cache; each expert goes to whichever of the
//               device (resident), a copy, or the CPU finishes soonest given what each
//               already owes (cost_model.h's place_miss). The next layer's guess (the same
//               modelled gate lookahead as lru_spec's) is prefetched when no prefetch is
//               waiting or when it pays (p h >= (1 - p)(1 - h), the design's rule); misses
//               the CPU served are copied in only while no prefetch is waiting. Given a
//               calibration, its hot experts are predicted for the next layer (below a
//               guess, above the unpredicted) and only they are copied in after a CPU
//               miss.
// lru_spec and hybrid need steps whose next layer follows in the same token to guess.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "expertflow/cost_model.h"
#include "expertflow/eviction_policy.h"
#include "expertflow/expert_cache.h"

namespace expertflow {

struct ReplayStep {
  int request = 0;  // steps of one request are contiguous
  int token = 0;    // index within the request
  int layer = 0;
  std::vector<int> experts;
};

struct ReplayOptions {
  // static_keys: calibration keys (layer * experts + expert), most used first. static
  // keeps the first slots - top_k of them (per layer with per_layer), static_cpu the
  // first slots. belady's future is filled in from the steps.
  PolicyOptions policy;
  int capacity = 0;        // slots, per layer (per_layer) or in all
  bool per_layer = false;  // one cache per layer instead of one for all layers
  bool reset_per_request = true;
  int warmup_tokens = 0;
  bool history = false;  // replay(): prefetch the TransitionPredictor's next-layer choice
  int prefetch_top = 0;  // how many experts it prefetches (0: as many as the step used)
  HardwareRates rates;
  ModelCosts model;
  double speculative_recall = 0.85;  // lru_spec's oracle
  std::uint64_t seed = 0;            // lru_spec's guesses
};

struct ReplayResult {
  std::string strategy;
  std::uint64_t steps = 0;     // counted
  std::uint64_t tokens = 0;    // counted
  std::uint64_t accesses = 0;  // counted expert accesses
  std::uint64_t hits = 0;      // on the device when their layer ran (prefetched ones included)
  std::uint64_t misses = 0;    // copied or computed on the CPU
  std::uint64_t cpu_experts = 0;
  LayerStats cache;  // the caches' own counters, summed, warm-up included
  // Over the counted steps:
  double bytes_demand = 0.0;
  double bytes_prefetch = 0.0;
  double modelled_seconds = 0.0;
  double device_busy_seconds = 0.0;
  double link_busy_seconds = 0.0;
  double cpu_busy_seconds = 0.0;
  // The busiest resource's work under this strategy's assignment: no timeline of this
  // assignment can take less.
  double bound_seconds = 0.0;
  // Any strategy's floor: dense work, and every counted access computed on the device or
  // the CPU, split to balance the two (a relaxation: no link, no waiting).
  double compute_floor_seconds = 0.0;
};

std::vector<std::string> strategy_names();

// One cache policy with copies on demand (and history prefetches with options.history).
// Throws InvalidArgument naming the step for a layer or expert out of range, or a bad
// option.
ReplayResult replay(int num_layers, int experts_per_layer, const std::vector<ReplayStep>& steps,
                    const ReplayOptions& options);

// Each named strategy over the same steps and options. Throws InvalidArgument naming an
// unknown strategy before replaying anything.
std::vector<ReplayResult> replay_strategies(int num_layers, int experts_per_layer,
                                            const std::vector<ReplayStep>& steps,
                                            const ReplayOptions& options,
                                            const std::vector<std::string>& strategies);

}  // namespace expertflow
