"""Bad-step guard: a non-finite loss, or one above ``train.spike_factor`` x its running mean, is
skipped on every rank before backward (weights and optimizer moments untouched), counted and
recorded with its data position in ``<output_dir>/bad_batches.jsonl``, so a restart skips the same
batches. ``train.max_bad_steps`` in a row stop the run (``train.on_bad_steps: stop``) or roll back to
the last complete checkpoint (``rollback``; more than ``train.max_rollbacks`` in a row to the same
checkpoint stop the run). A skipped batch leaves no trace: the trainer restores the BatchNorm
statistics its forward changed (``BatchStats``) and drops its deferred ``Method.commit``. The guard's
running mean and counts are saved per rank in checkpoints.

Test hooks (``DECLIP_DS_FAULTS``, comma-separated ``kind@step:rank`` or ``kind@stepxN:rank`` for N times,
rank ``*`` = all): ``nan_loss``,
``spike_loss`` (loss x 1000) at optimizer step ``step`` (1-based), ``sigkill`` (the rank SIGKILLs itself
at optimizer step ``step``, before its loss reaches the other ranks), ``crash_in_save`` (the rank exits
with code 9 after DeepSpeed wrote its part of checkpoint ``step``), ``hide_newest`` (``--resume auto``
on the rank does not see the newest complete tag when its step is ``step``), ``data_error`` (the rank's loader
raises a DataError when it fetches a micro-batch of step ``step``). Under torchrun the hooks fire in the
first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), so a restarted run is not hit again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from declip_ds.config import ConfigError
from declip_ds.train import dist as D

log = logging.getLogger("declip_ds")


class BadStepsError(RuntimeError):
    """Too many consecutive non-finite or spiking losses."""


_FIRED: dict[str, int] = {}
_SEEN: dict[str, int] = {}


def _rank() -> str:
    """This process's rank, also before the process group exists (the launcher's RANK, or mpirun's / srun's own
    rank variable before it is adopted)."""
    return str(D.rank()) if dist.is_initialized() else str(D.env_rank()[0])


def fault(kind: str, step: int) -> bool:
    """Whether the test hook asks for fault ``kind`` at ``step`` on this rank. ``kind@step:rank`` fires
    once, ``kind@stepxN:rank`` N times (a skipped step is retried at the same step number);
    ``kind@step+S...`` lets the first S calls at that step pass (``nan_loss@4+1x2:*``: micro-batch 1
    of step 4, and its retry, are bad). Never after a torchrun restart."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    for item in filter(None, os.environ.get("DECLIP_DS_FAULTS", "").split(",")):
        name, _, where = item.partition("@")
        at, _, rank = where.partition(":")
        at, _, times = at.partition("x")
        at, _, skip = at.partition("+")
        if name == kind and int(at) == step and rank in ("*", _rank()):
            _SEEN[item] = _SEEN.get(item, 0) + 1
            if _SEEN[item] > int(skip or 0) and _FIRED.get(item, 0) < int(times or 1):
                _FIRED[item] = _FIRED.get(item, 0) + 1
                return True
    return False


class _InfGrad(torch.autograd.Function):
    """Identity forward, non-finite backward: a finite loss whose gradients overflow (test hook)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison_grad(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Test hook ``inf_grad@STEP:RANK``: this rank's gradients of ``loss`` at ``step`` are non-finite while
    the loss stays finite, so the loss guard lets it pass and DeepSpeed's overflow check must catch it."""
    return _InfGrad.apply(loss) if fault("inf_grad", step) else loss


