"""``fastgpt bench``: fastgpt vs torch eager vs torch.compile on this machine, as a ratio table.

    fastgpt bench                 # quick mode (a few minutes on a 2-core CPU)
    fastgpt bench --full          # every shape and dtype of the pytest-benchmark suites
    fastgpt bench --ops layer_norm --plot bench.png

Each row is one (op, shape, dtype, mode). "ms" is fastgpt's median time; "eager x" and
"compile x" are how many times longer torch eager and torch.compile take (above 1: fastgpt is
faster); "peak MB" is each contender's peak memory above its inputs (fastgpt/eager/compile).
On CUDA, GFLOP/s and GB/s become TFLOP/s; on CPU they are compared with the machine's measured
copy bandwidth and matmul rate, printed in the header.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fastgpt import bench_cases, profiling

# (op, shape, dtypes, modes) per mode of the command.
QUICK = [
    ("layer_norm", (8192, 768), [torch.float32], ["fwd+bwd"]),
    ("add_layer_norm", (8192, 768), [torch.float32], ["fwd+bwd"]),
]
FULL = [
    (op, shape, [torch.float32, torch.bfloat16], ["fwd", "fwd+bwd"])
    for op in ("layer_norm", "add_layer_norm")
    for shape in ((8192, 768), (8192, 1600))
]


def machine_rates(device: str) -> tuple[float, float]:
    """(copy GB/s, fp32 matmul GFLOP/s) measured here, to put the kernels' rates in context."""
    n = 1 << 24
    a = torch.empty(n, device=device).fill_(1.0)
    b = torch.empty_like(a)
    copy_s = profiling.time_call(lambda: b.copy_(a), device, repeat=5)
    m = torch.randn(1024, 1024, device=device)
    mm_s = profiling.time_call(lambda: m @ m, device, repeat=5)
    return 2 * n * 4 / copy_s / 1e9, 2 * 1024**3 / mm_s / 1e9


def run_rows(plan, device, repeat, contenders=("fastgpt", "eager", "compile")):
    rows = []
    for op, shape, dtypes, modes in plan:
        if op not in bench_cases.ops():
            continue
        for dtype in dtypes:
            for mode in modes:
                case = bench_cases.make_case(op, shape, dtype, mode, device, contenders)
                times, peaks = {}, {}
                for name, fn in case.calls.items():
                    fn()  # warm-up, compilation
                    peaks[name] = profiling.peak_bytes(fn, device)
                    times[name] = profiling.time_call(fn, device, repeat=repeat, warmup=1)
                rows.append((case, times, peaks))
    return rows


def format_table(rows, device) -> str:
    unit, scale = ("TFLOP/s", 1e12) if device.startswith("cuda") else ("GFLOP/s", 1e9)
    head = (
        f"| case | fastgpt ms | eager x | compile x | naive x | {unit} | GB/s "
        "| peak MB (fastgpt/eager/compile) |"
    )
    lines = [head, "|" + "---|" * 8]
    for case, times, peaks in rows:
        fg = times["fastgpt"]

        def ratio(name, times=times, fg=fg):
            return f"{times[name] / fg:.2f}" if name in times else "-"

        peak = "/".join(
            f"{peaks[n] / 2**20:.0f}" if n in peaks else "-"
            for n in ("fastgpt", "eager", "compile")
        )
        lines.append(
            f"| {case.name} | {fg * 1e3:.2f} | {ratio('eager')} | {ratio('compile')} | "
            f"{ratio('naive')} | {case.flops / fg / scale:.1f} | {case.bytes / fg / 1e9:.1f} | "
            f"{peak} |"
        )
    return "\n".join(lines)


def plot(path: str, device: str, repeat: int) -> None:
    """Throughput vs sequence length (attention) and time and memory vs vocabulary size
    (cross-entropy), for each op whose sweep is registered in bench_cases."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib")
    sweeps = [s for s in bench_cases.sweeps() if s.op in bench_cases.ops()]
    if not sweeps:
        sys.exit("no sweep is registered for the ops present")
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 4 * len(sweeps)), squeeze=False)
    for (ax_t, ax_m), sweep in zip(axes, sweeps):
        series: dict[str, list] = {}
        for x, shape in sweep.points:
            case = bench_cases.make_case(sweep.op, shape, sweep.dtype, sweep.mode, device)
            for name, fn in case.calls.items():
                fn()
                t = profiling.time_call(fn, device, repeat=repeat, warmup=1)
                peak = profiling.peak_bytes(fn, device)
                series.setdefault(name, []).append((x, sweep.metric(case, t), peak / 2**20))
        for name, pts in series.items():
            xs, ys, ms = zip(*pts)
            ax_t.plot(xs, ys, marker="o", label=name)
            ax_m.plot(xs, ms, marker="o", label=name)
        for ax, ylabel in ((ax_t, sweep.metric_label), (ax_m, "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(sweep.x_label)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{sweep.op} {sweep.mode} ({str(sweep.dtype).removeprefix('torch.')})")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(f"fastgpt vs torch on {device_name(device)}")
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
    p.add_argument("--repeat", type=int, default=5, help="timed calls per contender")
    p.add_argument("--plot", metavar="PNG", help="also draw the sweeps to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    plan = FULL if args.full else QUICK
    if args.ops:
        plan = [row for row in plan if row[0] in args.ops]
    t0 = time.perf_counter()
    copy_gbs, mm_gflops = machine_rates(args.device)
    print(
        f"fastgpt bench ({'full' if args.full else 'quick'}) on {device_name(args.device)}; "
        f"torch {torch.__version__}; {profiling.allocator_settings()}\n"
        f"machine: copy {copy_gbs:.1f} GB/s, fp32 matmul {mm_gflops:.0f} GFLOP/s\n"
    )
    print(format_table(run_rows(plan, args.device, args.repeat), args.device))
    if args.plot:
        plot(args.plot, args.device, max(2, args.repeat // 2))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
