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
from fastgpt.ops._linear import linear_backward, linear_forward
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


def _normalize(x, residual, weight, bias, eps, backend):
    """``(y, normed, mean, rstd)``: y = layer_norm(normed), where ``normed`` is x, or the sum
    x + residual (rounded to x's dtype) when a residual is given."""
    if residual is None:
        fwd = _backend.kernel("layer_norm", "layer_norm_fwd", backend, x.device)
        y, mean, rstd = fwd(x, weight, bias, eps)
        return y, x, mean, rstd
    fwd = _backend.kernel("layer_norm", "add_layer_norm_fwd", backend, x.device)
    return fwd(x, residual, weight, bias, eps)


def _normalize_backward(backend, dy, normed, mean, rstd, weight, dsummed, weight_grad, bias_grad):
    """``(dx, dweight, dbias)``, dweight/dbias None unless their flag is on; dx also carries
    ``dsummed``, the gradient of the sum output."""
    if dy is None:
        dy = torch.zeros_like(normed)
    bwd = _backend.kernel("layer_norm", "layer_norm_bwd", backend, normed.device)
    dx, dweight, dbias = bwd(
        dy.contiguous(),
        normed,
        mean,
        rstd,
        weight,
        None if dsummed is None else dsummed.contiguous(),
        weight_grad,
        bias_grad,
    )
    return dx, dweight if weight_grad else None, dbias if bias_grad else None


class LayerNormFunction(torch.autograd.Function):
    """layer_norm (residual None) or add_layer_norm over 2-D contiguous tensors.

    Returns y, or (y, summed) when a residual is given.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, backend):
        y, normed, mean, rstd = _normalize(x, residual, weight, bias, eps, backend)
        ctx.save_for_backward(normed, mean, rstd, weight)
        ctx.fused = residual is not None
        ctx.has_bias = bias is not None
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return (y, normed) if ctx.fused else y

    @staticmethod
    def infer(x, residual, weight, bias, eps, backend):
        """The forward without autograd (see _backend.apply)."""
        y, normed, _, _ = _normalize(x, residual, weight, bias, eps, backend)
        return y if residual is None else (y, normed)

    @staticmethod
    def backward(ctx, dy, dsummed=None):
        normed, mean, rstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        weight_grad = weight is not None and need[2]
        bias_grad = ctx.has_bias and need[3]
        dx, dweight, dbias = _normalize_backward(
            ctx.backend, dy, normed, mean, rstd, weight, dsummed, weight_grad, bias_grad
        )
        return dx, dx if ctx.fused and need[1] else None, dweight, dbias, None, None


class LayerNormLinearFunction(torch.autograd.Function):
    """linear(layer_norm(x [+ residual]), linear_weight, linear_bias) that does not keep the
    LayerNorm output.

    In a pre-LN block every LayerNorm feeds a matmul (q/k/v, the MLP's first linear), and the
    matmul needs its input, the LayerNorm output, for the weight gradient. Autograd keeps it beside
    the LayerNorm input, which the LayerNorm's own backward needs: two activations of the model
    width where one would do. This keeps the input (and the row statistics) and recomputes the
    LayerNorm output in the backward: one more pass over a (rows, C) tensor, against a matmul
    that is ~N times more work. The recomputed output is bit for bit the forward's.
    x, residual: (rows, C) contiguous; linear_weight (N, C). Returns out (rows, N), or
    (out, x + residual) when a residual is given.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, linear_weight, linear_bias, backend):
        y, normed, mean, rstd = _normalize(x, residual, weight, bias, eps, backend)
        out = linear_forward(y, linear_weight, linear_bias, backend)
        ctx.save_for_backward(normed, mean, rstd, weight, bias, linear_weight)
        ctx.fused = residual is not None
        ctx.eps = eps
        ctx.has_linear_bias = linear_bias is not None
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return (out, normed) if ctx.fused else out

    @staticmethod
    def infer(x, residual, weight, bias, eps, linear_weight, linear_bias, backend):
        """The forward without autograd (see _backend.apply)."""
        y, normed, _, _ = _normalize(x, residual, weight, bias, eps, backend)
        out = linear_forward(y, linear_weight, linear_bias, backend)
        return out if residual is None else (out, normed)

    @staticmethod
    def backward(ctx, dout, dsummed=None):
        normed, mean, rstd, weight, bias, linear_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_norm = any(need[:4])
        dy = dweight_l = dbias_l = None
        if dout is not None:

            def layer_norm_output():
                return _normalize(normed, None, weight, bias, ctx.eps, ctx.backend)[0]

            dy, dweight_l, dbias_l = linear_backward(
                dout,
                linear_weight,
                layer_norm_output,
                need_norm,
                need[5],
                ctx.has_linear_bias and need[6],
                ctx.backend,
            )
        dx = dweight = dbias = None
        if need_norm and (dy is not None or dsummed is not None):
            weight_grad = weight is not None and need[2]
            bias_grad = bias is not None and need[3]
            dx, dweight, dbias = _normalize_backward(
                ctx.backend, dy, normed, mean, rstd, weight, dsummed, weight_grad, bias_grad
            )
        dres = dx if ctx.fused and need[1] else None
        return dx if need[0] else None, dres, dweight, dbias, None, dweight_l, dbias_l, None
