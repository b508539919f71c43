"""Twins of ``torch.nn.functional``: same names, signatures and behaviour, fused kernels inside.

Each function checks its arguments the way torch does, decides whether a fast kernel covers the
call (device, dtype, arguments), and otherwise runs ``fastgpt.reference``: slower, never wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastgpt import _backend, reference
from fastgpt.ops._linear import FEW_ROWS
from fastgpt.ops.attention import AttentionFunction
from fastgpt.ops.cross_entropy import REDUCTIONS, CrossEntropyFunction
from fastgpt.ops.gelu import GeluFunction, GeluLinearFunction
from fastgpt.ops.layer_norm import LayerNormFunction, LayerNormLinearFunction
from fastgpt.ops.linear import LinearFunction
from fastgpt.ops.linear_cross_entropy import LinearCrossEntropyFunction

__all__ = [
    "linear",
    "layer_norm",
    "add_layer_norm",
    "layer_norm_linear",
    "add_layer_norm_linear",
    "gelu",
    "bias_gelu",
    "bias_gelu_linear",
    "scaled_dot_product_attention",
    "cross_entropy",
    "linear_cross_entropy",
]


def _normalized_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)


# ---- linear (kernel path: fastgpt/ops/linear.py) ----------------------------------------------


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.nn.functional.linear``: input (..., K) · weight (N, K)ᵀ + bias (N,).

    On the CPU backend ``fastgpt::matmul`` runs fp32 products, which its kernel sends to oneDNN
    where MKL (ATen's default) would run slower kernels (csrc/gemm.h), and products of up to
    ``FEW_ROWS`` input rows (a decode step) in every dtype, which it computes itself, bound by
    reading the weight once (csrc/linear.cpp); gradients are autograd's formulas on the same op.
    Everything else is torch's own ``F.linear``, with its values and errors: other dtypes and
    devices have no faster product to offer (torch already runs bf16 on oneDNN, CUDA on cuBLAS),
    and other forms (a 1-D weight, a broadcast bias, mixed dtypes) are torch's to handle.
    """
    backend = _backend.backend_for(input)
    if backend != "reference" and not (
        backend == "cpu"
        and (
            input.dtype == torch.float32
            or (input.dtype in _HALF_DTYPES and math.prod(input.shape[:-1]) <= FEW_ROWS)
        )
    ):
        return torch.nn.functional.linear(input, weight, bias)
    why = _backend.unsupported(backend, (weight, bias), input)
    if not why and not (
        input.dim() >= 1
        and weight.dim() == 2
        and weight.shape[1] == input.shape[-1]
        and (bias is None or tuple(bias.shape) == (weight.shape[0],))
    ):
        why = "shapes other than (..., K) input, (N, K) weight, (N,) bias"
    if why:
        _backend.fallback("linear", why)
        return torch.nn.functional.linear(input, weight, bias)
    return _backend.apply(LinearFunction, input, weight, bias, backend)


def _check_layer_norm_args(name, input, normalized_shape, weight, bias, residual=None):
    shape = _normalized_shape(normalized_shape)
    if len(shape) == 0 or tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise RuntimeError(
            f"{name}: normalized_shape {list(shape)} does not match the trailing dims of the "
            f"input of shape {list(input.shape)}"
        )
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise RuntimeError(
                f"{name}: {pname} of shape {list(p.shape)} must have the normalized_shape "
                f"{list(shape)}"
            )
    if residual is not None and residual.shape != input.shape:
        raise RuntimeError(
            f"{name}: residual of shape {list(residual.shape)} must match the input of shape "
            f"{list(input.shape)}"
        )
    return shape


