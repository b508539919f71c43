"""Shared set-up for the pytest-benchmark suites: one convention for every op.

Every case is a pytest-benchmark group ``<op>-<shape>-<dtype>-<mode>`` (modes ``fwd`` and
``fwd+bwd``) holding one result per contender, built by fastgpt/bench_cases.py, the same builders
``fastgpt bench`` uses. Every contender runs under the same settings, stated in the run header,
in each result's extra_info and in the saved JSON's machine_info:

* torch's thread count (``FASTGPT_BENCH_THREADS`` sets it; torch's default otherwise);
* the allocator: ``THP_MEM_ALLOC_ENABLE`` as set in the environment (it must be set before torch
  allocates, so it is not switched here), glibc malloc's defaults otherwise;
* one untimed call (compilation for torch.compile), then one warm-up call whose time sets the
  round count, then the timed rounds: as many as fill ``FASTGPT_BENCH_MIN_TIME`` seconds (default
  1; at least the case's own minimum, 5 unless it says fewer; at most 1000). On a shared VM one
  burst from another job can cover five 3 ms rounds whole and flip a ratio; a second of rounds
  makes the min and the median repeatable.
  Peak memory is measured after the timing (fastgpt/profiling.py explains how and why).

    python -m pytest benchmarks/ --benchmark-only                      # the default allocator
    THP_MEM_ALLOC_ENABLE=1 python -m pytest benchmarks/ --benchmark-only

Under ``--benchmark-disable`` (CI's smoke run) every case runs once, and cases marked ``big``
(more than ~10 s a call on a 2-core CPU; the same code runs at the op's smaller shapes) are
skipped, with that reason.
"""

import math
import os
import time

import pytest
import torch

from fastgpt import bench_cases, profiling

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_ROUNDS = 1000
SMOKE_SKIP_BIG = (
    "big shape, skipped by the smoke run (--benchmark-disable): the same code runs at this op's "
    "smaller shapes; time it with --benchmark-only"
)


def min_time() -> float:
    return float(os.environ.get("FASTGPT_BENCH_MIN_TIME", "1"))


def timed_rounds(fn, at_least: int) -> int:
    """Rounds that fill min_time() seconds, judged by one call: the warm-up round."""
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    return max(at_least, min(MAX_ROUNDS, math.ceil(min_time() / max(once, 1e-6))))


def settings() -> dict:
    return {
        "device": DEVICE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "min_time_s": min_time(),
        "allocator": profiling.allocator_settings(),
    }


def pytest_configure(config):
    config.addinivalue_line("markers", "big: a shape the smoke run (--benchmark-disable) skips")
    if os.environ.get("FASTGPT_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTGPT_BENCH_THREADS"]))


def pytest_report_header(config):
    s = settings()
    return (
        f"fastgpt benchmarks on {s['device']}: torch {s['torch']}, {s['threads']} threads, "
        f"{s['allocator']}"
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    # Saved with every run, so a comparison across runs shows when the settings differed.
    machine_info["fastgpt_settings"] = settings()


@pytest.fixture
def run_case(benchmark, request):
    """run_case(op, shape, dtype, mode, contender): time one contender of one case."""

    def run(op, shape, dtype, mode, contender, min_rounds=5):
        if benchmark.disabled and request.node.get_closest_marker("big"):
            pytest.skip(SMOKE_SKIP_BIG)
        case = bench_cases.make_case(op, shape, dtype, mode, DEVICE, contenders=(contender,))
        if contender in case.skipped:
            pytest.skip(case.skipped[contender])
        fn = case.calls[contender]
        benchmark.group = case.name
        benchmark.extra_info.update(contender=contender, flops=case.flops, bytes=case.bytes)
        benchmark.extra_info.update(settings())
        if benchmark.disabled:  # smoke run: one call, nothing measured
            benchmark.pedantic(fn, rounds=1, iterations=1)
            return case
        fn()  # compilation (torch.compile), lazy initialisation
        rounds = timed_rounds(fn, min_rounds)
        benchmark.pedantic(fn, rounds=rounds, iterations=1)
        # After the timing: the meter hands glibc's free pages back to the OS, which would make
        # the timed calls that followed it page-fault more than they do in a loop.
        peak = profiling.peak_bytes(fn, DEVICE)
        mean = benchmark.stats.stats.mean
        benchmark.extra_info.update(
            peak_mb=round(peak / 2**20, 2),
            gflops=round(case.flops / mean / 1e9, 2),
            gbps=round(case.bytes / mean / 1e9, 2),
        )
        return case

    return run
