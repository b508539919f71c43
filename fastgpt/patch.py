"""``fastgpt.patch(model)``: swap fastgpt's kernels into a model you already have, in place.

    model = transformers.GPT2LMHeadModel.from_pretrained(...)
    print(fastgpt.patch(model, dry_run=True))   # what would change, and what is left alone
    fastgpt.patch(model)                         # do it; returns the same model object

The work is driven by ``RULES``, a table from a module predicate to a replacement. Nothing copies
a model's forward. Three mechanisms cover the rules:

* **class swap** — the module's class becomes a subclass with one method replaced (for
  ``nn.Linear``, ``nn.LayerNorm`` and ``nn.GELU`` that subclass is simply
  ``fastgpt.nn.Linear``/``LayerNorm``/``GELU``; transformers' ``Conv1D`` gets a forward through
  ``fastgpt.functional.linear``, and its ``GPT2MLP`` one running its GELU and ``c_proj`` as one
  ``bias_gelu_linear``, which keeps the GELU input instead of its output for the backward).
  Parameters, buffers, hooks, state_dict keys and ``isinstance`` all stay as they were.
* **functional rebinding** — a user module whose ``forward`` calls ``torch.nn.functional``'s
  ``layer_norm``/``gelu``/``scaled_dot_product_attention``/``cross_entropy`` (nanoGPT's
  LayerNorm, CausalSelfAttention and GPT do) gets the *same* forward code run with globals in
  which ``torch``/``F`` resolve those names to fastgpt's twins (adapters that keep torch's
  signatures and semantics; anything they do not cover goes to torch's own function).
* **hooks a library offers** — transformers picks attention through ``AttentionInterface``
  (``config._attn_implementation``) and the LM loss through ``model.loss_function``: fastgpt
  registers ``"fastgpt"`` there and points the model at it.

Outputs and gradients equal the unpatched model's (up to float rounding; with dropout active the
random masks differ, as they would between any two attention kernels). What no rule covers, or a
rule refuses (a LayerNorm subclass with its own forward, a transformers model on
flash-attention), is left alone and reported.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

import fastgpt.nn as fnn
from fastgpt import functional as F

__all__ = ["patch", "PatchEntry", "PatchReport", "Rule", "RULES"]

log = logging.getLogger("fastgpt")


# ---- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchEntry:
    """One module the patch looked at: where, what it is, and what replaces it (or why not)."""

    path: str  # dotted module path in the model ("" is the model itself)
    what: str  # what was found, e.g. "torch.nn.LayerNorm"
    replacement: str  # what replaces it; when skipped, why it is left alone
    swapped: bool  # False: left alone


class PatchReport(list):
    """The entries of one ``patch`` call (a list of ``PatchEntry``), printable as a table."""

    @property
    def swapped(self) -> list[PatchEntry]:
        return [e for e in self if e.swapped]

    @property
    def skipped(self) -> list[PatchEntry]:
        return [e for e in self if not e.swapped]

    def __str__(self) -> str:
        rows = [
            f"{'swap' if e.swapped else 'skip'}  {e.path or '<model>'}: {e.what} -> {e.replacement}"
            for e in self
        ]
        return "\n".join(rows) if rows else "nothing to patch"


# ---- the rule table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Modules for which ``matches`` is true get ``apply``; ``refuse`` says why one cannot."""

    what: str  # shown in the report
    replacement: str | Callable[[nn.Module], str]  # shown in the report (may depend on the module)
    matches: Callable[[nn.Module], bool]
    apply: Callable[[nn.Module], None]
    refuse: Callable[[nn.Module], str] = lambda m: ""


def _is_patched(m: nn.Module) -> bool:
    """Already fastgpt's: a swapped class, or a transformers hook already pointing at fastgpt."""
    if getattr(type(m), "_fastgpt_patched", False) or type(m).__module__.startswith("fastgpt"):
        return True
    if _uses_attention_interface(m) and m.config._attn_implementation == "fastgpt":
        return True
    loss = vars(m).get("_loss_function")
    return loss is not None and getattr(loss, "__module__", "") == "fastgpt._hf"


@functools.cache
def _subclass(cls: type, method: str, fn: Callable) -> type:
    """``cls`` with one method replaced, named Fastgpt<cls>; cached so classes are shared."""
    return type(f"Fastgpt{cls.__name__}", (cls,), {method: fn, "_fastgpt_patched": True})


def _swap_class(cls_for: Callable[[nn.Module], type]) -> Callable[[nn.Module], None]:
    def apply(m: nn.Module) -> None:
        m.__class__ = cls_for(m)

    return apply


