"""FILIP token-wise max similarity in Triton: both directions from one [Bi*Ti x D] . [D x Bt*Tt] tile.

Tiling ("sample-packed tiles"): a row tile holds IB = BM // Ti whole images (IB*Ti flattened image
tokens, the rest of the BM rows masked), a column tile JB = BN // Tt whole texts. Because a tile
holds whole samples on both sides, every max of both directions is complete inside one tile: the
epilogue is a segmented max (per text over columns for s_i2t, per image over rows for s_t2i)
followed by a segmented weighted sum (the mean over valid tokens), written once per (i, j) pair -
no carries between tiles, no atomics, deterministic, and no (B, B, Ti, Tt) buffer.
(BM, BN) are chosen per shape to waste the fewest rows/columns within an area budget. On a GPU the
budget is 64 x 128 (8 warps): larger tiles make the backward's arg-max epilogue spill registers on
sm_90 (``python -m declip_ds.kernels.compile_check`` measures it), e.g. Ti=50, Tt=77 -> 64 x 128 (one
image, one text, 47% used; 64 x 256 would use 70% but spills), Ti=49, Tt=16 -> 256 x 32 (5 images,
2 texts, 96%); a sample longer than the budget gets the smallest tile that holds it (Ti=197 -> 256 x 128).
A GPU tile also holds at most 8 samples (IB + JB): the backward epilogue passes over the tile once per
sample, so short sequences packed 50 to a tile cost more in the epilogue than in the MMA and spill
(Ti=20, Tt=16 -> 64 x 64, 3 images x 4 texts, instead of 512 x 16 with 25 images).

Forward program order: one program per (row tile, column tile), numbered in bands of ``group`` row tiles
(32 on a GPU) with the row tile fastest inside a band, so the programs resident together share a few image
and text tiles in L2 (``_tile_of``); the 2-D grid's order, every row tile per column tile, would stream all
image tokens from HBM once per column tile.

Backward, two designs with the same result (``save_argmax``; config ``loss.filip_argmax``), each in two
implementations (``backward_design("gemm" | "kernels")``, fixed at the forward; "gemm" is the default):
* **recompute** (default; nothing of size B^2*T is kept between forward and backward).
  - "gemm": for a chunk of images the forward kernel runs again with SAVE on that chunk against all texts
    (same tiles, chunk a multiple of the images per tile: the same score bits, so the forward's arg-max),
    giving the chunk's arg-max indices; torch scatters the two one-hot maps into a dense dS (n, Ti, Bt, Tt) in
    the input dtype (at most 128 MiB, ``_DS_CHUNK_BYTES``), and two cuBLAS GEMMs with fp32 accumulation give
    the chunk's dX = dS @ Y and add dS^T @ X_chunk into an fp32 dY buffer (``_gemm_backward``). In all 1
    forward and 2 GEMMs of the forward's size, the GEMMs at cuBLAS speed; dS costs 4 bytes of HBM traffic per
    score pair in 16 bits, the dY buffer's read-modify-write 8 bytes per text token and D column per chunk.
  - "kernels": two kernels, each recomputing S with the same helper, tile shapes and D order as the forward
    (so the recomputed arg-max is the forward's): a row-parallel kernel accumulates dX = dS @ Y over all
    column tiles, a column-parallel kernel accumulates dY = dS^T @ X over all row tiles, both into fp32
    buffers in global memory (read and written per tile in BK-wide D chunks). In all 4 GEMMs of the
    forward's size (S again and dS times the tokens, in each kernel), plus the arg-max reductions; timed at
    ~460 ms for the backward at B=1024, Ti=50, Tt=77 on an H200 (~10x its MMA time).
* **save** (``save_argmax=True``): the forward also writes each token's arg-max token in every other
  sample (Bi*Bt*(Ti+Tt) bytes, uint8; int16 past 255 tokens), and the backward reads those tables
  instead of recomputing S.
  - "gemm": dS chunks scattered from the saved tables and cuBLAS GEMMs as above, without the forward re-run,
    one pass over image chunks for dX and one over text chunks for dY (no fp32 buffer).
    The tiles are then the forward's alone (a 64 x 256 forward tile holds 3 texts of 77: 70 % of it used,
    against 47 % at 64 x 128; no spills on sm_90; swept by benchmarks/gpu/run_all.sh).
  - "kernels": split D over programs: each program keeps a (tile rows, BD) fp32 accumulator in registers
    over the whole loop and writes its gradient block once, in the input dtype (no fp32 (B, T, D) buffer,
    no per-tile read-modify-write). In all 2 GEMMs of the forward's size (dS times the tokens), with dS
    rebuilt from the tables in registers once per D chunk; timed at ~330 ms for the backward (same shape).
  The "gemm" implementations were chosen over the kernels by that arithmetic; they are not timed on a GPU
  yet. fp32 tokens on a GPU use the kernels, and their saved design recomputes (the saved-index kernels'
  fp32 dots spill; cuBLAS would follow torch's TF32 switch; see ``saved_backward_supported`` and
  ``gemm_backward_supported``).
In both, dS is the sum of two one-hot maps:
  dS[(i,k),(j,r)] = g_i2t[i,j] w_i[k] 1[r = argmax_r'] + g_t2i[i,j] w_j[r] 1[k = argmax_k']
with ties resolved to the lowest token index (min over the positions equal to the max). The recomputing
epilogue runs in two phases so S and dS are never live together: the maxima of S are reduced into small
per-sample tables of arg-max position and weight, then dS is built from the tables (fewer register
spills on sm_90; see ``python -m declip_ds.kernels.compile_check``); the saved design reads the tables.
Padded tokens (mask False) are excluded from every max and carry weight 0, so they get exactly zero
gradient. A pair where a side has no valid token scores 0 (as in ``filip_similarity``).

Debug mode (``DECLIP_DS_DEBUG_ARGMAX=1``, recompute design): the backward re-runs the forward tiles (with
"gemm", those of each chunk) and raises unless the recomputed maxima equal the forward's bit for bit. The arg-max is a deterministic function of
the tile bits, so this asserts that the backward selects the tokens the forward used.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from declip_ds.kernels.contrastive import (_NEG, NEG, _gpu_tiles, _launch, _mm_f32, _precision, _scores_tile,
                                           cublas_keeps_fp32, ds_headroom, gpu_arch)
from declip_ds.losses.filip import _check_inputs, _DIRECTIONS, token_weights

NEG_HALF = tl.constexpr(_NEG / 2)

_override: dict = {}
_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def choose_tiles(Ti: int, Tt: int, D: int, cuda: bool, dtype: torch.dtype = torch.bfloat16, arch: int = 90,
                 gemm: bool = False) -> dict:
    """(BM, BN, BK, num_warps, num_stages, group, BD): tiles holding whole samples, picked to maximise the
    fraction of used tile area within the area budget (see the module docstring). arch: the GPU's compute
    capability (90 = Hopper, where the K and saved-backward D chunks were timed)."""
    # group: row tiles per band of the forward's program order (L2 reuse, see _tile_of)
    launch = dict(num_warps=8, num_stages=2, group=32) if cuda else dict(num_warps=4, num_stages=1, group=1)
    if _override:
        cfg = {**launch, **_override}
        return {"BD": _saved_bd(cfg["BM"], cfg["BN"], D, cuda, dtype, arch), **cfg}
    # gemm: no Triton backward kernel runs these tiles (the GEMM backward), so the forward's own limit applies:
    # 64 x 256 (Ti=50, Tt=77: 3 texts per tile, 70 % used instead of 47 %; no spills on sm_90, bf16 and fp16)
    max_area = (64 * 256 if gemm else 64 * 128) if cuda else 64 * 64
    # the backward epilogue makes one pass over the tile per sample in it (IB + JB passes): its cost per
    # pair grows with IB + JB, and many samples per tile spill (IB=51, JB=2 at Ti=10: 13 KB/thread)
    max_samples = 8 if cuda else 1 << 30
    best = None
    for BM in (16, 32, 64, 128, 256, 512):
        for BN in (16, 32, 64, 128, 256, 512):
            if BM < Ti or BN < Tt or (BM * BN > max_area and (BM > _pow2(max(Ti, 16)) or BN > _pow2(max(Tt, 16)))):
                continue  # too small for one sample, or larger than needed and over the area budget
            if BM // Ti + BN // Tt > max_samples and (BM > max(16, _pow2(Ti)) or BN > max(16, _pow2(Tt))):
                continue  # too many samples per tile (the smallest legal tile, 16 x 16 for 1-token samples, stays)
            used = (BM // Ti * Ti / BM) * (BN // Tt * Tt / BN)
            key = (round(used, 3), BM * BN)
            if best is None or key > best[0]:
                best = (key, BM, BN)
    if best is None:  # samples longer than 512 tokens: one sample per tile
        BM, BN = max(16, _pow2(Ti)), max(16, _pow2(Tt))
    else:
        BM, BN = best[1], best[2]
    # fp32 dots run on FMA units (true fp32, no tensor cores) and spill with K chunks over 16 on sm_90
    # 16-bit on Hopper: 64-wide K chunks for tiles of <= 64 rows (H200, Ti=50 Tt=77, 64 x 128: forward +
    # backward 387 ms instead of 510 with 32; no spills on sm_90), 32 for the 256-row tiles (64 spills 176 B
    # at 256 x 32) and on older cards (untimed)
    wide = arch >= 90 and BM <= 64
    BK = max(16, min((16 if dtype == torch.float32 else 64 if wide else 32) if cuda else 64, _pow2(D)))
    return dict(BM=BM, BN=BN, BK=BK, BD=_saved_bd(BM, BN, D, cuda, dtype, arch), **launch)


def _saved_bd(BM: int, BN: int, D: int, cuda: bool, dtype: torch.dtype, arch: int = 90) -> int:
    """D columns per program of the saved-arg-max backward. Its registers hold the (BM, BN) fp32 dS tile and a
    (BM or BN, BD) fp32 accumulator, and each program rebuilds dS, so BD shrinks as the tile grows:
    BM*BN*BD <= 2^20 for tiles of <= 64 rows on Hopper, else 2^19, BD <= 256: 64 x 128 -> 128,
    64 x 64 -> 256, 256 x 32 -> 64, 256 x 128 -> 16. Timed on an H200 at Ti=50 Tt=77 (64 x 128, bf16): forward +
    backward 372 ms at BD=128, 599 ms at 64, 1000 ms at 32 (``benchmarks/RESULTS.md``); the 256-row tiles are
    not timed yet. On sm_90 (``python -m declip_ds.kernels.compile_check``): bf16 spills nothing at 64 x 128,
    64 x 64 or 256 x 32 (fp16 32-64 B at 64 x 128 x 128; 256 x 32 x 128 would need 100 KB of shared memory,
    over sm_89's 99 KB); the 256 x 128 tiles of Ti=197 spill whatever BD (0.7 KB per thread at 16 in the x
    kernel, like the recomputing kernels' 0.5-0.6 KB; 0.8 KB at 32)."""
    if not cuda:
        return max(16, min(128, _pow2(D)))
    budget = (1 << (20 if arch >= 90 and BM <= 64 else 19)) // (BM * BN)
    return max(16, min(256, _pow2(D), 1 << (budget.bit_length() - 1)))


def saved_backward_supported(cuda: bool, dtype: torch.dtype) -> bool:
    """Whether save_argmax uses the saved-index backward. Not for fp32 tokens on a GPU: the saved-index kernels'
    fp32 FMA dots (K = a whole tile side) spill 4.7 KB per thread on sm_80 at 64 x 128 and 13-14 KB on sm_90 at
    256 x 128, where the recomputing kernels (K chunks of 16) spill little or nothing, and the GEMM design's cuBLAS
    would follow torch's TF32 switch; those calls recompute (same result) and warn once. Training tokens are bf16."""
    return not (cuda and dtype == torch.float32)


class tile_config:
    """Context manager forcing (BM, BN, BK) and optionally num_warps / num_stages / group (row tiles per band of
    the forward's program order) / BD (D columns per saved-arg-max backward program); BM >= Ti and BN >= Tt
    still required."""

    def __init__(self, BM: int, BN: int, BK: int, num_warps: int | None = None, num_stages: int | None = None,
                 group: int | None = None, BD: int | None = None):
        self.cfg = dict(BM=BM, BN=BN, BK=BK)
        opt = (("num_warps", num_warps), ("num_stages", num_stages), ("group", group), ("BD", BD))
        self.cfg.update({k: v for k, v in opt if v is not None})

    def __enter__(self):
        self.old = dict(_override)
        _override.clear()
        _override.update(self.cfg)

    def __exit__(self, *exc):
        _override.clear()
        _override.update(self.old)


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _samples(tile, B, T, W, PER: tl.constexpr, BLK: tl.constexpr):
    """Lanes of one tile of PER whole samples: (sample slot, sample, flattened token, in range, weight)."""
    lane = tl.arange(0, BLK)
    slot = lane // T
    sample = tile * PER + slot
    tok = sample * T + (lane - slot * T)
    inside = (slot < PER) & (sample < B)
    w = tl.load(W + tok, mask=inside, other=0.0)  # mask / n_valid; 0 for padding
    return slot, sample, tok, inside, w


@triton.jit
def _tile_of(pid, n_p, n_q, GROUP: tl.constexpr):
    """Program id -> (row tile p, column tile q) in bands of GROUP row tiles, the row tile fastest within a
    band: the programs resident at one time share GROUP image tiles and a few text tiles, so both stay in
    L2. (Row-tile-fastest over all n_p, as a 2-D grid launches, cycles every image tile through L2 once
    per text tile: n_q passes over all image tokens, 53 GB at B=1024, Ti=50, D=512 in bf16.)"""
    band = GROUP * n_q
    first = (pid // band) * GROUP
    rows = tl.minimum(n_p - first, GROUP)
    local = pid % band
    return first + local % rows, local // rows


@triton.jit
def _first_argmax(s, sel, best, idx, AXIS: tl.constexpr, NONE: tl.constexpr):
    """Lowest index along AXIS (1: columns, 0: rows) where the selected entries of s equal their maximum
    ``best``; NONE where nothing is selected. The one tie rule of the forward's saved indices and the
    backward's recomputed ones."""
    if AXIS == 1:
        first = tl.min(tl.where(sel & (s == best[:, None]), idx[None, :], NONE), 1)
    else:
        first = tl.min(tl.where(sel & (s == best[None, :]), idx[:, None], NONE), 0)
    return first


@triton.jit
def _tm_fwd_kernel(X, Y, WX, WY, O1, O2, A1, A2, Bi, Bt, TI, TT, D, n_p, n_q,
                   IB: tl.constexpr, JB: tl.constexpr, IB_P: tl.constexpr, JB_P: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                   NEED_I2T: tl.constexpr, NEED_T2I: tl.constexpr, SAVE: tl.constexpr, GROUP: tl.constexpr):
    p, q = _tile_of(tl.program_id(0), n_p, n_q, GROUP)
    ri, rimg, rtok, rin, rw = _samples(p, Bi, TI, WX, IB, BM)
    cj, ctxt, ctok, cin, cw = _samples(q, Bt, TT, WY, JB, BN)
    s = _scores_tile(X, Y, rtok, ctok, rin, cin, D, D, D, BM, BN, BK, PREC)  # (BM, BN)
    if NEED_I2T:
        islot = tl.arange(0, IB_P)
        oi = p * IB + islot
        cidx = tl.arange(0, BN)
        for jj in tl.static_range(JB):
            cols = ((cj == jj) & (cw > 0))[None, :]
            rmax = tl.max(tl.where(cols, s, NEG), 1)  # (BM,) max over text jj
            contrib = tl.where(rmax > NEG_HALF, rmax, 0.0) * rw
            val = tl.sum(tl.where(ri[None, :] == islot[:, None], contrib[None, :], 0.0), 1)  # (IB_P,)
            oj = q * JB + jj
            tl.store(O1 + oi * Bt + oj, val, mask=(islot < IB) & (oi < Bi) & (oj < Bt))
            if SAVE:  # the arg-max text token per image token, as the backward's recompute would pick it
                first = _first_argmax(s, cols, rmax, cidx, 1, BN)  # (BM,)
                r = tl.where(rmax > NEG_HALF, first - jj * TT, TT)  # token in text oj; TT = none valid
                tl.store(A1 + oj.to(tl.int64) * Bi * TI + rtok, r.to(A1.dtype.element_ty), mask=rin & (oj < Bt))
    if NEED_T2I:
        jslot = tl.arange(0, JB_P)
        oj = q * JB + jslot
        ridx = tl.arange(0, BM)
        for ii in tl.static_range(IB):
            rows = ((ri == ii) & (rw > 0))[:, None]
            cmax = tl.max(tl.where(rows, s, NEG), 0)  # (BN,) max over image ii
            contrib = tl.where(cmax > NEG_HALF, cmax, 0.0) * cw
            val = tl.sum(tl.where(cj[None, :] == jslot[:, None], contrib[None, :], 0.0), 1)  # (JB_P,)
            oi = p * IB + ii
            tl.store(O2 + oi * Bt + oj, val, mask=(jslot < JB) & (oj < Bt) & (oi < Bi))
            if SAVE:  # the arg-max image token per text token
                first = _first_argmax(s, rows, cmax, ridx, 0, BM)  # (BN,)
                r = tl.where(cmax > NEG_HALF, first - ii * TI, TI)  # token in image oi; TI = none valid
                tl.store(A2 + oi.to(tl.int64) * Bt * TT + ctok, r.to(A2.dtype.element_ty), mask=cin & (oi < Bi))


@triton.jit
def _tm_dscores(s, p, q, ri, rimg, rin, rw, cj, ctxt, cin, cw, G1, G2, Bi, Bt,
                IB: tl.constexpr, JB: tl.constexpr, IB_P: tl.constexpr, JB_P: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, NEED_I2T: tl.constexpr, NEED_T2I: tl.constexpr):
    """d(sum g1*s_i2t + g2*s_t2i)/dS for one tile: one-hot at the arg-max (lowest index on ties).

    Two phases so that S and dS are never live together (one (BM, BN) fp32 tile fewer in registers):
    the reductions over S first, kept as small (BM, JB_P) / (IB_P, BN) tables of arg-max position and
    weight per sample; then dS is built from the tables alone."""
    ridx = tl.arange(0, BM)
    cidx = tl.arange(0, BN)
    jslot = tl.arange(0, JB_P)
    islot = tl.arange(0, IB_P)
    # phase 1: per (row, text) and (image, column) arg-max positions and weights; the last uses of S
    pos1 = tl.full((BM, JB_P), BN, tl.int32)
    w1 = tl.zeros((BM, JB_P), tl.float32)
    pos2 = tl.full((IB_P, BN), BM, tl.int32)
    w2 = tl.zeros((IB_P, BN), tl.float32)
    if NEED_I2T:
        for jj in tl.static_range(JB):
            cols = ((cj == jj) & (cw > 0))[None, :]
            rmax = tl.max(tl.where(cols, s, NEG), 1)  # (BM,) max over text jj's valid tokens
            first = _first_argmax(s, cols, rmax, cidx, 1, BN)  # (BM,)
            oj = q * JB + jj
            g = tl.load(G1 + rimg * Bt + oj, mask=rin & (oj < Bt), other=0.0) * rw
            g = tl.where(rmax > NEG_HALF, g, 0.0)
            pos1 = tl.where(jslot[None, :] == jj, first[:, None], pos1)
            w1 = tl.where(jslot[None, :] == jj, g[:, None], w1)
    if NEED_T2I:
        for ii in tl.static_range(IB):
            rows = ((ri == ii) & (rw > 0))[:, None]
            cmax = tl.max(tl.where(rows, s, NEG), 0)  # (BN,) max over image ii's valid tokens
            first = _first_argmax(s, rows, cmax, ridx, 0, BM)  # (BN,)
            oi = p * IB + ii
            g = tl.load(G2 + oi * Bt + ctxt, mask=cin & (oi < Bi), other=0.0) * cw
            g = tl.where(cmax > NEG_HALF, g, 0.0)
            pos2 = tl.where(islot[:, None] == ii, first[None, :], pos2)
            w2 = tl.where(islot[:, None] == ii, g[None, :], w2)
    return _tm_ds_from_tables(pos1, w1, pos2, w2, IB, JB, IB_P, JB_P, BM, BN, NEED_I2T, NEED_T2I)


@triton.jit
def _tm_ds_from_tables(pos1, w1, pos2, w2, IB: tl.constexpr, JB: tl.constexpr, IB_P: tl.constexpr,
                       JB_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       NEED_I2T: tl.constexpr, NEED_T2I: tl.constexpr):
    """Phase 2: the (BM, BN) fp32 dS of one tile from the arg-max tables: pos1/w1 (BM, JB_P), the column of
    each row's arg-max in text slot jj and its weight; pos2/w2 (IB_P, BN), the row of each column's arg-max
    in image slot ii and its weight."""
    ridx = tl.arange(0, BM)
    cidx = tl.arange(0, BN)
    jslot = tl.arange(0, JB_P)
    islot = tl.arange(0, IB_P)
    ds = tl.zeros((BM, BN), dtype=tl.float32)
    if NEED_I2T:
        for jj in tl.static_range(JB):
            first = tl.sum(tl.where(jslot[None, :] == jj, pos1, 0), 1)  # (BM,)
            g = tl.sum(tl.where(jslot[None, :] == jj, w1, 0.0), 1)
            ds += tl.where(cidx[None, :] == first[:, None], g[:, None], 0.0)
    if NEED_T2I:
        for ii in tl.static_range(IB):
            first = tl.sum(tl.where(islot[:, None] == ii, pos2, 0), 0)  # (BN,)
            g = tl.sum(tl.where(islot[:, None] == ii, w2, 0.0), 0)
            ds += tl.where(ridx[:, None] == first[None, :], g[None, :], 0.0)
    return ds


@triton.jit
def _tm_saved_tables(A1, A2, G1, G2, p, q, rimg, rtok, rin, rw, ctxt, ctok, cin, cw, Bi, Bt, TI, TT,
                     IB: tl.constexpr, JB: tl.constexpr, IB_P: tl.constexpr, JB_P: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, NEED_I2T: tl.constexpr, NEED_T2I: tl.constexpr):
    """Phase 1 without S: the arg-max tables of one tile read back from the forward's saved indices
    (A1: (Bt, Bi*Ti) text token per image token, A2: (Bi, Bt*Tt) image token per text token; T = none)."""
    jslot = tl.arange(0, JB_P)
    islot = tl.arange(0, IB_P)
    pos1 = tl.full((BM, JB_P), BN, tl.int32)
    w1 = tl.zeros((BM, JB_P), tl.float32)
    pos2 = tl.full((IB_P, BN), BM, tl.int32)
    w2 = tl.zeros((IB_P, BN), tl.float32)
    if NEED_I2T:
        oj = q * JB + jslot  # (JB_P,) texts of this column tile
        ok = rin[:, None] & ((jslot < JB) & (oj < Bt))[None, :]  # (BM, JB_P)
        r = tl.load(A1 + oj.to(tl.int64)[None, :] * Bi * TI + rtok[:, None], mask=ok, other=0).to(tl.int32)
        g = tl.load(G1 + rimg[:, None] * Bt + oj[None, :], mask=ok, other=0.0) * rw[:, None]
        hit = ok & (r < TT)
        pos1 = tl.where(hit, jslot[None, :] * TT + r, BN)  # column in the tile
        w1 = tl.where(hit, g, 0.0)
    if NEED_T2I:
        oi = p * IB + islot  # (IB_P,) images of this row tile
        ok = ((islot < IB) & (oi < Bi))[:, None] & cin[None, :]  # (IB_P, BN)
        r = tl.load(A2 + oi.to(tl.int64)[:, None] * Bt * TT + ctok[None, :], mask=ok, other=0).to(tl.int32)
        g = tl.load(G2 + oi[:, None] * Bt + ctxt[None, :], mask=ok, other=0.0) * cw[None, :]
        hit = ok & (r < TI)
        pos2 = tl.where(hit, islot[:, None] * TI + r, BM)  # row in the tile
        w2 = tl.where(hit, g, 0.0)
    return pos1, w1, pos2, w2


@triton.jit
def _tm_bwd_x_kernel(X, Y, WX, WY, G1, G2, DX, Bi, Bt, TI, TT, D, n_col_tiles,
                     IB: tl.constexpr, JB: tl.constexpr, IB_P: tl.constexpr, JB_P: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     PREC: tl.constexpr, NEED_I2T: tl.constexpr, NEED_T2I: tl.constexpr):
    p = tl.program_id(0)
    ri, rimg, rtok, rin, rw = _samples(p, Bi, TI, WX, IB, BM)
    ks = tl.arange(0, BK)
    for q in range(0, n_col_tiles):
        cj, ctxt, ctok, cin, cw = _samples(q, Bt, TT, WY, JB, BN)
        s = _scores_tile(X, Y, rtok, ctok, rin, cin, D, D, D, BM, BN, BK, PREC)
        ds = _tm_dscores(s, p, q, ri, rimg, rin, rw, cj, ctxt, cin, cw, G1, G2, Bi, Bt,
                         IB, JB, IB_P, JB_P, BM, BN, NEED_I2T, NEED_T2I).to(Y.dtype.element_ty)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            km = kk < D
            y = tl.load(Y + ctok.to(tl.int64)[:, None] * D + kk[None, :], mask=cin[:, None] & km[None, :], other=0.0)
            ptr = DX + rtok.to(tl.int64)[:, None] * D + kk[None, :]
            m2 = rin[:, None] & km[None, :]
            tl.store(ptr, tl.dot(ds, y, tl.load(ptr, mask=m2, other=0.0), input_precision=PREC), mask=m2)


@triton.jit
def _tm_bwd_y_kernel(X, Y, WX, WY, G1, G2, DY, Bi, Bt, TI, TT, D, n_row_tiles,
                     IB: tl.constexpr, JB: tl.constexpr, IB_P: tl.constexpr, JB_P: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     PREC: tl.constexpr, NEED_I2T: tl.constexpr, NEED_T2I: tl.constexpr):
    q = tl.program_id(0)
    cj, ctxt, ctok, cin, cw = _samples(q, Bt, TT, WY, JB, BN)
    ks = tl.arange(0, BK)
    for p in range(0, n_row_tiles):
        ri, rimg, rtok, rin, rw = _samples(p, Bi, TI, WX, IB, BM)
        s = _scores_tile(X, Y, rtok, ctok, rin, cin, D, D, D, BM, BN, BK, PREC)
        ds = _tm_dscores(s, p, q, ri, rimg, rin, rw, cj, ctxt, cin, cw, G1, G2, Bi, Bt,
                         IB, JB, IB_P, JB_P, BM, BN, NEED_I2T, NEED_T2I)
        dst = tl.trans(ds).to(X.dtype.element_ty)  # (BN, BM)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            km = kk < D
            x = tl.load(X + rtok.to(tl.int64)[:, None] * D + kk[None, :], mask=rin[:, None] & km[None, :], other=0.0)
            ptr = DY + ctok.to(tl.int64)[:, None] * D + kk[None, :]
            m2 = cin[:, None] & km[None, :]
            tl.store(ptr, tl.dot(dst, x, tl.load(ptr, mask=m2, other=0.0), input_precision=PREC), mask=m2)


@triton.jit
def _tm_bwd_x_saved_kernel(Y, WX, WY, A1, A2, G1, G2, DX, norm_ptr, Bi, Bt, TI, TT, D, n_col_tiles,
                           IB: tl.constexpr, JB: tl.constexpr, IB_P: tl.constexpr, JB_P: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                           PREC: tl.constexpr, NEED_I2T: tl.constexpr, NEED_T2I: tl.constexpr):
    """dX[row tile p, D columns of chunk c] = norm * sum over all column tiles of dS @ Y, dS from the saved
    arg-max (no S, no recompute): the (BM, BD) fp32 accumulator stays in registers, written once in X's dtype."""
    p = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = d < D
    ri, rimg, rtok, rin, rw = _samples(p, Bi, TI, WX, IB, BM)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for q in range(0, n_col_tiles):
        cj, ctxt, ctok, cin, cw = _samples(q, Bt, TT, WY, JB, BN)
        pos1, w1, pos2, w2 = _tm_saved_tables(A1, A2, G1, G2, p, q, rimg, rtok, rin, rw, ctxt, ctok, cin, cw,
                                              Bi, Bt, TI, TT, IB, JB, IB_P, JB_P, BM, BN, NEED_I2T, NEED_T2I)
        ds = _tm_ds_from_tables(pos1, w1, pos2, w2, IB, JB, IB_P, JB_P, BM, BN, NEED_I2T, NEED_T2I)
        y = tl.load(Y + ctok.to(tl.int64)[:, None] * D + d[None, :], mask=cin[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(ds.to(Y.dtype.element_ty), y, acc, input_precision=PREC)  # (BM, BD)
    norm = tl.load(norm_ptr)
    tl.store(DX + rtok.to(tl.int64)[:, None] * D + d[None, :], (acc * norm).to(DX.dtype.element_ty),
             mask=rin[:, None] & dm[None, :])


@triton.jit
def _tm_bwd_y_saved_kernel(X, WX, WY, A1, A2, G1, G2, DY, norm_ptr, Bi, Bt, TI, TT, D, n_row_tiles,
                           IB: tl.constexpr, JB: tl.constexpr, IB_P: tl.constexpr, JB_P: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                           PREC: tl.constexpr, NEED_I2T: tl.constexpr, NEED_T2I: tl.constexpr):
    """dY[column tile q, D chunk] = norm * sum over all row tiles of dS^T @ X, from the saved arg-max."""
    q = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = d < D
    cj, ctxt, ctok, cin, cw = _samples(q, Bt, TT, WY, JB, BN)
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for p in range(0, n_row_tiles):
        ri, rimg, rtok, rin, rw = _samples(p, Bi, TI, WX, IB, BM)
        pos1, w1, pos2, w2 = _tm_saved_tables(A1, A2, G1, G2, p, q, rimg, rtok, rin, rw, ctxt, ctok, cin, cw,
                                              Bi, Bt, TI, TT, IB, JB, IB_P, JB_P, BM, BN, NEED_I2T, NEED_T2I)
        ds = _tm_ds_from_tables(pos1, w1, pos2, w2, IB, JB, IB_P, JB_P, BM, BN, NEED_I2T, NEED_T2I)
        x = tl.load(X + rtok.to(tl.int64)[:, None] * D + d[None, :], mask=rin[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(tl.trans(ds).to(X.dtype.element_ty), x, acc, input_precision=PREC)  # (BN, BD)
    norm = tl.load(norm_ptr)
    tl.store(DY + ctok.to(tl.int64)[:, None] * D + d[None, :], (acc * norm).to(DY.dtype.element_ty),
             mask=cin[:, None] & dm[None, :])


# ---------------------------------------------------------------------------------------- launchers
def _geometry(x, y, gemm=False):
    (Bi, Ti, D), (Bt, Tt) = x.shape, y.shape[:2]
    cfg = choose_tiles(Ti, Tt, D, _gpu_tiles(x), x.dtype, gpu_arch(x), gemm=gemm)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    if BM < Ti or BN < Tt:
        raise ValueError(f"token_max tiles must hold one whole sample: BM={BM} < Ti={Ti} or BN={BN} < Tt={Tt}.")
    IB, JB = BM // Ti, BN // Tt
    return dict(Bi=Bi, Bt=Bt, TI=Ti, TT=Tt, D=D, IB=IB, JB=JB, BM=BM, BN=BN, BK=BK, BD=cfg["BD"], group=cfg["group"],
                n_p=triton.cdiv(Bi, IB), n_q=triton.cdiv(Bt, JB), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _meta(g, x, need_i2t, need_t2i, what, **tiles):
    """Constexprs and launch options shared by every token_max kernel, plus the kernel's own ``tiles``."""
    return dict(IB=g["IB"], JB=g["JB"], IB_P=_pow2(g["IB"]), JB_P=_pow2(g["JB"]), BM=g["BM"], BN=g["BN"],
                PREC=_precision(x.dtype), NEED_I2T=need_i2t, NEED_T2I=need_t2i, num_warps=g["num_warps"],
                num_stages=g["num_stages"], what=what, **tiles)


def index_dtype(Ti: int, Tt: int) -> torch.dtype:
    """dtype of the saved arg-max token indices: uint8 while every index and the "none" mark T fit."""
    return torch.uint8 if max(Ti, Tt) <= 255 else torch.int16


def _launch_forward(x, y, wx, wy, need_i2t, need_t2i, save=False, gemm=False):
    """(s_i2t, s_t2i, a_i2t, a_t2i): the (Bi, Bt) fp32 scores and, with save, the arg-max token indices
    a_i2t (Bt, Bi*Ti) (text token per image token) and a_t2i (Bi, Bt*Tt) (image token per text token).
    gemm: the tiles of the GEMM backward (see choose_tiles)."""
    g = _geometry(x, y, gemm)
    o1 = torch.zeros(g["Bi"], g["Bt"], device=x.device, dtype=torch.float32)
    o2 = torch.zeros(g["Bi"], g["Bt"], device=x.device, dtype=torch.float32)
    idt = index_dtype(g["TI"], g["TT"])
    none = torch.zeros(1, device=x.device, dtype=idt)
    a1 = torch.empty(g["Bt"], g["Bi"] * g["TI"], device=x.device, dtype=idt) if save and need_i2t else none
    a2 = torch.empty(g["Bi"], g["Bt"] * g["TT"], device=x.device, dtype=idt) if save and need_t2i else none
    _launch(_tm_fwd_kernel, (g["n_p"] * g["n_q"],),
            x, y, wx, wy, o1, o2, a1, a2, g["Bi"], g["Bt"], g["TI"], g["TT"], g["D"], g["n_p"], g["n_q"],
            **_meta(g, x, need_i2t, need_t2i, "token_max_similarity", BK=g["BK"], SAVE=bool(save),
                    GROUP=max(1, int(g["group"]))))
    return o1, o2, (a1 if save and need_i2t else None), (a2 if save and need_t2i else None)


def _launch_backward(which, x, y, wx, wy, g1, g2, need_i2t, need_t2i):
    """which="x": fp32 (Bi, Ti, D) gradient of the image tokens; "y": fp32 (Bt, Tt, D) of the text tokens.
    One at a time, so the caller can shrink the first to the input dtype before the second exists."""
    g = _geometry(x, y)
    meta = _meta(g, x, need_i2t, need_t2i, "token_max_similarity backward", BK=g["BK"])
    dims = (g["Bi"], g["Bt"], g["TI"], g["TT"], g["D"])
    if which == "x":
        dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        _launch(_tm_bwd_x_kernel, (g["n_p"],), x, y, wx, wy, g1, g2, dx, *dims, g["n_q"], **meta)
        return dx
    dy = torch.zeros(y.shape, device=y.device, dtype=torch.float32)
    _launch(_tm_bwd_y_kernel, (g["n_q"],), x, y, wx, wy, g1, g2, dy, *dims, g["n_p"], **meta)
    return dy


def _launch_backward_saved(which, x, y, wx, wy, a1, a2, g1, g2, norm, need_i2t, need_t2i):
    """which="x" / "y": the (Bi, Ti, D) / (Bt, Tt, D) token gradient in the input dtype, times norm (a (1,)
    fp32 tensor), from the saved arg-max indices; no fp32 buffer, no recomputed scores."""
    g = _geometry(x, y)
    none = torch.zeros(1, device=x.device, dtype=index_dtype(g["TI"], g["TT"]))
    meta = _meta(g, x, need_i2t, need_t2i, "token_max_similarity backward (saved arg-max)", BD=g["BD"])
    tables = (a1 if a1 is not None else none, a2 if a2 is not None else none, g1, g2)
    dims = (g["Bi"], g["Bt"], g["TI"], g["TT"], g["D"])
    n_d = triton.cdiv(g["D"], g["BD"])
    if which == "x":
        dx = torch.empty_like(x)  # every in-range token row and D column is written
        _launch(_tm_bwd_x_saved_kernel, (g["n_p"], n_d), y, wx, wy, *tables, dx, norm, *dims, g["n_q"], **meta)
        return dx
    dy = torch.empty_like(y)
    _launch(_tm_bwd_y_saved_kernel, (g["n_q"], n_d), x, wx, wy, *tables, dy, norm, *dims, g["n_p"], **meta)
    return dy


# Backward, which implementation (both designs, recompute and save): "gemm" (default: dS chunks built from
# arg-max indices by torch scatters, then cuBLAS GEMMs) or "kernels" (the Triton backward kernels above, which
# build dS tiles in registers). Tests and the benchmark switch it with ``backward_design(design)``.
_DESIGN = ["gemm"]
_DS_CHUNK_BYTES = [128 << 20]  # the GEMM backward's dS buffer: samples of one side per chunk x all of the other


class backward_design:
    """Context manager choosing the backward's implementation: "gemm" (default) or "kernels"; the one in force
    at the forward is the one its backward runs."""

    def __init__(self, design: str):
        if design not in ("gemm", "kernels"):
            raise ValueError(f"backward_design must be 'gemm' or 'kernels', got {design!r}.")
        self.design = design

    def __enter__(self):
        self.old = _DESIGN[0]
        _DESIGN[0] = self.design

    def __exit__(self, *exc):
        _DESIGN[0] = self.old


def gemm_backward_supported(x: torch.Tensor) -> bool:
    """The GEMM backward runs for 16-bit tokens on a GPU and for any tokens off one; fp32 tokens on a GPU keep the
    kernels (``cublas_keeps_fp32``)."""
    return cublas_keeps_fp32(x)


def _ds_chunk_grad(d, a_own, a_oth, g_own, g_oth, w_own, w_oth, other_tokens, norm):
    """One chunk of n own-side samples (images for dX, texts for dY): its (n, T_own, D) gradient, fp32, times norm.

    d: (n, T_own, B_oth, T_oth) buffer in the tokens' dtype (overwritten); a_own: (B_oth, n, T_own) arg-max token
    of the other sample for each own token ([other sample, own sample, own token]; T_oth = no valid token) or
    None; a_oth: (n, B_oth, T_oth) arg-max own token for each other token (T_own = none), or None; g_own / g_oth:
    (n, B_oth) normalised upstream gradients of the own / other side's direction; w_own: (n, T_own), w_oth:
    (B_oth, T_oth) token weights (mask / n_valid); other_tokens: (B_oth * T_oth, D).
    The two one-hot maps are scattered into d - "own token k of sample b, other sample c: weight g_own[b, c]
    w_own[b, k] at c's arg-max token" and "other token r of sample c: g_oth[b, c] w_oth[c, r] at b's arg-max
    token" - each one entry per (token, sample) pair, so no atomics and a deterministic result; where both hit
    one entry (a mutual arg-max) they are added in fp32 and rounded once, as the kernels do. Then one GEMM with
    fp32 accumulation: d @ other_tokens ((n T_own) x (B_oth T_oth) x D)."""
    n, T_own, B_oth, T_oth = d.shape
    d.zero_()
    if a_own is not None:  # d[b, k, c, a_own[c, b, k]] = g_own[b, c] w_own[b, k]
        idx = a_own.permute(1, 2, 0).long()  # (n, T_own, B_oth)
        val = torch.where(idx < T_oth, g_own[:, None, :] * w_own[:, :, None], 0.0)
        d.scatter_(3, idx.clamp_(max=T_oth - 1).unsqueeze(-1), val.unsqueeze(-1).to(d.dtype))
    if a_oth is not None:  # d[b, a_oth[b, c, r], c, r] += g_oth[b, c] w_oth[c, r]
        idx = a_oth.long()  # (n, B_oth, T_oth)
        val = torch.where(idx < T_own, g_oth[:, :, None] * w_oth[None, :, :], 0.0)
        idx = idx.clamp_(max=T_own - 1).unsqueeze(1)  # (n, 1, B_oth, T_oth)
        d.scatter_(1, idx, (d.gather(1, idx).float() + val.unsqueeze(1)).to(d.dtype))
    return _mm_f32(d.view(n * T_own, B_oth * T_oth), other_tokens).mul_(norm).view(n, T_own, -1)


def _gemm_backward(which, x, y, wx, wy, a1, a2, g1, g2, norm, need_i2t, need_t2i, check=None, other_acc=None):
    """which="x" / "y": the (Bi, Ti, D) / (Bt, Tt, D) token gradient in the input dtype, times norm, as GEMMs on
    dS chunks (``_ds_chunk_grad``) of n own-side samples x all of the other side (at most _DS_CHUNK_BYTES, one
    sample at least).

    The arg-max indices come from the forward's saved tables (a1 (Bt, Bi*Ti), a2 (Bi, Bt*Tt)) or, when both are
    None (the recompute design), from re-running the forward kernel with SAVE on the chunk against all of the
    other side: the same tiles, and n a multiple of the samples per tile so every sample keeps its slot, hence
    the same scores bit for bit and the same arg-max as the forward; only the chunk's indices ever exist. That
    costs one forward per pass. The GEMMs are the forward's size (2 B^2 Ti Tt D FLOPs each), dS costs 4 bytes of
    HBM traffic per score pair in 16 bits. other_acc: an fp32 (B_oth * T_oth, D) buffer into which each chunk
    also adds the other side's gradient, dS^T @ own tokens (unscaled: times norm later), so that one pass (and
    one forward re-run) gives both gradients; what the recompute design does (the buffer's read-modify-write,
    ~20 GB at B=1024, Ti=50, Tt=77: ~5 ms of HBM time (est.), against ~50 ms for a second forward). check: the forward's (s_i2t, s_t2i)
    (debug mode): each recomputed chunk's scores must equal them bit for bit. Padded tokens get weight 0 and
    are nobody's arg-max, so their gradient is exactly 0."""
    (Bi, Ti, D), (Bt, Tt) = x.shape, y.shape[:2]
    recompute = a1 is None and a2 is None
    xs = which == "x"
    own, oth, w_own, w_oth, T_own, T_oth = (x, y, wx, wy, Ti, Tt) if xs else (y, x, wy, wx, Tt, Ti)
    g_own, g_oth = (g1, g2) if xs else (g2.t(), g1.t())  # (B_own, B_oth) each (when needed)
    need_own, need_oth = (need_i2t, need_t2i) if xs else (need_t2i, need_i2t)
    B_own, B_oth = own.shape[0], oth.shape[0]
    n = max(1, min(B_own, _DS_CHUNK_BYTES[0] // max(1, T_own * B_oth * T_oth * own.element_size())))
    if recompute:
        geo = _geometry(x, y, gemm=True)
        per_tile = geo["IB"] if xs else geo["JB"]
        n = max(per_tile, n // per_tile * per_tile)
    out = torch.empty_like(own)
    d = torch.empty(min(n, B_own), T_own, B_oth, T_oth, device=own.device, dtype=own.dtype)
    other_tokens = oth.reshape(B_oth * T_oth, D)
    for s0 in range(0, B_own, n):
        s1 = min(s0 + n, B_own)
        m = s1 - s0
        if recompute:  # the chunk's indices: c1 (Bt, m*Ti) / (m, Bi*Ti), c2 (m, Bt*Tt) / (Bi, m*Tt)
            xc, yc, wxc, wyc = (x[s0:s1], y, wx[s0:s1], wy) if xs else (x, y[s0:s1], wx, wy[s0:s1])
            o1, o2, c1, c2 = _launch_forward(xc, yc, wxc, wyc, need_i2t, need_t2i, save=True, gemm=True)
            if check is not None:
                part = (slice(s0, s1), slice(None)) if xs else (slice(None), slice(s0, s1))
                _require_same_scores((o1, o2), [c[part] for c in check], (need_i2t, need_t2i))
            a_i2t = None if c1 is None else c1.view(Bt, m, Ti) if xs else c1.view(m, Bi, Ti)
            a_t2i = None if c2 is None else c2.view(m, Bt, Tt) if xs else c2.view(Bi, m, Tt)
        else:
            a_i2t = None if a1 is None else a1.view(Bt, Bi, Ti)[:, s0:s1] if xs else a1.view(Bt, Bi, Ti)[s0:s1]
            a_t2i = None if a2 is None else a2.view(Bi, Bt, Tt)[s0:s1] if xs else a2.view(Bi, Bt, Tt)[:, s0:s1]
        # the own side's map is i2t for images ([text, image, image token]), t2i for texts ([image, text, text token])
        a_own, a_oth = (a_i2t, a_t2i) if xs else (a_t2i, a_i2t)
        out[s0:s1] = _ds_chunk_grad(d[:m], a_own if need_own else None, a_oth if need_oth else None,
                                    g_own[s0:s1], g_oth[s0:s1], w_own[s0:s1], w_oth, other_tokens, norm)
        if other_acc is not None:  # (B_oth T_oth, D) += dS^T @ own tokens of the chunk
            _mm_f32(d[:m].view(m * T_own, B_oth * T_oth).t(), own[s0:s1].reshape(m * T_own, D), acc=other_acc)
    return out


def _require_same_scores(again, saved, needs):
    """Debug mode: recomputed (s_i2t, s_t2i) must equal the forward's bit for bit where needed."""
    for name, a, b, need in zip(("s_i2t", "s_t2i"), again, saved, needs):
        if need and not torch.equal(a, b):
            raise RuntimeError(f"token_max backward: recomputed {name} differs from the forward's by up to "
                               f"{(a - b).abs().max().item():.3g}: the recomputed arg-max is not the forward's.")


def _check_recompute(x, y, wx, wy, saved, direction):
    need_i2t, need_t2i = direction in ("both", "i2t"), direction in ("both", "t2i")
    _require_same_scores(_launch_forward(x, y, wx, wy, need_i2t, need_t2i)[:2], saved, (need_i2t, need_t2i))


class _TokenMaxSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, x_mask, y_mask, direction, save_argmax):
        x, y = x.contiguous(), y.contiguous()
        wx = token_weights(x, x_mask, torch.float32).contiguous()  # (Bi, Ti) mask / n_valid
        wy = token_weights(y, y_mask, torch.float32).contiguous()  # (Bt, Tt)
        need_i2t, need_t2i = direction in ("both", "i2t"), direction in ("both", "t2i")
        save = save_argmax and any(ctx.needs_input_grad[:2])  # no indices when no gradient will be asked for
        if save and not saved_backward_supported(_gpu_tiles(x), x.dtype):
            save = False
            _warn_once("token_max_similarity: save_argmax (loss.filip_argmax=save) is not used for fp32 tokens on a "
                       "GPU: the saved-index backward's fp32 dots would spill registers heavily; the recomputing "
                       "backward runs instead (same result). bf16/fp16 tokens use it.")
        gemm = _DESIGN[0] == "gemm" and gemm_backward_supported(x)  # the backward's implementation, its tiles
        o1, o2, a1, a2 = _launch_forward(x, y, wx, wy, need_i2t, need_t2i, save=save, gemm=gemm)
        ctx.save_for_backward(x, y, wx, wy, a1, a2)
        ctx.direction, ctx.saved_argmax, ctx.gemm = direction, save, gemm
        ctx.debug_out = (o1.clone(), o2.clone()) if os.environ.get("DECLIP_DS_DEBUG_ARGMAX") == "1" else None
        return (o1 if need_i2t else None), (o2 if need_t2i else None)

    @staticmethod
    def backward(ctx, g1, g2):
        x, y, wx, wy, a1, a2 = ctx.saved_tensors
        need_i2t = g1 is not None and ctx.direction in ("both", "i2t")
        need_t2i = g2 is not None and ctx.direction in ("both", "t2i")
        if not (need_i2t or need_t2i):
            return None, None, None, None, None, None
        if ctx.debug_out is not None and not ctx.saved_argmax and not ctx.gemm:
            _check_recompute(x, y, wx, wy, ctx.debug_out, ctx.direction)
        # normalise the upstream gradients so dS, cast to fp16/bf16 for the MMA, does not underflow: an entry of dS
        # is G1[i, j] w_i[k] + G2[i, j] w_j[r] (one or both one-hot maps) with |G| <= 1 after the normalisation and
        # token weights w = mask / n_valid <= 1, so |dS| <= 2. The upstream gradients are softmax probabilities of
        # the CE over the pairs, and the token weights divide them by the token count (1/50-1/197), so an fp16 dS
        # is subnormal (< 2^-14) already for P < 2^-14 * Ti (3e-3 at Ti = 50). fp16 therefore gets the headroom
        # factor h = 2^14 (|dS| h <= 32768 < 65504; 1 for bf16 and fp32: contrastive.FP16_DS_HEADROOM), and the
        # fp32 products are multiplied by norm / h (exact: a power of two) instead of norm.
        gs = [t.detach().float() for t, n in ((g1, need_i2t), (g2, need_t2i)) if n]
        norm = torch.stack([t.abs().max() for t in gs]).max().clamp_min(1e-30)
        h = ds_headroom(x.dtype)
        dummy = torch.zeros(1, device=x.device, dtype=torch.float32)
        G1 = (g1.float() / norm * h).contiguous() if need_i2t else dummy
        G2 = (g2.float() / norm * h).contiguous() if need_t2i else dummy
        norm = norm / h  # what the fp32 products are multiplied by
        if ctx.gemm:  # dS chunks from the saved or (per chunk) recomputed indices, then cuBLAS GEMMs
            args = (x, y, wx, wy, a1, a2, G1, G2, norm, need_i2t, need_t2i)
            if ctx.saved_argmax:  # one pass per side, no fp32 token buffer
                dx = _gemm_backward("x", *args) if ctx.needs_input_grad[0] else None
                dy = _gemm_backward("y", *args) if ctx.needs_input_grad[1] else None
                return dx, dy, None, None, None, None
            # recompute: one pass over image chunks (one forward re-run) gives dX and, in an fp32 buffer, dY
            (Bt, Tt, D), dy32 = y.shape, None
            if ctx.needs_input_grad[1]:
                dy32 = torch.zeros(Bt * Tt, D, device=y.device, dtype=torch.float32)
            dx = _gemm_backward("x", *args, check=ctx.debug_out, other_acc=dy32)
            dy = None if dy32 is None else dy32.mul_(norm).view(Bt, Tt, D).to(y.dtype)
            return (dx if ctx.needs_input_grad[0] else None), dy, None, None, None, None
        if ctx.saved_argmax:  # dS from the saved indices; gradients written in the input dtype, no fp32 buffer
            saved = (x, y, wx, wy, a1, a2, G1, G2, norm.reshape(1).contiguous(), need_i2t, need_t2i)
            dx = _launch_backward_saved("x", *saved) if ctx.needs_input_grad[0] else None
            dy = _launch_backward_saved("y", *saved) if ctx.needs_input_grad[1] else None
            return dx, dy, None, None, None, None
        # one fp32 token-gradient buffer at a time next to the input-dtype gradients
        dx = _launch_backward("x", x, y, wx, wy, G1, G2, need_i2t, need_t2i).mul_(norm).to(x.dtype)
        dy = _launch_backward("y", x, y, wx, wy, G1, G2, need_i2t, need_t2i).mul_(norm).to(y.dtype)
        return dx, dy, None, None, None, None


def token_max_similarity(image_tokens: torch.Tensor, text_tokens: torch.Tensor, image_mask: torch.Tensor | None = None,
                         text_mask: torch.Tensor | None = None, *, direction: str = "both",
                         save_argmax: bool = False):
    """FILIP's (s_i2t, s_t2i) in Triton; same result as ``declip_ds.losses.filip_similarity``.

    image_tokens: (Bi, Ti, D), text_tokens: (Bt, Tt, D), fp32 / fp16 / bf16, L2-normalised per token.
    image_mask: bool (Bi, Ti), text_mask: bool (Bt, Tt), True = a real token (None = all real).
    direction: "both", "i2t" or "t2i" (the skipped matrix is returned as None, its epilogue skipped).
    Returns (s_i2t, s_t2i), each (Bi, Bt) float32:
      s_i2t[i, j] = mean over valid image tokens k of max over valid text tokens r of <x_ik, y_jr>
      s_t2i[i, j] = mean over valid text tokens r of max over valid image tokens k of <x_ik, y_jr>
    save_argmax: False (default): the backward recomputes the tiles and the arg-max (lowest index on ties);
      nothing of size B^2*T is stored. True: the forward also stores the arg-max token indices (uint8, int16
      past 255 tokens: Bi*Bt*(Ti+Tt) bytes, 133 MB at B=1024, Ti=50, Tt=77) and the backward builds dS from
      them without recomputing a score (by default in chunks of at most 128 MiB multiplied with cuBLAS); same
      result.
    Accumulation is fp32. Deterministic (no atomics).
    """
    _check_inputs(image_tokens, text_tokens, image_mask, text_mask)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}.")
    dt = image_tokens.dtype
    if dt != text_tokens.dtype or dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"token_max_similarity takes fp32, fp16 or bf16 tokens of one dtype, got {dt} and "
                        f"{text_tokens.dtype}; use declip_ds.losses.filip_similarity for float64.")
    return _TokenMaxSimilarity.apply(image_tokens, text_tokens, image_mask, text_mask, direction, bool(save_argmax))
