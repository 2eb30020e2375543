"""SimCLR's NT-Xent over all-gathered embeddings, as SLIP trains its image-only SSL term (METHODS.md §3).

Per local sample i of view a (rows), the candidates are all W*b gathered b-view embeddings (the
positive is its own b-view copy at column rank*b + i) plus all W*b gathered a-view embeddings with
its own a-view copy masked out. Both directions (a->b, b->a) are averaged. This is the official
SLIP ``SIMCLRLoss`` and, written with masks instead of a concatenation, the DeCLIP repo's
``NT_Xent_gather`` (same candidates, same positive, same mean over the 2b local rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from declip_ds.losses.gather import all_gather_with_grad, world_info


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.1, *, group=None, return_accuracy: bool = False):
    """NT-Xent between two views of the same local samples, negatives gathered over ``group``.

    z1, z2: (b, d) the two views' head outputs; they are L2-normalised here (cosine similarity, as in
        both reference implementations), in fp32 (float64 stays float64), so callers pass the raw
        head outputs.
    tau: temperature (SLIP: 0.1).
    group: a process group of W ranks, or None for one process. The gather carries gradient: each
        rank's loss is the mean over its 2b local rows, the gather's backward sums over ranks, and
        DeepSpeed's gradient averaging then yields the gradient of the global-batch loss.
    return_accuracy: also return the fraction of local rows (both directions) whose top-scoring
        candidate is the positive (SLIP's ``ssl_acc``, there in percent and for one direction).

    Returns the 0-d loss (fp32, or float64 for float64 inputs), or ``(loss, accuracy)``.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"simclr_loss needs two views of the same (b, d) shape, got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    rank, world = world_info(group)
    b = z1.shape[0]
    # at least fp32 from here on: bf16 logits divided by tau=0.1 lose the softmax's tail
    dtype = torch.promote_types(z1.dtype, torch.float32)
    q1, q2 = F.normalize(z1.to(dtype), dim=-1), F.normalize(z2.to(dtype), dim=-1)  # (b, d)
    k1, k2 = all_gather_with_grad(q1, group), all_gather_with_grad(q2, group)  # (W*b, d)
    labels = torch.arange(b, device=z1.device) + rank * b  # (b,) own copy's column in the gathered rows
    own = F.one_hot(labels, world * b).bool()  # (b, W*b) True at the sample's own same-view copy

    logits_12 = q1 @ k2.t() / tau  # (b, W*b): positives on the 'own' positions
    logits_21 = q2 @ k1.t() / tau
    logits_11 = (q1 @ k1.t() / tau).masked_fill(own, float("-inf"))  # (b, W*b): own copy is no candidate
    logits_22 = (q2 @ k2.t() / tau).masked_fill(own, float("-inf"))
    logits_1 = torch.cat([logits_12, logits_11], dim=1)  # (b, 2*W*b); label indexes the first half
    logits_2 = torch.cat([logits_21, logits_22], dim=1)
    loss = 0.5 * (F.cross_entropy(logits_1, labels) + F.cross_entropy(logits_2, labels))
    if not return_accuracy:
        return loss
    with torch.no_grad():
        correct = (logits_1.argmax(dim=1) == labels).sum() + (logits_2.argmax(dim=1) == labels).sum()
        accuracy = correct.float() / (2 * b)
    return loss, accuracy