class SkippedUpdates:
    """Optimizer updates DeepSpeed skipped itself (its ``skipped_steps``: a non-finite gradient under fp16,
    or under bf16 with ``check_grad_overflow``, whatever the loss): counted, logged and, unless fp16's loss
    scaler is still finding its scale, limited to ``train.max_bad_steps`` in a row (then BadStepsError)."""

    def __init__(self, engine, precision: str, max_in_a_row: int):
        self.engine, self.precision, self.max = engine, precision, max_in_a_row
        self.before, self.in_a_row = int(engine.skipped_steps), 0

    def after_step(self, step: int) -> None:
        now = int(self.engine.skipped_steps)  # the same on every rank: the overflow flag is all-reduced
        if now <= self.before:  # applied (or a rollback restored an older count)
            self.in_a_row, self.before = 0, now
            return
        self.in_a_row, self.before = self.in_a_row + 1, now
        scale = getattr(self.engine.optimizer, "loss_scale", None) if self.precision == "fp16" else None
        if D.rank() == 0:
            log.warning("step %d: DeepSpeed skipped the optimizer update (a non-finite gradient under %s%s); "
                        "%d in a row, %d in all", step, self.precision,
                        f", loss scale now {scale:g}" if scale is not None else "", self.in_a_row, now)
        if self.precision != "fp16" and self.max > 0 and self.in_a_row >= self.max:
            raise BadStepsError(
                f"DeepSpeed skipped {self.in_a_row} optimizer updates in a row for non-finite gradients (finite "
                f"losses) up to step {step}; stopping. Lower train.lr, set train.grad_clip, or resume from an "
                f"earlier checkpoint (--resume PATH).")


def _other_stream(recorded: dict, stream: dict) -> bool:
    """Whether a record's stream differs from this run's in a setting both name (a record written before a
    setting was part of the stream counts as having this run's value)."""
    return any(k in stream and stream[k] != v for k, v in recorded.items())


