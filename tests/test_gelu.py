"""GELU and bias_gelu: parity with torch and the reference on every backend, dtype and odd shape;
accuracy of the C++ tanh/erf forms over the whole float range; custom-op registration; compile;
gradcheck; every input check of the C++ kernels."""

import logging

import pytest
import torch
import torch.nn.functional as TF
from conftest import (
    assert_close,
    assert_compiled_matches_eager,
    cpp_input_checks,
    reduction_scale,
    run_on,
    saved_bytes_beyond,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgpt
import fastgpt.functional as F
from fastgpt import _cpu, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
APPROXIMATIONS = ["none", "tanh"]
ROWS = [1, 17, 1000]
COLS = [1, 17, 768, 1023, 3072]
BEST_CPU = f"cpu-{_cpu.supported_isas()[-1]}" if _cpu.supported_isas() else None


def shapes_for(backend):
    # The interpreter runs Triton programs one by one in numpy, and the reference is plain torch
    # (its parity with torch needs no cross-product): keep theirs small, while every row count
    # and column count still appears.
    if backend in ("triton", "reference"):
        return [(1, 3072), (17, 1), (17, 17), (17, 768), (17, 1023), (1000, 17)]
    return [(m, n) for m in ROWS for n in COLS]


def make(shape, dtype, seed=0, requires_grad=True, scale=3.0):
    # Spread over [-~10, ~10]: both tails and the curved middle of GELU.
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float32) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def torch_bias_gelu(x, b, approximate):
    # torch's pair, on the same inputs, without rounding the sum when they are fp32 or wider.
    return TF.gelu(x + b, approximate=approximate)


def check(shape, dtype, approximate, with_bias):
    m, n = shape
    x = make((m, n), dtype, 0)
    b = make((n,), dtype, 1) if with_bias else None
    dy = make((m, n), dtype, 2, requires_grad=False, scale=1.0)
    ins = [x, b] if with_bias else [x]
    y = F.bias_gelu(x, b, approximate) if with_bias else F.gelu(x, approximate)
    assert y.dtype == dtype and y.shape == x.shape
    got = torch.autograd.grad(y, ins, dy)
    # torch's own functions in fp32 on the same (rounded) inputs: "bf16/fp16 computed in fp32
    # and rounded once" (torch's bf16 pair would also round x + b, which bias_gelu does not).
    hi = torch.float64 if dtype == torch.float64 else torch.float32
    ins_t = [t.detach().to(hi).requires_grad_() for t in ins]
    y_t = (
        torch_bias_gelu(*ins_t, approximate)
        if with_bias
        else TF.gelu(ins_t[0], approximate=approximate)
    )
    assert_close(y, y_t.to(dtype), dtype)
    want = torch.autograd.grad(y_t, ins_t, dy.to(hi))
    # dbias sums m rows in another order than torch: rounding error grows as sqrt(m).
    scales = (1, reduction_scale(m))
    for g, e, s in zip(got, want, scales):
        assert_close(g, e.to(dtype), dtype, s)
    # ... and the reference (fp32 math, one rounding).
    y_r = reference.bias_gelu(x, b, approximate) if with_bias else reference.gelu(x, approximate)
    assert_close(y, y_r, dtype)
    for g, e, s in zip(got, torch.autograd.grad(y_r, ins, dy), scales):
        assert_close(g, e, dtype, s)
    # torch's gelu in the input dtype itself (no bias: there is no rounded sum to differ).
    if not with_bias:
        assert_close(y, TF.gelu(x, approximate=approximate), dtype)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_parity(backend, dtype, approximate):
    for shape in shapes_for(backend):
        check(shape, dtype, approximate, with_bias=False)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_parity(backend, dtype, approximate):
    for shape in shapes_for(backend):
        check(shape, dtype, approximate, with_bias=True)


def test_float64(backend):
    # Triton has no float64 kernel: there this proves the fallback to the reference is right.
    for approximate in APPROXIMATIONS:
        check((17, 100), torch.float64, approximate, with_bias=False)
        check((17, 100), torch.float64, approximate, with_bias=True)


