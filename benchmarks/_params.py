"""Parametrisation shared by the per-op suites: every contender of an op, per shape, dtype, mode.

Test ids read ``<op>-<shape>-<dtype>-<mode>-<contender>`` like the benchmark groups, so ``-k``
selects by any of them (``-k "gelu_tanh and 8192x3072 and fwd+bwd"``).
"""

import pytest
import torch

from fastgpt import bench_cases

ARGS = "op, shape, dtype, mode, contender"


def big(shape):
    """A shape the smoke run (--benchmark-disable) skips; see conftest.py."""
    return pytest.param(shape, marks=pytest.mark.big)


def params(ops, shapes, dtypes=(torch.float32, torch.bfloat16), modes=bench_cases.MODES):
    """pytest params (op, shape, dtype, mode, contender) for every contender of each op."""
    out = []
    for op in [ops] if isinstance(ops, str) else ops:
        for shape in shapes:
            marks = shape.marks if hasattr(shape, "marks") else ()
            shape = shape.values[0] if hasattr(shape, "values") else shape
            for dtype in dtypes:
                dt = str(dtype).removeprefix("torch.")
                for mode in modes:
                    for who in bench_cases.contenders(op):
                        ident = f"{op}-{'x'.join(map(str, shape))}-{dt}-{mode}-{who}"
                        out.append(pytest.param(op, shape, dtype, mode, who, marks=marks, id=ident))
    return out
