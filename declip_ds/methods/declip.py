"""DeCLIP (Li et al. 2022): METHODS.md §2.

One step, top to bottom:
    views     two MoCo-v2 image views; T1 = the caption (``contrastive_text: raw``, the default: the views
              as the paper describes them) plus its MLM-masked copy, T2 = an EDA augmentation of it
              (``contrastive_text: masked``, the reference code and the YFCC-15M recipes: T1 = the caption
              MLM-masked, in the contrastive terms too)
    towers    one pass per view: I1, I2 (projected, unnormalised), T1 (+ its ln_final tokens), T2
              (raw: one more text pass, the masked copy, whose ln_final tokens feed the MLM head)
    SimSiam   projector/predictor on I1, I2 before normalisation       -> simsiam_loss
    MLM       Linear(text width -> 49,409) on the masked caption's masked token outputs -> mlm_loss
    MVS       clip_loss on (I1,T1), (I2,T1), (I1,T2), (I2,T2), averaged -> mvs_loss
    NNS       T1 and T2 look up their nearest texts in this rank's queue (as it was before this
              step), then T2 and T1 are enqueued (commit); image -> neighbour InfoNCE -> nn_loss
    total     0.4 mvs + 0.2 simsiam + 0.2 mlm + 0.2 nn (the YFCC-15M configs)

Head names follow the reference (``projector``, ``predictor``, ``text_label_predictor``), so a
DeCLIP release's heads map one to one. The queue is per-rank state outside the state dict, saved
and restored per rank through ``extra_state()`` / ``load_extra_state()``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from declip_ds.config import ConfigError, MethodConfig
from declip_ds.losses.declip import NNQueue, mlm_loss_per_sample, mvs_loss, nn_loss, simsiam_loss
from declip_ds.losses.gather import world_info
from declip_ds.methods.base import Method
from declip_ds.registry import register_method
from declip_ds.models.norm import BatchNorm1dFP32


CONTRASTIVE_TEXTS = ("masked", "raw")


@dataclass
class DeCLIPConfig(MethodConfig):
    name: str = "declip"
    # loss weights (reference YFCC-15M configs; the DeCLIP-88M ViT config uses mvs 0.6)
    mvs_weight: float = 0.4
    simsiam_weight: float = 0.2
    mlm_weight: float = 0.2
    nn_weight: float = 0.2
    # MLM: selection probability; random replacements from the whole vocabulary (reference) or not
    mlm_prob: float = 0.15
    mlm_random_excludes_special: bool = False
    # nearest-neighbour queue: per-rank FIFO of text embeddings
    queue_size: int = 65536
    # SimSiam heads: projector E -> h -> h -> out (BN after each, ReLU between), predictor out -> p -> out
    projector_hidden_dim: int = 1024
    projector_out_dim: int = 1024
    predictor_hidden_dim: int = 512
    # the T1 the contrastive terms (MVS, NN look-up and queue, DeFILIP's token term) see: raw (the caption
    # unmasked, as the paper describes the views; the MLM head reads a second pass over the masked copy: one
    # more text forward) | masked (the reference code, and the *_yfcc15m recipes: the MLM-masked caption, one
    # text pass serves MLM too). Before this key existed (checkpoints saved without it) DeCLIP ran "masked".
    contrastive_text: str = "raw"
    # T2: EDA augmentation of the caption (false: the raw caption)
    eda: bool = True
    # without NLTK's WordNet data EDA cannot replace synonyms; true: stop before training (exit 2) with the
    # install command; false: warn once and pick between random swap and random deletion only
    eda_require_wordnet: bool = False
    # RandomResizedCrop scale of the two MoCo-v2 views
    view_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])

    def validate(self, exp) -> None:
        if not exp.model.text.mask_token:
            raise ConfigError(
                "method 'declip' needs model.text.mask_token: true (its MLM masks tokens with <|mask|>, id "
                "49406, and predicts over the 49,409-id vocabulary), got false. Set model.text.mask_token: true "
                "in the YAML (or remove the key), or pass model.text.mask_token=true."
            )
        for k in ("mvs_weight", "simsiam_weight", "mlm_weight", "nn_weight"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"method.{k}: must be a finite number >= 0, got {v}.")
        if self.contrastive_text not in CONTRASTIVE_TEXTS:
            raise ConfigError(f"method.contrastive_text: '{self.contrastive_text}' is not allowed. Choose one of: "
                              f"{', '.join(CONTRASTIVE_TEXTS)} (masked = the reference code's MLM-masked caption).")
        if not 0 < self.mlm_prob < 1:
            raise ConfigError(f"method.mlm_prob: must be in (0, 1) (reference 0.15), got {self.mlm_prob}.")
        for k in ("queue_size", "projector_hidden_dim", "projector_out_dim", "predictor_hidden_dim"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}: must be > 0, got {getattr(self, k)}.")
        s = self.view_scale
        if len(s) != 2 or not 0 < s[0] <= s[1] <= 1:
            raise ConfigError(f"method.view_scale: need [low, high] with 0 < low <= high <= 1, got {s}.")

    def rrc_scale_unused(self) -> str | None:
        """Why data.rrc_scale does not apply to this method (load_config says so when it is set)."""
        return f"its two MoCo-v2 views crop with method.view_scale ({list(self.view_scale)}); set that instead"




class ProjectionMLP(nn.Module):
    """SimSiam projector (reference ``projection_MLP``): Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN."""

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024):
        super().__init__()
        self.linear1, self.bn1, self.relu1 = nn.Linear(in_dim, hidden_dim), BatchNorm1dFP32(hidden_dim), nn.ReLU(True)
        self.linear2, self.bn2 = nn.Linear(hidden_dim, hidden_dim), BatchNorm1dFP32(hidden_dim)
        self.relu2 = nn.ReLU(True)
        self.linear3, self.bn3 = nn.Linear(hidden_dim, out_dim), BatchNorm1dFP32(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, in) -> (b, out)
        x = self.relu1(self.bn1(self.linear1(x)))
        x = self.relu2(self.bn2(self.linear2(x)))
        return self.bn3(self.linear3(x))


class PredictionMLP(nn.Module):
    """SimSiam predictor (reference ``prediction_MLP``): Linear-BN-ReLU-Linear, no output BN."""

    def __init__(self, in_dim: int = 1024, hidden_dim: int = 512, out_dim: int = 1024):
        super().__init__()
        self.linear1, self.bn1, self.relu1 = nn.Linear(in_dim, hidden_dim), BatchNorm1dFP32(hidden_dim), nn.ReLU(True)
        self.layer2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, in) -> (b, out)
        return self.layer2(self.relu1(self.bn1(self.linear1(x))))


def _queue_seed(seed: int, rank: int) -> int:
    """Each rank's queue starts from different random vectors (the reference's are per GPU too)."""
    return int(hashlib.sha256(f"declip-nn-queue/{seed}/{rank}".encode()).hexdigest()[:15], 16)


@register_method("declip")
class DeCLIP(Method):
    """Two MoCo-v2 image views, masked + EDA captions; MVS + SimSiam + MLM + nearest-neighbour losses."""

    Config = DeCLIPConfig
    model_defaults = {"text.mask_token": True}  # filled in by the config loader where the YAML is silent

    def __init__(self, exp, group=None):
        super().__init__(exp, group)
        cfg, m = self.cfg, exp.model
        self.projector = ProjectionMLP(m.embed_dim, cfg.projector_hidden_dim, cfg.projector_out_dim)
        self.predictor = PredictionMLP(cfg.projector_out_dim, cfg.predictor_hidden_dim, cfg.projector_out_dim)
        self.text_label_predictor = nn.Linear(m.text.width, m.vocab_size)  # the MLM head
        rank = world_info(group)[0]
        generator = torch.Generator().manual_seed(_queue_seed(exp.train.seed, rank))
        # a plain attribute, not a buffer: per rank, fp32, outside the state dict (see NNQueue)
        self.nn_queue = NNQueue(cfg.queue_size, m.embed_dim, generator=generator)

    # ------------------------------------------------------------------ data
    def sample_transform(self):
        from declip_ds.data.text_aug import EDA, WORDNET_INSTALL_HINT, CaptionView, EDAView, MLMView, wordnet_available
        from declip_ds.data.transforms import SampleTransform, moco_v2_transform

        cfg, d, tok = self.cfg, self.exp.data, self.tokenizer()
        size = self.exp.model.vision.image_size
        eda = EDA() if cfg.eda else None
        if eda is not None and cfg.eda_require_wordnet and not wordnet_available():
            raise ConfigError(
                "method.eda_require_wordnet=true, but NLTK's WordNet data is not installed here, so EDA cannot "
                "do the reference's synonym replacement. Install it on every training node "
                f"({WORDNET_INSTALL_HINT}), or set method.eda_require_wordnet=false to train with random swap "
                "and random deletion only.")
        if eda is not None:
            eda.has_synonyms()  # warn about missing WordNet data once, here, not in every loader worker
        raw = cfg.contrastive_text == "raw"  # T1 unmasked; the masked copy goes to text_mlm for MLM only
        mlm = MLMView(tok, cfg.mlm_prob, cfg.mlm_random_excludes_special,
                      text_key="text_mlm" if raw else "text")  # masked ids + mlm_labels
        text_views = {"text": CaptionView(tok), "text_mlm": mlm} if raw else {"text": mlm}
        return SampleTransform(
            image_views={"image": moco_v2_transform(size, scale=tuple(cfg.view_scale), normalize=d.normalize),
                         "image2": moco_v2_transform(size, scale=tuple(cfg.view_scale), normalize=d.normalize)},
            text_views={**text_views, "text2": EDAView(tok, eda)},
        )

    # ------------------------------------------------------------------ losses
    def loss_weights(self):
        c = self.cfg
        return {"mvs_loss": c.mvs_weight, "simsiam_loss": c.simsiam_weight, "mlm_loss": c.mlm_weight,
                "nn_loss": c.nn_weight}

    # embed / loss_from_embeddings: the towers' per-sample outputs, then everything the batch couples
    # (SimSiam heads with their BatchNorm, the gathered MVS loss, the neighbour look-up, the MLM mean
    # over all masked positions), so train.accumulation=contrastive can treat k micro-batches as one
    # batch of k*b. The queue is only read there; commit() enqueues once the step's loss is known.
    supports_contrastive_accumulation = True

    def forward(self, batch):
        e = self.embed(batch)
        out = self.loss_from_embeddings(e)
        if self.training:
            self.commit_after_forward(e)  # deferred by the trainer until the guard has judged the loss
        return out

    def tower_outputs(self, batch) -> tuple[dict, dict, dict]:
        """Per-sample embeddings (see ``embed``) and the tower outputs of image view 1 and of T1, the
        caption the contrastive terms see (DeFILIP takes its token term from them without a second
        tower pass)."""
        m = self.model
        f1 = m.image_features(batch["image"])  # pooled, tokens (b, Ti, W), embedding (b, E)
        img2 = m.image_features(batch["image2"])["embedding"]  # (b, E)
        t1 = m.text_features(batch["text"])  # T1: pooled, tokens (b, L, W), embedding (b, E)
        t2 = m.text_features(batch["text2"])["embedding"]  # (b, E) EDA caption
        # the masked caption's ln_final outputs: T1's own (masked T1), or a pass over the masked copy (raw T1)
        raw = self.cfg.contrastive_text == "raw"
        mlm_tokens = m.text_features(batch["text_mlm"])["tokens"] if raw else t1["tokens"]  # (b, L, W)

        # MLM on the causal tower's ln_final outputs; the head only sees the masked positions. Kept per
        # sample (sum of cross-entropies, count) so the mean can span several micro-batches.
        labels = batch["mlm_labels"]  # (b, L), -100 where not masked
        masked = labels != -100
        rows = masked.nonzero(as_tuple=True)[0]  # (n,) the sample each masked position belongs to
        logits = self.text_label_predictor(mlm_tokens[masked])  # (n, V)
        target = labels[masked]  # (n,)
        b = labels.shape[0]
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == target).long()
        e = {"image1": f1["embedding"], "image2": img2,  # (b, E) projected, not normalised (SimSiam's input)
             "text1": F.normalize(t1["embedding"], dim=-1), "text2": F.normalize(t2, dim=-1),  # (b, E)
             "mlm_ce": mlm_loss_per_sample(logits, target, rows, b),  # (b,) summed over its masked tokens
             "mlm_count": masked.sum(dim=1),  # (b,) long
             "mlm_correct": torch.zeros(b, dtype=torch.long, device=labels.device).index_add(0, rows, correct)}
        return e, f1, t1

    def embed(self, batch) -> dict:
        return self.tower_outputs(batch)[0]

    def loss_from_embeddings(self, e: dict) -> dict:
        m = self.model
        img1, img2 = e["image1"], e["image2"]  # (b, E)
        # SimSiam on the projected image embeddings (the heads' BatchNorm sees the whole batch)
        z1, z2 = self.projector(img1), self.projector(img2)  # (b, P)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (b, P)
        out = {"simsiam_loss": simsiam_loss(p1, p2, z1, z2)}

        count = e["mlm_count"].sum().clamp(min=1)  # masked positions in the batch; mean CE over them
        out["mlm_loss"] = e["mlm_ce"].sum() / count  # = mlm_loss(logits, labels) of the whole batch

        image_1, image_2 = F.normalize(img1, dim=-1), F.normalize(img2, dim=-1)
        text_1, text_2 = e["text1"], e["text2"]
        scale = m.scale()  # 0-d
        out["mvs_loss"] = mvs_loss([image_1, image_2], [text_1, text_2], scale, group=self.group,
                                   loss_fn=self.contrastive)

        # both queries see the queue as it was before this step (commit() enqueues after)
        nn_1, nn_2 = self.nn_queue.query(text_1), self.nn_queue.query(text_2)  # (b, E) fp32
        out["nn_loss"] = nn_loss([image_1, image_2], [nn_1, nn_2], scale, group=self.group)
        out["mlm_acc"] = (e["mlm_correct"].sum() / count).float()
        out["logit_scale"] = scale.detach()
        return out

    def commit(self, e: dict) -> None:
        """After the step's loss: T2 then T1 of the whole batch go into this rank's queue (2b rows)."""
        self.nn_queue.enqueue(e["text2"])
        self.nn_queue.enqueue(e["text1"])

    # ------------------------------------------------------------------ per-rank state
    def extra_state(self) -> dict:
        return {"nn_queue": self.nn_queue.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "nn_queue" not in state:
            warnings.warn("DeCLIP: the checkpoint holds no nearest-neighbour queue for this rank; it restarts "
                          "from random vectors (as the reference's queue does on every resume).", RuntimeWarning)
            return
        self.nn_queue.load_state_dict(state["nn_queue"])
