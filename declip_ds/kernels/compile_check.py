"""Compile every Triton kernel launch for a GPU architecture ahead of time, on any machine.

No GPU is needed: the public functions (``fused_clip_loss`` forward + backward, ``token_max_similarity``
forward + backward) run on CPU tensors while the kernel launches are *captured* instead of executed,
with the GPU tile configuration forced; each captured launch is then compiled by Triton for the chosen
target (e.g. sm_90 = H100/H200) down to a cubin with the ptxas that ships in the triton wheel, exactly
as the runtime would compile it (same signature, constexprs and alignment specialisation).

What it tells you, per launch: does it compile for that card, registers per thread, spilled bytes
(ptxas "spill stores"), shared memory against the architecture's per-block limit (when it does not fit,
the figures are for the fewest-stages build the runtime falls back to, named in the status), and which
MMA the dots lower to (wgmma on Hopper, mma.sync otherwise). Spills and a shared-memory overflow are the GPU
failures the CPU interpreter cannot show; speed still needs a GPU (benchmarks/bench_*.py).

Run:  python -m declip_ds.kernels.compile_check [--arch 90 80] [--dtype bf16 fp16 fp32] [--json FILE]
Exit status 1 when a launch fails to compile, needs more shared memory than the card has, or spills
more than --max-spill bytes per thread (default 0).
Must run with TRITON_INTERPRET unset (the interpreter replaces the kernels; the command refuses).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

# Per-block shared memory a kernel may use (CUDA C programming guide, "compute capabilities" table).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Shapes whose launches are captured: the configurations the benchmarks and recipes use.
CLIP_SHAPES = [(4096, 512), (4096, 768)]  # (B, D)
FILIP_SHAPES = [(64, 50, 77, 256), (64, 197, 77, 256), (64, 49, 16, 256), (64, 77, 16, 512),
                (64, 20, 16, 256)]  # (B, Ti, Tt, D)


@dataclasses.dataclass
class Launch:
    kernel: object  # the triton JITFunction
    args: tuple
    kwargs: dict
    label: str  # which call and shape produced it


@dataclasses.dataclass
class Report:
    kernel: str
    label: str
    dtype: str
    arch: int
    tiles: str  # constexpr tile sizes, e.g. "BM=128 BN=64 BK=64"
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_bytes: int | None = None  # ptxas "bytes spill stores"
    shared_bytes: int | None = None
    shared_limit: int | None = None
    mma: str | None = None  # "wgmma", "mma.sync" or "none"
    fallback_stages: int | None = None  # fewer pipeline stages the runtime falls back to (figures are for them)
    seconds: float | None = None
    error: str | None = None

    @property
    def fits(self) -> bool:
        """Compiled, and its shared memory fits the architecture's per-block limit (else it cannot launch)."""
        return self.error is None and (self.shared_limit is None or self.shared_bytes <= self.shared_limit)

    def ok(self, max_spill: int = 0) -> bool:
        """fits, and spills at most max_spill bytes per thread."""
        return self.fits and self.spill_bytes <= max_spill

    @property
    def status(self) -> str:
        if self.error is not None:
            return f"ERROR {self.error}"
        if not self.fits:
            return f"SHARED {self.shared_bytes} > {self.shared_limit}"
        note = f" (num_stages {self.fallback_stages})" if self.fallback_stages else ""
        return (f"spills {self.spill_bytes} B" if self.spill_bytes else "ok") + note


def _require_compiled_kernels() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs the real Triton compiler: unset TRITON_INTERPRET "
                           "(it is set to 1, which makes the kernels interpreted functions).")
    import triton  # noqa: F401  (raises a plain ImportError without triton)

    if not os.path.exists(_nvidia_tool("ptxas")):
        raise RuntimeError(f"compile_check needs the ptxas shipped with triton's NVIDIA backend; not found at "
                           f"{_nvidia_tool('ptxas')}. Install the triton wheel for Linux x86_64.")


def _nvidia_tool(name: str) -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


@contextlib.contextmanager
def _capture(into: list, label: str, arch: int = 90):
    """Record kernel launches (JITFunction.run) instead of running them; GPU tiles are forced."""
    from triton.runtime.jit import JITFunction

    from declip_ds.kernels import contrastive

    real_run = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, args, dict(kwargs), label))
        return None

    JITFunction.run = fake_run
    contrastive._FORCE_GPU_TILES[0] = True
    contrastive._FORCE_ARCH[0] = arch
    try:
        yield
    finally:
        JITFunction.run = real_run
        contrastive._FORCE_GPU_TILES[0] = False
        contrastive._FORCE_ARCH[0] = 90


