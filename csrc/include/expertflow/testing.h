// Fault injection for tests: makes the CPU backend fail or slow down on purpose, so that
// tests can check that a failed copy or allocation raises a clear error and leaves the
// cache correct and usable. Not for production use.
#pragma once

#include <cstdint>

#include "expertflow/backend.h"

namespace expertflow::testing {

struct CpuFaults {
  int fail_copy = 0;           // the Nth copy from now throws BackendError (1: the next; 0: none)
  double copy_delay_us = 0.0;  // every copy takes at least this long
  bool fail_alloc = false;     // the next host or device allocation throws OutOfMemory
};

// Replaces the CPU backend's faults. Throws InvalidArgument for any other backend.
void inject_faults(Backend& backend, const CpuFaults& faults);

}  // namespace expertflow::testing
