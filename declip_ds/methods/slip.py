"""SLIP (Mu et al. 2022) as the DeCLIP-repo benchmark trains it: METHODS.md §3.

One step, top to bottom:
    views     base view "image" (RandomResizedCrop data.rrc_scale, no flip), two SSL views
              "image_ssl1", "image_ssl2" (MoCo-v2 RRC 0.2-1, or SimCLR RRC 0.08-1), one caption "text"
    CLIP      clip_loss on the base view's embedding and the caption's             -> clip_loss
              (columns gathered with gradient; method.clip_gather_grad=false: without, as official SLIP)
    SSL       predictor_sim (Linear-BN-ReLU-Linear-BN-ReLU-Linear, 4096 -> 256) on each SSL view's
              pre-projection feature, NT-Xent tau=0.1 over gathered negatives     -> ssl_loss
    total     clip_weight * clip_loss + ssl_scale * ssl_loss (1 and 1)

The head is named ``predictor_sim`` with the reference's sub-module names (linear1, bn1, linear2, bn2,
linear3), so a DeCLIP-repo SLIP checkpoint's head maps one to one; the reference also builds a
``bn3`` it never uses (out_bn=False), which a converter should drop.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from declip_ds.config import ConfigError, MethodConfig
from declip_ds.losses import simclr_loss
from declip_ds.losses.clip import clip_loss
from declip_ds.methods.base import Method
from declip_ds.models.norm import BatchNorm1dFP32
from declip_ds.registry import register_method

SSL_VIEWS = ("moco_v2", "simclr")
SSL_FEATURES = ("auto", "pooled", "token_mean")


@dataclass
class SLIPConfig(MethodConfig):
    name: str = "slip"
    clip_weight: float = 1.0
    ssl_scale: float = 1.0  # weight of the SimCLR term (both repos: 1.0)
    ssl_temperature: float = 0.1
    ssl_mlp_dim: int = 4096  # predictor_sim hidden width
    ssl_emb_dim: int = 256  # predictor_sim output width
    # the two SSL views: moco_v2 = RRC(0.2-1) + jitter/gray/blur/flip (the DeCLIP-repo benchmark);
    # simclr = the same with RRC(0.08-1) (the official SLIP repo)
    ssl_views: str = "moco_v2"
    # what predictor_sim reads: "pooled" = the tower's pre-projection pooled feature (ViT: ln_post(CLS),
    # 768-d for B/32, the reference's feature_dim 768); "token_mean" = the mean of the tower's tokens
    # (RN50: global average pool of the 2048-channel final map, matching the reference RN50 config's
    # feature_dim 2048 -- RN50's "pooled" is the attention-pool output, which already is the
    # embedding); "auto" = token_mean for ResNet towers, pooled otherwise.
    ssl_feature: str = "auto"
    # the CLIP term's all-gather: true = with gradient (the DeCLIP-repo benchmark; the global-batch
    # gradient under DeepSpeed's averaging); false = without, as the official SLIP repo's CLIPLoss
    # (each rank's loss reaches only its own rows; torch loss path only)
    clip_gather_grad: bool = True

    def validate(self, exp) -> None:
        if self.ssl_views not in SSL_VIEWS:
            raise ConfigError(f"method.ssl_views: '{self.ssl_views}' is not allowed. Choose one of: "
                              f"{', '.join(SSL_VIEWS)} (moco_v2 = DeCLIP-repo benchmark, simclr = official SLIP).")
        if self.ssl_feature not in SSL_FEATURES:
            raise ConfigError(f"method.ssl_feature: '{self.ssl_feature}' is not allowed. Choose one of: "
                              f"{', '.join(SSL_FEATURES)}.")
        for k in ("clip_weight", "ssl_scale"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"method.{k}: must be a finite number >= 0, got {v}.")
        if not (math.isfinite(self.ssl_temperature) and self.ssl_temperature > 0):
            raise ConfigError(f"method.ssl_temperature: must be > 0 (SLIP: 0.1), got {self.ssl_temperature}.")
        for k in ("ssl_mlp_dim", "ssl_emb_dim"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}: must be > 0, got {getattr(self, k)}.")
        if not self.clip_gather_grad and exp.loss.impl == "triton":
            raise ConfigError("method.clip_gather_grad=false (the official SLIP repo's gather without gradient) has "
                              "no Triton kernel: the fused loss always sends the columns' gradients back. Set "
                              "loss.impl=auto or torch (the torch loss is used for the CLIP term), or "
                              "method.clip_gather_grad=true.")


class SimCLRHead(nn.Module):
    """SLIP's SimCLR head (DeCLIP reference ``projection_MLP(out_bn=False)``, official SLIP
    ``_build_mlp``): Linear-BN-ReLU-Linear-BN-ReLU-Linear, no output BN.

    BatchNorm is per GPU here. Both references synchronise the hidden BNs across GPUs (the DeCLIP
    repo's linklink SyncBatchNorm, a plain BatchNorm1d in its public stub; official SLIP builds
    nn.SyncBatchNorm), so our statistics come from 128 samples instead of the global batch. That is
    fine at 128 per GPU, but a tiny per-GPU batch collapses the head (SLIP issue #7: 8 per GPU with
    --update-freq fell to chance SSL accuracy), and gradient accumulation does not help: BN only
    ever sees one micro-batch.
    """

    def __init__(self, in_dim: int, mlp_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        self.linear1, self.bn1, self.relu1 = nn.Linear(in_dim, mlp_dim), BatchNorm1dFP32(mlp_dim), nn.ReLU(True)
        self.linear2, self.bn2, self.relu2 = nn.Linear(mlp_dim, mlp_dim), BatchNorm1dFP32(mlp_dim), nn.ReLU(True)
        self.linear3 = nn.Linear(mlp_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, in) -> (b, out)
        x = self.relu1(self.bn1(self.linear1(x)))
        x = self.relu2(self.bn2(self.linear2(x)))
        return self.linear3(x)


@register_method("slip")
class SLIP(Method):
    """CLIP on a base view plus SimCLR between two augmented views of the same image."""

    Config = SLIPConfig

    def __init__(self, exp, group=None):
        super().__init__(exp, group)
        from declip_ds.models.vision import ResNetTower

        cfg, visual = self.cfg, self.model.visual
        feature = cfg.ssl_feature
        if feature == "auto":
            feature = "token_mean" if isinstance(visual, ResNetTower) else "pooled"
        self.ssl_feature = feature
        in_dim = visual.pooled_dim if feature == "pooled" else visual.token_dim
        self.predictor_sim = SimCLRHead(in_dim, cfg.ssl_mlp_dim, cfg.ssl_emb_dim)
        if not cfg.clip_gather_grad:  # the official SLIP CLIPLoss: columns gathered without gradient
            self.contrastive = functools.partial(clip_loss, gather_grad=False)

    # ------------------------------------------------------------------ data
    def sample_transform(self):
        from declip_ds.data.text_aug import CaptionView
        from declip_ds.data.transforms import SampleTransform, clip_train_transform, moco_v2_transform, simclr_transform

        d, tok, size = self.exp.data, self.tokenizer(), self.exp.model.vision.image_size
        ssl_view = moco_v2_transform if self.cfg.ssl_views == "moco_v2" else simclr_transform  # their own RRC scale
        return SampleTransform(
            image_views={"image": clip_train_transform(size, scale=tuple(d.rrc_scale), normalize=d.normalize),
                         "image_ssl1": ssl_view(size, normalize=d.normalize),
                         "image_ssl2": ssl_view(size, normalize=d.normalize)},
            text_views={"text": CaptionView(tok)},
        )

    # ------------------------------------------------------------------ losses
    def loss_weights(self):
        return {"clip_loss": self.cfg.clip_weight, "ssl_loss": self.cfg.ssl_scale}

    def _ssl_feature(self, images: torch.Tensor) -> torch.Tensor:
        """One tower pass per view, as the reference (BN statistics, RN50's included, stay per view)."""
        feats = self.model.image_features(images)
        return feats["pooled"] if self.ssl_feature == "pooled" else feats["tokens"].mean(dim=1)  # (b, F)

    # embed / loss_from_embeddings: the towers' outputs, then everything the batch couples (the gathered
    # CLIP loss, and predictor_sim + NT-Xent: the head's BatchNorm sees the whole contrastive batch), so
    # train.accumulation=contrastive can treat k micro-batches as one batch
    supports_contrastive_accumulation = True

    def embed(self, batch) -> dict:
        m = self.model
        return {"image": F.normalize(m.encode_image(batch["image"]), dim=-1),  # (b, E)
                "text": F.normalize(m.encode_text(batch["text"]), dim=-1),  # (b, E)
                "ssl1": self._ssl_feature(batch["image_ssl1"]),  # (b, F) pre-head features
                "ssl2": self._ssl_feature(batch["image_ssl2"])}

    def loss_from_embeddings(self, e: dict) -> dict:
        scale = self.model.scale()  # 0-d; the DeCLIP-repo SLIP has no cap of 100 (model.logit_scale_exp_cap: 0)
        # Gathered WITH gradient, as the DeCLIP repo's AllGather does (under DeepSpeed's gradient averaging
        # that gives the global-batch gradient); method.clip_gather_grad=false gathers without, as the
        # official SLIP repo (each rank's loss then only reaches its own rows).
        out = {"clip_loss": self.contrastive(e["image"], e["text"], scale, group=self.group)}
        z1, z2 = self.predictor_sim(e["ssl1"]), self.predictor_sim(e["ssl2"])  # (b, ssl_emb_dim) each
        out["ssl_loss"], out["ssl_acc"] = simclr_loss(z1, z2, self.cfg.ssl_temperature, group=self.group,
                                                      return_accuracy=True)
        out["logit_scale"] = scale.detach()
        return out

    def forward(self, batch):
        return self.loss_from_embeddings(self.embed(batch))
