"""linear_cross_entropy forward + backward at GPT-2 small's head (N=4096, C=768, V=50257):
fastgpt vs eager (input @ W.T, then F.cross_entropy) vs torch's F.linear_cross_entropy (its
default, options=None, is that same unchunked reference; and its chunked path,
options=LinearCrossEntropyOptions()), with peak memory in extra_info["peak_mb"] (fresh process,
see _memory.py).

    python -m pytest benchmarks/test_bench_linear_cross_entropy.py --benchmark-only \
        --benchmark-columns=mean,stddev -q
"""

import os

import pytest
import torch
from _memory import peak_bytes

N, C, V = 4096, 768, 50257
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ALLOC = f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}"

CALLS = {
    "fastgpt": "F.linear_cross_entropy(x, w, t)",
    "eager": "TF.cross_entropy(x @ w.t(), t)",
    "torch_default": "TF.linear_cross_entropy(x, w, t)",
    "torch_chunked": (
        "TF.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions())"
    ),
}


def _setup(dtype):
    return (
        "import torch, torch.nn.functional as TF, fastgpt.functional as F\n"
        "g = torch.Generator().manual_seed(0)\n"
        f"x = torch.randn({N}, {C}, generator=g).to({dtype}).requires_grad_()\n"
        f"w = (torch.randn({V}, {C}, generator=g) / {C**0.5}).to({dtype}).requires_grad_()\n"
        f"t = torch.randint(0, {V}, ({N},), generator=g)\n"
    )


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("contender", list(CALLS))
def test_linear_cross_entropy_fwd_bwd(benchmark, contender, dtype):
    benchmark.group = f"linear_cross_entropy-{N}x{C}x{V}-{dtype}-fwdbwd"
    scope = {}
    exec(_setup(DTYPES[dtype]), scope)
    call = CALLS[contender]

    def step():
        exec(f"{call}.backward(); x.grad = None; w.grad = None", scope)

    benchmark.pedantic(step, rounds=2, warmup_rounds=1)
    peak = peak_bytes(_setup(DTYPES[dtype]), f"{call}.backward(); x.grad = None; w.grad = None")
    benchmark.extra_info.update(peak_mb=round(peak / 2**20, 1), allocator=ALLOC)
