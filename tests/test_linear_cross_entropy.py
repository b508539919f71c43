"""linear_cross_entropy: parity with torch's F.linear_cross_entropy and the reference on every
backend, dtype, reduction and label smoothing; chunking (several chunks, ragged last chunk);
custom-op registration; compile; gradcheck; the C++ input checks."""

import functools

import pytest
import torch
import torch.nn.functional as TF
from conftest import assert_close as _assert_close
from conftest import cpp_input_checks, run_on
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgpt.functional as F
from fastgpt import _cpu, reference
from fastgpt.ops.cross_entropy import inplace_backward

BEST = f"cpu-{_cpu.supported_isas()[-1]}"
REDUCTIONS = ["mean", "sum", "none"]
# NaN where torch gives NaN (an all-ignored mean): equal there.
assert_close = functools.partial(_assert_close, equal_nan=True)


def make(n, c, v, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, c, generator=g) / c**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[1::4] = -100
    return x, w, b, t


def check(n, c, v, dtype, reduction, smoothing, bias=True, seed=0):
    x, w, b, t = make(n, c, v, dtype, seed, bias)
    ins = [p for p in (x, w, b) if p is not None]
    loss = F.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, label_smoothing=smoothing
    )
    assert loss.dtype == dtype
    dy = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got = torch.autograd.grad(loss, ins, dy)
    # torch's own function in fp32 (float64 for float64) on the same rounded inputs.
    hi = torch.float64 if dtype == torch.float64 else torch.float32
    ins_h = [p.detach().to(hi).requires_grad_() for p in ins]
    b_h = ins_h[2] if bias else None
    loss_h = TF.linear_cross_entropy(
        ins_h[0], ins_h[1], t, linear_bias=b_h, reduction=reduction, label_smoothing=smoothing
    )
    want = torch.autograd.grad(loss_h, ins_h, dy.to(hi))
    # Sums over rows (loss, d_weight, d_bias) and over classes (d_input): rounding grows like
    # sqrt(terms); bf16/fp16 round the logits and gradients in the kernel's dtype (the matmuls
    # run in it), while torch here computes in fp32 throughout.
    red = max(4.0, n**0.5)
    low = dtype in (torch.bfloat16, torch.float16)
    assert_close(loss, loss_h.to(dtype), dtype, red if reduction != "none" else 2.0)
    for g, e, terms in zip(got, want, (v, n, n)):
        assert_close(g, e.to(dtype), dtype, max(4.0, terms**0.5) if low else 4.0)
    loss_r = reference.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, label_smoothing=smoothing
    )
    assert_close(loss, loss_r, dtype, red if reduction != "none" else 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(backend, dtype, reduction):
    shapes = [(17, 32, 1000), (1, 16, 17)]
    if backend != "triton":
        shapes += [(1000, 64, 17), (5, 24, 50257)]
    elif dtype == torch.float32:
        shapes += [(300, 16, 17)]
    for i, (n, c, v) in enumerate(shapes):
        check(n, c, v, dtype, reduction, 0.0, seed=i)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing_no_bias(backend, reduction):
    check(17, 32, 1000, torch.float32, reduction, 0.1, bias=False)
    check(17, 32, 1000, torch.bfloat16, reduction, 0.1, bias=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_many_chunks_ragged(backend, reduction):
    # chunk_rows 7 over 50 rows: 8 chunks, the last one short; d_weight accumulates over all.
    from fastgpt.ops.linear_cross_entropy import LinearCrossEntropyFunction

    x, w, b, t = make(50, 16, 33, torch.float32)
    name = "triton" if backend == "triton" else ("reference" if backend == "reference" else "cpu")
    if name == "reference":
        return
    loss = LinearCrossEntropyFunction.apply(
        x, w, b, t, -100, 0.05, {"none": 0, "mean": 1, "sum": 2}[reduction], 7, name
    )
    want = TF.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.05
    )
    assert_close(loss, want, torch.float32, 8)
    dy = torch.rand(want.shape)
    for g, e in zip(
        torch.autograd.grad(loss, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy)
    ):
        assert_close(g, e, torch.float32, 4)


def test_some_grads_only_and_no_grad(backend):
    x, w, b, t = make(17, 16, 40, torch.float32)
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        xs, ws, bs = (p.detach().requires_grad_(r) for p, r in zip((x, w, b), needs))
        loss = F.linear_cross_entropy(xs, ws, t, linear_bias=bs)
        loss.backward()
        want = TF.linear_cross_entropy(x, w, t, linear_bias=b)
        gw = torch.autograd.grad(want, (x, w, b))
        for p, r, e in zip((xs, ws, bs), needs, gw):
            if r:
                assert_close(p.grad, e, torch.float32, 4)
            else:
                assert p.grad is None
    with torch.no_grad():
        assert_close(
            F.linear_cross_entropy(x, w, t, linear_bias=b),
            TF.linear_cross_entropy(x, w, t, linear_bias=b),
            torch.float32,
            4,
        )


def test_edge_cases(backend):
    x, w, b, t = make(6, 8, 11, torch.float32)
    # all ignored: nan mean, 0 sum, zero gradients; an empty batch; a custom ignore_index.
    t_all = torch.full_like(t, -100)
    for red in REDUCTIONS:
        loss = F.linear_cross_entropy(x, w, t_all, linear_bias=b, reduction=red)
        assert_close(
            loss, TF.linear_cross_entropy(x, w, t_all, linear_bias=b, reduction=red), torch.float32
        )
        gx, gw = torch.autograd.grad(loss.sum(), (x, w))
        assert not gx.any() and not gw.any()
        x0 = torch.randn(0, 8, requires_grad=True)
        t0 = torch.zeros(0, dtype=torch.long)
        l0 = F.linear_cross_entropy(x0, w, t0, reduction=red)
        assert_close(l0, TF.linear_cross_entropy(x0, w, t0, reduction=red), torch.float32)
        tc = t.clamp_min(0)  # class 3 is the ignore_index now
        assert_close(
            F.linear_cross_entropy(x, w, tc, ignore_index=3, reduction=red),
            TF.linear_cross_entropy(x, w, tc, ignore_index=3, reduction=red),
            torch.float32,
            4,
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_through_retained_graph(backend, reduction):
    # "mean"/"sum" scale forward-written d_input, d_weight, d_bias: every backward through one
    # retained graph must still give torch's gradients for its grad_output (1, another, 0, a
    # negative one; per-row zeros for "none"), and a gradient already returned must not change.
    x, w, b, t = make(17, 32, 1000, torch.float32)
    ins = (x, w, b)
    loss = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
    ins_h = [p.detach().clone().requires_grad_() for p in ins]
    loss_h = TF.linear_cross_entropy(*ins_h[:2], t, linear_bias=ins_h[2], reduction=reduction)
    g = torch.Generator().manual_seed(5)
    outs = [torch.ones(loss.shape), torch.rand(loss.shape, generator=g) + 0.5]
    outs += [torch.zeros(loss.shape), -2 * torch.rand(loss.shape, generator=g) - 0.25]
    if reduction == "none":
        outs[1][::2] = 0
    returned = []
    for dy in outs[1:] + outs[:1]:
        got = torch.autograd.grad(loss, ins, dy, retain_graph=True)
        want = torch.autograd.grad(loss_h, ins_h, dy, retain_graph=True)
        for a, e in zip(got, want):
            assert_close(a, e, torch.float32, 4.0)
            returned.append((a, a.clone()))
    for a, copy in returned:
        assert torch.equal(a, copy)


def test_target_out_of_range_raises(backend):
    x, w, b, t = make(6, 8, 11, torch.float32)
    t[2] = 11
    with pytest.raises((RuntimeError, IndexError), match="out of range"):
        F.linear_cross_entropy(x, w, t)


def test_fallbacks_stay_correct(backend):
    x, w, b, t = make(6, 8, 11, torch.float32)
    cw = torch.rand(11)
    for red in REDUCTIONS:
        assert_close(
            F.linear_cross_entropy(x, w, t, weight=cw, reduction=red),
            TF.linear_cross_entropy(x, w, t, weight=cw, reduction=red),
            torch.float32,
        )
    # A 1-D (unbatched) input is not the kernels' (N, C) form: the reference runs it.
    x1 = x.detach()[0]
    t1 = t.clamp_min(0)[0]
    assert_close(
        F.linear_cross_entropy(x1, w, t1), TF.linear_cross_entropy(x1, w, t1), torch.float32
    )


@given(
    rows=st.integers(0, 30),
    c=st.integers(1, 40),
    v=st.integers(1, 120),
    smoothing=st.sampled_from([0.0, 0.2]),
    reduction=st.sampled_from(REDUCTIONS),
)
@settings(max_examples=30, deadline=None)
def test_property_matches_reference(rows, c, v, smoothing, reduction):
    with run_on(BEST):
        x, w, b, t = make(rows, c, v, torch.float32, rows)
        loss = F.linear_cross_entropy(
            x, w, t, linear_bias=b, reduction=reduction, label_smoothing=smoothing
        )
        want = reference.linear_cross_entropy(
            x, w, t, linear_bias=b, reduction=reduction, label_smoothing=smoothing
        )
        torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4, equal_nan=True)
        got = torch.autograd.grad(loss.sum(), (x, w, b))
        for g, e in zip(got, torch.autograd.grad(want.sum(), (x, w, b))):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64_cpu():
    with run_on(BEST), inplace_backward(False):
        x, w, b, t = make(6, 5, 9, torch.float64)
        for red in REDUCTIONS:

            def fn(x, w, b, red=red):
                return F.linear_cross_entropy(
                    x, w, t, linear_bias=b, reduction=red, label_smoothing=0.1
                )

            assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("isa", _cpu.supported_isas())
def test_opcheck(isa):
    with _cpu.use_isa(isa):
        x, w, b, t = (p.detach() if p is not None else None for p in make(9, 8, 13, torch.float32))
        op = torch.ops.fastgpt.linear_cross_entropy_fwd
        rs = torch.rand(9)
        for red in (0, 1, 2):
            torch.library.opcheck(op, (x, w, b, t, -100, 0.1, red, None, True, True, True, 4))
        torch.library.opcheck(op, (x, w, None, t, -100, 0.0, 0, rs, True, True, False, 0))
        torch.library.opcheck(op, (x, w, None, t, -100, 0.0, 1, None, False, False, False, 0))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def head(x, w, b, t):
        return F.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)

    with run_on(BEST):
        compiled = torch.compile(head, fullgraph=True)
        x, w, b, t = make(8, 16, 64, torch.float32)
        out, out_e = compiled(x, w, b, t), head(x, w, b, t)
        assert_close(out, out_e, torch.float32)
        for g, e in zip(torch.autograd.grad(out, (x, w, b)), torch.autograd.grad(out_e, (x, w, b))):
            assert_close(g, e, torch.float32)


