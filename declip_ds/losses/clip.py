"""CLIP's symmetric InfoNCE over all-gathered columns (the reference implementation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from declip_ds.losses.gather import all_gather_no_grad, all_gather_with_grad, world_info


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, *, group=None,
              gather_grad: bool = True) -> torch.Tensor:
    """Symmetric cross-entropy of CLIP, local rows against all-gathered columns.

    image_features, text_features: (b, D) local rows, already L2-normalised.
    scale: the logit multiplier t = exp(logit_scale) (a 0-d tensor), as in open_clip.
    group: a process group of W ranks, or None for a single process (no gathering).

    Rows are the local b samples, columns all W*b samples, labels rank*b + arange(b); the result is
    the mean of the image->text and text->image cross-entropies of the local rows. Averaged over
    ranks (DeepSpeed's gradient averaging) its gradient equals that of the global-batch loss.

    gather_grad=False: the columns are gathered without a gradient path, as the official SLIP repo's
    CLIPLoss does (``utils.all_gather_batch``): the same value, but each rank's loss only reaches its
    own rows (the column terms of the global-batch gradient are dropped). With one process nothing is
    gathered and both give the same gradient, as in that repo.
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"clip_loss needs image and text features of the same (b, D) shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    rank, _ = world_info(group)
    b = image_features.shape[0]
    gather = all_gather_with_grad if gather_grad else all_gather_no_grad
    all_image = gather(image_features, group)  # (W*b, D)
    all_text = gather(text_features, group)  # (W*b, D)
    labels = torch.arange(b, device=image_features.device) + rank * b  # (b,)
    # logits in fp32 whatever the feature dtype: bf16 logits lose the softmax's tail
    logits_i2t = scale.float() * image_features.float() @ all_text.float().t()  # (b, W*b)
    logits_t2i = scale.float() * text_features.float() @ all_image.float().t()  # (b, W*b)
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