def test_leading_dims_noncontiguous_and_one_gradient(backend):
    base = make((6, 40, 33), torch.float32, 0)
    x = base.transpose(0, 1)  # (40, 6, 33), not contiguous
    assert not x.is_contiguous()
    b = make((33,), torch.float32, 1)
    dy = make(x.shape, torch.float32, 2, False)
    for approximate in APPROXIMATIONS:
        y, y_t = F.bias_gelu(x, b, approximate), TF.gelu(x + b, approximate=approximate)
        assert_close(y, y_t, torch.float32)
        for g, e in zip(
            torch.autograd.grad(y, [base, b], dy), torch.autograd.grad(y_t, [base, b], dy)
        ):
            assert_close(g, e, torch.float32, reduction_scale(240))
        # Only the input needs a gradient; then only the bias.
        gx_t, gb_t = torch.autograd.grad(TF.gelu(x + b, approximate=approximate), [base, b], dy)
        (gx,) = torch.autograd.grad(F.bias_gelu(x, b.detach(), approximate), [base], dy)
        assert_close(gx, gx_t, torch.float32)
        (gb,) = torch.autograd.grad(F.bias_gelu(x.detach(), b, approximate), [b], dy)
        assert_close(gb, gb_t, torch.float32, reduction_scale(240))


def test_empty_and_scalar(backend):
    x = make((0, 3, 64), torch.float32, 0)
    b = make((64,), torch.float32, 1)
    y = F.bias_gelu(x, b)
    assert y.shape == (0, 3, 64)
    gx, gb = torch.autograd.grad(y, [x, b], torch.zeros_like(y))
    assert gx.shape == x.shape and torch.equal(gb, torch.zeros(64))
    s = torch.tensor(1.5, requires_grad=True)
    for approximate in APPROXIMATIONS:
        y = F.gelu(s, approximate)
        assert y.shape == () and torch.allclose(y, TF.gelu(s, approximate=approximate))


def test_nn_gelu_state_dict_and_parity(backend):
    for approximate in APPROXIMATIONS:
        ref, mine = torch.nn.GELU(approximate), fastgpt.nn.GELU(approximate)
        assert isinstance(mine, torch.nn.GELU) and mine.approximate == approximate
        mine.load_state_dict(ref.state_dict())
        x = make((4, 9, 768), torch.float32, 0, scale=1.0)
        y, y_t = mine(x), ref(x)
        assert_close(y, y_t, torch.float32)
        dy = make(y.shape, torch.float32, 1, False)
        (g,), (e,) = torch.autograd.grad(y, [x], dy), torch.autograd.grad(y_t, [x], dy)
        assert_close(g, e, torch.float32)


# ---- accuracy of the C++ tanh and erf forms over the float range ------------------------------

SPECIALS = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1e-30, -1e-30, 1e-7, -1e-7, 86.0, -86.0]
SPECIALS += [88.0, -88.0, 200.0, -200.0, 1e4, -1e4, 1e19, -1e19, 3e38, -3e38]
NONFINITE = [float("inf"), float("-inf"), float("nan")]


def sweep():
    # All of [-10, 10] at a step of 1e-5 (2M points: every region where GELU is not x or 0 to
    # fp32 precision, densely), then the extremes: denormals, exp under/overflow points, huge.
    return torch.cat([torch.linspace(-10, 10, 2_000_001), torch.tensor(SPECIALS)])


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("isa", _cpu.supported_isas())
def test_cpu_accuracy_whole_range(isa, approximate):
    x = sweep()
    truth_fn = reference.gelu
    with run_on(f"cpu-{isa}"):
        y = F.gelu(x, approximate)
        xg = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(F.gelu(xg, approximate), [xg], torch.ones_like(x))
    # Against the exact function (float64): within 1e-6, or 2**-22 (2 ulp) of large values.
    x64 = x.double().requires_grad_()
    truth = truth_fn(x64, approximate)
    (dtruth,) = torch.autograd.grad(truth, [x64], torch.ones_like(truth))
    torch.testing.assert_close(y.double(), truth, atol=1e-6, rtol=2**-22)
    torch.testing.assert_close(dx.double(), dtruth, atol=1e-6, rtol=2**-22)
    # Against torch's own fp32 kernel: its error is up to ~1.2e-6 (erf form) and ours ~4e-7,
    # so the difference is allowed the sum of the two. (torch's erf kernel overflows to inf at
    # x = 3e38, where the exact and our result are 3e38: those two points are left out.)
    ok = x.abs() < 1e38
    y_t = TF.gelu(x[ok], approximate=approximate)
    torch.testing.assert_close(y[ok], y_t, atol=2e-6, rtol=2**-22)
    # Non-finite inputs: what the reference gives (gelu(inf) = inf, gelu(-inf) = nan = -inf * 0,
    # nan -> nan). torch's erf kernel gives nan for +inf, the reference and the math say inf.
    z = torch.tensor(NONFINITE)
    with run_on(f"cpu-{isa}"):
        torch.testing.assert_close(
            F.gelu(z, approximate), reference.gelu(z, approximate), equal_nan=True
        )
        # A nan input gets a nan gradient (never a finite one that would hide it).
        zn = torch.full((40,), float("nan"), requires_grad=True)
        (dz,) = torch.autograd.grad(F.gelu(zn, approximate), [zn], torch.ones_like(zn))
        assert dz.isnan().all()
        # Outputs are rounded once: small negative outputs keep their relative precision.
        t = torch.tensor([-5.0, -4.0, -3.0])
        torch.testing.assert_close(
            F.gelu(t, approximate),
            reference.gelu(t.double(), approximate).float(),
            rtol=1e-5,
            atol=0,
        )


