"""Plain-PyTorch reference implementations of every fastgpt op.

These are the oracle the tests hold the kernels against and the path that runs whatever the fast
kernels do not cover (an exotic dtype, an attention mask tensor, class weights, ...). They are
written to be read: each follows the math in DESIGN.md section 3 step by step, computes in fp32
(float64 stays float64) and rounds once to the input dtype at the end.

This module imports only torch.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm(
    input: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance (divide by N) and
    eps inside the square root, as GPT-2 and torch.nn.LayerNorm define it.
    """
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    x = input.to(_compute_dtype(input.dtype))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-LN transformer block's two outputs: (layer_norm(input + residual), input + residual).

    The sum is rounded to the input dtype first (as eager ``x + r`` is), and LayerNorm normalises
    the rounded sum: the fused kernels match this exactly.
    """
    summed = input + residual
    return layer_norm(summed, normalized_shape, weight, bias, eps), summed
