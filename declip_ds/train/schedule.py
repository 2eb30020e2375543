"""Learning-rate schedule: linear warmup then cosine, a pure function of the step (resume-safe)."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, steps: int, warmup_steps: int, warmup_init_lr: float = 0.0, min_lr: float = 0.0) -> float:
    """LR for optimizer step ``step`` (0-based).

    Linear from ``warmup_init_lr`` to ``lr`` over ``warmup_steps``, then cosine from ``lr`` to ``min_lr``
    at ``steps`` (the DeCLIP recipe: 1e-4 -> peak over 2,500 steps, cosine to 0 at the last step).
    """
    if step < warmup_steps:
        return warmup_init_lr + (lr - warmup_init_lr) * step / warmup_steps
    span = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(train_cfg):
    """A LambdaLR multiplier (base lr = train.lr) for ``lr_at``."""

    def f(step: int) -> float:
        return (
            lr_at(
                step,
                lr=train_cfg.lr,
                steps=train_cfg.steps,
                warmup_steps=train_cfg.warmup_steps,
                warmup_init_lr=train_cfg.warmup_init_lr,
                min_lr=train_cfg.min_lr,
            )
            / train_cfg.lr
        )

    return f
