"""DeCLIP's losses (METHODS.md §2) and its nearest-neighbour text queue; pure torch.

    simsiam_loss   image self-supervision: -1/2 [cos(p1, sg(z2)) + cos(p2, sg(z1))]
    mlm_loss       text self-supervision: mean cross-entropy over the masked positions
    mvs_loss       multi-view supervision: mean of clip_loss over (I1,T1), (I2,T1), (I1,T2), (I2,T2)
    nn_loss        nearest-neighbour supervision: image -> queue-neighbour-text InfoNCE only
    NNQueue        the per-rank FIFO of text embeddings the neighbours come from

Reduction follows §0: every loss is the local mean of this rank's rows; gathers whose backward sums
(clip_loss) or that carry no gradient (the neighbours) make DeepSpeed's gradient average equal the
gradient of the global-batch loss. simsiam, mlm and nn losses compute in float64 when given float64
(at least float32 otherwise); mvs inherits clip_loss's float32 logits.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from declip_ds.losses.clip import clip_loss
from declip_ds.losses.gather import all_gather_no_grad, world_info

__all__ = ["simsiam_loss", "mlm_loss", "mlm_loss_per_sample", "mvs_loss", "nn_loss", "NNQueue"]


def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The compute dtype: the widest input dtype, at least float32 (bf16 similarities lose too much)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetric negative cosine, as the DeCLIP reference's ``SimsiamLoss``.

    p1, p2: (b, d) predictor outputs of image views 1 and 2; z1, z2: (b, d) projector outputs.
    Returns -1/2 [mean_i cos(p1_i, sg(z2_i)) + mean_i cos(p2_i, sg(z1_i))], a 0-d tensor in [-1, 1];
    z receives no gradient through its own term (the stop-gradient), only through the predictor.
    """
    dtype = _dtype(p1, p2, z1, z2)

    def d(p, z):  # (b, d), (b, d) -> ()
        p = F.normalize(p.to(dtype), dim=-1)
        z = F.normalize(z.detach().to(dtype), dim=-1)
        return (p * z).sum(dim=-1).mean()

    return -0.5 * (d(p1, z2) + d(p2, z1))


