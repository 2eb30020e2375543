"""Contrastive-correct gradient accumulation (GradCache; open_clip's accum-freq).

Plain accumulation averages k losses over batches of b: each sample only meets b-1 negatives.
Here k micro-batches form ONE contrastive batch of k*b (per rank; W*k*b over ranks):

1. no-grad pass: embeddings of every micro-batch;
2. the loss of the concatenated embeddings, and its gradient with respect to them (cached);
3. per micro-batch: re-run the towers with grad and back-propagate <embeddings, cached gradient>,
   which gives exactly that micro-batch's share of the big batch's parameter gradient. Parameters
   the loss uses directly (the temperature) get their gradient from the loss recomputed on detached
   embeddings, added to the first micro-batch's surrogate.

The towers run twice (one extra forward), memory stays that of one micro-batch plus the k*b
embeddings. Exact for towers without batch statistics (BatchNorm in a tower sees micro-batches; a
BatchNorm head inside the loss, like SLIP's predictor_sim or DeCLIP's SimSiam heads, sees the whole
k*b batch). Methods opt in by splitting ``forward`` into ``embed`` (per sample) and
``loss_from_embeddings`` (what couples the batch, read-only on any per-step state), plus ``commit``
for state the step updates once its loss is known (DeCLIP's nearest-neighbour queue: all k*b
texts are looked up in the queue as it was before the step, then enqueued). All five methods do.
"""

from __future__ import annotations

import torch


def _cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class ContrastiveBatch:
    """``batches`` (k micro-batches) as one contrastive batch: ``.out``/``.loss`` after the no-grad
    pass, then ``backward(fn)`` runs the k gradient passes, ``fn(surrogate)`` back-propagating one
    micro-batch's surrogate without any 1/k scaling (DeepSpeed: ``engine.backward(x,
    scale_wrt_gas=False)`` then ``engine.step()``)."""

    def __init__(self, method, batches: list[dict]):
        self.method, self.batches = method, batches
        # BatchNorm running statistics: the no-grad pass (and a BatchNorm head inside the loss) must not
        # count; the grad passes of backward() update them once per micro-batch, as plain accumulation would
        bn_buffers = [b for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                      for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        saved = [b.clone() for b in bn_buffers]
        with torch.no_grad():
            embeddings = [method.embed(b) for b in batches]  # k dicts of (b, ...)
        self.sizes = [next(iter(e.values())).shape[0] for e in embeddings]
        self.leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in _cat(embeddings).items()}
        self.out = method.loss_from_embeddings(self.leaves)
        self.loss = method.total_loss(self.out)
        self._bn = (bn_buffers, saved)  # restored in backward(), once the graph above has been used

    def backward(self, backward_fn) -> None:
        method, leaves = self.method, self.leaves
        wanted = [k for k, v in leaves.items() if v.requires_grad]
        grads = torch.autograd.grad(self.loss, [leaves[k] for k in wanted], allow_unused=True)
        grads = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(wanted, grads)}
        with torch.no_grad():  # undo the statistics of the passes above; the passes below count once
            for buf, value in zip(*self._bn):
                buf.copy_(value)
        start = 0
        for i, (batch, n) in enumerate(zip(self.batches, self.sizes)):
            live = method.embed(batch)
            surrogate = sum((live[k] * grads[k][start:start + n].to(live[k].dtype)).sum() for k in wanted)
            if i == 0:  # the loss's own parameters (e.g. logit_scale), through detached embeddings
                fixed = {k: v.detach() for k, v in leaves.items()}
                surrogate = surrogate + method.total_loss(method.loss_from_embeddings(fixed))
            backward_fn(surrogate)
            start += n
        if method.training:  # per-step state the loss only read (DeCLIP's queue): updated once, for k*b
            method.commit(leaves)
