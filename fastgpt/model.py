"""The GPT-2 family on fastgpt's fused kernels, in one file (in the spirit of nanoGPT's model.py).

    model = GPT(GPTConfig.preset("gpt2"))           # or GPT.from_pretrained("gpt2") if it is cached
    logits, _ = model(idx)                           # (B, T, vocab) logits for every position
    _, loss = model(idx, targets)                    # training: the full logits are never held
    out = model.generate(idx, max_new_tokens=50, temperature=0.8, top_k=40)

What differs from a textbook GPT-2, and why:

* The residual add is fused into the LayerNorm that follows it. A pre-LN block is
  ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``: every residual add is immediately followed by a
  LayerNorm (the next block's ``ln_1`` or the final ``ln_f``). ``F.add_layer_norm(delta, x)``
  returns ``(ln(x + delta), x + delta)`` in one pass over memory, so the model carries the residual
  stream ``x`` together with the *pending* output ``delta`` of the last sublayer, and each LayerNorm
  absorbs the add before it.
* The LayerNorm outputs are not kept for the backward. Each feeds a matmul (c_attn, c_fc) that
  would keep it for its weight gradient; ``F.add_layer_norm_linear`` runs the LayerNorm and the
  matmul as one op that keeps the LayerNorm's input (kept anyway) and recomputes its output in
  the backward.
* The MLP's first linear runs without its bias, and ``F.bias_gelu_linear`` adds the bias inside
  the GELU (one pass instead of two; its backward also yields the bias gradient) and runs
  ``c_proj`` on the result without keeping it: the backward recomputes the GELU from its input.
* Attention's output projection keeps, for its backward, the attention output itself (which the
  attention keeps anyway) rather than a heads-merged copy of it (``_MergeHeadsLinear``).
  With the two lines above, a block keeps 10 activations of n_embd per token for its backward
  where autograd alone would keep 17 (``tests/test_model.py`` counts them).
* The output projection is the token embedding itself (weight tying, as GPT-2), and the loss is
  ``F.linear_cross_entropy(h, wte.weight, targets)``: the (B·T, vocab) logits never exist whole
  during training, which is most of a small GPT's activation memory.

Weights load from transformers' ``GPT2LMHeadModel`` (``GPT.from_hf``), from a local Hugging Face
cache or safetensors file (``GPT.from_pretrained``), and save/load as safetensors + JSON
(``save``/``load``). Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastgpt import functional as F
from fastgpt.ops import _linear

__all__ = ["GPT", "GPTConfig", "KVCache"]


# ---- configuration ----------------------------------------------------------------------------


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT. Defaults are GPT-2 small (124M)."""

    block_size: int = 1024  # longest sequence: the number of learned positions
    vocab_size: int = 50257  # GPT-2's BPE vocabulary (256 for a byte-level model)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on embeddings, attention probabilities and both residual paths
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2 (False: a bit faster, as good)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    # The four released GPT-2 sizes; anything else is a custom config: GPTConfig(n_layer=2, ...).
    PRESETS = {
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A released GPT-2 size by name, with any field overridden (e.g. ``dropout=0.1``)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**d)


