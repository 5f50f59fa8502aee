#include "expertflow/expert_cache.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <optional>
#include <sstream>
#include <thread>

#include "expertflow/error.h"

namespace expertflow {

namespace {

// How long an acquire waits for other threads to release slots before it gives up: a
// thread that acquires again without releasing would otherwise wait forever.
constexpr auto kSlotWait = std::chrono::seconds(30);

std::shared_ptr<HostPool> require(std::shared_ptr<HostPool> pool) {
  EF_CHECK(pool != nullptr, "ExpertCache needs a HostPool, got null");
  return pool;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

// A new counter must be added below too.
static_assert(sizeof(LayerStats) == 16 * sizeof(std::uint64_t), "update operator+=");

LayerStats& operator+=(LayerStats& total, const LayerStats& other) {
  total.hits += other.hits;
  total.prefetch_hits += other.prefetch_hits;
  total.misses += other.misses;
  total.evictions += other.evictions;
  total.prefetch_issued += other.prefetch_issued;
  total.prefetch_used += other.prefetch_used;
  total.prefetch_late += other.prefetch_late;
  total.prefetch_wasted += other.prefetch_wasted;
  total.prefetch_cancelled += other.prefetch_cancelled;
  total.prefetch_dropped += other.prefetch_dropped;
  total.prefetch_failed += other.prefetch_failed;
  total.predicted += other.predicted;
  total.predicted_used += other.predicted_used;
  total.bytes_demand += other.bytes_demand;
  total.bytes_prefetch += other.bytes_prefetch;
  total.stall_seconds += other.stall_seconds;
  return total;
}

ExpertCache::ExpertCache(std::shared_ptr<HostPool> pool, int num_slots, const PolicyOptions& policy,
                         int prefetch_streams)
    : pool_(require(std::move(pool))),
      backend_(pool_->backend_ptr()),
      layout_(pool_->layout()),
      arena_(std::make_unique<DeviceArena>(backend_, layout_.max_bytes(), num_slots)),
      num_slots_(num_slots),
      slot_bytes_(arena_->slot_bytes()),
      copy_fences_(backend_, FencePool::Kind::kFence),
      timers_(backend_, FencePool::Kind::kTimer),
      engine_(backend_, prefetch_streams),
      policy_(make_policy(policy)),
      policy_name_(policy_->name()) {
  EF_CHECK(policy.name != "static" || static_cast<int>(policy.static_keys.size()) < num_slots,
           "a static set of ", policy.static_keys.size(), " experts needs at least ",
           policy.static_keys.size() + 1, " slots (one streams the others); the cache has ",
           num_slots);
  policy_->bind(layout_.num_keys());
  slots_.resize(num_slots);
  views_.resize(num_slots);
  for (int slot = 0; slot < num_slots; ++slot) refresh_evictable(slot);
  for (int key = 0; key < layout_.num_keys(); ++key) never_evicted_ += !policy_->may_evict(key);
  slot_of_.assign(layout_.num_keys(), -1);
  confidence_.assign(layout_.num_keys(), -1.0f);
  stats_.layers.resize(layout_.num_layers());
  stream_stall_seconds_.assign(layout_.num_layers(), 0.0);
}

ExpertCache::~ExpertCache() {
  try {
    close();
  } catch (const std::exception& e) {
    warn(std::string("ExpertCache close failed: ") + e.what());
  }
}

void ExpertCache::check_open() const {
  if (closed_) EF_THROW(StateError, "ExpertCache is closed");
}

std::vector<int> ExpertCache::keys_of(int layer, const std::vector<int>& experts) const {
  EF_CHECK(layer >= 0 && layer < layout_.num_layers(), "layer ", layer, " out of range [0, ",
           layout_.num_layers(), ")");
  std::vector<int> keys;
  keys.reserve(experts.size());
  for (int expert : experts) keys.push_back(layout_.key(layer, expert));
  std::vector<int> sorted = keys;
  std::sort(sorted.begin(), sorted.end());
  auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  EF_CHECK(dup == sorted.end(), "expert id ", layout_.expert_of(*dup), " appears twice at layer ",
           layer);
  return keys;
}

VictimQuery ExpertCache::victim_query() const {
  return VictimQuery{views_, confidence_, current_layer_, layout_.num_layers()};
}

int ExpertCache::take_victim(const VictimQuery& query) const {
  for (int slot = 0; slot < num_slots_; ++slot) {
    if (views_[slot].key < 0 && views_[slot].evictable) return slot;
  }
  int slot = policy_->choose_victim(query);
  if (slot >= 0 && !query.candidate(slot)) {
    EF_THROW(BackendError, "policy ", policy_name_, " chose slot ", slot,
             ", which may not be evicted");
  }
  return slot;
}

void ExpertCache::refresh_evictable(int slot) {
  const Slot& s = slots_[slot];
  int key = views_[slot].key;
  views_[slot].evictable = s.pins == 0 && !s.loading && (key < 0 || policy_->may_evict(key));
}

// Gives the slot to `key`, evicting what it held. The slot becomes stale: the next
// acquire (or the prefetch that chose it) issues the copy.
void ExpertCache::assign(int slot, int key) {
  SlotView& view = views_[slot];
  Slot& s = slots_[slot];
  if (view.key >= 0) {
    slot_of_[view.key] = -1;
    count(view.layer, &LayerStats::evictions);
    if (s.prefetched) count(view.layer, &LayerStats::prefetch_wasted);
  }
  view.key = key;
  view.layer = layout_.layer_of(key);
  slot_of_[key] = slot;
  ++s.generation;
  s.prefetched = false;
  make_stale(slot);
}

// The slot keeps its key but holds no copy of it and none is pending: the next acquire
// copies it on demand.
void ExpertCache::make_stale(int slot) {
  Slot& s = slots_[slot];
  s.stale = true;
  s.loading = false;
  s.issued = true;
  s.demanded = false;
  s.ticket = 0;
  refresh_evictable(slot);
}

// Removes the slot's prefetch if it is still queued: true if it was, and the slot then
// keeps its key but is stale.
bool ExpertCache::cancel_queued_prefetch(int slot) {
  Slot& s = slots_[slot];
  if (!s.loading || s.issued || s.ticket == 0 || !engine_.cancel(s.ticket)) return false;
  make_stale(slot);
  return true;
}

CopyRequest ExpertCache::copy_request(int slot) const {
  const Slot& s = slots_[slot];
  int key = views_[slot].key;
  CopyRequest request;
  request.dst = arena_->slot(slot);
  request.src = pool_->blob(key);
  request.bytes = layout_.bytes(key);
  request.after.push_back(s.copy_fence);
  for (const ReadFence& read : s.read_fences) request.after.push_back(read.fence);
  return request;
}

// Returns, with the lock held, once the copy into every one of `slots` (pinned by the
// caller) is issued: issues the stale ones itself, as one batch, and waits for those that
// other threads or the prefetch workers are issuing. Returns whether it had to do either.
bool ExpertCache::issue_copies(Lock& lock, const std::vector<int>& slots) {
  bool waited = false;
  for (;;) {
    check_open();
    std::vector<int> stale;
    bool pending = false;
    for (int slot : slots) {
      if (slots_[slot].stale) {
        stale.push_back(slot);
      } else {
        pending |= !slots_[slot].issued;
      }
    }
    if (stale.empty() && !pending) return waited;
    waited = true;
    if (stale.empty()) {
      issued_cv_.wait(lock);
    } else {
      issue_demand(lock, stale);
    }
  }
}

// Copies the stale slots on the demand stream, unlocked, with one fence after the last.
void ExpertCache::issue_demand(Lock& lock, const std::vector<int>& stale) {
  std::vector<CopyRequest> copies;
  for (int slot : stale) {
    Slot& s = slots_[slot];
    s.stale = false;
    s.loading = true;
    s.issued = false;
    copies.push_back(copy_request(slot));
    count(views_[slot].layer, &LayerStats::bytes_demand, std::uint64_t{copies.back().bytes});
  }
  ++calls_outside_lock_;
  lock.unlock();
  std::shared_ptr<Fence> done;
  std::string error;
  try {
    done = copy_fences_.get();
    engine_.demand(copies, *done);
  } catch (const std::exception& e) {
    error = e.what();
  }
  lock.lock();
  end_call_outside_lock();
  std::ostringstream experts;
  for (int slot : stale) {
    Slot& s = slots_[slot];
    s.loading = false;
    s.issued = true;
    s.stale = !error.empty();
    s.demanded = false;
    if (error.empty()) {
      s.copy_fence = done;
      s.read_fences.clear();  // the copy waited on them: ordered before its readers
    }
    experts << (experts.tellp() > 0 ? ", " : "") << layout_.expert_of(views_[slot].key);
  }
  issued_cv_.notify_all();
  if (!error.empty()) {
    EF_THROW(BackendError, "copy of experts [", experts.str(), "] at layer ",
             views_[stale.front()].layer, " failed: ", error);
  }
}

// Evict all or nothing: waits until enough slots can take the misses among `keys`, with
// nothing pinned meanwhile.
void ExpertCache::wait_for_room(Lock& lock, int layer, const std::vector<int>& keys) {
  auto deadline = std::chrono::steady_clock::now() + kSlotWait;
  for (;;) {
    int missing = 0;
    for (int key : keys) missing += slot_of_[key] < 0;
    int candidates = 0;
    for (int slot = 0; slot < num_slots_ && candidates < missing; ++slot) {
      const SlotView& view = views_[slot];
      bool requested = view.key >= 0 && std::find(keys.begin(), keys.end(), view.key) != keys.end();
      candidates += view.evictable && !requested;
    }
    if (candidates >= missing) return;
    if (slot_cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
      EF_THROW(StateError, "no slot became free for ", missing, " experts at layer ", layer,
               " within ", kSlotWait.count(), " s: all ", num_slots_,
               " slots are pinned or loading; release experts before acquiring more");
    }
    check_open();
  }
}

// The predictions for `layer` were for the step that just acquired `keys`: scores them,
// drops them, and cancels the prefetches for that layer that have not started.
void ExpertCache::retire_predictions(int layer, const std::vector<int>& keys) {
  for (int key = layer * layout_.experts_per_layer(), end = key + layout_.experts_per_layer();
       key < end; ++key) {
    if (confidence_[key] >= 0.0f) {
      bool used = std::find(keys.begin(), keys.end(), key) != keys.end();
      count(layer, &LayerStats::predicted);
      count(layer, &LayerStats::predicted_used, std::uint64_t{used});
      confidence_[key] = -1.0f;
    }
    int slot = slot_of_[key];
    if (slot < 0 || slots_[slot].pins > 0) continue;
    if (cancel_queued_prefetch(slot)) {  // give the slot back
      count(layer, &LayerStats::prefetch_cancelled);
      count(layer, &LayerStats::prefetch_wasted);
      slot_of_[key] = -1;
      views_[slot].key = views_[slot].layer = -1;
      slots_[slot].stale = slots_[slot].prefetched = false;
    }
  }
}

std::vector<int> ExpertCache::checked_acquire_keys(int layer,
                                                   const std::vector<int>& experts) const {
  std::vector<int> keys = keys_of(layer, experts);
  const int n = static_cast<int>(keys.size());
  EF_CHECK(n <= num_slots_, "acquiring ", n, " experts at layer ", layer, " needs ", n,
           " slots; the cache has ", num_slots_);
  int evictable_keys = 0;
  for (int key : keys) evictable_keys += policy_->may_evict(key);
  EF_CHECK(evictable_keys <= num_slots_ - never_evicted_, "policy ", policy_name_, " keeps ",
           never_evicted_, " experts resident, leaving ", num_slots_ - never_evicted_,
           " slots for the others; acquiring ", evictable_keys, " of those at layer ", layer,
           " needs ", evictable_keys);
  return keys;
}

// Pins the resident experts' slots and gives victims to the others; changes nothing if the
// policy refuses a victim or the access.
std::vector<int> ExpertCache::pin_slots(int layer, const std::vector<int>& experts,
                                        const std::vector<int>& keys,
                                        std::vector<bool>& was_resident) {
  const int n = static_cast<int>(keys.size());
  std::vector<int> slots(n, -1);
  was_resident.assign(n, false);
  for (int i = 0; i < n; ++i) {
    slots[i] = slot_of_[keys[i]];
    was_resident[i] = slots[i] >= 0;
    if (was_resident[i]) {
      ++slots_[slots[i]].pins;
      refresh_evictable(slots[i]);
    }
  }
  std::vector<int> victims;
  try {
    VictimQuery query = victim_query();
    for (int i = 0; i < n; ++i) {
      if (was_resident[i]) continue;
      int victim = take_victim(query);
      if (victim < 0) {
        EF_THROW(InvalidArgument, "policy ", policy_name_, " has no slot for expert ", experts[i],
                 " at layer ", layer, " (", num_slots_, " slots)");
      }
      slots[i] = victim;
      victims.push_back(victim);
      views_[victim].evictable = false;
    }
    policy_->check_access(keys);
  } catch (...) {
    for (int victim : victims) refresh_evictable(victim);
    for (int i = 0; i < n; ++i) {
      if (!was_resident[i]) continue;
      --slots_[slots[i]].pins;
      refresh_evictable(slots[i]);
    }
    throw;
  }
  for (int i = 0; i < n; ++i) {
    if (was_resident[i]) continue;
    assign(slots[i], keys[i]);
    ++slots_[slots[i]].pins;
    refresh_evictable(slots[i]);
  }
  return slots;
}

// Counts each expert as a hit or a miss; returns which were misses.
std::vector<bool> ExpertCache::count_lookups(int layer, const std::vector<int>& keys,
                                             const std::vector<int>& slots,
                                             const std::vector<bool>& was_resident) {
  std::vector<bool> missed(keys.size(), false);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    Slot& s = slots_[slots[i]];
    if (was_resident[i] && s.prefetched && cancel_queued_prefetch(slots[i])) {
      // A late prefetch: predicted and given a slot, but not started. It is a hit (the
      // prediction was right) whose copy moves to the demand queue, which is faster.
      s.demanded = true;
      count(layer, &LayerStats::prefetch_late);
    }
    // A miss is an expert the cache had not taken in: counted once per copy on demand, by
    // the acquire that finds no copy done, under way or decided. Acquires that find one
    // hit, and wait for it.
    if (s.stale && !s.demanded) {
      s.demanded = true;
      missed[i] = true;
      count(layer, &LayerStats::misses);
    } else {
      count(layer, &LayerStats::hits);
      if (s.prefetched) {
        count(layer, &LayerStats::prefetch_hits);
        count(layer, &LayerStats::prefetch_used);
      }
    }
    s.prefetched = false;
  }
  return missed;
}

// The access becomes policy state once its copies were issued.
void ExpertCache::commit_access(const std::vector<int>& keys, const std::vector<int>& slots,
                                const std::vector<bool>& missed) {
  const std::size_t n = keys.size();
  policy_->on_access(keys, tick_ + n);
  // One tick per expert: the hits in the order asked, then the misses, which arrive last.
  for (bool misses : {false, true}) {
    for (std::size_t i = 0; i < n; ++i) {
      if (missed[i] == misses) views_[slots[i]].last_use = ++tick_;
    }
  }
}

// Makes `stream` wait once for each distinct copy fence of `slots` still running, timing
// the wait on the stream; returns the slots' addresses. Unlocks meanwhile.
std::vector<void*> ExpertCache::wait_on_stream(Lock& lock, int layer, const std::vector<int>& slots,
                                               StreamHandle stream) {
  // Read under the lock: close() frees the arena once no call is counted outside it.
  std::vector<void*> addresses;
  std::vector<std::shared_ptr<Fence>> fences;
  for (int slot : slots) {
    addresses.push_back(arena_->slot(slot));
    const std::shared_ptr<Fence>& fence = slots_[slot].copy_fence;
    if (fence != nullptr && std::find(fences.begin(), fences.end(), fence) == fences.end())
      fences.push_back(fence);
  }
  ++calls_outside_lock_;
  lock.unlock();
  std::optional<PendingStall> stall;
  try {
    for (const std::shared_ptr<Fence>& fence : fences) {
      if (backend_->query(*fence)) continue;
      if (!stall) {
        stall = PendingStall{layer, timers_.get(), timers_.get()};
        backend_->record(*stall->start, stream);
      }
      backend_->wait(stream, *fence);
    }
    if (stall) backend_->record(*stall->end, stream);
  } catch (...) {
    lock.lock();
    end_call_outside_lock();
    unpin(slots);
    throw;
  }
  lock.lock();
  end_call_outside_lock();
  if (stall) pending_stalls_.push_back(std::move(*stall));
  return addresses;
}

void ExpertCache::end_call_outside_lock() {
  if (--calls_outside_lock_ == 0) issued_cv_.notify_all();
}

std::vector<void*> ExpertCache::acquire(int layer, const std::vector<int>& experts,
                                        StreamHandle stream, int stream_device) {
  backend_->check_stream(stream, stream_device);
  std::vector<int> keys = checked_acquire_keys(layer, experts);
  collect_stalls(/*wait=*/false);

  Lock lock(mutex_);
  check_open();
  wait_for_room(lock, layer, keys);
  std::vector<bool> was_resident;
  std::vector<int> slots = pin_slots(layer, experts, keys, was_resident);
  ++stats_.acquires;
  std::vector<bool> missed = count_lookups(layer, keys, slots, was_resident);
  current_layer_ = layer;
  retire_predictions(layer, keys);

  auto start = std::chrono::steady_clock::now();
  bool waited = false;
  try {
    waited = issue_copies(lock, slots);
  } catch (...) {
    unpin(slots);
    throw;
  }
  if (waited) count(layer, &LayerStats::stall_seconds, seconds_since(start));
  commit_access(keys, slots, missed);
  return wait_on_stream(lock, layer, slots, stream);
}

void ExpertCache::unpin(const std::vector<int>& slots) {
  for (int slot : slots) {
    Slot& s = slots_[slot];
    if (s.pins == 0) continue;
    if (--s.pins == 0 && !policy_->retains(views_[slot].key)) {
      slot_of_[views_[slot].key] = -1;
      views_[slot].key = views_[slot].layer = -1;
      s.stale = s.prefetched = false;
    }
    refresh_evictable(slot);
  }
  slot_cv_.notify_all();
}

void ExpertCache::release(int layer, const std::vector<int>& experts, StreamHandle stream,
                          int stream_device) {
  backend_->check_stream(stream, stream_device);
  std::vector<int> keys = keys_of(layer, experts);
  collect_stalls(/*wait=*/false);
  // One fence for every slot of this release, recorded before they are unpinned: a
  // victim's copy must find it. Recording it on a bad release is harmless.
  std::shared_ptr<Fence> fence = copy_fences_.get();
  backend_->record(*fence, stream);
  const std::thread::id thread = std::this_thread::get_id();

  Lock lock(mutex_);
  check_open();
  std::vector<int> slots;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    int slot = slot_of_[keys[i]];
    EF_CHECK(slot >= 0 && slots_[slot].pins > 0, "expert ", experts[i], " at layer ", layer,
             " is not acquired, so it cannot be released");
    slots.push_back(slot);
  }
  // A fence replaces only one that this thread recorded on this stream handle: that one
  // is earlier in the stream. Other threads' records on the same handle may be later, or
  // on another stream altogether (cudaStreamPerThread names one stream per thread).
  for (int slot : slots) {
    std::vector<ReadFence>& reads = slots_[slot].read_fences;
    auto same = std::find_if(reads.begin(), reads.end(), [&](const ReadFence& r) {
      return r.stream == stream && r.thread == thread;
    });
    if (same != reads.end()) {
      same->fence = fence;
    } else {
      reads.push_back(ReadFence{stream, thread, fence});
    }
  }
  unpin(slots);
}

std::vector<int> ExpertCache::prediction_keys(int layer, const std::vector<int>& experts,
                                              const std::vector<float>& scores) const {
  std::vector<int> keys = keys_of(layer, experts);
  EF_CHECK(scores.empty() || scores.size() == experts.size(), "got ", scores.size(), " scores for ",
           experts.size(), " experts");
  for (std::size_t i = 0; i < scores.size(); ++i) {
    EF_CHECK(std::isfinite(scores[i]) && scores[i] >= 0.0f, "score ", scores[i], " for expert ",
             experts[i], " at layer ", layer, " must be a finite number >= 0");
  }
  return keys;
}

void ExpertCache::record_predictions(const std::vector<int>& keys,
                                     const std::vector<float>& scores) {
  for (std::size_t i = 0; i < keys.size(); ++i) {
    confidence_[keys[i]] = scores.empty() ? 1.0f : scores[i];
  }
}

void ExpertCache::predict(int layer, const std::vector<int>& experts,
                          const std::vector<float>& scores) {
  std::vector<int> keys = prediction_keys(layer, experts, scores);
  Lock lock(mutex_);
  check_open();
  record_predictions(keys, scores);
}

void ExpertCache::prefetch(int layer, const std::vector<int>& experts,
                           const std::vector<float>& scores) {
  std::vector<int> keys = prediction_keys(layer, experts, scores);
  struct Job {
    int slot;
    std::uint64_t generation;
    CopyRequest request;
  };
  std::vector<Job> jobs;
  {
    Lock lock(mutex_);
    check_open();
    record_predictions(keys, scores);
    VictimQuery query = victim_query();
    query.max_distance = query.distance(layer);
    for (int key : keys) {
      if (slot_of_[key] >= 0) continue;
      query.min_confidence = confidence_[key];
      int slot = take_victim(query);
      if (slot < 0) {
        count(layer, &LayerStats::prefetch_dropped);
        continue;
      }
      assign(slot, key);
      Slot& s = slots_[slot];
      s.stale = false;
      s.loading = true;
      s.issued = false;
      s.prefetched = true;
      refresh_evictable(slot);
      count(layer, &LayerStats::prefetch_issued);
      jobs.push_back(Job{slot, s.generation, copy_request(slot)});
    }
  }
  std::vector<std::uint64_t> tickets;
  for (Job& job : jobs) {
    int slot = job.slot;
    std::uint64_t generation = job.generation;
    std::shared_ptr<Fence> done = copy_fences_.get();
    TransferEngine::Callbacks callbacks{[this, slot, generation, done](const std::string& error) {
                                          on_prefetch_issued(slot, generation, done, error);
                                        },
                                        [this, slot, generation](const std::string& error) {
                                          on_prefetch_complete(slot, generation, error);
                                        }};
    tickets.push_back(engine_.prefetch(std::move(job.request), done, std::move(callbacks)));
  }
  Lock lock(mutex_);
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    Slot& s = slots_[jobs[i].slot];
    if (s.generation == jobs[i].generation && s.loading && !s.issued) s.ticket = tickets[i];
  }
}

