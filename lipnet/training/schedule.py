"""Learning-rate schedules as pure functions of the step (so that resuming is exact)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, shape: str = "cosine") -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then ``shape`` down to 0.

    Example:
        >>> [round(lr_factor(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {shape!r}; use 'cosine', 'linear' or 'constant'")


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   shape: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_factor` (its state dict is plain numbers)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, shape))


def plan_epochs(time_budget: float, seconds_so_far: float, seconds_per_epoch: float, max_epochs: int) -> int:
    """How many epochs in all fit in ``time_budget`` seconds, measured after the first epoch.

    ``seconds_so_far`` is what the first epoch took (compilation and warm-up included) and
    ``seconds_per_epoch`` the steady-state estimate of each further one. At least the epoch
    already done, at most ``max_epochs``.

    Example:
        >>> plan_epochs(100.0, seconds_so_far=30.0, seconds_per_epoch=10.0, max_epochs=20)
        8
        >>> plan_epochs(100.0, seconds_so_far=120.0, seconds_per_epoch=10.0, max_epochs=20)
        1
    """
    if seconds_per_epoch <= 0:
        return max_epochs
    further = math.floor(max(0.0, time_budget - seconds_so_far) / seconds_per_epoch)
    return max(1, min(max_epochs, 1 + further))
