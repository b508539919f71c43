"""The two hooks transformers offers that ``fastgpt.patch`` plugs into (imported only then).

* ``AttentionInterface``: attention modules look their kernel up by ``config._attn_implementation``;
  ``register()`` adds ``"fastgpt"`` (with sdpa's mask builder, so causal batches without padding
  pass no mask and take the fused causal kernel).
* ``model.loss_function``: the causal-LM loss, computed with ``fastgpt.functional.cross_entropy``.
"""

from __future__ import annotations

import torch

from fastgpt import functional as F


def attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' attention-function contract: (B, H, T, D) in, ((B, T, H, D), None) out.

    Mirrors transformers' sdpa_attention_forward, grouped key/value heads included (as torch's
    ``enable_gqa``); anything else outside GPT-2-style attention (position bias, softcap, sliding
    windows, paged caches) is handed to it.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = ("position_bias", "softcap", "sliding_window", "cache", "s_aux")
    if any(kwargs.get(k) is not None for k in special):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    t_q, t_k = query.shape[2], key.shape[2]
    is_causal = t_q > 1 and attention_mask is None and is_causal
    if is_causal and t_k > t_q:
        # transformers' sdpa path means top-left alignment here (an empty static cache)
        key, value = key[:, :, :t_q], value[:, :, :t_q]
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attention_mask,
        dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=getattr(module, "num_key_value_groups", 1) > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def causal_lm_loss(
    logits,
    labels,
    vocab_size,
    num_items_in_batch=None,
    ignore_index=-100,
    shift_labels=None,
    **kwargs,
):
    """transformers' ForCausalLMLoss with fastgpt's cross-entropy (same shift, same reduction)."""
    logits = logits.float()  # as transformers does: the loss is fp32 whatever the logits are
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, shift_labels, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("fastgpt", attention)
    AttentionMaskInterface.register("fastgpt", sdpa_mask)
    _registered = True