void ExpertCache::on_prefetch_issued(int slot, std::uint64_t generation,
                                     std::shared_ptr<Fence> done, const std::string& error) {
  Lock lock(mutex_);
  Slot& s = slots_[slot];
  if (s.generation != generation) return;
  s.issued = true;
  s.ticket = 0;
  if (error.empty()) {
    s.copy_fence = std::move(done);
    s.read_fences.clear();  // the copy waited on them: ordered before its readers
    count(views_[slot].layer, &LayerStats::bytes_prefetch,
          std::uint64_t{layout_.bytes(views_[slot].key)});
  } else {
    count(views_[slot].layer, &LayerStats::prefetch_failed);  // copied on demand when acquired
    make_stale(slot);
    slot_cv_.notify_all();
  }
  issued_cv_.notify_all();
}

void ExpertCache::on_prefetch_complete(int slot, std::uint64_t generation,
                                       const std::string& error) {
  Lock lock(mutex_);
  Slot& s = slots_[slot];
  if (s.generation != generation) return;
  if (error.empty()) {
    s.loading = false;
    refresh_evictable(slot);
  } else {
    count(views_[slot].layer, &LayerStats::prefetch_failed);  // copied on demand when acquired
    make_stale(slot);
  }
  slot_cv_.notify_all();
}

