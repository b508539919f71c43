"""cross_entropy forward + backward on GPT-2's (4096, 50257) logits: fastgpt vs torch eager vs
torch.compile, time and peak memory (extra_info["peak_mb"], measured in a fresh process; see
_memory.py).

    python -m pytest benchmarks/test_bench_cross_entropy.py --benchmark-only \
        --benchmark-columns=mean,stddev -q
"""

import os

import pytest
import torch
import torch.nn.functional as TF
from _memory import peak_bytes

import fastgpt.functional as F

N, V = 4096, 50257
CONTENDERS = ["fastgpt", "eager", "compile"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ALLOC = f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}"


def _fn(contender):
    if contender == "fastgpt":
        return F.cross_entropy
    if contender == "eager":
        return TF.cross_entropy
    torch._dynamo.reset()
    return torch.compile(TF.cross_entropy)


def _step(loss_fn, x, t):
    loss = loss_fn(x, t)
    loss.backward()
    x.grad = None


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("contender", CONTENDERS)
def test_cross_entropy_fwd_bwd(benchmark, contender, dtype):
    benchmark.group = f"cross_entropy-{N}x{V}-{dtype}-fwdbwd"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g).to(DTYPES[dtype]).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    fn = _fn(contender)
    benchmark.pedantic(_step, args=(fn, x, t), rounds=5, warmup_rounds=1)
    setup = (
        "import torch, torch.nn.functional as TF, fastgpt.functional as F\n"
        f"x = torch.randn({N}, {V}).to({DTYPES[dtype]}).requires_grad_()\n"
        f"t = torch.randint(0, {V}, ({N},))\n"
        + {
            "fastgpt": "fn = F.cross_entropy\n",
            "eager": "fn = TF.cross_entropy\n",
            "compile": "fn = torch.compile(TF.cross_entropy)\n",
        }[contender]
    )
    peak = peak_bytes(setup, "fn(x, t).backward(); x.grad = None")
    grad_mb = x.numel() * x.element_size() / 2**20
    benchmark.extra_info.update(
        peak_mb=round(peak / 2**20, 1), grad_mb=round(grad_mb, 1), allocator=ALLOC
    )


def test_method_sees_a_known_allocation():
    # 256 MiB of ones, touched: the measured peak must be that, within a few MiB.
    peak = peak_bytes("import torch", "y = torch.ones(64 * 2**20); del y")
    assert abs(peak - 2**28) < 8 * 2**20, peak
