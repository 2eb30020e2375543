"""Benchmark: fused CLIP loss (Triton) vs the torch reference vs the eager formula, KERNELS.md §3.1.

Run:  python benchmarks/bench_contrastive.py [--B 4096 8192 ...] [--D 512 768] [--reps 20]

Methods, all on the same L2-normalised features (bf16 on a GPU, fp32 on a CPU):
* eager:   the formula that materialises everything: autocast logits S = scale I T^T (b x b) and two
           F.cross_entropy (on S and S^T).
* torch:   declip_ds.losses.clip_loss, the reference (imported, never copied).
* triton:  declip_ds.kernels.fused_clip_loss (GPU; on a CPU only under TRITON_INTERPRET=1, where the
           times mean nothing: to try the kernel rows and --tiles specs before a GPU session).
Per row: median time of --reps runs after --warmup runs (CUDA events on a GPU) of the forward and
of forward + backward (gradients of both features and of scale); useful TFLOP/s (2B^2D forward,
6B^2D forward + backward, KERNELS.md §1); fraction of the card's dense bf16 peak; and the rise of
max_memory_allocated over one forward + backward (GPU only). Out-of-memory rows say "OOM", rows that
fail otherwise (a compile error, too little shared memory, a cuBLAS failure) "ERROR: <what>"; the others go on.
Writes benchmarks/out/contrastive.csv, one row appended (and flushed) as each completes, so a run stopped with
SIGINT (``timeout --signal=INT``, Ctrl-C) keeps its finished rows: it then prints the partial table, plots it and
exits with status 130. When matplotlib is installed, also contrastive.png.
On a CPU the default grid is tiny and only the torch paths run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Allow `python benchmarks/bench_contrastive.py` from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from declip_ds.losses import clip_loss  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# dense bf16 tensor-core peak, TFLOP/s (vendor spec sheets); matched against the device name
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("A10G", 70.0), ("RTX 4090", 165.0)]


def device_info() -> tuple[str, float | None]:
    """(device name, bf16 peak TFLOP/s or None when unknown / CPU)."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return name, peak
    return name, None


def median_seconds(fn, reps: int, warmup: int) -> float:
    """Median wall time of fn() over reps runs after warmup runs (CUDA events on a GPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb(fn) -> float | None:
    """Rise of max_memory_allocated over one fn() call, MB (None on a CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def failed_status(err: Exception) -> str:
    """A row's status for an exception: "OOM", or "ERROR: <type>: <first line of the message>" (short)."""
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):  # after a sticky CUDA error this raises too
            torch.cuda.empty_cache()
    if is_oom(err):
        return "OOM"
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"ERROR: {type(err).__name__}: {msg}"[:160]


def fmt(v, spec=".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return v if isinstance(v, str) else format(v, spec)


def print_table(rows: list[dict], cols: list[str]) -> None:
    if not rows:
        print("(no rows)")
        return
    widths = {c: max([len(c)] + [len(fmt(r.get(c))) for r in rows]) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c)).rjust(widths[c]) for c in cols))


class RowLog:
    """The rows of one run, each written to the CSV at path (header first) and flushed as it completes, so a run
    cut short keeps every finished row; ``show`` names the columns printed per row."""

    def __init__(self, path: str, cols: list[str], show: list[str]):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.cols, self.show, self.rows = path, cols, show, []
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=cols, extrasaction="ignore")
        self.writer.writeheader()
        self.file.flush()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.writer.writerow(row)
        self.file.flush()
        print("  " + ", ".join(f"{c}={fmt(row.get(c))}" for c in self.show), flush=True)

    def close(self) -> None:
        self.file.close()


def run_rows(log: RowLog, rows, finish) -> None:
    """Adds every row the iterable ``rows`` yields to log, then calls finish(log.rows) (table, plot). On SIGINT
    (KeyboardInterrupt: run_all.sh's ``timeout --signal=INT``, Ctrl-C) the rows so far are already in the CSV;
    finish runs on them and the process exits with status 130."""
    interrupted = False
    try:
        for row in rows:
            log.add(row)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted (SIGINT) after {len(log.rows)} rows: the table below is partial", flush=True)
    finally:
        log.close()
    print()
    finish(log.rows)
    print(f"wrote {log.path} ({len(log.rows)} rows{', partial' if interrupted else ''})", flush=True)
    if interrupted:
        sys.exit(130)


