"""F.linear and the fastgpt::matmul op under it: parity with torch and the reference on every
backend, dtype, odd shape and operand layout, and on both of ATen's GEMM libraries (oneDNN,
MKL); custom-op registration; compile; gradcheck; every input check of the C++ kernel; which
library actually ran."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF
from conftest import (
    assert_close,
    assert_compiled_matches_eager,
    cpp_input_checks,
    reduction_scale,
    run_on,
    run_python,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgpt
import fastgpt.functional as F
from fastgpt import _cpu, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BEST_CPU = f"cpu-{_cpu.supported_isas()[-1]}" if _cpu.supported_isas() else None
HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
GEMMS = ["onednn", "aten"]


def shapes_for(backend, dtype):
    """(rows, in_features, out_features): rows 1, 17, 1000; widths from 1 to past 1023."""
    small = [(1, 768, 17), (17, 1, 5), (17, 17, 17), (17, 1023, 33), (1000, 17, 1)]
    if backend in ("triton", "reference") or dtype == torch.float16:
        return small  # torch's own product there: no kernel of fastgpt's to sweep
    return small + [(1000, 768, 769), (17, 1500, 2304), (1, 64, 50257)]


def make(shape, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    return t.to(dtype).requires_grad_(requires_grad)


def check(rows, k, n, dtype, with_bias, x=None, w=None):
    x = make((rows, k), dtype, 0) if x is None else x
    w = make((n, k), dtype, 1) if w is None else w
    b = make((n,), dtype, 2) if with_bias else None
    ins = [x, w] + ([b] if with_bias else [])
    y = F.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n) and y.is_contiguous()
    dy = make(y.shape, dtype, 3, requires_grad=False)
    got = torch.autograd.grad(y, ins, dy)
    # A product sums k terms (the output, d_input over n, d_weight over the rows) in another
    # order than torch: rounding error grows as sqrt(terms).
    scales = (reduction_scale(k), reduction_scale(n), reduction_scale(rows), reduction_scale(rows))
    # torch's own F.linear in fp32 (float64 stays) on the same rounded inputs, rounded once ...
    hi = torch.float64 if dtype == torch.float64 else torch.float32
    ins_t = [t.detach().to(hi).requires_grad_() for t in ins]
    y_t = TF.linear(*ins_t)
    assert_close(y, y_t.to(dtype), dtype, scales[0])
    for g, e, s in zip(got, torch.autograd.grad(y_t, ins_t, dy.to(hi)), scales[1:]):
        assert_close(g, e.to(dtype), dtype, s)
    # ... and the reference (fp32 math, one rounding).
    y_r = reference.linear(*ins)
    assert_close(y, y_r, dtype, scales[0])
    for g, e, s in zip(got, torch.autograd.grad(y_r, ins, dy), scales[1:]):
        assert_close(g, e, dtype, s)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_parity(backend, dtype, with_bias):
    for rows, k, n in shapes_for(backend, dtype):
        check(rows, k, n, dtype, with_bias)


@pytest.mark.parametrize("gemm", GEMMS)
def test_linear_parity_on_each_gemm_library(gemm):
    """Every shape through oneDNN (no size threshold) and through MKL, on the best ISA build."""
    with run_on(BEST_CPU), _cpu.use_gemm(gemm):
        for rows, k, n in shapes_for(BEST_CPU, torch.float32):
            check(rows, k, n, torch.float32, with_bias=True)
            check(rows, k, n, torch.float32, with_bias=False)


def test_float64(backend):
    # Triton has no float64 kernel: there this proves the fallback to torch's F.linear is right.
    check(17, 100, 33, torch.float64, with_bias=True)


def test_leading_dims_layouts_and_one_gradient(backend):
    # A non-contiguous 3-D input, and a weight that is the transpose of a contiguous tensor
    # (transformers' Conv1D keeps W as (in, out) and a patched model passes W.t()).
    base = make((6, 40, 33), torch.float32, 0)
    x = base.transpose(0, 1)
    w_in_out = make((33, 21), torch.float32, 1)
    b = make((21,), torch.float32, 2)
    dy = make((40, 6, 21), torch.float32, 3, False)
    y, y_t = F.linear(x, w_in_out.t(), b), TF.linear(x, w_in_out.t(), b)
    assert_close(y, y_t, torch.float32, reduction_scale(33))
    got = torch.autograd.grad(y, [base, w_in_out, b], dy)
    want = torch.autograd.grad(y_t, [base, w_in_out, b], dy)
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32, reduction_scale(240))
    # The transposed weight's gradient arrives in the parameter's own layout.
    F.linear(x, w_in_out.t(), b).backward(dy)
    assert w_in_out.grad.is_contiguous()
    # Only the input needs a gradient; then only the weight.
    w = make((21, 33), torch.float32, 4)
    (gx,) = torch.autograd.grad(F.linear(x, w.detach(), b.detach()), [base], dy)
    assert_close(gx, torch.autograd.grad(TF.linear(x, w, b), [base], dy)[0], torch.float32, 5)
    (gw,) = torch.autograd.grad(F.linear(x.detach(), w, None), [w], dy)
    assert_close(gw, torch.autograd.grad(TF.linear(x, w), [w], dy)[0], torch.float32, 16)


def test_vector_input_empty_and_inference(backend):
    w, b = make((5, 7), torch.float32, 1), make((5,), torch.float32, 2)
    v = make((7,), torch.float32, 0)
    assert_close(F.linear(v, w, b), TF.linear(v, w, b), torch.float32)
    e = make((0, 3, 7), torch.float32, 0)
    y = F.linear(e, w, b)
    assert y.shape == (0, 3, 5)
    gx, gw, gb = torch.autograd.grad(y, [e, w, b], torch.zeros_like(y))
    assert gx.shape == e.shape and torch.equal(gw, torch.zeros_like(w))
    assert torch.equal(gb, torch.zeros(5))
    # no rows of input features: the product is the bias alone
    z = F.linear(torch.zeros(4, 0), torch.zeros(5, 0), b)
    assert torch.equal(z, b.detach().expand(4, 5))
    with torch.no_grad():
        x = make((3, 7), torch.float32, 0)
        out = F.linear(x, w, b)
        assert not out.requires_grad
        assert_close(out, TF.linear(x, w, b), torch.float32)


def test_nn_linear_state_dict_and_parity(backend):
    torch.manual_seed(0)
    ref, mine = torch.nn.Linear(64, 48), fastgpt.nn.Linear(64, 48)
    assert isinstance(mine, torch.nn.Linear)
    mine.load_state_dict(ref.state_dict())
    x = make((4, 9, 64), torch.float32, 0)
    y, y_t = mine(x), ref(x)
    assert_close(y, y_t, torch.float32, 8)
    dy = make(y.shape, torch.float32, 1, False)
    got = torch.autograd.grad(y, [x, mine.weight, mine.bias], dy)
    want = torch.autograd.grad(y_t, [x, ref.weight, ref.bias], dy)
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32, 8)


def test_forms_the_kernel_does_not_take_run_torch():
    with run_on(BEST_CPU):
        x = make((3, 4), torch.float32, 0)
        # a 1-D weight and a broadcast bias: torch's F.linear computes them
        w1 = make((4,), torch.float32, 1)
        assert_close(F.linear(x, w1), TF.linear(x, w1), torch.float32)
        w, b0 = make((5, 4), torch.float32, 2), torch.tensor(0.5)
        assert_close(F.linear(x, w, b0), TF.linear(x, w, b0), torch.float32)
        # mixed dtypes and wrong shapes raise torch's own errors
        with pytest.raises(RuntimeError, match="dtype"):
            F.linear(x, w.double())
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            F.linear(x, make((5, 3), torch.float32, 3))
        xi = torch.arange(12).view(3, 4)
        assert torch.equal(F.linear(xi, xi[:2]), TF.linear(xi, xi[:2]))


# ---- the op itself: operand layouts, registration, compile, gradcheck, properties -------------


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("gemm", GEMMS)
def test_matmul_operand_layouts_and_dtypes(gemm, dtype):
    """Row-major and transposed operands (read in place) and strided ones (copied) give the
    product of their values, in every dtype the op takes (F.linear sends fp32 and products of
    up to FEW_ROWS rows here; the fused linears send every dtype)."""
    a_rm, b_rm = make((65, 130), dtype, 0, False), make((130, 47), dtype, 1, False)
    layouts = {
        "row-major": (a_rm, b_rm),
        "transposed": (a_rm.t().contiguous().t(), b_rm.t().contiguous().t()),
        "strided": (make((65, 260), dtype, 2, False)[:, ::2], b_rm),
    }
    with run_on(BEST_CPU), _cpu.use_gemm(gemm):
        for name, (a, b) in layouts.items():
            bias = make((47,), dtype, 3, False)
            for with_bias in (False, True):
                got = torch.ops.fastgpt.matmul(a, b, bias if with_bias else None)
                want = reference.linear(a, b.t(), bias if with_bias else None)
                assert got.is_contiguous() and got.dtype == dtype, name
                assert_close(got, want, dtype, reduction_scale(130))


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_few_row_products_with_a_bias(rows):
    """One row with a bias and a transposed weight made oneDNN's matmul write outside its output
    (wrong values, then a heap-corruption abort): single rows stay on MKL, and a few rows, which
    do go to oneDNN, are right (csrc/gemm.h)."""
    with run_on(BEST_CPU), _cpu.use_gemm("onednn"):
        for k in (2048, 3072, 8192):
            for _ in range(5):
                a = make((rows, k), torch.float32, k, False)
                w = make((768, k), torch.float32, 1, False)
                bias = make((768,), torch.float32, 2, False)
                got = torch.ops.fastgpt.matmul(a, w.t(), bias)
                assert_close(got, a @ w.t() + bias, torch.float32, reduction_scale(k))


@pytest.mark.parametrize("isa", _cpu.supported_isas(), ids=lambda isa: f"cpu-{isa}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_few_rows_times_a_weight(isa, dtype):
    """1-4 rows times a weight (a decode step's F.linear, fused linears and transformers' Conv1D)
    run the op's own loops under "auto" (csrc/linear.cpp), for a weight stored (out, in) (b is
    its transpose) and one stored (in, out) (b is it): every row count and the first that is not
    (5), weight-row blocks and their tails, column pieces and their tails (n 1, 7, 258, 1100),
    the vector-width tail of k (1, 17, 773), weights read in place with a leading dim past their
    row, with and without a bias, on every ISA build, against float64 products."""
    with fastgpt.use_backend("cpu"), _cpu.use_isa(isa), _cpu.use_gemm("auto"):
        for m in (1, 2, 3, 4, 5):
            for k in (1, 17, 773):
                for n in (1, 7, 258, 1100):
                    a = make((m, k), dtype, m + k, False)
                    out_in = make((n, k + 3), dtype, n, False)[:, :k]
                    in_out = make((k, n + 5), dtype, k, False)[:, :n]
                    bias = make((n,), dtype, 2, False)
                    for b_mat in (out_in.t(), out_in.contiguous().t(), in_out, in_out.contiguous()):
                        for b in (None, bias):
                            got = torch.ops.fastgpt.matmul(a, b_mat, b)
                            want = a.double() @ b_mat.double()
                            want = want if b is None else want + b.double()
                            assert got.dtype == dtype and got.shape == (m, n)
                            assert got.is_contiguous()
                            assert_close(got, want.to(dtype), dtype, reduction_scale(k))


@pytest.mark.parametrize("isa", _cpu.supported_isas())
def test_opcheck(isa):
    a, b = make((17, 33), torch.float32, 0, False), make((33, 9), torch.float32, 1, False)
    bias = make((9,), torch.float32, 2, False)
    with _cpu.use_isa(isa):
        for gemm in GEMMS:
            with _cpu.use_gemm(gemm):
                for args in [(a, b, None), (a, b, bias), (b.t(), a.t(), None)]:
                    torch.library.opcheck(torch.ops.fastgpt.matmul, args)


def test_gradcheck_float64_cpu():
    with run_on(BEST_CPU):
        x, w = make((5, 13), torch.float64, 0), make((7, 13), torch.float64, 1)
        b = make((7,), torch.float64, 2)
        assert torch.autograd.gradcheck(F.linear, (x, w, b))
        assert torch.autograd.gradcheck(lambda u, v: F.linear(u, v.t()), (x, w.t().detach()))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def mlp(x, w1, b1, w2):
        return F.linear(F.gelu(F.linear(x, w1, b1), "tanh"), w2)

    compiled = torch.compile(mlp, fullgraph=True)
    ins = [
        make((8, 32), torch.float32, 0),
        make((64, 32), torch.float32, 1),
        make((64,), torch.float32, 2),
        make((16, 64), torch.float32, 3),
    ]
    with run_on(BEST_CPU):
        dy = make((8, 16), torch.float32, 4, False)
        assert_compiled_matches_eager(compiled, mlp, ins, dy)


@given(
    rows=st.integers(0, 70),
    k=st.integers(1, 200),
    n=st.integers(1, 200),
    with_bias=st.booleans(),
    gemm=st.sampled_from(GEMMS),
)
@settings(max_examples=40, deadline=None)
def test_property_matches_reference(rows, k, n, with_bias, gemm):
    with run_on(BEST_CPU), _cpu.use_gemm(gemm):
        x, w = make((rows, k), torch.float32, rows), make((n, k), torch.float32, k)
        b = make((n,), torch.float32, n) if with_bias else None
        ins = [t for t in (x, w, b) if t is not None]
        y, y_r = F.linear(x, w, b), reference.linear(x, w, b)
        torch.testing.assert_close(y, y_r, atol=1e-5 * k**0.5, rtol=1e-5)
        dy = make(y.shape, torch.float32, 3, False)
        for g, e in zip(torch.autograd.grad(y, ins, dy), torch.autograd.grad(y_r, ins, dy)):
            s = max(n, rows, 1) ** 0.5
            torch.testing.assert_close(g, e, atol=1e-5 * s, rtol=1e-5)


# ---- which library ran ------------------------------------------------------------------------


def test_gemm_choice_and_its_switches():
    with run_on(BEST_CPU):
        assert _cpu.gemm_library() == ("onednn" if HAS_AVX512 else "mkl")
        with _cpu.use_gemm("aten"):
            assert _cpu.gemm_library() == "mkl"
        with torch.backends.mkldnn.flags(enabled=False):
            assert _cpu.gemm_library() == "mkl"
        with pytest.raises(ValueError, match="gemm must be one of"), _cpu.use_gemm("blis"):
            pass


def _onednn_matmuls_logged(gemm: str) -> int:
    """How many oneDNN matmul primitives one 512 x 768 x 512 fp32 F.linear (fwd + bwd) ran in a
    fresh process, by oneDNN's own log (ONEDNN_VERBOSE)."""
    code = (
        "import torch, fastgpt.functional as F\n"
        "x = torch.randn(512, 768, requires_grad=True); w = torch.randn(512, 768)\n"
        "F.linear(x, w).sum().backward()\n"
    )
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "FASTGPT_CPU_GEMM": gemm}
    env.pop("FASTGPT_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in out.splitlines() if ",exec," in line and ",matmul," in line)


@pytest.mark.skipif(not HAS_AVX512, reason="oneDNN's fp32 matmul is chosen only with AVX-512")
def test_fp32_products_run_on_onednn_unless_told_otherwise():
    assert _onednn_matmuls_logged("auto") == 2  # the output and d_input (w needs no grad)
    assert _onednn_matmuls_logged("aten") == 0


@pytest.mark.skipif(not HAS_AVX512, reason="oneDNN's fp32 matmul is chosen only with AVX-512")
def test_many_row_counts_keep_memory_bounded():
    # oneDNN keeps a primitive (~0.5 MB of JIT code) per product shape, in caches of 1024 entries
    # (csrc/gemm.h): this loop grew the process by 350 MB before the shape budget sent the
    # products past it to MKL. Those products must still be right.
    code = """
import torch, fastgpt, fastgpt.functional as F
torch.set_num_threads(2)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w, b = torch.randn(768, 768), torch.randn(768)
with fastgpt.use_backend("cpu"):
    for n in range(200, 500):
        x = torch.randn(n, 768, requires_grad=True)
        y = F.linear(x, w, b)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        if n == 250:
            start = rss_mb()
torch.testing.assert_close(y, x @ w.T + b, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(dx, torch.ones_like(y) @ w, atol=1e-4, rtol=1e-4)
print(rss_mb() - start)
"""
    grown_mb = float(run_python(code, FASTGPT_CPU_GEMM="auto"))
    assert grown_mb < 100, f"resident memory grew {grown_mb:.0f} MB over 250 row counts"


def test_bad_gemm_variable_is_a_clear_error():
    env = {**os.environ, "FASTGPT_CPU_GEMM": "fastest"}
    out = subprocess.run(
        [sys.executable, "-c", "import fastgpt"], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "FASTGPT_CPU_GEMM must be one of" in out.stderr, json.dumps(out.stderr[-500:])


# ---- input checks of the C++ kernel: each raises a clear RuntimeError -------------------------

A, B = torch.randn(4, 8), torch.randn(8, 3)

BAD_CALLS = {
    "integer a": (
        lambda: torch.ops.fastgpt.matmul(A.long(), B.long(), None),
        "must be float32, bfloat16, float16 or float64",
    ),
    "a 1-D": (lambda: torch.ops.fastgpt.matmul(A[0], B, None), "must be 2-D"),
    "b 3-D": (lambda: torch.ops.fastgpt.matmul(A, B[None], None), "must be 2-D"),
    "inner sizes": (
        lambda: torch.ops.fastgpt.matmul(A, B.t(), None),
        r"cannot be multiplied \(8 != 3\)",
    ),
    "b dtype": (lambda: torch.ops.fastgpt.matmul(A, B.double(), None), "b has dtype"),
    "bias shape": (
        lambda: torch.ops.fastgpt.matmul(A, B, torch.randn(4)),
        r"bias must have shape \(3\)",
    ),
    "bias dtype": (lambda: torch.ops.fastgpt.matmul(A, B, torch.randn(3).half()), "bias has"),
    "bias integer": (
        lambda: torch.ops.fastgpt.matmul(A, B, torch.ones(3, dtype=torch.long)),
        "bias must be float32",
    ),
}

test_cpp_input_checks = cpp_input_checks(BAD_CALLS)
