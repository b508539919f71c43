"""LayerNorm and add_layer_norm: fastgpt vs torch eager vs torch.compile, fwd and fwd+bwd.

    python -m pytest benchmarks/test_bench_layer_norm.py --benchmark-only \
        --benchmark-columns=mean,stddev --benchmark-group-by=group
"""

import pytest
import torch

SHAPES = [(8192, 768), (8192, 1600)]


@pytest.mark.parametrize("contender", ["fastgpt", "eager", "compile"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_layer_norm(run_case, op, shape, dtype, mode, contender):
    run_case(op, shape, dtype, mode, contender)
