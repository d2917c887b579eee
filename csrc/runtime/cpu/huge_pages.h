// CPU helper shared by the kernels that write a fresh, large output.
#pragma once

#include <sys/mman.h>

#include <cstdint>

namespace fpn_fast {

// A fresh output of FPN size (tens of MB) costs as much in first-touch page faults as the
// whole kernel does in arithmetic. Before our kernel first writes it, ask Linux to back
// the buffer's 2 MB-aligned interior with transparent huge pages (512x fewer faults); the same
// thing torch's THP_MEM_ALLOC_ENABLE does for every allocation, here only for our output. A
// hint: where THP is off or the call fails, nothing changes.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < int64_t(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace fpn_fast