# ---- the KV cache -----------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to block_size.

    ``k[layer]`` and ``v[layer]`` are (B, n_head, block_size, head_dim); positions [0, pos) are
    filled. A decoding step writes its key/value at ``pos`` and attends over [0, pos + 1).
    """

    def __init__(self, config: GPTConfig, batch: int, device, dtype):
        shape = (batch, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # number of positions filled


# ---- the blocks -------------------------------------------------------------------------------


def _residual_layer_norm(ln: nn.LayerNorm, delta: torch.Tensor | None, x: torch.Tensor):
    """Add the pending sublayer output ``delta`` into the residual stream ``x`` and normalise.

    Returns ``(ln(x + delta), x + delta)`` in one fused pass; ``delta is None`` (nothing pending,
    only before the first block) is a plain LayerNorm.
    """
    if delta is None:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps), x
    return F.add_layer_norm(delta, x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _residual_norm_linear(ln, delta, x, weight, bias):
    """As ``_residual_layer_norm``, then the matmul that reads the normalised stream:
    ``(linear(ln(x + delta), weight, bias), x + delta)``.

    The LayerNorm output is not kept for the backward (which recomputes it from x + delta, kept
    anyway for the LayerNorm's own gradient): one activation of n_embd per token less, twice a
    block.
    """
    if delta is None:
        out = F.layer_norm_linear(x, ln.normalized_shape, ln.weight, ln.bias, weight, bias, ln.eps)
        return out, x
    return F.add_layer_norm_linear(
        delta, x, ln.normalized_shape, ln.weight, ln.bias, weight, bias, ln.eps
    )


class _MergeHeadsLinear(torch.autograd.Function):
    """``linear(y.transpose(1, 2).reshape(B, T, C), weight, bias)`` for y (B, n_head, T, hd).

    Autograd would keep the heads-merged copy of y for the weight gradient, beside y itself,
    which the attention keeps for its own backward. This keeps y and merges the heads again in
    the backward: one copy of T x C values instead of holding it through the step.
    """

    @staticmethod
    def forward(ctx, y, weight, bias):
        B, H, T, hd = y.shape
        ctx.backend = _linear.backend_for(y, weight, bias)
        merged = y.transpose(1, 2).reshape(B, T, H * hd)
        out = _linear.linear_forward(merged, weight, bias, ctx.backend)
        ctx.save_for_backward(y, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        y, weight = ctx.saved_tensors
        B, H, T, hd = y.shape
        need = ctx.needs_input_grad
        dy, dweight, dbias = _linear.linear_backward(
            dout,
            weight,
            lambda: y.transpose(1, 2).reshape(B * T, H * hd),  # the heads merged again
            need[0],
            need[1],
            ctx.has_bias and need[2],
            ctx.backend,
        )
        if dy is not None:
            dy = dy.view(B, T, H, hd).transpose(1, 2)
        return dy, dweight, dbias


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection.

    ``forward`` takes the projection's output, ``c_attn(h)``: the block runs ``c_attn`` together
    with the LayerNorm before it (``_residual_norm_linear``).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, qkv: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        B, T, C3 = qkv.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) tensors
        q, k, v = qkv.view(B, T, 3, self.n_head, C3 // (3 * self.n_head)).permute(2, 0, 3, 1, 4)
        if cache is not None:
            # Write this step's keys/values after the cached ones and attend over all of them.
            # is_causal with fewer queries than keys is bottom-right aligned (the last query sees
            # every key), which is exactly "query i is token pos + i".
            end = cache.pos + T
            cache.k[layer][:, :, cache.pos : end] = k
            cache.v[layer][:, :, cache.pos : end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        # heads side by side again, then c_proj
        y = _MergeHeadsLinear.apply(y, self.c_proj.weight, self.c_proj.bias)
        return self.resid_dropout(y) if self.dropout > 0 else y


class MLP(nn.Module):
    """Linear -> GELU (tanh, as GPT-2) -> Linear, the first bias fused into the GELU.

    ``forward`` takes ``h @ c_fc.weight.T``, the first matmul without its bias: the block runs it
    together with the LayerNorm before it (``_residual_norm_linear``).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # gelu(u + c_fc.bias) then c_proj, with the GELU output recomputed in the backward
        # instead of kept: it is the widest activation of the block (4 * n_embd per token).
        y = F.bias_gelu_linear(
            u, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias, approximate="tanh"
        )
        return self.dropout(y) if self.dropout.p > 0 else y


class Block(nn.Module):
    """A pre-LN transformer block: ``x += attn(ln_1(x)); x += mlp(ln_2(x))``.

    It takes the residual stream ``x`` and the previous sublayer's output ``delta`` not yet added
    to it, and returns the same pair: its own MLP output is left pending for whatever LayerNorm
    comes next (the next block's ln_1 or the final ln_f), which fuses the add.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, delta=None, cache: KVCache | None = None, layer: int = 0):
        attn, mlp = self.attn, self.mlp
        # x += delta; qkv = c_attn(ln_1(x))
        qkv, x = _residual_norm_linear(self.ln_1, delta, x, attn.c_attn.weight, attn.c_attn.bias)
        # x += attn(qkv); u = ln_2(x) @ c_fc.weight.T (c_fc's bias goes into the MLP's GELU)
        u, x = _residual_norm_linear(self.ln_2, attn(qkv, cache, layer), x, mlp.c_fc.weight, None)
        return x, mlp(u)  # x, and the MLP output still to be added


# ---- the model --------------------------------------------------------------------------------


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, ``n_layer`` pre-LN blocks, final LayerNorm,
    and the token embedding reused as the output projection (weight tying).

    Parameter names follow nanoGPT and transformers (``transformer.h.0.attn.c_attn.weight``, ...),
    except that there is no separate ``lm_head``: the tied weight is ``transformer.wte.weight``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        # Not a parameter, but it should follow .to(device) and never be saved.
        self.register_buffer("pos", torch.arange(config.block_size), persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual projection gets std 0.02 / sqrt(2 * n_layer), so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (as GPT-2 papers count)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # -- forward --------------------------------------------------------------------------------

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final LayerNorm's output, (B, T, n_embd): what the output projection reads."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {start + T} exceeds block_size {self.config.block_size}"
            )
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(self.pos[start : start + T])
        if self.config.dropout > 0:
            x = tr.drop(x)
        delta = None
        for layer, block in enumerate(tr.h):
            x, delta = block(x, delta, cache, layer)
        h, _ = _residual_layer_norm(tr.ln_f, delta, x)
        if cache is not None:
            cache.pos += T
        return h

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """``(logits, loss)`` for token ids ``idx`` (B, T).

        Without targets: ``(logits, None)`` with logits for every position, (B, T, vocab_size).
        With targets (B, T), the next token at each position, -100 where ignored:
        ``(None, loss)``, the mean cross-entropy. The logits are not returned then: the loss
        comes from ``linear_cross_entropy``, which never materialises them (that is the point).
        """
        h = self.hidden_states(idx)
        wte = self.transformer.wte.weight
        if targets is None:
            return F.linear(h, wte), None
        loss = F.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), wte, targets.reshape(-1), ignore_index=-100
        )
        return None, loss

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T) and return (B, T + new).

        ``temperature == 0`` picks the most likely token (greedy). ``top_k`` keeps the k likeliest
        tokens, ``top_p`` the smallest set whose probability reaches p (nucleus sampling).

        With the KV cache (default) the prompt is encoded once and each new token costs one
        query against the cached keys. Learned absolute positions cannot slide, so once the
        sequence outgrows block_size every further step re-encodes the last block_size tokens,
        exactly as generation without a cache does (nanoGPT crops the same way).
        """
        was_training = self.training
        self.eval()
        bs = self.config.block_size
        cache = None
        try:
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = self._last_logits(idx[:, -bs:], None)
                elif cache is not None and cache.pos < bs:
                    logits = self._last_logits(idx[:, -1:], cache)  # one new token
                else:  # the prompt, or a window that no longer fits: (re-)encode it
                    dtype = self.transformer.wte.weight.dtype
                    cache = KVCache(self.config, idx.shape[0], idx.device, dtype)
                    logits = self._last_logits(idx[:, -bs:], cache)
                idx = torch.cat([idx, _sample(logits, temperature, top_k, top_p, generator)], 1)
        finally:
            self.train(was_training)
        return idx

    def _last_logits(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        h = self.hidden_states(idx, cache)[:, -1, :]  # only the last position is needed
        return F.linear(h, self.transformer.wte.weight).float()

    # -- weights: transformers, Hugging Face cache, safetensors ---------------------------------

    @classmethod
    def from_hf(cls, model_or_state_dict, config: GPTConfig | None = None) -> GPT:
        """A GPT with the weights of a transformers ``GPT2LMHeadModel`` (or ``GPT2Model``), or of
        its state dict.

        transformers stores GPT-2's linears as ``Conv1D`` with (in, out) weights: they are
        transposed here. Its ``attn.bias``/``attn.masked_bias`` buffers (the causal mask) are
        ignored. With a model, the config comes from ``model.config``; with a bare state dict,
        from ``config`` or, failing that, from the shapes (n_head = n_embd / 64, GPT-2's head size).
        """
        hf_config = getattr(model_or_state_dict, "config", None)
        if isinstance(model_or_state_dict, nn.Module):
            sd = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, dict):
            sd = model_or_state_dict
        else:
            raise TypeError(
                "GPT.from_hf takes a transformers GPT2LMHeadModel or its state dict, got "
                f"{type(model_or_state_dict).__name__}"
            )
        if config is None and hf_config is not None:
            config = config_from_hf(hf_config)
        sd = _convert_hf_state_dict(sd)
        if config is None:
            config = _infer_config(sd)
        model = cls(config)
        model._load_checked(sd, "the transformers state dict")
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str, **config_overrides) -> GPT:
        """Load GPT-2 weights that are already on this machine; nothing is downloaded.

        ``name_or_path`` is one of: a folder saved by ``GPT.save``; a folder or ``.safetensors``
        file in Hugging Face's layout (``config.json`` beside it gives n_head and eps); or a model
        name ("gpt2", "openai-community/gpt2-medium", ...) looked up in the local Hugging Face
        cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub). Only safetensors weights
        are read: a checkpoint that only has pickled ``pytorch_model.bin`` is refused.
        ``config_overrides`` (e.g. ``dropout=0.1``) apply on top of the stored config.
        """
        path = _resolve_pretrained(name_or_path)
        if os.path.isdir(path) and _is_fastgpt_dir(path):
            return cls.load(path, **config_overrides)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        files = [path] if os.path.isfile(path) else _hf_weight_files(path)
        sd = {}
        for f in files:
            sd.update(_read_safetensors(f))
        config = None
        cfg_file = os.path.join(folder, "config.json")
        if os.path.isfile(cfg_file):
            config = config_from_hf(_read_json(cfg_file))
        sd = _convert_hf_state_dict(sd)
        if config is None:
            config = _infer_config(sd)
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        model = cls(config)
        model._load_checked(sd, path)
        return model

    def save(self, directory: str) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        meta = {"model_type": _MODEL_TYPE, "config": self.config.to_dict()}
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, directory: str, map_location="cpu", **config_overrides) -> GPT:
        """The model ``save`` wrote into ``directory`` (weights checked against the config)."""
        cfg_file = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{directory}: no config.json (not a GPT.save folder)")
        meta = _read_json(cfg_file)
        if not isinstance(meta, dict) or meta.get("model_type") != _MODEL_TYPE:
            raise ValueError(
                f"{cfg_file}: not a fastgpt GPT config (model_type should be {_MODEL_TYPE!r})"
            )
        config = GPTConfig.from_dict({**meta.get("config", {}), **config_overrides})
        model = cls(config)
        sd = _read_safetensors(os.path.join(directory, "model.safetensors"))
        model._load_checked(sd, directory)
        return model.to(map_location)

    def _load_checked(self, sd: dict, source: str) -> None:
        """load_state_dict with every disagreement spelled out (missing, extra, wrong shape)."""
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = [
            f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
            for k in own
            if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or wrong:
            lines = [f"checkpoint {source} does not match GPT({self.config}):"]
            if missing:
                lines.append(f"  missing: {_short(missing)}")
            if unexpected:
                lines.append(f"  unexpected: {_short(unexpected)}")
            if wrong:
                lines.append(f"  wrong shape: {_short(wrong)}")
            raise ValueError("\n".join(lines))
        with torch.no_grad():
            for k, t in own.items():
                if not sd[k].is_floating_point():
                    raise ValueError(f"checkpoint {source}: {k} has dtype {sd[k].dtype}")
                t.copy_(sd[k])


_MODEL_TYPE = "fastgpt-gpt"


def _short(items: list, n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ---- sampling ---------------------------------------------------------------------------------


def _sample(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    """One token id per row of (B, V) fp32 logits."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


# ---- Hugging Face conversion helpers ----------------------------------------------------------

# transformers' Conv1D stores (in, out) weights; nn.Linear stores (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # the causal-mask buffers


def config_from_hf(hf) -> GPTConfig:
    """GPTConfig from a transformers ``GPT2Config`` (or its config.json as a dict)."""
    get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
    act = get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh"):
        raise ValueError(f"GPT computes GELU-tanh; this checkpoint uses activation {act!r}")
    if get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported by fastgpt.GPT")
    if get("scale_attn_weights", True) is False:
        raise ValueError("scale_attn_weights=False is not supported by fastgpt.GPT")
    inner = get("n_inner", None)
    if inner is not None and inner != 4 * get("n_embd"):
        raise ValueError(f"n_inner={inner} is not supported (fastgpt.GPT uses 4 * n_embd)")
    return GPTConfig(
        block_size=get("n_positions"),
        vocab_size=get("vocab_size"),
        n_layer=get("n_layer"),
        n_head=get("n_head"),
        n_embd=get("n_embd"),
        layer_norm_eps=get("layer_norm_epsilon", 1e-5),
    )


def _convert_hf_state_dict(sd: dict) -> dict:
    """transformers GPT-2 names and layouts -> GPT's."""
    out = {}
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(t).__name__}, not a tensor")
        k = key.removeprefix("transformer.")
        if _IGNORED.search(k):
            continue
        if k == "lm_head.weight":
            continue  # tied to wte (checked below)
        if k.endswith(_CONV1D):
            if t.dim() != 2:
                raise ValueError(f"{key}: a Conv1D weight must be 2-D, got {list(t.shape)}")
            t = t.t()
        out["transformer." + k] = t
    head = sd.get("lm_head.weight")
    wte = out.get("transformer.wte.weight")
    tied = head is None or wte is None or head.data_ptr() == wte.data_ptr()
    if not tied and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise ValueError("lm_head.weight differs from wte.weight: GPT ties them")
    return out


def _infer_config(sd: dict) -> GPTConfig:
    try:
        vocab, n_embd = sd["transformer.wte.weight"].shape
        block = sd["transformer.wpe.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a GPT-2 checkpoint: it has no {e.args[0]}") from None
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    return GPTConfig(
        block_size=block,
        vocab_size=vocab,
        n_layer=len(layers),
        n_head=max(1, n_embd // 64),
        n_embd=n_embd,
        bias="transformer.ln_f.bias" in sd,
    )


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_safetensors(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("loading weights needs safetensors: pip install safetensors") from None
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None


def _is_fastgpt_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    meta = _read_json(cfg)
    return isinstance(meta, dict) and meta.get("model_type") == _MODEL_TYPE


def _hf_weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("pytorch_model.bin", "model.pt")):
        raise ValueError(
            f"{folder} has only pickled PyTorch weights; fastgpt never unpickles checkpoints. "
            "Convert them to model.safetensors first."
        )
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _hub_cache() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def _resolve_pretrained(name_or_path: str) -> str:
    """A local file or folder for a path or a cached Hugging Face model name."""
    if os.path.exists(name_or_path):
        return name_or_path
    cache = _hub_cache()
    names = [name_or_path]
    if "/" not in name_or_path:  # the GPT-2 checkpoints moved under openai-community/
        names.append(f"openai-community/{name_or_path}")
    tried = []
    for name in names:
        repo = os.path.join(cache, "models--" + name.replace("/", "--"))
        tried.append(repo)
        snapshots = os.path.join(repo, "snapshots")
        if not os.path.isdir(snapshots):
            continue
        ref = os.path.join(repo, "refs", "main")
        if os.path.isfile(ref):
            with open(ref) as f:
                snap = os.path.join(snapshots, f.read().strip())
            if os.path.isdir(snap):
                return snap
        revs = sorted(os.listdir(snapshots))
        if revs:
            return os.path.join(snapshots, revs[-1])
    raise FileNotFoundError(
        f"GPT weights {name_or_path!r} are not on this machine: no such file or folder, and not "
        f"in the Hugging Face cache (looked for {', '.join(tried)}). fastgpt never downloads; "
        "fetch them with `huggingface-cli download` where there is network, or pass a path to a "
        "safetensors file or folder."
    )
