"""Bad-step guard: a non-finite loss, or one above ``train.spike_factor`` x its running mean, is
skipped on every rank before backward (weights and optimizer moments untouched), counted and
recorded with its data position in ``<output_dir>/bad_batches.jsonl``, so a restart skips the same
batches. ``train.max_bad_steps`` in a row stop the run (``train.on_bad_steps: stop``) or roll back to
the last complete checkpoint (``rollback``).

Test hooks (``DECLIP_DS_FAULTS``, comma-separated ``kind@step:rank`` or ``kind@stepxN:rank`` for N times,
rank ``*`` = all): ``nan_loss``,
``spike_loss`` (loss x 1000) at optimizer step ``step`` (1-based), ``crash_in_save`` (the rank exits
with code 9 after DeepSpeed wrote its part of checkpoint ``step``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from declip_ds.train import dist as D


class BadStepsError(RuntimeError):
    """Too many consecutive non-finite or spiking losses."""


_FIRED: dict[str, int] = {}


def fault(kind: str, step: int) -> bool:
    """Whether the test hook asks for fault ``kind`` at ``step`` on this rank. ``kind@step:rank`` fires
    once, ``kind@stepxN:rank`` N times (a skipped step is retried at the same step number)."""
    for item in filter(None, os.environ.get("DECLIP_DS_FAULTS", "").split(",")):
        name, _, where = item.partition("@")
        at, _, rank = where.partition(":")
        at, _, times = at.partition("x")
        if name == kind and int(at) == step and rank in ("*", str(D.rank())):
            if _FIRED.get(item, 0) < int(times or 1):
                _FIRED[item] = _FIRED.get(item, 0) + 1
                return True
    return False


class Guard:
    def __init__(self, train_cfg, run_dir: Path):
        self.factor, self.max_bad, self.action = train_cfg.spike_factor, train_cfg.max_bad_steps, train_cfg.on_bad_steps
        self.momentum, self.mean, self.seen = 0.98, None, 0
        self.in_a_row, self.total = 0, 0
        self.path = run_dir / "bad_batches.jsonl"
        self.known = set()  # (epoch, batch-in-epoch) positions recorded by this or an earlier run
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                r = json.loads(line)
                self.known.add((r["epoch"], r["epoch_batch"]))

    def is_known_bad(self, epoch: int, epoch_batch: int) -> bool:
        return (epoch, epoch_batch) in self.known

    def check(self, loss: torch.Tensor, step: int) -> str | None:
        """Collective: the reason this micro-batch is bad on any rank, or None."""
        value = float(loss.detach())
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

    def record(self, reason: str, step: int, epoch: int, epoch_batch: int, keys) -> None:
        """Count a skipped micro-batch; rank 0 appends it to bad_batches.jsonl."""
        self.in_a_row += 1
        self.total += 1
        self.known.add((epoch, epoch_batch))
        if D.rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "epoch_batch": epoch_batch, "reason": reason,
                                    "keys": list(keys or [])[:8]}) + "\n")

    def too_many(self) -> bool:
        return self.max_bad > 0 and self.in_a_row >= self.max_bad
