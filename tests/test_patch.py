"""fastgpt.patch: a transformers GPT-2 and a nanoGPT-style model compute the same outputs and
gradients after patching, the dry run lists the swaps, and what cannot be swapped is reported."""

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
from conftest import hf_gpt2, saved_bytes_beyond

import fastgpt
import fastgpt.nn as fnn
from fastgpt.patch import PatchReport

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanogpt_style import TinyGPT  # noqa: E402

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_same_grads(a: nn.Module, b: nn.Module):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pb[name].grad, pa[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def assert_same_outputs_and_grads(ref: nn.Module, model: nn.Module, x: torch.Tensor):
    """model(x) equals ref(x), and so do the gradients of x and of every parameter."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(model(x1), ref(x2), atol=1e-5, rtol=1e-5)
    model(x1).sum().backward()
    ref(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    assert_same_grads(ref, model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_gpt2_outputs_and_gradients_unchanged(attn):
    hf = hf_gpt2(attn_implementation=attn)
    patched = copy.deepcopy(hf)
    assert fastgpt.patch(patched) is patched
    assert patched.config._attn_implementation == "fastgpt"
    assert hf.config._attn_implementation == attn  # the original is untouched
    idx = torch.randint(0, 97, (3, 25))
    a, b = hf(idx, labels=idx), patched(idx, labels=idx)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    assert_same_grads(hf, patched)
    # the state dict is untouched, so it loads both ways
    patched.load_state_dict(hf.state_dict())


def test_transformers_gpt2_padding_mask_and_generate():
    hf = hf_gpt2().eval()
    patched = fastgpt.patch(copy.deepcopy(hf))
    idx = torch.randint(1, 97, (2, 12))
    mask = torch.ones_like(idx)
    mask[1, :4] = 0  # left padding: a real mask tensor reaches the attention
    a = hf(idx, attention_mask=mask).logits
    b = patched(idx, attention_mask=mask).logits
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=1e-4, rtol=1e-4)
    ga = hf.generate(idx[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    gb = patched.generate(idx[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)  # KV-cache decoding: one query against the cached keys


def test_transformers_grouped_kv_heads_run_fastgpt_attention(monkeypatch):
    """A Llama-style model with 4 query heads sharing 2 key/value heads: the patched attention is
    fastgpt's (enable_gqa, no hand-off to transformers' sdpa), and outputs, gradients and greedy
    KV-cache decoding are unchanged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastgpt.functional as F

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    hf = LlamaForCausalLM(cfg)
    patched = fastgpt.patch(copy.deepcopy(hf))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(kwargs.get("enable_gqa"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    idx = torch.randint(0, 97, (3, 25))
    a, b = hf(idx, labels=idx), patched(idx, labels=idx)
    assert calls == [True, True]  # one call a layer, through fastgpt
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    assert_same_grads(hf, patched)
    ga = hf.eval().generate(idx[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    gb = patched.eval().generate(idx[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)


def test_transformers_dry_run_lists_the_swaps_and_changes_nothing():
    hf = hf_gpt2()
    report = fastgpt.patch(hf, dry_run=True)
    assert isinstance(report, PatchReport)
    assert hf.config._attn_implementation == "sdpa"
    assert type(hf.transformer.ln_f) is nn.LayerNorm
    swapped = {e.path: e for e in report.swapped}
    assert "fastgpt.nn.LayerNorm" in swapped["transformer.h.0.ln_1"].replacement
    assert "scaled_dot_product_attention" in swapped["transformer.h.1.attn"].replacement
    assert "NewGELUActivation" in swapped["transformer.h.0.mlp.act"].what
    assert "bias_gelu_linear" in swapped["transformer.h.0.mlp"].replacement
    assert "cross_entropy" in swapped[""].replacement  # the LM loss
    for conv in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert "fastgpt.functional.linear" in swapped[f"transformer.h.1.{conv}"].replacement
    assert swapped["lm_head"].replacement == "fastgpt.nn.Linear"
    # 2 layers: 2 LN, attn, mlp, act, 4 Conv1D; ln_f; lm_head; loss
    assert len(report.swapped) == 2 * 9 + 1 + 1 + 1
    assert "transformer.h.0.ln_1" in str(report)
    # after patching, a second patch finds nothing left to do
    fastgpt.patch(hf)
    assert hf.fastgpt_patch_report == report
    assert fastgpt.patch(hf, dry_run=True) == []


def test_transformers_mlp_keeps_no_gelu_output():
    """The patched GPT-2 MLP saves its GELU input only (recomputing the output), and an MLP
    whose activation is not a GELU is left alone and reported."""
    hf = hf_gpt2()
    patched = fastgpt.patch(copy.deepcopy(hf))
    mlp_a, mlp_b = hf.transformer.h[0].mlp, patched.transformer.h[0].mlp
    x = torch.randn(2, 7, hf.config.n_embd, requires_grad=True)

    na, ya = saved_bytes_beyond(lambda: mlp_a(x), mlp_a.parameters())
    nb, yb = saved_bytes_beyond(lambda: mlp_b(x), mlp_b.parameters())
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    wide = 2 * 7 * 4 * hf.config.n_embd * 4  # one (B, T, 4C) fp32 activation
    assert na - nb >= wide, (na, nb)
    ga = torch.autograd.grad(ya.square().sum(), [x, *mlp_a.parameters()])
    gb = torch.autograd.grad(yb.square().sum(), [x, *mlp_b.parameters()])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)

    relu = hf_gpt2()
    for block in relu.transformer.h:
        block.mlp.act = nn.ReLU()
    skipped = {e.path: e for e in fastgpt.patch(relu, dry_run=True).skipped}
    assert "activation ReLU" in skipped["transformer.h.0.mlp"].replacement


def test_unsupported_attention_is_left_alone_and_reported():
    hf = hf_gpt2()
    hf.config._attn_implementation = "flex_attention"
    report = fastgpt.patch(hf, dry_run=True)
    skipped = {e.path: e for e in report.skipped}
    assert "flex_attention" in skipped["transformer.h.0.attn"].replacement
    fastgpt.patch(hf)
    assert hf.config._attn_implementation == "flex_attention"


def test_nanogpt_style_outputs_and_gradients_unchanged():
    torch.manual_seed(0)
    model = TinyGPT()
    patched = copy.deepcopy(model)
    report = fastgpt.patch(patched, dry_run=True)
    swapped = {e.path: e.replacement for e in report.swapped}
    assert "layer_norm" in swapped["h.0.ln_1"]
    assert "scaled_dot_product_attention" in swapped["h.1.attn"]
    assert "cross_entropy" in swapped[""]
    assert swapped["h.0.mlp.1"] == "fastgpt.nn.GELU"
    fastgpt.patch(patched)
    assert isinstance(patched.h[0].ln_1, type(model.h[0].ln_1))  # a subclass: isinstance holds
    idx, targets = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 30))
    targets[0, :3] = -1  # nanoGPT's ignore_index
    (la, a), (lb, b) = model(idx, targets), patched(idx, targets)
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    a.backward()
    b.backward()
    assert_same_grads(model, patched)
    assert fastgpt.patch(patched, dry_run=True) == []


def test_nanogpt_style_patched_runs_fastgpt_functions(monkeypatch):
    """The rebound forward really calls fastgpt.functional (not torch's)."""
    calls = []
    import fastgpt.functional as F

    real = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model = fastgpt.patch(TinyGPT())
    model(torch.randint(0, 97, (1, 8)))
    assert len(calls) == 2  # one per layer


def test_any_layernorm_and_gelu_anywhere_and_subclasses():
    class MyNorm(nn.LayerNorm):
        pass

    class OwnForward(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(
        nn.Linear(8, 8),
        nn.LayerNorm(8),
        nn.GELU(approximate="tanh"),
        MyNorm(8, elementwise_affine=False),
        OwnForward(8),
        nn.GELU(),
    )
    ref = copy.deepcopy(model)
    report = fastgpt.patch(model, dry_run=True)
    assert [e.path for e in report.swapped] == ["0", "1", "2", "3", "5"]
    assert [e.path for e in report.skipped] == ["4"]
    assert "overrides forward" in report.skipped[0].replacement
    fastgpt.patch(model)
    assert type(model[0]) is fnn.Linear
    assert type(model[1]) is fnn.LayerNorm and type(model[2]) is fnn.GELU
    assert isinstance(model[3], MyNorm) and type(model[4]) is OwnForward
    assert_same_outputs_and_grads(ref, model, torch.randn(5, 8))


def test_transformers_conv1d_runs_fastgpt_linear_and_keeps_its_layout():
    from transformers.pytorch_utils import Conv1D

    class Doubled(Conv1D):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 16), Doubled(8, 24))
    ref = copy.deepcopy(model)
    fastgpt.patch(model)
    report = model.fastgpt_patch_report
    assert [e.path for e in report.swapped] == ["0"]
    assert [e.path for e in report.skipped] == ["1"] and "overrides forward" in str(report)
    assert_same_outputs_and_grads(ref, model, torch.randn(3, 5, 16))
    # the (in, out) weight gets its gradient in its own layout, as unpatched
    assert model[0].weight.grad.is_contiguous()


def test_fastgpt_gpt_needs_no_patch():
    model = fastgpt.GPT(
        fastgpt.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=16)
    )
    # its LayerNorm modules only hold parameters that the fused calls read: nothing to swap
    assert fastgpt.patch(model, dry_run=True) == []
    wrapped = nn.Sequential(model, nn.LayerNorm(4))
    assert [e.path for e in fastgpt.patch(wrapped, dry_run=True)] == ["1"]


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        fastgpt.patch("gpt2")


def test_patched_nanogpt_style_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fastgpt.patch(TinyGPT())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 97, (2, 16))
    logits, _ = compiled(idx)
    logits.square().mean().backward()
    torch.testing.assert_close(logits, model(idx)[0], atol=1e-5, rtol=1e-5)
