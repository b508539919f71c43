"""LayerNorm, optionally with the residual add fused in: custom ops and autograd.

Ops (all on 2-D contiguous (rows, hidden) tensors; mean/rstd are fp32, float64 for float64):
  layer_norm_fwd(x, weight?, bias?, eps)               -> (y, mean, rstd)
  add_layer_norm_fwd(x, residual, weight?, bias?, eps) -> (y, x + residual, mean, rstd)
  layer_norm_bwd(dy, x, mean, rstd, weight?, dresidual?, weight_grad, bias_grad)
                                                       -> (dx, dweight, dbias)
The backward serves both forwards: for the fused op ``x`` is the saved sum and ``dresidual`` the
gradient flowing into the sum output, added to dx in the same pass. dweight/dbias are empty when
their flag is off.
"""

from __future__ import annotations

import torch

from fastgpt import _backend
from fastgpt.ops._registry import define

FWD = define(
    "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    "layer_norm",
)
ADD_FWD = define(
    "add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    "layer_norm",
)
BWD = define(
    "layer_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight,"
    " Tensor? dresidual, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)",
    "layer_norm",
)


def _stats(x: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], dtype=dtype)


@torch.library.register_fake(FWD)
def _(x, weight, bias, eps):
    return torch.empty_like(x), _stats(x), _stats(x)


@torch.library.register_fake(ADD_FWD)
def _(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x), _stats(x), _stats(x)


@torch.library.register_fake(BWD)
def _(dy, x, mean, rstd, weight, dresidual, weight_grad, bias_grad):
    n = x.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty(n if weight_grad else 0),
        x.new_empty(n if bias_grad else 0),
    )


class LayerNormFunction(torch.autograd.Function):
    """layer_norm (residual None) or add_layer_norm over 2-D contiguous tensors.

    Returns y, or (y, summed) when a residual is given.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, backend):
        if residual is None:
            fwd = _backend.kernel("layer_norm", "layer_norm_fwd", backend, x.device)
            y, mean, rstd = fwd(x, weight, bias, eps)
            saved = x
        else:
            fwd = _backend.kernel("layer_norm", "add_layer_norm_fwd", backend, x.device)
            y, saved, mean, rstd = fwd(x, residual, weight, bias, eps)
        ctx.save_for_backward(saved, mean, rstd, weight)
        ctx.fused = residual is not None
        ctx.has_bias = bias is not None
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return (y, saved) if ctx.fused else y

    @staticmethod
    def backward(ctx, dy, dsummed=None):
        x, mean, rstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        weight_grad = weight is not None and need[2]
        bias_grad = ctx.has_bias and need[3]
        if dy is None:
            dy = torch.zeros_like(x)
        bwd = _backend.kernel("layer_norm", "layer_norm_bwd", ctx.backend, x.device)
        dx, dweight, dbias = bwd(
            dy.contiguous(),
            x,
            mean,
            rstd,
            weight,
            None if dsummed is None else dsummed.contiguous(),
            weight_grad,
            bias_grad,
        )
        return (
            dx,
            dx if ctx.fused and need[1] else None,
            dweight if weight_grad else None,
            dbias if bias_grad else None,
            None,
            None,
        )
