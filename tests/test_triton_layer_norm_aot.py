"""Ahead-of-time compilation of the Triton LayerNorm kernels for sm_80 and sm_90a, no GPU needed.

`python -m fastgpt.triton.report` runs in a subprocess without TRITON_INTERPRET: other tests of
the session set it, and under the interpreter @triton.jit functions cannot be compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
LAYER_NORM_KERNELS = {
    "_layer_norm_fwd_kernel",
    "_layer_norm_fwd_wide_kernel",
    "_layer_norm_bwd_kernel",
    "_layer_norm_bwd_wide_kernel",
    "_sum_rows_kernel",
}


def _run(args, interpret=False, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def report_rows():
    result = _run(
        ["-m", "fastgpt.triton.report", "--json", "--module", "fastgpt.triton.layer_norm"]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_every_layer_norm_spec_compiles_for_sm80_and_sm90a(report_rows):
    count = _run(["-c", "import fastgpt.triton.layer_norm as m; print(len(m.AOT_SPECS()))"]).stdout
    rows = [r for r in report_rows if r["module"] == "fastgpt.triton.layer_norm"]
    assert {r["kernel"] for r in rows} == LAYER_NORM_KERNELS
    by_target = {
        target: {(r["kernel"], r["config"]) for r in rows if r["target"] == target}
        for target in ("sm_80", "sm_90a")
    }
    assert by_target["sm_80"] == by_target["sm_90a"]
    assert len(rows) == 2 * int(count) == 2 * len(by_target["sm_90a"])
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert 0 < r["occupancy_warps"] <= 64, r


def test_no_layer_norm_kernel_spills_on_sm90(report_rows):
    spilling = [
        f"{r['kernel']} {r['config']}: {r['spill_bytes']} bytes"
        for r in report_rows
        if r["module"] == "fastgpt.triton.layer_norm"
        and r["target"] == "sm_90a"
        and r["spill_bytes"] > 0
    ]
    assert not spilling, "register spills on sm_90a:\n" + "\n".join(spilling)


def test_report_refuses_under_the_interpreter():
    result = _run(["-m", "fastgpt.triton.report", "--json"], interpret=True, timeout=300)
    assert result.returncode != 0
    assert "TRITON_INTERPRET" in result.stderr
