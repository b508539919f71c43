"""fastgpt: fused GPT kernels for PyTorch (Triton on GPU, C++ on CPU), drop-in for torch code.

import fastgpt.functional as F      # twins of torch.nn.functional
import fastgpt.nn                   # twins of torch.nn modules
fastgpt.GPT, fastgpt.GPTConfig      # the GPT-2 family on those kernels
fastgpt.patch(model)                # swap the kernels into an existing model, in place
"""

import importlib as _importlib
import pkgutil as _pkgutil

from fastgpt import _cpu, ops
from fastgpt._backend import BACKENDS, use_backend

# Importing each fastgpt/ops/<op>.py defines that op's custom-op schemas.
for _m in _pkgutil.iter_modules(ops.__path__):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"fastgpt.ops.{_m.name}")

from fastgpt import functional, nn, reference  # noqa: E402
from fastgpt.model import GPT, GPTConfig  # noqa: E402
from fastgpt.patch import patch  # noqa: E402  (the function; the module stays importable)

_cpu.try_load()  # register the C++ CPU kernels now that their schemas exist


def empty_cache() -> None:
    """Hand back the memory fastgpt's CPU kernels keep for reuse: the idle blocks of their
    output cache (csrc/output_memory.h; FASTGPT_OUTPUT_CACHE_MB caps it, 0 turns it off).
    Like ``torch.cuda.empty_cache``: tensors in use are untouched, and only a process that
    wants the memory back for something other than fastgpt outputs needs to call it."""
    _cpu.empty_output_cache()


def output_cache_info() -> dict[str, int]:
    """What the CPU output cache holds and has done: ``idle_bytes``/``idle_blocks`` kept for
    reuse, ``hits``/``misses`` of outputs of >= 4 MiB, and ``cap_bytes``."""
    return _cpu.output_cache_stats()


__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "GPT",
    "GPTConfig",
    "functional",
    "nn",
    "patch",
    "reference",
    "use_backend",
    "__version__",
    "empty_cache",
    "output_cache_info",
]
