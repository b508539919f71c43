"""Whole-model benchmarks (issue 5): a GPT-2 training step and KV-cache generation.

    python -m pytest benchmarks/test_bench_gpt.py --benchmark-only -s \
        --benchmark-columns=mean,stddev -q                      # prints a ratio table at the end
    FASTGPT_BENCH_GPT=small python -m pytest benchmarks/test_bench_gpt.py --benchmark-only -s
    FASTGPT_BENCH_OPTIMIZER=adamw-fused python -m pytest benchmarks/test_bench_gpt.py ...

Training: GPT-2 124M (fp32, batch 4 x 512 tokens), forward + backward + AdamW step, tokens/s for
fastgpt's GPT, the same GPT on the reference backend (``fastgpt.use_backend("reference")``),
transformers' ``GPT2LMHeadModel`` (eager PyTorch, its default sdpa attention), the same with
``attn_implementation="eager"`` (transformers' own name for its masked-softmax attention), the
sdpa model after ``fastgpt.patch``, and fastgpt's GPT and transformers' (sdpa) model under
``torch.compile`` (compiled in the warm-up step, which is not timed). Generation: greedy, KV
cache, fastgpt's ``generate`` vs transformers'.

Each contender runs in its own process (benchmarks/gpt_worker.py), so its peak resident memory
(fastgpt.profiling.ResidentPeak, the method of every suite, which
``test_peak_memory_method_sees_a_known_allocation`` checks) is its own, and measured after the
timed steps. Time is measured inside the worker (median step);
``extra_info`` carries tokens/s, peak MB and the step's growth above the resident baseline
(weights, optimizer state), and the live peak (fastgpt.profiling.LivePeak: the most bytes held
allocated at once, which leaves out the freed-but-resident pages of a fragmented heap). The
pytest-benchmark time of a case is the worker's wall time, startup included: read the extra_info
and the printed table, not that column.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "benchmarks", "gpt_worker.py")

# "gpt2": the case (minutes per contender on a 2-core machine); "small": a quick look.
# Under --benchmark-disable (CI's smoke run) every case runs once on "tiny", so none can rot.
SIZE = os.environ.get("FASTGPT_BENCH_GPT", "gpt2")
# Every contender's optimizer: torch's AdamW, by default its per-parameter loop (what
# ``AdamW(params)`` gives on CPU), or "adamw-fused" (``fused=True``: one pass per parameter and no
# temporaries, which at GPT-2 size are ~300 MB on top of the rest at the step).
OPTIMIZER = os.environ.get("FASTGPT_BENCH_OPTIMIZER", "adamw")
if OPTIMIZER not in ("adamw", "adamw-fused"):
    raise ValueError(f"FASTGPT_BENCH_OPTIMIZER must be adamw or adamw-fused, got {OPTIMIZER!r}")
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=1000)
ALL_CASES = {
    "tiny": dict(
        train=dict(config=TINY, batch=2, seq=64, steps=1),
        generate=dict(config=TINY, batch=1, seq=8, new_tokens=8, steps=1),
    ),
    "gpt2": dict(
        train=dict(preset="gpt2", batch=4, seq=512, steps=2),
        generate=dict(preset="gpt2", batch=1, seq=16, new_tokens=64, steps=2),
    ),
    "small": dict(
        train=dict(
            config=dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50257),
            batch=4,
            seq=256,
            steps=3,
        ),
        generate=dict(
            config=dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50257),
            batch=1,
            seq=16,
            new_tokens=64,
            steps=3,
        ),
    ),
}
CASES = ALL_CASES[SIZE]

RESULTS: dict[str, dict[str, dict]] = {}


def run_worker(arg: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run(
        [sys.executable, WORKER, arg], env=env, capture_output=True, text=True, timeout=3600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_method_sees_a_known_allocation(benchmark):
    # (takes the benchmark fixture only so that --benchmark-only does not skip it)
    r = {}
    benchmark.pedantic(lambda: r.update(run_worker("--selftest")), rounds=1, iterations=1)
    seen = r["peak_mb"] - r["base_mb"]
    assert 0.95 * r["known_mb"] <= seen <= 1.2 * r["known_mb"], r


def bench(benchmark, mode, contender):
    cases = ALL_CASES["tiny"] if benchmark.disabled else CASES
    spec = {**cases[mode], "mode": mode, "contender": contender}
    shape = f"{spec['batch']}x{spec['seq']}"
    group = f"gpt-{SIZE}-{mode}-{shape}-float32"
    if mode == "train":
        spec["fused"] = OPTIMIZER == "adamw-fused"
        group += f"-{OPTIMIZER}"
    res = {}

    def call():
        res.update(run_worker(json.dumps(spec)))

    benchmark.group = group
    benchmark.pedantic(call, rounds=1, iterations=1)
    benchmark.extra_info.update(
        contender=contender,
        tokens_per_s=round(res["tokens_per_s"], 1),
        median_step_s=round(res["median_s"], 3),
        peak_mb=round(res["peak_mb"], 1),
        step_growth_mb=round(res["peak_mb"] - res["base_mb"], 1),
        live_peak_mb=round(res.get("live_peak_mb", float("nan")), 1),
        threads=res["threads"],
    )
    RESULTS.setdefault(group, {})[contender] = res


@pytest.mark.parametrize(
    "contender",
    [
        "fastgpt",
        "reference",
        "transformers",
        "transformers-eager-attn",
        "transformers+patch",
        "fastgpt+compile",
        "transformers+compile",
    ],
)
def test_train_step(benchmark, contender):
    if benchmark.disabled and contender == "transformers+compile":
        pytest.skip(
            "smoke run (--benchmark-disable): transformers under torch.compile is torch's code "
            "path, not fastgpt's (fastgpt+compile covers ours), and costs a minute of compilation"
        )
    bench(benchmark, "train", contender)


@pytest.mark.parametrize("contender", ["fastgpt", "transformers"])
def test_generate(benchmark, contender):
    bench(benchmark, "generate", contender)


def test_print_ratios(benchmark):
    """The comparison the issue asks for, one line per contender: vs fastgpt (run with -s)."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # not skipped by --benchmark-only
    if not RESULTS:
        pytest.skip("no benchmark ran (--benchmark-disable?)")
    lines = [
        "",
        "| case | contender | tokens/s | peak MB | step growth MB | live peak MB | fastgpt speed x "
        "| fastgpt peak / peak | fastgpt live / live |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for group, by in RESULTS.items():
        fast = by.get("fastgpt")
        for who, r in by.items():
            ratio = fast["tokens_per_s"] / r["tokens_per_s"] if fast else nan
            mem = fast["peak_mb"] / r["peak_mb"] if fast else nan
            growth = r["peak_mb"] - r["base_mb"]
            live = r.get("live_peak_mb", nan)
            live_ratio = fast.get("live_peak_mb", nan) / live if fast else nan
            lines.append(
                f"| {group} | {who} | {r['tokens_per_s']:.1f} | {r['peak_mb']:.0f} | "
                f"{growth:.0f} | {live:.0f} | {ratio:.2f} | {mem:.2f} | {live_ratio:.2f} |"
            )
    benchmark.extra_info["results"] = RESULTS
    print("\n".join(lines))
