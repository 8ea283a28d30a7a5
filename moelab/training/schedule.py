"""The learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import functools
import math

import torch

from ..core.config import check_float, check_int


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The lr multiplier of the optimizer step with 0-based index `step`.

    Warmup: (step + 1) / warmup_steps, so the first step already learns and step warmup_steps - 1 is at the peak.
    Then min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2 with p = (step - warmup) / (total - warmup)
    going from 0 to 1 over the remaining steps (clamped at 1: past total_steps the lr stays at the floor).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR giving each param group `lr * warmup_cosine_factor(step, ...)`; call `.step()` after each
    optimizer step."""
    check_int("total_steps", total_steps, 1)
    check_int("warmup_steps", warmup_steps, 0, total_steps, "total_steps")
    check_float("min_lr_ratio", min_lr_ratio, inclusive=True)
    if min_lr_ratio > 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    factor = functools.partial(warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                               min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
