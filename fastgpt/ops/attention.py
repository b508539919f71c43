"""Flash attention: custom ops and autograd.

Ops (q: (B, H, Tq, D), k/v: (B, H, Tk, D), all contiguous and of one dtype):
  attention_fwd(q, k, v, scale, is_causal, dropout_p, seed?, offset) -> (out, lse)
  attention_bwd(dout, q, k, v, out, lse, scale, is_causal, dropout_p, seed?, offset)
                                                                   -> (dq, dk, dv)
``lse`` (B, H, Tq) is the natural-log logsumexp of the scaled, masked scores, in fp32 (float64
for float64 inputs); a row with no visible key has lse = -inf and output 0. ``is_causal`` with
Tq != Tk is bottom-right aligned (query i sees keys j <= i + Tk - Tq), as flash-attention does.
Dropout (p > 0) drops entries of the softmax P with a counter-based RNG keyed by (seed, offset):
the backward regenerates the same mask, which is never stored. ``seed`` is a one-element int64
CPU tensor (None without dropout), not an int: drawing it with torch.randint then stays inside a
graph that torch.compile(fullgraph=True) traces, where reading an int out with .item() would break
it. The kernels read it when they run.
"""

from __future__ import annotations

import torch

from fastgpt import _backend
from fastgpt.ops._registry import define

FWD = define(
    "attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool is_causal, float dropout_p,"
    " Tensor? seed, int offset) -> (Tensor, Tensor)",
    "attention",
)
BWD = define(
    "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
    " float scale, bool is_causal, float dropout_p, Tensor? seed, int offset)"
    " -> (Tensor, Tensor, Tensor)",
    "attention",
)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(FWD)
def _(q, k, v, scale, is_causal, dropout_p, seed, offset):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))


@torch.library.register_fake(BWD)
def _(dout, q, k, v, out, lse, scale, is_causal, dropout_p, seed, offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class AttentionFunction(torch.autograd.Function):
    """softmax(q·kᵀ·scale [+ causal mask]) [dropout] · v on 4-D contiguous tensors."""

    @staticmethod
    def forward(ctx, q, k, v, scale, is_causal, dropout_p, seed, offset, backend):
        if isinstance(seed, int):  # an int seed (tests, direct callers) becomes the op's tensor
            seed = torch.tensor(seed, dtype=torch.int64)
        fwd = _backend.kernel("attention", "attention_fwd", backend, q.device)
        out, lse = fwd(q, k, v, scale, is_causal, dropout_p, seed, offset)
        ctx.save_for_backward(q, k, v, out, lse, seed)
        ctx.args = (scale, is_causal, dropout_p)
        ctx.offset = offset
        ctx.backend = backend
        return out

    @staticmethod
    def infer(q, k, v, scale, is_causal, dropout_p, seed, offset, backend):
        """The forward without autograd (see _backend.apply): a decode step is ~0.1-1 ms, and
        the Function's bookkeeping would cost tens of microseconds of it."""
        fwd = _backend.kernel("attention", "attention_fwd", backend, q.device)
        return fwd(q, k, v, scale, is_causal, dropout_p, seed, offset)[0]

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seed = ctx.saved_tensors
        bwd = _backend.kernel("attention", "attention_bwd", ctx.backend, q.device)
        dq, dk, dv = bwd(dout.contiguous(), q, k, v, out, lse, *ctx.args, seed, ctx.offset)
        return dq, dk, dv, None, None, None, None, None, None
