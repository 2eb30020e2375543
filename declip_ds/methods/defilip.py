"""DeFILIP: DeCLIP plus FILIP's token-wise term on image view 1 against T1, the caption (MLM-masked with
``contrastive_text: masked``, the reference's; METHODS.md §5; DeCLIP-repo code, which produced the CLIP-Benchmark's best ViT-B/32 number).

Defaults follow the paper-style FILIP term (padding masked, all tokens gathered); the
``defilip_vit_b32_yfcc15m`` recipe switches to the reference's all-positions, top-16 behaviour.
Zero-shot uses the global embeddings, as the reference does (its FILIP evaluation branch is off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from declip_ds.config import ConfigError
from declip_ds.methods.declip import DeCLIP, DeCLIPConfig
from declip_ds.methods.filip import FilipHead, check_token_renorm
from declip_ds.registry import register_method


@dataclass
class DeFILIPConfig(DeCLIPConfig):
    name: str = "defilip"
    filip_weight: float = 0.2
    mask_padding: bool = True  # reference: false (all 77 positions)
    topk: int = 0  # reference: 16
    logit_scale_dense_init: float = math.log(1 / 0.07)
    zero_shot_scoring: str = "global"
    zero_shot_token_renorm: str = "position"  # for token scoring: see FILIPConfig

    def validate(self, exp) -> None:
        super().validate(exp)
        if exp.model.token_dim <= 0:
            raise ConfigError("method.name=defilip needs token projections: set model.token_dim (256 in the reference).")
        if self.topk < 0:
            raise ConfigError(f"method.topk must be >= 0 (0 = all tokens), got {self.topk}.")
        if self.zero_shot_scoring not in ("token", "global"):
            raise ConfigError(f"method.zero_shot_scoring: '{self.zero_shot_scoring}' is not allowed. Choose token or global.")
        check_token_renorm(self.zero_shot_token_renorm)


@register_method("defilip")
class DeFILIP(DeCLIP):
    """DeCLIP's views and losses + ``filip_weight`` x FILIP(image view 1 tokens, T1 tokens): T1 is the caption
    unmasked (``contrastive_text: raw``, the default), or MLM-masked (``masked``: the reference code)."""

    Config = DeFILIPConfig
    model_defaults = {"text.mask_token": True, "token_dim": 256}

    def __init__(self, exp, group=None):
        super().__init__(exp, group)
        self.filip = FilipHead(self.cfg, exp.loss)

    def loss_weights(self):
        return {**super().loss_weights(), "filip_loss": self.cfg.filip_weight}

    def scale_parameters(self):
        return [self.model.logit_scale, self.filip.logit_scale_dense]

    def embed(self, batch) -> dict:
        e, f1, t1 = self.tower_outputs(batch)
        return {**e, "image_tokens": f1["tokens"], "text_tokens": t1["tokens"], "text_ids": batch["text"]}

    def loss_from_embeddings(self, e: dict) -> dict:
        out = super().loss_from_embeddings(e)
        out["filip_loss"] = self.filip(self.model, e["image_tokens"], e["text_tokens"], e["text_ids"], self.group)
        out["logit_scale_dense"] = self.filip.logit_scale_dense.detach().exp().squeeze(0)
        return out
