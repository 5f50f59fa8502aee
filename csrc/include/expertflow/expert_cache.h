// ExpertCache: keeps the experts in use in a DeviceArena's slots.
//
//   acquire(layer, experts, stream) -> one slot address per expert, safe to read on
//       `stream`: hits return at once; the misses take victims, are copied as one batch
//       with one fence, and the stream (not the host) waits for it.
//   prefetch(layer, experts, scores) -> records the predictions and queues copies of the
//       predicted experts that are not resident.
//   release(layer, experts, stream) -> the stream has enqueued its last read of them; one
//       fence, recorded once on the stream, stands for all of them.
//
// Invariants:
//  - A slot is never overwritten while enqueued work may still read it: a victim's new
//    copy waits on the fences recorded at its releases and on its previous copy.
//  - An acquired slot is pinned until released. Acquiring more experts than there are
//    slots is an error raised before anything is evicted.
//  - A prefetch never evicts a slot that is pinned, in flight, or predicted for a sooner
//    use than the prefetched expert's.
//  - Bad input raises InvalidArgument naming the value and changes nothing.
//  - The policy sees an access (LFU counts, Belady's position, recency) only once the
//    acquire's copies were issued: a failed copy leaves it as it was.
//  - Driver calls per acquire and per release do not grow with the number of experts:
//    a stream waits once per distinct fence that is not complete yet, and fences come
//    from pools (FencePool) rather than being created per call.
//
// Locking: one mutex guards the slot table, for microseconds at a time. No CUDA call,
// allocation of device or pinned memory, or copy runs under it: decisions are made under
// the lock, copies and fence operations after it. A slot whose copy is decided but not yet
// issued is marked so; other threads wait on a condition variable until it is issued
// (microseconds), then wait on its fence. Slot addresses are read under the lock. Calls
// that work on slots between two locked steps (a demand copy, an acquire's stream waits)
// are counted, and close() waits for none to be left before it frees the arena, which it
// does after unlocking (cudaFree synchronises the device). Lock order: this mutex, then
// TransferEngine's or a FencePool's.
//
// Predictions age out after the step they were made for: acquiring layer l clears
// every prediction for layer l.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "expertflow/backend.h"
#include "expertflow/device_arena.h"
#include "expertflow/eviction_policy.h"
#include "expertflow/fence_pool.h"
#include "expertflow/host_pool.h"
#include "expertflow/transfer_engine.h"

namespace expertflow {

// Counters, per layer and in total (CacheStats). An expert's counters go to its layer.
struct LayerStats {
  std::uint64_t hits = 0;                // in the cache when acquired (copied, or copy under way)
  std::uint64_t prefetch_hits = 0;       // of those, brought in by a prefetch (= prefetch_used)
  std::uint64_t misses = 0;              // not in the cache: copied on demand
  std::uint64_t evictions = 0;           // resident experts overwritten
  std::uint64_t prefetch_issued = 0;     // prefetch copies queued
  std::uint64_t prefetch_used = 0;       // prefetched experts acquired before eviction
  std::uint64_t prefetch_late = 0;       // of those, acquired before their copy started
  std::uint64_t prefetch_wasted = 0;     // prefetched experts evicted or cancelled unused
  std::uint64_t prefetch_cancelled = 0;  // of those, removed from the queue before starting
  std::uint64_t prefetch_dropped = 0;    // predictions not prefetched: no candidate slot
  std::uint64_t prefetch_failed = 0;     // prefetch copies the backend failed
  std::uint64_t predicted = 0;           // predictions scored when their layer ran: precision =
  std::uint64_t predicted_used = 0;  // predicted_used / predicted, recall = it / (hits + misses)
  std::uint64_t bytes_demand = 0;
  std::uint64_t bytes_prefetch = 0;
  // How long the caller's work was held up by copies, per backend:
  //  - CPU: host time acquire spent blocked until its experts' copies were done; the host
  //    thread is the CPU's stream, so this is the compute's stall.
  //  - CUDA: device time the caller's stream spent waiting for copies, timed by a pair of
  //    events around the stream's waits on copies that were still running, plus the host
  //    time acquire spent waiting for other threads to issue copies (microseconds). The
  //    device times are read without blocking as they complete; stats() waits for those
  //    still pending, so its totals are complete.
  double stall_seconds = 0.0;
};

// Adds every counter of `other` to `total`.
LayerStats& operator+=(LayerStats& total, const LayerStats& other);

struct CacheStats : LayerStats {
  std::uint64_t acquires = 0;
  std::vector<LayerStats> layers;
};

class ExpertCache {
 public:
  // Throws InvalidArgument when num_slots < 1 or the policy's options do not fit the
  // layout (a static set larger than num_slots - 1, a key out of range), OutOfMemory
  // when the arena cannot be allocated.
  ExpertCache(std::shared_ptr<HostPool> pool, int num_slots, const PolicyOptions& policy,
              int prefetch_streams = 1);
  ~ExpertCache();
  ExpertCache(const ExpertCache&) = delete;
  ExpertCache& operator=(const ExpertCache&) = delete;

