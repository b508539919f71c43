"""The Triton attention launchers (fastgpt/triton/attention.py) under Triton's interpreter, on CPU
tensors: forward (out, lse) and every gradient against `fastgpt.reference` and torch, the causal
bottom-right alignment with Tq != Tk both ways, fully masked rows, dropout (determinism, and
parity with a reference that applies the kernel's own mask), and the split-K decode path.

The interpreter runs each program in Python, one after another, with the fixed 16x16 tiles of the
interpreter path (so T = 17, 100, 130 cross block and diagonal boundaries): the cases are a
reduced cross-product, with B·H = 2.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import load_interpreted

from fastgpt import reference

attn = load_interpreted("fastgpt.triton.attention")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# fp32: the kernels use IEEE fp32 dots, so only summation order differs from the reference: the
# attention tolerance of DESIGN.md. bf16/fp16: against fp32 math on the same rounded inputs; the
# kernel rounds P to the input dtype before P·V (as every flash kernel does) and rounds once on
# store, so the error is a few ulps of the output dtype.
TOL = {F32: 1e-4, BF16: 2e-2, F16: 1e-2}


def _inputs(B, H, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, H, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, H, Tk, D, generator=g).to(dtype)
    do = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    return q, k, v, do


def _visible(Tq, Tk, causal):
    if causal:
        return reference.causal_mask(Tq, Tk)
    return torch.ones(Tq, Tk, dtype=torch.bool)


def _fp32_reference(q, k, v, do, scale, causal, keep=None, dropout_p=0.0):
    """(out, lse, dq, dk, dv) in fp32 from the given (possibly low-precision) inputs. keep: a
    dropout keep mask (B, H, Tq, Tk) to apply, as the kernels do, after normalisation."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    Tq, Tk = q.shape[2], k.shape[2]
    if keep is None:
        out = reference.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    else:
        scores = (q @ k.transpose(-2, -1)) * scale
        scores = scores.masked_fill(~_visible(Tq, Tk, causal), float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing: zeros
        out = (p * keep / (1.0 - dropout_p)) @ v
    out.backward(do.float())
    scores = (q.detach() @ k.detach().transpose(-2, -1)) * scale
    scores = scores.masked_fill(~_visible(Tq, Tk, causal), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return out.detach(), lse, q.grad, k.grad, v.grad


def _run(q, k, v, do, scale, causal, dropout_p=0.0, seed=0, offset=0):
    out, lse = attn.attention_fwd(q, k, v, scale, causal, dropout_p, seed, offset)
    grads = attn.attention_bwd(do, q, k, v, out, lse, scale, causal, dropout_p, seed, offset)
    return (out, lse, *grads)


def _assert_all_close(got, expected, dtype):
    tol = TOL[dtype]
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, e in zip(names, got, expected, strict=True):
        if name != "lse":
            assert g.dtype == dtype, name
        else:
            assert g.dtype == F32
        torch.testing.assert_close(
            g.float(), e, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


# (B, H, Tq, Tk, D, causal, dtype). Every T of the brief (1, 17, 100, 130) and D (16, 64, 80, 128)
# appears; Tq != Tk both ways, causal and not; bf16 and fp16 on a few shapes.
CASES = [
    (1, 2, 1, 1, 16, False, F32),
    (1, 2, 1, 1, 64, True, F32),
    (2, 1, 17, 17, 64, True, F32),
    (1, 2, 17, 17, 80, False, F32),
    (1, 2, 100, 100, 16, True, F32),
    (1, 2, 130, 130, 16, False, F32),
    (1, 2, 17, 100, 16, True, F32),  # Tq < Tk causal: a KV-cache chunk, bottom-right aligned
    (1, 2, 100, 17, 16, True, F32),  # Tq > Tk causal: the first 83 rows see no key
    (1, 2, 33, 20, 80, False, F32),
    (1, 1, 20, 33, 128, True, F32),
    (1, 2, 100, 100, 64, True, BF16),
    (1, 2, 17, 40, 80, True, BF16),
    (1, 2, 40, 17, 16, True, BF16),
    (1, 2, 17, 17, 64, False, F16),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,dtype", CASES)
def test_forward_and_gradients_match_reference(B, H, Tq, Tk, D, causal, dtype):
    q, k, v, do = _inputs(B, H, Tq, Tk, D, dtype)
    scale = D**-0.5
    got = _run(q, k, v, do, scale, causal)
    expected = _fp32_reference(q, k, v, do, scale, causal)
    _assert_all_close(got, expected, dtype)


@pytest.mark.parametrize("Tq,Tk,causal", [(17, 17, True), (33, 20, False), (17, 40, True)])
def test_matches_torch_sdpa(Tq, Tk, causal):
    # torch's is_causal is top-left aligned when Tq != Tk, so the bottom-right mask is given to
    # torch explicitly.
    q, k, v, do = _inputs(1, 2, Tq, Tk, 64, F32, seed=3)
    scale = 0.3  # not the default: the scale is an argument, not 1/sqrt(D)
    out, lse = attn.attention_fwd(q, k, v, scale, causal, 0.0, 0, 0)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    mask = _visible(Tq, Tk, causal)
    expected = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    expected.backward(do)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-4, atol=1e-4)
    dq, dk, dv = attn.attention_bwd(do, q, k, v, out, lse, scale, causal, 0.0, 0, 0)
    for got, want in ((dq, qt.grad), (dk, kt.grad), (dv, vt.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fully_masked_rows_give_zero_and_minus_inf():
    # Causal with Tq > Tk: query i sees keys j <= i - (Tq - Tk); rows i < Tq - Tk see nothing.
    Tq, Tk = 40, 17
    q, k, v, do = _inputs(1, 2, Tq, Tk, 16, F32, seed=5)
    out, lse, dq, dk, dv = _run(q, k, v, do, 0.25, True)
    empty = Tq - Tk
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert torch.isneginf(lse[:, :, :empty]).all()
    assert torch.isfinite(lse[:, :, empty:]).all()
    assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty]))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()


def test_no_keys_at_all():
    q, k, v, do = _inputs(1, 2, 5, 0, 16, F32)
    out, lse = attn.attention_fwd(q, k, v, 0.25, False, 0.0, 0, 0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, dk, dv = attn.attention_bwd(do, q, k, v, out, lse, 0.25, False, 0.0, 0, 0)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.numel() == dv.numel() == 0


def test_backward_is_deterministic():
    q, k, v, do = _inputs(1, 2, 40, 40, 16, F32, seed=7)
    first = _run(q, k, v, do, 0.25, True)
    second = _run(q, k, v, do, 0.25, True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---- dropout ------------------------------------------------------------------------------------


def test_dropout_mask_is_keyed_by_seed_and_offset():
    p = 0.3
    keep = attn.dropout_mask(1, 2, 20, 30, p, seed=11, offset=0)
    assert torch.equal(keep, attn.dropout_mask(1, 2, 20, 30, p, seed=11, offset=0))
    assert not torch.equal(keep, attn.dropout_mask(1, 2, 20, 30, p, seed=12, offset=0))
    # The counter of element (bh, i, j) is offset + (bh·Tq + i)·Tk + j: head 1 at offset 0 is
    # head 0 at offset Tq·Tk.
    shifted = attn.dropout_mask(1, 1, 20, 30, p, seed=11, offset=20 * 30)
    assert torch.equal(keep[:, 1:], shifted)
    rate = 1.0 - keep.float().mean().item()
    assert abs(rate - p) < 0.05, rate  # 1200 draws: 4 standard deviations is ~0.053


@pytest.mark.parametrize(
    "Tq,Tk,D,causal,dtype",
    [(17, 17, 16, True, F32), (20, 33, 32, False, F32), (33, 20, 16, True, BF16)],
)
def test_dropout_matches_reference_with_the_same_mask(Tq, Tk, D, causal, dtype):
    p, seed, offset = 0.25, 1234, 77
    q, k, v, do = _inputs(1, 2, Tq, Tk, D, dtype, seed=9)
    scale = D**-0.5
    got = _run(q, k, v, do, scale, causal, p, seed, offset)
    keep = attn.dropout_mask(1, 2, Tq, Tk, p, seed, offset)
    expected = _fp32_reference(q, k, v, do, scale, causal, keep=keep, dropout_p=p)
    _assert_all_close(got, expected, dtype)
    # Same seed and offset: the same output, bit for bit; another seed: another output.
    again = _run(q, k, v, do, scale, causal, p, seed, offset)
    for a, b in zip(got, again, strict=True):
        assert torch.equal(a, b)
    other, _ = attn.attention_fwd(q, k, v, scale, causal, p, seed + 1, offset)
    assert not torch.equal(other, got[0])


# ---- decode (split-K) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "Tq,Tk,D,causal,splits",
    [(1, 200, 16, False, 3), (4, 150, 64, True, 2), (16, 130, 16, True, 4), (3, 40, 80, True, 1)],
)
def test_decode_kernel_matches_reference(Tq, Tk, D, causal, splits):
    q, k, v, do = _inputs(1, 2, Tq, Tk, D, F32, seed=13)
    scale = D**-0.5
    out, lse = attn.attention_decode_fwd(q, k, v, scale, causal, 0.0, 0, 0, num_splits=splits)
    expected = _fp32_reference(q, k, v, do, scale, causal)
    torch.testing.assert_close(out, expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, expected[1], rtol=1e-4, atol=1e-4)


def test_decode_dispatch_long_keys_bf16_with_dropout(monkeypatch):
    # attention_fwd routes Tq <= DECODE_MAX_TQ against Tk >= DECODE_MIN_TK to the decode kernels;
    # its (out, lse) feed the ordinary backward. The threshold is lowered so that the interpreter
    # runs a few key blocks, not hundreds; the split count is the launcher's own choice.
    monkeypatch.setattr(attn, "DECODE_MIN_TK", 64)
    Tq, Tk, D, p, seed = 2, 101, 16, 0.2, 5
    assert attn._use_decode(Tq, Tk)
    calls = []
    decode = attn.attention_decode_fwd
    monkeypatch.setattr(attn, "attention_decode_fwd", lambda *a: calls.append(1) or decode(*a))
    q, k, v, do = _inputs(1, 2, Tq, Tk, D, BF16, seed=17)
    scale = D**-0.5
    got = _run(q, k, v, do, scale, True, p, seed, 0)
    keep = attn.dropout_mask(1, 2, Tq, Tk, p, seed, 0)
    expected = _fp32_reference(q, k, v, do, scale, True, keep=keep, dropout_p=p)
    _assert_all_close(got, expected, BF16)
    assert calls, "attention_fwd did not take the decode path"


def test_decode_row_that_sees_no_key_in_some_splits():
    # Causal, Tq > Tk: row 0 sees nothing at all, and every split but the first is empty for
    # some rows: the combine must skip empty splits (lse = -inf) without NaN.
    Tq, Tk = 16, 10
    q, k, v, do = _inputs(1, 2, Tq, Tk, 16, F32, seed=19)
    out, lse = attn.attention_decode_fwd(q, k, v, 0.25, True, 0.0, 0, 0, num_splits=1)
    expected = _fp32_reference(q, k, v, do, 0.25, True)
    torch.testing.assert_close(out, expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, expected[1], rtol=1e-4, atol=1e-4)


# ---- cost model ---------------------------------------------------------------------------------


def test_cost_model_counts_visible_pairs():
    B, H, T, D = 2, 3, 64, 32
    full_flops, full_bytes = attn.attention_fwd_cost(B, H, T, T, D, 2, is_causal=False)
    causal_flops, causal_bytes = attn.attention_fwd_cost(B, H, T, T, D, 2, is_causal=True)
    assert full_flops == 4 * B * H * T * T * D
    assert causal_flops == 4 * B * H * (T * (T + 1) // 2) * D
    assert full_bytes == causal_bytes == 4 * B * H * T * D * 2 + 4 * B * H * T
    bwd_flops, _ = attn.attention_bwd_cost(B, H, T, T, D, 2, is_causal=False)
    assert bwd_flops == 2.5 * full_flops
