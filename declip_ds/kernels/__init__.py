"""Triton kernels (opt-in through ``loss.impl``): a fused CLIP loss and FILIP's token-max similarity.

Importing this package never needs triton: ``fused_clip_loss`` and ``token_max_similarity`` are
imported from their modules (contrastive.py, token_max.py) on first access, so a machine without
triton or a GPU can import ``declip_ds.kernels`` and ask ``triton_available()``. On CPU the kernels
run under ``TRITON_INTERPRET=1`` (slow; for tests), which must be set before the first access.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

__all__ = ["fused_clip_loss", "token_max_similarity", "triton_available"]

_LAZY = {"fused_clip_loss": "declip_ds.kernels.contrastive", "token_max_similarity": "declip_ds.kernels.token_max"}


def triton_available() -> bool:
    """True when triton is installed and can run: a CUDA device, or TRITON_INTERPRET=1 (CPU interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'declip_ds.kernels' has no attribute {name!r}")
    if importlib.util.find_spec("triton") is None:
        raise ImportError(f"declip_ds.kernels.{name} needs triton, which is not installed. Install triton "
                          f"(Linux + CUDA) or set loss.impl=torch to use the pure-torch losses.")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value
