"""cross_entropy: parity with torch and the reference on every backend, dtype, reduction, label
smoothing and odd shape; the in-place gradient design; custom-op registration; compile;
gradcheck; every input check of the C++ kernels."""

import functools

import pytest
import torch
import torch.nn.functional as TF
from conftest import assert_close as _assert_close
from conftest import cpp_input_checks, reduction_scale, run_on
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgpt
import fastgpt.functional as F
from fastgpt import _cpu, reference
from fastgpt.ops.cross_entropy import inplace_backward

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
BEST = f"cpu-{_cpu.supported_isas()[-1]}"
# NaN where torch gives NaN (an all-ignored mean): equal there.
assert_close = functools.partial(_assert_close, equal_nan=True)


def shapes_for(backend, dtype=torch.float32):
    # Every N in (1, 17, 1000) and V in (17, 1000, 50257); the 50257-wide ones with few rows. The
    # interpreter runs programs one by one in numpy: keep its product small (rows 1, 17, 300 and
    # V 17, 1000, 50257 all appear in fp32; the reduced dtypes take the two quick shapes).
    if backend == "triton":
        if dtype == torch.float32:
            return [(1, 50257), (17, 1000), (17, 5000), (300, 17)]
        return [(17, 17), (17, 1000)]
    return [(1, 17), (1, 50257), (17, 17), (17, 1000), (17, 50257), (1000, 17), (1000, 1000)]


def make(n, v, dtype, seed=0, ignore_every=5, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_(requires_grad)
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[1::ignore_every] = -100  # never row 0: one row stays valid
    return x, t


def check(n, v, dtype, reduction, smoothing, backend, seed=0):
    x, t = make(n, v, dtype, seed)
    loss = F.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
    assert loss.dtype == dtype
    dy = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    (gx,) = torch.autograd.grad(loss, x, dy)
    # torch in fp32 (float64 for float64) on the same rounded inputs: "computed in fp32, rounded
    # once". The mean/sum losses add n rows in another order.
    hi = torch.float64 if dtype == torch.float64 else torch.float32
    x_h = x.detach().to(hi).requires_grad_()
    loss_h = TF.cross_entropy(x_h, t, reduction=reduction, label_smoothing=smoothing)
    (gx_h,) = torch.autograd.grad(loss_h, x_h, dy.to(hi))
    red = reduction_scale(n) if reduction != "none" else 1.0
    assert_close(loss, loss_h.to(dtype), dtype, red)
    # bf16/fp16: the kernels round the gradient once in the forward and once more when the
    # backward scales it by grad_output, so 2 roundings where torch in fp32 has 1.
    assert_close(gx, gx_h.to(dtype), dtype, 1.0 if dtype in (torch.float32, torch.float64) else 2)
    loss_r = reference.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
    (gx_r,) = torch.autograd.grad(loss_r, x, dy)
    assert_close(loss, loss_r, dtype, red)
    assert_close(gx, gx_r, dtype, 1.0 if dtype in (torch.float32, torch.float64) else 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(backend, dtype, reduction):
    for i, (n, v) in enumerate(shapes_for(backend, dtype)):
        check(n, v, dtype, reduction, 0.0, backend, seed=i)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.1, 1.0])
def test_label_smoothing(backend, reduction, smoothing):
    for dtype in (torch.float32, torch.bfloat16):
        check(17, 1000, dtype, reduction, smoothing, backend)
        if backend != "triton":  # the interpreter has (300, 17) in test_parity
            check(1000, 17, dtype, reduction, smoothing, backend)


