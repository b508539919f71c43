"""GELU, optionally with a bias add fused in: custom ops and autograd.

Ops (x contiguous, any shape; bias (C,) broadcast over x's last dim C):
  gelu_fwd(x, bias?, approximate)                 -> gelu(x + bias)
  gelu_bwd(dy, x, bias?, approximate, bias_grad)  -> (dx, dbias)
x + bias is formed in fp32 and never rounded; each output is rounded once. The backward
recomputes from x and bias (nothing else is saved) and, when bias_grad, sums dx over the rows into
dbias in the same pass; dbias is empty when bias_grad is off.
"""

from __future__ import annotations

import torch

from fastgpt import _backend
from fastgpt.ops._registry import define

FWD = define("gelu_fwd(Tensor x, Tensor? bias, str approximate) -> Tensor", "gelu")
BWD = define(
    "gelu_bwd(Tensor dy, Tensor x, Tensor? bias, str approximate, bool bias_grad)"
    " -> (Tensor, Tensor)",
    "gelu",
)


@torch.library.register_fake(FWD)
def _(x, bias, approximate):
    return torch.empty_like(x)


@torch.library.register_fake(BWD)
def _(dy, x, bias, approximate, bias_grad):
    return torch.empty_like(x), x.new_empty(bias.shape[0] if bias_grad else 0)


class GeluFunction(torch.autograd.Function):
    """gelu(x + bias) over a contiguous x; bias (C,) or None."""

    @staticmethod
    def forward(ctx, x, bias, approximate, backend):
        fwd = _backend.kernel("gelu", "gelu_fwd", backend, x.device)
        y = fwd(x, bias, approximate)
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[1]
        bwd = _backend.kernel("gelu", "gelu_bwd", ctx.backend, x.device)
        dx, dbias = bwd(dy.contiguous(), x, bias, ctx.approximate, bias_grad)
        return dx, dbias if bias_grad else None, None, None
