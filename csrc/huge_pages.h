// Large kernel outputs backed by transparent huge pages.
//
// Why: a fresh multi-MB output (glibc serves allocations above its mmap threshold, 32 MiB at
// most, with new zero pages; smaller ones too once the heap top has been trimmed) is first
// touched by the kernel's stores, one 4 KiB page fault at a time. On the VMs this project is
// measured on a fault costs 2-8 us, i.e. 0.5-2 ms per MB: more than LayerNorm's own work on the
// same bytes (a 25 MB fp32 8192x768 output is ~6400 faults, ~12 ms, against a ~3 ms kernel).
// Asking for huge pages (madvise MADV_HUGEPAGE, honoured when
// /sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise") turns them into ~12
// faults of 2 MiB each, whose cost is mostly zeroing the memory.
//
// How: allocate with ATen's own CPU allocator (so profiler accounting, pinned-memory rules etc.
// stay as they are) and advise the 2 MiB-aligned interior of the block before anything writes
// to it. Memory glibc reuses from its heap is already mapped; the advice is then harmless. The
// edges (< 2 MiB each side) keep 4 KiB pages. PyTorch offers the same for every allocation
// behind THP_MEM_ALLOC_ENABLE=1; this applies it to fastgpt's large outputs only.
// FASTGPT_HUGE_PAGES=0 turns it off (for A/B timing, or where THP's memory rounding is unwanted).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastgpt {

inline bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FASTGPT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// Advise the 2 MiB-aligned interior of t's storage for huge pages; only for blocks of >= 4 MiB,
// where at least one whole huge page fits inside.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t nbytes = t.nbytes();
  if (nbytes < 2 * kHuge || !huge_pages_enabled()) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + nbytes) & ~(kHuge - 1);
  // A failure (THP compiled out, "never") only means 4 KiB pages, as without the call.
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty for a kernel's output that is about to be written in full.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  advise_huge_pages(t);
  return t;
}

// at::empty_like for a kernel's output that is about to be written in full.
inline at::Tensor empty_output_like(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
  advise_huge_pages(t);
  return t;
}

}  // namespace fastgpt
