"""fastgpt.GPT: parity with transformers' GPT-2, training parity with the reference backend,
KV-cache generation, torch.compile, weights in and out, and DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import hf_gpt2, saved_bytes_beyond

import fastgpt
from fastgpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=97)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shifted(idx):
    """transformers shifts labels inside the model; GPT takes the next token per position."""
    return torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], 1)


CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


def test_from_hf_matches_transformers_logits_loss_and_every_gradient():
    hf = hf_gpt2()
    model = GPT.from_hf(hf)
    idx = torch.randint(0, 97, (3, 41))
    out = hf(idx, labels=idx)
    logits, none = model(idx)
    assert none is None and logits.shape == (3, 41, 97)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    no_logits, loss = model(idx, shifted(idx))
    assert no_logits is None
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    loss.backward()
    hf_params = dict(hf.named_parameters())
    assert len(hf_params) == len(dict(model.named_parameters()))  # lm_head is tied to wte
    for name, p in model.named_parameters():
        g = hf_params[name].grad
        g = g.t() if name.endswith(CONV1D) else g
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=name)


def test_from_hf_state_dict_and_prefixless_keys():
    hf = hf_gpt2()
    a = GPT.from_hf(hf)
    b = GPT.from_hf(hf.state_dict(), config=a.config)
    c = GPT.from_hf(hf.transformer.state_dict())  # GPT2Model keys, no "transformer." prefix
    assert c.config.n_head == 1  # inferred: n_embd / 64 (GPT-2's head size) without a config
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, c.state_dict()[k])


def test_config_presets_and_checks():
    assert GPTConfig.preset("gpt2-xl").n_embd == 1600
    assert GPTConfig.preset("gpt2", dropout=0.1).dropout == 0.1
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=65, n_head=4)
    with pytest.raises(ValueError, match="n_inner"):
        GPT.from_hf(hf_gpt2(n_inner=100))
    with pytest.raises(ValueError, match="activation"):
        GPT.from_hf(hf_gpt2(activation_function="relu"))


def test_param_count_and_buffers():
    model = GPT(GPTConfig(**TINY))
    assert "pos" not in model.state_dict()  # a buffer, not saved
    assert "pos" in dict(model.named_buffers())
    # GPT-2 small: the famous 124M (with the position embedding)
    with torch.device("meta"):
        big = GPT(GPTConfig.preset("gpt2"))
    assert round(big.num_params(non_embedding=False) / 1e6) == 124


def train_curve(backend, steps=30, dropout=0.0):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, dropout=dropout))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    with fastgpt.use_backend(backend):
        for _ in range(steps):
            # a learnable stream: each row counts up (mod 97) from a random start
            idx = (torch.randint(0, 97, (4, 1), generator=g) + torch.arange(33)) % 97
            _, loss = model(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_training_matches_the_reference_backend():
    """30 AdamW steps from one seed: the loss curves of the kernel path and the reference agree.

    Each step's kernels differ from the reference only by float rounding (~1e-6); Adam's
    normalised updates let that drift a little over 30 steps, far below the loss's own change.
    """
    fast = train_curve(None)
    ref = train_curve("reference")
    assert fast[-1] < fast[0] - 1.0  # it learns
    for a, b in zip(fast, ref):
        assert abs(a - b) < 1e-3, (fast, ref)


def test_a_block_keeps_ten_activations_per_token():
    """What a training forward keeps for the backward, per block and token, in units of n_embd
    values: the two residual sums the LayerNorms normalise (2), q, k, v and the attention output
    (4), the GELU input (4): 10, plus per-row statistics. Autograd alone would also keep the two
    LayerNorm outputs the next matmuls read (2), the heads-merged attention output (1) and the
    GELU output (4); this fails if any comes back."""

    def saved_bytes(n_layer):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=64, block_size=64, vocab_size=97))
        idx = torch.randint(0, 97, (2, 33))
        n, _ = saved_bytes_beyond(lambda: model(idx[:, :-1], idx[:, 1:]), model.parameters())
        return n

    per_block = (saved_bytes(3) - saved_bytes(1)) / 2
    B, T, C, H = 2, 32, 64, 4
    stats = 2 * 2 * B * T * 4 + B * H * T * 4  # LayerNorm mean/rstd, attention logsumexp
    assert per_block <= 10 * B * T * C * 4 + stats, per_block / (B * T * C * 4)
    assert per_block >= 10 * B * T * C * 4  # the count above is all of it: the test would see


def test_dropout_trains_and_eval_is_deterministic():
    model = GPT(GPTConfig(**TINY, dropout=0.2))
    idx = torch.randint(0, 97, (2, 16))
    _, loss = model(idx, shifted(idx))
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("new", [20, 90])  # 90: the sequence outgrows block_size (64)
def test_generate_kv_cache_equals_no_cache_greedy(new):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 97, (2, 7))
    with_cache = model.generate(idx, new, temperature=0)
    without = model.generate(idx, new, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 7 + new)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :7], idx)


def test_generate_sampling_options():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 97, (2, 5))
    greedy = model.generate(idx, 10, temperature=0)
    assert torch.equal(model.generate(idx, 10, top_k=1), greedy)
    assert torch.equal(model.generate(idx, 10, top_p=1e-6), greedy)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = model.generate(idx, 10, temperature=0.9, top_k=20, top_p=0.9, generator=g1)
    b = model.generate(idx, 10, temperature=0.9, top_k=20, top_p=0.9, generator=g2)
    assert torch.equal(a, b) and a.max() < 97
    assert model.training  # generate restores the mode


def test_generate_matches_transformers_greedy():
    hf = hf_gpt2().eval()
    model = GPT.from_hf(hf)
    idx = torch.randint(1, 97, (1, 6))
    theirs = hf.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(idx, 12, temperature=0), theirs)


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 64, (2, 16))
    logits, _ = compiled(idx)
    logits.square().mean().backward()
    eager_logits, _ = model(idx)
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert model.transformer.wte.weight.grad is not None


def test_torch_compile_fullgraph_with_loss():
    # the loss runs through the linear_cross_entropy kernel: no graph break allowed
    torch._dynamo.reset()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 64, (2, 17))
    _, loss = compiled(idx[:, :-1], idx[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, model(idx[:, :-1], idx[:, 1:])[1], atol=1e-5, rtol=1e-5)


# ---- weights in and out -----------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path):
    model = GPT(GPTConfig(**TINY))
    model.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    back = GPT.load(tmp_path)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    assert GPT.from_pretrained(str(tmp_path)).config == model.config


def hf_cache(tmp_path, hf, name="openai-community/gpt2"):
    """A Hugging Face hub-cache layout holding ``hf`` as safetensors, as a download leaves it."""
    repo = tmp_path / "hub" / ("models--" + name.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    hf.save_pretrained(snap, safe_serialization=True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return snap


def test_from_pretrained_hf_cache_and_safetensors_file(tmp_path, monkeypatch):
    hf = hf_gpt2()
    snap = hf_cache(tmp_path, hf)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    idx = torch.randint(0, 97, (2, 9))
    ref = GPT.from_hf(hf)(idx)[0]
    for source in ("gpt2", "openai-community/gpt2", str(snap), str(snap / "model.safetensors")):
        model = GPT.from_pretrained(source)
        torch.testing.assert_close(model(idx)[0], ref, atol=1e-6, rtol=1e-6, msg=source)


def test_from_pretrained_missing_weights_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(FileNotFoundError, match="not on this machine.*never downloads"):
        GPT.from_pretrained("gpt2-medium")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="never unpickles"):
        GPT.from_pretrained(str(tmp_path))


def test_malformed_checkpoints_give_clear_errors(tmp_path):
    GPT(GPTConfig(**TINY)).save(tmp_path / "ok")
    # a corrupt weights file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        GPT.load(bad)
    # a corrupt config
    (bad / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT.load(bad)
    # a config from something else
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a fastgpt GPT config"):
        GPT.load(bad)
    # an unknown config field
    meta = json.loads((tmp_path / "ok" / "config.json").read_text())
    meta["config"]["n_experts"] = 8
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown GPTConfig fields.*n_experts"):
        GPT.load(bad)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.load(tmp_path / "nowhere")


def test_mismatched_checkpoints_give_clear_errors(tmp_path):
    GPT(GPTConfig(**TINY)).save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["n_embd"] = 128
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="wrong shape: .*wte.weight: checkpoint \\[97, 64\\]"):
        GPT.load(tmp_path)
    meta["config"].update(n_embd=64, n_layer=3)
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing: transformer.h.2"):
        GPT.load(tmp_path)
    sd = hf_gpt2().state_dict()
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 10)
    with pytest.raises(ValueError, match="c_attn.weight: checkpoint \\[10, 64\\]"):
        GPT.from_hf(sd)
    sd = hf_gpt2().state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 1  # untied head
    with pytest.raises(ValueError, match="ties"):
        GPT.from_hf(sd)
    with pytest.raises(TypeError, match="GPT2LMHeadModel or its state dict"):
        GPT.from_hf("gpt2")


# ---- DDP --------------------------------------------------------------------------------------


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): one SGD step on half the batch each equals one step
    on the whole batch in a single process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(29500 + os.getpid() % 1000), "--rdzv_backend", "c10d"]
    cmd += ["--rdzv_endpoint", f"127.0.0.1:{29500 + os.getpid() % 1000}"]
    cmd += [os.path.join(ROOT, "tests", "ddp_step.py"), str(out)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import ddp_step
    finally:
        sys.path.pop(0)
    single = ddp_step.one_step(rank=0, world=1, ddp=False)
    ddp = load_file(out)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, atol=1e-6, rtol=1e-5, msg=k)
