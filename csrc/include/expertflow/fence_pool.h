// FencePool: fences handed out with shared ownership and taken back for reuse.
//
// A release records one fence that all its slots share, and a batch of demand copies
// completes one fence that all its slots share; a fence goes back to the pool's free list
// when its last owner lets go, so that steady decoding creates no events at all.
//
// Locking: the pool's mutex is a leaf, held only to push or pop the free list. get()
// creates a fence (a driver call) outside it, and reserves the free list's room there too,
// so that giving a fence back never allocates and never calls the backend: owners may let
// go of fences while they hold their own lock (ExpertCache's). Fences still owned when
// the pool goes are destroyed by their last owner.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

#include "expertflow/backend.h"

namespace expertflow {

class FencePool {
 public:
  enum class Kind { kFence, kTimer };

  FencePool(std::shared_ptr<Backend> backend, Kind kind);
  FencePool(const FencePool&) = delete;
  FencePool& operator=(const FencePool&) = delete;

  // A free fence, or a new one when none is free. Throws BackendError.
  std::shared_ptr<Fence> get();
  // Fences created so far, free or owned.
  std::size_t created() const;

 private:
  struct FreeList {
    std::mutex mutex;
    std::vector<std::unique_ptr<Fence>> fences;
    std::size_t created = 0;
  };

  std::shared_ptr<Backend> backend_;
  Kind kind_;
  std::shared_ptr<FreeList> free_;  // shared with the owners' deleters
};

}  // namespace expertflow
