"""Ahead-of-time compilation of every Triton kernel module for sm_80 and sm_90a, no GPU needed:
every spec of each module in `fastgpt.triton.report.KERNEL_MODULES` compiles for both targets,
fits the SM (registers, shared memory: at least one resident block), and does not spill where
EXPECTED says it must not.

`python -m fastgpt.triton.report` runs in a subprocess without TRITON_INTERPRET: conftest.py sets
it for this session, and under the interpreter @triton.jit functions cannot be compiled. The
attention module alone is ~200 compiles: a few minutes on two cores on a cold Triton cache.
"""

import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastgpt.triton.report import KERNEL_MODULES

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("sm_80", "sm_90a")


@dataclass(frozen=True)
class Expected:
    """What one kernel module's report must show, beyond what every module's must."""

    kernels: frozenset  # exactly the kernels its AOT_SPECS compile
    no_spill_targets: tuple = TARGETS  # targets on which the checked configs must not spill
    no_spill_kernels: frozenset | None = None  # the kernels checked for spills (None: all)
    no_spill_defaults_only: bool = False  # only the autotuner's first config ("(default)")
    min_configs: int = 1  # per target
    # (kernel, patterns): each pattern (a regex) matches the config label of one of its specs
    covered: tuple = ()


EXPECTED = {
    "fastgpt.triton.layer_norm": Expected(
        kernels=frozenset({
            "_layer_norm_fwd_kernel",
            "_layer_norm_fwd_wide_kernel",
            "_layer_norm_bwd_kernel",
            "_layer_norm_bwd_wide_kernel",
        }),
        no_spill_targets=("sm_90a",),
    ),
    "fastgpt.triton.gelu": Expected(
        kernels=frozenset({"_gelu_fwd_kernel", "_gelu_bwd_kernel"}),
    ),
    "fastgpt.triton.attention": Expected(
        kernels=frozenset({
            "_attn_fwd_kernel",
            "_attn_decode_kernel",
            "_attn_decode_combine_kernel",
            "_attn_bwd_preprocess_kernel",
            "_attn_bwd_dkdv_kernel",
            "_attn_bwd_dq_kernel",
        }),
        no_spill_targets=("sm_90a",),
        no_spill_kernels=frozenset({
            "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"
        }),
        no_spill_defaults_only=True,
        covered=(
            "_attn_fwd_kernel",
            [f"^D={d} " for d in (16, 32, 64, 80, 96, 128, 256)]
            + [f" {dtype} " for dtype in ("bf16", "fp16", "fp32")]
            + ["dropout"],
        ),
    ),
    "fastgpt.triton.cross_entropy": Expected(
        kernels=frozenset({"_cross_entropy_kernel"}),
        min_configs=10,
    ),
    # The shared dweight/dbias reduction of layer_norm and gelu, listed once under the helper:
    # every output dtype they launch it with, at an aligned and an unaligned row length.
    "fastgpt.triton._reduce": Expected(
        kernels=frozenset({"_sum_rows_kernel"}),
        covered=(
            "_sum_rows_kernel",
            [f"^N={n} {dtype} " for n in (768, 17) for dtype in ("bf16", "fp16", "fp32")],
        ),
    ),
}  # fmt: skip


# Helper modules whose kernels op modules share, and the op modules that launch them.
SHARED = {"fastgpt.triton._reduce": ("fastgpt.triton.layer_norm", "fastgpt.triton.gelu")}


def _run(args, interpret=False, timeout=3600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module", params=KERNEL_MODULES)
def report(request):
    """(module name, its report rows, how many specs its AOT_SPECS() lists)."""
    module = request.param
    result = _run(["-m", "fastgpt.triton.report", "--json", "--module", module])
    assert result.returncode == 0, result.stderr[-4000:]
    count = _run(["-c", f"import {module} as m; print(len(m.AOT_SPECS()))"])
    assert count.returncode == 0, count.stderr[-4000:]
    return module, json.loads(result.stdout), int(count.stdout)


def test_every_kernel_module_has_expectations():
    assert set(KERNEL_MODULES) == set(EXPECTED)


def test_every_spec_compiles_for_sm80_and_sm90a(report):
    module, rows, count = report
    expected = EXPECTED[module]
    assert {r["module"] for r in rows} == {module}
    assert {r["kernel"] for r in rows} == expected.kernels
    by_target = {
        target: {(r["kernel"], r["config"]) for r in rows if r["target"] == target}
        for target in TARGETS
    }
    assert by_target["sm_80"] == by_target["sm_90a"]
    assert len(rows) == 2 * count == 2 * len(by_target["sm_90a"])
    assert len(by_target["sm_90a"]) >= expected.min_configs
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        # Fits the SM's shared memory and registers: at least one resident block.
        assert 0 < r["occupancy_warps"] <= 64, r


def test_no_spills(report):
    module, rows, _ = report
    expected = EXPECTED[module]
    spilling = [
        f"{r['kernel']} {r['config']} {r['target']}: {r['spill_bytes']} bytes"
        for r in rows
        if r["target"] in expected.no_spill_targets
        and (expected.no_spill_kernels is None or r["kernel"] in expected.no_spill_kernels)
        and (not expected.no_spill_defaults_only or "(default)" in r["config"])
        and r["spill_bytes"] > 0
    ]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_specs_cover_the_declared_configs(report):
    module, rows, _ = report
    if not EXPECTED[module].covered:
        return
    kernel, patterns = EXPECTED[module].covered
    configs = {r["config"] for r in rows if r["kernel"] == kernel}
    for pattern in patterns:
        assert any(re.search(pattern, c) for c in configs), pattern


@pytest.mark.parametrize("helper", list(SHARED))
def test_shared_kernels_cover_every_dtype_of_their_users(helper):
    """A shared kernel is compiled once, under its helper module: its specs must cover every
    dtype the modules that launch it are compiled for."""

    def dtypes(module):
        configs = [spec["config"] for spec in importlib.import_module(module).AOT_SPECS()]
        return {d for c in configs for d in re.findall(r"\b(bf16|fp16|fp32)\b", c)}

    covered = dtypes(helper)
    for user in SHARED[helper]:
        assert dtypes(user) <= covered, user


def test_report_refuses_under_the_interpreter():
    result = _run(["-m", "fastgpt.triton.report", "--json"], interpret=True, timeout=300)
    assert result.returncode != 0
    assert "TRITON_INTERPRET" in result.stderr
