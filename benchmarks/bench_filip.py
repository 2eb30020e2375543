"""Benchmark: FILIP token-wise similarity, Triton kernel vs chunked torch reference vs eager, KERNELS.md §3.2.

Run:  python benchmarks/bench_filip.py [--B 1024 2048 4096] [--Ti 50 197] [--Tt 77] [--D 512] [--reps 20]

Methods, on the same L2-normalised tokens (bf16 on a GPU, fp32 on a CPU) with random text lengths:
* eager:   x-clip style, materialises the (B, B, Ti, Tt) similarity tensor (autocast einsum), then
           masked max and mean in both directions.
* torch:   declip_ds.losses.filip_similarity, the chunked reference (imported, never copied).
* triton:  declip_ds.kernels.token_max_similarity (GPU only), with the text mask, its default backward
           (recompute the arg-max per chunk with the forward kernel, scatter dS chunks, cuBLAS GEMMs);
           "triton_nomask" runs it without masks (KERNELS.md asks that masks cost under 5%);
           "triton_kernels" with the recomputing Triton backward kernels instead of the GEMMs;
           "triton_saved" with save_argmax=True (loss.filip_argmax=save: the backward reads the
           forward's arg-max indices instead of recomputing them), "triton_saved_kernels" the same with
           the saved-index Triton kernels.
Per row: median of --reps runs after --warmup (CUDA events on a GPU) of the forward (both
directions) and of forward + backward; useful forward TFLOP/s = 2 B^2 Ti Tt D / t_fwd on unpadded
tokens; its fraction of the card's dense bf16 peak; backward / forward time; rise of
max_memory_allocated over one forward + backward (GPU only). Out-of-memory rows say "OOM", rows that
fail otherwise (a compile error, too little shared memory, a cuBLAS failure) "ERROR: <what>"; the others go on.
Besides the grid, KERNELS.md's extra shapes run on a GPU: 49x16, 77x16 and D=256 at B=1024.
Writes benchmarks/out/filip.csv, one row appended (and flushed) as each completes, so a run stopped with SIGINT
(``timeout --signal=INT``, Ctrl-C) keeps its finished rows: it then prints the partial table, plots it and exits
with status 130. When matplotlib is installed, also filip.png.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_contrastive import (OUT_DIR, RowLog, device_info, failed_status, fmt, kernel_rows,  # noqa: E402
                               median_seconds, peak_memory_mb, plot, print_table, run_rows)
from declip_ds.losses import filip_similarity  # noqa: E402


def eager_similarity(x, y, x_mask, y_mask):
    """The x-clip formula: the whole (B, B, Ti, Tt) tensor, then masked maxima and means."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        s = torch.einsum("ikd,jrd->ijkr", x, y).float()  # (Bi, Bt, Ti, Tt)
    wx = x_mask.float() / x_mask.float().sum(1, keepdim=True).clamp_min(1)
    wy = y_mask.float() / y_mask.float().sum(1, keepdim=True).clamp_min(1)
    s_i2t = torch.einsum("ijk,ik->ij", s.masked_fill(~y_mask[None, :, None, :], -1e4).amax(3), wx)
    s_t2i = torch.einsum("ijr,jr->ij", s.masked_fill(~x_mask[:, None, :, None], -1e4).amax(2), wy)
    return s_i2t, s_t2i


def methods() -> dict:
    out = {"eager": eager_similarity, "torch": filip_similarity}
    if kernel_rows():
        from declip_ds.kernels import token_max_similarity

        out["triton"] = token_max_similarity
        out["triton_nomask"] = lambda x, y, xm, ym: token_max_similarity(x, y)
        out["triton_kernels"] = functools.partial(with_kernels, save=False)
        out["triton_saved"] = lambda x, y, xm, ym: token_max_similarity(x, y, xm, ym, save_argmax=True)
        out["triton_saved_kernels"] = functools.partial(with_kernels, save=True)
    return out


def with_kernels(x, y, xm, ym, save):
    """token_max_similarity whose backward runs the Triton backward kernels (fixed at the forward), not the GEMMs."""
    from declip_ds.kernels import token_max

    with token_max.backward_design("kernels"):
        return token_max.token_max_similarity(x, y, xm, ym, save_argmax=save)


def parse_tiles(spec: str) -> dict:
    """"64x256x32" or "64x256x32x8x2", optionally followed by ",key=value" items (group: row tiles per band of
    the forward's program order; BD: D columns per saved-arg-max backward program; save=1: the row runs with
    save_argmax; kernels=1: with the Triton backward kernels, not the GEMMs) -> keyword arguments of
    token_max.tile_config, plus "save" and "kernels"."""
    head, *extras = spec.split(",")
    parts = head.lower().split("x")
    if len(parts) not in (3, 5) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--tiles {spec!r}: expected BMxBNxBK or BMxBNxBKxWARPSxSTAGES, then optional ,group=G ,BD=N "
                         f",save=1 ,kernels=1, e.g. 64x256x32 or 64x128x32x8x2,group=1")
    keys = ("BM", "BN", "BK", "num_warps", "num_stages")
    cfg = dict(zip(keys, map(int, parts)))
    for item in extras:
        key, _, value = item.partition("=")
        if key not in ("group", "BD", "save", "kernels") or not value.isdigit():
            raise SystemExit(f"--tiles {spec!r}: {item!r} is not group=<int>, BD=<int>, save=0/1 or kernels=0/1")
        cfg[key] = int(value)
    return cfg


