// DeviceArena: N equal slots on the device, carved from one allocation.
//
// On the CPU backend the "device" is host memory, so that every code path above it runs
// and is tested without a GPU. Slots are 256-byte aligned.
#pragma once

#include <cstddef>
#include <memory>

#include "expertflow/backend.h"

namespace expertflow {

class DeviceArena {
 public:
  // Throws InvalidArgument when num_slots < 1 or slot_bytes == 0, OutOfMemory when the
  // allocation fails.
  DeviceArena(std::shared_ptr<Backend> backend, std::size_t slot_bytes, int num_slots);
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  int num_slots() const { return num_slots_; }
  std::size_t slot_bytes() const { return slot_bytes_; }
  std::byte* slot(int index) const { return base_ + static_cast<std::size_t>(index) * slot_bytes_; }

 private:
  std::shared_ptr<Backend> backend_;
  std::size_t slot_bytes_;
  int num_slots_;
  std::byte* base_ = nullptr;
};

}  // namespace expertflow
