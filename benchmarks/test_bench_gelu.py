"""GELU and bias+GELU: fastgpt vs torch eager vs torch.compile, forward and forward+backward.

    python -m pytest benchmarks/test_bench_gelu.py --benchmark-only \
        --benchmark-columns=mean,stddev -q

Groups are `<op>-<shape>-<dtype>-<mode>`; contenders `fastgpt`, `eager`, `compile`. The eager
bias_gelu is the pair `x + b` then `F.gelu`. Forward+backward uses `torch.autograd.grad`, so no
`.grad` accumulation is timed. At 8192x3072 fp32 every output is a fresh 100 MB allocation whose
first touch page-faults (see DESIGN.md 4): fastgpt allocates one such tensor per direction (y; dx),
the eager bias pair two in the forward (x + b, y), one in the backward (dx) plus a pass for dbias.
"""

import pytest
import torch
import torch.nn.functional as TF

import fastgpt  # noqa: F401
import fastgpt.functional as F

SHAPES = [(8192, 3072), (8192, 768)]
OPS = ["gelu_tanh", "gelu_erf", "bias_gelu_tanh"]
MODES = ["fwd", "fwdbwd"]
CONTENDERS = ["fastgpt", "eager", "compile"]


def _functions(op):
    """(fastgpt fn, eager fn) of (x, b)."""
    if op == "gelu_tanh":
        return (lambda x, b: F.gelu(x, "tanh")), (lambda x, b: TF.gelu(x, approximate="tanh"))
    if op == "gelu_erf":
        return (lambda x, b: F.gelu(x, "none")), (lambda x, b: TF.gelu(x))
    return (lambda x, b: F.bias_gelu(x, b, "tanh")), (
        lambda x, b: TF.gelu(x + b, approximate="tanh")
    )


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gelu(benchmark, shape, op, mode, contender):
    dtype = torch.float32
    benchmark.group = f"{op}-{shape[0]}x{shape[1]}-fp32-{mode}"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    b = torch.randn(shape[-1], generator=g, dtype=dtype)
    fast, eager = _functions(op)
    fn = {"fastgpt": fast, "eager": eager, "compile": None}[contender]
    if contender == "compile":
        torch._dynamo.reset()
        fn = torch.compile(eager, fullgraph=True)
    needs = [x] if op.startswith("gelu") else [x, b]
    if mode == "fwd":

        def run():
            return fn(x, b)
    else:
        for t in needs:
            t.requires_grad_()
        dy = torch.randn(shape, generator=g, dtype=dtype)

        def run():
            return torch.autograd.grad(fn(x, b), needs, dy)

    run()  # compile / first-touch outside the timing
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
