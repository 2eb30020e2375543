"""FILIP's token-wise late-interaction similarity and loss (the pure-torch reference).

s_i2t[i, j] = mean over valid image tokens k of  max over valid text tokens r  of <x_ik, y_jr>
s_t2i[i, j] = mean over valid text tokens r  of  max over valid image tokens k of <x_ik, y_jr>

The similarity is computed in (image chunk x text chunk) blocks, so memory holds at most one
(ci, cj, Ti, Tt) block, never the (Bi, Bt, Ti, Tt) tensor. The backward is a custom autograd
function that *recomputes* each block and sends the gradient to the arg-max tokens only (ties go
to the lowest token index, as ``torch.max`` does), so nothing of size B^2*T is saved for backward.

Conventions shared with the Triton kernel (``declip_ds.kernels.token_max``):
- masks are bool (B, T), True = a real token; None = all real.
- a pair where either side has no valid token scores 0 (and gets no gradient).
- results are float32 for fp32/fp16/bf16 inputs and float64 for float64 inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from declip_ds.losses.gather import all_gather_no_grad, all_gather_with_grad, world_info

# elements of one (ci, cj, Ti, Tt) similarity block when chunk_size is not given (16 MB in fp32)
DEFAULT_BLOCK_ELEMENTS = 1 << 22

_DIRECTIONS = ("both", "i2t", "t2i")


def _check_inputs(x, y, x_mask, y_mask):
    if x.dim() != 3 or y.dim() != 3 or x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"filip_similarity needs image tokens (Bi, Ti, D) and text tokens (Bt, Tt, D) with the same D, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    for name, t, m in (("image_mask", x, x_mask), ("text_mask", y, y_mask)):
        if m is not None and tuple(m.shape) != tuple(t.shape[:2]):
            raise ValueError(f"{name} must be a bool (B, T) = {tuple(t.shape[:2])} tensor, got {tuple(m.shape)}.")


def token_weights(tokens: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) weights mask/n_valid: the mean over valid tokens as a weighted sum (0 for padding;
    all 0 for a sample without a valid token)."""
    B, T = tokens.shape[:2]
    if mask is None:
        return torch.full((B, T), 1.0 / T, dtype=dtype, device=tokens.device)
    m = mask.to(dtype)
    return m / m.sum(1, keepdim=True).clamp_min(1.0)


def default_chunk_size(Ti: int, Tt: int) -> int:
    """Samples per chunk on each side so that one block has at most DEFAULT_BLOCK_ELEMENTS."""
    return max(1, int(math.sqrt(DEFAULT_BLOCK_ELEMENTS / max(1, Ti * Tt))))


def _block_scores(x, y, x_valid, y_valid, need_i2t, need_t2i):
    """One block: (ci, cj, Ti, Tt) similarities and the arg-max tokens of the wanted directions.

    Returns (i2t max (ci, cj, Ti), i2t arg-max r, t2i max (ci, cj, Tt), t2i arg-max k); unwanted
    entries are None. A max over no valid token is -inf."""
    s = torch.einsum("ikd,jrd->ijkr", x, y)  # (ci, cj, Ti, Tt)
    v1 = a1 = v2 = a2 = None
    if need_i2t:  # max over the valid text tokens r
        v1, a1 = s.masked_fill(~y_valid[None, :, None, :], -math.inf).max(dim=3)  # (ci, cj, Ti)
    if need_t2i:  # max over the valid image tokens k
        v2, a2 = s.masked_fill(~x_valid[:, None, :, None], -math.inf).max(dim=2)  # (ci, cj, Tt)
    return v1, a1, v2, a2


def _finite(v):
    # a max over no valid token (-inf) scores 0; those pairs carry weight 0 or are defined as 0
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def _valid(tokens, mask):
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return mask.to(torch.bool)