def test_float64(backend):
    # Triton has no float64 kernel: there this proves the fallback to the reference is right.
    check(17, 100, torch.float64, "mean", 0.1, backend)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(backend, reduction):
    x, t = make(7, 33, torch.float32)
    t[:] = -100
    loss = F.cross_entropy(x, t, reduction=reduction)
    want = TF.cross_entropy(x, t, reduction=reduction)
    assert_close(loss, want, torch.float32)  # nan for mean, 0 for sum, zeros for none
    (gx,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(gx, torch.zeros_like(x))


def test_custom_ignore_index_and_extreme_logits(backend):
    x, t = make(17, 100, torch.float32, ignore_every=0)
    t[::3] = 7  # ignore_index = 7 ignores these rows, whatever their class
    x = x.detach()
    x[1, :50] = -float("inf")  # masked-out classes
    x[2] *= 1e4  # one dominant class
    x.requires_grad_()
    for red in REDUCTIONS:
        loss = F.cross_entropy(x, t, ignore_index=7, reduction=red)
        want = TF.cross_entropy(x, t, ignore_index=7, reduction=red)
        assert_close(loss, want, torch.float32, 4)
        g = torch.autograd.grad(loss.sum(), x)[0]
        assert_close(g, torch.autograd.grad(want.sum(), x)[0], torch.float32)


def test_shapes_like_torch(backend):
    # (N, C, d) inputs, one unbatched row, an empty batch, non-contiguous logits.
    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(3, 11, 5, generator=g, requires_grad=True)
    t3 = torch.randint(0, 11, (3, 5), generator=g)
    x1 = torch.randn(11, generator=g, requires_grad=True)
    t1 = torch.tensor(4)
    xt = torch.randn(11, 9, generator=g).t().requires_grad_()
    t9 = torch.randint(0, 11, (9,), generator=g)
    for red in REDUCTIONS:
        for x, t in ((x3, t3), (x1, t1), (xt, t9)):
            loss, want = F.cross_entropy(x, t, reduction=red), TF.cross_entropy(x, t, reduction=red)
            assert loss.shape == want.shape
            assert_close(loss, want, torch.float32, 4)
            dy = torch.rand(want.shape, generator=g)
            for a, b in zip(torch.autograd.grad(loss, x, dy), torch.autograd.grad(want, x, dy)):
                assert_close(a, b, torch.float32)
        x0 = torch.randn(0, 11, requires_grad=True)
        t0 = torch.zeros(0, dtype=torch.long)
        loss, want = F.cross_entropy(x0, t0, reduction=red), TF.cross_entropy(x0, t0, reduction=red)
        assert loss.shape == want.shape
        assert_close(loss, want, torch.float32)


def test_fallbacks_stay_correct(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 13, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (17,), generator=g)
    w = torch.rand(13, generator=g)
    probs = torch.softmax(torch.randn(17, 13, generator=g), -1)
    for kwargs, tgt in (({"weight": w}, t), ({}, probs), ({"label_smoothing": 0.2}, probs)):
        for red in REDUCTIONS:
            loss = F.cross_entropy(x, tgt, reduction=red, **kwargs)
            assert_close(loss, TF.cross_entropy(x, tgt, reduction=red, **kwargs), torch.float32)


def test_nn_module_parity(backend):
    ref = torch.nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.05)
    mine = fastgpt.nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.05)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    x, t = make(17, 50, torch.float32, ignore_every=0)
    assert_close(mine(x, t), ref(x, t), torch.float32)
    a = torch.autograd.grad(mine(x, t), x)[0]
    assert_close(a, torch.autograd.grad(ref(x, t), x)[0], torch.float32)


def test_forward_without_grad_and_inputs_untouched(backend):
    x, t = make(17, 100, torch.float32)
    x0, t0 = x.detach().clone(), t.clone()
    with torch.no_grad():
        loss = F.cross_entropy(x, t)
    assert_close(loss, TF.cross_entropy(x0, t0), torch.float32)
    loss = F.cross_entropy(x, t, reduction="sum")
    (loss * 3).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(t, t0)
    assert_close(
        x.grad,
        3 * torch.autograd.grad(TF.cross_entropy(x, t, reduction="sum"), x)[0],
        torch.float32,
    )