// Reads the device stall times that have completed (all of them when `wait`) into
// stream_stall_seconds_. Backend calls run unlocked, on timers taken out of the list.
void ExpertCache::collect_stalls(bool wait) const {
  std::vector<PendingStall> pending;
  {
    Lock lock(mutex_);
    pending.swap(pending_stalls_);
  }
  if (pending.empty()) return;
  std::vector<std::pair<int, double>> read;
  std::vector<PendingStall> unread;
  for (PendingStall& stall : pending) {
    if (wait) backend_->synchronize(*stall.end);
    std::optional<double> seconds = backend_->elapsed_seconds(*stall.start, *stall.end);
    if (seconds) {
      read.emplace_back(stall.layer, *seconds);
    } else {
      unread.push_back(std::move(stall));
    }
  }
  Lock lock(mutex_);
  for (const auto& [layer, seconds] : read) stream_stall_seconds_[layer] += seconds;
  for (PendingStall& stall : unread) pending_stalls_.push_back(std::move(stall));
}

CacheStats ExpertCache::stats() const {
  collect_stalls(/*wait=*/true);
  Lock lock(mutex_);
  CacheStats stats = stats_;
  for (int layer = 0; layer < layout_.num_layers(); ++layer) {
    stats.layers[layer].stall_seconds += stream_stall_seconds_[layer];
    stats.stall_seconds += stream_stall_seconds_[layer];
  }
  return stats;
}

