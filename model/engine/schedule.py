"""Learning-rate and distillation-weight schedules of the ALBEF pretraining recipe.

Learning rate (docs/METHOD.md §4): linear warm-up from `warmup_lr` to `lr` over the
first `warmup_steps` optimiser steps, then cosine from `lr` down to `min_lr` at
the last step. The reference steps its cosine once per epoch; stepping it every
optimiser step follows the same curve at a finer grain.

Alpha (docs/METHOD.md §4): `alpha * min(1, micro_step / batches_per_epoch)`, i.e.
ramped linearly from 0 over the first epoch's iterations, constant after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"schedule total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (self.lr > 0 and self.warmup_lr >= 0 and self.min_lr >= 0):
            raise ValueError(
                f"learning rates must be positive: lr={self.lr}, warmup_lr={self.warmup_lr}, min_lr={self.min_lr}")

    def __call__(self, step: int) -> float:
        """Learning rate for optimiser step `step` (0-based: the first update uses step 0)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def factor(self, step: int) -> float:
        """`self(step) / lr`: the multiplier a `torch.optim.lr_scheduler.LambdaLR` expects."""
        return self(step) / self.lr


def alpha_at(micro_step: int, batches_per_epoch: int, alpha: float) -> float:
    """Distillation weight for the `micro_step`-th batch since the start of training."""
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
    return alpha * min(1.0, micro_step / batches_per_epoch)
