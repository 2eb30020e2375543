"""DualEncoder: an image tower, a text tower, a temperature and (for FILIP) token mappings. No losses.

Module names (state-dict prefixes), for checkpoint converters:
    visual.*            image tower (vision.py): ViT = visual.trunk.* (timm) + visual.ln_post + visual.proj;
                        RN50 = visual.trunk.* (timm ByobNet, attention pool at visual.trunk.head)
    text.*              text tower (text.py), OpenAI names inside: text.token_embedding,
                        text.positional_embedding, text.transformer.resblocks.{i}.*, text.ln_final,
                        text.text_projection
    logit_scale         shape-[1] parameter (the DeCLIP reference's layout; OpenAI stores it 0-d). Not 0-d
                        because DeepSpeed's parameter broadcast views every parameter as bytes,
                        which a 0-d tensor cannot do; scale() returns a 0-d tensor
    image_mapping, text_mapping   FILIP token projections (DeCLIP-reference names), only if token_dim > 0

Every parameter belongs to a module whose forward runs inside encode_* (DeepSpeed ZeRO-3 gathers
per module), except the one-element logit_scale, which is far below ZeRO-3's persistence threshold.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from declip_ds.config import ModelConfig
from declip_ds.models.heads import make_token_mappings
from declip_ds.models.text import TextTransformer
from declip_ds.models.vision import build_vision_tower


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.vocab_size = cfg.vocab_size
        self.context_length = cfg.text.context_length
        self.image_size = cfg.vision.image_size
        self.token_dim = cfg.token_dim
        self.visual = build_vision_tower(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        self.text = TextTransformer(cfg.text, cfg.vocab_size, cfg.embed_dim, cfg.quick_gelu)
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.logit_scale_init)))  # (1,)
        if cfg.token_dim > 0:
            self.image_mapping, self.text_mapping = make_token_mappings(
                self.visual.token_dim, cfg.text.width, cfg.token_dim
            )
        else:
            self.image_mapping = self.text_mapping = None
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    # ------------------------------------------------------------------ one tower pass, everything
    def image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) -> pooled (B, Wv) pre-projection, tokens (B, Ti, Wtok) raw tower tokens,
        embedding (B, E) projected, unnormalised."""
        return self.visual(images)

    def text_features(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens (B, L) -> pooled (B, Wt) at EOT, tokens (B, L, Wt) after ln_final, embedding (B, E)."""
        return self.text(tokens)

    # ------------------------------------------------------------------ global embeddings
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images)["embedding"]  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(tokens)["embedding"]  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ FILIP token embeddings
    def _require_token_heads(self) -> None:
        if self.image_mapping is None:
            raise RuntimeError(
                "This model has no token projections (model.token_dim=0). FILIP/DeFILIP need them: set "
                "model.token_dim (e.g. 256, as in the papers)."
            )

    def map_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw tower tokens (B, Ti, Wtok) from image_features -> (B, Ti, token_dim)."""
        self._require_token_heads()
        return self.image_mapping(tokens)

    def map_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after ln_final (B, L, Wt) from text_features -> (B, L, token_dim)."""
        self._require_token_heads()
        return self.text_mapping(tokens)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, Ti, token_dim), not normalised. ViT: patch tokens before ln_post; RN50: the 7x7 map."""
        self._require_token_heads()
        return self.map_image_tokens(self.visual(images)["tokens"])

    def encode_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, token_dim), not normalised: all positions (SOT, EOT, padding included)."""
        self._require_token_heads()
        return self.map_text_tokens(self.text(tokens)["tokens"])

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> dict:
        """Both feature dicts in one call ({"image": ..., "text": ...}), for callers that prefer
        module calls (e.g. to keep DeepSpeed ZeRO-3 hooks on this module)."""
        out = {}
        if images is not None:
            out["image"] = self.image_features(images)
        if tokens is not None:
            out["text"] = self.text_features(tokens)
        return out

    # ------------------------------------------------------------------ temperature
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at cfg.logit_scale_exp_cap when > 0 (the reference caps at 100). 0-d.

        The cap limits the value only, as the DeCLIP reference does (``logit_scale.data =
        clamp(logit_scale.data, max=100)`` after the exp): the gradient is still that of the uncapped
        exp. A plain ``clamp`` would zero it above the cap, so a parameter that passed ln(cap) would
        never be trained again (it drifts on Adam momentum towards the upper bound and stays there).
        """
        s = self.logit_scale.exp().squeeze(0)  # ()
        cap = self.cfg.logit_scale_exp_cap
        if cap <= 0:
            return s
        return s - (s - cap).clamp(min=0).detach()  # value min(s, cap), d/d logit_scale = exp(logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter in place to cfg.logit_scale_bounds (open_clip: [0, ln 100]; reference: [3, 6])."""
        lo, hi = self.cfg.logit_scale_bounds
        self.logit_scale.clamp_(lo, hi)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


def build_model(cfg: ModelConfig) -> DualEncoder:
    """A randomly initialised DualEncoder for ``cfg`` (a ModelConfig); no weights are downloaded."""
    return DualEncoder(cfg)
