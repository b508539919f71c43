"""Stand-ins for ``torch``, ``torch.nn`` and ``torch.nn.functional`` in which the functions that
fastgpt has twins for are fastgpt's (used by ``fastgpt.patch`` to rebind a module's forward).

The adapters keep torch's exact signatures and semantics: whatever fastgpt's twin does not take
(torch's legacy ``size_average``/``reduce``, ``is_causal`` with Tq != Tk, which torch aligns
top-left) goes to torch's own function, so a patched module computes what it did.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as TF

from fastgpt import functional as F


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def gelu(input, approximate="none"):
    return F.gelu(input, approximate=approximate)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    if is_causal and query.shape[-2] != key.shape[-2]:
        # torch's causal mask is top-left aligned when Tq != Tk, fastgpt's bottom-right
        return TF.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa=enable_gqa
    )


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    if size_average is not None or reduce is not None:  # torch's deprecated arguments
        return TF.cross_entropy(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )
    return F.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)


TWINS = {
    "layer_norm": layer_norm,
    "gelu": gelu,
    "scaled_dot_product_attention": scaled_dot_product_attention,
    "cross_entropy": cross_entropy,
}


def _copy(module: types.ModuleType, **override) -> types.ModuleType:
    shim = types.ModuleType(module.__name__, module.__doc__)
    shim.__dict__.update(vars(module))
    shim.__dict__.update(override)
    return shim


@functools.cache
def _modules() -> dict[int, types.ModuleType]:
    functional = _copy(TF, **TWINS)
    nn = _copy(torch.nn, functional=functional)
    return {id(TF): functional, id(torch.nn): nn, id(torch): _copy(torch, nn=nn)}


def replacement(value):
    """What a global bound to ``value`` (torch, torch.nn, F, or F.<twin>) becomes."""
    mods = _modules()
    if id(value) in mods:
        return mods[id(value)]
    for name, twin in TWINS.items():
        if value is getattr(TF, name):
            return twin
    return value
