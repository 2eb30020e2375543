"""Pick the torch reference or the Triton kernel for a loss, from the config's ``loss.impl``.

auto   -> triton when a CUDA device is present (and triton is installed), torch otherwise
torch  -> the pure-torch references in declip_ds.losses (any device, float64-capable)
triton -> the kernels in declip_ds.kernels; without CUDA only under TRITON_INTERPRET=1 (slow, for tests)
"""

from __future__ import annotations

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


def get_filip_similarity(impl: str = "auto"):
    """FILIP's similarity for ``impl``: ``filip_similarity`` or ``token_max_similarity`` (same signature)."""
    if resolve_impl(impl) == "triton":
        from declip_ds.kernels import token_max_similarity

        return token_max_similarity
    from declip_ds.losses.filip import filip_similarity

    return filip_similarity
