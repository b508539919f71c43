// A small cache of large CPU output buffers, reused across calls.
//
// torch's CPU allocator returns every large block to the OS, so each fresh 100 MB output
// page-faults on first touch (~30 ms per 100 MB here, more than the arithmetic of an
// elementwise op). In a training loop the same shapes come back every step: keeping a few freed
// blocks (already faulted in) and handing them out again removes that cost. The tensors are
// ordinary CPU tensors (resizable: a resize reallocates through this allocator too); only blocks
// of at least kMinPooledBytes are pooled, at most kMaxPooledBytes of free blocks are kept, and
// FASTGPT_OUTPUT_POOL=0 turns the pool off (every output then comes from torch's allocator).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastgpt {

// An uninitialized tensor shaped, typed and strided like `like` (contiguous), from the pool.
at::Tensor empty_pooled_like(const at::Tensor& like);

}  // namespace fastgpt
