"""scaled_dot_product_attention: parity with torch and the reference on every CPU backend, dtype
and odd shape (causal and not, Tq != Tk both ways, head dims 16-256); dropout determinism, rate and
gradients under the same mask; bounded memory at T = 8192; custom-op registration; compile;
gradcheck; every input check of the C++ kernels. (The Triton kernels have their own test files.)"""

import logging
import math

import pytest
import torch
import torch.nn.functional as TF
from conftest import CPU_BACKENDS, HAS_TRITON, cpp_input_checks, run_on, run_python
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgpt.functional as F
from fastgpt import _backend, _cpu, reference
from fastgpt.ops.attention import AttentionFunction

BEST = f"cpu-{_cpu.supported_isas()[-1]}" if _cpu.supported_isas() else None
# Attention's fp32 tolerance starts at 1e-4 (DESIGN.md §3): a score is a D-term dot product and an
# output a Tk-term weighted sum, both summed in another order (blocked) than the reference.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}

# (B, H, Tq, Tk, D, causal): T 1/17/100/1023, D 16/64/80/128 (+256 once), Tq != Tk both ways with
# causal (Tq > Tk leaves the first Tq - Tk queries with no visible key: output 0), a decode step
# against a long cache (splits K/V), B·H = 1 and 3 (the split backward paths).
CASES = [
    (1, 2, 1, 1, 64, True),
    (2, 3, 17, 17, 16, True),
    (1, 2, 100, 100, 80, False),
    (1, 2, 100, 100, 64, True),
    (1, 1, 1023, 1023, 64, True),
    (1, 2, 1023, 1023, 128, False),
    (1, 1, 17, 100, 64, True),
    (1, 1, 100, 17, 80, True),
    (2, 1, 1, 1000, 64, True),
    (1, 1, 64, 80, 256, False),
    (3, 1, 33, 47, 128, True),
]


@pytest.fixture(params=["reference", *CPU_BACKENDS])
def backend(request):
    with run_on(request.param):
        yield request.param


