"""The cache of large CPU output blocks (csrc/output_memory.h): reuse, its cap, its API, and
that no op reads what an earlier call left in a reused block."""

import multiprocessing
import threading

import pytest
import torch
import torch.nn.functional as TF
from conftest import CPU_BACKENDS, run_on, run_python

import fastgpt
import fastgpt.functional as F
from fastgpt import _cpu, profiling
from fastgpt.ops.output_memory import empty_output_like

MIB = 2**20


@pytest.fixture
def cpu_kernels():
    with run_on(CPU_BACKENDS[-1]):
        fastgpt.empty_cache()
        yield
        fastgpt.empty_cache()


def test_freed_output_is_reused_and_small_ones_are_not(cpu_kernels):
    like = torch.empty(1024, 2048)  # 8 MiB
    a = empty_output_like(like)
    assert a.shape == like.shape and a.is_contiguous() and a.data_ptr() % (2 * MIB) == 0
    ptr = a.data_ptr()
    del a
    info = fastgpt.output_cache_info()
    assert info["idle_blocks"] == 1 and info["idle_bytes"] == 8 * MIB
    hits = info["hits"]
    b = empty_output_like(like)
    assert b.data_ptr() == ptr and fastgpt.output_cache_info()["hits"] == hits + 1
    assert fastgpt.output_cache_info()["idle_blocks"] == 0
    small = empty_output_like(torch.empty(512, 1024))  # 2 MiB: ATen's allocator
    del small
    assert fastgpt.output_cache_info()["idle_blocks"] == 0
    del b
    fastgpt.empty_cache()
    assert fastgpt.output_cache_info()["idle_bytes"] == 0


def test_op_outputs_come_from_the_cache(cpu_kernels):
    x = torch.randn(1024, 2048)
    y = F.gelu(x, "tanh")
    ptr = y.data_ptr()
    del y
    y2 = F.gelu(x, "tanh")
    assert y2.data_ptr() == ptr
    torch.testing.assert_close(y2, TF.gelu(x, approximate="tanh"), atol=1e-5, rtol=1e-5)


