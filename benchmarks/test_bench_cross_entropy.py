"""cross_entropy on GPT-2-sized logits: fastgpt vs torch eager vs torch.compile, time and peak
memory (extra_info["peak_mb"]; fastgpt/profiling.py explains the method).

    python -m pytest benchmarks/test_bench_cross_entropy.py --benchmark-only \
        --benchmark-columns=mean,stddev -q

Rows: 4096 tokens against GPT-2's vocabulary (50257) and Llama 3's (128256; 2 GB of fp32 logits,
marked big: the smoke run skips it).
"""

import pytest
from _params import ARGS, big, params

SHAPES = [(4096, 50257), big((4096, 128256))]


@pytest.mark.parametrize(ARGS, params("cross_entropy", SHAPES))
def test_cross_entropy(run_case, op, shape, dtype, mode, contender):
    run_case(op, shape, dtype, mode, contender)