class _FilipSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, x_mask, y_mask, chunk_size, direction):
        out_dtype = torch.promote_types(x.dtype, torch.float32)
        xc, yc = x.to(out_dtype), y.to(out_dtype)
        xv, yv = _valid(x, x_mask), _valid(y, y_mask)
        wx, wy = token_weights(x, x_mask, out_dtype), token_weights(y, y_mask, out_dtype)
        Bi, Bt = x.shape[0], y.shape[0]
        need_i2t, need_t2i = direction in ("both", "i2t"), direction in ("both", "t2i")
        s_i2t = x.new_zeros(Bi, Bt, dtype=out_dtype) if need_i2t else None
        s_t2i = x.new_zeros(Bi, Bt, dtype=out_dtype) if need_t2i else None
        c = chunk_size
        for i0 in range(0, Bi, c):
            for j0 in range(0, Bt, c):
                I, J = slice(i0, i0 + c), slice(j0, j0 + c)
                v1, _, v2, _ = _block_scores(xc[I], yc[J], xv[I], yv[J], need_i2t, need_t2i)
                if need_i2t:  # mean over image tokens k of the per-k maxima
                    s_i2t[I, J] = torch.einsum("ijk,ik->ij", _finite(v1), wx[I])
                if need_t2i:  # mean over text tokens r
                    s_t2i[I, J] = torch.einsum("ijr,jr->ij", _finite(v2), wy[J])
        ctx.save_for_backward(x, y, x_mask, y_mask)
        ctx.chunk_size, ctx.direction = chunk_size, direction
        return s_i2t, s_t2i

    @staticmethod
    def backward(ctx, g1, g2):
        x, y, x_mask, y_mask = ctx.saved_tensors
        dtype = torch.promote_types(x.dtype, torch.float32)
        xc, yc = x.to(dtype), y.to(dtype)
        xv, yv = _valid(x, x_mask), _valid(y, y_mask)
        wx, wy = token_weights(x, x_mask, dtype), token_weights(y, y_mask, dtype)
        need_i2t = g1 is not None and ctx.direction in ("both", "i2t")
        need_t2i = g2 is not None and ctx.direction in ("both", "t2i")
        dx, dy = torch.zeros_like(xc), torch.zeros_like(yc)
        c, (Bi, Ti), (Bt, Tt) = ctx.chunk_size, x.shape[:2], y.shape[:2]
        for i0 in range(0, Bi, c):
            for j0 in range(0, Bt, c):
                I, J = slice(i0, i0 + c), slice(j0, j0 + c)
                v1, a1, v2, a2 = _block_scores(xc[I], yc[J], xv[I], yv[J], need_i2t, need_t2i)
                ds = xc.new_zeros(xc[I].shape[0], yc[J].shape[0], Ti, Tt)  # (ci, cj, Ti, Tt), one-hot
                if need_i2t:  # d s_i2t[i,j] / d s[i,j,k,r*] = w_i[k], zero where no text token is valid
                    w = g1[I, J].to(dtype)[:, :, None] * wx[I][:, None, :] * torch.isfinite(v1)
                    ds.scatter_add_(3, a1.unsqueeze(3), w.unsqueeze(3))
                if need_t2i:  # d s_t2i[i,j] / d s[i,j,k*,r] = w_j[r]
                    w = g2[I, J].to(dtype)[:, :, None] * wy[J][None, :, :] * torch.isfinite(v2)
                    ds.scatter_add_(2, a2.unsqueeze(2), w.unsqueeze(2))
                dx[I] += torch.einsum("ijkr,jrd->ikd", ds, yc[J])
                dy[J] += torch.einsum("ijkr,ikd->jrd", ds, xc[I])
        return dx.to(x.dtype), dy.to(y.dtype), None, None, None, None


