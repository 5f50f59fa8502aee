#include "expertflow/transfer_engine.h"

#include <algorithm>

#include "expertflow/error.h"

namespace expertflow {

TransferEngine::TransferEngine(std::shared_ptr<Backend> backend, int prefetch_streams)
    : backend_(std::move(backend)) {
  EF_CHECK(prefetch_streams >= 1, "prefetch_streams must be at least 1, got ", prefetch_streams);
  demand_stream_ = backend_->create_stream(/*high_priority=*/true);
  for (int i = 0; i < prefetch_streams; ++i) {
    streams_.push_back(backend_->create_stream(/*high_priority=*/false));
  }
  for (StreamHandle stream : streams_) {
    workers_.emplace_back([this, stream] { run_worker(stream); });
  }
}

TransferEngine::~TransferEngine() {
  shutdown();
  backend_->destroy_stream(demand_stream_);
  for (StreamHandle stream : streams_) backend_->destroy_stream(stream);
}

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

void TransferEngine::issue(const CopyRequest& request, StreamHandle stream,
                           std::size_t chunk_bytes) {
  for (Fence* fence : request.after) backend_->wait(stream, *fence);
  auto* dst = static_cast<std::byte*>(request.dst);
  const auto* src = static_cast<const std::byte*>(request.src);
  for (std::size_t done = 0; done < request.bytes; done += chunk_bytes) {
    std::size_t bytes = std::min(chunk_bytes, request.bytes - done);
    if (done > 0) backend_->synchronize(*request.done);  // one chunk in flight at a time
    backend_->copy_to_device(dst + done, src + done, bytes, stream);
    backend_->record(*request.done, stream);
  }
}

void TransferEngine::demand(const CopyRequest& request) {
  issue(request, demand_stream_, request.bytes);
}

std::uint64_t TransferEngine::prefetch(CopyRequest request, Callbacks callbacks) {
  std::uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) EF_THROW(StateError, "TransferEngine is shut down");
    ticket = next_ticket_++;
    queue_.push_back(Job{ticket, std::move(request), std::move(callbacks)});
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

void TransferEngine::run_worker(StreamHandle stream) {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    // One copy in flight per stream: everything still queued is cancellable.
    std::string error;
    try {
      issue(job.request, stream, kPrefetchChunkBytes);
    } catch (const std::exception& e) {
      error = e.what();
    }
    job.callbacks.issued(error);
    if (!error.empty()) continue;
    try {
      backend_->synchronize(*job.request.done);
    } catch (const std::exception& e) {
      error = e.what();
    }
    job.callbacks.complete(error);
  }
}

}  // namespace expertflow
