"""F.linear at GPT-2 small's four projections (4 x 512 tokens): fastgpt vs torch eager vs
torch.compile, forward and forward+backward, fp32 and bf16, with peak memory in extra_info.

    python -m pytest benchmarks/test_bench_linear.py --benchmark-only \
        --benchmark-columns=min,mean,stddev -q

Rows (N, K, M): c_attn (768 -> 2304), attention's c_proj (768 -> 768), c_fc (768 -> 3072) and the
MLP's c_proj (3072 -> 768). fastgpt's fp32 products run on oneDNN where MKL (eager's) would run
slower kernels (csrc/gemm.h); FASTGPT_CPU_GEMM=aten makes them eager's, for comparison.

DECODE: one token's products in a decode step (forward only): the logits (768 -> 50257, 154 MB
of fp32 weights read per token) and c_fc, with 1 and 4 rows (a batch of four sequences).
fastgpt multiplies up to four rows by the weight itself (csrc/linear.cpp), bound by reading it.
"""

import pytest
from _params import ARGS, params

SHAPES = [(2048, 768, 2304), (2048, 768, 768), (2048, 768, 3072), (2048, 3072, 768)]
DECODE = [(1, 768, 50257), (4, 768, 50257), (1, 768, 3072), (4, 768, 3072)]


@pytest.mark.parametrize(ARGS, params("linear", SHAPES) + params("linear", DECODE, modes=["fwd"]))
def test_linear(run_case, op, shape, dtype, mode, contender):
    run_case(op, shape, dtype, mode, contender)
