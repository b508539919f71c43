"""Ahead-of-time compilation of the Triton cross-entropy kernel for sm_80 and sm_90a (no GPU).

Runs in a subprocess without TRITON_INTERPRET: under the interpreter @triton.jit functions cannot
be compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
CODE = (
    "import json; from fastgpt.triton import report; "
    "print(json.dumps(report.compile_all(modules=['fastgpt.triton.cross_entropy'])))"
)


@pytest.fixture(scope="module")
def rows():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_every_spec_compiles_for_sm80_and_sm90a_without_spills(rows):
    assert {r["kernel"] for r in rows} == {"_cross_entropy_kernel"}
    by_target = {t: {r["config"] for r in rows if r["target"] == t} for t in ("sm_80", "sm_90a")}
    assert by_target["sm_80"] == by_target["sm_90a"] and len(by_target["sm_80"]) >= 10
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0, r
        assert 0 < r["occupancy_warps"] <= 64, r


def test_registered_in_the_report():
    from fastgpt.triton import report

    assert "fastgpt.triton.cross_entropy" in report.KERNEL_MODULES