void ExpertCache::reset_stats() {
  Lock lock(mutex_);
  check_open();
  stats_ = CacheStats{};
  stats_.layers.resize(layout_.num_layers());
  stream_stall_seconds_.assign(layout_.num_layers(), 0.0);
  pending_stalls_.clear();
}

int ExpertCache::pending_prefetches() const {
  Lock lock(mutex_);
  return static_cast<int>(std::count_if(slots_.begin(), slots_.end(),
                                        [](const Slot& s) { return s.loading && s.prefetched; }));
}

bool ExpertCache::resident(int layer, int expert) const {
  int key = layout_.key(layer, expert);
  Lock lock(mutex_);
  check_open();
  int slot = slot_of_[key];
  return slot >= 0 && !slots_[slot].stale;
}

void* ExpertCache::slot_address(int slot) const {
  EF_CHECK(slot >= 0 && slot < num_slots_, "slot ", slot, " out of range [0, ", num_slots_, ")");
  Lock lock(mutex_);
  check_open();
  return arena_->slot(slot);
}

bool ExpertCache::closed() const {
  Lock lock(mutex_);
  return closed_;
}

void ExpertCache::close() {
  {
    Lock lock(mutex_);
    if (closed_) return;
    closed_ = true;
  }
  issued_cv_.notify_all();
  slot_cv_.notify_all();
  engine_.shutdown();
  std::vector<std::shared_ptr<Fence>> fences;
  std::unique_ptr<DeviceArena> arena;
  {
    Lock lock(mutex_);
    for (int slot = 0; slot < num_slots_; ++slot) {  // the shutdown dropped queued prefetches
      Slot& s = slots_[slot];
      if (s.loading && !s.issued && s.prefetched) {
        s.loading = false;
        count(views_[slot].layer, &LayerStats::prefetch_cancelled);
        count(views_[slot].layer, &LayerStats::prefetch_wasted);
      }
    }
    // Demand copies and stream waits that other threads began before the close use the
    // slots; every later call finds the cache closed.
    issued_cv_.wait(lock, [this] { return calls_outside_lock_ == 0; });
    for (const Slot& s : slots_) {
      if (s.copy_fence != nullptr) fences.push_back(s.copy_fence);
      for (const ReadFence& read : s.read_fences) fences.push_back(read.fence);
    }
    arena = std::move(arena_);
  }
  // Every copy issued and every read released so far must finish before the slots go.
  for (const std::shared_ptr<Fence>& fence : fences) backend_->synchronize(*fence);
  arena.reset();  // cudaFree synchronises the device: never under the lock
}

}  // namespace expertflow
