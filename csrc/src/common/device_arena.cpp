#include "expertflow/device_arena.h"

#include <cstdint>

#include "expertflow/error.h"

namespace expertflow {

DeviceArena::DeviceArena(std::shared_ptr<Backend> backend, std::size_t slot_bytes, int num_slots)
    : backend_(std::move(backend)), num_slots_(num_slots) {
  EF_CHECK(backend_ != nullptr, "DeviceArena needs a backend, got null");
  EF_CHECK(num_slots > 0, "number of slots must be positive, got ", num_slots);
  EF_CHECK(slot_bytes > 0, "slot size must be positive, got ", slot_bytes);
  constexpr std::size_t kAlignment = 256;
  EF_CHECK(slot_bytes <= SIZE_MAX / 2 / static_cast<std::size_t>(num_slots), num_slots,
           " slots of ", slot_bytes, " bytes overflow the address space");
  slot_bytes_ = (slot_bytes + kAlignment - 1) / kAlignment * kAlignment;
  base_ = static_cast<std::byte*>(
      backend_->alloc_device(slot_bytes_ * static_cast<std::size_t>(num_slots_)));
}

DeviceArena::~DeviceArena() { backend_->free_device(base_); }

}  // namespace expertflow
