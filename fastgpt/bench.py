"""``fastgpt bench``: fastgpt vs torch eager vs torch.compile on this machine, as a ratio table.

    fastgpt bench                 # quick mode: one fp32 fwd+bwd case per op (~3 min, 2-core CPU)
    fastgpt bench --full          # the suites' shapes (but their big ones), fp32 and bf16
    fastgpt bench --ops attention cross_entropy --plot bench.png

Cases come from fastgpt/bench_cases.py, as for the pytest-benchmark suites. Each row is one (op,
shape, dtype, mode): "fastgpt ms" is fastgpt's median time and "<contender> x" how many times
longer that contender takes (above 1: fastgpt is faster; "not run" with the reason below the
table); "floor x" (LayerNorm, GELU) is the memory floor's time over fastgpt's (the op's least
traffic and no arithmetic: bench_cases._MemoryFloor), so 1.0 would be a kernel that only moves the
data it must; "peak MB" is each contender's peak memory above its inputs. GFLOP/s and GB/s
(TFLOP/s on CUDA) count the least work the computation needs; on CPU read them against the
machine's copy bandwidth and matmul rate, printed in the header with the allocator settings.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fastgpt import bench_cases, profiling

# (op, shape, dtypes, modes) per mode of the command. Quick: one GPT-2-small-sized case per op,
# fp32 fwd+bwd, a couple of minutes on a 2-core CPU; the heaviest op (linear_cross_entropy) at
# 512 tokens. Full: the shapes of the pytest-benchmark suites (benchmarks/) but their big ones.
FP32, BOTH = [torch.float32], [torch.float32, torch.bfloat16]
QUICK = [
    ("linear", (2048, 768, 3072), FP32, ["fwd+bwd"]),
    ("layer_norm", (8192, 768), FP32, ["fwd+bwd"]),
    ("add_layer_norm", (8192, 768), FP32, ["fwd+bwd"]),
    ("gelu_tanh", (8192, 3072), FP32, ["fwd+bwd"]),
    ("gelu_erf", (8192, 3072), FP32, ["fwd+bwd"]),
    ("bias_gelu_tanh", (8192, 3072), FP32, ["fwd+bwd"]),
    ("bias_gelu_erf", (8192, 3072), FP32, ["fwd+bwd"]),
    ("cross_entropy", (2048, 50257), FP32, ["fwd+bwd"]),
    ("linear_cross_entropy", (512, 768, 50257), FP32, ["fwd+bwd"]),
    ("attention", (2, 12, 1024, 1024, 64), FP32, ["fwd+bwd"]),
    ("attention_dropout", (8, 12, 128, 128, 64), FP32, ["fwd+bwd"]),
    ("attention_gqa", (1, 32, 8, 1, 4096, 128), FP32, ["fwd"]),
]
FULL = [
    *[
        ("linear", shape, BOTH, ["fwd", "fwd+bwd"])
        for shape in ((2048, 768, 2304), (2048, 768, 3072), (2048, 3072, 768))
    ],
    ("linear", (1, 768, 50257), BOTH, ["fwd"]),
    *[
        (op, shape, BOTH, ["fwd", "fwd+bwd"])
        for op in ("layer_norm", "add_layer_norm")
        for shape in ((8192, 768), (8192, 1600))
    ],
    *[
        (op, shape, BOTH, ["fwd", "fwd+bwd"])
        for op in ("gelu_tanh", "gelu_erf", "bias_gelu_tanh", "bias_gelu_erf")
        for shape in ((8192, 3072), (8192, 6400))
    ],
    ("cross_entropy", (4096, 50257), BOTH, ["fwd", "fwd+bwd"]),
    ("linear_cross_entropy", (1024, 768, 50257), BOTH, ["fwd", "fwd+bwd"]),
    *[
        ("attention", shape, BOTH, ["fwd", "fwd+bwd"])
        for shape in ((8, 12, 128, 128, 64), (2, 12, 1024, 1024, 64), (1, 25, 2048, 2048, 64))
    ],
    ("attention", (1, 12, 1, 8192, 64), BOTH, ["fwd"]),
    ("attention_dropout", (2, 12, 1024, 1024, 64), FP32, ["fwd+bwd"]),
    ("attention_gqa", (1, 32, 8, 1, 4096, 128), BOTH, ["fwd"]),
    ("attention_gqa", (1, 32, 8, 4, 4096, 128), BOTH, ["fwd"]),
    ("attention_gqa", (2, 12, 4, 1024, 1024, 64), FP32, ["fwd+bwd"]),
]
# Quick mode leaves out torch's chunked linear_cross_entropy: on CPU it runs 10-15x slower than the
# others and would take a third of the quick run; --full runs it.
QUICK_LEAVES_OUT = ("torch_chunked",)
# Contender columns of the table, in this order, where any row has them.
OTHERS = ("eager", "compile", "naive", "torch", "torch_chunked", "floor")


def machine_rates(device: str) -> tuple[float, float]:
    """(copy GB/s, fp32 matmul GFLOP/s) measured here, to put the kernels' rates in context."""
    n = 1 << 24
    a = torch.empty(n, device=device).fill_(1.0)
    b = torch.empty_like(a)
    copy_s = profiling.time_call(lambda: b.copy_(a), device, repeat=5)
    m = torch.randn(1024, 1024, device=device)
    mm_s = profiling.time_call(lambda: m @ m, device, repeat=5)
    return 2 * n * 4 / copy_s / 1e9, 2 * 1024**3 / mm_s / 1e9


