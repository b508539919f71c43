"""The matrix products of a linear layer, shared by every op that ends in one.

``F.linear`` (fastgpt/ops/linear.py; fp32 on the CPU backend, the one case where its product
is not torch's), the fused ops that end in a matmul (``bias_gelu_linear``, ``layer_norm_linear``)
and the GPT's heads-merging projection all multiply through the one custom op
``fastgpt::matmul`` (defined in fastgpt/ops/linear.py; its CPU kernel, csrc/linear.cpp, sends
fp32 products to the faster of ATen's two GEMM libraries, csrc/gemm.h). The formulas are
autograd's own for ``F.linear``, so the gradients equal the plain composition's. On the
reference backend the products are torch's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastgpt import _backend

# Row counts up to which the CPU kernel multiplies by the weight itself (csrc/linear.cpp,
# kSkinnyRows): a decode step's matrix-vector products, bound by reading the weight, which ran
# 1.1-7x faster there than on MKL or oneDNN in fp32, bf16 and fp16 alike.
FEW_ROWS = 4


def matmul(backend: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
    """``a @ b (+ bias)`` for 2-D a (M, K), b (K, N): a fresh contiguous (M, N) tensor."""
    if backend == "reference":
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    return _backend.kernel("linear", "matmul", backend, a.device)(a, b, bias)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) as (rows, K); unlike reshape(-1, K), also when K or the rows are 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias, backend: str) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (..., K), weight (N, K), bias (N,) or None."""
    out = matmul(backend, as_rows(x), weight.t(), bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_backward(
    dout: torch.Tensor,
    weight: torch.Tensor,
    input_2d: Callable[[], torch.Tensor],
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
):
    """Gradients of ``out = linear(a, weight, bias)`` for ``dout`` (..., N) and weight (N, K).

    ``input_2d()`` gives ``a`` as (rows, K) (the fused ops rebuild it here instead of keeping
    it); it is called only when the weight gradient is needed, and dropped before d_a is
    allocated, so the two never coexist. The weight gradient comes in the weight's own layout:
    for a weight that is the transpose of a contiguous tensor (transformers' Conv1D weight,
    passed as ``w.t()``) it is computed as (K, N) and returned transposed, so autograd needs no
    copy to give the parameter its gradient.
    Returns ``(d_a, dweight, dbias)``: d_a as (rows, K); each None when not needed.
    """
    dout2 = as_rows(dout)
    dweight = None
    if need_weight:
        a = input_2d()
        if weight.stride(0) == 1 and weight.stride(1) != 1:  # column-major: Conv1D's w.t()
            dweight = matmul(backend, a.t(), dout2).t()
        else:
            dweight = matmul(backend, dout2.t(), a)
        del a
    dbias = dout2.sum(0) if need_bias else None
    d_a = matmul(backend, dout2, weight) if need_input else None
    return d_a, dweight, dbias


def backend_for(x: torch.Tensor, *params: torch.Tensor | None) -> str:
    """The backend for a linear of input ``x``: the reference one where the kernels do not
    take the call (x's dtype, or parameters of another dtype or device)."""
    backend = _backend.backend_for(x)
    return "reference" if _backend.unsupported(backend, params, x) else backend
