"""LayerNorm and add_layer_norm, torch eager vs fastgpt, alternated in one process.

    PYTHONPATH=. python scripts/bench_layer_norm_vs_torch.py [--reps N] [--threads 2 1]

For each thread count, op (ln: F.layer_norm; add: x + r then F.layer_norm, both outputs used),
hidden size (8192 rows), dtype and mode (fwd under no_grad; fwdbwd: forward, then
torch.autograd.grad of every input), the two are called alternately and the median and min of
each are reported (ms), with the minor page faults per call and the ratios eager / fastgpt
(> 1: fastgpt faster). Page faults matter on VMs: a fresh multi-MB output costs 0.5-2 ms per MB
of first-touch faults, so glibc's reuse of freed memory moves timings as much as the kernels do.
Run under MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=100000000000 to see the
kernels without faults.
"""

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as TF

import fastgpt.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench(fns, reps):
    times, faults = [[] for _ in fns], [0] * len(fns)
    for f in fns:
        f()
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            f0 = minor_faults()
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
            faults[i] += minor_faults() - f0
    return [(statistics.median(t) * 1e3, min(t) * 1e3, fl / reps) for t, fl in zip(times, faults)]


def runner(fn, leaves, grads, mode):
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return fn()

        return run

    def run():
        out = fn()
        return torch.autograd.grad(out if isinstance(out, tuple) else (out,), leaves, grads)

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--ops", nargs="+", default=["ln", "add"], choices=["ln", "add"])
    ap.add_argument("--hidden", type=int, nargs="+", default=[768, 1600])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    a = ap.parse_args()
    print(
        f"{'op':>4} {'N':>5} {'dt':>5} {'mode':>7} {'thr':>3} | {'eager med':>9} {'min':>7} "
        f"{'flt':>6} | {'fg med':>7} {'min':>7} {'flt':>6} | {'r(med)':>6} {'r(min)':>6}"
    )
    for threads in a.threads:
        torch.set_num_threads(threads)
        for op in a.ops:
            for n in a.hidden:
                for dname in a.dtypes:
                    g = torch.Generator().manual_seed(0)

                    def rand(*shape, g=g, dt=DTYPES[dname]):
                        return torch.randn(*shape, generator=g).to(dt)

                    x, r = rand(a.rows, n).requires_grad_(), rand(a.rows, n).requires_grad_()
                    w, b = rand(n).requires_grad_(), rand(n).requires_grad_()
                    dy, ds = rand(a.rows, n), rand(a.rows, n)
                    if op == "ln":
                        eager = lambda x=x, w=w, b=b, n=n: TF.layer_norm(x, (n,), w, b)  # noqa: E731
                        fast = lambda x=x, w=w, b=b, n=n: F.layer_norm(x, (n,), w, b)  # noqa: E731
                        leaves, grads = (x, w, b), (dy,)
                    else:

                        def eager(x=x, r=r, w=w, b=b, n=n):
                            s = x + r
                            return TF.layer_norm(s, (n,), w, b), s

                        fast = lambda x=x, r=r, w=w, b=b, n=n: F.add_layer_norm(x, r, (n,), w, b)  # noqa: E731
                        leaves, grads = (x, r, w, b), (dy, ds)
                    for mode in a.modes:
                        fns = [runner(f, leaves, grads, mode) for f in (eager, fast)]
                        (em, emin, ef), (fm, fmin, ff) = bench(fns, a.reps)
                        print(
                            f"{op:>4} {n:>5} {dname:>5} {mode:>7} {threads:>3} | {em:9.2f} "
                            f"{emin:7.2f} {ef:6.0f} | {fm:7.2f} {fmin:7.2f} {ff:6.0f} | "
                            f"{em / fm:6.2f} {emin / fmin:6.2f}",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