# ---- registration, compile, gradcheck, properties ---------------------------------------------


@pytest.mark.parametrize("isa", _cpu.supported_isas())
def test_opcheck(isa):
    with _cpu.use_isa(isa):
        x = make((17, 33), torch.float32, 0, False)
        b = make((33,), torch.float32, 1, False)
        dy = make((17, 33), torch.float32, 2, False)
        for approximate in APPROXIMATIONS:
            cases = [
                (torch.ops.fastgpt.gelu_fwd, (x, None, approximate)),
                (torch.ops.fastgpt.gelu_fwd, (x, b, approximate)),
                (torch.ops.fastgpt.gelu_bwd, (dy, x, b, approximate, True)),
                (torch.ops.fastgpt.gelu_bwd, (dy, x, b, approximate, False)),
                (torch.ops.fastgpt.gelu_bwd, (dy, x, None, approximate, False)),
            ]
            for op, args in cases:
                torch.library.opcheck(op, args)


def test_gradcheck_float64_cpu():
    with run_on(BEST_CPU):
        x = make((5, 13), torch.float64, 0)
        b = make((13,), torch.float64, 1)
        for approx in APPROXIMATIONS:
            assert torch.autograd.gradcheck(lambda a, ap=approx: F.gelu(a, ap), (x,))
            assert torch.autograd.gradcheck(lambda a, c, ap=approx: F.bias_gelu(a, c, ap), (x, b))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def mlp(x, w, b):
        h = F.bias_gelu(x @ w, b, "tanh")
        return F.gelu(h, "none") * 2

    compiled = torch.compile(mlp, fullgraph=True)
    x, w, b = (
        make((8, 32), torch.float32, 0),
        make((32, 64), torch.float32, 1),
        make((64,), torch.float32, 2),
    )
    with run_on(BEST_CPU):
        out = compiled(x, w, b)
        out_e = mlp(x, w, b)
        assert_close(out, out_e, torch.float32)
        dy = make(out.shape, torch.float32, 3, False)
        for g, e in zip(
            torch.autograd.grad(out, [x, w, b], dy), torch.autograd.grad(out_e, [x, w, b], dy)
        ):
            assert_close(g, e, torch.float32, 4)


def test_dbias_is_deterministic():
    x = make((1000, 3072), torch.float32, 0)
    b = make((3072,), torch.float32, 1)
    dy = make((1000, 3072), torch.float32, 2, False)
    with run_on(BEST_CPU):
        first = torch.ops.fastgpt.gelu_bwd(dy, x.detach(), b.detach(), "tanh", True)[1]
        for _ in range(3):
            again = torch.ops.fastgpt.gelu_bwd(dy, x.detach(), b.detach(), "tanh", True)[1]
            assert torch.equal(first, again)


