#include "core/memory.h"

#include <unistd.h>

namespace sn {

uint64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size);
}

Status check_memory_for(uint64_t bytes, std::string_view what) {
  const uint64_t memory = physical_memory_bytes();
  if (memory == 0 || bytes <= memory / 2) return ok_status();
  return input_error("{} needs about {:.1f} GB of memory, more than half of this machine's {:.1f} GB", what,
                     static_cast<double>(bytes) / 1e9, static_cast<double>(memory) / 1e9);
}

}  // namespace sn
