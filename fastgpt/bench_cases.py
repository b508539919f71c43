"""Benchmark cases shared by the pytest-benchmark suites (benchmarks/) and ``fastgpt bench``.

A case is one (op, shape, dtype, mode) with one callable per contender:
  fastgpt  - the fastgpt function on the present device's default backend
  eager    - the same computation in plain torch (torch.nn.functional, eager)
  compile  - the eager function under torch.compile
  (naive   - for attention, the masked-softmax module people write by hand)
Modes: "fwd" (under no_grad) and "fwd+bwd" (forward, then torch.autograd.grad of every input).
Each op adds a builder with ``@case_builder(op)``; a builder makes the inputs once and returns
the contenders' forward functions plus the FLOPs and bytes one forward moves, so reports can give
GFLOP/s and GB/s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF

import fastgpt.functional as F

MODES = ("fwd", "fwd+bwd")


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str
    device: str
    calls: dict[str, Callable[[], object]] = field(default_factory=dict)
    flops: float = 0.0  # of the whole call (forward, or forward+backward)
    bytes: float = 0.0

    @property
    def name(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.op}-{'x'.join(map(str, self.shape))}-{dt}-{self.mode}"


_BUILDERS: dict[str, Callable] = {}


def case_builder(op: str):
    def register(fn):
        _BUILDERS[op] = fn
        return fn

    return register


def ops() -> list[str]:
    return list(_BUILDERS)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def make_case(op, shape, dtype, mode, device="cpu", contenders=("fastgpt", "eager", "compile")):
    """Build a Case whose ``calls`` run each contender once."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    inputs, grads_for, forwards, fwd_flops, fwd_bytes = _BUILDERS[op](shape, dtype, device)
    case = Case(op, tuple(shape), dtype, mode, device)
    # The backward reads and writes about twice what the forward does (a common rule of thumb;
    # exact counts live in each kernel's docstring).
    case.flops = fwd_flops * (3 if mode == "fwd+bwd" else 1)
    case.bytes = fwd_bytes * (3 if mode == "fwd+bwd" else 1)
    for name in contenders:
        if name == "compile":
            fwd = _compiled(forwards["eager"])
        elif name in forwards:
            fwd = forwards[name]
        else:
            continue
        case.calls[name] = _runner(fwd, inputs, grads_for, mode)
    return case


def _runner(fwd, inputs, grads_for, mode):
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
        if not grads_cache:
            grads_cache.extend(grads_for(outs))
        return torch.autograd.grad(outs, leaves, grads_cache)

    return run_fwd_bwd


def _randn(shape, dtype, device, grad=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def _like(outs: Sequence[torch.Tensor]):
    return [torch.randn_like(o) for o in outs]


# ---- LayerNorm ------------------------------------------------------------------------------


@case_builder("layer_norm")
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
    }
    elt = x.element_size()
    return (x, w, b), _like, forwards, 8.0 * m * n, 2.0 * m * n * elt


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
    return (x, r, w, b), _like, forwards, 9.0 * m * n, 4.0 * m * n * elt


# ---- sweeps for `fastgpt bench --plot` ------------------------------------------------------


@dataclass
class Sweep:
    op: str
    x_label: str
    points: list[tuple[int, tuple[int, ...]]]  # (x value, case shape)
    dtype: torch.dtype = torch.float32
    mode: str = "fwd+bwd"
    metric_label: str = "GB/s"
    metric: Callable[[Case, float], float] = lambda case, t: case.bytes / t / 1e9


_SWEEPS: list[Sweep] = []


def add_sweep(sweep: Sweep) -> None:
    _SWEEPS.append(sweep)


def sweeps() -> list[Sweep]:
    return list(_SWEEPS)
