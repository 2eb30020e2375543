"""CLIP (Radford et al. 2021) as the DeCLIP-repo benchmark runs it: METHODS.md §1."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from declip_ds.config import MethodConfig
from declip_ds.methods.base import Method
from declip_ds.registry import register_method


@dataclass
class CLIPConfig(MethodConfig):
    name: str = "clip"
    clip_weight: float = 1.0


@register_method("clip")
class CLIP(Method):
    """One image view (RandomResizedCrop, scale data.rrc_scale, no flip), one caption, InfoNCE."""

    Config = CLIPConfig

    def sample_transform(self):
        from declip_ds.data.text_aug import CaptionView
        from declip_ds.data.transforms import SampleTransform, clip_train_transform

        d, tok = self.exp.data, self.tokenizer()
        image = clip_train_transform(self.exp.model.vision.image_size, scale=tuple(d.rrc_scale), normalize=d.normalize)
        return SampleTransform(image_views={"image": image}, text_views={"text": CaptionView(tok)})

    def loss_weights(self):
        return {"clip_loss": self.cfg.clip_weight}

    # forward = loss_from_embeddings(embed(batch)): the split lets train.accumulation=contrastive
    # compute one contrastive batch from several micro-batches (declip_ds/train/accumulate.py)
    supports_contrastive_accumulation = True

    def embed(self, batch) -> dict:
        return {"image": F.normalize(self.model.encode_image(batch["image"]), dim=-1),  # (b, E)
                "text": F.normalize(self.model.encode_text(batch["text"]), dim=-1)}  # (b, E)

    def loss_from_embeddings(self, e: dict) -> dict:
        scale = self.model.scale()  # 0-d
        return {"clip_loss": self.contrastive(e["image"], e["text"], scale, group=self.group),
                "logit_scale": scale.detach()}

    def forward(self, batch):
        return self.loss_from_embeddings(self.embed(batch))
