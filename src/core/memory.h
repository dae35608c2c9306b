// This machine's memory, and the check every large allocation of user-sized data
// makes first: a plan of a million devices or a model too large to train is refused
// with a line naming the estimate and the memory, not a std::bad_alloc.
#pragma once

#include <cstdint>
#include <string_view>

#include "core/result.h"

namespace sn {

// Physical memory in bytes (0 if unknown).
uint64_t physical_memory_bytes();

// An input error (exit 2) if BYTES is more than half of this machine's physical
// memory (the rest is the OS's, other processes' and the caller's own), naming WHAT,
// the estimate and the memory: "a plan on 1000000 devices needs about 48000.0 GB of
// memory, more than half of this machine's 23.4 GB". Unknown memory: no error.
Status check_memory_for(uint64_t bytes, std::string_view what);

}  // namespace sn
