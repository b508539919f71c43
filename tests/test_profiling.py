"""The CPU peak-memory meter must see a known allocation, and not see what was freed before."""

import pytest
import torch

from fastgpt import profiling

pytestmark = pytest.mark.skipif(
    not profiling.cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)"
)

MB = 1 << 20


def test_sees_a_known_allocation():
    def alloc():
        t = torch.empty(100 * MB // 4)
        t.fill_(1.0)  # touch every page
        return t

    peak = profiling.peak_bytes(alloc)
    assert 99 * MB <= peak <= 110 * MB, peak


def test_sees_temporaries_freed_inside_the_call():
    def temporaries():
        a = torch.ones(50 * MB // 4)
        b = a * 2  # 50 MB more, both alive
        del a, b
        return torch.zeros(1)

    peak = profiling.peak_bytes(temporaries)
    assert 99 * MB <= peak <= 110 * MB, peak


def test_memory_freed_before_is_not_reused_silently():
    # Without malloc_trim, the third call reuses the second call's freed heap pages (glibc grows
    # its mmap threshold after the first free) and shows no growth at all: seen here as
    # [21.4, 19.9, 0.0, 20.0] MB for four 20 MB calls.
    def alloc():
        return torch.ones(20 * MB // 4)

    peaks = [profiling.peak_bytes(alloc) for _ in range(4)]
    assert all(p >= 19 * MB for p in peaks), peaks


def test_time_call_is_positive():
    assert profiling.time_call(lambda: torch.ones(10).sum(), repeat=3, warmup=1) > 0


def test_resident_peak_around_a_block():
    with profiling.ResidentPeak() as p:
        t = torch.ones(100 * MB // 4)
        del t
    assert p.base > 0 and 99 * MB <= p.added <= 110 * MB, (p.base, p.peak)


@pytest.mark.skipif(not profiling.live_peak_supported(), reason="needs glibc's mallinfo2")
def test_live_peak_sees_what_is_held_at_once():
    import time

    with profiling.LivePeak() as p:
        a = torch.ones(50 * MB // 4)
        time.sleep(0.01)  # several samples while it is alive
        del a
        b = torch.ones(30 * MB // 4)  # after a's free: the peak stays 50 MB, not 80
        time.sleep(0.01)
        del b
    assert 49 * MB <= p.added <= 55 * MB, (p.base, p.peak)
