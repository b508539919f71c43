"""GELU (tanh and exact erf) and bias+GELU: fastgpt vs torch eager vs torch.compile.

    python -m pytest benchmarks/test_bench_gelu.py --benchmark-only \
        --benchmark-columns=mean,stddev -q

The eager bias_gelu_tanh / bias_gelu_erf is the pair ``x + b`` then ``F.gelu``. Rows: the MLP
activations of GPT-2 small and xl (8 x 1024 tokens, 4 x hidden 768 and 1600). At these sizes
every output is a fresh allocation of 100 MB or more whose first touch page-faults
(THP_MEM_ALLOC_ENABLE=1 cuts that cost; see conftest.py).
"""

import pytest
from _params import ARGS, params

SHAPES = [(8192, 3072), (8192, 6400)]


@pytest.mark.parametrize(
    ARGS, params(["gelu_tanh", "gelu_erf", "bias_gelu_tanh", "bias_gelu_erf"], SHAPES)
)
def test_gelu(run_case, op, shape, dtype, mode, contender):
    run_case(op, shape, dtype, mode, contender)
