"""Pick the torch reference or the Triton kernel for a loss, from the config's ``loss.impl``.

auto   -> triton when a CUDA device is present (and triton is installed), torch otherwise
torch  -> the pure-torch references in declip_ds.losses (any device, float64-capable)
triton -> the kernels in declip_ds.kernels; without CUDA only under TRITON_INTERPRET=1 (slow, for tests)
"""

from __future__ import annotations

import functools
import importlib.util

import torch

IMPLS = ("auto", "torch", "triton")


def resolve_impl(impl: str) -> str:
    """'auto' | 'torch' | 'triton' -> 'torch' or 'triton', or a clear error."""
    from declip_ds.kernels import triton_available

    name = str(impl).lower()
    if name not in IMPLS:
        raise ValueError(f"Unknown loss.impl {impl!r}. Allowed: {', '.join(IMPLS)}.")
    if name == "auto":
        return "triton" if torch.cuda.is_available() and importlib.util.find_spec("triton") else "torch"
    if name == "triton" and not triton_available():
        reason = ("triton is not installed" if importlib.util.find_spec("triton") is None
                  else "no CUDA device is available and TRITON_INTERPRET=1 is not set")
        raise RuntimeError(f"loss.impl=triton was requested but {reason}. Set loss.impl=torch (or auto) to use the "
                           f"pure-torch losses, or run on a GPU.")
    return name


def get_clip_loss(impl: str = "auto"):
    """The CLIP loss function for ``impl``: ``clip_loss`` or ``fused_clip_loss`` (same signature)."""
    if resolve_impl(impl) == "triton":
        from declip_ds.kernels import fused_clip_loss

        return fused_clip_loss
    from declip_ds.losses.clip import clip_loss

    return clip_loss


def get_filip_similarity(impl: str = "auto", *, argmax: str = "recompute", chunk_size: int | None = None):
    """FILIP's similarity for ``impl``: ``filip_similarity`` or ``token_max_similarity`` (same signature).

    argmax (``loss.filip_argmax``, kernel only): "recompute" or "save" (token_max_similarity's save_argmax).
    chunk_size (``loss.chunk_size``, torch only): the most samples per block on each side; the block also
    stays under filip_similarity's default of 2^22 similarities."""
    if argmax not in ("recompute", "save"):
        raise ValueError(f"Unknown loss.filip_argmax {argmax!r}. Allowed: recompute, save.")
    if resolve_impl(impl) == "triton":
        from declip_ds.kernels import token_max_similarity

        return functools.partial(token_max_similarity, save_argmax=True) if argmax == "save" else token_max_similarity
    from declip_ds.losses.filip import default_chunk_size, filip_similarity

    if chunk_size is None:
        return filip_similarity

    def capped_filip_similarity(image_tokens, text_tokens, image_mask=None, text_mask=None, *, direction="both"):
        chunk = min(int(chunk_size), default_chunk_size(image_tokens.shape[1], text_tokens.shape[1]))
        return filip_similarity(image_tokens, text_tokens, image_mask, text_mask, chunk_size=chunk, direction=direction)

    return capped_filip_similarity
