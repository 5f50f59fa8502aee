#include "expertflow/transfer_engine.h"

#include <algorithm>

#include "expertflow/error.h"

namespace expertflow {

TransferEngine::Lane::Lane(Backend& backend)
    : stream(backend, /*high_priority=*/false),
      chunk_fences{backend.create_fence(), backend.create_fence()} {}

TransferEngine::TransferEngine(std::shared_ptr<Backend> backend, int prefetch_streams)
    : backend_(std::move(backend)) {
  EF_CHECK(backend_ != nullptr, "TransferEngine needs a backend, got null");
  EF_CHECK(prefetch_streams >= 1, "prefetch_streams must be at least 1, got ", prefetch_streams);
  // Streams and fences own themselves: a throw here releases those created before it.
  demand_stream_ = std::make_unique<OwnedStream>(*backend_, /*high_priority=*/true);
  for (int i = 0; i < prefetch_streams; ++i) lanes_.push_back(std::make_unique<Lane>(*backend_));
  try {
    for (auto& lane : lanes_) {
      workers_.emplace_back([this, lane = lane.get()] { run_worker(*lane); });
    }
  } catch (...) {
    shutdown();  // joins the workers already started
    throw;
  }
}

TransferEngine::~TransferEngine() { shutdown(); }

void TransferEngine::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
    queue_.clear();
  }
  work_cv_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

// One wait per distinct fence that is not complete yet: the copies of a batch often share
// their slots' previous copy fence and the release fence of one layer's reads.
void TransferEngine::wait_for(StreamHandle stream,
                              const std::vector<const CopyRequest*>& requests) {
  std::vector<Fence*> seen;
  for (const CopyRequest* request : requests) {
    for (const std::shared_ptr<Fence>& fence : request->after) {
      if (fence == nullptr || std::find(seen.begin(), seen.end(), fence.get()) != seen.end())
        continue;
      seen.push_back(fence.get());
      if (!backend_->query(*fence)) backend_->wait(stream, *fence);
    }
  }
}

void TransferEngine::demand(const std::vector<CopyRequest>& copies, Fence& done) {
  StreamHandle stream = demand_stream_->handle();
  std::vector<const CopyRequest*> requests;
  for (const CopyRequest& copy : copies) requests.push_back(&copy);
  wait_for(stream, requests);
  for (const CopyRequest& copy : copies) {
    backend_->copy_to_device(copy.dst, copy.src, copy.bytes, stream);
  }
  backend_->record(done, stream);
}

// Chunk n reuses the fence of chunk n - 2, after waiting for it: two chunks in flight, so
// the link has the next one queued while one copies, and no more, so that a demand copy
// queued meanwhile waits for at most two chunks of this stream.
void TransferEngine::issue_prefetch(const Job& job, Lane& lane) {
  StreamHandle stream = lane.stream.handle();
  wait_for(stream, {&job.request});
  auto* dst = static_cast<std::byte*>(job.request.dst);
  const auto* src = static_cast<const std::byte*>(job.request.src);
  for (std::size_t offset = 0; offset < job.request.bytes; offset += kPrefetchChunkBytes) {
    std::size_t bytes = std::min(kPrefetchChunkBytes, job.request.bytes - offset);
    Fence& fence = *lane.chunk_fences[lane.chunks % 2];
    if (lane.chunks >= 2) backend_->synchronize(fence);
    backend_->copy_to_device(dst + offset, src + offset, bytes, stream);
    backend_->record(fence, stream);
    ++lane.chunks;
  }
  backend_->record(*job.done, stream);
}

std::uint64_t TransferEngine::prefetch(CopyRequest request, std::shared_ptr<Fence> done,
                                       Callbacks callbacks) {
  EF_CHECK(done != nullptr, "a prefetch needs a fence to record, got null");
  std::uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) EF_THROW(StateError, "TransferEngine is shut down");
    ticket = next_ticket_++;
    queue_.push_back(Job{ticket, std::move(request), std::move(done), std::move(callbacks)});
  }
  work_cv_.notify_one();
  return ticket;
}

bool TransferEngine::cancel(std::uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = std::find_if(queue_.begin(), queue_.end(),
                         [ticket](const Job& job) { return job.ticket == ticket; });
  if (it == queue_.end()) return false;
  queue_.erase(it);
  return true;
}

std::size_t TransferEngine::queued() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size();
}

void TransferEngine::run_worker(Lane& lane) {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    // One job at a time per stream: everything still queued is cancellable.
    std::string error;
    try {
      issue_prefetch(job, lane);
    } catch (const std::exception& e) {
      error = e.what();
    }
    job.callbacks.issued(error);
    if (!error.empty()) continue;
    try {
      backend_->synchronize(*job.done);
    } catch (const std::exception& e) {
      error = e.what();
    }
    job.callbacks.complete(error);
  }
}

}  // namespace expertflow
