"""Fused CLIP contrastive loss: tiled Triton forward with online log-sum-exp over rows *and*
columns of one logit tile, and a recomputing backward; the b x (W*b) logits are never stored.

Math (one rank r of W, local rows i, all columns j = 0..N-1, N = W*b, x = scale * s, s = <I_i, T_j>):
  loss_r = 1/(2b) * [ sum_i (LSE_row_i - x_ii) + sum_{j local} (LSE_col_j - x_jj) ]
where LSE_row_i runs over the N gathered texts and LSE_col_j over all N images. Rank r only holds
the (b x N) block "local images x all texts", so LSE_col is built from per-rank partial column
statistics merged across ranks (all-reduce MAX of the running max, then all-reduce SUM of the
rescaled sums). This is ``clip_loss`` exactly: same per-rank loss and per-rank gradients.

Forward  (one GEMM pass): grid = (row groups, column groups); a program walks its rectangle of
  (BM x BN) tiles, keeps the row statistics (max, sum of exp, sum of exp * s) in registers and
  read-modify-writes the column statistics of its row group in a small (G_r, N) buffer (each entry
  owned by one program: no atomics, deterministic). Torch merges the G partials (O((b+N)*G)).
  The sum of exp * s gives E[s] under each softmax, so d loss / d scale is known after the forward.
Backward, two designs (``bwd_chunk`` picks; both tested against the float64 reference and each other):
 - chunked (bwd_chunk = c > 0; the default for 16-bit inputs on GPUs): for c local rows at a time a Triton
   kernel recomputes the logit tiles and writes dX (below) for those rows against all N columns into a (c, N)
   buffer in the input dtype, then two cuBLAS GEMMs with fp32 accumulation and fp32 output give
   dI[chunk] = dX @ T_all and dT += dX^T @ I[chunk]. 3 GEMM passes (8 B^2 D, the minimal fused count of
   KERNELS.md), two of them at cuBLAS speed, for 6 bytes of HBM traffic per logit (dX written once, read
   twice). c = 512 keeps the (c, N) buffer no larger than the returned dT at D = 512, so the peak memory
   is the fused design's plus a (c, D) fp32 product. Chosen by that arithmetic over the fused kernels
   (forward + backward 32.5 ms on an H200 at B=32k, D=512, the backward ~4/5 of it, at ~17 % of peak);
   not yet timed on a GPU itself (benchmarks/gpu/run_all.sh sweeps both).
   fp32 features on a GPU keep the fused kernels (cuBLAS would follow torch's TF32 switch).
 - fused (bwd_chunk = 0; the "10 B^2 D" design of KERNELS.md): a row-parallel kernel
  recomputes S tile by tile and accumulates dI = scale * dX @ T; a column-parallel kernel
  recomputes S and accumulates dT = scale * dX^T @ I, with
  dX_ij = w_r (P_row_ij - [j = label_i]) + w_c(j) (P_col_ij - [j = label_i]),
  w_r = g_r / 2b for this rank's loss, w_c(j) = g_owner(j) / 2b for the rank whose loss holds text j's
  column term. dT of the gathered texts is reduce-scattered (summed) back to their owners.
  16-bit inputs (``bwd_bd`` > 0): each program owns one tile of rows (columns) and one chunk of bwd_bd
  D columns, keeps that (64, bwd_bd) fp32 accumulator in registers over the whole loop and writes it
  once (512 on Hopper: all of D=512 in one chunk, 2 GEMMs per kernel; 32 B of spills in the column
  kernel on sm_90, and still the fastest timed on an H200; 256 before Hopper, where 512 spills 264 B).
  S is recomputed once per D chunk (D=768: 2 chunks, 3 GEMMs per kernel instead of 2), which replaces
  reading and rewriting the fp32 gradient rows per tile (64 x D x 4 B x 2 per tile pair: 137 GB of traffic per
  backward at B=32k, D=512). fp32 inputs (``bwd_bd=0``): all of D per program, the fp32 rows read and
  rewritten per tile in BK chunks (their FMA GEMMs are the cost; a recompute per D chunk would multiply
  it). dX is cast to the input dtype for the MMA (fp32 stays IEEE fp32), after normalising the
  weights by their largest magnitude and, for fp16, multiplying by 2^14 (``ds_headroom``) so that small
  probabilities stay out of fp16's subnormal range; the fp32 products are divided by the same power of two.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from declip_ds.losses.gather import all_gather_no_grad, world_info

_NEG = -1.0e30  # "minus infinity" that never makes inf - inf = nan
NEG = tl.constexpr(_NEG)

# Tile configuration. The 16-bit values for Hopper (sm_90: H100/H200) are the fastest of the tile sweep
# timed on an H200 at B=32k, D=512, bf16 (benchmarks/RESULTS.md): forward 64 x 128 with 4 warps (6.4 ms;
# 8.1 at 128 x 64, 8 warps), backward one 512-column D chunk per program (fwd + bwd 32.5 ms; 48.7 with 256,
# 86.9 with 128, 61.3 for the read-modify-write design); compile_check (sm_90, bf16): 0 / 0 / 32 B of
# spills. Older cards keep the untimed no-spill tiles (the 512-column backward spills 264 B on sm_80).
# fp32 inputs use true-fp32 FMA dots (no tensor cores), which need smaller K chunks not to spill. bwd_bd: D columns per backward program
# (register accumulator), 0 = the read-modify-write backward (see the module docstring). bwd_chunk: rows per
# chunk of the chunked backward (0 = the fused backward kernels), whose dX kernel uses the g_* tiles (128 x 128
# x 64, 8 warps: the usual Hopper GEMM tile; untimed). The interpreter prefers few, large tiles. Tests
# override any key with ``tile_config``.
_GPU = dict(fwd_bm=64, fwd_bn=128, fwd_bk=64, fwd_warps=4, fwd_stages=3,
            bwd_bm=64, bwd_bn=64, bwd_bk=64, bwd_bd=512, bwd_warps=8, bwd_stages=3, groups=16,
            bwd_chunk=512, g_bm=128, g_bn=128, g_bk=64, g_warps=8, g_stages=3)
_GPU_PRE_HOPPER = dict(_GPU, fwd_bm=128, fwd_bn=64, fwd_warps=8, bwd_bd=256)
_GPU_FP32 = dict(fwd_bm=64, fwd_bn=64, fwd_bk=16, fwd_warps=8, fwd_stages=3,
                 bwd_bm=64, bwd_bn=64, bwd_bk=16, bwd_bd=0, bwd_warps=8, bwd_stages=3, groups=16,
                 bwd_chunk=0, g_bm=64, g_bn=64, g_bk=16, g_warps=8, g_stages=3)
_CPU = dict(fwd_bm=32, fwd_bn=32, fwd_bk=64, fwd_warps=4, fwd_stages=1,
            bwd_bm=32, bwd_bn=32, bwd_bk=64, bwd_bd=64, bwd_warps=4, bwd_stages=1, groups=2,
            bwd_chunk=0, g_bm=32, g_bn=32, g_bk=64, g_warps=4, g_stages=1)
_override: dict = {}
# Set by declip_ds.kernels.compile_check while it captures launches from CPU tensors, so the captured
# launches carry the GPU tile configuration it then compiles for a GPU architecture.
_FORCE_GPU_TILES = [False]
_FORCE_ARCH = [90]  # the architecture those captured launches are configured for


def _gpu_tiles(t: torch.Tensor) -> bool:
    """Whether launches for tensor t use the GPU tile configuration."""
    return t.is_cuda or _FORCE_GPU_TILES[0]


def gpu_arch(t: torch.Tensor) -> int:
    """Compute capability of t's GPU as 90 / 89 / 80 (the forced one for captured CPU launches)."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return _FORCE_ARCH[0]


