// TransferEngine: copies expert blobs from the host pool into device slots.
//
// Two kinds of queue:
//  - demand: a miss the current layer waits on. Issued at once from the calling thread
//    on a high-priority stream (the caller needs it next, so no hand-off to a worker).
//    The copies of one demand() call (one acquire's misses) share one `done` fence.
//  - prefetch: predicted experts. One worker thread per prefetch stream takes jobs from
//    one shared FIFO and works on one job at a time, so that every job still in the queue
//    has not started and can be cancelled. A prefetch moves in chunks of
//    kPrefetchChunkBytes with two chunks in flight per stream: the link never idles
//    between chunks (the next is queued while one copies), and a demand copy issued
//    meanwhile waits for at most two chunks per prefetch stream, not for whole experts.
//    Chunking is what bounds that wait: stream priorities order kernels, not DMA copies,
//    which the copy engines take in the order they were queued.
//
// Every copy first makes its stream wait on the request's `after` fences (the reads of
// the slot's previous contents and its previous copy), skipping those already complete and
// waiting once on a fence that several requests share; then copies; then records `done`.
// The host waits only on prefetch chunk fences and `done` of a prefetch, all of which
// block the waiting thread instead of spinning (cudaEventBlockingSync on CUDA).
//
// Lock order: ExpertCache's mutex may be held while calling prefetch() or cancel(); the
// engine never calls back with its own mutex held. No backend call runs under it.
#pragma once

#include <array>
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
  std::vector<std::shared_ptr<Fence>> after;  // waited on by the copy's stream before it writes
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

  // Throws InvalidArgument when prefetch_streams < 1, BackendError when a stream or fence
  // cannot be created; whatever was created before the failure is released.
  TransferEngine(std::shared_ptr<Backend> backend, int prefetch_streams);
  ~TransferEngine();  // drops queued jobs, waits for the ones in flight
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  // Issues the copies on the demand stream, then records `done` once after the last of
  // them; returns once it is recorded (on the CPU backend the bytes have arrived by then).
  // Throws BackendError.
  void demand(const std::vector<CopyRequest>& copies, Fence& done);

  // Queues a prefetch copy that records `done` when issued; returns a ticket for cancel().
  std::uint64_t prefetch(CopyRequest request, std::shared_ptr<Fence> done, Callbacks callbacks);

  // Removes a queued prefetch that has not started: true if it was removed (its callbacks
  // never run), false if it had started or finished.
  bool cancel(std::uint64_t ticket);

  // Stops the workers after the jobs in flight; queued jobs are dropped. Idempotent.
  void shutdown();

  int prefetch_streams() const { return static_cast<int>(lanes_.size()); }
  std::size_t queued() const;

 private:
  struct Job {
    std::uint64_t ticket = 0;
    CopyRequest request;
    std::shared_ptr<Fence> done;
    Callbacks callbacks;
  };
  // A stream that destroys itself, so that a constructor that throws halfway leaks none.
  class OwnedStream {
   public:
    OwnedStream(Backend& backend, bool high_priority)
        : backend_(&backend), handle_(backend.create_stream(high_priority)) {}
    ~OwnedStream() { backend_->destroy_stream(handle_); }
    OwnedStream(const OwnedStream&) = delete;
    OwnedStream& operator=(const OwnedStream&) = delete;
    StreamHandle handle() const { return handle_; }

   private:
    Backend* backend_;
    StreamHandle handle_;
  };
  // A prefetch stream and the two fences its chunks alternate between.
  struct Lane {
    explicit Lane(Backend& backend);
    OwnedStream stream;
    std::array<std::unique_ptr<Fence>, 2> chunk_fences;
    std::uint64_t chunks = 0;  // chunks issued on this stream so far
  };

  void run_worker(Lane& lane);
  void wait_for(StreamHandle stream, const std::vector<const CopyRequest*>& requests);
  void issue_prefetch(const Job& job, Lane& lane);

  std::shared_ptr<Backend> backend_;
  std::unique_ptr<OwnedStream> demand_stream_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  std::vector<std::thread> workers_;

  mutable std::mutex mutex_;
  std::condition_variable work_cv_;
  std::deque<Job> queue_;
  std::uint64_t next_ticket_ = 1;
  bool stopping_ = false;
};

}  // namespace expertflow
