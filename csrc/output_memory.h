// Memory for the kernels' large outputs: a bounded cache of huge-page blocks.
//
// Why: a fresh multi-MB CPU output is memory the kernel has never touched. glibc serves it
// (above its mmap threshold, 32 MiB at most, and below it too once the heap top has been
// trimmed) with new pages, and the OS zeroes each one on its first touch: on the VMs this
// project is measured on, zeroing plus the fault took a third of LayerNorm's fwd+bwd at GPT-2's
// 8192 x 768 (perf: clear_page_erms 14% of samples against the kernels' ~24%), and more than the
// GELU kernels themselves at 8192 x 3072. Training and inference allocate the same sizes over
// and over, so the blocks are kept instead: an output of >= 4 MiB comes from a cache of blocks
// its earlier outputs freed (already mapped, never zeroed again), like the caching allocator
// torch uses on CUDA.
//
// What: blocks are whole 2 MiB multiples, 2 MiB-aligned and advised for transparent huge pages
// (madvise MADV_HUGEPAGE, honoured when /sys/kernel/mm/transparent_hugepage/enabled is "always"
// or "madvise"), so a fresh block faults 512x less often than with 4 KiB pages. A freed block
// is kept while the cache's idle blocks stay within FASTGPT_OUTPUT_CACHE_MB (default 1024; 0
// turns the cache off), the oldest freed first evicted past it; fastgpt.empty_cache() hands
// every idle block back (fastgpt.output_cache_info() counts them). The tensors are ordinary CPU
// tensors (resize_, views, pickling, profiler memory events all work), whose storage's
// allocator is the cache: smaller requests pass through to ATen's CPU allocator.
// FASTGPT_HUGE_PAGES=0 keeps 4 KiB pages (for A/B timing, or where THP's rounding is unwanted).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastgpt {

// A contiguous tensor of `sizes` for a kernel's output that is about to be written in full.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

// empty_output with the sizes and options (dtype, device) of `like`; always contiguous.
inline at::Tensor empty_output_like(const at::Tensor& like) {
  return empty_output(like.sizes(), like.options());
}

// What the cache holds now and has done (the C entry point fastgpt_output_cache_stats).
struct OutputCacheStats {
  uint64_t idle_bytes, idle_blocks, hits, misses, cap_bytes;
};

}  // namespace fastgpt
