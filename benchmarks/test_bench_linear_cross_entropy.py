"""linear_cross_entropy at a GPT head, (N, C) hidden states x (V, C) weight: fastgpt vs eager
(``input @ W.T`` then ``F.cross_entropy``) vs torch.compile of that vs torch's own
``F.linear_cross_entropy`` (``torch``: its default, options=None, the unchunked reference;
``torch_chunked``: options=LinearCrossEntropyOptions()), with peak memory in extra_info.

    python -m pytest benchmarks/test_bench_linear_cross_entropy.py --benchmark-only \
        --benchmark-columns=mean,stddev -q

Rows: 1024 tokens at GPT-2 small's head (the smoke run's shape); 4096 tokens at small's head and
at hidden 1600 x Llama 3's vocabulary (big: 10 s to minutes a call on a 2-core CPU, so the smoke
run skips them and the timed run takes 2 rounds).
"""

import pytest
from _params import ARGS, big, params

SHAPES = [(1024, 768, 50257), big((4096, 768, 50257)), big((4096, 1600, 128256))]


@pytest.mark.parametrize(ARGS, params("linear_cross_entropy", SHAPES))
def test_linear_cross_entropy(run_case, op, shape, dtype, mode, contender):
    run_case(op, shape, dtype, mode, contender, min_rounds=2 if shape[0] >= 4096 else 5)