def measure(fn, device, repeat):
    """(median seconds, peak bytes) of one contender: an untimed call (compilation), the timing,
    then the peak; after the timing because the peak meter hands free pages back to the OS, so
    a call right after it page-faults more than one in a loop does."""
    fn()
    t = profiling.time_call(fn, device, repeat=repeat, warmup=1)
    return t, profiling.peak_bytes(fn, device)


def run_rows(plan, device, repeat, contenders=None, log=print):
    rows = []
    for op, shape, dtypes, modes in plan:
        if op not in bench_cases.ops():
            continue
        for dtype in dtypes:
            for mode in modes:
                case = bench_cases.make_case(op, shape, dtype, mode, device, contenders)
                times, peaks = {}, {}
                for name, fn in case.calls.items():
                    times[name], peaks[name] = measure(fn, device, repeat)
                rows.append((case, times, peaks))
                done = ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in times.items())
                log(f"  {case.name}: {done}")
    return rows


def format_table(rows, device) -> str:
    unit, scale = ("TFLOP/s", 1e12) if device.startswith("cuda") else ("GFLOP/s", 1e9)
    others = [n for n in OTHERS if any(n in times or n in case.skipped for case, times, _ in rows)]
    head = ["case", "fastgpt ms", *(f"{n} x" for n in others), unit, "GB/s", "peak MB fastgpt"]
    head += [f"peak MB {n}" for n in others]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    notes = {}
    for case, times, peaks in rows:
        fg = times["fastgpt"]

        def cell(name, times=times, case=case, fg=fg):
            if name in times:
                return f"{times[name] / fg:.2f}"
            if name in case.skipped:
                mark = "*" * (1 + list(notes).index(name) if name in notes else 1 + len(notes))
                notes.setdefault(name, (mark, case.skipped[name]))
                return "not run" + notes[name][0]
            return "-"

        def mb(name, peaks=peaks):
            return f"{peaks[name] / 2**20:.0f}" if name in peaks else "-"

        cells = [case.name, f"{fg * 1e3:.2f}", *(cell(n) for n in others)]
        cells += [f"{case.flops / fg / scale:.1f}", f"{case.bytes / fg / 1e9:.1f}", mb("fastgpt")]
        cells += [mb(n) for n in others]
        lines.append("| " + " | ".join(cells) + " |")
    for name, (mark, why) in notes.items():
        lines.append(f"{mark} {name}: {why}")
    return "\n".join(lines)


# A marker and line style per contender, so that lines lying on top of each other (equal peak
# memory) still show.
STYLES = {
    "fastgpt": {"marker": "o", "lw": 2.2, "zorder": 3},
    "eager": {"marker": "s", "ls": "--", "mfc": "none"},
    "compile": {"marker": "^", "ls": "-.", "mfc": "none"},
    "naive": {"marker": "x", "ls": ":"},
    "torch": {"marker": "D", "ls": "--", "mfc": "none"},
    "torch_chunked": {"marker": "v", "ls": ":", "mfc": "none"},
}