@given(
    rows=st.integers(0, 40),
    cols=st.integers(1, 300),
    scale=st.floats(1e-3, 30),
    approximate=st.sampled_from(APPROXIMATIONS),
    with_bias=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_property_matches_reference(rows, cols, scale, approximate, with_bias):
    for isa in _cpu.supported_isas():
        with run_on(f"cpu-{isa}"):
            x = make((rows, cols), torch.float32, rows, scale=scale)
            b = make((cols,), torch.float32, 1, scale=scale)
            if with_bias:
                y, y_r = F.bias_gelu(x, b, approximate), reference.bias_gelu(x, b, approximate)
                ins = [x, b]
            else:
                y, y_r = F.gelu(x, approximate), reference.gelu(x, approximate)
                ins = [x]
            torch.testing.assert_close(y, y_r, atol=1e-6, rtol=2**-21)
            dy = make((rows, cols), torch.float32, 3, False)
            red = reduction_scale(max(rows, 1))
            for g, e, s in zip(
                torch.autograd.grad(y, ins, dy), torch.autograd.grad(y_r, ins, dy), (1, red)
            ):
                torch.testing.assert_close(g, e, atol=1e-5 * s, rtol=1e-5 * s)


# ---- input checks of the C++ kernels: each raises a clear RuntimeError ------------------------

X = torch.randn(4, 8)
B = torch.randn(8)
BAD_CALLS = {
    "integer input": (
        lambda: torch.ops.fastgpt.gelu_fwd(X.long(), None, "none"),
        "must be float32, bfloat16, float16 or float64",
    ),
    "non-contiguous input": (
        lambda: torch.ops.fastgpt.gelu_fwd(torch.randn(8, 4).t(), None, "none"),
        "input must be contiguous",
    ),
    "bad approximate": (
        lambda: torch.ops.fastgpt.gelu_fwd(X, None, "sigmoid"),
        "approximate must be 'none' or 'tanh'",
    ),
    "bias shape": (
        lambda: torch.ops.fastgpt.gelu_fwd(X, torch.randn(4), "tanh"),
        r"bias must have shape \(8\)",
    ),
    "bias 2-D": (
        lambda: torch.ops.fastgpt.gelu_fwd(X, torch.randn(1, 8), "tanh"),
        r"bias must have shape \(8\)",
    ),
    "bias dtype": (
        lambda: torch.ops.fastgpt.gelu_fwd(X, B.double(), "tanh"),
        "bias has dtype",
    ),
    "bias non-contiguous": (
        lambda: torch.ops.fastgpt.gelu_fwd(X, torch.randn(16)[::2], "tanh"),
        "bias must be contiguous",
    ),
    "scalar input with bias": (
        lambda: torch.ops.fastgpt.gelu_fwd(torch.tensor(1.0), B, "tanh"),
        "at least 1 dim",
    ),
    "grad shape": (
        lambda: torch.ops.fastgpt.gelu_bwd(torch.randn(3, 8), X, None, "none", False),
        "grad_output has shape",
    ),
    "grad dtype": (
        lambda: torch.ops.fastgpt.gelu_bwd(X.half(), X, None, "none", False),
        "grad_output has dtype",
    ),
    "grad non-contiguous": (
        lambda: torch.ops.fastgpt.gelu_bwd(torch.randn(8, 4).t(), X, None, "none", False),
        "grad_output must be contiguous",
    ),
    "bwd bad approximate": (
        lambda: torch.ops.fastgpt.gelu_bwd(X, X, None, "exact", False),
        "approximate must be 'none' or 'tanh'",
    ),
    "bwd bias shape": (
        lambda: torch.ops.fastgpt.gelu_bwd(X, X, torch.randn(5), "tanh", True),
        r"bias must have shape \(8\)",
    ),
    "bias_grad without bias": (
        lambda: torch.ops.fastgpt.gelu_bwd(X, X, None, "tanh", True),
        "bias_grad needs a bias",
    ),
}


test_cpp_input_checks = cpp_input_checks(BAD_CALLS)


def test_functional_argument_errors(backend):
    with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
        F.gelu(X, "sigmoid")
    with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
        F.bias_gelu(X, B, "exact")
    with pytest.raises(RuntimeError, match="bias_gelu: bias of shape"):
        F.bias_gelu(X, torch.randn(4))
    with pytest.raises(RuntimeError, match="bias_gelu: bias of shape"):
        F.bias_gelu(torch.tensor(1.0), B)


def test_mixed_dtype_and_integer_run_reference_and_log_once(caplog):
    x = make((5, 16), torch.bfloat16, 0)
    b = make((16,), torch.float32, 1)
    with caplog.at_level(logging.INFO, logger="fastgpt"), run_on(BEST_CPU):
        y = F.bias_gelu(x, b)
        F.bias_gelu(x, b)
    assert_close(y, reference.bias_gelu(x, b, "tanh"), torch.bfloat16)
    assert sum("mixed dtype" in r.message for r in caplog.records) == 1


# ---- bias_gelu_linear: the MLP's GELU + second matmul, the GELU output recomputed -------------


def gelu_linear_inputs(lead, c, n, dtype, with_bias, with_linear_bias):
    x = make((*lead, c), dtype, 0)
    b = make((c,), dtype, 1) if with_bias else None
    w = make((n, c), dtype, 2, scale=0.1)
    lb = make((n,), dtype, 3) if with_linear_bias else None
    return x, b, w, lb


@pytest.mark.parametrize("with_linear_bias", [True, False], ids=["linear_bias", "no_linear_bias"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_gelu_linear_parity(backend, dtype, approximate, with_bias, with_linear_bias):
    for lead, c, n in [((17,), 40, 23), ((2, 3), 1023, 17), ((1,), 1, 5)]:
        x, b, w, lb = gelu_linear_inputs(lead, c, n, dtype, with_bias, with_linear_bias)
        ins = [t for t in (x, b, w, lb) if t is not None]
        y = F.bias_gelu_linear(x, b, w, lb, approximate)
        assert y.shape == (*lead, n) and y.dtype == dtype
        dy = make(y.shape, dtype, 4, requires_grad=False, scale=1.0)
        got = torch.autograd.grad(y, ins, dy)
        # torch's own modules in fp32 on the same inputs ...
        hi = [t.detach().float().requires_grad_() for t in ins]
        xh, bh, wh, lbh = (hi.pop(0) if t is not None else None for t in (x, b, w, lb))
        hi = [t for t in (xh, bh, wh, lbh) if t is not None]
        g = TF.gelu(xh if bh is None else xh + bh, approximate=approximate)
        if dtype != torch.float32:
            g = g.to(dtype).float()  # the GELU output is rounded once, as the op's
        y_t = TF.linear(g, wh, lbh)
        assert_close(y, y_t.to(dtype), dtype, reduction_scale(c))
        for a, e in zip(got, torch.autograd.grad(y_t, hi, dy.float())):
            assert_close(a, e.to(dtype), dtype, reduction_scale(max(c, x.numel() // c)))
        # ... and the two-call composition it replaces, on this backend.
        g2 = F.gelu(x, approximate) if b is None else F.bias_gelu(x, b, approximate)
        y2 = TF.linear(g2, w, lb)
        assert_close(y, y2, dtype)
        for a, e in zip(got, torch.autograd.grad(y2, ins, dy)):
            assert_close(a, e, dtype, 4)


def test_bias_gelu_linear_keeps_only_its_inputs(backend):
    x, b, w, lb = gelu_linear_inputs((64,), 96, 32, torch.float32, True, True)
    extra, y = saved_bytes_beyond(lambda: F.bias_gelu_linear(x, b, w, lb), (x, b, w))
    if backend == "reference":
        # The reference path is the plain composition: it keeps the GELU output.
        assert extra > 0
    else:
        assert extra == 0, "the GELU output must not be kept for the backward"
    # The composition it replaces keeps more, which is the point.
    extra2, _ = saved_bytes_beyond(lambda: TF.linear(F.bias_gelu(x, b), w, lb), (x, b, w))
    assert extra2 > 0
    y.sum().backward()
    assert x.grad is not None and b.grad is not None and w.grad is not None


def test_bias_gelu_linear_gradcheck_and_compile():
    with run_on(BEST_CPU):
        x, b, w, lb = gelu_linear_inputs((3, 5), 13, 7, torch.float64, True, True)
        for approx in APPROXIMATIONS:
            assert torch.autograd.gradcheck(
                lambda *a, ap=approx: F.bias_gelu_linear(*a, approximate=ap), (x, b, w, lb)
            )
        assert torch.autograd.gradcheck(lambda a, c: F.bias_gelu_linear(a, None, c), (x, w))

    torch._dynamo.reset()

    def mlp(h, w1, b1, w2, b2):
        return F.bias_gelu_linear(h @ w1.t(), b1, w2, b2)

    compiled = torch.compile(mlp, fullgraph=True)
    h = make((2, 9, 32), torch.float32, 5)
    w1, b1 = make((64, 32), torch.float32, 6, scale=0.2), make((64,), torch.float32, 7)
    w2, b2 = make((32, 64), torch.float32, 8, scale=0.2), make((32,), torch.float32, 9)
    ins = [h, w1, b1, w2, b2]
    with run_on(BEST_CPU):
        dy = make((2, 9, 32), torch.float32, 10, False)
        assert_compiled_matches_eager(compiled, mlp, ins, dy)


def test_bias_gelu_linear_argument_errors(backend):
    w = torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
        F.bias_gelu_linear(X, B, w, approximate="exact")
    with pytest.raises(RuntimeError, match="bias_gelu_linear: bias of shape"):
        F.bias_gelu_linear(X, torch.randn(4), w)
    with pytest.raises(RuntimeError, match="bias_gelu_linear: weight of shape"):
        F.bias_gelu_linear(X, B, torch.randn(5, 15))
    with pytest.raises(RuntimeError, match="at least one dim"):
        F.bias_gelu_linear(torch.tensor(1.0), None, w)
