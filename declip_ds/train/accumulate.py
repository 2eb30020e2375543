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
embeddings. Under DeepSpeed every tower pass goes through the engine's forward (``runner``), as
``engine(batch)`` does in plain accumulation: ZeRO-3 gathers the parameters the method reads itself (the
temperature) in the method's forward hooks, and counts its micro-steps in the engine's forward (0.19:
``clear_backward_seen_flag``); called around the engine, every micro-step's gradient replaced the
previous one instead of adding to it. Exact for towers without batch statistics (BatchNorm in a tower sees micro-batches; a
BatchNorm head inside the loss, like SLIP's predictor_sim or DeCLIP's SimSiam heads, sees the whole
k*b batch). Methods opt in by splitting ``forward`` into ``embed`` (per sample) and
``loss_from_embeddings`` (what couples the batch, read-only on any per-step state), plus ``commit``
for state the step updates once its loss is known (DeCLIP's nearest-neighbour queue: all k*b
texts are looked up in the queue as it was before the step, then enqueued). All five methods do.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _scales_gathered(method):
    """ZeRO-3: the temperatures gathered (read-only) around a loss evaluated outside the module's forward;
    otherwise nothing to do."""
    partitioned = [p for p in method.scale_parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


class ContrastiveBatch:
    """``batches`` (k micro-batches) as one contrastive batch: ``.out``/``.loss`` after the no-grad
    pass, then ``backward(fn)`` runs the k gradient passes, ``fn(surrogate)`` back-propagating one
    micro-batch's surrogate without any 1/k scaling (DeepSpeed: ``engine.backward(x,
    scale_wrt_gas=False)`` then ``engine.step()``)."""

    def __init__(self, method, batches: list[dict], runner=None):
        """runner: what calls the method's forward (the DeepSpeed engine in training; default the method)."""
        self.method, self.batches, self.runner = method, batches, runner or method
        # BatchNorm running statistics: the no-grad pass (and a BatchNorm head inside the loss) must not
        # count; the grad passes of backward() update them once per micro-batch, as plain accumulation would
        bn_buffers = [b for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                      for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        saved = [b.clone() for b in bn_buffers]
        with torch.no_grad():
            embeddings = [self._run(method.embed, b) for b in batches]  # k dicts of (b, ...)
        self.sizes = [next(iter(e.values())).shape[0] for e in embeddings]
        self.leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in _cat(embeddings).items()}
        # outside the module's forward: the autograd.grad below is no engine backward, and DeepSpeed would
        # count one through the forward's hooks (a micro-step, or its gradients divided by grad_accum)
        with _scales_gathered(method):
            self.out = method.loss_from_embeddings(self.leaves)
        self.loss = method.total_loss(self.out)
        self._bn = (bn_buffers, saved)  # restored in backward(), once the graph above has been used

    def _run(self, fn, x):
        """``fn(x)`` as the method's forward, called through the runner (and so through its hooks and
        bookkeeping). ``nn.Module.__call__`` looks ``forward`` up on the instance."""
        self.method.forward = fn
        try:
            return self.runner(x)
        finally:
            del self.method.forward

    def _surrogate(self, inputs, first: bool) -> dict:
        """The terms of one micro-batch's surrogate: <live embeddings, their cached gradient>; for the first,
        also the loss on the detached embeddings (the gradient of the loss's own parameters, e.g.
        logit_scale). Summed by the caller, outside the forward, as the trainer sums a forward's losses:
        DeepSpeed (0.19) divides the gradient reaching a forward's outputs by grad_accum unless the tensor
        handed to engine.backward is computed from them."""
        batch, grads = inputs
        live = self.method.embed(batch)
        terms = {"embeddings": sum((live[k] * g.to(live[k].dtype)).sum() for k, g in grads.items())}
        if first:
            fixed = {k: v.detach() for k, v in self.leaves.items()}
            terms["loss"] = self.method.total_loss(self.method.loss_from_embeddings(fixed))
        return terms

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
            part = {k: grads[k][start:start + n] for k in wanted}
            # one forward per micro-batch, like engine(batch) in plain accumulation
            terms = self._run(functools.partial(self._surrogate, first=i == 0), (batch, part))
            backward_fn(sum(terms.values()))
            start += n
        if method.training:  # per-step state the loss only read (DeCLIP's queue): updated once, for k*b
            method.commit(leaves)
