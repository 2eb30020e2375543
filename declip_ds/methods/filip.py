"""FILIP (Yao et al. 2021): token-wise late-interaction contrastive loss, METHODS.md §4.

Defaults follow the paper (padding masked, all tokens gathered, no text masking). The DeCLIP
reference code, which produced the CLIP-Benchmark numbers, differs in four switches that the
``*_yfcc15m`` recipes turn on: ``mask_padding: false`` (all 77 text positions, issue #31),
``topk: 16`` (per-pair token selection before the all-gather), ``mlm_mask_text: true`` (the loss sees
the 15 % MLM-masked caption) and ``image_view: moco_v2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from declip_ds.config import ConfigError, MethodConfig
from declip_ds.losses.filip import filip_loss, filip_topk_loss
from declip_ds.losses.select import get_filip_similarity
from declip_ds.methods.base import Method
from declip_ds.registry import register_method


@dataclass
class FILIPConfig(MethodConfig):
    name: str = "filip"
    filip_weight: float = 1.0
    clip_weight: float = 0.0  # the reference trains the dense term only; > 0 adds the global InfoNCE
    mask_padding: bool = True  # paper: padded text positions are discarded; reference: false
    topk: int = 0  # reference: 16 tokens per sample selected before the all-gather; 0 = all tokens
    image_view: str = "clip"  # clip (RRC data.rrc_scale) | moco_v2 (the reference: MoCo-v2 view 1)
    mlm_mask_text: bool = False  # reference: the contrastive text is the 15 % MLM-masked caption
    mlm_prob: float = 0.15
    logit_scale_dense_init: float = math.log(1 / 0.07)
    zero_shot_scoring: str = "token"  # token (FILIP's image->text token scoring) | global
    # token scoring: the prompt-averaged token matrix renormalised per position, or as one matrix per
    # class (the reference's FILIP eval): eval.zero_shot.zero_shot_token_classifier
    zero_shot_token_renorm: str = "position"

    def validate(self, exp) -> None:
        if exp.model.token_dim <= 0:
            raise ConfigError("method.name=filip needs token projections: set model.token_dim (256 in the papers).")
        if self.image_view not in ("clip", "moco_v2"):
            raise ConfigError(f"method.image_view: '{self.image_view}' is not allowed. Choose one of: clip, moco_v2.")
        if self.zero_shot_scoring not in ("token", "global"):
            raise ConfigError(f"method.zero_shot_scoring: '{self.zero_shot_scoring}' is not allowed. Choose token or global.")
        check_token_renorm(self.zero_shot_token_renorm)
        if self.mlm_mask_text and not exp.model.text.mask_token:
            raise ConfigError("method.mlm_mask_text=true needs the <|mask|> token: set model.text.mask_token=true.")
        if self.mlm_mask_text and not 0 < self.mlm_prob < 1:
            raise ConfigError(f"method.mlm_prob: must be in (0, 1) (reference 0.15), got {self.mlm_prob}.")
        if self.topk < 0:
            raise ConfigError(f"method.topk must be >= 0 (0 = all tokens), got {self.topk}.")

    def rrc_scale_unused(self) -> str | None:
        """Why data.rrc_scale does not apply to this method (load_config says so when it is set)."""
        if self.image_view == "moco_v2":
            return "its image view is MoCo-v2's RandomResizedCrop, scale [0.2, 1]; method.image_view=clip crops with it"
        return None


def check_token_renorm(value: str) -> None:
    from declip_ds.eval.zero_shot import TOKEN_RENORMS

    if value not in TOKEN_RENORMS:
        raise ConfigError(f"method.zero_shot_token_renorm: '{value}' is not allowed. Choose one of: "
                          f"{', '.join(TOKEN_RENORMS)} (class = the DeCLIP reference's FILIP evaluation).")


def text_token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> bool (B, L), True up to and including the EOT (the largest id); id 0 is both the
    padding and the BPE token '!', so padding is found by position."""
    eot = tokens.argmax(dim=-1, keepdim=True)  # (B, 1)
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot


