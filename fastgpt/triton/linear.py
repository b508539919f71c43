"""CUDA side of ``fastgpt::matmul``, the product inside every fastgpt linear: cuBLAS, through
torch. A GEMM is the one place where a hand-written Triton kernel has nothing to add over the
vendor library, so this module has launchers and no ``@triton.jit`` kernels (and is not in
``report.KERNEL_MODULES``). Under the Triton backend on CPU tensors (the interpreter tests) the
same calls run ATen's CPU product.
"""

from __future__ import annotations

import torch


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ b (+ bias)`` for a (M, K), b (K, N), bias (N,): a fresh contiguous (M, N)."""
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