def bench_one(name, fn, B, Ti, Tt, D, dtype, reps, warmup, peak, ctx=contextlib.nullcontext) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    x = F.normalize(torch.randn(B, Ti, D, device=dev, generator=g), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(B, Tt, D, device=dev, generator=g), dim=-1).to(dtype).requires_grad_()
    n_txt = torch.randint(1, Tt + 1, (B,), device=dev, generator=g)
    ym = torch.arange(Tt, device=dev)[None, :] < n_txt[:, None]  # random text lengths
    xm = torch.ones(B, Ti, dtype=torch.bool, device=dev)
    row = dict(method=name, device=device_info()[0], dtype=str(dtype).replace("torch.", ""), B=B, Ti=Ti, Tt=Tt, D=D)

    def forward():
        return fn(x, y, xm, ym)

    def forward_backward():
        s1, s2 = fn(x, y, xm, ym)
        torch.autograd.grad(s1.sum() + s2.sum(), (x, y))

    try:
        with ctx():  # around forward *and* backward: the backward recomputes with the same tiles
            t_f = median_seconds(forward, reps, warmup)
            t_fb = median_seconds(forward_backward, reps, warmup)
            mem = peak_memory_mb(forward_backward)
    except Exception as err:  # OOM, or a row that cannot run (compile, shared memory, cuBLAS): record it, go on
        return {**row, "status": failed_status(err)}
    tf = 2 * B * B * Ti * Tt * D / t_f / 1e12
    return {**row, "status": "ok", "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3, "fwd_tflops": tf,
            "frac_bf16_peak": tf / peak if peak else None, "bwd_over_fwd": (t_fb - t_f) / t_f, "peak_mem_mb": mem}


COLUMNS = ["method", "B", "Ti", "Tt", "D", "dtype", "status", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "frac_bf16_peak",
           "bwd_over_fwd", "peak_mem_mb", "device"]


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, nargs="+", default=[1024, 2048, 4096] if cuda else [16, 32])
    p.add_argument("--Ti", type=int, nargs="+", default=[50, 197] if cuda else [10])
    p.add_argument("--Tt", type=int, nargs="+", default=[77] if cuda else [8])
    p.add_argument("--D", type=int, nargs="+", default=[512] if cuda else [32])
    p.add_argument("--no-extra", action="store_true", help="skip the 49x16, 77x16 and D=256 shapes")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=None, help="subset of eager torch triton triton_nomask triton_saved")
    p.add_argument("--tiles", nargs="+", default=[], metavar="BMxBNxBK[xWxS]",
                   help="extra kernel rows 'triton[SPEC]' with these tiles (GPU only; BM >= Ti and BN >= Tt), "
                        "e.g. 64x256x32 128x128x32x8x2 64x128x32x8x2,group=1 64x128x32x8x2,BD=64,save=1")
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
    shapes = [(B, Ti, Tt, D) for D in args.D for Ti in args.Ti for Tt in args.Tt for B in args.B]
    if cuda and not args.no_extra:
        shapes += [(1024, 49, 16, 512), (1024, 77, 16, 512), (1024, 50, 77, 256)]
    todo = methods()
    if args.methods:
        todo = {k: v for k, v in todo.items() if k in args.methods}

    def grid():
        for B, Ti, Tt, D in shapes:
            for mname, fn in todo.items():
                yield bench_one(mname, fn, B, Ti, Tt, D, dtype, args.reps, args.warmup, peak)
            for spec, cfg in tiles.items() if kernel_rows() else ():
                from declip_ds.kernels import token_max, token_max_similarity

                if cfg["BM"] < Ti or cfg["BN"] < Tt:  # a tile must hold one whole image and one whole text
                    yield dict(method=f"triton[{spec}]", B=B, Ti=Ti, Tt=Tt, D=D, dtype=str(dtype).replace("torch.", ""),
                               status="skipped: tiles smaller than one sample")
                    continue
                tiles_only = {k: v for k, v in cfg.items() if k not in ("save", "kernels")}
                save = bool(cfg.get("save", 0))
                fn = functools.partial(with_kernels, save=save) if cfg.get("kernels") else \
                    functools.partial(token_max_similarity, save_argmax=save)
                yield bench_one(f"triton[{spec}]", fn, B, Ti, Tt, D, dtype, args.reps, args.warmup, peak,
                                ctx=lambda c=tiles_only: token_max.tile_config(**c))

    def finish(rows):
        print_table(rows, COLUMNS)
        panels = [("fwd_ms", "forward (ms)"), ("peak_mem_mb", "peak memory rise (MB)")]
        plot(rows, "B", ["method", "Ti", "Tt", "D"], panels, os.path.join(args.out, "filip.png"),
             f"FILIP similarity on {name}")

    run_rows(RowLog(os.path.join(args.out, "filip.csv"), COLUMNS, COLUMNS[:9]), grid(), finish)


if __name__ == "__main__":
    main()
