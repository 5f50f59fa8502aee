// Trace replay: a recorded routing run through the same ExpertCache, policies and
// predictor as live runs, on the CPU backend with one-byte experts, so that policies are
// compared on real routing at millions of expert accesses per second.
//
// Each step is one token at one MoE layer; its experts are acquired together (so they are
// never victims of each other) and released. A step counts once its token index reaches
// warmup_tokens. Modelled time adds, per counted step, the layer's compute time and the
// demand copies it waited for over the link; the link floor is the demand copies alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

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
  PolicyOptions policy;    // static_keys as layer * experts + expert; belady's future is
                           // filled in from the steps
  int capacity = 0;        // slots, per layer (per_layer) or in all
  bool per_layer = false;  // one cache per layer instead of one for all layers
  bool reset_per_request = true;
  int warmup_tokens = 0;
  bool history = false;          // prefetch the TransitionPredictor's choice for the next layer
  int prefetch_top = 0;          // how many experts it prefetches (0: as many as the step used)
  std::size_t expert_bytes = 1;  // for bytes moved and modelled time
  double link_gbps = 16.0;
  double layer_compute_us = 0.0;
};

struct ReplayResult {
  std::uint64_t steps = 0;     // counted
  std::uint64_t accesses = 0;  // counted expert accesses
  std::uint64_t hits = 0;      // resident when acquired (prefetched ones included)
  std::uint64_t misses = 0;
  LayerStats cache;           // the caches' own counters, summed, warm-up included
  double bytes_demand = 0.0;  // counted misses x expert_bytes
  double modelled_seconds = 0.0;
  double link_floor_seconds = 0.0;
};

// Throws InvalidArgument naming the step for a layer or expert out of range, or a bad option.
ReplayResult replay(int num_layers, int experts_per_layer, const std::vector<ReplayStep>& steps,
                    const ReplayOptions& options);

}  // namespace expertflow