def _exact_forward(base: type) -> Callable[[nn.Module], bool]:
    """A ``base`` (or subclass) whose forward is still ``base.forward``."""
    return lambda m: isinstance(m, base) and type(m).forward is base.forward


def _own_forward(base: type) -> Callable[[nn.Module], str]:
    def refuse(m):
        if type(m).forward is not base.forward:
            return f"{type(m).__qualname__} overrides forward; left alone"
        return ""

    return refuse


def _twin(base: type, twin: type) -> Callable[[nn.Module], type]:
    """``twin`` itself for an exact ``base``; for a subclass, the subclass with twin's forward."""
    return lambda m: twin if type(m) is base else _subclass(type(m), "forward", twin.forward)


# transformers' activation modules that compute exactly one of F.gelu's two GELUs.
_HF_GELUS = {"NewGELUActivation": "tanh", "GELUTanh": "tanh", "GELUActivation": "none"}


def _is_hf_gelu_class(cls: type) -> bool:
    return cls.__module__ == "transformers.activations" and cls.__name__ in _HF_GELUS


def _hf_gelu(m: nn.Module) -> bool:
    return _is_hf_gelu_class(type(m))


def _hf_gelu_class(m: nn.Module) -> type:
    approximate = _HF_GELUS[type(m).__name__]
    return _subclass(type(m), "forward", _GELU_FORWARDS[approximate])


def _gelu_tanh_forward(self, input):
    return F.gelu(input, approximate="tanh")


def _gelu_erf_forward(self, input):
    return F.gelu(input, approximate="none")


_GELU_FORWARDS = {"tanh": _gelu_tanh_forward, "none": _gelu_erf_forward}


# -- transformers Conv1D (GPT-2's projections): a linear whose weight is stored transposed -------


def _conv1d_class(cls: type) -> bool:
    return cls.__module__ == "transformers.pytorch_utils" and cls.__name__ == "Conv1D"


