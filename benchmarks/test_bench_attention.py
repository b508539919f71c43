"""Causal attention on the present device: fastgpt's flash kernel vs torch's own
F.scaled_dot_product_attention (eager) vs torch.compile of it vs the naive masked-softmax module.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-only \
        --benchmark-columns=mean,stddev -q

Shapes are (B, H, Tq, Tk, D): training at T = 128 to 8192 with GPT-2 small's 12 heads and xl's 25
(head dim 64), and one decode step (Tq = 1 against 8192 cached keys, forward only);
``attention_dropout`` repeats two training shapes with dropout_p = 0.1; ``attention_gqa`` has
grouped key/value heads (``enable_gqa``): a decode step of one and of four new tokens, and a
training step. The naive module does not run where its (B, H, T, T) scores and their gradients
would pass 4 GB (the skip says how much); T = 8192 is marked big (several seconds a call): the
smoke run skips it.
"""

import pytest
import torch
from _params import ARGS, big, params

TRAIN = [
    (8, 12, 128, 128, 64),
    (2, 12, 1024, 1024, 64),
    (1, 25, 2048, 2048, 64),
    big((1, 12, 8192, 8192, 64)),
]
DECODE = [(1, 12, 1, 8192, 64)]
# attention_dropout: the same causal attention with dropout_p = 0.1 (GPT-2's attn_pdrop).
DROPOUT = [(8, 12, 128, 128, 64), (2, 12, 1024, 1024, 64)]
# attention_gqa, (B, Hq, Hkv, Tq, Tk, D): a Llama-3-8B-shaped decode step (32 query heads on 8
# key/value heads of 128, 4096 cached keys), the same with 4 new tokens (speculative decoding:
# causal, eager given the bottom-right mask) and a training step with 12 heads on 4.
GQA_DECODE = [(1, 32, 8, 1, 4096, 128), (1, 32, 8, 4, 4096, 128)]
GQA_TRAIN = [(2, 12, 4, 1024, 1024, 64)]


@pytest.mark.parametrize(
    ARGS,
    params("attention", TRAIN)
    + params("attention", DECODE, modes=["fwd"])
    + params("attention_dropout", DROPOUT)
    + params("attention_gqa", GQA_DECODE, modes=["fwd"])
    + params("attention_gqa", GQA_TRAIN, dtypes=[torch.float32]),
)
def test_attention(run_case, op, shape, dtype, mode, contender):
    run_case(op, shape, dtype, mode, contender)