def filip_similarity(image_tokens: torch.Tensor, text_tokens: torch.Tensor, image_mask: torch.Tensor | None = None,
                     text_mask: torch.Tensor | None = None, *, chunk_size: int | None = None,
                     direction: str = "both"):
    """FILIP's two token-wise similarity matrices, chunked and differentiable.

    image_tokens: (Bi, Ti, D), text_tokens: (Bt, Tt, D), L2-normalised per token.
    image_mask: bool (Bi, Ti), text_mask: bool (Bt, Tt), True = a real token (None = all real).
    chunk_size: samples per block on each side (default: blocks of at most 2**22 similarities).
    direction: "both", or "i2t" / "t2i" to compute only one matrix (the other is returned as None).
    Returns (s_i2t, s_t2i), each (Bi, Bt), float32 (float64 for float64 inputs):
      s_i2t[i, j] = mean over valid image tokens k of max over valid text tokens r of <x_ik, y_jr>
      s_t2i[i, j] = mean over valid text tokens r of max over valid image tokens k of <x_ik, y_jr>
    The backward recomputes each block and routes the gradient through the arg-max tokens
    (lowest index on ties). A pair where a side has no valid token scores 0.
    """
    _check_inputs(image_tokens, text_tokens, image_mask, text_mask)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}.")
    if chunk_size is None:
        chunk_size = default_chunk_size(image_tokens.shape[1], text_tokens.shape[1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of samples, got {chunk_size}.")
    return _FilipSimilarity.apply(image_tokens, text_tokens, image_mask, text_mask, int(chunk_size), direction)


def _gather_mask(mask, group):
    if mask is None:
        return None
    # gloo cannot gather bool tensors: travel as uint8
    return all_gather_no_grad(mask.to(torch.uint8), group).to(torch.bool)


def filip_loss(image_tokens: torch.Tensor, text_tokens: torch.Tensor, scale: torch.Tensor,
               image_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, *, group=None,
               similarity=None, chunk_size: int | None = None) -> torch.Tensor:
    """FILIP's symmetric cross-entropy over token-wise similarities, local rows vs all-gathered columns.

    image_tokens (b, Ti, D), text_tokens (b, Tt, D): local samples, L2-normalised per token.
    scale: the multiplier (0-d tensor), e.g. exp(logit_scale_dense).
    masks: bool (b, T), True = a real token. group: W ranks, or None for one process.
    similarity: a function with ``filip_similarity``'s signature and ``direction`` keyword
      (``filip_similarity`` by default, or ``declip_ds.kernels.token_max_similarity``).
    image->text: local images vs all W*b texts with s_i2t; text->image: local texts vs all W*b
    images with s_t2i; labels rank*b + arange(b). Returns the mean of the two fp32 cross-entropies of
    the local rows (float64 for float64 tokens); the all-gather's backward sums, so DeepSpeed's
    gradient averaging gives the global-batch gradient, as for ``clip_loss``.
    """
    if image_tokens.shape[0] != text_tokens.shape[0]:
        raise ValueError(f"filip_loss needs as many images as texts, got {image_tokens.shape[0]} and "
                         f"{text_tokens.shape[0]}.")
    kwargs = {} if similarity is not None else {"chunk_size": chunk_size}
    similarity = similarity or filip_similarity
    rank, world = world_info(group)
    b = image_tokens.shape[0]
    if world == 1:
        s_i2t, s_t2i = similarity(image_tokens, text_tokens, image_mask, text_mask, **kwargs)  # (b, b) each
        logits_t2i_raw = s_t2i.t()
    else:
        all_img = all_gather_with_grad(image_tokens, group)  # (W*b, Ti, D)
        all_txt = all_gather_with_grad(text_tokens, group)  # (W*b, Tt, D)
        all_img_mask, all_txt_mask = _gather_mask(image_mask, group), _gather_mask(text_mask, group)
        s_i2t, _ = similarity(image_tokens, all_txt, image_mask, all_txt_mask, direction="i2t", **kwargs)  # (b, W*b)
        _, s_t2i = similarity(all_img, text_tokens, all_img_mask, text_mask, direction="t2i", **kwargs)  # (W*b, b)
        logits_t2i_raw = s_t2i.t()  # (b, W*b): local texts vs all images
    dtype = torch.promote_types(s_i2t.dtype, torch.float32)
    labels = torch.arange(b, device=image_tokens.device) + rank * b  # (b,)
    sc = scale.to(dtype)
    loss_i2t = F.cross_entropy(sc * s_i2t.to(dtype), labels)
    loss_t2i = F.cross_entropy(sc * logits_t2i_raw.to(dtype), labels)
    return 0.5 * (loss_i2t + loss_t2i)


def select_pair_tokens(tokens: torch.Tensor, partner: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                       partner_mask: torch.Tensor | None = None):
    """The DeCLIP reference's token selection: per sample i, the k tokens of ``tokens[i]`` with the
    largest summed similarity to the tokens of its own pair ``partner[i]``.

    tokens (b, T, D), partner (b, T', D); masks bool (b, T) / (b, T'), True = real token.
    Returns (selected (b, k', D), selected_mask (b, k') or None), k' = min(k, T); padded tokens are
    never preferred over real ones and are flagged False in the returned mask.
    """
    with torch.no_grad():
        sim = torch.einsum("btd,bsd->bts", tokens.float(), partner.float())  # (b, T, T')
        if partner_mask is not None:
            sim = sim * partner_mask[:, None, :].to(sim.dtype)
        score = sim.sum(dim=-1)  # (b, T)
        if mask is not None:
            score = score.masked_fill(~mask, float("-inf"))
        idx = score.topk(min(k, tokens.shape[1]), dim=-1).indices.sort(dim=-1).values  # (b, k') in token order
    selected = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))  # (b, k', D)
    return selected, (torch.gather(mask, 1, idx) if mask is not None else None)


def filip_topk_loss(image_tokens: torch.Tensor, text_tokens: torch.Tensor, scale: torch.Tensor, k: int,
                    image_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, *, group=None,
                    similarity=None) -> torch.Tensor:
    """FILIP as the DeCLIP reference code computes it: only the top-``k`` tokens of each sample
    (``select_pair_tokens``) are all-gathered; the query side keeps all its tokens.

    image->text: every local image token, max over the k selected tokens of each (gathered) text;
    text->image: every local text token, max over the k selected tokens of each (gathered) image.
    Same reduction convention as ``filip_loss``.
    """
    similarity = similarity or filip_similarity
    rank, _ = world_info(group)
    b = image_tokens.shape[0]
    img_sel, img_sel_mask = select_pair_tokens(image_tokens, text_tokens, k, image_mask, text_mask)  # (b, k, D)
    txt_sel, txt_sel_mask = select_pair_tokens(text_tokens, image_tokens, k, text_mask, image_mask)  # (b, k, D)
    all_img_sel = all_gather_with_grad(img_sel, group)  # (W*b, k, D)
    all_txt_sel = all_gather_with_grad(txt_sel, group)  # (W*b, k, D)
    all_img_mask, all_txt_mask = _gather_mask(img_sel_mask, group), _gather_mask(txt_sel_mask, group)
    s_i2t, _ = similarity(image_tokens, all_txt_sel, image_mask, all_txt_mask, direction="i2t")  # (b, W*b)
    _, s_t2i = similarity(all_img_sel, text_tokens, all_img_mask, text_mask, direction="t2i")  # (W*b, b)
    dtype = torch.promote_types(s_i2t.dtype, torch.float32)
    labels = torch.arange(b, device=image_tokens.device) + rank * b  # (b,)
    sc = scale.to(dtype)
    return 0.5 * (F.cross_entropy(sc * s_i2t.to(dtype), labels) + F.cross_entropy(sc * s_t2i.t().to(dtype), labels))