def plot(path: str, device: str, repeat: int, log=print) -> None:
    """One row per sweep registered in bench_cases (throughput vs sequence length for attention,
    time vs vocabulary size for cross-entropy): the sweep's metric on the left, each
    contender's peak memory on the right."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib")
    sweeps = [s for s in bench_cases.sweeps() if s.op in bench_cases.ops()]
    if not sweeps:
        sys.exit("no sweep is registered for the ops present")
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(12, 4.6 * len(sweeps)), squeeze=False)
    for (ax_t, ax_m), sweep in zip(axes, sweeps):
        series: dict[str, list] = {}
        not_run: dict[str, int] = {}  # contender -> first x it was not run at
        for x, shape in sweep.points:
            case = bench_cases.make_case(sweep.op, shape, sweep.dtype, sweep.mode, device)
            for name, fn in case.calls.items():
                t, peak = measure(fn, device, repeat)
                series.setdefault(name, []).append((x, sweep.metric(case, t), peak / 2**20))
            for name in case.skipped:
                not_run.setdefault(name, x)
            done = ", ".join(f"{n} {v[-1][1]:.3g}" for n, v in series.items())
            log(f"  plot {case.name}: {done} ({sweep.metric_label})")
        for name, pts in series.items():
            xs, ys, ms = zip(*pts)
            why = f" (not run from {not_run[name]}: memory)" if name in not_run else ""
            label = name + why
            style = STYLES.get(name, {"marker": "o"})
            ax_t.plot(xs, ys, label=label, **style)
            ax_m.plot(xs, ms, label=label, **style)
        xs = [x for x, _ in sweep.points]
        for ax, ylabel, log_y in (
            (ax_t, sweep.metric_label, sweep.log_y),
            (ax_m, "peak memory above inputs (MiB)", True),
        ):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            if log_y:
                ax.set_yscale("log")
            ax.set_xlabel(sweep.x_label)
            ax.set_ylabel(ylabel)
            dt = str(sweep.dtype).removeprefix("torch.")
            ax.set_title(f"{sweep.op}, {sweep.mode}, {dt}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"fastgpt vs torch on {device_name(device)} (torch {torch.__version__}, "
        f"{profiling.allocator_settings()}; median of {repeat})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastgpt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every benchmarked shape and dtype")
    p.add_argument("--ops", nargs="*", help="only these ops (default: all)")
    p.add_argument("--repeat", type=int, help="timed calls per contender (3 quick, 5 full)")
    p.add_argument("--plot", metavar="PNG", help="also draw the sweeps to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    plan = FULL if args.full else QUICK
    repeat = args.repeat or (5 if args.full else 3)
    if args.ops:
        unknown = sorted(set(args.ops) - set(bench_cases.ops()))
        if unknown:
            known = " ".join(bench_cases.ops())
            sys.exit(f"fastgpt bench: no op {', '.join(unknown)}; ops: {known}")
        plan = [row for row in plan if row[0] in args.ops]
        missing = sorted(set(args.ops) - {row[0] for row in plan})
        if missing:
            mode = "full" if args.full else "quick"
            sys.exit(f"fastgpt bench: no {mode} case for {', '.join(missing)}")
    t0 = time.perf_counter()
    copy_gbs, mm_gflops = machine_rates(args.device)
    print(
        f"fastgpt bench ({'full' if args.full else 'quick'}) on {device_name(args.device)}; "
        f"torch {torch.__version__}; {profiling.allocator_settings()}\n"
        f"machine: copy {copy_gbs:.1f} GB/s, fp32 matmul {mm_gflops:.0f} GFLOP/s\n"
    )
    contenders = None
    if not args.full:
        every = {c for op in bench_cases.ops() for c in bench_cases.contenders(op)}
        contenders = tuple(sorted(every - set(QUICK_LEAVES_OUT)))
        print(f"quick mode leaves out {', '.join(QUICK_LEAVES_OUT)} (slow on CPU; --full runs it)")
    log = lambda line: print(line, flush=True)  # noqa: E731
    rows = run_rows(plan, args.device, repeat, contenders, log=log)
    print("\n" + format_table(rows, args.device))
    if args.plot:
        plot(args.plot, args.device, max(2, repeat // 2))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
