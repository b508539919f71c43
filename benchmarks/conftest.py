"""Shared set-up for the pytest-benchmark suites.

Every contender of a run runs under the same settings, stated in each result's extra_info and
in the run header: torch's thread count, the allocator settings (THP_MEM_ALLOC_ENABLE as set in
the environment, glibc's defaults otherwise; peak memory is measured as fastgpt/profiling.py
explains), and one warm-up round.

    python -m pytest benchmarks/ --benchmark-only                      # the default allocator
    THP_MEM_ALLOC_ENABLE=1 python -m pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

from fastgpt import bench_cases, profiling

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    return (
        f"fastgpt benchmarks on {DEVICE}: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {profiling.allocator_settings()}"
    )


@pytest.fixture
def run_case(benchmark):
    """run_case(op, shape, dtype, mode, contender): time one contender of one case."""

    def run(op, shape, dtype, mode, contender, rounds=5):
        case = bench_cases.make_case(op, shape, dtype, mode, DEVICE, contenders=(contender,))
        fn = case.calls[contender]
        fn()  # warm-up (and compilation for torch.compile) outside the measurement
        peak = profiling.peak_bytes(fn, DEVICE)
        benchmark.group = case.name
        benchmark.extra_info.update(
            contender=contender,
            peak_mb=round(peak / 2**20, 2),
            flops=case.flops,
            bytes=case.bytes,
            threads=torch.get_num_threads(),
            allocator=profiling.allocator_settings(),
        )
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        mean = benchmark.stats.stats.mean if benchmark.stats else None
        if mean:  # None under --benchmark-disable
            benchmark.extra_info["gflops"] = round(case.flops / mean / 1e9, 2)
            benchmark.extra_info["gbps"] = round(case.bytes / mean / 1e9, 2)
        return case

    return run