def capture_launches(dtype: torch.dtype, arch: int = 90) -> list[Launch]:
    """Every kernel launch of fused_clip_loss and token_max_similarity (forward + backward, both backward
    designs of each) for dtype, with the tiles chosen for sm_<arch>."""
    from declip_ds.kernels.contrastive import fused_clip_loss, tile_config
    from declip_ds.kernels.token_max import backward_design, token_max_similarity

    launches: list[Launch] = []
    for B, D in CLIP_SHAPES:
        img = torch.zeros(B, D, dtype=dtype, requires_grad=True)
        txt = torch.zeros(B, D, dtype=dtype, requires_grad=True)
        scale = torch.tensor(14.3, requires_grad=True)
        for over in ({}, {"bwd_chunk": 0}):  # the default backward, then the fused kernels (16-bit default: chunked)
            with _capture(launches, f"clip B={B} D={D}{' bwd_chunk=0' if over else ''}", arch), tile_config(**over):
                torch.autograd.grad(fused_clip_loss(img, txt, scale), (img, txt, scale))
    for B, Ti, Tt, D in FILIP_SHAPES:
        x = torch.zeros(B, Ti, D, dtype=dtype, requires_grad=True)
        y = torch.zeros(B, Tt, D, dtype=dtype, requires_grad=True)
        # both backward designs in their Triton-kernel implementation (the default GEMM one launches only the
        # forward kernel with SAVE, captured here too, and would scatter the uncomputed indices of a capture)
        for save in (False, True):
            with _capture(launches, f"filip B={B} Ti={Ti} Tt={Tt} D={D} save_argmax={save}", arch), \
                    backward_design("kernels"):
                s1, s2 = token_max_similarity(x, y, save_argmax=save)
                torch.autograd.grad(s1.sum() + s2.sum(), (x, y))
            with _capture(launches, f"filip B={B} Ti={Ti} Tt={Tt} D={D} save_argmax={save} gemm tiles", arch):
                token_max_similarity(x, y, save_argmax=save)  # the forward in the GEMM backward's tiles
    # one compile per distinct (kernel, constexprs, options): shapes that share tiles share the binary
    seen, unique = set(), []
    for ln in launches:
        key = (ln.kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in ln.kwargs.items())))
        if key not in seen:
            seen.add(key)
            unique.append(ln)
    return unique


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill-store bytes) from ``ptxas -v`` on the kernel's PTX."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags triton's own make_cubin passes (triton 3.8), so the figures are the runtime binary's
        cmd = [_nvidia_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
               "-o", os.path.join(tmp, "k.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else 0, int(spill.group(1)) if spill else 0


def compile_launch(ln: Launch, arch: int) -> Report:
    """Compile one captured launch for sm_<arch> the way the runtime would, and measure the binary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = ln.kernel
    consts = {k: v for k, v in ln.kwargs.items() if k in fn.arg_names}
    dtype = next((str(a.dtype).replace("torch.", "") for a in ln.args if torch.is_tensor(a)), "?")
    rep = Report(kernel=fn.fn.__name__, label=ln.label, dtype=dtype, arch=arch,
                 tiles=" ".join(f"{k}={v}" for k, v in consts.items() if re.fullmatch(r"B[MNKD]|IB|JB|SAVE", k)),
                 num_warps=ln.kwargs.get("num_warps", 4), num_stages=ln.kwargs.get("num_stages", 3),
                 shared_limit=SMEM_LIMIT.get(arch))
    t0 = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)

    def build(stages: int):
        kwargs = dict(ln.kwargs, debug=False, num_stages=stages)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*ln.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)

    try:
        compiled = build(rep.num_stages)
        # the runtime (contrastive._launch) retries with fewer stages when the card lacks shared memory
        for stages in range(rep.num_stages - 1, 0, -1):
            if rep.shared_limit is None or int(compiled.metadata.shared) <= rep.shared_limit:
                break
            compiled, rep.fallback_stages = build(stages), stages
        ptx = compiled.asm["ptx"]
        rep.shared_bytes = int(compiled.metadata.shared)
        rep.mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if re.search(r"\bmma\.sync", ptx) else "none")
        rep.registers, rep.spill_bytes = _ptxas_usage(ptx, arch)
    except Exception as err:  # report, keep going: one broken launch should not hide the others
        rep.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    rep.seconds = time.perf_counter() - t0
    return rep


def check(archs=(90,), dtypes=("bf16", "fp16", "fp32")) -> list[Report]:
    """Reports for every distinct launch x architecture x dtype."""
    _require_compiled_kernels()
    reports = []
    for name in dtypes:
        for arch in archs:  # the tiles depend on the architecture (Hopper has its own timed ones)
            reports.extend(compile_launch(ln, arch) for ln in capture_launches(DTYPES[name], arch))
    return reports


def format_table(reports: list[Report]) -> str:
    cols = ["kernel", "dtype", "arch", "tiles", "num_warps", "num_stages", "registers", "spill_bytes",
            "shared_bytes", "mma", "seconds", "status"]
    rows = []
    for r in reports:
        d = dataclasses.asdict(r)
        d["seconds"] = f"{r.seconds:.1f}"
        d["status"] = r.status
        rows.append([str(d[c]) for c in cols])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90],
                   help="compute capabilities, e.g. 90 (H100/H200) 89 (L40S) 80 (A100)")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--json", help="also write the reports to this JSON file")
    p.add_argument("--max-spill", type=int, default=0, help="spilled bytes per thread tolerated before exit status 1")
    a = p.parse_args(argv)
    try:
        reports = check(a.arch, a.dtype)
    except (RuntimeError, ImportError) as err:
        print(f"compile_check: {err}", file=sys.stderr)
        return 2
    print(format_table(reports))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(dataclasses.asdict(r), fits=r.fits, status=r.status) for r in reports], f, indent=1)
    fits = sum(r.fits for r in reports)
    clean = sum(r.ok() for r in reports)
    print(f"{fits}/{len(reports)} launches compile and fit in shared memory; {clean} of them without register spills")
    return 0 if all(r.ok(a.max_spill) for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