def retained_grad_outputs(shape, dtype):
    """grad_outputs for successive backwards through one retained graph: a plain one, one that
    was applied in place, a zero (never applied in place) and, for 'none', rows with zeros."""
    g = torch.Generator().manual_seed(3)
    outs = [torch.ones(shape), torch.rand(shape, generator=g) + 0.5, torch.zeros(shape)]
    outs.append(-2 * torch.rand(shape, generator=g) - 0.25)
    if shape:
        mixed = torch.rand(shape, generator=g) + 0.5
        mixed[::2] = 0
        outs.append(mixed)
    return [o.to(dtype) for o in outs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("first", ["ones", "scaled", "zero"])
def test_backward_twice_through_retained_graph(backend, dtype, reduction, first):
    # Each backward through one retained graph must give torch's gradient for its grad_output,
    # whatever the earlier backwards did, and never change a gradient it already returned.
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the interpreter is slow; fp32 covers the Triton path")
    x, t = make(17, 1000 if backend == "triton" else 333, dtype)
    x_h = x.detach().float().requires_grad_()
    loss = F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    loss_h = TF.cross_entropy(x_h, t, reduction=reduction, label_smoothing=0.1)
    outs = retained_grad_outputs(loss.shape, dtype)
    order = {"ones": [0, 1, 2, 3], "scaled": [1, 0, 3, 2], "zero": [2, 1, 0, 3]}[first]
    order += list(range(4, len(outs)))
    returned = []
    for i in order:
        (gx,) = torch.autograd.grad(loss, x, outs[i], retain_graph=True)
        (want,) = torch.autograd.grad(loss_h, x_h, outs[i].float(), retain_graph=True)
        # bf16: up to three roundings (forward, in-place scale, ratio) where torch in fp32 has one.
        assert_close(gx, want.to(dtype), dtype, 1.0 if dtype == torch.float32 else 3)
        returned.append((gx, gx.clone()))
    for gx, copy in returned:
        assert torch.equal(gx, copy)
    # loss.backward twice accumulates, as torch does.
    x.grad = None
    loss.backward(outs[order[1]], retain_graph=True)
    loss.backward(outs[order[1]])
    want = 2 * torch.autograd.grad(loss_h, x_h, outs[order[1]].float())[0]
    assert_close(x.grad, want.to(dtype), dtype, 1.0 if dtype == torch.float32 else 3)


def test_mutating_a_returned_gradient_is_caught():
    # A gradient handed out by the first backward is the saved buffer itself: changing it and
    # then running backward again is refused by autograd's version check, not silently wrong.
    with run_on(BEST):
        x, t = make(5, 9, torch.float32)
        loss = F.cross_entropy(x, t)
        (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
        gx.mul_(3)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, x)


def test_target_out_of_range_raises(backend):
    x, t = make(4, 10, torch.float32)
    for bad in (10, -1, 12345):
        t[1] = bad
        err = (RuntimeError, IndexError)
        with pytest.raises(err, match="out of range"):
            F.cross_entropy(x, t)


@given(
    rows=st.integers(1, 40),
    classes=st.integers(1, 300),
    scale=st.floats(1e-2, 30),
    smoothing=st.sampled_from([0.0, 0.3]),
    reduction=st.sampled_from(REDUCTIONS),
)
@settings(max_examples=40, deadline=None)
def test_property_matches_reference(rows, classes, scale, smoothing, reduction):
    with run_on(BEST):
        x, t = make(rows, classes, torch.float32, rows, ignore_every=3)
        x = (x.detach() * scale).requires_grad_()
        loss = F.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
        want = reference.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
        torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4, equal_nan=True)
        g = torch.autograd.grad(loss.sum(), x)[0]
        torch.testing.assert_close(g, torch.autograd.grad(want.sum(), x)[0], atol=1e-5, rtol=1e-4)


def test_gradcheck_float64_cpu():
    # gradcheck runs many backwards through one graph: the saved gradient is scaled in a copy.
    with run_on(BEST), inplace_backward(False):
        x, t = make(6, 13, torch.float64, ignore_every=4)
        for red in REDUCTIONS:
            for ls in (0.0, 0.2):

                def fn(a, red=red, ls=ls):
                    return F.cross_entropy(a, t, reduction=red, label_smoothing=ls)

                assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("isa", _cpu.supported_isas())