def make(shape, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    return t.to(dtype).requires_grad_(requires_grad)


def qkv(b, h, tq, tk, d, dtype, seed=0, requires_grad=True):
    return (
        make((b, h, tq, d), dtype, seed, requires_grad),
        make((b, h, tk, d), dtype, seed + 1, requires_grad),
        make((b, h, tk, d), dtype, seed + 2, requires_grad),
    )


def assert_close(actual, expected, dtype, scale=1.0):
    tol = ATOL[dtype] * scale
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def check_case(case, dtype):
    b, h, tq, tk, d, causal = case
    q, k, v = qkv(b, h, tq, tk, d, dtype)
    dout = make((b, h, tq, d), dtype, 7, False)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    got = grads(out, (q, k, v), dout)
    # The oracle in higher precision on the same (rounded) inputs: float64 for fp32/fp64, fp32
    # for bf16/fp16 ("computed in fp32, rounded once").
    hi = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    qh, kh, vh = (t.detach().to(hi).requires_grad_() for t in (q, k, v))
    out_r = reference.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
    assert_close(out, out_r.to(dtype), dtype)
    for g, e in zip(got, grads(out_r, (qh, kh, vh), dout.to(hi))):
        assert_close(g, e.to(dtype), dtype)
    # torch's own function (an explicit bottom-right mask: torch's is_causal is top-left aligned
    # when Tq != Tk). Skipped where some query sees no key (torch gives NaN there).
    if not causal or tq <= tk:
        mask = reference.causal_mask(tq, tk) if causal else None
        out_t = TF.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        assert_close(out, out_t.to(dtype), dtype)
        for g, e in zip(got, grads(out_t, (qh, kh, vh), dout.to(hi))):
            assert_close(g, e.to(dtype), dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_parity(backend, case, dtype):
    if dtype != torch.float32 and case[2] * case[3] > 100_000:
        pytest.skip("low precision covered at the smaller shapes")
    check_case(case, dtype)


def test_float64(backend):
    check_case((2, 2, 33, 40, 16, True), torch.float64)


def test_fully_masked_rows_are_zero(backend):
    q, k, v = qkv(1, 2, 10, 4, 16, torch.float32)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.all(out[:, :, :6] == 0)
    g = grads(out, (q,), torch.ones_like(out))[0]
    assert torch.all(g[:, :, :6] == 0) and torch.isfinite(g).all()


@pytest.mark.parametrize("shape", [(17, 32), (3, 17, 32), (2, 3, 2, 17, 32)], ids=str)
def test_leading_dims(backend, shape):
    q = make(shape, torch.float32, 0)
    k = make(shape, torch.float32, 1)
    v = make(shape, torch.float32, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    out_t = TF.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert out.shape == shape
    assert_close(out, out_t, torch.float32)
    dout = make(shape, torch.float32, 3, False)
    for g, e in zip(grads(out, (q, k, v), dout), grads(out_t, (q, k, v), dout)):
        assert_close(g, e, torch.float32)


def test_noncontiguous_inputs(backend):
    q, k, v = (make((1, 17, 2, 32), torch.float32, s).transpose(1, 2) for s in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    assert_close(out, TF.scaled_dot_product_attention(q, k, v), torch.float32)


def test_empty_batch(backend):
    q, k, v = qkv(0, 2, 5, 5, 16, torch.float32)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (0, 2, 5, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    tq=st.integers(1, 300),
    tk=st.integers(1, 300),
    d=st.sampled_from([16, 24, 64, 80]),
    causal=st.booleans(),
    scale=st.sampled_from([None, 0.05, -0.2]),
)
def test_property_matches_reference(b, h, tq, tk, d, causal, scale):
    q, k, v = qkv(b, h, tq, tk, d, torch.float32, seed=tq * 7 + tk)
    dout = make((b, h, tq, d), torch.float32, 5, False)
    want = reference.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    want_g = grads(want, (q, k, v), dout)
    for isa in _cpu.supported_isas():
        with run_on(f"cpu-{isa}"):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            assert_close(out, want, torch.float32)
            for g, e in zip(grads(out, (q, k, v), dout), want_g):
                assert_close(g, e, torch.float32)


def test_gradcheck_float64_cpu():
    with run_on(BEST):
        for tq, tk, causal, p in [
            (7, 7, True, 0.0),
            (5, 9, True, 0.0),
            (9, 5, True, 0.0),
            (6, 11, False, 0.0),
            (7, 9, True, 0.3),
        ]:
            q, k, v = qkv(1, 2, tq, tk, 8, torch.float64)

            def fn(q, k, v, causal=causal, p=p):
                return AttentionFunction.apply(q, k, v, 0.4, causal, p, 1234, 5, "cpu")

            assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("isa", _cpu.supported_isas())
def test_opcheck(isa):
    with _cpu.use_isa(isa):
        q, k, v = qkv(2, 2, 17, 23, 16, torch.float32, requires_grad=False)
        seed = torch.tensor(3)
        for causal, p in [(True, 0.0), (False, 0.25)]:
            out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, 0.25, causal, p, seed, 0)
            torch.library.opcheck(
                torch.ops.fastgpt.attention_fwd, (q, k, v, 0.25, causal, p, seed, 0)
            )
            torch.library.opcheck(
                torch.ops.fastgpt.attention_bwd,
                (torch.randn_like(out), q, k, v, out, lse, 0.25, causal, p, seed, 0),
            )


def test_lse_is_logsumexp_of_scaled_scores():
    with run_on(BEST):
        q, k, v = qkv(1, 2, 9, 13, 16, torch.float32, requires_grad=False)
        _, lse = torch.ops.fastgpt.attention_fwd(q, k, v, 0.3, True, 0.0, None, 0)
        s = (q @ k.transpose(-1, -2)) * 0.3
        s = s.masked_fill(~reference.causal_mask(9, 13), float("-inf"))
        assert lse.dtype == torch.float32 and lse.shape == (1, 2, 9)
        assert_close(lse, torch.logsumexp(s, -1), torch.float32)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_compile_fullgraph(kv_heads):
    torch._dynamo.reset()

    def block(q, k, v):
        out = F.scaled_dot_product_attention(q * 2, k, v, is_causal=True, enable_gqa=True)
        # the folded GQA path too (not causal), in the same graph
        return (out + F.scaled_dot_product_attention(q, k, v, enable_gqa=True)).sum(-1)

    compiled = torch.compile(block, fullgraph=True)
    q, k, v = qkv(2, 2, 33, 33, 16, torch.float32)
    k, v = (t.detach()[:, :kv_heads].clone().requires_grad_() for t in (k, v))
    out, out_e = compiled(q, k, v), block(q, k, v)
    assert_close(out, out_e, torch.float32)
    dout = make(out.shape, torch.float32, 4, False)
    for g, e in zip(grads(out, (q, k, v), dout), grads(out_e, (q, k, v), dout)):
        assert_close(g, e, torch.float32)


# ---- dropout --------------------------------------------------------------------------------


def dropped_probs(b, h, tq, tk, causal, p, seed, offset=0):
    """The kernel's own P∘Z/(1-p), read out by attending with V = I (D = Tk)."""
    q, k, _ = qkv(b, h, tq, tk, tk, torch.float32, requires_grad=False)
    eye = torch.eye(tk).expand(b, h, tk, tk).contiguous()
    return AttentionFunction.apply(q, k, eye, 0.2, causal, p, seed, offset, "cpu")


def test_dropout_same_seed_same_output():
    with run_on(BEST):
        q, k, v = qkv(2, 2, 40, 40, 16, torch.float32, requires_grad=False)
        torch.manual_seed(0)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        torch.manual_seed(0)
        c = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        assert torch.equal(a, c) and not torch.equal(a, b)
        # The seed is drawn on the CPU whatever torch's default device is.
        torch.manual_seed(0)
        with torch.device("meta"):
            d = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        assert torch.equal(a, d)


def test_dropout_compile_fullgraph():
    # The seed is drawn as a tensor inside the graph: dropout compiles without a graph break, the
    # same torch seed gives the same output and gradients, and the backward regenerates the
    # forward's mask. With V = I the output is the dropped P itself (D = Tk), so the mask can be
    # read off it and the gradients checked against the explicit-mask reference.
    torch._dynamo.reset()
    p, scale, t = 0.3, 0.2, 33

    def block(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale)

    with run_on(BEST):
        compiled = torch.compile(block, fullgraph=True)
        q, k, _ = qkv(2, 2, t, t, t, torch.float32)
        v = torch.eye(t).expand(2, 2, t, t).contiguous().requires_grad_()
        dout = make(q.shape, torch.float32, 4, False)
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            out = compiled(q, k, v)
            runs.append((out, *grads(out, (q, k, v), dout)))
        for a, b in zip(runs[0], runs[1]):
            assert torch.equal(a, b)
        assert not torch.equal(runs[0][0], runs[2][0])
        out, *got = runs[0]
        s = (q @ k.transpose(-1, -2) * scale).masked_fill(
            ~reference.causal_mask(t, t), float("-inf")
        )
        probs = torch.softmax(s, -1)
        keep = (out != 0) | (probs == 0)
        assert 0.2 < (~keep)[probs != 0].float().mean().item() < 0.4  # 1122 draws, p = 0.3
        out_r = (probs * keep / (1 - p)) @ v
        assert_close(out, out_r, torch.float32)
        for g, e in zip(got, grads(out_r, (q, k, v), dout)):
            assert_close(g, e, torch.float32)


def test_dropout_rate_and_scale():
    with run_on(BEST):
        p = 0.3
        full = dropped_probs(4, 4, 64, 64, False, 0.0, 0)
        dropped = dropped_probs(4, 4, 64, 64, False, p, 99)
        ratio = dropped / full  # 0 where dropped, 1/(1-p) where kept
        kept = ratio != 0
        torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)))
        # 65536 Bernoulli draws: the drop rate's standard deviation is ~0.0018.
        assert abs((~kept).float().mean().item() - p) < 0.01
        other = dropped_probs(4, 4, 64, 64, False, p, 99, offset=1)
        assert not torch.equal(other, dropped)


