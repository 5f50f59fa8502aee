// Timeline: one token's pass, layer by layer, over three resources that work at once.
//
//   device  a layer's dense work, then its device experts, one at a time, each once its
//           weights are in a slot (in the order they become available).
//   link    host -> device copies, one at a time. Demand copies go before queued
//           prefetches; a prefetch moves in chunks (TransferEngine::kPrefetchChunkBytes),
//           two of them in flight as live, so a demand copy waits for at most the chunk
//           moving and the one queued behind it. A copy into
//           a slot starts no earlier than the end of that slot's reads in earlier
//           layers (the link takes any `ready` time; the pass knows each slot's). Every
//           byte queued is moved (finish() drains the queue) unless cancelled before it
//           starts.
//   CPU     experts computed from their host blobs, one at a time.
// A layer starts when the previous one has ended, and ends when its device work and its
// CPU experts are done. Costs come from cost_model.h; this file only orders the work.
//
// Times are seconds on one clock from 0. Calls must come in time order (each layer's
// calls after the previous layer's), which lets the link run its prefetch queue lazily.
#pragma once

#include <cstddef>
#include <deque>
#include <vector>

#include "expertflow/cost_model.h"

namespace expertflow {

class LinkTimeline {
 public:
  LinkTimeline(double bytes_per_s, double chunk_bytes);

  // When a demand copy issued at `issue` into a slot free at `ready` would start.
  double demand_start(double issue, double ready);
  // Queues a demand copy; returns when it has arrived.
  double demand(double issue, double ready, double bytes);
  // Queues a prefetch behind the others; returns its id.
  int prefetch(double issue, double bytes);
  // When prefetch `id` has arrived, for a reader that needs it at `now`: what is left of
  // it then is promoted to a demand copy.
  double arrival(int id, double now);
  // Nothing queued and nothing moving at `now`.
  bool idle(double now);
  // No prefetch waiting at `now` (a demand copy may be moving): a new prefetch would
  // only use time the link has no other work for.
  bool queue_empty(double now);
  // When the link would be done with what it owes at `now`, moving nothing new.
  double backlog_end(double now);
  // Moves everything queued; returns when the link is done.
  double drain();
  // Drops the prefetches not started by `now` (as closing a cache cancels them; one that
  // has started finishes). Returns the bytes dropped.
  double cancel_queued(double now);

  double busy_seconds() const { return bytes_ / rate_; }
  double bytes() const { return bytes_; }

 private:
  struct Prefetch {
    double issue;
    double bytes;
    double remaining;
    double done = -1.0;
    double last_chunk_start = 0.0;
  };
  // Runs the queued prefetch chunks that start before `t`.
  void advance(double t);
  double occupy(double start, double bytes);

  double rate_;
  double chunk_;
  double free_ = 0.0;  // when the link finishes the copies it has started
  double bytes_ = 0.0;
  std::vector<Prefetch> prefetches_;
  std::deque<int> queue_;
};

class PassTimeline {
 public:
  PassTimeline(const HardwareRates& rates, const ModelCosts& model, double chunk_bytes);

  // Starts the next layer once the previous one has ended; runs its dense work on the
  // device and returns when its routing is known (the time its copies are issued).
  double begin_layer();
  // An expert of the running layer whose weights are in `slot` from `available` on.
  void on_device(double available, int slot, int tokens = 1);
  // A demand copy into `slot` (after the slot's earlier reads), then device compute.
  // Returns when the copy arrives.
  double copy(int slot, int tokens = 1);
  // An expert computed on the CPU; returns when its output is back.
  double on_cpu(int tokens = 1);
  // The sooner of a copy and the CPU for a missed expert, given what the link, the device
  // and the CPU already owe this layer (a victim slot's reads are over by begin_layer()).
  PlacementChoice place_miss(int tokens = 1);
  // The finish time of an expert of this layer on the device available at `available`,
  // and on the CPU, if it were added now.
  double device_finish_if(double available, int tokens = 1);
  double cpu_finish_if(int tokens = 1) const;
  // When the layer would end with the work given so far.
  double expected_end();
  // Runs the layer's device experts; returns when the layer ends.
  double end_layer();
  // Drains the link; returns when every resource is done.
  double finish();

  LinkTimeline& link() { return link_; }
  double routed() const { return routed_; }
  double layer_end() const { return layer_end_; }
  double device_busy() const { return device_busy_; }
  double cpu_busy() const { return cpu_busy_; }
  const HardwareRates& rates() const { return rates_; }
  const ModelCosts& model() const { return model_; }

 private:
  struct DeviceTask {
    double available;
    int slot;
    double seconds;
  };
  double slot_free(int slot) const;
  // When the device would finish `tasks` run in the order they become available.
  double run_device(std::vector<DeviceTask>& tasks, bool commit);

  HardwareRates rates_;
  ModelCosts model_;
  LinkTimeline link_;
  double routed_ = 0.0;
  double layer_end_ = 0.0;
  double cpu_free_ = 0.0;
  double device_busy_ = 0.0;
  double cpu_busy_ = 0.0;
  std::vector<DeviceTask> tasks_;   // this layer's device experts
  std::vector<double> slot_reads_;  // per slot: when its last read ends
};

}  // namespace expertflow