  // stream_device: the device the caller knows `stream` belongs to, or -1 (see
  // Backend::check_stream). Throws InvalidArgument for a stream of another device.
  std::vector<void*> acquire(int layer, const std::vector<int>& experts, StreamHandle stream,
                             int stream_device = -1);
  // scores: one confidence (>= 0) per expert, or empty for 1.0 each.
  void prefetch(int layer, const std::vector<int>& experts, const std::vector<float>& scores);
  // Records predictions as prefetch does, without copying: they rank victims (expertflow)
  // and protect resident experts from prefetches for later uses.
  void predict(int layer, const std::vector<int>& experts, const std::vector<float>& scores);
  void release(int layer, const std::vector<int>& experts, StreamHandle stream,
               int stream_device = -1);

  // Waits for the device stall times still pending (not a hot-path call).
  CacheStats stats() const;
  void reset_stats();
  // Prefetch copies queued or in flight: what the link still owes.
  int pending_prefetches() const;
  // Whether the expert holds a slot: copied, or with its copy queued or in flight.
  bool resident(int layer, int expert) const;

  // Cancels queued prefetches, waits for copies in flight and the reads released so far,
  // then frees the slots. Every later call but stats() and closed() throws StateError.
  void close();
  bool closed() const;

  // The device address of a slot; slots are slot_bytes() apart, so that a caller can view
  // the whole arena as one tensor. Throws InvalidArgument out of range, StateError closed.
  void* slot_address(int slot) const;
  int num_slots() const { return num_slots_; }
  // The most experts one acquire may ask for, when none is resident: the slots, less those
  // the policy never gives back (a static set).
  int max_acquire() const { return num_slots_ - never_evicted_; }
  std::size_t slot_bytes() const { return slot_bytes_; }
  const std::string& policy_name() const { return policy_name_; }
  const HostPool& pool() const { return *pool_; }

 private:
  // Keyed by the releasing thread too: cudaStreamPerThread is one handle for many
  // streams, and only this thread's records on a handle are known to be in stream order.
  struct ReadFence {
    StreamHandle stream;
    std::thread::id thread;
    std::shared_ptr<Fence> fence;  // shared by the slots of one release
  };
  // A stream's wait for copies, timed on the stream; read when `end` has completed.
  struct PendingStall {
    int layer;
    std::shared_ptr<Fence> start, end;
  };
  struct Slot {
    // A slot holding a key is in one of three states: stale (no copy of the key's bytes
    // is done or pending: the next acquire issues one), loading and not issued (a copy is
    // decided or queued; readers wait on issued_cv_), or issued (readers wait on
    // copy_fence). loading stays set until a prefetch copy completes.
    bool stale = false;
    bool loading = false;
    bool issued = true;
    bool prefetched = false;  // brought in by a prefetch, not yet acquired
    bool demanded = false;    // while stale: an acquire has counted its copy as a miss
    std::uint32_t pins = 0;
    std::uint64_t generation = 0;  // bumped on every new assignment
    std::uint64_t ticket = 0;      // the engine's ticket while a prefetch is queued
    // The last copy issued into the slot (null before any), shared by the copies of one
    // batch. A new copy waits on it and on the reads released since, after which those
    // reads are ordered before anything that waits on the new copy, so they are dropped.
    std::shared_ptr<Fence> copy_fence;
    std::vector<ReadFence> read_fences;  // one per stream, the latest release's
  };
  using Lock = std::unique_lock<std::mutex>;

