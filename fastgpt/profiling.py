"""Measuring peak memory and time honestly on CPU and CUDA.

torch has no allocator statistics for CPU tensors, so peak CPU memory is read from the kernel:
``VmHWM`` (the resident-set high-water mark) in /proc/self/status, after resetting it to the
current resident size by writing "5" to /proc/self/clear_refs. Two things could hide
allocations from it, and both are handled:

* glibc keeps freed memory for reuse, so a call could reuse pages freed by an earlier one and
  show no growth: ``malloc_trim(0)`` hands every free page back to the OS before the call.
  fastgpt's own cache of large output blocks (csrc/output_memory.h) is emptied first, for
  the same reason.
* ``ru_maxrss`` is inherited across fork/exec, so it is never used.

``peak_bytes(fn)`` is then the call's peak resident memory above what was resident before it:
its outputs plus every temporary, page-touched; ``ResidentPeak`` is the same meter around a block
(benchmarks/gpt_worker.py wraps a training step in it). tests/test_profiling.py checks it sees a
known allocation. This is the project's one method: in-process, so it measures the call as the
benchmark times it (same warm caches, same compiled graph), with no fresh interpreter whose
import-time allocations would have to be told apart from the call's. Timing is left with
glibc's default behaviour (freed memory reused), as users run, and peaks are taken after it.
On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.

``LivePeak`` is the second figure the GPT benchmark reports: the most bytes the program held
allocated at once (glibc's ``mallinfo2``, sampled by a thread, less the idle blocks of
fastgpt's output cache), without the freed-but-resident pages of a fragmented heap that the
resident figure also counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable

import torch


def _trim_malloc() -> None:
    """Return free memory to the OS so that later allocations must fault pages in: fastgpt's
    output cache first (its idle blocks are glibc allocations), then glibc's free pages."""
    from fastgpt import _cpu

    _cpu.empty_output_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cached_idle_bytes() -> int:
    """Bytes fastgpt's output cache holds for reuse: allocated from glibc, used by no tensor."""
    from fastgpt import _cpu

    return _cpu.output_cache_stats()["idle_bytes"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_peak_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


class ResidentPeak:
    """``with ResidentPeak() as p: ...`` then ``p.base`` / ``p.peak``: resident bytes just before
    the block (after handing free pages back) and at its high-water mark (CPU, Linux)."""

    def __enter__(self) -> ResidentPeak:
        gc.collect()
        _trim_malloc()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.base = _status_kib("VmRSS") * 1024
        self.peak = self.base
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _status_kib("VmHWM") * 1024

    @property
    def added(self) -> int:
        return max(0, self.peak - self.base)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc_in_use() -> Callable[[], int] | None:
    """A function giving the bytes glibc's malloc has handed out and not had back (heap chunks in
    use plus mmapped blocks), or None where there is no ``mallinfo2`` (not glibc, or < 2.33)."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd - _cached_idle_bytes()

    return in_use


def live_peak_supported() -> bool:
    return _malloc_in_use() is not None


class LivePeak:
    """``with LivePeak() as p: ...`` then ``p.base`` / ``p.peak``: bytes allocated and not yet
    freed (every CPU tensor's storage among them), before the block and at the highest of the
    samples a thread takes every ``interval`` seconds during it (glibc, Linux).

    ResidentPeak's figure also counts what the allocator keeps resident after a free: pages of
    a fragmented heap that later allocations of other sizes cannot use. This one is what the
    program holds at once, whatever the allocator does with the rest, so it compares two
    programs' own memory. A block of memory that lives for less than ``interval`` can be missed.
    """

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self._in_use = _malloc_in_use()
        if self._in_use is None:
            raise RuntimeError("LivePeak needs glibc's mallinfo2 (glibc 2.33 or later)")

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, self._in_use())

    def __enter__(self) -> LivePeak:
        gc.collect()
        self.base = self.peak = self._in_use()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._in_use())

    @property
    def added(self) -> int:
        return max(0, self.peak - self.base)


def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak memory of one call of ``fn`` above what was in use before it, in bytes."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    with ResidentPeak() as p:
        out = fn()
    del out
    return p.added


def time_call(fn: Callable[[], object], device: str = "cpu", repeat: int = 5, warmup: int = 2):
    """Median seconds of ``repeat`` calls after ``warmup`` calls (synchronising on CUDA)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def allocator_settings() -> str:
    """The allocator settings of a run, for the report: torch's (every torch allocation) and
    fastgpt's for its kernels' large CPU outputs: huge pages and the output cache's cap (see
    csrc/output_memory.h)."""
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    huge = "0" if os.environ.get("FASTGPT_HUGE_PAGES", "1") == "0" else "1"
    cache = os.environ.get("FASTGPT_OUTPUT_CACHE_MB") or "1024"
    return (
        f"THP_MEM_ALLOC_ENABLE={thp}, FASTGPT_HUGE_PAGES={huge}, "
        f"FASTGPT_OUTPUT_CACHE_MB={cache}, glibc malloc defaults"
    )