class Guard:
    """The bad-step guard: checks each loss (``check``), records skipped batches by their data position in
    ``bad_batches.jsonl`` (``record``), which a restart reads to pass over them. A position names the same
    samples only for the same data stream: ``stream`` (world size, data.workers, seed, mode, batch size,
    shards, their weights and sample count, shuffle buffer) is written with
    each record, and records of another stream are not passed over (with a warning)."""

    def __init__(self, train_cfg, run_dir: Path, stream: dict | None = None):
        self.factor, self.max_bad, self.action = train_cfg.spike_factor, train_cfg.max_bad_steps, train_cfg.on_bad_steps
        self.momentum, self.mean, self.seen = 0.98, None, 0
        self.in_a_row, self.total = 0, 0
        self.path = run_dir / "bad_batches.jsonl"
        self.stream = stream
        self.known = set()  # (epoch, batch-in-epoch) positions recorded by this or an earlier run
        other = 0
        if self.path.is_file():
            text = self.path.read_text()
            lines = text.splitlines()
            for i, line in enumerate(lines):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise ConfigError(f"{self.path}, line {i + 1}, is not a JSON record: {line[:80]!r}. "
                                          f"Fix or delete that line.") from None
                    # the last line of a run killed mid-write: ignored, and cut off (rank 0) so that
                    # the next record starts on a line of its own
                    log.warning("%s: ignoring its partly written last line %r", self.path, line[:80])
                    if D.rank() == 0:
                        os.truncate(self.path, len(text.encode()) - len(text.splitlines(keepends=True)[-1].encode()))
                    break
                if stream is not None and _other_stream(r.get("stream") or {}, stream):
                    other += 1
                    continue
                self.known.add((r["epoch"], r["epoch_batch"]))
        if other and D.rank() == 0:
            log.warning("%s: %d recorded bad batch(es) come from another data stream (world size, data.workers, "
                        "seed, data.mode, train.batch_size, the shards, their weights or sample count, or the "
                        "shuffle buffer changed): their positions hold other samples now, so they are not passed "
                        "over", self.path, other)

    def agree(self) -> None:
        """Collective: every rank passes over the same recorded batches. Each rank read bad_batches.jsonl on its own;
        a rank that saw another version of it (a network filesystem's stale copy) would pass over a batch the
        others train on, and from then on the ranks' collectives would pair up wrongly. The union is kept."""
        views = D.gather_objects(sorted(self.known))
        union = set().union(*(map(tuple, v) for v in views))
        if any(len(v) != len(union) for v in views):
            if D.rank() == 0:
                log.warning("%s: the ranks read different records (%s); every rank passes over all %d of them",
                            self.path, ", ".join(f"rank {r}: {len(v)}" for r, v in enumerate(views)), len(union))
        self.known = union

    def is_known_bad(self, epoch: int, epoch_batch: int) -> bool:
        return (epoch, epoch_batch) in self.known

    def check(self, loss: torch.Tensor, step: int) -> str | None:
        """Collective: the reason this micro-batch is bad on any rank, or None."""
        value = float(loss.detach())
        if fault("sigkill", step):  # test hook: this worker dies mid-step (RELIABILITY §4.20)
            os.kill(os.getpid(), signal.SIGKILL)
        if fault("nan_loss", step):
            value = float("nan")
        if fault("spike_loss", step):
            value *= 1000.0
        reason = 0
        if not math.isfinite(value):
            reason = 1
        elif self.factor > 0 and self.seen >= 10 and value > self.factor * self.mean:
            reason = 2
        reason = D.all_reduce_int(reason, op=dist.ReduceOp.MAX)
        if reason == 0:
            self.in_a_row = 0
            self.seen += 1
            self.mean = value if self.mean is None else self.momentum * self.mean + (1 - self.momentum) * value
            return None
        return "non-finite loss" if reason == 1 else f"loss above {self.factor} x its running mean ({self.mean:.4g})"

    def record(self, reason: str, step: int, batches) -> None:
        """Count one skipped batch (a micro-batch, or train.accumulation=contrastive's k micro-batches);
        rank 0 appends each of its ``(epoch, epoch_batch, keys)`` to bad_batches.jsonl."""
        self.in_a_row += 1
        self.total += 1
        for epoch, epoch_batch, _ in batches:
            self.known.add((epoch, epoch_batch))
        if D.rank() == 0:
            with open(self.path, "a") as f:
                for epoch, epoch_batch, keys in batches:
                    f.write(json.dumps({"step": step, "epoch": epoch, "epoch_batch": epoch_batch, "reason": reason,
                                        "keys": list(keys or [])[:8], "stream": self.stream}) + "\n")

    def too_many(self) -> bool:
        return self.max_bad > 0 and self.in_a_row >= self.max_bad

    # per-rank checkpoint state: the running mean is of this rank's losses
    def state_dict(self) -> dict:
        return {"mean": self.mean, "seen": self.seen, "total": self.total}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's guard state (none in checkpoints older than it: spike detection then warms up
        again). ``total`` never goes down: after a rollback it still counts the skips that caused it."""
        if state:
            self.mean, self.seen = state["mean"], int(state["seen"])
            self.total = max(self.total, int(state["total"]))
        self.in_a_row = 0


class BatchStats:
    """The buffers a train-mode forward changes (BatchNorm running statistics and batch counts):
    ``save()`` before a forward, ``restore()`` when the guard skips that micro-batch, so a skipped
    batch leaves no trace (one NaN would poison the running statistics, hence eval, for good)."""

    def __init__(self, module: torch.nn.Module):
        self.slots = [(m, name) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                      for name in ("running_mean", "running_var", "num_batches_tracked") if getattr(m, name) is not None]
        self.saved = None

    @torch.no_grad()
    def save(self) -> None:
        if self.saved is None or any(s.dtype != getattr(m, n).dtype for s, (m, n) in zip(self.saved, self.slots)):
            self.saved = [getattr(m, n).clone() for m, n in self.slots]
        else:
            for s, (m, n) in zip(self.saved, self.slots):
                s.copy_(getattr(m, n))

    @torch.no_grad()
    def restore(self) -> None:
        for s, (m, n) in zip(self.saved or [], self.slots):
            getattr(m, n).copy_(s)