def _layer_norm(name, input, residual, shape, weight, bias, eps):
    """Run the kernel on (rows, prod(normalized_shape)) views; None if the reference must."""
    backend = _backend.backend_for(input)
    why = _backend.unsupported(backend, (residual, weight, bias), input)
    n = math.prod(shape)
    if not why and n == 0:
        why = "empty normalized_shape"
    if why:
        _backend.fallback(name, why)
        return None
    # Reshapes only where they change something: each costs ~1 us, as much as the kernel of a
    # decode step's one 768-wide row.
    rows_already = input.dim() == 2 and input.shape[1] == n
    x2, r2 = (
        None if t is None else (t if rows_already else t.reshape(-1, n)).contiguous()
        for t in (input, residual)
    )
    w, b = (
        None if t is None else (t if t.dim() == 1 else t.reshape(n)).contiguous()
        for t in (weight, bias)
    )
    out = _backend.apply(LayerNormFunction, x2, r2, w, b, float(eps), backend)
    if rows_already:
        return out
    if residual is None:
        return out.view(input.shape)
    y, summed = out
    return y.view(input.shape), summed.view(input.shape)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` with a fused forward and a one-pass backward."""
    shape = _check_layer_norm_args("layer_norm", input, normalized_shape, weight, bias)
    out = _layer_norm("layer_norm", input, None, shape, weight, bias, eps)
    if out is None:
        return reference.layer_norm(input, shape, weight, bias, eps)
    return out


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(input + residual), input + residual)`` in one pass over memory.

    The pre-LN transformer block's pattern: ``h = h + attn(...)`` followed by ``ln(h)``. The sum
    is rounded to the input dtype before it is normalised, exactly as the eager pair does.
    """
    shape = _check_layer_norm_args(
        "add_layer_norm", input, normalized_shape, weight, bias, residual
    )
    out = _layer_norm("add_layer_norm", input, residual, shape, weight, bias, eps)
    if out is None:
        return reference.add_layer_norm(input, residual, shape, weight, bias, eps)
    return out


def _check_linear_weight(name, input, weight):
    """weight (N, C) for an input (..., C), the matmul at the end of a fused op."""
    if weight.dim() != 2 or input.dim() == 0 or weight.shape[1] != input.shape[-1]:
        raise RuntimeError(
            f"{name}: weight of shape {list(weight.shape)} must be (out_features, "
            f"{input.shape[-1] if input.dim() else '?'}) for an input of shape {list(input.shape)}"
        )


def _layer_norm_linear(name, input, residual, normalized_shape, weight, bias, lw, lb, eps):
    shape = _check_layer_norm_args(name, input, normalized_shape, weight, bias, residual)
    _check_linear_weight(name, input, lw)
    if lb is not None and tuple(lb.shape) != (lw.shape[0],):
        raise RuntimeError(
            f"{name}: linear_bias of shape {list(lb.shape)} must be ({lw.shape[0]},), "
            "the weight's out_features"
        )
    backend = _backend.backend_for(input)
    why = _backend.unsupported(backend, (residual, weight, bias, lw, lb), input)
    if not why and len(shape) != 1:
        why = "normalized_shape of more than one dim"
    if not why and shape[0] == 0:
        why = "empty normalized_shape"
    if why:
        _backend.fallback(name, why)
        if residual is None:
            y = reference.layer_norm(input, shape, weight, bias, eps)
            return torch.nn.functional.linear(y, lw, lb)
        y, summed = reference.add_layer_norm(input, residual, shape, weight, bias, eps)
        return torch.nn.functional.linear(y, lw, lb), summed
    n = shape[0]
    x2 = input.reshape(-1, n).contiguous()
    r2 = None if residual is None else residual.reshape(-1, n).contiguous()
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    out = _backend.apply(LayerNormLinearFunction, x2, r2, w, b, float(eps), lw, lb, backend)
    out_shape = (*input.shape[:-1], lw.shape[0])
    if residual is None:
        return out.view(out_shape)
    out, summed = out
    return out.view(out_shape), summed.view(input.shape)


def layer_norm_linear(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``linear(layer_norm(input), linear_weight, linear_bias)`` without keeping the LayerNorm
    output for the backward.

    Same values and gradients as the two calls. Autograd would keep the LayerNorm output (the
    matmul's input) beside ``input``; this keeps only ``input`` and the row statistics and
    recomputes the LayerNorm output in the backward (one pass over it, bit for bit the same).
    ``linear_weight`` (N, C) for an input (..., C); ``linear_bias`` (N,) or None.
    """
    return _layer_norm_linear(
        "layer_norm_linear",
        input,
        None,
        normalized_shape,
        weight,
        bias,
        linear_weight,
        linear_bias,
        eps,
    )


def add_layer_norm_linear(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(layer_norm(input + residual), linear_weight, linear_bias), input + residual)``:
    ``add_layer_norm`` followed by the matmul it feeds, without keeping the LayerNorm output.

    What a pre-LN block does twice (the sublayer's output added to the residual stream, then
    normalised into the next q/k/v or MLP projection); as ``layer_norm_linear``, the backward
    recomputes the LayerNorm output from the kept sum.
    """
    return _layer_norm_linear(
        "add_layer_norm_linear",
        input,
        residual,
        normalized_shape,
        weight,
        bias,
        linear_weight,
        linear_bias,
        eps,
    )


# ---- GELU (kernel path: fastgpt/ops/gelu.py) --------------------------------------------------


_APPROXIMATIONS = ("none", "tanh")


def _check_approximate(name, approximate):
    if approximate not in _APPROXIMATIONS:
        raise RuntimeError(f"{name}: approximate argument must be either none or tanh.")


def _check_gelu_bias(name, input, bias):
    """bias (C,) for an input (..., C)."""
    if input.dim() == 0 or bias.dim() != 1 or bias.shape[0] != input.shape[-1]:
        raise RuntimeError(
            f"{name}: bias of shape {list(bias.shape)} must be 1-D with the size of the "
            f"input's last dim (input shape {list(input.shape)})"
        )


def _gelu(name, input, bias, approximate):
    """Run the kernel on a contiguous input; None if the reference must."""
    _check_approximate(name, approximate)
    backend = _backend.backend_for(input)
    why = _backend.unsupported(backend, (bias,), input)
    if why:
        _backend.fallback(name, why)
        return None
    b = None if bias is None else bias.contiguous()
    return _backend.apply(GeluFunction, input.contiguous(), b, approximate, backend)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``torch.nn.functional.gelu``: "none" (erf) or "tanh"."""
    out = _gelu("gelu", input, None, approximate)
    return reference.gelu(input, approximate) if out is None else out


def bias_gelu(input: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(input + bias)`` in one pass; the backward also gives the bias gradient.

    bias (C,) is broadcast over the last dim of input (..., C). The sum is kept in fp32 (not
    rounded to the input dtype) and the result rounded once.
    """
    _check_gelu_bias("bias_gelu", input, bias)
    out = _gelu("bias_gelu", input, bias, approximate)
    return reference.bias_gelu(input, bias, approximate) if out is None else out


def bias_gelu_linear(
    input: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    approximate: str = "tanh",
) -> torch.Tensor:
    """``linear(gelu(input + bias), weight, linear_bias)``: an MLP's activation and second
    matmul, without keeping the GELU output for the backward.

    Same values and gradients as the two calls; autograd would save the GELU output (the input
    of the matmul) beside ``input``, and this saves only ``input`` and recomputes the GELU in
    the backward (one elementwise pass). ``bias`` (C,) or None (plain GELU); ``weight`` (N, C);
    ``linear_bias`` (N,) or None.
    """
    if input.dim() == 0:
        raise RuntimeError("bias_gelu_linear: input must have at least one dim")
    if bias is not None:
        _check_gelu_bias("bias_gelu_linear", input, bias)
    _check_linear_weight("bias_gelu_linear", input, weight)
    _check_approximate("bias_gelu_linear", approximate)
    backend = _backend.backend_for(input)
    why = _backend.unsupported(backend, (bias, weight, linear_bias), input)
    if why:
        _backend.fallback("bias_gelu_linear", why)
        g = (
            reference.gelu(input, approximate)
            if bias is None
            else reference.bias_gelu(input, bias, approximate)
        )
        return torch.nn.functional.linear(g, weight, linear_bias)
    b = None if bias is None else bias.contiguous()
    x = input.contiguous()
    return _backend.apply(GeluLinearFunction, x, b, weight, linear_bias, approximate, backend)


# ---- attention (kernel path: fastgpt/ops/attention.py) ----------------------------------------


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on (..., T, D) tensors.

    ``is_causal`` with Tq != Tk is bottom-right aligned, as flash-attention does. Flash attention
    (memory O(T·D), no T×T scores) unless an ``attn_mask`` tensor or an unsupported layout asks
    for the reference path. Dropout draws its seed from torch's default CPU generator, so
    ``torch.manual_seed`` makes it reproducible.

    ``enable_gqa``: grouped-query attention, key and value with fewer heads (dim -3) than the
    query, query head h reading key/value head h // (Hq / Hkv) as in torch. The shared key/value
    heads are read in place, never copied, wherever no mask is given and the batch dims match:
    where no query's visible keys depend on its position (not causal, or a decode step: Tq = 1)
    each group's queries are folded into one sequence over their shared head (one call); a
    causal call with Tq > 1 on the CPU kernels runs once per member of the group, each time on
    one query head per key/value head. Otherwise (a mask, the Triton and reference backends'
    causal calls) each key/value head is repeated for its group first, which costs
    Hq / Hkv - 1 more copies of key and value; the backward sums them back.
    """
    _check_attention_args(query, key, value, dropout_p)
    out_shape = None  # set when the query groups are folded: the shape to unfold to
    if enable_gqa:
        group = _gqa_group(query, key, value)
        if group > 1:
            *lead, h_q, t_q, d = query.shape
            in_place = attn_mask is None and tuple(lead) == key.shape[:-3]
            if in_place and (not is_causal or t_q == 1):
                out_shape = (*lead, h_q, t_q, value.shape[-1])
                query = query.reshape(*lead, h_q // group, group * t_q, d)
                is_causal = False  # a single query (t_q == 1) sees every key either way
            else:
                if in_place and _backend.backend_for(query) == "cpu":
                    out = _attention_per_group_member(
                        query, key, value, group, dropout_p, is_causal, scale
                    )
                    if out is not None:
                        return out
                key = key.repeat_interleave(group, dim=-3)
                value = value.repeat_interleave(group, dim=-3)
    out = _attention(query, key, value, attn_mask, dropout_p, is_causal, scale)
    if out is None:
        out = reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale
        )
    return out if out_shape is None else out.reshape(out_shape)


def _check_attention_args(query, key, value, dropout_p):
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(
            "scaled_dot_product_attention: query, key and value must have at least 2 dims "
            f"(..., T, D), got shapes {list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(
            f"scaled_dot_product_attention: key ({key.shape[-2]}) and value ({value.shape[-2]}) "
            "must have the same sequence length"
        )
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(
            f"scaled_dot_product_attention: query ({query.shape[-1]}) and key ({key.shape[-1]}) "
            "must have the same head dim"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(
            f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}"
        )


def _gqa_group(query, key, value) -> int:
    """How many query heads share each key/value head (enable_gqa), checked."""
    if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
        raise RuntimeError(
            "scaled_dot_product_attention: enable_gqa needs a heads dim (..., H, T, D), got "
            f"shapes {list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
        )
    h_q, h_k, h_v = query.shape[-3], key.shape[-3], value.shape[-3]
    if h_k != h_v or h_q % h_k:
        raise RuntimeError(
            "scaled_dot_product_attention: with enable_gqa, key and value must have the same "
            f"number of heads and it must divide the query's; got query {h_q}, key {h_k}, "
            f"value {h_v} heads"
        )
    return h_q // h_k


def _attention_per_group_member(query, key, value, group, dropout_p, is_causal, scale):
    """Causal grouped-query attention on the CPU kernels without copying key and value: query
    head h = j * group + g reads key/value head j, so for each g the query heads g, group + g,
    2 * group + g, ... line up one to one with the key/value heads. One kernel call per g; the
    outputs are stacked back in head order (and the backward of unbind stacks dq the same way,
    while autograd sums the group's dk and dv).

    Why not repeat the heads, as the other backends do: on the CPU a repeated cache is a fresh
    allocation of group times its size, page-faulted on every call. A 4-row causal step of 32
    query heads on 8 key/value heads of 4096 x 128 spent 37 of its 41 ms making that copy.
    None if the kernels cannot take the call (the caller falls back)."""
    h_kv = key.shape[-3]
    members = query.unflatten(-3, (h_kv, group)).unbind(-3)  # group x (..., Hkv, Tq, D)
    outs = []
    for q in members:
        out = _attention(q, key, value, None, dropout_p, is_causal, scale)
        if out is None:
            return None
        outs.append(out)
    return torch.stack(outs, dim=-3).flatten(-4, -3)


def _attention(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """Run the flash kernel on (B, H, T, D) views; None if the reference must."""
    backend = _backend.backend_for(query)
    why = _backend.unsupported(backend, (key, value), query)
    if not why and attn_mask is not None:
        why = "attn_mask tensor"
    if not why and (query.shape[:-2] != key.shape[:-2] or key.shape != value.shape):
        why = "broadcast batch dims or a value head dim unlike the query's"
    if why:
        _backend.fallback("scaled_dot_product_attention", why)
        return None
    lead, (t_q, d), t_k = query.shape[:-2], query.shape[-2:], key.shape[-2]
    if query.dim() == 4:  # no reshape calls: a decode step is short enough for them to show
        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    else:  # (..., T, D): every leading dim folded into the batch
        n = math.prod(lead)
        shape_q, shape_k = (n, 1, t_q, d), (n, 1, t_k, d)
        q = query.reshape(shape_q).contiguous()
        k = key.reshape(shape_k).contiguous()
        v = value.reshape(shape_k).contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    seed = None
    if dropout_p > 0.0:
        # A tensor, never read out here: under torch.compile the draw is part of the graph.
        # Always a CPU tensor from the CPU generator, whatever torch's default device is (the
        # kernels read it on the host; a CUDA seed would make the Triton launcher sync).
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
    out = _backend.apply(
        AttentionFunction, q, k, v, scale, bool(is_causal), float(dropout_p), seed, 0, backend
    )
    return out if query.dim() == 4 else out.view(query.shape)


# ---- cross-entropy (kernel paths: fastgpt/ops/cross_entropy.py, linear_cross_entropy.py) ------


def _ce_kernel_target(input: torch.Tensor, target: torch.Tensor):
    """(logits (N, V), targets (N,), loss shape for "none") for the kernels, or None when the
    call has a form they do not take (probability targets, mismatched shapes)."""
    if target.is_floating_point() or target.dtype != torch.int64 or input.dim() == 0:
        return None
    shape = reference.cross_entropy_loss_shape(input)
    if tuple(target.shape) != shape:
        return None
    return (*reference.cross_entropy_rows(input, target), shape)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy``: one online pass per row, the gradient written by
    the forward and scaled by the backward (class ``weight`` and probability targets run the
    reference)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    backend = _backend.backend_for(input)
    why = _backend.unsupported(backend, (), input)
    picked = None if why else _ce_kernel_target(input, target)
    if not why and weight is not None:
        why = "class weight"
    elif not why and picked is None:
        why = "probability targets or non-int64 / mismatched target"
    elif not why and (
        input.shape[1 if input.dim() > 1 else 0] == 0 or target.device != input.device
    ):
        why = "no classes or target on another device"
    if why:
        _backend.fallback("cross_entropy", why)
        return reference.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing
        )
    logits, tgt, shape = picked
    loss = _backend.apply(
        CrossEntropyFunction,
        logits.contiguous(),
        tgt.contiguous(),
        int(ignore_index),
        float(label_smoothing),
        REDUCTIONS[reduction],
        backend,
    )
    return loss.view(shape) if reduction == "none" else loss


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
    """``torch.nn.functional.linear_cross_entropy`` (torch 2.13's signature): rows in chunks
    through one reused logits buffer, the (N, V) logits never whole."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    backend = _backend.backend_for(input)
    why = _backend.unsupported(backend, (linear_weight, linear_bias), input)
    if not why and weight is not None:
        why = "class weight"
    elif not why and not (
        input.dim() == 2
        and linear_weight.dim() == 2
        and linear_weight.shape[1] == input.shape[1]
        and linear_weight.shape[0] > 0
        and (linear_bias is None or tuple(linear_bias.shape) == (linear_weight.shape[0],))
        and target.dtype == torch.int64
        and tuple(target.shape) == (input.shape[0],)
        and target.device == input.device
    ):
        why = "shapes other than (N, C) input, (V, C) weight, (N,) int64 target"
    if why:
        _backend.fallback("linear_cross_entropy", why)
        return reference.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    return LinearCrossEntropyFunction.apply(
        input.contiguous(),
        linear_weight.contiguous(),
        None if linear_bias is None else linear_bias.contiguous(),
        target.contiguous(),
        -100 if ignore_index is None else int(ignore_index),
        float(label_smoothing),
        REDUCTIONS[reduction],
        0,
        backend,
    )