def _conv1d_forward(self, x):
    # x @ W + b with W stored (in, out): F.linear with the weight transposed (a view; its
    # gradient comes back in W's own layout, no copy).
    return F.linear(x, self.weight.t(), self.bias)


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D, patched or not, whose forward is Conv1D's own (or fastgpt's)."""
    base = next((c for c in type(m).__mro__ if _conv1d_class(c)), None)
    return base is not None and type(m).forward in (base.forward, _conv1d_forward)


def _hf_conv1d(m: nn.Module) -> bool:
    return any(_conv1d_class(c) for c in type(m).__mro__)


def _hf_conv1d_refuse(m: nn.Module) -> str:
    return "" if _is_hf_conv1d(m) else f"{type(m).__qualname__} overrides forward; left alone"


# -- transformers GPT-2 MLP: the GELU and c_proj as one bias_gelu_linear ------------------------


def _hf_gpt2_mlp(m: nn.Module) -> bool:
    t = type(m)
    return t.__module__ == "transformers.models.gpt2.modeling_gpt2" and t.__name__ == "GPT2MLP"


def _hf_mlp_approximate(m: nn.Module) -> str | None:
    """The GELU of ``m.act`` ("tanh" / "none"), also once patched; None for anything else."""
    for cls in type(m.act).__mro__:
        if _is_hf_gelu_class(cls):
            if type(m.act).forward not in (cls.forward, *_GELU_FORWARDS.values()):
                return None  # a subclass with its own forward
            return _HF_GELUS[cls.__name__]
    return None


def _hf_mlp_refuse(m: nn.Module) -> str:
    if not (_is_hf_conv1d(m.c_fc) and _is_hf_conv1d(m.c_proj)):
        return "c_fc / c_proj are not transformers' Conv1D; left alone"
    if _hf_mlp_approximate(m) is None:
        return f"activation {type(m.act).__name__} is not a GELU fastgpt computes; left alone"
    return ""


def _hf_mlp_forward_for(approximate: str):
    def forward(self, hidden_states):
        # Conv1D computes x @ W + b with W stored (in, out): the c_fc bias goes into the GELU,
        # c_proj's W transposed is the (out, in) weight of a linear.
        h = F.linear(hidden_states, self.c_fc.weight.t())
        y = F.bias_gelu_linear(
            h, self.c_fc.bias, self.c_proj.weight.t(), self.c_proj.bias, approximate
        )
        return self.dropout(y)

    return forward


_HF_MLP_FORWARDS = {a: _hf_mlp_forward_for(a) for a in ("tanh", "none")}


def _hf_mlp_class(m: nn.Module) -> type:
    return _subclass(type(m), "forward", _HF_MLP_FORWARDS[_hf_mlp_approximate(m)])


# -- transformers: attention through AttentionInterface, LM loss through loss_function ----------


def _uses_attention_interface(m: nn.Module) -> bool:
    """A transformers attention module choosing its kernel by ``config._attn_implementation``."""
    cfg = getattr(m, "config", None)
    return (
        type(m).__module__.startswith("transformers.")
        and hasattr(cfg, "_attn_implementation")
        and "ALL_ATTENTION_FUNCTIONS" in _global_names(type(m).forward)
    )


def _attention_refuse(m: nn.Module) -> str:
    impl = m.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} is kept (fastgpt replaces 'sdpa' or 'eager')"
    if getattr(m, "is_cross_attention", False):
        return "cross-attention is left alone"
    return ""


def _attention_apply(m: nn.Module) -> None:
    from fastgpt import _hf

    _hf.register()
    # The config object is shared by every layer and the mask builder of the model, so this one
    # assignment switches them all consistently; each attention module is still reported.
    m.config._attn_implementation = "fastgpt"


def _is_causal_lm(m: nn.Module) -> bool:
    # transformers resolves loss_type None to its causal-LM loss too (GPT2LMHeadModel has None)
    t = type(m)
    return (
        t.__module__.startswith("transformers.")
        and getattr(m, "loss_type", None) in (None, "ForCausalLM")
        and isinstance(getattr(t, "loss_function", None), property)
        and "loss_function" in _global_names(t.forward)
    )


def _loss_apply(m: nn.Module) -> None:
    from fastgpt import _hf

    m.loss_function = _hf.causal_lm_loss  # transformers' own setter for this hook


def _loss_refuse(m: nn.Module) -> str:
    if "_loss_function" in vars(m):
        return "a custom loss_function is already set; left alone"
    return ""


# -- functional rebinding (nanoGPT-style modules) -----------------------------------------------

_TWINS = ("layer_norm", "gelu", "scaled_dot_product_attention", "cross_entropy")


def _global_names(fn) -> set[str]:
    """Every global and attribute name the code of ``fn`` (and its nested code) refers to."""
    code = getattr(inspect.unwrap(fn), "__code__", None)  # through functools.wraps decorators
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names


def _torch_bindings(fn) -> dict[str, object]:
    """The globals of ``fn`` that are torch, torch.nn, torch.nn.functional or one of its twins."""
    g = getattr(inspect.unwrap(fn), "__globals__", {})
    names = _global_names(fn)
    found = {}
    for name in names:
        v = g.get(name)
        # torch / torch.nn only matter when reached through ".functional"; leaving them alone
        # otherwise keeps torch.compile seeing the real torch module for everything else
        via_functional = (v is torch or v is torch.nn) and "functional" in names
        is_twin = any(v is getattr(torch.nn.functional, t) for t in _TWINS)
        if via_functional or v is torch.nn.functional or is_twin:
            found[name] = v
    return found


def _calls_twins(m: nn.Module) -> bool:
    t = type(m)
    if t.__module__.split(".")[0] in ("torch", "transformers", "fastgpt"):
        return False
    fwd = t.forward
    return bool(_torch_bindings(fwd)) and bool(set(_TWINS) & _global_names(fwd))


def _rebound_forward(fwd):
    """``fwd``'s code with globals where torch's functional twins are fastgpt's adapters."""
    from fastgpt import _shims

    # The new globals live in a module of their own, registered in sys.modules under a distinct
    # name: torch.compile finds an inlined function's globals by module name, and must not be
    # sent to the original module's (where torch's functions still are).
    name = f"{fwd.__globals__.get('__name__', 'module')}.__fastgpt_{fwd.__qualname__}"
    shim_module = types.ModuleType(name)
    shim_module.__dict__.update(fwd.__globals__)
    shim_module.__name__ = name
    for gname, v in _torch_bindings(fwd).items():
        setattr(shim_module, gname, _shims.replacement(v))
    sys.modules[name] = shim_module
    g = shim_module.__dict__
    new = types.FunctionType(fwd.__code__, g, fwd.__name__, fwd.__defaults__, fwd.__closure__)
    new.__kwdefaults__ = fwd.__kwdefaults__
    new.__qualname__ = fwd.__qualname__
    new.__doc__ = fwd.__doc__
    return new


@functools.cache
def _rebound_class(cls: type) -> type:
    return _subclass(cls, "forward", _rebound_forward(cls.forward))


def _twins_used(m: nn.Module) -> str:
    used = sorted(set(_TWINS) & _global_names(type(m).forward))
    return "same forward, calling fastgpt.functional." + "/".join(used)


