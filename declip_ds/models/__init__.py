"""Towers only, no losses: vision.py (timm image towers), text.py (CLIP text transformer),
heads.py (projections), dual.py (the DualEncoder every method and the evaluation use)."""

from declip_ds.models.dual import DualEncoder, build_model
from declip_ds.models.pretrained import load_pretrained

__all__ = ["DualEncoder", "build_model", "load_pretrained"]