def test_opcheck(isa):
    with _cpu.use_isa(isa):
        x, t = make(17, 33, torch.float32, requires_grad=False)
        for red in (0, 1, 2):
            for cg in (False, True):
                torch.library.opcheck(
                    torch.ops.fastgpt.cross_entropy_fwd, (x, t, -100, 0.1, red, cg)
                )
        torch.library.opcheck(torch.ops.fastgpt.cross_entropy_scale_grad_, (x.clone(), x[0, 0]))
        row = x[:, 0].contiguous()
        torch.library.opcheck(torch.ops.fastgpt.cross_entropy_scale_grad_, (x.clone(), row))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def head(x, t):
        return (
            F.cross_entropy(x * 2, t, label_smoothing=0.1)
            + F.cross_entropy(x, t, reduction="none").sum()
        )

    with run_on(BEST):
        compiled = torch.compile(head, fullgraph=True)
        x, t = make(8, 64, torch.float32)
        out, out_e = compiled(x, t), head(x, t)
        assert_close(out, out_e, torch.float32)
        a = torch.autograd.grad(out, x)[0]
        assert_close(a, torch.autograd.grad(out_e, x)[0], torch.float32)


@pytest.mark.parametrize("inplace", [True, False])
def test_compiled_backward_twice_through_retained_graph(inplace):
    # Compiled, the backward cannot tell a second backward from a first (it scales in place, in
    # a functionalized graph): several backwards through one retained graph must still each get
    # torch's gradient and never change one already returned, with in-place scaling on or off.
    torch._dynamo.reset()
    with run_on(BEST), inplace_backward(inplace):
        compiled = torch.compile(lambda x, t: F.cross_entropy(x, t), fullgraph=True)
        x, t = make(8, 64, torch.float32)
        loss = compiled(x, t)
        x_h = x.detach().clone().requires_grad_()
        loss_h = TF.cross_entropy(x_h, t)
        returned = []
        for go in (2.0, 3.0, 0.5):
            go = torch.tensor(go)
            (g,) = torch.autograd.grad(loss, x, go, retain_graph=True)
            (want,) = torch.autograd.grad(loss_h, x_h, go, retain_graph=True)
            assert_close(g, want, torch.float32)
            returned.append((g, g.clone()))
        for g, copy in returned:
            assert torch.equal(g, copy)


# ---- input checks of the C++ kernels: each raises a clear RuntimeError ------------------------

X = torch.randn(4, 8)
T = torch.tensor([0, 1, 2, 3])
BAD_CALLS = {
    "1-D input": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(X[0], T, -100, 0.0, 1, True),
        "must be 2-D",
    ),
    "no classes": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(torch.randn(4, 0), T, -100, 0.0, 1, True),
        "class dimension is empty",
    ),
    "integer input": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(X.long(), T, -100, 0.0, 1, True),
        "must be float32, bfloat16, float16 or float64",
    ),
    "non-contiguous input": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(torch.randn(8, 4).t(), T, -100, 0.0, 1, True),
        "input must be contiguous",
    ),
    "int32 target": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(X, T.int(), -100, 0.0, 1, True),
        "target must be int64",
    ),
    "target shape": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(X, T[:3], -100, 0.0, 1, True),
        "target must have shape",
    ),
    "non-contiguous target": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(
            X, torch.zeros(4, 2, dtype=torch.long)[:, 0], -100, 0.0, 1, True
        ),
        "target must be contiguous",
    ),
    "target out of range": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(X, T * 3, -100, 0.0, 1, True),
        "target 9 at row 3 is out of range",
    ),
    "label smoothing": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(X, T, -100, 1.5, 1, True),
        "label_smoothing must be in",
    ),
    "reduction": (
        lambda: torch.ops.fastgpt.cross_entropy_fwd(X, T, -100, 0.0, 3, True),
        "reduction must be",
    ),
    "scale dtype": (
        lambda: torch.ops.fastgpt.cross_entropy_scale_grad_(X.clone(), torch.tensor(1.0).double()),
        "grad_output has dtype",
    ),
    "scale shape": (
        lambda: torch.ops.fastgpt.cross_entropy_scale_grad_(X.clone(), torch.ones(3)),
        "grad_output must be 0-dim or have one value per row",
    ),
}


test_cpp_input_checks = cpp_input_checks(BAD_CALLS)


def test_functional_argument_errors():
    x, t = make(4, 8, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(x, t, reduction="avg")
    with pytest.raises(RuntimeError, match="label_smoothing"):
        F.cross_entropy(x, t, label_smoothing=-0.1)
