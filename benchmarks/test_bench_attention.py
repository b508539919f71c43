"""Causal attention on CPU: fastgpt's flash kernel vs torch's own F.scaled_dot_product_attention
(its CPU flash kernel), the naive masked-softmax attention, and torch.compile of the naive one.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-only \
        --benchmark-columns=mean,stddev -q
"""

import pytest
import torch
import torch.nn.functional as TF

import fastgpt.functional as F

SHAPES = {
    "B2-H12-T1024-D64": (2, 12, 1024, 1024, 64),
    "decode-B1-H12-T1-Tk8192-D64": (1, 12, 1, 8192, 64),
}


def naive(q, k, v):
    t_q, t_k = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    keep = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


_compiled_naive = None


def contender(name):
    global _compiled_naive
    if name == "fastgpt":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "torch":
        # torch's is_causal is top-left aligned; at Tq = 1 against a cache every key is visible.
        return lambda q, k, v: TF.scaled_dot_product_attention(
            q, k, v, is_causal=q.shape[-2] == k.shape[-2]
        )
    if name == "eager":
        return naive
    if _compiled_naive is None:
        _compiled_naive = torch.compile(naive)
    return _compiled_naive


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("name", ["fastgpt", "torch", "eager", "compile"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(benchmark, shape, name, mode):
    b, h, tq, tk, d = SHAPES[shape]
    if mode == "fwdbwd" and tq == 1:
        pytest.skip("decode is forward-only")
    benchmark.group = f"attention-{shape}-float32-{mode}"
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwdbwd"
    q = torch.randn(b, h, tq, d, generator=g).requires_grad_(grad)
    k = torch.randn(b, h, tk, d, generator=g).requires_grad_(grad)
    v = torch.randn(b, h, tk, d, generator=g).requires_grad_(grad)
    dout = torch.randn(b, h, tq, d, generator=g)
    fn = contender(name)

    def run():
        if grad:
            torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        else:
            with torch.no_grad():
                fn(q, k, v)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
