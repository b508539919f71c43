"""Ahead-of-time compilation of every Triton kernel, without a GPU, and its resource usage.

    python -m fastgpt.triton.report            # markdown table
    python -m fastgpt.triton.report --json     # one JSON list, for tests and scripts

Each module named in KERNEL_MODULES defines `AOT_SPECS()`, returning one dict per kernel
configuration its launchers can choose:

    {
        "kernel": <@triton.jit function>,
        "signature": {param: "*bf16" | "i32" | "fp32" | ... | "constexpr"},  # every parameter
        "constexprs": {param: value},
        "divisible_by_16": [param, ...],   # what the JIT would specialize as 16-aligned/-divisible
        "options": {"num_warps": 4, ...},  # triton.compile options
        "config": "N=768 bf16 ...",        # a human-readable label
    }

Every spec is compiled for sm_80 (A100) and sm_90a (H100) with `triton.compile`; registers and
stack (spill) bytes come from the cubin through the `cuobjdump` shipped in the triton wheel, shared
memory from the compiled kernel's metadata (Triton's shared memory is dynamic, so the cubin reports
0). Occupancy is the number of resident warps per SM those resources allow.

A new op adds its module to KERNEL_MODULES and an AOT_SPECS function to that module; nothing else.
A helper module whose kernels several op modules share (fastgpt.triton._reduce) is listed too, and
its AOT_SPECS covers every dtype its users launch it with: each shared kernel is compiled once per
configuration, under the helper's name, not once per module that uses it.

Compiling needs real @triton.jit functions: under TRITON_INTERPRET=1 they are interpreter objects,
so this module refuses to run there.
"""

import argparse
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

KERNEL_MODULES = [
    "fastgpt.triton.layer_norm",
    "fastgpt.triton.gelu",
    "fastgpt.triton.attention",
    "fastgpt.triton.cross_entropy",
    "fastgpt.triton._reduce",
]

TARGET_NAMES = {80: "sm_80", 90: "sm_90a"}

# Per-SM limits of the A100 (sm_80) and H100 (sm_90): the register file, the largest shared memory
# carve-out, and the resident warp and block caps.
REGISTERS_PER_SM = 65536
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_BLOCK = 1024  # taken by the driver for each resident block on sm_80+
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp, in units of 256


def _refuse_under_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "fastgpt.triton.report compiles kernels ahead of time, which needs real @triton.jit "
            "functions; TRITON_INTERPRET is set, so they are interpreter objects. Run it with "
            "TRITON_INTERPRET unset: `env -u TRITON_INTERPRET python -m fastgpt.triton.report`."
        )


def collect_specs(modules=None):
    """The AOT specs of every kernel module, each tagged with its module's name."""
    _refuse_under_interpreter()
    specs = []
    for name in modules or KERNEL_MODULES:
        for spec in importlib.import_module(name).AOT_SPECS():
            specs.append({**spec, "module": name})
    return specs


def occupancy(registers, shared, num_warps, cap):
    """Resident warps per SM, limited by registers, shared memory, and the warp and block caps."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_ALLOCATION_UNIT)
    regs_per_warp *= REGISTER_ALLOCATION_UNIT
    blocks = min(
        (REGISTERS_PER_SM // regs_per_warp) // num_warps,
        SHARED_PER_SM[cap] // (shared + SHARED_RESERVED_PER_BLOCK),
        MAX_WARPS_PER_SM // num_warps,
        MAX_BLOCKS_PER_SM,
    )
    return blocks * num_warps


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no cuobjdump in the triton wheel at {path}")
    return path


def resource_usage(cubin):
    """{"registers", "stack", "local", "shared_static"} of the single kernel in a cubin, read by
    `cuobjdump --dump-resource-usage`. Spilled registers live in the stack frame."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    registers, stack, shared, local = (int(v) for v in match.groups())
    return {"registers": registers, "stack": stack, "local": local, "shared_static": shared}


def compile_spec(spec, cap):
    """Compile one spec for compute capability `cap` (80 or 90); its row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec["kernel"]
    # The JIT passes alignment facts as attributes keyed by parameter position.
    attrs = {
        (kernel.arg_names.index(name),): [["tt.divisibility", 16]]
        for name in spec.get("divisible_by_16", ())
    }
    source = ASTSource(
        fn=kernel, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs
    )
    # Fix FP fusion (the JIT's default) so that the knob's deprecation warning stays quiet.
    options = {"enable_fp_fusion": True, **spec["options"]}
    compiled = triton.compile(source, target=GPUTarget("cuda", cap, 32), options=options)
    usage = resource_usage(compiled.asm["cubin"])
    num_warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared + usage["shared_static"]
    return {
        "module": spec.get("module", kernel.__module__),
        "kernel": kernel.__name__,
        "config": spec["config"],
        "target": TARGET_NAMES[cap],
        "num_warps": num_warps,
        "registers": usage["registers"],
        "spill_bytes": usage["stack"] + usage["local"],
        "shared_bytes": shared,
        "occupancy_warps": occupancy(usage["registers"], shared, num_warps, cap),
    }


def _compile_job(job):
    # A worker process gets (module, index into its specs, cap): the jit functions themselves are
    # found again by import, which is cheaper and safer than pickling them.
    module, index, cap = job
    spec = {**importlib.import_module(module).AOT_SPECS()[index], "module": module}
    return compile_spec(spec, cap)


def compile_all(targets=(80, 90), modules=None, jobs=None):
    """Compile every spec of every kernel module for every target; one dict per (spec, target).

    `jobs` worker processes compile in parallel (default: one per CPU); 1 compiles in-process.
    """
    _refuse_under_interpreter()
    work = []
    for name in modules or KERNEL_MODULES:
        count = len(importlib.import_module(name).AOT_SPECS())
        work += [(name, index, cap) for index in range(count) for cap in targets]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_job(job) for job in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, work))


def markdown_table(rows):
    header = (
        "| kernel | config | target | registers/thread | spill bytes | shared mem bytes "
        "| occupancy (warps/SM) |\n|---|---|---|---:|---:|---:|---:|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['config']} | {r['target']} | {r['registers']} "
            f"| {r['spill_bytes']} | {r['shared_bytes']} | {r['occupancy_warps']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastgpt.triton.report",
        description="Compile every fastgpt Triton kernel for sm_80 and sm_90a (no GPU needed) "
        "and report registers, spills, shared memory and occupancy.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list instead")
    parser.add_argument(
        "--target",
        type=int,
        action="append",
        choices=sorted(TARGET_NAMES),
        help="compute capability to compile for (repeatable; default: all)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    parser.add_argument(
        "--module",
        action="append",
        choices=KERNEL_MODULES,
        help="kernel module to compile (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    try:
        rows = compile_all(
            targets=tuple(args.target or sorted(TARGET_NAMES)), modules=args.module, jobs=args.jobs
        )
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
