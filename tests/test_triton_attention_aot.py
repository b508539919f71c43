"""Ahead-of-time compilation of the Triton attention kernels for sm_80 and sm_90a, no GPU needed:
every kernel, forward and backward, in every autotune config of every head-dim class (see
`fastgpt.triton.attention.AOT_SPECS`), and no register spills on sm_90a in the default configs.

`python -m fastgpt.triton.report` runs in a subprocess without TRITON_INTERPRET: other tests of
the session set it, and under the interpreter @triton.jit functions cannot be compiled. ~200
compiles: a few minutes on two cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
MODULE = "fastgpt.triton.attention"
ATTENTION_KERNELS = {
    "_attn_fwd_kernel",
    "_attn_decode_kernel",
    "_attn_decode_combine_kernel",
    "_attn_bwd_preprocess_kernel",
    "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel",
}
# The kernels whose default configs (the autotuner's first) must not spill on sm_90a.
MAIN_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}


def _run(args, timeout=3600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def report_rows():
    result = _run(["-m", "fastgpt.triton.report", "--json", "--module", MODULE])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_every_attention_spec_compiles_for_sm80_and_sm90a(report_rows):
    count = _run(["-c", f"import {MODULE} as m; print(len(m.AOT_SPECS()))"]).stdout
    rows = [r for r in report_rows if r["module"] == MODULE]
    assert {r["kernel"] for r in rows} == ATTENTION_KERNELS
    by_target = {
        target: {(r["kernel"], r["config"]) for r in rows if r["target"] == target}
        for target in ("sm_80", "sm_90a")
    }
    assert by_target["sm_80"] == by_target["sm_90a"]
    assert len(rows) == 2 * int(count) == 2 * len(by_target["sm_90a"])
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        # Fits the SM's shared memory and registers: at least one resident block.
        assert 0 < r["occupancy_warps"] <= 64, r


def test_every_head_dim_and_config_is_covered(report_rows):
    configs = {r["config"] for r in report_rows if r["kernel"] == "_attn_fwd_kernel"}
    for head_dim in (16, 32, 64, 80, 96, 128, 256):
        assert any(c.startswith(f"D={head_dim} ") for c in configs), head_dim
    for dtype in ("bf16", "fp16", "fp32"):
        assert any(f" {dtype} " in c for c in configs), dtype
    assert any("dropout" in c for c in configs)


def test_default_attention_configs_do_not_spill_on_sm90(report_rows):
    spilling = [
        f"{r['kernel']} {r['config']}: {r['spill_bytes']} bytes"
        for r in report_rows
        if r["kernel"] in MAIN_KERNELS
        and "(default)" in r["config"]
        and r["target"] == "sm_90a"
        and r["spill_bytes"] > 0
    ]
    assert not spilling, "register spills on sm_90a:\n" + "\n".join(spilling)
