"""fastgpt: fused GPT kernels for PyTorch (Triton on GPU, C++ on CPU), drop-in for torch code.

import fastgpt.functional as F      # twins of torch.nn.functional
import fastgpt.nn                   # twins of torch.nn modules
"""

from fastgpt import _cpu
from fastgpt import ops as _ops  # noqa: F401
from fastgpt._backend import BACKENDS, use_backend
from fastgpt.ops import layer_norm as _layer_norm_op  # noqa: F401  (defines the custom ops)

from . import functional, nn, reference  # noqa: E402

_cpu.try_load()  # register the C++ CPU kernels now that their schemas exist

__version__ = "0.1.0"
__all__ = ["BACKENDS", "functional", "nn", "reference", "use_backend", "__version__"]
