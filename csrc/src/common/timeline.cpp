#include "expertflow/timeline.h"

#include <algorithm>
#include <limits>

#include "expertflow/error.h"

namespace expertflow {

LinkTimeline::LinkTimeline(double bytes_per_s, double chunk_bytes)
    : rate_(bytes_per_s), chunk_(chunk_bytes) {
  EF_CHECK(bytes_per_s > 0.0, "link rate must be positive, got ", bytes_per_s);
  EF_CHECK(chunk_bytes > 0.0, "prefetch chunk must be positive, got ", chunk_bytes);
}

double LinkTimeline::occupy(double start, double bytes) {
  free_ = start + bytes / rate_;
  bytes_ += bytes;
  return free_;
}

void LinkTimeline::advance(double t) {
  while (!queue_.empty()) {
    Prefetch& p = prefetches_[queue_.front()];
    double start = std::max(free_, p.issue);
    // Live keeps two chunks of a prefetch in flight: while one moves, the next one is
    // already queued on the copy engine, ahead of a demand copy issued meanwhile.
    bool queued_behind = p.remaining < p.bytes && p.last_chunk_start < t;
    if (start >= t && !queued_behind) return;  // a demand copy issued at t goes first
    double bytes = std::min(chunk_, p.remaining);
    occupy(start, bytes);
    p.last_chunk_start = start;
    p.remaining -= bytes;
    if (p.remaining <= 0.0) {
      p.done = free_;
      queue_.pop_front();
    }
  }
}

double LinkTimeline::demand_start(double issue, double ready) {
  double earliest = std::max(issue, ready);
  advance(earliest);  // live, the prefetch worker keeps issuing chunks until then
  return std::max(free_, earliest);
}

double LinkTimeline::demand(double issue, double ready, double bytes) {
  return occupy(demand_start(issue, ready), bytes);
}

int LinkTimeline::prefetch(double issue, double bytes) {
  prefetches_.push_back({issue, bytes, bytes});
  int id = static_cast<int>(prefetches_.size()) - 1;
  queue_.push_back(id);
  return id;
}

double LinkTimeline::arrival(int id, double now) {
  EF_CHECK(id >= 0 && id < static_cast<int>(prefetches_.size()), "no prefetch ", id);
  advance(now);
  Prefetch& p = prefetches_[id];
  if (p.done >= 0.0) return p.done;
  queue_.erase(std::find(queue_.begin(), queue_.end(), id));
  p.done = demand(now, now, p.remaining);
  p.remaining = 0.0;
  return p.done;
}

bool LinkTimeline::idle(double now) {
  advance(now);
  return queue_.empty() && free_ <= now;
}

bool LinkTimeline::queue_empty(double now) {
  advance(now);
  return queue_.empty();
}

double LinkTimeline::backlog_end(double now) {
  advance(now);
  double queued = 0.0;
  for (int id : queue_) queued += prefetches_[id].remaining;
  return std::max(free_, now) + queued / rate_;
}

double LinkTimeline::cancel_queued(double now) {
  advance(now);
  double dropped = 0.0;
  std::deque<int> started;
  for (int id : queue_) {
    Prefetch& p = prefetches_[id];
    if (p.remaining < p.bytes) {
      started.push_back(id);
    } else {
      dropped += p.remaining;
      p.remaining = 0.0;
      p.done = now;  // never arrives; nothing reads it
    }
  }
  queue_ = std::move(started);
  return dropped;
}

double LinkTimeline::drain() {
  advance(std::numeric_limits<double>::infinity());
  return free_;
}

PassTimeline::PassTimeline(const HardwareRates& rates, const ModelCosts& model, double chunk_bytes)
    : rates_(rates), model_(model), link_(rates.link_bytes_per_s, chunk_bytes) {
  check_costs(rates, model);
}

double PassTimeline::begin_layer() {
  double dense = dense_seconds(model_, rates_);
  routed_ = layer_end_ + dense;
  device_busy_ += dense;
  tasks_.clear();
  return routed_;
}

double PassTimeline::slot_free(int slot) const {
  return slot >= 0 && slot < static_cast<int>(slot_reads_.size()) ? slot_reads_[slot] : 0.0;
}

void PassTimeline::on_device(double available, int slot, int tokens) {
  tasks_.push_back({available, slot, device_expert_seconds(model_, tokens, rates_)});
}

double PassTimeline::copy(int slot, int tokens) {
  double arrived = link_.demand(routed_, slot_free(slot), model_.expert_bytes);
  on_device(arrived, slot, tokens);
  return arrived;
}

double PassTimeline::on_cpu(int tokens) {
  double seconds = cpu_expert_seconds(model_, tokens, rates_);
  cpu_free_ = std::max(cpu_free_, routed_) + seconds;
  cpu_busy_ += seconds;
  return cpu_free_;
}

double PassTimeline::run_device(std::vector<DeviceTask>& tasks, bool commit) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const DeviceTask& a, const DeviceTask& b) {
    return a.available < b.available;
  });
  double t = routed_;
  for (const DeviceTask& task : tasks) {
    t = std::max(t, task.available) + task.seconds;
    if (!commit) continue;
    device_busy_ += task.seconds;
    if (task.slot < 0) continue;
    if (task.slot >= static_cast<int>(slot_reads_.size())) slot_reads_.resize(task.slot + 1, 0.0);
    slot_reads_[task.slot] = t;
  }
  return t;
}

double PassTimeline::device_finish_if(double available, int tokens) {
  std::vector<DeviceTask> tasks = tasks_;
  tasks.push_back({available, -1, device_expert_seconds(model_, tokens, rates_)});
  return run_device(tasks, false);
}

double PassTimeline::cpu_finish_if(int tokens) const {
  return std::max(cpu_free_, routed_) + cpu_expert_seconds(model_, tokens, rates_);
}

PlacementChoice PassTimeline::place_miss(int tokens) {
  double copy_start = link_.demand_start(routed_, routed_);
  std::vector<DeviceTask> tasks = tasks_;
  double device_free = run_device(tasks, false);
  return expertflow::place_miss(routed_, copy_start, device_free, cpu_free_, model_, tokens,
                                rates_);
}

double PassTimeline::expected_end() {
  std::vector<DeviceTask> tasks = tasks_;
  return std::max({run_device(tasks, false), cpu_free_, routed_});
}

double PassTimeline::end_layer() {
  double device_end = run_device(tasks_, true);
  layer_end_ = std::max({device_end, cpu_free_, routed_});
  tasks_.clear();
  return layer_end_;
}

double PassTimeline::finish() { return std::max(link_.drain(), layer_end_); }

}  // namespace expertflow