@contextlib.contextmanager
def tile_config(**kw):
    """Temporarily override any key of the tile configuration (fwd_bm, fwd_bn, fwd_bk, fwd_warps, fwd_stages,
    the same five for bwd_ and for g_ (the chunked backward's dX tiles), bwd_bd, bwd_chunk, groups)."""
    old = dict(_override)
    _override.update(kw)
    try:
        yield
    finally:
        _override.clear()
        _override.update(old)


try:  # where triton keeps it (runtime.errors since 2.1)
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover
    from triton.runtime.autotuner import OutOfResources

# (kernel, constexprs, device, requested stages) -> num_stages that fit this card's shared memory
_STAGES_THAT_FIT: dict = {}


def _launch(kernel, grid, *args, num_stages: int, what: str, **kwargs):
    """kernel[grid](*args, num_stages=..., **kwargs), with fewer pipeline stages when the card has less
    shared memory per block than the tiles were chosen for (sm_86/sm_89: 99 KB against 227 KB on sm_90).
    Fewer stages only shorten the prefetch pipeline, not the arithmetic. What fit is remembered per kernel,
    constexprs, device and *requested* stage count (a later request for other stages, e.g. a tile sweep's, must
    not get the stages that fit an earlier one). If even one stage does not fit, raise an error that names the
    kernel, the need, the limit and the fix (``what`` says which call)."""
    key = (getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", str(kernel)),
           tuple(sorted((k, str(v)) for k, v in kwargs.items())), str(args[0].device) if args else "", num_stages)
    stages = _STAGES_THAT_FIT.get(key, num_stages)
    while True:
        try:
            out = kernel[grid](*args, num_stages=stages, **kwargs)
            _STAGES_THAT_FIT[key] = stages
            return out
        except OutOfResources as err:
            if stages > 1:
                stages -= 1
                continue
            raise RuntimeError(
                f"{what}: kernel {key[0]} with {', '.join(f'{k}={v}' for k, v in key[1] if k.isupper())} needs "
                f"{err.required} of {err.name} (limit {err.limit} on this GPU) even with one pipeline stage. Use "
                f"bf16/fp16 inputs (smaller tiles' buffers), or loss.impl=torch for the chunked pure-torch path "
                f"on this card.") from err


def _config(t: torch.Tensor) -> dict:
    if not _gpu_tiles(t):
        base = _CPU
    elif t.dtype == torch.float32:
        base = _GPU_FP32
    else:
        base = _GPU if gpu_arch(t) >= 90 else _GPU_PRE_HOPPER
    return {**base, **_override}


