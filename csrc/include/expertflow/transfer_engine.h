// TransferEngine: copies expert blobs from the host pool into device slots.
//
// Two kinds of queue:
//  - demand: a miss the current layer waits on. Issued at once from the calling thread
//    on a high-priority stream (the caller needs it next, so no hand-off to a worker).
//  - prefetch: predicted experts. One worker thread per prefetch stream takes jobs from
//    one shared FIFO and keeps one copy in flight on its stream, so that every job still
//    in the queue has not started and can be cancelled. A prefetch moves in chunks of
//    kPrefetchChunkBytes, one in flight at a time, so that a demand copy issued meanwhile
//    waits for at most one chunk on the link, not for a whole expert.
//
// Every copy first makes its stream wait on the request's `after` fences (the reads of
// the slot's previous contents), then copies, then records `done`.
//
// Lock order: ExpertCache's mutex may be held while calling prefetch() or cancel(); the
// engine never calls back with its own mutex held.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "expertflow/backend.h"

namespace expertflow {

struct CopyRequest {
  void* dst = nullptr;
  const void* src = nullptr;
  std::size_t bytes = 0;
  std::vector<Fence*> after;  // waited on by the copy's stream before it writes dst
  Fence* done = nullptr;      // recorded after the copy
};

class TransferEngine {
 public:
  static constexpr std::size_t kPrefetchChunkBytes = std::size_t{4} << 20;

  // Called on a prefetch worker: issued when `done` is recorded (readers may wait on it),
  // complete when the copy has finished. `error` is empty on success; after an error the
  // job's remaining callback does not run.
  struct Callbacks {
    std::function<void(const std::string& error)> issued;
    std::function<void(const std::string& error)> complete;
  };

  TransferEngine(std::shared_ptr<Backend> backend, int prefetch_streams);
  ~TransferEngine();  // drops queued jobs, waits for the ones in flight
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  // Issues a demand copy; returns once `done` is recorded (on the CPU backend the bytes
  // have arrived by then). Throws BackendError.
  void demand(const CopyRequest& request);

  // Queues a prefetch copy; returns a ticket for cancel().
  std::uint64_t prefetch(CopyRequest request, Callbacks callbacks);

  // Removes a queued prefetch that has not started: true if it was removed (its callbacks
  // never run), false if it had started or finished.
  bool cancel(std::uint64_t ticket);

  // Stops the workers after the jobs in flight; queued jobs are dropped. Idempotent.
  void shutdown();

  int prefetch_streams() const { return static_cast<int>(streams_.size()); }
  std::size_t queued() const;

 private:
  struct Job {
    std::uint64_t ticket;
    CopyRequest request;
    Callbacks callbacks;
  };
  void run_worker(StreamHandle stream);
  void issue(const CopyRequest& request, StreamHandle stream, std::size_t chunk_bytes);

  std::shared_ptr<Backend> backend_;
  StreamHandle demand_stream_;
  std::vector<StreamHandle> streams_;
  std::vector<std::thread> workers_;

  mutable std::mutex mutex_;
  std::condition_variable work_cv_;
  std::deque<Job> queue_;
  std::uint64_t next_ticket_ = 1;
  bool stopping_ = false;
};

}  // namespace expertflow
