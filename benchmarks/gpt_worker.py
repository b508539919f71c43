"""One contender of benchmarks/test_bench_gpt.py, run in its own process so that its peak memory
is its own: ``python benchmarks/gpt_worker.py '<json spec>'`` prints one JSON line of results.

Peak CPU memory is the kernel's resident-set high-water mark (VmHWM in /proc/self/status) after
resetting it to the current resident size (write "5" to /proc/self/clear_refs) with glibc's free
pages handed back first (malloc_trim), so the measured step must fault in every page it uses.
``ru_maxrss`` is not used: it is inherited across fork/exec. ``--selftest`` shows the method
sees a known allocation.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import sys
import time

import torch


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> float:
    """Reset VmHWM to the current RSS; returns that RSS (MiB)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def peak() -> float:
    return _status_mib("VmHWM")


def selftest() -> dict:
    base = reset_peak()
    t = torch.ones(64 * 2**20)  # 256 MiB, every page touched
    del t
    return {"base_mb": base, "peak_mb": peak(), "known_mb": 256.0}


def build(spec):
    """(step function, tokens per call) for one contender."""
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
        fwd = lambda: model(idx[:, :-1], labels=idx[:, :-1]).loss  # noqa: E731
        gen = lambda p, n: model.generate(  # noqa: E731
            p, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0
        )
    else:
        model = GPT(cfg)
        if who == "reference":
            backend = fastgpt.use_backend("reference")
        fwd = lambda: model(idx[:, :-1], idx[:, 1:])[1]  # noqa: E731
        gen = lambda p, n: model.generate(p, n, temperature=0)  # noqa: E731
    return model, fwd, gen, backend


def run(spec) -> dict:
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model, fwd, gen, backend = build(spec)
    res = {"contender": spec["contender"], "threads": torch.get_num_threads()}
    with backend:
        if spec["mode"] == "train":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                loss = fwd()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            step()  # warm-up; also creates the optimizer state, part of the baseline
            times = []
            for i in range(spec["steps"]):
                base = reset_peak() if i == 0 else None
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
                if i == 0:
                    res.update(base_mb=base, peak_mb=peak())
            tokens = spec["batch"] * spec["seq"]
        else:
            prompt = torch.randint(0, 1000, (spec["batch"], spec["seq"]))
            with torch.no_grad():
                gen(prompt, 2)
                times = []
                for i in range(spec["steps"]):
                    base = reset_peak() if i == 0 else None
                    t0 = time.perf_counter()
                    out = gen(prompt, spec["new_tokens"])
                    times.append(time.perf_counter() - t0)
                    if i == 0:
                        res.update(base_mb=base, peak_mb=peak())
                    assert out.shape[1] == spec["seq"] + spec["new_tokens"], out.shape
            tokens = spec["batch"] * spec["new_tokens"]
    times.sort()
    median = times[len(times) // 2]
    res.update(step_s=times, median_s=median, tokens_per_s=tokens / median)
    return res


if __name__ == "__main__":
    if sys.argv[1] == "--selftest":
        print(json.dumps(selftest()))
    else:
        print(json.dumps(run(json.loads(sys.argv[1]))))