X = torch.randn(4, 8)
W = torch.randn(6, 8)
T = torch.tensor([0, 1, 2, 3])


def lce(x=X, w=W, b=None, t=T, ls=0.0, red=1, rs=None, flags=(True, True, False), chunk=0):
    return torch.ops.fastgpt.linear_cross_entropy_fwd(x, w, b, t, -100, ls, red, rs, *flags, chunk)


BAD_CALLS = {
    "1-D input": (lambda: lce(x=X[0]), "input must be 2-D"),
    "weight shape": (lambda: lce(w=torch.randn(6, 7)), "linear_weight must have shape"),
    "no classes": (lambda: lce(w=torch.randn(0, 8)), "linear_weight has no classes"),
    "weight dtype": (lambda: lce(w=W.double()), "linear_weight has dtype"),
    "bias shape": (lambda: lce(b=torch.randn(5)), "linear_bias must have shape"),
    "bias dtype": (lambda: lce(b=torch.randn(6).double()), "linear_bias has dtype"),
    "bias grad without bias": (lambda: lce(flags=(False, False, True)), "without a linear_bias"),
    "int32 target": (lambda: lce(t=T.int()), "target must be a CPU int64"),
    "target shape": (lambda: lce(t=T[:3]), "target must be contiguous with shape"),
    "target out of range": (lambda: lce(t=T * 2), "target 6 at row 3 is out of range"),
    "label smoothing": (lambda: lce(ls=2.0), "label_smoothing must be in"),
    "reduction": (lambda: lce(red=5), "reduction must be"),
    "row scale": (lambda: lce(rs=torch.ones(3)), "row_scale must have shape"),
    "chunk rows": (lambda: lce(chunk=-1), "chunk_rows must be"),
    "non-contiguous input": (lambda: lce(x=torch.randn(8, 4).t()), "input must be contiguous"),
}


test_cpp_input_checks = cpp_input_checks(BAD_CALLS)
