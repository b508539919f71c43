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
]