# fp16 headroom of the backward's dX operands. After the normalisation in _FusedClipLoss.backward the per-logit
# gradient is dX_ij = w_r (P_row_ij - 1[pos]) + w_c(j) (P_col_ij - 1[pos]) with |w_r|, |w_c(j)| <= 1 and the
# probabilities in [0, 1] (a recomputed logit may exceed the forward's max by a few ulps times the scale:
# P <= 1 + 1e-5), so |dX| <= 2 (1 + 1e-5) whatever N, D and the scale. Neither the scale (<= 100, applied after
# the dots through k), nor 1/2b, nor the upstream gradient (which carries DeepSpeed's fp16 loss scale) is in dX:
# the normalisation takes them out, and with them the loss scaler's protection against underflow. What stays
# small is P itself: below 2^-14 = 6.1e-5 an fp16 value is subnormal (absolute spacing 2^-24 = 6e-8: 10 %
# relative error at P = 3e-7), below 2^-25 = 3e-8 it is 0. At N = W*b >= 16k every negative averages
# P < 1/N < 2^-14; in a row the model already separates (P_ii near 1) the negatives' mass 1 - P_ii is spread so
# thin that most of it rounds to 0 (all of it, spread evenly, once 1 - P_ii < N * 3e-8, 2e-3 at N = 64k), and
# the part of the gradient the negatives carry was lost. Measured: float64 emulation of the cast, 256 such rows
# against N = 4k-64k texts, D = 256, scale 100: relative error 1.2-1.8 with the plain cast, 1.8e-2-4.4e-2 with
# the factor; the kernels at B = 64 (test_fp16_backward_keeps_probabilities_below_fp16s_normal_range): 0.106
# and 3.5e-4. Rows with P ~ 1/N spread evenly lose nothing measurable (independent rounding errors: 2.1e-4
# either way at N = 64k, scale 14.3).
# So fp16 dX is multiplied by h = 2^14 before the cast and the fp32 products divided by h after (through k): both
# exact (a power of two, far from fp32's limits), so only values that were fp16-subnormal change; fp16 stays
# normal down to P = 2^-28 = 3.7e-9 (0 below 2^-39: rows separated still further keep losing it). 2^14 is the
# largest power of two that cannot overflow: |dX| h <= 32769 < 65504 = fp16 max (2^15 could reach 65536 = inf).
# bf16 has fp32's exponent range (normal down to 1.2e-38) and fp32 is not cast: h = 1, their bits unchanged.
# What remains, in every dtype: P_ii - 1 = exp(x_ii - lse_i) - 1 cancels in fp32 (lse_i is one fp32 number,
# resolution ~ |lse_i| 2^-24), so in rows with 1 - P_ii below ~1e-4 the positive's term (along the partner
# feature) carries a relative error of ~1e-3 or more even with fp32 features.
FP16_DS_HEADROOM = 2.0 ** 14