def test_block_of_a_size_within_an_eighth_is_reused_larger_is_not(cpu_kernels):
    a = empty_output_like(torch.empty(16 * MIB // 4))
    ptr = a.data_ptr()
    del a
    bigger = empty_output_like(torch.empty(18 * MIB // 4))  # 16 MiB is too small for it
    assert bigger.data_ptr() != ptr
    smaller = empty_output_like(torch.empty(15 * MIB // 4))  # 16 MiB is within 1/8 of 15
    assert smaller.data_ptr() == ptr
    much_smaller = empty_output_like(torch.empty(8 * MIB // 4))
    del smaller
    assert empty_output_like(torch.empty(8 * MIB // 4)).data_ptr() != ptr
    del much_smaller


def test_views_keep_the_block_and_resize_works(cpu_kernels):
    a = empty_output_like(torch.empty(1024, 2048))
    a.copy_(torch.arange(a.numel(), dtype=torch.float32).view_as(a))
    view = a[5:7]
    del a
    assert fastgpt.output_cache_info()["idle_blocks"] == 0  # the view holds the storage
    assert view[1, 3].item() == 6 * 2048 + 3
    a = empty_output_like(torch.empty(1024, 2048)).fill_(1.0)
    a.resize_(2048, 2048)  # the cache allocates the bigger storage; the old block goes back
    a[1024:] = 2.0
    assert a[:1024].sum().item() == 1024 * 2048 and a[1024:].mean().item() == 2.0
    del view


def test_threads_allocating_at_once_get_distinct_blocks(cpu_kernels):
    like = torch.empty(1024, 1024)  # 4 MiB
    errors = []

    def work(k):
        try:
            for i in range(50):
                t = empty_output_like(like).fill_(float(k))
                if t.min().item() != k or t.max().item() != k:
                    errors.append((k, i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _child_allocates(queue):
    # One thread: a forked child that enters torch's OpenMP pool after the parent used it
    # hangs in libgomp, with or without this cache. What is under test is the cache's lock.
    torch.set_num_threads(1)
    t = empty_output_like(torch.empty(1024, 2048)).fill_(3.0)
    queue.put(t.sum().item())


def test_forked_child_can_allocate(cpu_kernels):
    keep = empty_output_like(torch.empty(1024, 2048))
    del keep  # an idle block the child inherits
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child_allocates, args=(queue,))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and queue.get(timeout=5) == 3.0 * 1024 * 2048


def test_cap_evicts_oldest_and_zero_turns_the_cache_off():
    code = (
        "import torch, fastgpt\n"
        "from fastgpt.ops.output_memory import empty_output_like as e\n"
        "a, b = e(torch.empty(2 * 2**20)), e(torch.empty(2 * 2**20))\n"  # 8 MiB each
        "del a, b\n"
        "i = fastgpt.output_cache_info()\n"
        "print(i['idle_blocks'], i['idle_bytes'] // 2**20, i['cap_bytes'] // 2**20)\n"
    )
    assert run_python(code, FASTGPT_OUTPUT_CACHE_MB="12") == "1 8 12"
    assert run_python(code, FASTGPT_OUTPUT_CACHE_MB="0") == "0 0 0"
    assert run_python(code, FASTGPT_OUTPUT_CACHE_MB="") == "2 16 1024"


def test_invalid_cap_is_a_clear_error():
    code = (
        "import torch, fastgpt.functional as F\n"
        "try:\n    F.gelu(torch.randn(1024, 2048))\nexcept RuntimeError as e:\n    print(e)\n"
    )
    out = run_python(code, FASTGPT_OUTPUT_CACHE_MB="lots")
    assert "FASTGPT_OUTPUT_CACHE_MB must be a whole number of MiB" in out and "'lots'" in out


def test_peak_meter_counts_outputs_the_cache_would_have_served(cpu_kernels):
    x = torch.randn(1024, 2048)
    F.gelu(x)  # leaves an idle 8 MiB block
    assert fastgpt.output_cache_info()["idle_bytes"] >= 8 * MIB
    assert profiling.peak_bytes(lambda: F.gelu(x)) >= 8 * MIB  # the meter empties the cache


def test_live_peak_does_not_count_idle_blocks(cpu_kernels):
    if not profiling.live_peak_supported():
        pytest.skip("needs glibc's mallinfo2")
    blocks = [empty_output_like(torch.empty(1024, 2048)) for _ in range(4)]
    with profiling.LivePeak() as held:
        pass
    del blocks
    with profiling.LivePeak() as idle:
        pass
    assert fastgpt.output_cache_info()["idle_bytes"] == 32 * MIB
    assert held.base - idle.base >= 30 * MIB  # the idle 32 MiB is not "live"


# ---- no kernel reads a reused block: each op runs once, every idle block is overwritten with
# 0xFF bytes (NaN in every float dtype), and the op runs again: the second run must give the
# first run's outputs and gradients bit for bit (the kernels are deterministic at a fixed
# thread count), so no kernel leaves part of an output unwritten or accumulates into it.


def _ops():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x, r = rand(1024, 1536), rand(1024, 1536)  # 6 MiB
    w, b = rand(1536), rand(1536)
    lw, lx = rand(4096, 512), rand(1024, 512)  # outputs (1024, 4096) and d_weight: 16, 8 MiB
    target = torch.randint(0, 2048, (1024,), generator=g)
    logits = rand(1024, 2048)  # gradient 8 MiB
    q, k, v = (rand(2, 8, 1024, 64) for _ in range(3))  # 4 MiB each
    return {
        "layer_norm": ((x, w, b), lambda: F.layer_norm(x, (1536,), w, b)),
        "add_layer_norm": ((x, r, w, b), lambda: F.add_layer_norm(x, r, (1536,), w, b)),
        "bias_gelu": ((x, b), lambda: F.bias_gelu(x, b)),
        "linear": ((lx, lw), lambda: F.linear(lx, lw)),
        "cross_entropy": ((logits,), lambda: F.cross_entropy(logits, target)),
        "linear_cross_entropy": ((lx, lw), lambda: F.linear_cross_entropy(lx, lw, target)),
        "attention": (
            (q, k, v),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ),
    }


def _outputs_and_grads(fn, inputs):
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    seeds = [torch.ones_like(o) if o.dim() == 0 else torch.cos(o.detach()) for o in outs]
    grads = torch.autograd.grad(outs, inputs, seeds)
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("op", list(_ops()))
def test_reused_blocks_are_written_in_full(cpu_kernels, op):
    inputs, fn = _ops()[op]
    # Clones (ATen's memory) keep the first results; the op's own blocks go back idle.
    first = [t.clone() for t in _outputs_and_grads(fn, inputs)]
    assert fastgpt.output_cache_info()["idle_blocks"] > 0
    _cpu.fill_idle_output_cache(0xFF)
    hits = fastgpt.output_cache_info()["hits"]
    again = _outputs_and_grads(fn, inputs)
    assert fastgpt.output_cache_info()["hits"] > hits  # the poisoned blocks were handed out
    for a, b in zip(first, again):
        assert torch.isfinite(b).all() and torch.equal(a, b)
