"""Ahead-of-time compilation of the Triton GELU kernels for sm_80 and sm_90a, no GPU needed.

Compiled in a subprocess without TRITON_INTERPRET (other tests of the session set it, and under
the interpreter @triton.jit functions cannot be compiled), through `fastgpt.triton.report`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
MODULE = "fastgpt.triton.gelu"
GELU_KERNELS = {"_gelu_fwd_kernel", "_gelu_bwd_kernel", "_sum_rows_kernel"}


def _run(code, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def rows():
    code = (
        "import json; from fastgpt.triton import report; "
        f"print(json.dumps(report.compile_all(modules=[{MODULE!r}])))"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_gelu_module_is_registered_for_the_report():
    result = _run("from fastgpt.triton import report; print(report.KERNEL_MODULES)")
    assert MODULE in result.stdout


def test_every_gelu_spec_compiles_for_sm80_and_sm90a(rows):
    count = _run(f"import {MODULE} as m; print(len(m.AOT_SPECS()))").stdout
    assert {r["kernel"] for r in rows} == GELU_KERNELS
    by_target = {
        target: {(r["kernel"], r["config"]) for r in rows if r["target"] == target}
        for target in ("sm_80", "sm_90a")
    }
    assert by_target["sm_80"] == by_target["sm_90a"]
    assert len(rows) == 2 * int(count) == 2 * len(by_target["sm_90a"])
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert 0 < r["occupancy_warps"] <= 64, r


def test_no_gelu_kernel_spills(rows):
    spilling = [
        f"{r['kernel']} {r['config']} {r['target']}: {r['spill_bytes']} bytes"
        for r in rows
        if r["spill_bytes"] > 0
    ]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
