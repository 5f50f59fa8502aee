#include "expertflow/fence_pool.h"

#include "expertflow/error.h"

namespace expertflow {

FencePool::FencePool(std::shared_ptr<Backend> backend, Kind kind)
    : backend_(std::move(backend)), kind_(kind), free_(std::make_shared<FreeList>()) {
  EF_CHECK(backend_ != nullptr, "FencePool needs a backend, got null");
}

std::shared_ptr<Fence> FencePool::get() {
  std::unique_ptr<Fence> fence;
  {
    std::lock_guard<std::mutex> lock(free_->mutex);
    if (!free_->fences.empty()) {
      fence = std::move(free_->fences.back());
      free_->fences.pop_back();
    }
  }
  if (fence == nullptr) {
    fence = kind_ == Kind::kTimer ? backend_->create_timer() : backend_->create_fence();
    std::lock_guard<std::mutex> lock(free_->mutex);
    // Room for every fence ever created: giving one back never allocates.
    free_->fences.reserve(++free_->created);
  }
  std::shared_ptr<FreeList> free = free_;
  return std::shared_ptr<Fence>(fence.release(), [free](Fence* returned) noexcept {
    std::lock_guard<std::mutex> lock(free->mutex);
    free->fences.emplace_back(returned);
  });
}

std::size_t FencePool::created() const {
  std::lock_guard<std::mutex> lock(free_->mutex);
  return free_->created;
}

}  // namespace expertflow