  void check_open() const;
  std::vector<int> keys_of(int layer, const std::vector<int>& experts) const;
  std::vector<int> checked_acquire_keys(int layer, const std::vector<int>& experts) const;
  std::vector<int> prediction_keys(int layer, const std::vector<int>& experts,
                                   const std::vector<float>& scores) const;
  void record_predictions(const std::vector<int>& keys, const std::vector<float>& scores);
  VictimQuery victim_query() const;
  int take_victim(const VictimQuery& query) const;
  std::vector<int> pin_slots(int layer, const std::vector<int>& experts,
                             const std::vector<int>& keys, std::vector<bool>& was_resident);
  std::vector<bool> count_lookups(int layer, const std::vector<int>& keys,
                                  const std::vector<int>& slots,
                                  const std::vector<bool>& was_resident);
  void commit_access(const std::vector<int>& keys, const std::vector<int>& slots,
                     const std::vector<bool>& missed);
  void assign(int slot, int key);
  void refresh_evictable(int slot);
  void make_stale(int slot);
  bool cancel_queued_prefetch(int slot);
  CopyRequest copy_request(int slot) const;
  bool issue_copies(Lock& lock, const std::vector<int>& slots);
  void issue_demand(Lock& lock, const std::vector<int>& stale);
  std::vector<void*> wait_on_stream(Lock& lock, int layer, const std::vector<int>& slots,
                                    StreamHandle stream);
  void wait_for_room(Lock& lock, int layer, const std::vector<int>& keys);
  void retire_predictions(int layer, const std::vector<int>& keys);
  void unpin(const std::vector<int>& slots);
  void end_call_outside_lock();
  void collect_stalls(bool wait) const;
  void on_prefetch_issued(int slot, std::uint64_t generation, std::shared_ptr<Fence> done,
                          const std::string& error);
  void on_prefetch_complete(int slot, std::uint64_t generation, const std::string& error);
  // Adds n to a counter of `layer` and to the total.
  template <typename T>
  void count(int layer, T LayerStats::* counter, T n = 1) {
    stats_.*counter += n;
    stats_.layers[layer].*counter += n;
  }

  std::shared_ptr<HostPool> pool_;
  std::shared_ptr<Backend> backend_;
  const ExpertLayout& layout_;
  std::unique_ptr<DeviceArena> arena_;  // freed by close()
  int num_slots_;
  std::size_t slot_bytes_;
  FencePool copy_fences_;  // demand batches, prefetches and releases
  FencePool timers_;       // stall timing on the caller's stream
  TransferEngine engine_;
  std::unique_ptr<EvictionPolicy> policy_;
  std::string policy_name_;

  mutable std::mutex mutex_;
  std::condition_variable issued_cv_;  // a slot's copy was issued or failed; a call ended
  std::condition_variable slot_cv_;    // a slot became evictable
  std::vector<Slot> slots_;
  std::vector<SlotView> views_;    // what the policy sees, kept in step with slots_
  std::vector<int> slot_of_;       // per key: its slot, or -1
  std::vector<float> confidence_;  // per key: prediction, or -1
  int never_evicted_ = 0;          // keys the policy never evicts (a static set)
  int current_layer_ = -1;
  std::uint64_t tick_ = 0;
  bool closed_ = false;
  int calls_outside_lock_ = 0;  // demand copies and stream waits between locked steps
  CacheStats stats_;
  // Device stall times not read yet, and per layer those read; stats() adds them in, so
  // both change in const calls.
  mutable std::vector<PendingStall> pending_stalls_;
  mutable std::vector<double> stream_stall_seconds_;
};

}  // namespace expertflow
