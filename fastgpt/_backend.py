"""Which implementation runs a fastgpt op: the plain-PyTorch reference, the C++ CPU kernels, or
the Triton kernels.

Default: by the tensor's device (CUDA -> "triton", CPU -> "cpu"). Override for a whole process with
``FASTGPT_BACKEND=reference|cpu|triton`` or for a block of code with ``fastgpt.use_backend(name)``.
``triton`` on CPU tensors runs the Triton kernels under Triton's interpreter: it needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported (that is how the tests
prove the GPU kernels on a machine without a GPU).

This is the one helper module every op shares; ops never import each other.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fastgpt import _cpu

BACKENDS = ("reference", "cpu", "triton")
log = logging.getLogger("fastgpt")


def _check_name(name: str | None, source: str) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


# A module global (not a contextvar) so torch.compile guards on it instead of breaking the graph.
_override: str | None = _check_name(os.environ.get("FASTGPT_BACKEND") or None, "FASTGPT_BACKEND")


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run fastgpt ops inside the block on backend ``name`` (``None``: choose by device)."""
    global _override
    _check_name(name, "backend")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def current_override() -> str | None:
    return _override


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(t: torch.Tensor) -> str:
    """The backend that will run an op whose main input is ``t``."""
    name = _override
    if name is None:
        if t.device.type == "cuda":
            name = "triton" if triton_available() else "reference"
        elif t.device.type == "cpu":
            name = "cpu"
        else:
            name = "reference"
    if name == "cpu" and t.device.type != "cpu":
        raise RuntimeError(f"fastgpt backend 'cpu' was forced, but the tensor is on {t.device}")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("fastgpt backend 'triton' needs triton: pip install triton")
        if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "fastgpt backend 'triton' on CPU tensors runs Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment before triton is imported"
            )
    return name


_reported: set[str] = set()


def fallback(op: str, reason: str) -> None:
    """Note, once per (op, reason), that an op runs the reference path instead of a kernel."""
    if torch.compiler.is_compiling():
        return
    key = f"{op}: {reason}"
    if key not in _reported:
        _reported.add(key)
        log.info("fastgpt.%s runs the reference implementation: %s", op, reason)


def apply(function, *args):
    """``function.apply(*args)`` where autograd has to record the call (grad mode on and a
    tensor argument that requires grad), else ``function.infer(*args)``: the forward's ops
    called directly. An autograd Function's bookkeeping costs ~4 us a call, more than a small
    op's kernel (a LayerNorm of one 768-wide row, a decode step's GELU), and inference keeps
    nothing for a backward."""
    if torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    ):
        return function.apply(*args)
    return function.infer(*args)


def kernel(module: str, op: str, backend: str, device: torch.device):
    """The callable for one forward/backward kernel of an op.

    Normally the registered custom op ``torch.ops.fastgpt.<op>``, which the dispatcher sends to
    the C++ kernel (CPU) or the Triton launcher (CUDA). Only for Triton on CPU tensors (the
    interpreter) is the launcher called directly, since the dispatcher would pick the C++ kernel.
    """
    if backend == "triton" and device.type == "cpu":
        return getattr(importlib.import_module(f"fastgpt.triton.{module}"), op)
    if device.type == "cpu" and not _cpu.loaded():
        _cpu.ensure_loaded()  # raises, saying how to build the kernels
    return getattr(torch.ops.fastgpt, op)


# Floating dtypes each kernel backend computes; anything else runs the reference path.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}


def unsupported(backend: str, tensors, x: torch.Tensor) -> str:
    """Why the kernels of ``backend`` cannot take a call whose main input is ``x`` and whose
    other tensors (None allowed) are ``tensors`` ('' when they can)."""
    if backend == "reference":
        return "backend 'reference' selected"
    if x.dtype not in KERNEL_DTYPES[backend]:
        return f"dtype {x.dtype} has no {backend} kernel"
    for t in tensors:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            return "arguments of mixed dtype or device"
    return ""
