"""One contender of benchmarks/test_bench_gpt.py, run in its own process so that its peak memory
is its own: ``python benchmarks/gpt_worker.py '<json spec>'`` prints one JSON line of results.

Peak CPU memory is measured by fastgpt.profiling.ResidentPeak (VmHWM after a clear_refs reset,
glibc's free pages handed back first; the module says why), around the first timed step; the
separate process keeps one contender's weights and caches out of another's numbers.
``--selftest`` shows the method sees a known allocation.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch

from fastgpt.profiling import LivePeak, ResidentPeak, live_peak_supported

MB = 2**20


def selftest() -> dict:
    with ResidentPeak() as p:
        t = torch.ones(64 * 2**20)  # 256 MiB, every page touched
        del t
    return {"base_mb": p.base / MB, "peak_mb": p.peak / MB, "known_mb": 256.0}


def build(spec):
    """(model, loss function, generate function, backend context) for one contender:
    fastgpt | reference | transformers | transformers-eager-attn | transformers+patch, and
    fastgpt+compile / transformers+compile (training only)."""
    import fastgpt
    from fastgpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig.preset(spec["preset"]) if spec.get("preset") else GPTConfig(**spec["config"])
    B, T = spec["batch"], spec["seq"]
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1))
    who = spec["contender"]
    backend = contextlib.nullcontext()
    if who.startswith("transformers"):
        from transformers import GPT2Config, GPT2LMHeadModel

        # "transformers": its default attention (sdpa); "transformers-eager-attn": the
        # attention transformers calls "eager" (explicit masked softmax, T x T scores kept).
        attn = "eager" if who == "transformers-eager-attn" else "sdpa"
        hf_cfg = GPT2Config(
            attn_implementation=attn,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            n_positions=cfg.block_size,
            vocab_size=cfg.vocab_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(hf_cfg)
        if who == "transformers+patch":
            fastgpt.patch(model)
        # "+compile": the forward (and so the backward) under torch.compile; weights shared.
        call = torch.compile(model) if who.endswith("+compile") else model
        fwd = lambda: call(idx[:, :-1], labels=idx[:, :-1]).loss  # noqa: E731
        gen = lambda p, n: model.generate(  # noqa: E731
            p, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0
        )
    else:
        model = GPT(cfg)
        if who == "reference":
            backend = fastgpt.use_backend("reference")
        call = torch.compile(model) if who.endswith("+compile") else model
        fwd = lambda: call(idx[:, :-1], idx[:, 1:])[1]  # noqa: E731
        gen = lambda p, n: model.generate(p, n, temperature=0)  # noqa: E731
    return model, fwd, gen, backend


def run(spec) -> dict:
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model, fwd, gen, backend = build(spec)
    res = {"contender": spec["contender"], "threads": torch.get_num_threads()}
    with backend:
        if spec["mode"] == "train":
            # "fused": AdamW(fused=True) instead of its default per-parameter loop on CPU.
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=spec.get("fused", False))

            # The loop of PyTorch's tutorials: the last step's gradients are dropped
            # (set_to_none) before the forward, so they are not held beside its activations.
            def call():
                opt.zero_grad(set_to_none=True)
                loss = fwd()
                loss.backward()
                opt.step()
                return loss

            tokens = spec["batch"] * spec["seq"]
        else:
            prompt = torch.randint(0, 1000, (spec["batch"], spec["seq"]))

            def call():
                with torch.no_grad():
                    out = gen(prompt, spec["new_tokens"])
                assert out.shape[1] == spec["seq"] + spec["new_tokens"], out.shape

            tokens = spec["batch"] * spec["new_tokens"]
        # Warm-up: compilation (torch.compile), the optimizer state (part of the baseline).
        call()
        times = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        # Peak after the timing: the meter hands free pages back to the OS, which would make a
        # timed step that followed it page-fault more than a step in a training loop does.
        # Live: the most bytes held allocated at once, without the heap's freed-but-resident
        # pages that the resident peak also counts (fastgpt.profiling.LivePeak).
        live = LivePeak() if live_peak_supported() else contextlib.nullcontext()
        with ResidentPeak() as p, live:
            call()
        res.update(base_mb=p.base / MB, peak_mb=p.peak / MB)
        if isinstance(live, LivePeak):
            res.update(live_base_mb=live.base / MB, live_peak_mb=live.peak / MB)
    times.sort()
    median = times[len(times) // 2]
    res.update(step_s=times, median_s=median, tokens_per_s=tokens / median)
    return res


if __name__ == "__main__":
    if sys.argv[1] == "--selftest":
        print(json.dumps(selftest()))
    else:
        print(json.dumps(run(json.loads(sys.argv[1]))))
