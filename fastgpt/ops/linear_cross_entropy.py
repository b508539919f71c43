"""Linear + cross-entropy: ``cross_entropy(input @ weightᵀ + bias, target)`` in row chunks, the
(N, V) logits never whole. Custom op and autograd.

Op:
  linear_cross_entropy_fwd(input, weight, bias?, target, ignore_index, label_smoothing, reduction,
                           row_scale?, input_grad, weight_grad, bias_grad, chunk_rows)
      -> (loss, d_input, d_weight, d_bias)
Each chunk of rows: logits into one reused buffer by a matrix product, loss and dlogits in place
by the cross-entropy row kernels, then d_input (a product) and d_weight, d_bias accumulated. The
gradients are those of the reduced loss for grad_output = 1 (each row scaled by ``row_scale[i]``
when given); unrequested ones are empty. ``chunk_rows`` 0 picks the size from a memory budget.

"mean"/"sum": the forward computes the gradients and the backward scales them in place by the
scalar grad_output (``cross_entropy_scale_grad_``; a later backward through a retained graph
scales copies, see fastgpt.ops.cross_entropy). "none": d_weight mixes rows, so it cannot be
rescaled per row afterwards; the forward computes losses only and the backward runs the op again
with ``row_scale = grad_output``.
"""

from __future__ import annotations

import torch

from fastgpt import _backend
from fastgpt.ops._registry import define
from fastgpt.ops.cross_entropy import scale_saved_grads

FWD = define(
    "linear_cross_entropy_fwd(Tensor input, Tensor weight, Tensor? bias, Tensor target,"
    " int ignore_index, float label_smoothing, int reduction, Tensor? row_scale, bool input_grad,"
    " bool weight_grad, bool bias_grad, int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor)",
    "cross_entropy",
)


@torch.library.register_fake(FWD)
def _(
    input,
    weight,
    bias,
    target,
    ignore_index,
    label_smoothing,
    reduction,
    row_scale,
    input_grad,
    weight_grad,
    bias_grad,
    chunk_rows,
):
    n, c = input.shape
    v = weight.shape[0]
    return (
        input.new_empty((n,) if reduction == 0 else ()),
        input.new_empty((n, c) if input_grad else (0, 0)),
        input.new_empty((v, c) if weight_grad else (0, 0)),
        input.new_empty(v if bias_grad else 0),
    )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """linear_cross_entropy for 2-D contiguous input (N, C), weight (V, C), bias (V,) or None
    and (N,) int64 targets."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, target, ignore_index, label_smoothing, reduction, chunk_rows, backend
    ):
        fwd = _backend.kernel("cross_entropy", "linear_cross_entropy_fwd", backend, x.device)
        need = ctx.needs_input_grad
        flags = (need[0], need[1], bias is not None and need[2])
        ctx.flags = flags
        ctx.backend = backend
        ctx.reduction = reduction
        ctx.args = (ignore_index, label_smoothing, reduction)
        ctx.chunk_rows = chunk_rows
        if reduction == 0:
            loss, _, _, _ = fwd(
                x, weight, bias, target, ignore_index, label_smoothing, 0, None,
                False, False, False, chunk_rows,
            )  # fmt: skip
            ctx.save_for_backward(x, weight, bias, target)
        else:
            loss, dx, dw, db = fwd(
                x, weight, bias, target, ignore_index, label_smoothing, reduction, None,
                *flags, chunk_rows,
            )  # fmt: skip
            ctx.save_for_backward(dx, dw, db)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        flags = ctx.flags
        if ctx.reduction == 0:
            x, weight, bias, target = ctx.saved_tensors
            fwd = _backend.kernel(
                "cross_entropy", "linear_cross_entropy_fwd", ctx.backend, x.device
            )
            _, dx, dw, db = fwd(
                x, weight, bias, target, *ctx.args[:2], 0,
                grad_output.to(x.dtype).contiguous(), *flags, ctx.chunk_rows,
            )  # fmt: skip
        else:
            dx, dw, db = scale_saved_grads(
                ctx, [t if wanted else None for t, wanted in zip(ctx.saved_tensors, flags)],
                grad_output,
            )  # fmt: skip
        return (
            dx if flags[0] else None,
            dw if flags[1] else None,
            db if flags[2] else None,
            None, None, None, None, None, None,
        )  # fmt: skip
