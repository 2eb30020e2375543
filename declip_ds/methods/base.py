"""What every method shares: the towers, the views it asks of the data, its named losses."""

from __future__ import annotations

import torch
import torch.nn as nn

from declip_ds.config import Experiment, MethodConfig
from declip_ds.losses.select import get_clip_loss


class Method(nn.Module):
    """A training method: ``forward(batch) -> dict`` of named losses (keys ending in ``_loss``).

    The engine sums ``loss_weights()[k] * out[k]`` over the ``_loss`` keys; other keys are logged.
    Subclasses set ``Config`` (a MethodConfig dataclass) and register with ``@register_method``.
    """

    Config = MethodConfig
    name = "base"

    def __init__(self, exp: Experiment, group=None):
        super().__init__()
        from declip_ds.models import build_model

        self.exp = exp
        self.cfg = exp.method
        self.group = group  # the data-parallel process group the losses gather over (None = 1 process)
        self.model = build_model(exp.model)
        # the symmetric InfoNCE (clip_loss signature): the torch reference or the fused Triton kernel
        self.contrastive = get_clip_loss(exp.loss.impl)

    # ------------------------------------------------------------------ data
    def tokenizer(self):
        from declip_ds.data.tokenizer import Tokenizer

        return Tokenizer(context_length=self.exp.model.text.context_length, mask_token=self.exp.model.text.mask_token)

    def sample_transform(self):
        """The per-sample callable ``(PIL image, caption) -> dict of tensors`` this method trains on."""
        raise NotImplementedError

    # ------------------------------------------------------------------ losses
    def loss_weights(self) -> dict[str, float]:
        raise NotImplementedError

    def total_loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.loss_weights()
        missing = [k for k in out if k.endswith("_loss") and k not in weights]
        if missing:
            raise KeyError(f"{type(self).__name__} returned losses without a weight: {missing}")
        return sum(weights[k] * v for k, v in out.items() if k.endswith("_loss") and weights[k] != 0)

    # ------------------------------------------------------------------ contrastive accumulation
    # A method whose losses are batch-contrastive over per-sample embeddings can split its forward
    # into ``embed(batch) -> dict of (b, ...) tensors`` and ``loss_from_embeddings(dict) -> losses``;
    # train.accumulation=contrastive then treats k micro-batches as one batch of k*b.
    supports_contrastive_accumulation = False

    def commit(self, embeddings: dict) -> None:
        """Update per-step state from a finished batch's embeddings (DeCLIP's queue); called once per
        optimizer step by contrastive accumulation, and by ``forward`` itself (through
        ``commit_after_forward``) where a method has such state."""

    # The trainer sets ``defer_commit``: forward() then keeps its embeddings, and the trainer calls
    # ``commit_deferred(keep)`` once the bad-step guard has judged the loss (a skipped micro-batch must
    # not reach the queue). Unset (tests, scripts), forward() commits at once.
    defer_commit = False
    _deferred = None

    def commit_after_forward(self, embeddings: dict) -> None:
        if self.defer_commit:
            self._deferred = embeddings
        else:
            self.commit(embeddings)

    def commit_deferred(self, keep: bool = True) -> None:
        """``commit()`` what the last forward deferred (``keep``) or drop it (a skipped micro-batch)."""
        embeddings, self._deferred = self._deferred, None
        if keep and embeddings is not None:
            self.commit(embeddings)

    # ------------------------------------------------------------------ state beyond parameters
    def scale_parameters(self) -> list[nn.Parameter]:
        """Temperature parameters clamped to ``model.logit_scale_bounds`` after every step."""
        return [self.model.logit_scale]

    def extra_state(self) -> dict:
        """Per-rank state saved in checkpoints besides parameters (e.g. DeCLIP's queue)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