class FilipHead(nn.Module):
    """The dense term shared by FILIP and DeFILIP: token mappings live in the DualEncoder; this owns
    the separate temperature ``logit_scale_dense`` and the loss switches."""

    def __init__(self, cfg: FILIPConfig, loss):
        super().__init__()
        self.cfg = cfg
        self.logit_scale_dense = nn.Parameter(torch.full((1,), float(cfg.logit_scale_dense_init)))
        self.similarity = get_filip_similarity(loss.impl, argmax=loss.filip_argmax, chunk_size=loss.chunk_size)

    def forward(self, model, image_tokens_raw, text_tokens_raw, text_ids, group) -> torch.Tensor:
        x = F.normalize(model.map_image_tokens(image_tokens_raw), dim=-1)  # (b, Ti, d)
        y = F.normalize(model.map_text_tokens(text_tokens_raw), dim=-1)  # (b, Tt, d)
        text_mask = text_token_mask(text_ids) if self.cfg.mask_padding else None
        scale = self.logit_scale_dense.exp().squeeze(0)  # () no cap (reference: clamp [3, 6] only)
        if self.cfg.topk > 0:
            return filip_topk_loss(x, y, scale, self.cfg.topk, None, text_mask, group=group, similarity=self.similarity)
        return filip_loss(x, y, scale, None, text_mask, group=group, similarity=self.similarity)


def filip_text_view(exp, cfg, tok):
    """The caption as the loss sees it: plain ids, or the reference's MLM-masked ids."""
    from declip_ds.data.text_aug import CaptionView, MLMView

    return MLMView(tok, prob=cfg.mlm_prob) if cfg.mlm_mask_text else CaptionView(tok)


@register_method("filip")
class FILIP(Method):
    """One image view, one caption; symmetric CE over token-wise (late-interaction) similarities."""

    Config = FILIPConfig
    model_defaults = {"token_dim": 256}

    def __init__(self, exp, group=None):
        super().__init__(exp, group)
        self.filip = FilipHead(self.cfg, exp.loss)

    def sample_transform(self):
        from declip_ds.data.transforms import SampleTransform, clip_train_transform, moco_v2_transform

        d, size = self.exp.data, self.exp.model.vision.image_size
        image = (moco_v2_transform(size, normalize=d.normalize) if self.cfg.image_view == "moco_v2"
                 else clip_train_transform(size, scale=tuple(d.rrc_scale), normalize=d.normalize))
        return SampleTransform(image_views={"image": image},
                               text_views={"text": filip_text_view(self.exp, self.cfg, self.tokenizer())})

    def loss_weights(self):
        return {"filip_loss": self.cfg.filip_weight, "clip_loss": self.cfg.clip_weight}

    def scale_parameters(self):
        return [self.model.logit_scale, self.filip.logit_scale_dense]

    def parameters_without_gradient(self) -> tuple[str, ...]:
        """Name prefixes that get no gradient: with the reference's clip_weight 0, everything that only
        serves the global embedding (ViT ln_post and proj, the RN50 attention pool, the text projection,
        logit_scale); the tokens are taken before them."""
        if self.cfg.clip_weight:
            return ()
        return ("model.logit_scale", "model.visual.proj", "model.visual.ln_post", "model.visual.trunk.head",
                "model.text.text_projection")

    # embed / loss_from_embeddings: the towers' token outputs, then the token projections and the
    # gathered losses, so train.accumulation=contrastive can treat k micro-batches as one batch
    # (the cache holds k*b x (Ti + L) tower tokens)
    supports_contrastive_accumulation = True

    def embed(self, batch) -> dict:
        img = self.model.image_features(batch["image"])  # pooled, tokens (b, Ti, W), embedding (b, E)
        txt = self.model.text_features(batch["text"])  # pooled, tokens (b, L, Wt), embedding (b, E)
        e = {"image_tokens": img["tokens"], "text_tokens": txt["tokens"], "text_ids": batch["text"]}
        if self.cfg.clip_weight:
            e.update(image=F.normalize(img["embedding"], dim=-1), text=F.normalize(txt["embedding"], dim=-1))
        return e

    def loss_from_embeddings(self, e: dict) -> dict:
        out = {"filip_loss": self.filip(self.model, e["image_tokens"], e["text_tokens"], e["text_ids"], self.group),
               "logit_scale_dense": self.filip.logit_scale_dense.detach().exp().squeeze(0)}
        if self.cfg.clip_weight:
            scale = self.model.scale()
            out.update(clip_loss=self.contrastive(e["image"], e["text"], scale, group=self.group),
                       logit_scale=scale.detach())
        return out

    def forward(self, batch):
        return self.loss_from_embeddings(self.embed(batch))
