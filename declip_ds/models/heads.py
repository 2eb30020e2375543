"""Projection heads: the text projection (two checkpoint layouts) and FILIP's token mappings.

The image projection lives in the vision tower (``visual.proj``, OpenAI's name and layout) or is
the identity (RN50, whose attention pool already outputs embed_dim); see vision.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def make_text_projection(width: int, embed_dim: int, bias: bool) -> nn.Parameter | nn.Linear:
    """OpenAI layout: a bare (width, embed_dim) matrix used as ``x @ P`` (``bias=False``).
    DeCLIP reference layout: ``nn.Linear(width, embed_dim)`` with bias, weight (embed_dim, width).

    Registered under the same attribute name either way, so both checkpoints load without renaming
    (``text_projection`` vs ``text_projection.weight`` / ``text_projection.bias``).
    """
    if bias:  # the reference re-initialises the weight only: the bias keeps nn.Linear's U(+-1/sqrt(width))
        linear = nn.Linear(width, embed_dim)
        nn.init.normal_(linear.weight, std=width**-0.5)
        return linear
    return nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)


def apply_projection(x: torch.Tensor, proj: nn.Parameter | nn.Module) -> torch.Tensor:
    """(B, width) -> (B, embed_dim) for either layout of ``make_text_projection``."""
    if isinstance(proj, nn.Module):
        return proj(x)
    return x @ proj


def make_token_mappings(vision_token_dim: int, text_width: int, token_dim: int) -> tuple[nn.Linear, nn.Linear]:
    """FILIP's ``image_mapping`` and ``text_mapping``: Linear(tower token width -> token_dim, bias).

    The DeCLIP reference maps ViT tokens 768 -> 256 (RN50: 2048 -> 256) and text tokens 512 -> 256.
    """
    return nn.Linear(vision_token_dim, token_dim), nn.Linear(text_width, token_dim)