def _mlm_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(..., V), (...) -> (N,) cross-entropy per position (0 where ignored), at least float32."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"mlm_loss: logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + (V,).")
    logits = logits.reshape(-1, logits.shape[-1]).to(_dtype(logits))  # (N, V)
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="none")


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not ``ignore_index``.

    logits: (..., V); labels: (...) long, the original ids at masked positions, ``ignore_index``
    elsewhere. With no masked position the result is 0 and still part of the graph (zero gradients),
    so every rank runs the same backward. No host synchronisation.
    """
    count = (labels != ignore_index).sum().clamp(min=1)
    return _mlm_ce(logits, labels, ignore_index).sum() / count


def mlm_loss_per_sample(logits: torch.Tensor, labels: torch.Tensor, sample: torch.Tensor, batch_size: int,
                        ignore_index: int = -100) -> torch.Tensor:
    """The cross-entropies of ``mlm_loss`` summed per sample instead of averaged, so the mean can be
    taken over several micro-batches: ``mlm_loss(logits, labels) == out.sum() / #masked``.

    logits: (n, V) at masked positions; labels: (n,); sample: (n,) long, the sample each position
    belongs to. Returns (batch_size,), 0 for samples without masked positions.
    """
    ce = _mlm_ce(logits, labels, ignore_index)  # (n,)
    return ce.new_zeros(batch_size).index_add(0, sample, ce)


def mvs_loss(images: Sequence[torch.Tensor], texts: Sequence[torch.Tensor], scale: torch.Tensor, *, group=None,
             loss_fn: Callable = clip_loss) -> torch.Tensor:
    """Multi-view supervision: the mean of ``loss_fn(I, T, scale)`` over every (image view, text view)
    pair, in the reference's order (I1,T1), (I2,T1), (I1,T2), (I2,T2) for two of each.

    images, texts: sequences of (b, D) L2-normalised local rows; ``loss_fn`` is ``clip_loss`` (or a
    kernel with its signature), which all-gathers the columns with gradient.
    """
    terms = [loss_fn(i, t, scale, group=group) for t in texts for i in images]
    return torch.stack(terms).mean()


def nn_loss(image_views: Sequence[torch.Tensor], nn_texts: Sequence[torch.Tensor], scale: torch.Tensor, *,
            group=None) -> torch.Tensor:
    """Nearest-neighbour supervision, image -> text only (the reference's ``nn_text_logits`` terms).

    image_views: (b, D) L2-normalised local image embeddings, one per view.
    nn_texts: (b, D) queue neighbours of the local texts, one per text view; they are detached,
        re-normalised and all-gathered without gradient into (W*b, D) columns.
    For every (view, neighbour set): CE(scale * I @ NNᵀ) with target rank*b + i (each image's own
    caption's neighbour); the result is the mean over all of them (for 2 x 2, the reference's
    mean over views of the mean of its NN(T1) and NN(T2) terms). Gradients reach the images and
    ``scale`` only.
    """
    rank, _ = world_info(group)
    b = image_views[0].shape[0]
    dtype = _dtype(*image_views, *nn_texts)
    labels = torch.arange(b, device=image_views[0].device) + rank * b  # (b,)
    s = scale.to(dtype)
    terms = []
    for nn_text in nn_texts:
        cols = all_gather_no_grad(F.normalize(nn_text.detach().to(dtype), dim=-1), group)  # (W*b, D)
        for image in image_views:
            logits = s * image.to(dtype) @ cols.t()  # (b, W*b)
            terms.append(F.cross_entropy(logits, labels))
    return torch.stack(terms).mean()


class NNQueue:
    """Per-rank FIFO of L2-normalised embeddings, DeCLIP's nearest-neighbour text bank (NNCLR style).

    ``size`` rows of ``dim`` floats, initialised with random unit vectors (from ``generator``), kept in
    float32 whatever the model's dtype, on the device of the last tensor it saw. Not an nn.Module:
    it is neither in the state dict (DeepSpeed saves the module from rank 0 only, which would give
    every rank rank 0's queue) nor cast by ``module.half()/.bfloat16()``; save it per rank through
    ``state_dict()`` / ``load_state_dict()``.

    query(x) (n, dim) -> (n, dim): for each row, the stored row of highest cosine similarity.
    enqueue(x): writes the rows at the pointer; at the end of the queue the batch's overflow is
        dropped and the pointer returns to 0 (the reference's lightly ``MemoryBankModule``). A batch
        with any non-finite value is not written (counted in ``rejected``): one NaN row would be every
        later query's arg-max and make the run's nn_loss NaN for good, although the step guard
        skipped the step that produced it.
    """

    def __init__(self, size: int, dim: int, *, generator: torch.Generator | None = None, device=None):
        if size <= 0 or dim <= 0:
            raise ValueError(f"NNQueue needs size > 0 and dim > 0, got size={size}, dim={dim}.")
        bank = torch.randn(size, dim, generator=generator, dtype=torch.float32)
        self.bank = F.normalize(bank, dim=1).to(device)  # (size, dim) fp32, unit rows
        self.ptr = 0
        self.rejected = 0  # rows not enqueued because their batch held NaN/inf

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def _follow(self, device) -> None:
        if self.bank.device != device:
            self.bank = self.bank.to(device)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) -> (n, dim) float32: top-1 cosine neighbours among the stored rows."""
        self._follow(x.device)
        q = F.normalize(x.detach().float(), dim=-1)  # (n, dim)
        index = (q @ self.bank.t()).argmax(dim=1)  # (n,) rows are unit: dot = cosine
        return self.bank.index_select(0, index)

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Write the rows of (n, dim) ``x`` (normalised, float32) at the pointer, FIFO."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"NNQueue.enqueue: expected (n, {self.dim}) rows, got {tuple(x.shape)}.")
        self._follow(x.device)
        x = F.normalize(x.detach().float(), dim=-1)
        if not bool(torch.isfinite(x).all()):
            self.rejected += x.shape[0]
            return
        n, ptr = x.shape[0], self.ptr
        if ptr + n >= self.size:  # fill to the end, drop the overflow, wrap (the reference's rule)
            self.bank[ptr:] = x[: self.size - ptr]
            self.ptr = 0
        else:
            self.bank[ptr : ptr + n] = x
            self.ptr = ptr + n

    def state_dict(self) -> dict:
        return {"bank": self.bank.detach().cpu().clone(), "ptr": int(self.ptr)}

    def load_state_dict(self, state: dict) -> None:
        bank = state["bank"]
        if tuple(bank.shape) != (self.size, self.dim):
            raise ValueError(
                f"NNQueue state has shape {tuple(bank.shape)} but this queue is ({self.size}, {self.dim}); "
                f"method.queue_size or model.embed_dim differ from the run that saved it."
            )
        ptr = int(state["ptr"])
        if not 0 <= ptr < self.size:
            raise ValueError(f"NNQueue state pointer {ptr} is outside [0, {self.size}).")
        self.bank = bank.detach().float().to(self.bank.device).clone()
        self.ptr = ptr
