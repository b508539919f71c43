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


# ---- linear -----------------------------------------------------------------------------------


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """input·weightᵀ + bias, computed in fp32 (float64 stays float64) and rounded once."""
    dt = _compute_dtype(input.dtype)
    y = input.to(dt) @ weight.to(dt).t()
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(input.dtype)


# ---- GELU -------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU. "none": 0.5·x·(1 + erf(x/√2));
    "tanh" (GPT-2's): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    x = input.to(_compute_dtype(input.dtype))
    if approximate == "tanh":
        y = 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    elif approximate == "none":
        y = 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))
    else:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return y.to(input.dtype)


def bias_gelu(input: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(input + bias), the sum kept in fp32 (not rounded) and the result rounded once."""
    x = input.to(_compute_dtype(input.dtype)) + bias.to(_compute_dtype(input.dtype))
    return gelu(x, approximate).to(input.dtype)


# ---- attention --------------------------------------------------------------------------------


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where query i may attend key j.

    Bottom-right aligned, as flash-attention does: the last query sees every key, so with a KV
    cache (t_q < t_k) query i is token t_k - t_q + i of the sequence. With t_q == t_k this is the
    usual lower triangle.
    """
    i = torch.arange(t_q, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    return j <= i + (t_k - t_q)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + mask)·V over (..., T, D) tensors, the T×T scores materialised.

    scale defaults to 1/√D. A boolean attn_mask keeps the True positions, a float one is added
    to the scores. Rows with no visible key (possible with a mask, or is_causal and t_q > t_k)
    give zeros, as flash-attention does, instead of NaN.
    """
    cdt = _compute_dtype(query.dtype)
    q, k, v = query.to(cdt), key.to(cdt), value.to(cdt)
    scale = 1.0 / (q.shape[-1] ** 0.5) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    keep = None
    if is_causal:
        keep = causal_mask(q.shape[-2], k.shape[-2], q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            scores = scores + attn_mask.to(cdt)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0.0:
        drop = torch.rand(p.shape, generator=generator, device=p.device) < dropout_p
        p = p.masked_fill(drop, 0.0) / (1.0 - dropout_p)
    return (p @ v).to(query.dtype)


# ---- cross-entropy ----------------------------------------------------------------------------


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """torch.nn.functional.cross_entropy, written out.

    Per row: loss = logsumexp(z) − z[target]; with label smoothing ε over C classes the target
    becomes (1 − ε)·onehot + ε/C, so loss = (1 − ε)·(lse − z[t]) + ε/C·Σ_c (lse − z_c), each
    class term scaled by its weight. "mean" divides by the summed weight of the non-ignored
    targets (their count without weights), as torch does. Class-probability targets (a float
    target shaped like the input) are supported too.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    cdt = _compute_dtype(input.dtype)
    z, target = cross_entropy_rows(input.to(cdt), target)
    n_classes = z.shape[-1]
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    w = torch.ones(n_classes, dtype=cdt, device=z.device) if weight is None else weight.to(cdt)
    if target.is_floating_point():  # class probabilities
        probs = target.to(cdt) * (1 - label_smoothing) + label_smoothing / n_classes
        loss = -(probs * logp * w).sum(-1)
        if reduction == "mean":
            return (loss.sum() / loss.shape[0]).to(input.dtype)
        return _reduce(loss, reduction, input.dtype, cross_entropy_loss_shape(input))
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    if bool(((safe_t < 0) | (safe_t >= n_classes)).any()):
        raise IndexError(
            f"cross_entropy: target out of range [0, {n_classes}) and not ignore_index"
        )
    w_t = w[safe_t] * valid
    nll = -logp.gather(-1, safe_t[:, None])[:, 0] * w_t
    loss = nll
    if label_smoothing > 0:  # skipped at 0: -inf logits would make 0 * inf = nan here
        smooth = -(logp * w).sum(-1) * valid
        loss = (1 - label_smoothing) * nll + (label_smoothing / n_classes) * smooth
    if reduction == "mean":
        # torch: 0/0 = nan for an all-ignored batch, and a zero gradient (not nan) there
        total = w_t.sum()
        mean = loss.sum() / torch.where(total == 0, torch.ones_like(total), total)
        return torch.where(total == 0, torch.full_like(mean, float("nan")), mean).to(input.dtype)
    return _reduce(loss, reduction, input.dtype, cross_entropy_loss_shape(input))


def cross_entropy_rows(
    input: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy's input forms as rows of logits: (C,) (one unbatched row), (N, C) or
    (N, C, d1, ...) -> (R, C), the class dim last, and the target to match: (R,) class indices,
    or (R, C) class probabilities. Also what fastgpt.functional hands the kernels."""
    if input.dim() == 1:  # a single unbatched row
        return input[None], target[None]
    if input.dim() > 2:  # (N, C, d1, ...) -> (N·d1·..., C)
        n_classes = input.shape[1]
        input = input.movedim(1, -1).reshape(-1, n_classes)
        if target.is_floating_point():
            target = target.movedim(1, -1).reshape(-1, n_classes)
        else:
            target = target.reshape(-1)
    return input, target


def cross_entropy_loss_shape(input: torch.Tensor) -> tuple[int, ...]:
    """The shape of cross_entropy's unreduced loss (and of its class-index target)."""
    if input.dim() == 1:
        return ()
    return (input.shape[0], *input.shape[2:])


def _reduce(loss, reduction, dtype, shape):
    if reduction == "sum":
        return loss.sum().to(dtype)
    return loss.reshape(shape).to(dtype)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """cross_entropy(input @ linear_weightᵀ + linear_bias, target): the (N, V) logits exist whole
    here; the kernels never materialise them."""
    logits = input @ linear_weight.transpose(-2, -1)
    if linear_bias is not None:
        logits = logits + linear_bias
    return cross_entropy(
        logits,
        target,
        weight,
        -100 if ignore_index is None else ignore_index,
        reduction,
        label_smoothing,
    )
