"""Cross-entropy on (N, V) logits with int64 class targets: custom ops and autograd.

Ops:
  cross_entropy_fwd(logits, target, ignore_index, label_smoothing, reduction, compute_grad)
      -> (loss, grad)
  cross_entropy_scale_grad_(grad!, grad_output) -> ()
``reduction`` is numbered as torch's: 0 none, 1 mean, 2 sum. ``loss`` has the logits' dtype, shape
(N,) for "none" and () otherwise. ``grad`` (empty unless ``compute_grad``) is the gradient of that
loss with respect to the logits for grad_output = 1 (ones for "none"), written by the forward
(Liger's design): the backward only multiplies it by grad_output, in place, so forward + backward
cost one read pass over the logits and one write pass, and the gradient is the only N x V tensor.

Because the backward mutates a saved tensor, a second backward through the same graph
(``retain_graph=True``) is refused by autograd's saved-tensor version check rather than silently
scaling twice.
"""

from __future__ import annotations

import torch

from fastgpt import _backend
from fastgpt.ops._registry import define

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

FWD = define(
    "cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing,"
    " int reduction, bool compute_grad) -> (Tensor, Tensor)",
    "cross_entropy",
)
SCALE = define(
    "cross_entropy_scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()", "cross_entropy"
)


@torch.library.register_fake(FWD)
def _(logits, target, ignore_index, label_smoothing, reduction, compute_grad):
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == 0 else ())
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad


@torch.library.register_fake(SCALE)
def _(grad, grad_output):
    return None


class CrossEntropyFunction(torch.autograd.Function):
    """cross_entropy(logits, target) for 2-D contiguous logits and (N,) int64 targets."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, reduction, backend):
        fwd = _backend.kernel("cross_entropy", "cross_entropy_fwd", backend, logits.device)
        compute_grad = ctx.needs_input_grad[0]
        loss, grad = fwd(logits, target, ignore_index, label_smoothing, reduction, compute_grad)
        ctx.save_for_backward(grad)
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        scale = _backend.kernel(
            "cross_entropy", "cross_entropy_scale_grad_", ctx.backend, grad.device
        )
        scale(grad, grad_output.to(grad.dtype).contiguous())
        return grad, None, None, None, None, None
