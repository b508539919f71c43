"""LayerNorm and add_layer_norm: fastgpt vs torch eager vs torch.compile, fwd and fwd+bwd.

    python -m pytest benchmarks/test_bench_layer_norm.py --benchmark-only \
        --benchmark-columns=mean,stddev --benchmark-group-by=group

add_layer_norm's eager contender is ``x + r`` then ``F.layer_norm``. Rows: GPT-2 small and xl
training batches (8 x 1024 tokens, hidden 768 and 1600).
"""

import pytest
from _params import ARGS, params

SHAPES = [(8192, 768), (8192, 1600)]


@pytest.mark.parametrize(ARGS, params(["layer_norm", "add_layer_norm"], SHAPES))
def test_layer_norm(run_case, op, shape, dtype, mode, contender):
    run_case(op, shape, dtype, mode, contender)
