"""GELU compute throughput, torch eager vs fastgpt, alternated in one process.

    PYTHONPATH=. python scripts/bench_gelu_vs_torch.py [--reps N]

For each shape (256x3072 in cache, 8192x3072), thread count (1, 2), direction and form, the two
ops are called alternately and the median of each is reported with the ratio torch / fastgpt
(> 1: fastgpt faster).
"""

import argparse
import statistics
import time

import torch

import fastgpt  # noqa: F401  (registers torch.ops.fastgpt)


def bench(fns, reps):
    times = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=0, help="calls per op (default: by size)")
    args = ap.parse_args()
    print(f"{'shape':>10} {'thr':>3} {'op':>9} {'torch ms':>9} {'fastgpt ms':>10} {'ratio':>6}")
    for rows in (256, 8192):
        x = torch.randn(rows, 3072) * 3
        dy = torch.randn(rows, 3072)
        reps = args.reps or (200 if rows == 256 else 15)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for appr in ("tanh", "none"):
                cases = {
                    "fwd": (
                        lambda x=x, appr=appr: torch.nn.functional.gelu(x, approximate=appr),
                        lambda x=x, appr=appr: torch.ops.fastgpt.gelu_fwd(x, None, appr),
                    ),
                    "bwd": (
                        lambda dy=dy, x=x, appr=appr: torch.ops.aten.gelu_backward(
                            dy, x, approximate=appr
                        ),
                        lambda dy=dy, x=x, appr=appr: torch.ops.fastgpt.gelu_bwd(
                            dy, x, None, appr, False
                        ),
                    ),
                }
                for d, fns in cases.items():
                    t, f = bench(fns, reps)
                    name = f"{'erf' if appr == 'none' else 'tanh'} {d}"
                    print(f"{rows}x3072 {threads:>3} {name:>9} {t:9.3f} {f:10.3f} {t / f:6.2f}")


if __name__ == "__main__":
    main()
