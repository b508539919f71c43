"""Loading fastgpt's C++ CPU kernels.

setup.py compiles the kernels once per instruction set into fastgpt/_C_default, _C_avx2 and
_C_avx512. The best build the running CPU supports (as torch itself detects it) is loaded at the
first CPU-kernel call; ``FASTGPT_CPU_ISA=default|avx2|avx512`` forces a lower one. Each build
registers its kernels for the CPU dispatch key and can unregister them again, so
``use_isa(name)`` switches builds inside one process (the tests run every op on every build).

fp32 matrix products inside the kernels (F.linear, the fused linears, linear + cross-entropy,
attention's block products) go to oneDNN or MKL, both ATen's, as
``FASTGPT_CPU_GEMM=auto|onednn|aten`` says (csrc/gemm.h: why and when); ``use_gemm(name)``
switches it at run time.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch

ISAS = ("default", "avx2", "avx512")  # lowest first
# FASTGPT_EXT_DIR: load the builds from another folder (the ASan build of scripts/asan.sh).
_HERE = os.environ.get("FASTGPT_EXT_DIR") or os.path.dirname(os.path.abspath(__file__))
_libs: dict[str, ctypes.CDLL] = {}
_active: tuple[str, int] | None = None  # (isa, registration handle)

GEMMS = ("auto", "onednn", "aten")  # csrc/gemm.h's Choice, in its order


def _check_gemm(name: str, source: str) -> str:
    if name not in GEMMS:
        raise ValueError(f"{source} must be one of {GEMMS}, got {name!r}")
    return name


_gemm = _check_gemm(os.environ.get("FASTGPT_CPU_GEMM") or "auto", "FASTGPT_CPU_GEMM")


def _path(isa: str) -> str | None:
    found = glob.glob(os.path.join(_HERE, f"_C_{isa}.*.so")) + glob.glob(
        os.path.join(_HERE, f"_C_{isa}.so")
    )
    return found[0] if found else None


def supported_isas() -> list[str]:
    """ISA builds that are present and that this CPU can run, lowest first."""
    best = torch.backends.cpu.get_cpu_capability().lower()  # "default", "avx2", "avx512", ...
    top = ISAS.index(best) if best in ISAS else 0
    return [isa for isa in ISAS[: top + 1] if _path(isa)]


def default_isa() -> str:
    isas = supported_isas()
    if not isas:
        raise RuntimeError(
            "fastgpt's C++ CPU kernels are not built. From the fastgpt source folder run:\n"
            "    pip install torch==2.13.0 && pip install --no-build-isolation -e .\n"
            "or force the plain-PyTorch path with FASTGPT_BACKEND=reference."
        )
    forced = os.environ.get("FASTGPT_CPU_ISA")
    if forced:
        if forced not in isas:
            raise RuntimeError(f"FASTGPT_CPU_ISA={forced!r}: this CPU and build support {isas}")
        return forced
    return isas[-1]


def _lib(isa: str) -> ctypes.CDLL:
    if isa not in _libs:
        path = _path(isa)
        if path is None:
            raise RuntimeError(f"fastgpt's {isa} CPU build is missing; rebuild fastgpt")
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        lib.fastgpt_register_cpu_kernels.restype = ctypes.c_void_p
        lib.fastgpt_unregister_cpu_kernels.argtypes = [ctypes.c_void_p]
        lib.fastgpt_cpu_isa.restype = ctypes.c_char_p
        lib.fastgpt_set_gemm_choice.argtypes = [ctypes.c_int]
        lib.fastgpt_output_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        _libs[isa] = lib
    return _libs[isa]


def load(isa: str) -> None:
    """Register the CPU kernels of build ``isa``, replacing whichever build was registered."""
    global _active
    if isa not in supported_isas():
        raise RuntimeError(f"ISA build {isa!r} is not available here: {supported_isas()}")
    if _active is not None and _active[0] == isa:
        return
    lib = _lib(isa)
    if _active is not None:
        _lib(_active[0]).fastgpt_unregister_cpu_kernels(_active[1])
        _active = None
    lib.fastgpt_set_gemm_choice(GEMMS.index(_gemm))
    _active = (isa, lib.fastgpt_register_cpu_kernels())


def ensure_loaded() -> None:
    if _active is None:
        load(default_isa())


def loaded() -> bool:
    return _active is not None


def try_load() -> None:
    """Register the best build at import time, so the kernels are in place before any call
    (and before torch.compile traces one); a missing build is reported at first use instead."""
    with suppress(RuntimeError):
        ensure_loaded()


def current_isa() -> str:
    ensure_loaded()
    assert _active is not None
    return _active[0]


def float_lanes() -> int:
    """fp32 lanes of the active build's at::vec::Vectorized<float> (16 on AVX-512)."""
    return _lib(current_isa()).fastgpt_float_lanes()


@contextmanager
def use_isa(isa: str) -> Iterator[None]:
    """Run the block on the CPU kernels of build ``isa``."""
    previous = _active[0] if _active else None
    load(isa)
    try:
        yield
    finally:
        if previous:
            load(previous)


def empty_output_cache() -> None:
    """Free every idle block of the kernels' output cache (csrc/output_memory.h), in every
    build loaded so far (each has its own cache)."""
    for lib in _libs.values():
        lib.fastgpt_output_cache_release()


def fill_idle_output_cache(byte: int) -> None:
    """For tests: overwrite every idle block of the output caches with ``byte`` (0xFF reads as
    NaN in every float dtype), so a kernel that leaves part of a reused output unwritten shows
    it instead of an earlier call's values."""
    for lib in _libs.values():
        lib.fastgpt_output_cache_fill_idle(byte)


def output_cache_stats() -> dict[str, int]:
    """The output caches' totals over the loaded builds: idle bytes and blocks (kept for reuse,
    resident, not in use by any tensor), hits and misses of large allocations, and the cap."""
    total = dict.fromkeys(("idle_bytes", "idle_blocks", "hits", "misses", "cap_bytes"), 0)
    for lib in _libs.values():
        out = (ctypes.c_uint64 * 5)()
        if lib.fastgpt_output_cache_stats(out) != 0:
            raise RuntimeError(
                "FASTGPT_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got "
                f"{os.environ.get('FASTGPT_OUTPUT_CACHE_MB')!r}"
            )
        for key, value in zip(total, out):
            total[key] = value if key == "cap_bytes" else total[key] + value
    return total


def gemm_library() -> str:
    """The library the kernels' large fp32 products run on now: "onednn" or "mkl"."""
    if _gemm == "aten" or not _lib(current_isa()).fastgpt_onednn_usable():
        return "mkl"
    return "onednn"


@contextmanager
def use_gemm(name: str) -> Iterator[None]:
    """Run the block with fp32 products chosen by ``name`` (one of ``GEMMS``)."""
    global _gemm
    previous, _gemm = _gemm, _check_gemm(name, "gemm")
    if _active is not None:
        _lib(_active[0]).fastgpt_set_gemm_choice(GEMMS.index(name))
    try:
        yield
    finally:
        _gemm = previous
        if _active is not None:
            _lib(_active[0]).fastgpt_set_gemm_choice(GEMMS.index(previous))
