"""Benchmark: the linear probe's objective + gradient, blocked (declip_ds.eval.linear_probe) vs autograd.

Run:  python benchmarks/bench_linear_probe.py [--N 100000] [--D 512] [--C 1000] [--reps 3]

One evaluation of the L2-regularised softmax objective and its gradient over N features of D dims and C
classes (float64, as the probe's L-BFGS runs it), two ways, each in a fresh subprocess so the peak-RSS
figures do not mix:
* autograd: the direct formula (one-hot targets, log_softmax over the N x C logits, loss.backward()),
  which keeps N x C tensors for the backward;
* blocked:  declip_ds.eval.linear_probe.objective_and_grad, the probe's own function: row blocks, the
  gradient written out (softmax minus one-hot, two matmuls).
Per way: the extra peak RSS of the evaluation (ru_maxrss growth past the inputs) and the median wall time
of --reps evaluations. Both give the same loss and gradient (checked here, and in tests/test_eval_suite.py
against autograd and sklearn).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(way: str, N: int, D: int, C: int, reps: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    from declip_ds.eval import linear_probe as lp

    torch.manual_seed(0)
    X = torch.randn(N, D, dtype=torch.float64)  # (N, D)
    y = torch.randint(0, C, (N,))  # (N,)
    W = 0.01 * torch.randn(D, C, dtype=torch.float64)  # (D, C)
    b = torch.zeros(C, dtype=torch.float64)  # (C,)
    wd = 1e-3

    def autograd():
        Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()
        Y = F.one_hot(y, C).double()  # (N, C)
        loss = -(Y * torch.addmm(bg, X, Wg).log_softmax(-1)).sum(-1).mean() + 0.5 * wd * Wg.pow(2).sum()
        loss.backward()
        return loss.detach(), Wg.grad, bg.grad

    def blocked():
        return lp.objective_and_grad(X, y, W, b, wd)

    fn = autograd if way == "autograd" else blocked
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        loss, gW, gb = fn()
        times.append(time.perf_counter() - t0)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20  # GiB
    return {"way": way, "extra_peak_rss_gib": peak, "median_s": statistics.median(times), "loss": float(loss),
            "grad_w_norm": float(gW.norm()), "grad_b_norm": float(gb.norm())}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--N", type=int, default=100_000)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--C", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", choices=("autograd", "blocked"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.N, a.D, a.C, a.reps)))
        return []
    rows = []
    for way in ("autograd", "blocked"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", way, "--N", str(a.N), "--D",
                              str(a.D), "--C", str(a.C), "--reps", str(a.reps)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if out.returncode != 0:
            raise SystemExit(f"{way} run failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref, got = rows
    for k in ("loss", "grad_w_norm", "grad_b_norm"):
        if abs(got[k] - ref[k]) > 1e-9 * max(1.0, abs(ref[k])):
            raise SystemExit(f"the two ways disagree on {k}: {ref[k]!r} vs {got[k]!r}")
    print(f"N={a.N} D={a.D} C={a.C} float64, median of {a.reps}, {os.cpu_count()} CPUs, 1 thread")
    print("| way | extra peak RSS (GiB) | s per evaluation |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['extra_peak_rss_gib']:.2f} | {r['median_s']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
