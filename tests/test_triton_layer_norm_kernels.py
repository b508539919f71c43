"""The Triton LayerNorm launchers (fastgpt/triton/layer_norm.py) under Triton's interpreter, on
CPU tensors, against plain PyTorch: F.layer_norm for the forward, autograd for the gradients.

The interpreter runs each program in Python, one after another, so the cases are a reduced
cross-product: every N, dtype and flag combination appears, not every combination of them.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import load_interpreted

ln = load_interpreted("fastgpt.triton.layer_norm")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


EPS = 1e-5
# (rtol, atol) of outputs and of gradients. fp32 gradients get 1e-4: dweight and dbias sum over
# rows in another order than autograd does.
TOLERANCES = {
    torch.float32: ((1e-5, 1e-5), (1e-4, 1e-4)),
    torch.bfloat16: ((2e-2, 2e-2), (2e-2, 2e-2)),
    torch.float16: ((1e-2, 1e-2), (1e-2, 1e-2)),
}
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _randn(*shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    # A nonzero mean, as activations have: it exercises the centring of the variance.
    return (torch.randn(*shape, generator=generator) + 0.5).to(dtype)


def _inputs(M, N, dtype, residual, weight, bias):
    x = _randn(M, N, dtype=dtype, seed=0)
    r = _randn(M, N, dtype=dtype, seed=1) if residual else None
    w = _randn(N, dtype=dtype, seed=2) if weight else None
    b = _randn(N, dtype=dtype, seed=3) if bias else None
    return x, r, w, b


def _check_summed(summed, x, r):
    expected = x + r
    if x.dtype == torch.bfloat16:
        # The interpreter rounds fp32 -> bf16 toward zero where the GPU rounds to nearest even
        # (triton/runtime/interpreter.py, _convert_float): equal within one bf16 ulp here.
        torch.testing.assert_close(summed.float(), expected.float(), rtol=2**-7, atol=1e-6)
    else:
        assert torch.equal(summed, expected)


# (M, N, dtype, residual, weight, bias): each N, dtype, M in {1, 17, 100} and all 8 flag sets.
FORWARD_CASES = [
    (1, 1, F32, False, False, False),
    (17, 17, F32, True, True, True),
    (100, 768, F32, False, True, True),
    (17, 1023, BF16, True, False, True),
    (17, 1500, F16, True, True, False),
    (100, 17, BF16, False, True, False),
    (1, 768, F16, False, False, True),
    (17, 1500, BF16, True, False, False),
    (1, 1023, F16, True, True, True),
]


@pytest.mark.parametrize("M, N, dtype, residual, weight, bias", FORWARD_CASES)
def test_forward(M, N, dtype, residual, weight, bias):
    x, r, w, b = _inputs(M, N, dtype, residual, weight, bias)
    if residual:
        y, summed, mean, rstd = ln.add_layer_norm_fwd(x, r, w, b, EPS)
        _check_summed(summed, x, r)
    else:
        y, mean, rstd = ln.layer_norm_fwd(x, w, b, EPS)
        summed = x
    assert y.shape == (M, N) and y.dtype == dtype
    assert mean.shape == rstd.shape == (M,)
    assert mean.dtype == rstd.dtype == torch.float32

    (rtol, atol), _ = TOLERANCES[dtype]
    expected = F.layer_norm(summed, (N,), w, b, EPS)
    torch.testing.assert_close(y, expected, rtol=rtol, atol=atol)
    # The statistics are fp32 whatever the dtype: fp32 tolerances.
    s = summed.float()
    torch.testing.assert_close(mean, s.mean(dim=1), rtol=1e-5, atol=1e-5)
    expected_rstd = torch.rsqrt(s.var(dim=1, unbiased=False) + EPS)
    torch.testing.assert_close(rstd, expected_rstd, rtol=1e-5, atol=1e-5)


def _expected_grads(x, r, w, b, dy, dres):
    """Autograd, in fp32, through s = x + r; y = layer_norm(s), with dy on y and dres on s."""
    leaves = [t.float().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    xf, rf, wf, bf = leaves
    s = xf + rf if rf is not None else xf
    y = F.layer_norm(s, (x.shape[1],), wf, bf, EPS)
    loss = (y * dy.float()).sum()
    if dres is not None:
        loss = loss + (s * dres.float()).sum()
    loss.backward()
    if rf is not None:
        assert torch.equal(xf.grad, rf.grad)
    return xf.grad, (wf.grad if wf is not None else None), (bf.grad if bf is not None else None)


# (M, N, dtype, weight, dresidual, weight_grad, bias_grad). A dresidual comes with a residual in
# the forward, and weight_grad with a weight; bias_grad means the forward had a bias.
BACKWARD_CASES = [
    (1, 1, F32, True, False, True, True),
    (17, 17, F32, False, True, False, True),
    (100, 768, F32, True, True, True, True),
    (17, 1023, BF16, True, False, True, False),
    (17, 1500, F16, False, False, False, False),
    (100, 1500, BF16, True, True, True, True),
    (17, 768, F16, True, True, False, True),
]


def _run_backward(M, N, dtype, weight, dresidual, weight_grad, bias_grad):
    x, r, w, b = _inputs(M, N, dtype, dresidual, weight, bias_grad)
    dy = _randn(M, N, dtype=dtype, seed=4)
    dres = _randn(M, N, dtype=dtype, seed=5) if dresidual else None
    if dresidual:
        _, summed, mean, rstd = ln.add_layer_norm_fwd(x, r, w, b, EPS)
    else:
        _, mean, rstd = ln.layer_norm_fwd(x, w, b, EPS)
        summed = x
    dx, dw, db = ln.layer_norm_bwd(dy, summed, mean, rstd, w, dres, weight_grad, bias_grad)

    _, (rtol, atol) = TOLERANCES[dtype]
    if dtype == torch.bfloat16 and dresidual:
        # The reference differentiates at torch's x + r; ours at the interpreter's truncated sum
        # (see _check_summed). Differentiate at our summed so both see the same LayerNorm input.
        x, r = summed, None
    expected_dx, expected_dw, expected_db = _expected_grads(x, r, w, b, dy, dres)
    assert dx.shape == (M, N) and dx.dtype == dtype
    torch.testing.assert_close(dx.float(), expected_dx, rtol=rtol, atol=atol)
    for grad, wanted, expected in ((dw, weight_grad, expected_dw), (db, bias_grad, expected_db)):
        if wanted:
            assert grad.shape == (N,) and grad.dtype == dtype
            torch.testing.assert_close(grad.float(), expected, rtol=rtol, atol=atol)
        else:
            assert grad.numel() == 0


@pytest.mark.parametrize("M, N, dtype, weight, dresidual, weight_grad, bias_grad", BACKWARD_CASES)
def test_backward(M, N, dtype, weight, dresidual, weight_grad, bias_grad):
    _run_backward(M, N, dtype, weight, dresidual, weight_grad, bias_grad)


@pytest.mark.parametrize("N, dtype", [(1023, F32), (1500, BF16)])
def test_wide_rows(monkeypatch, N, dtype):
    # The wide kernels (rows longer than MAX_BLOCK_N, looped in chunks) at interpreter-sized N.
    # Chunks of 128: 8 and 12 of them, the last one ragged.
    monkeypatch.setattr(ln, "MAX_BLOCK_N", 512)
    assert ln._row_config(N)[2], "these rows must take the wide kernels"
    test_forward(9, N, dtype, True, True, True)
    test_forward(2, N, dtype, False, False, True)
    _run_backward(9, N, dtype, True, True, True, True)
    _run_backward(2, N, dtype, False, False, False, True)


def test_empty_batch():
    x = torch.empty(0, 768)
    w, b = torch.ones(768), torch.zeros(768)
    y, mean, rstd = ln.layer_norm_fwd(x, w, b, EPS)
    assert y.shape == (0, 768) and mean.shape == rstd.shape == (0,)
    y, summed, mean, rstd = ln.add_layer_norm_fwd(x, x, w, b, EPS)
    assert y.shape == summed.shape == (0, 768)
    dx, dw, db = ln.layer_norm_bwd(x, x, mean, rstd, w, x, True, True)
    assert dx.shape == (0, 768)
    # A sum over no rows is zero.
    assert torch.equal(dw, torch.zeros(768)) and torch.equal(db, torch.zeros(768))
    _, dw, db = ln.layer_norm_bwd(x, x, mean, rstd, None, None, False, False)
    assert dw.numel() == db.numel() == 0


def test_cost_model():
    M, N = 8, 768
    assert ln.layer_norm_fwd_cost(M, N, 2, False) == (7 * M * N, 2 * M * N * 2 + 2 * N * 2 + 8 * M)
    flops, nbytes = ln.layer_norm_fwd_cost(M, N, 2, True)
    assert flops == 8 * M * N and nbytes == 4 * M * N * 2 + 2 * N * 2 + 8 * M
    flops, nbytes = ln.layer_norm_bwd_cost(M, N, 4, True)
    assert flops == 14 * M * N and nbytes == 4 * M * N * 4 + 3 * N * 4 + 8 * M
