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
scaling twice. Code that needs repeated backwards (gradcheck) runs inside
``inplace_backward(False)``: the backward then scales a copy, at the cost of a second N x V
buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fastgpt import _backend
from fastgpt.ops._registry import define

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# A module global (not a contextvar) so torch.compile guards on it instead of breaking the graph.
_inplace_backward = True


@contextmanager
def inplace_backward(enabled: bool) -> Iterator[None]:
    """Whether the cross-entropy backwards scale their saved gradients in place (the default)."""
    global _inplace_backward
    previous, _inplace_backward = _inplace_backward, enabled
    try:
        yield
    finally:
        _inplace_backward = previous


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """``grad * grad_output`` (0-dim, or one value per row) by the kernel of ``backend``: in place
    unless ``inplace_backward(False)`` is active."""
    scale = _backend.kernel("cross_entropy", "cross_entropy_scale_grad_", backend, grad.device)
    if _inplace_backward:
        # Make the mutation visible to autograd's saved-tensor version check (the dispatcher
        # does not bump the version of a custom op's mutated argument by itself).
        torch.autograd.graph.increment_version(grad)
    else:
        grad = grad.clone()
    scale(grad, grad_output.to(grad.dtype).contiguous())
    return grad


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
        return scale_saved_grad(grad, grad_output, ctx.backend), None, None, None, None, None