@pytest.mark.parametrize("isa", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
# 1: the decode forward, then the general backward. (130, 150): rows longer than the mask's
# 64-counter chunks in the forward (keys) and in the backward (queries), with tails.
@pytest.mark.parametrize("tq,tk", [(37, 48), (1, 48), (3, 48), (8, 300), (130, 150)], ids=str)
def test_dropout_gradients_use_the_forwards_mask(isa, causal, tq, tk):
    with run_on(isa):
        b, h, p, seed = 2, 2, 0.25, 7
        probs = dropped_probs(b, h, tq, tk, causal, 0.0, seed)
        keep = dropped_probs(b, h, tq, tk, causal, p, seed) != 0
        keep |= probs == 0  # masked entries: nothing to drop
        q, k, v = qkv(b, h, tq, tk, 16, torch.float32, seed=3)
        out = AttentionFunction.apply(q, k, v, 0.2, causal, p, seed, 0, "cpu")
        # The explicit-mask reference: softmax, then the same Z, then · V.
        s = (q @ k.transpose(-1, -2)) * 0.2
        if causal:
            s = s.masked_fill(~reference.causal_mask(tq, tk), float("-inf"))
        out_r = (torch.softmax(s, -1) * keep / (1 - p)) @ v
        assert_close(out, out_r, torch.float32)
        dout = make(out.shape, torch.float32, 9, False)
        for g, e in zip(grads(out, (q, k, v), dout), grads(out_r, (q, k, v), dout)):
            assert_close(g, e, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_is_the_same_on_every_isa(causal):
    # One hash, vectorized differently per build (AVX-512 multiplies 64-bit lanes natively, AVX2
    # emulates them, the default build is scalar): the same seed must drop the same entries.
    masks = []
    for isa in CPU_BACKENDS:
        with run_on(isa):
            masks.append(dropped_probs(2, 3, 70, 133, causal, 0.4, 11, offset=5) != 0)
    for m in masks[1:]:
        assert torch.equal(m, masks[0])
    assert 0.3 < 1 - masks[0].float().mean().item() < 0.7


# ---- work splits, determinism, memory --------------------------------------------------------


def test_many_sequence_lengths_keep_memory_bounded():
    # ATen keeps every brgemm kernel it compiles, per thread, for good (csrc/gemm.h): before the
    # per-thread shape budget this loop grew the process by 282 MB and kept growing (~0.7 MB
    # per length). With it the growth stops at the budget (~10 MB),
    # and the products past the budget (MKL's sgemm) still give the right answer.
    code = """
import torch, fastgpt, fastgpt.functional as F
from fastgpt import reference
torch.set_num_threads(2)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
with fastgpt.use_backend("cpu"):
    for t in range(1, 401):
        q, k, v = (torch.randn(1, 2, t, 64, requires_grad=True) for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        if t == 50:
            start = rss_mb()
want = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
for got, ref in zip((out, dq, dk, dv), (want, *grads)):
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
print(rss_mb() - start)
"""
    grown_mb = float(run_python(code, FASTGPT_CPU_ISA=_cpu.supported_isas()[-1]))
    assert grown_mb < 80, f"resident memory grew {grown_mb:.0f} MB over 350 sequence lengths"


@pytest.mark.parametrize("bh", [(1, 1), (1, 3), (4, 6)], ids=str)
def test_deterministic(bh):
    with run_on(BEST):
        q, k, v = qkv(*bh, 300, 700, 64, torch.float32)
        dout = make(q.shape, torch.float32, 4, False)
        runs = []
        for _ in range(2):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            runs.append((out, *grads(out, (q, k, v), dout)))
        for a, b in zip(*runs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("tk", [1, 17, 1023, 8193])
@pytest.mark.parametrize("d", [16, 64, 80, 128])
def test_decode_matches_torch(backend, tk, d):
    # Tq = 1 takes the C++ decode path (row dot products, key ranges split over threads when
    # B·H is small): equal to torch's own function and the reference for odd cache lengths and
    # head dims, with and without a causal mask (bottom-right aligned: every key is visible).
    for b, h in ((1, 1), (1, 12), (4, 12)) if tk < 8193 else ((1, 3), (1, 12)):
        q, k, v = qkv(b, h, 1, tk, d, torch.float32, seed=tk + d, requires_grad=False)
        want = TF.scaled_dot_product_attention(q.double(), k.double(), v.double())
        for causal in (False, True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            assert_close(out, want.float(), torch.float32)
            assert_close(out, TF.scaled_dot_product_attention(q, k, v), torch.float32)
            ref = reference.scaled_dot_product_attention(q, k, v, is_causal=causal)
            assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_decode_other_dtypes_and_grads(dtype):
    with run_on(BEST):
        q, k, v = qkv(2, 3, 1, 1500, 80, dtype)
        dout = make(q.shape, dtype, 4, False)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        hi = torch.float64 if dtype == torch.float64 else torch.float32
        qh, kh, vh = (t.detach().to(hi).requires_grad_() for t in (q, k, v))
        out_t = TF.scaled_dot_product_attention(qh, kh, vh)
        assert_close(out, out_t.to(dtype), dtype)
        for g, e in zip(grads(out, (q, k, v), dout), grads(out_t, (qh, kh, vh), dout.to(hi))):
            assert_close(g, e.to(dtype), dtype)


# (Tq, Tk): the decode path takes up to 8 query rows (a folded GQA group, speculative decoding);
# causal rows see different key ranges (Tq > Tk: the first rows see none), and long caches split
# the keys over the threads.
SHORT_Q = [(2, 1), (3, 17), (8, 5), (8, 1023), (5, 8193)]


@pytest.mark.parametrize("tq,tk", SHORT_Q, ids=str)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
def test_decode_path_takes_a_few_query_rows(backend, tq, tk, dtype):
    if dtype != torch.float32 and tk > 2000 and backend == "reference":
        pytest.skip("the reference's (Tq, Tk) scores at this length: fp32 covers it")
    for b, h in ((1, 1), (2, 3)):
        q, k, v = qkv(b, h, tq, tk, 80, dtype, seed=tq + tk)
        dout = make(q.shape, dtype, 5, False)
        hi = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
        qh, kh, vh = (t.detach().to(hi).requires_grad_() for t in (q, k, v))
        for causal in (False, True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            assert out.dtype == dtype and out.shape == q.shape
            want = reference.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
            assert_close(out, want.to(dtype), dtype)
            if not causal or tq <= tk:  # torch gives NaN for a row that sees no key
                mask = reference.causal_mask(tq, tk) if causal else None
                t_out = TF.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
                assert_close(out, t_out.to(dtype), dtype)
            if b == 2 and dtype in (torch.float32, torch.bfloat16):
                for g, e in zip(
                    grads(out, (q, k, v), dout), grads(want, (qh, kh, vh), dout.to(hi))
                ):
                    assert_close(g, e.to(dtype), dtype)


@pytest.mark.parametrize("isa", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_decode_path_register_blocks(isa, dtype):
    """Every row count of the decode path's register blocks (1..8 rows: whole blocks and a
    remainder) with head dims that leave whole output tiles, a short tile and scalar lanes
    (16, 17, 48, 112), over two key chunks and a ragged third (Tk 600)."""
    hi = torch.float64 if dtype != torch.bfloat16 else torch.float32
    with run_on(isa):
        for tq in range(1, 9):
            for d in (16, 17, 48, 112):
                q, k, v = qkv(1, 2, tq, 600, d, dtype, seed=tq * d, requires_grad=False)
                for causal in (False, True):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    want = reference.scaled_dot_product_attention(
                        *(t.to(hi) for t in (q, k, v)), is_causal=causal
                    )
                    assert_close(out, want.to(dtype), dtype)


def test_decode_step_long_cache():
    with run_on(BEST):
        q, k, v = qkv(1, 1, 1, 5000, 64, torch.float32)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_close(out, TF.scaled_dot_product_attention(q, k, v), torch.float32)


def _vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def test_t8192_bounded_memory():
    """A T×T fp32 score matrix at T = 8192 is 256 MiB; the kernels must stay far below that."""
    import os

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to read the peak resident memory")
    with run_on(BEST):
        t, d = 8192, 64
        q, k, v = qkv(1, 1, t, t, d, torch.float32)
        dout = make(q.shape, torch.float32, 4, False)
        # One small call first: the one-time set-up of a fresh process (the thread pool, the
        # GEMM libraries) is not the kernels' memory, and run alone this test would count it.
        w = qkv(1, 1, 300, 300, d, torch.float32)
        grads(F.scaled_dot_product_attention(*w, is_causal=True), w, torch.ones_like(w[0]))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = _vm_kib("VmRSS")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dq, dk, dv = grads(out, (q, k, v), dout)
        peak_mib = (_vm_kib("VmHWM") - base) / 1024
        # Outputs and gradients are 4 x 2 MiB; scratch is O(T·D) more.
        assert peak_mib < 64, f"peak grew by {peak_mib:.0f} MiB"
        # The last queries, checked against the reference on just those rows (bottom-right
        # causal alignment makes the slice's attention identical).
        want = reference.scaled_dot_product_attention(q[:, :, -8:], k, v, is_causal=True)
        assert_close(out[:, :, -8:], want, torch.float32)


# ---- grouped-query attention (enable_gqa) --------------------------------------------------------

# (B, Hq, Hkv, Tq, Tk, D, causal): folded (not causal; a decode step), causal prefill (Tq == Tk
# and Tq != Tk: one call per group member on the CPU kernels, repeated heads elsewhere), a few
# causal rows against a longer cache (the decode path, per group member), one shared head
# (multi-query), and the kernel's odd T and head dims.
GQA_CASES = [
    (2, 6, 2, 17, 17, 16, False),
    (1, 4, 1, 1, 100, 64, True),
    (2, 6, 3, 17, 17, 80, True),
    (1, 8, 2, 100, 130, 64, True),
    (1, 8, 2, 4, 300, 64, True),
    (1, 4, 4, 5, 9, 16, True),
]


def gqa_inputs(b, hq, hk, tq, tk, d, dtype):
    return (
        make((b, hq, tq, d), dtype, 0),
        make((b, hk, tk, d), dtype, 1),
        make((b, hk, tk, d), dtype, 2),
    )


@pytest.mark.parametrize("case", GQA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gqa_matches_torch_and_the_reference(backend, case, dtype):
    b, hq, hk, tq, tk, d, causal = case
    q, k, v = gqa_inputs(b, hq, hk, tq, tk, d, dtype)
    dout = make((b, hq, tq, d), dtype, 7, False)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert out.shape == q.shape and out.dtype == dtype
    got = grads(out, (q, k, v), dout)
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    qh, kh, vh = (t.detach().to(hi).requires_grad_() for t in (q, k, v))
    # torch's enable_gqa, with fastgpt's bottom-right causal mask spelled out
    mask = reference.causal_mask(tq, tk) if causal else None
    out_t = TF.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    # the reference on key/value heads repeated by hand (query head h reads head h // group)
    group = hq // hk
    kr, vr = (t.repeat_interleave(group, dim=1) for t in (kh, vh))
    out_r = reference.scaled_dot_product_attention(qh, kr, vr, is_causal=causal)
    for want in (out_t, out_r):
        assert_close(out, want.to(dtype), dtype)
    for g, e in zip(got, grads(out_t, (qh, kh, vh), dout.to(hi))):
        assert_close(g, e.to(dtype), dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("causal", [False, True], ids=["folded", "repeated"])
def test_gqa_on_the_triton_kernels(causal, monkeypatch):
    import fastgpt.triton.attention as launchers

    shapes = []
    fwd = launchers.attention_fwd

    def recording(q, k, *args):
        shapes.append((q.shape, k.shape))
        return fwd(q, k, *args)

    monkeypatch.setattr(launchers, "attention_fwd", recording)
    q, k, v = gqa_inputs(1, 4, 2, 17, 17, 16, torch.float32)
    dout = make((1, 4, 17, 16), torch.float32, 7, False)
    with run_on("triton"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        got = grads(out, (q, k, v), dout)
    # folded: 2 heads of 2 x 17 queries on the 2 shared heads; repeated: 4 heads of 17 on 4
    assert shapes == [((1, 2, 34, 16), (1, 2, 17, 16)) if not causal else ((1, 4, 17, 16),) * 2]
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = TF.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
    assert_close(out, want, torch.float32)
    for g, e in zip(got, grads(want, (qt, kt, vt), dout)):
        assert_close(g, e, torch.float32)


def test_gqa_reads_the_shared_heads_in_place(monkeypatch):
    """The CPU kernels never see a repeated key/value cache: a decode step and any non-causal
    call fold each group's queries onto its head (one call), and a causal call with Tq > 1 runs
    once per group member, query heads g, g + group, ... against the heads as they are. The
    reference backend repeats them (it is the plain-PyTorch oracle)."""
    repeats, kernel_shapes = [], []
    original = torch.Tensor.repeat_interleave

    def counting(self, *args, **kwargs):
        repeats.append(self.shape)
        return original(self, *args, **kwargs)

    kernel = _backend.kernel

    def recording_kernel(module, op, *args):
        fn = kernel(module, op, *args)
        if op != "attention_fwd":
            return fn

        def fwd(q, k, *rest):
            kernel_shapes.append((tuple(q.shape), tuple(k.shape)))
            return fn(q, k, *rest)

        return fwd

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", counting)
    monkeypatch.setattr(_backend, "kernel", recording_kernel)
    with run_on(BEST), torch.no_grad():
        q, k, v = gqa_inputs(1, 8, 2, 1, 300, 64, torch.float32)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        q, k, v = gqa_inputs(1, 8, 2, 9, 30, 64, torch.float32)
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert kernel_shapes == [((1, 2, 4, 64), (1, 2, 300, 64)), ((1, 2, 36, 64), (1, 2, 30, 64))]
        kernel_shapes.clear()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert kernel_shapes == [((1, 2, 9, 64), (1, 2, 30, 64))] * 4  # one per group member
    assert repeats == []
    with run_on("reference"):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert len(repeats) == 2  # key and value


def test_gqa_with_a_mask_or_dropout():
    q, k, v = gqa_inputs(2, 6, 2, 9, 11, 16, torch.float32)
    mask = torch.rand(9, 11, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[:, 0] = True
    with run_on(BEST):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert_close(
            out,
            TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            torch.float32,
        )
        torch.manual_seed(3)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True)
        torch.manual_seed(3)
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True)
        # causal: one call per group member on the CPU kernels, each drawing its own seed
        torch.manual_seed(3)
        c = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True)
        torch.manual_seed(3)
        d = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True)
    assert torch.equal(a, b) and a.shape == q.shape
    assert torch.equal(c, d) and c.shape == q.shape
    no_drop = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert not torch.allclose(a, no_drop)
    no_drop = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert not torch.allclose(c, no_drop)
    # the members' masks differ: heads g and g + 1 of one key/value head drop different entries
    # (same queries and keys, so without dropout their outputs would be equal)
    q_same = q[:, :1].expand(-1, 6, -1, -1).contiguous()
    with run_on(BEST):
        torch.manual_seed(3)
        e = F.scaled_dot_product_attention(
            q_same, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True
        )
    assert not torch.allclose(e[:, 0], e[:, 1])


def test_gqa_argument_errors():
    q = torch.randn(1, 6, 5, 8)
    with pytest.raises(RuntimeError, match="must divide the query"):
        F.scaled_dot_product_attention(
            q, torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), enable_gqa=True
        )
    with pytest.raises(RuntimeError, match="the same number of heads"):
        F.scaled_dot_product_attention(
            q, torch.randn(1, 2, 5, 8), torch.randn(1, 3, 5, 8), enable_gqa=True
        )
    with pytest.raises(RuntimeError, match="needs a heads dim"):
        x = torch.randn(5, 8)
        F.scaled_dot_product_attention(x, x, x, enable_gqa=True)
    with pytest.raises(TypeError):  # keyword-only, as in torch
        F.scaled_dot_product_attention(q, q, q, None, 0.0, False, None, True)


# ---- fallbacks and argument checks -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_runs_reference_and_logs_once(caplog, kind):
    q, k, v = qkv(1, 2, 9, 11, 16, torch.float32)
    mask = torch.rand(9, 11, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[:, 0] = True
    if kind == "float":
        mask = torch.zeros(9, 11).masked_fill(~mask, -1e4)
    with caplog.at_level(logging.INFO, logger="fastgpt"), run_on(BEST):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(out, TF.scaled_dot_product_attention(q, k, v, attn_mask=mask), torch.float32)
    assert sum("attn_mask" in r.message for r in caplog.records) <= 1


def test_functional_argument_errors():
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        F.scaled_dot_product_attention(torch.randn(8), x, x)
    with pytest.raises(RuntimeError, match="same sequence length"):
        F.scaled_dot_product_attention(x, x, torch.randn(2, 6, 8))
    with pytest.raises(RuntimeError, match="same head dim"):
        F.scaled_dot_product_attention(torch.randn(2, 5, 4), x, x)
    with pytest.raises(ValueError, match="dropout_p"):
        F.scaled_dot_product_attention(x, x, x, dropout_p=1.5)


# ---- input checks of the C++ kernels: each raises a clear RuntimeError ------------------------

Q = torch.randn(1, 2, 5, 8)
KV = torch.randn(1, 2, 7, 8)
LSE = torch.zeros(1, 2, 5)
fwd, bwd = torch.ops.fastgpt.attention_fwd, torch.ops.fastgpt.attention_bwd
BAD_CALLS = {
    "3-D q": (lambda: fwd(Q[0], KV, KV, 1.0, False, 0.0, None, 0), "q must be 4-D"),
    "3-D k": (lambda: fwd(Q, KV[0], KV, 1.0, False, 0.0, None, 0), "k and v must be 4-D"),
    "integer q": (
        lambda: fwd(Q.long(), KV, KV, 1.0, False, 0.0, None, 0),
        "must be float32, bfloat16, float16 or float64",
    ),
    "non-contiguous k": (
        lambda: fwd(Q, KV.transpose(2, 3), KV, 1.0, False, 0.0, None, 0),
        "must be contiguous",
    ),
    "mixed dtypes": (lambda: fwd(Q, KV.double(), KV, 1.0, False, 0.0, None, 0), "one dtype"),
    "k and v shapes": (
        lambda: fwd(Q, KV, torch.randn(1, 2, 6, 8), 1.0, False, 0.0, None, 0),
        "but v has shape",
    ),
    "head dim": (
        lambda: fwd(Q, torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4), 1.0, False, 0.0, None, 0),
        "does not match q",
    ),
    "empty head dim": (
        lambda: fwd(
            torch.randn(1, 2, 5, 0),
            torch.randn(1, 2, 7, 0),
            torch.randn(1, 2, 7, 0),
            1.0,
            False,
            0.0,
            None,
            0,
        ),
        "head dim D must be positive",
    ),
    "dropout range": (lambda: fwd(Q, KV, KV, 1.0, False, 1.0, None, 0), "dropout_p must be in"),
    "bwd dropout range": (
        lambda: bwd(Q, Q, KV, KV, Q, LSE, 1.0, False, -0.1, None, 0),
        "dropout_p must be in",
    ),
    "dout shape": (
        lambda: bwd(torch.randn(1, 2, 4, 8), Q, KV, KV, Q, LSE, 1.0, False, 0.0, None, 0),
        "dout has shape",
    ),
    "out dtype": (
        lambda: bwd(Q, Q, KV, KV, Q.double(), LSE, 1.0, False, 0.0, None, 0),
        "out has dtype",
    ),
    "lse dtype": (
        lambda: bwd(Q, Q, KV, KV, Q, LSE.double(), 1.0, False, 0.0, None, 0),
        "lse must be a contiguous CPU",
    ),
    "lse shape": (
        lambda: bwd(Q, Q, KV, KV, Q, torch.zeros(1, 2, 4), 1.0, False, 0.0, None, 0),
        "lse must have shape",
    ),
}
# The device check (CPU tensors only) cannot be reached through the dispatcher, which sends other
# devices to their own kernels.


test_cpp_input_checks = cpp_input_checks(BAD_CALLS)


def test_scale_default_is_inverse_sqrt_d(backend):
    q, k, v = qkv(1, 1, 6, 6, 25, torch.float32)
    a = F.scaled_dot_product_attention(q, k, v)
    b = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(25))
    assert_close(a, b, torch.float32)
