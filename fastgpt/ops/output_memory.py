"""empty_output_like: a tensor from the memory fastgpt's kernels put their large outputs in.

  empty_output_like(like) -> Tensor   (like's shape, dtype and device; contiguous, uninitialised)

On CPU, blocks of >= 4 MiB come from the cache of huge-page blocks that csrc/output_memory.h
describes (already-mapped memory that earlier outputs freed, so no page is faulted in or zeroed
again); smaller ones, every other device, and a CPU without fastgpt's C++ build get plain
``torch.empty``. The kernels allocate this way in C++; this op lets Python code allocate as they
do (the benchmarks' memory floor).
"""

from __future__ import annotations

import torch

from fastgpt.ops._registry import LIB

LIB.define("empty_output_like(Tensor like) -> Tensor")
EMPTY_OUTPUT_LIKE = "fastgpt::empty_output_like"


def _plain_empty(like):
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


torch.library.register_fake(EMPTY_OUTPUT_LIKE, _plain_empty, lib=LIB)
torch.library.register_kernel(EMPTY_OUTPUT_LIKE, "cuda", _plain_empty, lib=LIB)


def empty_output_like(like: torch.Tensor) -> torch.Tensor:
    """A contiguous, uninitialised tensor shaped like ``like``; on CPU allocated as fastgpt's
    kernels allocate their outputs."""
    if like.device.type == "cpu":
        from fastgpt import _cpu

        if not _cpu.loaded() and not _cpu.supported_isas():
            return _plain_empty(like)  # no C++ build here: fastgpt's CPU ops run the reference
        _cpu.ensure_loaded()
    return torch.ops.fastgpt.empty_output_like(like)
