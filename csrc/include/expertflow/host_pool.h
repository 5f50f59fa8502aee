// HostPool: one host arena holding every expert's bytes.
//
// Each expert is one contiguous blob, so it moves to a device slot in one copy. The
// layout maps (layer, expert) to a key, an offset and a size; blobs start on 256-byte
// boundaries. The pool either allocates its memory from the backend (page-locked on
// CUDA) or page-locks memory the caller already filled, without a second copy.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "expertflow/backend.h"

namespace expertflow {

class ExpertLayout {
 public:
  static constexpr std::size_t kAlignment = 256;

  // Every expert of every layer is expert_bytes long.
  ExpertLayout(int num_layers, int experts_per_layer, std::size_t expert_bytes);
  // One size per expert, layer-major: sizes[layer * experts_per_layer + expert].
  ExpertLayout(int num_layers, int experts_per_layer, std::vector<std::size_t> sizes);

  int num_layers() const { return num_layers_; }
  int experts_per_layer() const { return experts_per_layer_; }
  int num_keys() const { return num_layers_ * experts_per_layer_; }

  // The key of (layer, expert): layer * experts_per_layer + expert. Throws
  // InvalidArgument naming the value when either is out of range.
  int key(int layer, int expert) const;
  int layer_of(int key) const { return key / experts_per_layer_; }
  int expert_of(int key) const { return key % experts_per_layer_; }

  std::size_t offset(int key) const { return offsets_[key]; }
  std::size_t bytes(int key) const { return sizes_[key]; }
  std::size_t max_bytes() const { return max_bytes_; }
  std::size_t total_bytes() const { return total_bytes_; }

 private:
  int num_layers_;
  int experts_per_layer_;
  std::vector<std::size_t> sizes_;
  std::vector<std::size_t> offsets_;
  std::size_t max_bytes_ = 0;
  std::size_t total_bytes_ = 0;
};

class HostPool {
 public:
  // Allocates layout.total_bytes() from the backend.
  HostPool(std::shared_ptr<Backend> backend, ExpertLayout layout);
  // Uses `bytes` at `base`, which already hold the blobs at the layout's offsets, and
  // page-locks them. base must be non-null and 256-byte aligned; the caller keeps the
  // memory alive for the pool's lifetime.
  HostPool(std::shared_ptr<Backend> backend, ExpertLayout layout, void* base, std::size_t bytes);
  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  const ExpertLayout& layout() const { return layout_; }
  Backend& backend() const { return *backend_; }
  const std::shared_ptr<Backend>& backend_ptr() const { return backend_; }

  std::byte* data() const { return base_; }
  std::size_t bytes() const { return bytes_; }
  bool owns_memory() const { return owned_; }
  std::byte* blob(int key) const { return base_ + layout_.offset(key); }

 private:
  std::shared_ptr<Backend> backend_;
  ExpertLayout layout_;
  std::byte* base_ = nullptr;
  std::size_t bytes_ = 0;
  bool owned_ = false;
};

}  // namespace expertflow