RULES: list[Rule] = [
    Rule(
        "torch.nn.Linear",
        "fastgpt.nn.Linear",
        lambda m: isinstance(m, nn.Linear),
        _swap_class(_twin(nn.Linear, fnn.Linear)),
        _own_forward(nn.Linear),
    ),
    Rule(
        "torch.nn.LayerNorm",
        "fastgpt.nn.LayerNorm",
        lambda m: isinstance(m, nn.LayerNorm),
        _swap_class(_twin(nn.LayerNorm, fnn.LayerNorm)),
        _own_forward(nn.LayerNorm),
    ),
    Rule(
        "torch.nn.GELU",
        "fastgpt.nn.GELU",
        lambda m: isinstance(m, nn.GELU),
        _swap_class(_twin(nn.GELU, fnn.GELU)),
        _own_forward(nn.GELU),
    ),
    Rule(
        "transformers GELU activation",
        "fastgpt.functional.gelu",
        _hf_gelu,
        _swap_class(_hf_gelu_class),
    ),
    Rule(
        "transformers Conv1D",
        "fastgpt.functional.linear (the weight transposed)",
        _hf_conv1d,
        _swap_class(lambda m: _subclass(type(m), "forward", _conv1d_forward)),
        _hf_conv1d_refuse,
    ),
    Rule(
        "transformers GPT-2 MLP",
        "fastgpt.functional.bias_gelu_linear (the GELU output recomputed, not kept)",
        _hf_gpt2_mlp,
        _swap_class(_hf_mlp_class),
        _hf_mlp_refuse,
    ),
    Rule(
        "transformers attention",
        "fastgpt.functional.scaled_dot_product_attention (attn_implementation='fastgpt')",
        _uses_attention_interface,
        _attention_apply,
        _attention_refuse,
    ),
    Rule(
        "transformers causal-LM loss",
        "fastgpt.functional.cross_entropy (model.loss_function)",
        _is_causal_lm,
        _loss_apply,
        _loss_refuse,
    ),
    Rule(
        "module calling torch.nn.functional",
        _twins_used,
        _calls_twins,
        _swap_class(lambda m: _rebound_class(type(m))),
    ),
]

# Modules no rule matched that are still worth a line in the report: the kinds fastgpt has
# kernels for, implemented some way the table does not know.
_NOTEWORTHY = ("LayerNorm", "GELU", "Attention", "CrossEntropy")


def _plan(model: nn.Module) -> list[tuple[str, nn.Module, Rule | None, PatchEntry]]:
    plan = []
    native: list[str] = []  # fastgpt's own models (fastgpt.GPT): already on the kernels
    for path, m in model.named_modules():
        what = f"{type(m).__module__}.{type(m).__qualname__}"
        if any(path == p or path.startswith(p + ".") or p == "" for p in native):
            continue
        if type(m).__module__ == "fastgpt.model":
            native.append(path)
            continue
        if _is_patched(m):
            continue
        rule = next((r for r in RULES if r.matches(m)), None)
        if rule is None:
            if any(k.lower() in type(m).__name__.lower() for k in _NOTEWORTHY):
                plan.append((path, m, None, PatchEntry(path, what, "no rule matches", False)))
            continue
        why = rule.refuse(m)
        if why:
            plan.append((path, m, None, PatchEntry(path, what, why, False)))
            continue
        replacement = rule.replacement if isinstance(rule.replacement, str) else rule.replacement(m)
        plan.append((path, m, rule, PatchEntry(path, f"{rule.what} ({what})", replacement, True)))
    return plan


def patch(model: nn.Module, dry_run: bool = False):
    """Swap fastgpt's kernels into ``model`` in place and return ``model``.

    With ``dry_run=True`` nothing changes and a ``PatchReport`` (a list of ``PatchEntry(path,
    what, replacement, swapped)``) is returned instead: every swap that would happen, and every
    LayerNorm/GELU/attention-like module that would be left alone, with the reason. After a real
    patch the same report is kept on ``model.fastgpt_patch_report`` and logged at INFO level on
    the "fastgpt" logger. Patching twice is harmless: patched modules are skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastgpt.patch takes an nn.Module, got {type(model).__name__}")
    plan = _plan(model)
    report = PatchReport(entry for *_, entry in plan)
    if dry_run:
        return report
    for _, m, rule, _ in plan:
        if rule is not None:
            rule.apply(m)
    object.__setattr__(model, "fastgpt_patch_report", report)
    log.info("fastgpt.patch:\n%s", report)
    return model
