"""The backward of a linear layer whose input the caller did not keep (shared by the fused ops).

Ops that end in a matmul (``bias_gelu_linear``, ``layer_norm_linear``, the GPT's heads-merging
projection) save something cheaper than the matmul's input and rebuild that input in the backward,
only for the weight gradient. The formulas are autograd's own for ``F.linear``, so the gradients
equal the unfused composition's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def linear_backward(
    dout: torch.Tensor,
    weight: torch.Tensor,
    input_2d: Callable[[], torch.Tensor],
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
):
    """Gradients of ``out = linear(a, weight, bias)`` for ``dout`` (..., N) and weight (N, K).

    ``input_2d()`` rebuilds ``a`` as (rows, K); it is called only when the weight gradient is
    needed, and dropped before d_a is allocated, so the two never coexist.
    Returns ``(d_a, dweight, dbias)``: d_a as (rows, K); each None when not needed.
    """
    dout2 = dout.reshape(-1, dout.shape[-1])
    dweight = dout2.t().mm(input_2d()) if need_weight else None
    dbias = dout2.sum(0) if need_bias else None
    d_a = dout2.mm(weight) if need_input else None
    return d_a, dweight, dbias