def plot(rows: list[dict], x: str, series: list[str], ys: list[tuple[str, str]], path: str, title: str) -> None:
    """One log-log panel per (column, label) in ys, one line per series key; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {path} (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.5))
    axes = [axes] if len(ys) == 1 else axes
    for ax, (col, label) in zip(axes, ys):
        groups: dict = {}
        for r in rows:
            if isinstance(r.get(col), float):
                groups.setdefault(" ".join(str(r[k]) for k in series), []).append((r[x], r[col]))
        for name, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------ methods
def eager_loss(img, txt, scale):
    """The materialising formula: autocast (bf16) logits, then two cross-entropies."""
    labels = torch.arange(img.shape[0], device=img.device)
    with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=img.is_cuda):
        logits = scale * img @ txt.t()  # (B, B)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def kernel_rows() -> bool:
    """The triton rows run on a GPU, and on the CPU under TRITON_INTERPRET=1 (to try this script's kernel
    rows at tiny shapes: the interpreter's times mean nothing)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def methods() -> dict:
    out = {"eager": eager_loss, "torch": clip_loss}
    if kernel_rows():
        from declip_ds.kernels import fused_clip_loss

        out["triton"] = fused_clip_loss
    return out


def parse_tiles(spec: str) -> dict:
    """"fwd_bm=128,fwd_bn=128" -> {"fwd_bm": 128, "fwd_bn": 128}: keys of the fused loss's tile configuration."""
    from declip_ds.kernels.contrastive import _GPU

    out = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in _GPU or not value.strip().isdigit():
            raise SystemExit(f"--tiles {spec!r}: each item must be KEY=INT with KEY one of {', '.join(_GPU)}")
        out[key.strip()] = int(value)
    return out


def bench_one(name, fn, B, D, dtype, reps, warmup, peak, ctx=contextlib.nullcontext) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    img = F.normalize(torch.randn(B, D, device=dev, generator=g), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(B, D, device=dev, generator=g), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(14.3, device=dev, requires_grad=True)
    row = dict(method=name, device=device_info()[0], dtype=str(dtype).replace("torch.", ""), B=B, D=D)

    def forward():
        return fn(img, txt, scale)

    def forward_backward():
        torch.autograd.grad(fn(img, txt, scale), (img, txt, scale))

    try:
        with ctx():  # around forward *and* backward: the backward reads the tile configuration too
            t_f = median_seconds(forward, reps, warmup)
            t_fb = median_seconds(forward_backward, reps, warmup)
            mem = peak_memory_mb(forward_backward)
    except Exception as err:  # OOM, or a row that cannot run (compile, shared memory, cuBLAS): record it, go on
        return {**row, "status": failed_status(err)}
    fwd_tf, fb_tf = 2 * B * B * D / t_f / 1e12, 6 * B * B * D / t_fb / 1e12
    return {**row, "status": "ok", "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3, "fwd_tflops": fwd_tf,
            "fwd_bwd_tflops": fb_tf, "frac_bf16_peak": fb_tf / peak if peak else None, "peak_mem_mb": mem}


COLUMNS = ["method", "B", "D", "dtype", "status", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
           "frac_bf16_peak", "peak_mem_mb", "device"]


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536] if cuda else [256, 512, 1024])
    p.add_argument("--D", type=int, nargs="+", default=[512, 768] if cuda else [64])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=None, help="subset of eager torch triton")
    p.add_argument("--tiles", nargs="+", default=[], metavar="KEY=INT,...",
                   help="extra kernel rows 'triton[SPEC]' with these tile configurations (GPU, or interpreted), e.g. "
                        "fwd_bm=128,fwd_bn=128 bwd_bm=128,bwd_warps=4; keys: see declip_ds/kernels/contrastive.py")
    p.add_argument("--out", default=OUT_DIR)
    args = p.parse_args()
    tiles = {spec: parse_tiles(spec) for spec in args.tiles}
    name, peak = device_info()
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"device: {name}; bf16 peak: {fmt(peak)} TFLOP/s; inputs {dtype}; median of {args.reps} runs")
    if not cuda:
        torch.set_num_threads(1)  # a shared CPU box: numbers are indicative only
        print("no CUDA device: triton rows run interpreted (TRITON_INTERPRET=1; times mean nothing)" if kernel_rows()
              else "no CUDA device: the triton rows need a GPU and are skipped (tiny CPU grid, torch paths only)")
    todo = methods()
    if args.methods:
        todo = {k: v for k, v in todo.items() if k in args.methods}

    def grid():
        for D in args.D:
            for B in args.B:
                for mname, fn in todo.items():
                    yield bench_one(mname, fn, B, D, dtype, args.reps, args.warmup, peak)
                for spec, cfg in tiles.items() if kernel_rows() else ():
                    from declip_ds.kernels import contrastive, fused_clip_loss

                    yield bench_one(f"triton[{spec}]", fused_clip_loss, B, D, dtype, args.reps, args.warmup, peak,
                                    ctx=lambda cfg=cfg: contrastive.tile_config(**cfg))

    def finish(rows):
        print_table(rows, COLUMNS)
        panels = [("fwd_bwd_ms", "forward + backward (ms)"), ("peak_mem_mb", "peak memory rise (MB)")]
        plot(rows, "B", ["method", "D"], panels, os.path.join(args.out, "contrastive.png"), f"CLIP loss on {name}")

    run_rows(RowLog(os.path.join(args.out, "contrastive.csv"), COLUMNS, COLUMNS[:7]), grid(), finish)


if __name__ == "__main__":
    main()
