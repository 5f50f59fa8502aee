#include "expertflow/host_pool.h"

#include <algorithm>
#include <cstdint>

#include "expertflow/error.h"

namespace expertflow {

namespace {

std::size_t align_up(std::size_t n, std::size_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

}  // namespace

ExpertLayout::ExpertLayout(int num_layers, int experts_per_layer, std::size_t expert_bytes)
    : ExpertLayout(
          num_layers, experts_per_layer,
          std::vector<std::size_t>(num_layers > 0 && experts_per_layer > 0
                                       ? static_cast<std::size_t>(num_layers) * experts_per_layer
                                       : 0,
                                   expert_bytes)) {}

ExpertLayout::ExpertLayout(int num_layers, int experts_per_layer, std::vector<std::size_t> sizes)
    : num_layers_(num_layers), experts_per_layer_(experts_per_layer), sizes_(std::move(sizes)) {
  EF_CHECK(num_layers > 0, "num_layers must be positive, got ", num_layers);
  EF_CHECK(experts_per_layer > 0, "experts_per_layer must be positive, got ", experts_per_layer);
  EF_CHECK(sizes_.size() == static_cast<std::size_t>(num_layers) * experts_per_layer, "expected ",
           num_layers * experts_per_layer, " expert sizes (", num_layers, " layers x ",
           experts_per_layer, " experts), got ", sizes_.size());
  offsets_.reserve(sizes_.size());
  for (std::size_t key = 0; key < sizes_.size(); ++key) {
    EF_CHECK(sizes_[key] > 0, "expert (layer ", key / experts_per_layer, ", expert ",
             key % experts_per_layer, ") has size 0");
    offsets_.push_back(total_bytes_);
    total_bytes_ = align_up(total_bytes_ + sizes_[key], kAlignment);
    max_bytes_ = std::max(max_bytes_, sizes_[key]);
  }
}

int ExpertLayout::key(int layer, int expert) const {
  EF_CHECK(layer >= 0 && layer < num_layers_, "layer ", layer, " out of range [0, ", num_layers_,
           ")");
  EF_CHECK(expert >= 0 && expert < experts_per_layer_, "expert id ", expert, " out of range [0, ",
           experts_per_layer_, ") at layer ", layer);
  return layer * experts_per_layer_ + expert;
}

HostPool::HostPool(std::shared_ptr<Backend> backend, ExpertLayout layout)
    : backend_(std::move(backend)), layout_(std::move(layout)) {
  EF_CHECK(backend_ != nullptr, "HostPool needs a backend, got null");
  bytes_ = layout_.total_bytes();
  base_ = static_cast<std::byte*>(backend_->alloc_host(bytes_));
  owned_ = true;
}

HostPool::HostPool(std::shared_ptr<Backend> backend, ExpertLayout layout, void* base,
                   std::size_t bytes)
    : backend_(std::move(backend)), layout_(std::move(layout)) {
  EF_CHECK(backend_ != nullptr, "HostPool needs a backend, got null");
  EF_CHECK(base != nullptr, "HostPool base address is null");
  auto address = reinterpret_cast<std::uintptr_t>(base);
  EF_CHECK(address % ExpertLayout::kAlignment == 0, "HostPool base address 0x", std::hex, address,
           std::dec, " is not ", ExpertLayout::kAlignment, "-byte aligned");
  EF_CHECK(bytes >= layout_.total_bytes(), "HostPool memory of ", bytes,
           " bytes is smaller than the layout's ", layout_.total_bytes(), " bytes");
  backend_->register_host(base, bytes);
  base_ = static_cast<std::byte*>(base);
  bytes_ = bytes;
}

HostPool::~HostPool() {
  if (owned_) {
    backend_->free_host(base_);
  } else {
    backend_->unregister_host(base_);
  }
}

}  // namespace expertflow
