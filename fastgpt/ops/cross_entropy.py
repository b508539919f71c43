"""Cross-entropy on (N, V) logits with int64 class targets: custom ops and autograd.

Ops:
  cross_entropy_fwd(logits, target, ignore_index, label_smoothing, reduction, compute_grad)
      -> (loss, grad)
  cross_entropy_scale_grad_(grad!, grad_output) -> ()   grad_output: grad's dtype, or fp32 for
                                                        bf16/fp16 grads
``reduction`` is numbered as torch's: 0 none, 1 mean, 2 sum. ``loss`` has the logits' dtype, shape
(N,) for "none" and () otherwise. ``grad`` (empty unless ``compute_grad``) is the gradient of that
loss with respect to the logits for grad_output = 1 (ones for "none"), written by the forward
(Liger's design): the backward only multiplies it by grad_output, in place, so forward + backward
cost one read pass over the logits and one write pass, and the gradient is the only N x V tensor.

A graph kept with ``retain_graph=True`` can be run backward again, and every pass gets the
right gradient. The first backward scales the buffer in place (nothing at all for a grad_output of
1) and hands it out; ``scale_saved_grads`` remembers that scale, and later backwards compute
``buffer * (grad_output / remembered)`` into a fresh tensor, so a gradient already returned never
changes. A grad_output with a zero (or a non-finite value) is never applied in place: it could not
be undone, so that backward writes a fresh tensor and the buffer keeps the unit gradient. Later
backwards carry one more rounding than the first (the buffer was rounded after scaling), well
inside the dtype's tolerance. Under ``inplace_backward(False)`` every backward writes a copy.
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


def scale_saved_grads(ctx, grads: list, grad_output: torch.Tensor) -> list:
    """Each of ``grads`` (forward-written buffers for grad_output = 1; None passes through) times
    ``grad_output`` (0-dim, or one value per row): in place the first time when that can be
    undone, else into fresh tensors.

    ``ctx.applied`` (set here, absent at first) is the grad_output, in the buffers' dtype as the
    kernel applied it, that an earlier backward scaled the buffers by in place before handing them
    to autograd. ``ctx.backend`` names the kernels.
    """
    live = [g for g in grads if g is not None]
    if not live:
        return list(grads)
    kernel = _backend.kernel(
        "cross_entropy", "cross_entropy_scale_grad_", ctx.backend, grad_output.device
    )
    dtype = live[0].dtype
    go = grad_output.to(dtype).contiguous()
    if torch.compiler.is_compiling():
        # A traced graph cannot branch on grad_output's values or keep Python state between runs:
        # it scales in place as a single backward does (a compiled graph is run backward once).
        for g in live:
            torch.autograd.graph.increment_version(g)
            kernel(g, go)
        return list(grads)
    applied = getattr(ctx, "applied", None)
    if applied is None:
        if _inplace_backward and bool(((go != 0) & torch.isfinite(go)).all()):
            # No version bump (some kernels, Triton's mul_, would make one): autograd's saved-
            # tensor check still catches a user who mutates a returned gradient, and ctx.applied
            # records this mutation.
            for g in live:
                with torch.autograd._unsafe_preserve_version_counter(g):
                    kernel(g, go)
            ctx.applied = go
            return list(grads)
        factor = go
    else:
        # The buffers hold unit gradient x applied: a fresh tensor times the ratio, in the
        # accumulation dtype (the kernel takes fp32 factors for bf16/fp16 buffers).
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        factor = (grad_output.to(acc) / applied.to(acc)).contiguous()
    out = []
    for g in grads:
        if g is not None:
            g = g.clone()
            kernel(g, factor)
        out.append(g)
    return out


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
    def infer(logits, target, ignore_index, label_smoothing, reduction, backend):
        """The forward without autograd (see _backend.apply): no gradient is written."""
        fwd = _backend.kernel("cross_entropy", "cross_entropy_fwd", backend, logits.device)
        return fwd(logits, target, ignore_index, label_smoothing, reduction, False)[0]

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        (grad,) = scale_saved_grads(ctx, [grad], grad_output)
        return grad, None, None, None, None, None
