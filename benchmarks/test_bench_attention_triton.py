"""Triton attention kernels against torch's scaled_dot_product_attention, eager and compiled.

CUDA only (the Triton kernels do not run on CPU outside the interpreter): skipped elsewhere.
Times the launchers of fastgpt/triton/attention.py directly; TFLOP/s and GB/s come from
`attention_fwd_cost` / `attention_bwd_cost` and are stored in extra_info.

    python -m pytest benchmarks/test_bench_attention_triton.py --benchmark-only \
        --benchmark-columns=mean,stddev -q
"""

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("the Triton attention benchmark needs a CUDA device", allow_module_level=True)
triton = pytest.importorskip("triton")

from fastgpt.triton import attention as attn  # noqa: E402

# (B, H, Tq, Tk, D, causal): GPT-2 small and medium training shapes, a long sequence, a decode step.
SHAPES = [
    (8, 12, 1024, 1024, 64, True),
    (4, 16, 2048, 2048, 64, True),
    (2, 16, 4096, 4096, 128, True),
    (4, 16, 2048, 2048, 128, False),
    (16, 12, 1, 4096, 64, True),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONTENDERS = ("fastgpt", "eager", "compile")


def _id(shape):
    B, H, Tq, Tk, D, causal = shape
    return f"B{B}H{H}q{Tq}k{Tk}d{D}{'c' if causal else ''}"


def _torch_sdpa(q, k, v, causal):
    Tq, Tk = q.shape[2], k.shape[2]
    if causal and Tq != Tk:
        # torch's is_causal is top-left aligned; bottom-right as a boolean mask.
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("contender", CONTENDERS)
def test_bench_attention(benchmark, contender, shape, dtype, mode):
    B, H, Tq, Tk, D, causal = shape
    if mode == "fwd+bwd" and Tq == 1:
        pytest.skip("decode is forward-only")
    dt = DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, Tq, D, device="cuda", dtype=dt, generator=g)
    k = torch.randn(B, H, Tk, D, device="cuda", dtype=dt, generator=g)
    v = torch.randn(B, H, Tk, D, device="cuda", dtype=dt, generator=g)
    do = torch.randn_like(q)
    scale = D**-0.5
    benchmark.group = f"attention-{_id(shape)}-{dtype}-{mode}"

    if contender == "fastgpt":

        def fwd():
            return attn.attention_fwd(q, k, v, scale, causal, 0.0, 0, 0)

        def fwd_bwd():
            out, lse = fwd()
            return attn.attention_bwd(do, q, k, v, out, lse, scale, causal, 0.0, 0, 0)

    else:
        sdpa = _torch_sdpa if contender == "eager" else torch.compile(_torch_sdpa)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def fwd():
            with torch.no_grad():
                return sdpa(q, k, v, causal)

        def fwd_bwd():
            out = sdpa(qg, kg, vg, causal)
            return torch.autograd.grad(out, (qg, kg, vg), do)

    fn = _sync(fwd if mode == "fwd" else fwd_bwd)
    fn()  # compile / autotune outside the timing
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(fn, rounds=20, iterations=5, warmup_rounds=2)

    flops, nbytes = attn.attention_fwd_cost(B, H, Tq, Tk, D, q.element_size(), causal)
    if mode == "fwd+bwd":
        bwd_flops, bwd_bytes = attn.attention_bwd_cost(B, H, Tq, Tk, D, q.element_size(), causal)
        flops, nbytes = flops + bwd_flops, nbytes + bwd_bytes
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        tflops=flops / seconds / 1e12,
        gbps=nbytes / seconds / 1e9,
        peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20,
    )
