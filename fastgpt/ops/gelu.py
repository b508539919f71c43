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
from fastgpt.ops._linear import linear_backward, linear_forward
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


def _gelu(x, bias, approximate, backend):
    return _backend.kernel("gelu", "gelu_fwd", backend, x.device)(x, bias, approximate)


class GeluFunction(torch.autograd.Function):
    """gelu(x + bias) over a contiguous x; bias (C,) or None."""

    @staticmethod
    def forward(ctx, x, bias, approximate, backend):
        y = _gelu(x, bias, approximate, backend)
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        ctx.backend = backend
        return y

    @staticmethod
    def infer(x, bias, approximate, backend):
        """The forward without autograd (see _backend.apply)."""
        return _gelu(x, bias, approximate, backend)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[1]
        bwd = _backend.kernel("gelu", "gelu_bwd", ctx.backend, x.device)
        dx, dbias = bwd(dy.contiguous(), x, bias, ctx.approximate, bias_grad)
        return dx, dbias if bias_grad else None, None, None


class GeluLinearFunction(torch.autograd.Function):
    """linear(gelu(x + bias), weight, linear_bias) that does not keep the GELU output.

    An MLP's second matmul needs its input, gelu(x + bias), in the backward (for the weight
    gradient). Autograd would keep it beside x, which the GELU's own backward needs: two
    activations of the MLP's widest size per layer. This saves only x and recomputes the GELU in
    the backward, one extra elementwise pass against a matmul that is ~C times more work.
    x: (..., C) contiguous; bias (C,) or None; weight (N, C); linear_bias (N,) or None.
    """

    @staticmethod
    def forward(ctx, x, bias, weight, linear_bias, approximate, backend):
        y = linear_forward(_gelu(x, bias, approximate, backend), weight, linear_bias, backend)
        ctx.save_for_backward(x, bias, weight)
        ctx.approximate = approximate
        ctx.backend = backend
        ctx.has_linear_bias = linear_bias is not None
        return y

    @staticmethod
    def infer(x, bias, weight, linear_bias, approximate, backend):
        """The forward without autograd (see _backend.apply)."""
        return linear_forward(_gelu(x, bias, approximate, backend), weight, linear_bias, backend)

    @staticmethod
    def backward(ctx, dy):
        x, bias, weight = ctx.saved_tensors
        need_x, need_bias, need_weight, need_linear_bias = ctx.needs_input_grad[:4]

        def gelu_output():  # recomputed, bit for bit the forward's
            return _gelu(x, bias, ctx.approximate, ctx.backend).reshape(-1, x.shape[-1])

        dg, dweight, dlinear_bias = linear_backward(
            dy,
            weight,
            gelu_output,
            need_x or need_bias,
            need_weight,
            ctx.has_linear_bias and need_linear_bias,
            ctx.backend,
        )
        dx = dbias = None
        if dg is not None:
            bias_grad = bias is not None and need_bias
            bwd = _backend.kernel("gelu", "gelu_bwd", ctx.backend, x.device)
            dx, dbias = bwd(dg.view(x.shape), x, bias, ctx.approximate, bias_grad)
            dx = dx if need_x else None
            dbias = dbias if bias_grad else None
        return dx, dbias, dweight, dlinear_bias, None, None
