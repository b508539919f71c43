"""Linear layers (``F.linear``): the matrix-product custom op and its autograd.

Op:
  matmul(a, b, bias?) -> a @ b (+ bias)
a (M, K), b (K, N), bias (N,) or none, one floating dtype. a and b may be row-major or the
transpose of a row-major tensor (both read in place, which is how the forward reads weightᵀ and the
backward doutᵀ); other layouts are copied. The result is a fresh contiguous (M, N) tensor.

CPU: csrc/linear.cpp, through csrc/gemm.h: ATen's product, fp32 ones on oneDNN where MKL would
run slower kernels (AMD CPUs with AVX-512, where this measured ~2x faster). CUDA: cuBLAS
(fastgpt/triton/linear.py). ``LinearFunction`` builds ``F.linear`` and its three gradients
from the one op (fastgpt/ops/_linear.py holds the formulas, shared with the fused ops).
"""

from __future__ import annotations

import torch

from fastgpt.ops._linear import as_rows, linear_backward, linear_forward
from fastgpt.ops._registry import define

MATMUL = define("matmul(Tensor a, Tensor b, Tensor? bias) -> Tensor", "linear")


@torch.library.register_fake(MATMUL)
def _(a, b, bias):
    return a.new_empty(a.shape[0], b.shape[1])


class LinearFunction(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for x (..., K), weight (N, K), bias (N,) or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        return linear_forward(x, weight, bias, backend)

    infer = staticmethod(linear_forward)  # the forward without autograd (see _backend.apply)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dweight, dbias = linear_backward(
            dout,
            weight,
            lambda: as_rows(x),
            need[0],
            need[1],
            ctx.has_bias and need[2],
            ctx.backend,
        )
        if dx is not None:
            dx = dx.view(x.shape)
        return dx, dweight, dbias, None
