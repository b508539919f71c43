"""Benchmark cases shared by the pytest-benchmark suites (benchmarks/) and ``fastgpt bench``.

A case is one (op, shape, dtype, mode) with one callable per contender:
  fastgpt  - the fastgpt function on the present device's default backend
  eager    - the same computation in plain torch (torch.nn.functional, eager)
  compile  - the eager function under torch.compile
  naive    - attention only: the masked-softmax module people write by hand
  floor    - LayerNorm and GELU only: not the op but its least memory traffic done the plain way
             (see _MemoryFloor), to show how far from that bound each contender is
  torch, torch_chunked - linear_cross_entropy only: torch's own F.linear_cross_entropy, its
             default (unchunked) and chunked paths
Modes: "fwd" (under no_grad) and "fwd+bwd" (forward, then torch.autograd.grad of every input).
Each op adds a builder with ``@case_builder(op, contenders)``; a builder makes the inputs once and
returns a ``Built``: the contenders' forward functions plus the FLOPs and bytes the computation
needs at the least (the same for every contender, so GFLOP/s and GB/s compare like for like).
A contender that cannot run at a shape (the naive attention's T x T scores at long T) is named
in ``Built.skip`` with the reason, which the suites and ``fastgpt bench`` print.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF

import fastgpt.functional as F
from fastgpt.ops.output_memory import empty_output_like

MODES = ("fwd", "fwd+bwd")


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str
    device: str
    calls: dict[str, Callable[[], object]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # contender -> why it did not run
    flops: float = 0.0  # of the whole call (forward, or forward+backward)
    bytes: float = 0.0

    @property
    def name(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.op}-{'x'.join(map(str, self.shape))}-{dt}-{self.mode}"


@dataclass
class Built:
    """What a builder returns: inputs (tensors needing grad are differentiated in fwd+bwd),
    forward functions of those inputs per contender, and the cost of one forward."""

    inputs: tuple
    forwards: dict[str, Callable]
    flops: float
    bytes: float
    # The backward's cost; None: twice the forward's (a common rule of thumb).
    bwd_flops: float | None = None
    bwd_bytes: float | None = None
    skip: dict[str, str] = field(default_factory=dict)


_BUILDERS: dict[str, Callable[..., Built]] = {}
_CONTENDERS: dict[str, tuple[str, ...]] = {}
DEFAULT_CONTENDERS = ("fastgpt", "eager", "compile")


def case_builder(op: str, contenders: tuple[str, ...] = DEFAULT_CONTENDERS):
    def register(fn):
        _BUILDERS[op] = fn
        _CONTENDERS[op] = contenders
        return fn

    return register


def ops() -> list[str]:
    return list(_BUILDERS)


def contenders(op: str) -> tuple[str, ...]:
    return _CONTENDERS[op]


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def make_case(op, shape, dtype, mode, device="cpu", contenders=None):
    """Build a Case whose ``calls`` run each contender once (all of the op's by default)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    built = _BUILDERS[op](tuple(shape), dtype, device)
    case = Case(op, tuple(shape), dtype, mode, device)
    case.flops, case.bytes = built.flops, built.bytes
    if mode == "fwd+bwd":
        case.flops += 2 * built.flops if built.bwd_flops is None else built.bwd_flops
        case.bytes += 2 * built.bytes if built.bwd_bytes is None else built.bwd_bytes
    for name in _CONTENDERS[op] if contenders is None else contenders:
        if name in built.skip:
            case.skipped[name] = built.skip[name]
        elif name == "compile":
            fwd = _compiled(built.forwards["eager"])
            case.calls[name] = _runner(fwd, built.inputs, mode)
        elif name in built.forwards:
            case.calls[name] = _runner(built.forwards[name], built.inputs, mode)
    return case


def _runner(fwd, inputs, mode):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "fwd":

        def run_fwd():
            with torch.no_grad():
                return fwd(*inputs)

        return run_fwd
    grads_cache: list = []

    def run_fwd_bwd():
        outs = fwd(*inputs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        if not grads_cache:  # made once, outside later timings' first call
            grads_cache.extend(_like(outs))
        return torch.autograd.grad(outs, leaves, grads_cache)

    return run_fwd_bwd


def _randn(shape, dtype, device, grad=True, seed=0, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def _like(outs: Sequence[torch.Tensor]):
    """Upstream gradients, seeded: every contender differentiates against the same ones."""
    return [_randn(o.shape, o.dtype, o.device, grad=False, seed=7 + i) for i, o in enumerate(outs)]


def _targets(n, v, device, seed=5):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, v, (n,), generator=g).to(device)


# ---- the memory floor of a row-wise / elementwise op -----------------------------------------


class _MemoryFloor(torch.autograd.Function):
    """The least memory traffic of a LayerNorm or GELU, done the plain way: the forward reads x
    once into a fresh output (a copy), the backward reads dy and x once into a fresh dx
    (dy + x), with no arithmetic to speak of. Outputs are allocated as fastgpt's kernels
    allocate theirs (empty_output_like), so the comparison is of the passes, not the allocator. The
    stores are torch's ordinary ones, which read each output line before writing it; fastgpt's
    kernels stream their large outputs past the cache instead, so they can come in under it.
    The vectors (weight, bias) get zero gradients: a reduction in the same pass costs no
    traffic."""

    @staticmethod
    def forward(ctx, x, *vectors):
        ctx.save_for_backward(x, *vectors)
        return empty_output_like(x).copy_(x)

    @staticmethod
    def backward(ctx, dy):
        x, *vectors = ctx.saved_tensors
        return torch.add(dy, x, out=empty_output_like(x)), *(torch.zeros_like(v) for v in vectors)


def memory_floor(x, *vectors):
    return _MemoryFloor.apply(x, *vectors)


FLOOR_CONTENDERS = DEFAULT_CONTENDERS + ("floor",)


# ---- linear ---------------------------------------------------------------------------------
# shape (N, K, M): input (N, K), weight (M, K), bias (M). FLOPs: the product; the backward's two
# (d_input, d_weight) are twice that. Bytes: read input and weight, write the output.


@case_builder("linear")
def _linear(shape, dtype, device):
    n, k, m = shape
    x = _randn((n, k), dtype, device)
    w = _randn((m, k), dtype, device, seed=1, scale=k**-0.5)
    b = _randn(m, dtype, device, seed=2)
    forwards = {"fastgpt": F.linear, "eager": TF.linear}
    elt = x.element_size()
    return Built((x, w, b), forwards, 2.0 * n * k * m, float((n * k + m * k + n * m) * elt))


# ---- LayerNorm ------------------------------------------------------------------------------
# Bytes: read x (and r), write y (and the sum); the backward reads x and dy and writes dx.


@case_builder("layer_norm", FLOOR_CONTENDERS)
def _layer_norm(shape, dtype, device):
    m, n = shape
    x, w, b = (
        _randn((m, n), dtype, device),
        _randn(n, dtype, device, seed=1),
        _randn(n, dtype, device, seed=2),
    )
    forwards = {
        "fastgpt": lambda x, w, b: F.layer_norm(x, (n,), w, b),
        "eager": lambda x, w, b: TF.layer_norm(x, (n,), w, b),
        "floor": memory_floor,
    }
    elt = x.element_size()
    return Built((x, w, b), forwards, 8.0 * m * n, 2.0 * m * n * elt, bwd_bytes=3.0 * m * n * elt)


@case_builder("add_layer_norm")
def _add_layer_norm(shape, dtype, device):
    m, n = shape
    x, r = _randn((m, n), dtype, device), _randn((m, n), dtype, device, seed=3)
    w, b = _randn(n, dtype, device, seed=1), _randn(n, dtype, device, seed=2)

    def eager(x, r, w, b):
        s = x + r
        return TF.layer_norm(s, (n,), w, b), s

    forwards = {
        "fastgpt": lambda x, r, w, b: F.add_layer_norm(x, r, (n,), w, b),
        "eager": eager,
    }
    elt = x.element_size()
    return Built(
        (x, r, w, b), forwards, 9.0 * m * n, 4.0 * m * n * elt, bwd_bytes=4.0 * m * n * elt
    )


# ---- GELU -----------------------------------------------------------------------------------
# Elementwise: the forward reads x and writes y; the backward reads x and dy and writes dx.
# FLOPs are nominal (about 10 per element for either formula), for a rate to compare only.


def _gelu_builder(approximate, bias):
    torch_approx = "tanh" if approximate == "tanh" else "none"

    def build(shape, dtype, device):
        m, n = shape
        x, b = _randn((m, n), dtype, device), _randn(n, dtype, device, seed=1, grad=bias)
        if bias:
            forwards = {
                "fastgpt": lambda x, b: F.bias_gelu(x, b, torch_approx),
                "eager": lambda x, b: TF.gelu(x + b, approximate=torch_approx),
                "floor": memory_floor,
            }
        else:
            forwards = {
                "fastgpt": lambda x, b: F.gelu(x, torch_approx),
                "eager": lambda x, b: TF.gelu(x, approximate=torch_approx),
                "floor": lambda x, b: memory_floor(x),
            }
        elt = x.element_size()
        return Built(
            (x, b), forwards, 10.0 * m * n, 2.0 * m * n * elt, 10.0 * m * n, 3.0 * m * n * elt
        )

    return build


for _approx in ("tanh", "erf"):
    case_builder(f"gelu_{_approx}", FLOOR_CONTENDERS)(_gelu_builder(_approx, bias=False))
    case_builder(f"bias_gelu_{_approx}", FLOOR_CONTENDERS)(_gelu_builder(_approx, bias=True))


# ---- cross-entropy --------------------------------------------------------------------------
# shape (N, V). Least traffic: read the logits once; the backward writes their gradient.


@case_builder("cross_entropy")
def _cross_entropy(shape, dtype, device):
    n, v = shape
    x, t = _randn((n, v), dtype, device), _targets(n, v, device)
    forwards = {
        "fastgpt": lambda x, t: F.cross_entropy(x, t),
        "eager": lambda x, t: TF.cross_entropy(x, t),
    }
    nv_bytes = float(n * v * x.element_size())
    return Built((x, t), forwards, 4.0 * n * v, nv_bytes, 3.0 * n * v, nv_bytes)


# ---- linear + cross-entropy -----------------------------------------------------------------
# shape (N, C, V): hidden states (N, C), head weight (V, C). FLOPs: the (N, C) x (C, V) product
# forward, two more backward (dx, dW); bytes: read x and W, the backward writes dx and dW.


@case_builder("linear_cross_entropy", DEFAULT_CONTENDERS + ("torch", "torch_chunked"))
def _linear_cross_entropy(shape, dtype, device):
    n, c, v = shape
    x = _randn((n, c), dtype, device)
    w = _randn((v, c), dtype, device, seed=1, scale=c**-0.5)
    t = _targets(n, v, device)
    chunked = torch.nn.LinearCrossEntropyOptions()
    forwards = {
        "fastgpt": lambda x, w, t: F.linear_cross_entropy(x, w, t),
        "eager": lambda x, w, t: TF.cross_entropy(x @ w.T, t),
        "torch": lambda x, w, t: TF.linear_cross_entropy(x, w, t),
        "torch_chunked": lambda x, w, t: TF.linear_cross_entropy(x, w, t, options=chunked),
    }
    elt = x.element_size()
    return Built((x, w, t), forwards, 2.0 * n * c * v, float((n * c + v * c) * elt))


# ---- attention ------------------------------------------------------------------------------
# shape (B, H, Tq, Tk, D), causal (bottom-right aligned); Tq == Tk (training), Tq == 1 (a decode
# step against a cache of Tk keys) or between (a few new tokens against a cache: speculative or
# chunked decoding). FLOPs: QK^T and PV over the keys the causal mask leaves (half of them at
# Tq == Tk); the backward does 2.5 times the forward's (five matmuls to two). Bytes: read q, k,
# v, write o; the backward reads those and dO and writes dq, dk, dv.

# The naive module keeps about eight (B, H, Tq, Tk) fp32 tensors alive in fwd+bwd (scores,
# mask, softmax, and their gradients); past this many GB it is not run (8 GB at T=4096, H=12).
NAIVE_MAX_GB = 4.0


def naive_attention(q, k, v):
    """Causal attention as written by hand: the full (Tq, Tk) score matrix, masked, softmaxed."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    keep = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


@case_builder("attention", DEFAULT_CONTENDERS + ("naive",))
def _attention(shape, dtype, device):
    return _attention_case(shape, dtype, device, dropout_p=0.0)


# GPT-2's attention dropout (transformers' attn_pdrop default), which training with its config
# turns on. Training shapes only; no naive contender (it has no dropout).
@case_builder("attention_dropout")
def _attention_dropout(shape, dtype, device):
    if shape[2] != shape[3]:
        raise ValueError("attention_dropout cases are training shapes (Tq == Tk)")
    return _attention_case(shape, dtype, device, dropout_p=0.1)


# Grouped-query attention, shape (B, Hq, Hkv, Tq, Tk, D): Hq query heads share Hkv key/value
# heads (torch's enable_gqa). Tq == 1 is a decode step (Llama-3-8B's 32 / 8 heads of 128 against
# a long cache), where fastgpt folds each group's queries onto their head; Tq > 1 is causal
# (a prefill or training step at Tq == Tk, a few new tokens against a cache below it), which the
# CPU kernels run once per member of each group, reading the shared heads in place.
@case_builder("attention_gqa")
def _attention_gqa(shape, dtype, device):
    b, hq, hk, tq, tk, d = shape
    if hq % hk:
        raise ValueError("attention_gqa cases need Hkv dividing Hq")
    return _attention_case((b, hq, tq, tk, d), dtype, device, dropout_p=0.0, kv_heads=hk)


def _attention_case(shape, dtype, device, dropout_p, kv_heads=None):
    """shape (B, H, Tq, Tk, D); kv_heads: key/value heads when fewer than H (enable_gqa)."""
    b, h, tq, tk, d = shape
    hk = h if kv_heads is None else kv_heads
    if not 1 <= tq <= tk:
        raise ValueError("attention cases have 1 <= Tq <= Tk (a causal step against Tk keys)")
    q = _randn((b, h, tq, d), dtype, device)
    k = _randn((b, hk, tk, d), dtype, device, seed=1)
    v = _randn((b, hk, tk, d), dtype, device, seed=2)
    # torch's is_causal is top-left aligned: the same as fastgpt's at Tq == Tk, and a single
    # query against a cache sees every key. In between, eager gets the bottom-right mask spelled
    # out, as a torch user writes it for speculative decoding.
    torch_causal = tq == tk
    mask = None
    if 1 < tq < tk:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    gqa = hk != h
    forwards = {
        "fastgpt": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa
        ),
        "eager": lambda q, k, v: TF.scaled_dot_product_attention(
            q, k, v, mask, dropout_p=dropout_p, is_causal=torch_causal, enable_gqa=gqa
        ),
    }
    skip = {}
    if not dropout_p and not gqa:
        forwards["naive"] = naive_attention
        naive_gb = 8 * b * h * tq * tk * 4 / 1e9
        if naive_gb > NAIVE_MAX_GB:
            skip["naive"] = (
                f"naive attention would hold ~{naive_gb:.0f} GB of (B, H, Tq, Tk) scores and "
                f"their gradients at this shape (limit {NAIVE_MAX_GB:.0f} GB)"
            )
    elt = q.element_size()
    # The fraction of (query, key) pairs the causal mask leaves: 1/2 in training (by convention,
    # not (Tk + 1) / 2Tk), all for a single query, the exact count in between.
    visible = 0.5 if tq == tk else (tq * (tk - tq) + tq * (tq + 1) / 2) / (tq * tk)
    flops = 4.0 * b * h * tq * tk * d * visible
    io = float((2 * b * h * tq * d + 2 * b * hk * tk * d) * elt)
    return Built((q, k, v), forwards, flops, io, 2.5 * flops, 2.0 * io, skip)


# ---- sweeps for `fastgpt bench --plot` ------------------------------------------------------


@dataclass
class Sweep:
    op: str
    x_label: str
    points: list[tuple[int, tuple[int, ...]]]  # (x value, case shape)
    metric_label: str
    metric: Callable[[Case, float], float]  # of the case and its median seconds
    log_y: bool = False
    dtype: torch.dtype = torch.float32
    mode: str = "fwd+bwd"


_SWEEPS: list[Sweep] = []


def add_sweep(sweep: Sweep) -> None:
    _SWEEPS.append(sweep)


def sweeps() -> list[Sweep]:
    return list(_SWEEPS)


# Sizes keep `fastgpt bench --plot` to a few minutes on a 2-core CPU.
add_sweep(
    Sweep(
        "attention",
        "sequence length T (B=1, H=12, D=64, causal)",
        [(t, (1, 12, t, t, 64)) for t in (128, 256, 512, 1024, 2048, 4096)],
        "GFLOP/s (causal attention FLOPs / time)",
        lambda case, t: case.flops / t / 1e9,
    )
)
add_sweep(
    Sweep(
        "cross_entropy",
        "vocabulary size V (N=1024 rows)",
        [(v, (1024, v)) for v in (8192, 16384, 32768, 50257, 128256)],
        "time per call (ms)",
        lambda case, t: t * 1e3,
        log_y=True,
    )
)