def ds_headroom(dtype: torch.dtype) -> float:
    """Power of two that the backward multiplies its normalised per-score gradients (|value| <= 2) by before they
    are cast to ``dtype`` for an MMA, and divides the fp32 result by afterwards: 2^14 for fp16 (keeps small
    probabilities out of fp16's subnormal range, see FP16_DS_HEADROOM), 1 for bf16 and fp32 (unchanged bits).
    Used by fused_clip_loss and token_max_similarity."""
    return FP16_DS_HEADROOM if dtype == torch.float16 else 1.0


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _scores_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """(BM, BN) fp32 tile of A[rows] @ B[cols]^T, accumulated over D in BK chunks (fixed order, so
    a recompute gives the same bits)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ks = tl.arange(0, BK)
    ra = rows.to(tl.int64) * stride_a
    cb = cols.to(tl.int64) * stride_b
    for k0 in range(0, D, BK):
        kk = k0 + ks
        km = kk < D
        a = tl.load(A + ra[:, None] + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)  # (BM, BK)
        bt = tl.load(B + cb[None, :] + kk[:, None], mask=cmask[None, :] & km[:, None], other=0.0)  # (BK, BN)
        acc = tl.dot(a, bt, acc, input_precision=PREC)
    return acc


@triton.jit
def _clip_fwd_kernel(I, T, scale_ptr, row_m, row_l, row_u, col_m, col_l, col_u,
                     b, N, D, stride_i, stride_t, RB_PER_G, CB_PER_G,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    gr = tl.program_id(0)
    gc = tl.program_id(1)
    scale = tl.load(scale_ptr)
    for t in range(0, RB_PER_G):
        rows = (gr * RB_PER_G + t) * BM + tl.arange(0, BM)
        rmask = rows < b
        m_i = tl.full((BM,), NEG, tl.float32)  # running row max of x
        l_i = tl.zeros((BM,), tl.float32)  # sum exp(x - m)
        u_i = tl.zeros((BM,), tl.float32)  # sum exp(x - m) * s  (for d/dscale)
        for c in range(0, CB_PER_G):
            cols = (gc * CB_PER_G + c) * BN + tl.arange(0, BN)
            cmask = cols < N
            s = _scores_tile(I, T, rows, cols, rmask, cmask, D, stride_i, stride_t, BM, BN, BK, PREC)
            valid = rmask[:, None] & cmask[None, :]
            x = tl.where(valid, s * scale, NEG)
            # rows: online log-sum-exp across this program's column blocks
            m_new = tl.maximum(m_i, tl.max(x, 1))
            p = tl.where(valid, tl.exp(x - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            u_i = u_i * alpha + tl.sum(p * s, 1)
            m_i = m_new
            # columns: partial statistics of this row group, read-modify-write (owned by this program)
            cp = gr * N + cols
            cm = tl.load(col_m + cp, mask=cmask, other=NEG)
            cl = tl.load(col_l + cp, mask=cmask, other=0.0)
            cu = tl.load(col_u + cp, mask=cmask, other=0.0)
            cm_new = tl.maximum(cm, tl.max(x, 0))
            q = tl.where(valid, tl.exp(x - cm_new[None, :]), 0.0)
            beta = tl.exp(cm - cm_new)
            tl.store(col_m + cp, cm_new, mask=cmask)
            tl.store(col_l + cp, cl * beta + tl.sum(q, 0), mask=cmask)
            tl.store(col_u + cp, cu * beta + tl.sum(q * s, 0), mask=cmask)
        rp = gc * b + rows
        tl.store(row_m + rp, m_i, mask=rmask)
        tl.store(row_l + rp, l_i, mask=rmask)
        tl.store(row_u + rp, u_i, mask=rmask)


@triton.jit
def _dlogits(s, rows, cols, rmask, cmask, scale, lse_r, col_lse, wr, wc, label_offset):
    """Normalised d loss / d x of one tile: wr (P_row - 1[pos]) + wc_j (P_col - 1[pos])."""
    x = s * scale
    lse_c = tl.load(col_lse + cols, mask=cmask, other=0.0)
    w_c = tl.load(wc + cols, mask=cmask, other=0.0)
    pos = (cols[None, :] == (rows + label_offset)[:, None]).to(tl.float32)
    g = wr * (tl.exp(x - lse_r[:, None]) - pos) + w_c[None, :] * (tl.exp(x - lse_c[None, :]) - pos)
    return tl.where(rmask[:, None] & cmask[None, :], g, 0.0)


@triton.jit
def _clip_bwd_rows_kernel(I, T, scale_ptr, row_lse, col_lse, wr_ptr, wc, dI, b, N, D, stride_i, stride_t,
                          label_offset, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                          PREC: tl.constexpr):
    """dI[rows, D chunk] = sum over all column tiles of dX @ T[:, chunk] (fp32, unscaled by scale and the weight
    norm): the (BM, BD) accumulator stays in registers over the column loop and is written once."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < b
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = d < D
    scale = tl.load(scale_ptr)
    wr = tl.load(wr_ptr)
    lse_r = tl.load(row_lse + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for c0 in range(0, N, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < N
        s = _scores_tile(I, T, rows, cols, rmask, cmask, D, stride_i, stride_t, BM, BN, BK, PREC)
        g = _dlogits(s, rows, cols, rmask, cmask, scale, lse_r, col_lse, wr, wc, label_offset).to(T.dtype.element_ty)
        t = tl.load(T + cols.to(tl.int64)[:, None] * stride_t + d[None, :], mask=cmask[:, None] & dm[None, :],
                    other=0.0)  # (BN, BD)
        acc = tl.dot(g, t, acc, input_precision=PREC)  # (BM, BD)
    tl.store(dI + rows.to(tl.int64)[:, None] * D + d[None, :], acc, mask=rmask[:, None] & dm[None, :])


@triton.jit
def _clip_bwd_cols_kernel(I, T, scale_ptr, row_lse, col_lse, wr_ptr, wc, dT, b, N, D, stride_i, stride_t,
                          label_offset, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                          PREC: tl.constexpr):
    """dT[cols, D chunk] = sum over the local row tiles of dX^T @ I[:, chunk] (fp32, unscaled), in registers."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < N
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = d < D
    scale = tl.load(scale_ptr)
    wr = tl.load(wr_ptr)
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for r0 in range(0, b, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < b
        lse_r = tl.load(row_lse + rows, mask=rmask, other=0.0)
        s = _scores_tile(I, T, rows, cols, rmask, cmask, D, stride_i, stride_t, BM, BN, BK, PREC)
        g = _dlogits(s, rows, cols, rmask, cmask, scale, lse_r, col_lse, wr, wc, label_offset)
        a = tl.load(I + rows.to(tl.int64)[:, None] * stride_i + d[None, :], mask=rmask[:, None] & dm[None, :],
                    other=0.0)  # (BM, BD)
        acc = tl.dot(tl.trans(g).to(I.dtype.element_ty), a, acc, input_precision=PREC)  # (BN, BD)
    tl.store(dT + cols.to(tl.int64)[:, None] * D + d[None, :], acc, mask=cmask[:, None] & dm[None, :])


@triton.jit
def _clip_bwd_rows_rmw_kernel(I, T, scale_ptr, row_lse, col_lse, wr_ptr, wc, dI, b, N, D, stride_i, stride_t,
                              label_offset, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """bwd_bd=0: dI[rows] = sum over all column tiles of dX @ T (fp32, unscaled), all of D per program, the
    fp32 rows read and rewritten in global memory per column tile in BK chunks (fp32 inputs: short K)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < b
    scale = tl.load(scale_ptr)
    wr = tl.load(wr_ptr)
    lse_r = tl.load(row_lse + rows, mask=rmask, other=0.0)
    ks = tl.arange(0, BK)
    for c0 in range(0, N, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < N
        s = _scores_tile(I, T, rows, cols, rmask, cmask, D, stride_i, stride_t, BM, BN, BK, PREC)
        g = _dlogits(s, rows, cols, rmask, cmask, scale, lse_r, col_lse, wr, wc, label_offset)
        g = g.to(T.dtype.element_ty)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            km = kk < D
            t = tl.load(T + cols.to(tl.int64)[:, None] * stride_t + kk[None, :],
                        mask=cmask[:, None] & km[None, :], other=0.0)
            ptr = dI + rows.to(tl.int64)[:, None] * D + kk[None, :]
            m2 = rmask[:, None] & km[None, :]
            acc = tl.dot(g, t, tl.load(ptr, mask=m2, other=0.0), input_precision=PREC)
            tl.store(ptr, acc, mask=m2)


@triton.jit
def _clip_bwd_cols_rmw_kernel(I, T, scale_ptr, row_lse, col_lse, wr_ptr, wc, dT, b, N, D, stride_i, stride_t,
                              label_offset, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """bwd_bd=0: dT[cols] = sum over the local row tiles of dX^T @ I (fp32, unscaled), read-modify-write."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < N
    scale = tl.load(scale_ptr)
    wr = tl.load(wr_ptr)
    ks = tl.arange(0, BK)
    for r0 in range(0, b, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < b
        lse_r = tl.load(row_lse + rows, mask=rmask, other=0.0)
        s = _scores_tile(I, T, rows, cols, rmask, cmask, D, stride_i, stride_t, BM, BN, BK, PREC)
        g = _dlogits(s, rows, cols, rmask, cmask, scale, lse_r, col_lse, wr, wc, label_offset)
        gt = tl.trans(g).to(I.dtype.element_ty)  # (BN, BM)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            km = kk < D
            a = tl.load(I + rows.to(tl.int64)[:, None] * stride_i + kk[None, :],
                        mask=rmask[:, None] & km[None, :], other=0.0)
            ptr = dT + cols.to(tl.int64)[:, None] * D + kk[None, :]
            m2 = cmask[:, None] & km[None, :]
            acc = tl.dot(gt, a, tl.load(ptr, mask=m2, other=0.0), input_precision=PREC)
            tl.store(ptr, acc, mask=m2)


@triton.jit
def _clip_dlogits_kernel(I, T, scale_ptr, row_lse, col_lse, wr_ptr, wc, G, r0, r1, N, D, stride_i, stride_t,
                         label_offset, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Chunked backward: G[i - r0, j] = dX_ij (normalised, cast to G's dtype) for the local rows r0 <= i < r1 and
    all N columns, one (BM, BN) tile per program. Axis 0 walks the chunk's row tiles, so the programs that
    run together share a column tile of T (read once from HBM, then from L2). dI and dT are cuBLAS GEMMs."""
    rows = r0 + tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < r1
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < N
    scale = tl.load(scale_ptr)
    wr = tl.load(wr_ptr)
    lse_r = tl.load(row_lse + rows, mask=rmask, other=0.0)
    s = _scores_tile(I, T, rows, cols, rmask, cmask, D, stride_i, stride_t, BM, BN, BK, PREC)
    g = _dlogits(s, rows, cols, rmask, cmask, scale, lse_r, col_lse, wr, wc, label_offset)
    ptr = G + (rows - r0).to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(ptr, g.to(G.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------------------- launchers
def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: true fp32 products (TF32 would cost ~1e-3 relative on the logits, 0.1 at scale 100)
    return "ieee" if dtype == torch.float32 else "tf32"


def _merge(m, l, u):
    """Merge partial (max, sum exp, sum exp*s) along dim 0 -> (max, sum, weighted sum)."""
    M = m.max(0).values
    r = torch.exp(m - M)
    return M, (l * r).sum(0), (u * r).sum(0)


def _launch_forward(image, all_text, scale32):
    b, D = image.shape
    N = all_text.shape[0]
    cfg = _config(image)
    BM, BN, BK = cfg["fwd_bm"], cfg["fwd_bn"], cfg["fwd_bk"]
    n_rb, n_cb = triton.cdiv(b, BM), triton.cdiv(N, BN)
    rb_per_g = triton.cdiv(n_rb, min(cfg["groups"], n_rb))
    cb_per_g = triton.cdiv(n_cb, min(cfg["groups"], n_cb))
    G_r, G_c = triton.cdiv(n_rb, rb_per_g), triton.cdiv(n_cb, cb_per_g)  # every group non-empty
    f32 = dict(device=image.device, dtype=torch.float32)
    row_m, row_l, row_u = torch.full((G_c, b), _NEG, **f32), torch.zeros(G_c, b, **f32), torch.zeros(G_c, b, **f32)
    col_m, col_l, col_u = torch.full((G_r, N), _NEG, **f32), torch.zeros(G_r, N, **f32), torch.zeros(G_r, N, **f32)
    _launch(_clip_fwd_kernel, (G_r, G_c),
            image, all_text, scale32, row_m, row_l, row_u, col_m, col_l, col_u, b, N, D,
            image.stride(0), all_text.stride(0), rb_per_g, cb_per_g, BM=BM, BN=BN, BK=BK,
            PREC=_precision(image.dtype), num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"],
            what="fused_clip_loss")
    return _merge(row_m, row_l, row_u), _merge(col_m, col_l, col_u)


def _launch_backward(which, image, all_text, scale32, row_lse, col_lse, wr, wc, label_offset):
    """which="rows": (b, D) fp32 dI of the local images; "cols": (N, D) fp32 dT of the gathered texts.
    Both unscaled (times scale and the weight norm later). One at a time, so the caller can shrink
    the first to the input dtype before the second's fp32 buffer exists."""
    b, D = image.shape
    N = all_text.shape[0]
    cfg = _config(image)
    BM, BN, BK, BD = cfg["bwd_bm"], cfg["bwd_bn"], cfg["bwd_bk"], cfg["bwd_bd"]
    args = (image, all_text, scale32, row_lse, col_lse, wr, wc)
    dims = (b, N, D, image.stride(0), all_text.stride(0), label_offset)
    common = dict(BM=BM, BN=BN, BK=BK, PREC=_precision(image.dtype), num_warps=cfg["bwd_warps"],
                  num_stages=cfg["bwd_stages"], what="fused_clip_loss backward")
    rows = which == "rows"
    n_tiles = triton.cdiv(b, BM) if rows else triton.cdiv(N, BN)
    f32 = dict(device=image.device, dtype=torch.float32)
    if BD:  # register accumulators, one D chunk per program, each gradient element written once
        out = torch.empty(b if rows else N, D, **f32)
        _launch(_clip_bwd_rows_kernel if rows else _clip_bwd_cols_kernel, (n_tiles, triton.cdiv(D, BD)),
                *args, out, *dims, BD=BD, **common)
    else:  # bwd_bd=0: fp32 rows read-modify-written per tile (all of D per program)
        out = torch.zeros(b if rows else N, D, **f32)
        _launch(_clip_bwd_rows_rmw_kernel if rows else _clip_bwd_cols_rmw_kernel, (n_tiles,),
                *args, out, *dims, **common)
    return out


_MM_OUT_DTYPE: dict = {}  # device -> (whether torch.mm / addmm take out_dtype=fp32 for 16-bit inputs there, why not)


def _probe_mm_out_dtype(device) -> None:
    """Raise unless torch.mm(a, b, out_dtype=fp32) and the in-place addmm into an fp32 accumulator give the upcast
    product for bf16 operands on device (a small product against the upcast one)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(96, 64, generator=g).to(device, torch.bfloat16)
    b = torch.randn(64, 80, generator=g).to(device, torch.bfloat16)
    acc = torch.randn(96, 80, generator=g).to(device)
    want = acc + a.float() @ b.float()
    one = torch.mm(a, b, out_dtype=torch.float32)
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if one.dtype != torch.float32:
        raise RuntimeError(f"torch.mm(..., out_dtype=torch.float32) returned {one.dtype}")
    if not torch.allclose(one, a.float() @ b.float(), rtol=1e-4, atol=1e-3):
        raise RuntimeError("torch.mm(..., out_dtype=torch.float32) differs from the upcast product")
    if not torch.allclose(acc, want, rtol=1e-4, atol=1e-3):
        raise RuntimeError("torch.addmm(acc, ..., out_dtype=torch.float32, out=acc) differs from the upcast product")


def mm_out_dtype_probe(device) -> tuple[bool, str]:
    """(works, why not) for cuBLAS bf16/fp16 GEMMs that write fp32 on device (torch >= 2.8:
    ``torch.mm(a, b, out_dtype=torch.float32)`` and the same for ``addmm`` into an fp32 accumulator, CUDA only).
    Probed once per device; where it fails (an older torch, a cuBLAS without it) the chunked backward upcasts its
    operands instead, which is exact but slower and holds fp32 copies: that is warned about once."""
    device = torch.device(device)
    key = str(device)
    if key not in _MM_OUT_DTYPE:
        if device.type != "cuda":
            _MM_OUT_DTYPE[key] = (False, "not a CUDA device (the operands are upcast; exact)")
        else:
            try:
                _probe_mm_out_dtype(device)
                _MM_OUT_DTYPE[key] = (True, "")
            except Exception as err:  # any failure: the upcast fallback is exact
                why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
                _MM_OUT_DTYPE[key] = (False, why)
                warnings.warn(
                    f"fused_clip_loss on {key}: 16-bit GEMMs with fp32 output (torch.mm / torch.addmm with "
                    f"out_dtype=torch.float32, torch {torch.__version__}) failed their probe ({why}). The chunked "
                    f"backward upcasts its operands to fp32 instead: same result, but slower and with fp32 copies of "
                    f"the gathered texts and of each dX chunk. Use a torch whose CUDA mm takes out_dtype (>= 2.8), or "
                    f"the fused backward kernels (contrastive.tile_config(bwd_chunk=0)).", stacklevel=3)
    return _MM_OUT_DTYPE[key]


def _mm_out_dtype_works(device) -> bool:
    """Whether 16-bit GEMMs with fp32 output work on device (``mm_out_dtype_probe``)."""
    return mm_out_dtype_probe(device)[0]


def _mm_f32(a, b, acc=None):
    """fp32 a @ b, or acc += a @ b in place into the fp32 acc, for a and b in the features' dtype. 16-bit CUDA
    inputs: one cuBLAS GEMM with fp32 accumulation and fp32 output (no rounding to 16 bits in between). Elsewhere
    (the interpreter on CPU, fp32 inputs, a torch without out_dtype) the operands are upcast, which is exact."""
    if a.dtype != torch.float32 and a.is_cuda and _mm_out_dtype_works(a.device):
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if acc is None:
        return torch.mm(a.float(), b.float())
    return acc.addmm_(a.float(), b.float())


def _chunked_backward(image, all_text, scale32, row_lse, col_lse, wr, wc, label_offset, k):
    """bwd_chunk > 0: (b, D) dI in the input dtype and the (N, D) fp32 dT of the gathered texts, both times k.

    For each chunk of c local rows: a Triton kernel recomputes the logits tile by tile and writes the
    normalised dX (c, N) in the input dtype (the dtype the fused kernels feed their MMAs too), then two cuBLAS
    GEMMs with fp32 accumulation: dI[chunk] = dX @ T_all (c x N x D) and dT += dX^T @ I[chunk] (N x c x D, into
    the fp32 dT). 3 GEMM passes (1 Triton, 2 cuBLAS) instead of the fused design's 4 Triton ones, at the cost of
    writing and twice reading dX (6 bytes per logit in 16 bits). Extra memory: one (c, N) dX buffer, freed
    before the caller casts dT; with c <= D it is no larger than the returned dT, so the peak is unchanged."""
    b, D = image.shape
    N = all_text.shape[0]
    cfg = _config(image)
    c = max(1, min(cfg["bwd_chunk"], b))
    BM, BN, BK = cfg["g_bm"], cfg["g_bn"], cfg["g_bk"]
    dX = torch.empty(c, N, device=image.device, dtype=image.dtype)
    dI = torch.empty(b, D, device=image.device, dtype=image.dtype)
    dT = torch.zeros(N, D, device=image.device, dtype=torch.float32)
    for r0 in range(0, b, c):
        r1 = min(r0 + c, b)
        g = dX[:r1 - r0]
        _launch(_clip_dlogits_kernel, (triton.cdiv(r1 - r0, BM), triton.cdiv(N, BN)),
                image, all_text, scale32, row_lse, col_lse, wr, wc, g, r0, r1, N, D, image.stride(0),
                all_text.stride(0), label_offset, BM=BM, BN=BN, BK=BK, PREC=_precision(image.dtype),
                num_warps=cfg["g_warps"], num_stages=cfg["g_stages"], what="fused_clip_loss backward")
        dI[r0:r1] = _mm_f32(g, all_text).mul_(k)  # (c, D), cast to the input dtype on assignment
        _mm_f32(g.t(), image[r0:r1], acc=dT)  # (N, D) += (N, c) @ (c, D)
    dX = g = None  # free the (c, N) buffer before the caller's cast of dT
    return dI, dT.mul_(k)


def cublas_keeps_fp32(t: torch.Tensor) -> bool:
    """Whether a cuBLAS backward GEMM on t keeps the precision the kernels promise: not for fp32 tensors on a GPU,
    where cuBLAS would follow torch's TF32 switch (1e-3 relative error where true fp32 is asked for); 16-bit
    inputs accumulate in fp32 either way, and off a GPU the operands are upcast (``_mm_f32``)."""
    return not (t.is_cuda and t.dtype == torch.float32)


def _use_chunked_backward(image) -> bool:
    """The chunked backward runs when bwd_chunk > 0, except where cuBLAS would lose precision (fp32 features on a
    GPU keep the fused true-fp32 kernels)."""
    return _config(image)["bwd_chunk"] > 0 and cublas_keeps_fp32(image)


_PAIR_ROWS = 4096  # rows upcast at a time by _paired_dots: 2 * 4096 * D fp32 transient (16 MB at D=512)


def _paired_dots(image, text):
    """(b,) fp32 <image_i, text_i>, upcast _PAIR_ROWS rows at a time (no (b, D) fp32 copies)."""
    rows = _PAIR_ROWS
    parts = [torch.einsum("bd,bd->b", image[i:i + rows].float(), text[i:i + rows].float())
             for i in range(0, image.shape[0], rows)]
    return torch.cat(parts) if parts else image.new_zeros(0, dtype=torch.float32)


# ------------------------------------------------------------------------------- distributed pieces
def _merge_columns_across_ranks(M, L, U, group):
    """Partial column (max, sum exp, sum exp*s) over local rows -> global column LSE and E[s]."""
    if world_info(group)[1] > 1:
        Mg = M.clone()
        dist.all_reduce(Mg, op=dist.ReduceOp.MAX, group=group)
        r = torch.exp(M - Mg)
        LU = torch.stack([L * r, U * r])  # (2, N)
        dist.all_reduce(LU, op=dist.ReduceOp.SUM, group=group)
        M, L, U = Mg, LU[0], LU[1]
    return M + torch.log(L), U / L


def _sum_to_owners(dT_all, group, b):
    """(N, D) gradient of the gathered texts, summed over ranks; each rank keeps its (b, D) slice."""
    rank, world = world_info(group)
    if world == 1:
        return dT_all
    if dist.get_backend(group) == "nccl":
        out = torch.empty(b, dT_all.shape[1], device=dT_all.device, dtype=dT_all.dtype)
        dist.reduce_scatter_tensor(out, dT_all, op=dist.ReduceOp.SUM, group=group)
        return out
    dist.all_reduce(dT_all, op=dist.ReduceOp.SUM, group=group)  # gloo has no reduce_scatter_tensor
    return dT_all[rank * b:(rank + 1) * b]


# ------------------------------------------------------------------------------------------ autograd
class _FusedClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, group):
        rank, world = world_info(group)
        b = image.shape[0]
        image, text = image.contiguous(), text.contiguous()
        all_text = all_gather_no_grad(text, group)  # (N, D), N = W*b
        scale32 = scale.detach().to(device=image.device, dtype=torch.float32).reshape(1).contiguous()
        (rM, rL, rU), (cM, cL, cU) = _launch_forward(image, all_text, scale32)
        row_lse, row_e = rM + torch.log(rL), rU / rL  # (b,)
        col_lse, col_e = _merge_columns_across_ranks(cM, cL, cU, group)  # (N,)
        pos = _paired_dots(image, text)  # (b,) s_ii of the local pairs
        mine = slice(rank * b, (rank + 1) * b)
        sc = scale32[0]
        loss = ((row_lse - sc * pos).sum() + (col_lse[mine] - sc * pos).sum()) / (2 * b)
        # d loss / d scale = 1/2b [sum_i (E_row[s] - s_ii) + sum_j local (E_col[s] - s_jj)]
        dscale = ((row_e - pos).sum() + (col_e[mine] - pos).sum()) / (2 * b)
        ctx.save_for_backward(image, all_text, scale32, row_lse, col_lse, dscale)
        ctx.group, ctx.rank, ctx.world, ctx.b = group, rank, world, b
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, all_text, scale32, row_lse, col_lse, dscale = ctx.saved_tensors
        b, world = ctx.b, ctx.world
        g = grad.detach().float().reshape(1)
        g_all = g
        if world > 1:  # each text's column term belongs to its owner's loss, with the owner's upstream grad
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous(), group=ctx.group)
            g_all = torch.cat(parts)  # (W,)
        wr, wc = g / (2 * b), g_all.repeat_interleave(b) / (2 * b)  # (1,), (N,)
        norm = torch.maximum(wr.abs().max(), wc.abs().max()).clamp_min(1e-30)
        # |dX| <= 2 after the normalisation; times h = 2^14 for fp16 (stays <= 32769 < 65504), 1 otherwise
        # (see FP16_DS_HEADROOM); the fp32 products are divided by h through k (exact: a power of two)
        h = ds_headroom(image.dtype)
        launch = (image, all_text, scale32, row_lse, col_lse, (wr / norm * h).contiguous(),
                  (wc / norm * h).contiguous(), ctx.rank * b)
        k = norm * scale32[0] / h
        # Peak memory: one fp32 (.., D) buffer at a time next to the input-dtype gradients (KERNELS.md
        # §3: extra memory linear in B); the fp32 dI is freed before the dT buffer is allocated.
        if _use_chunked_backward(image):
            dI, dT32 = _chunked_backward(*launch, k)
        else:
            dI = _launch_backward("rows", *launch).mul_(k).to(image.dtype)
            dT32 = _launch_backward("cols", *launch).mul_(k)
        dT = _sum_to_owners(dT32, ctx.group, b).to(all_text.dtype)
        d_scale = (g[0] * dscale).reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return dI, dT, d_scale, None


def fused_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale, *, group=None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, fused: same signature and result as ``declip_ds.losses.clip_loss``.

    image_features, text_features: (b, D) local rows, L2-normalised, fp32 / fp16 / bf16 (same dtype).
    scale: 0-d tensor t = exp(logit_scale); gets a gradient. group: W ranks or None.
    Returns the 0-d fp32 loss of the local rows: 1/2 [CE(scale I T_all^T) + CE(scale T I_all^T)] with
    labels rank*b + arange(b). The (b, W*b) logits never exist: extra memory is the gathered texts,
    3*G*(b + W*b) floats of partial statistics (G <= 16), and in the backward one fp32 gradient
    buffer at a time ((b, D) for the images, then (W*b, D) for the gathered texts) next to the
    returned gradients; the chunked backward (16-bit on GPUs) holds the (W*b, D) fp32 one, a (512, W*b)
    dX buffer in the input dtype and a (512, D) fp32 product instead.
    Deterministic (no atomics).
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"fused_clip_loss needs image and text features of the same (b, D) shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}.")
    dt = image_features.dtype
    if dt != text_features.dtype or dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused_clip_loss takes fp32, fp16 or bf16 features of one dtype, got {image_features.dtype} "
                        f"and {text_features.dtype}; use declip_ds.losses.clip_loss for other dtypes.")
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=image_features.device)
    return _FusedClipLoss.apply(image_features, text_features, scale, group)
