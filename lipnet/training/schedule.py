"""Learning-rate schedules as pure functions of the step (so that resuming is exact)."""

from __future__ import annotations

import math

import torch

SHAPES = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, shape: str = "cosine") -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then ``shape`` down to 0.

    Example:
        >>> [round(lr_factor(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if shape not in SHAPES:  # before the warm-up, not when it ends hours into a run
        raise ValueError(f"unknown schedule {shape!r}; use 'cosine', 'linear' or 'constant'")
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"total_steps and warmup_steps must be >= 0, got {total_steps} and {warmup_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceed total_steps ({total_steps}): the rate would never "
                         "decay; warm up for at most the whole run")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if shape == "linear":
        return 1.0 - progress
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   shape: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_factor` (its state dict is plain numbers)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, shape))


def plan_epochs(time_budget: float, seconds_so_far: float, seconds_per_epoch: float, max_epochs: int, *,
                epochs_done: int = 1, eval_seconds: float = 0.0, eval_every: int = 1) -> int:
    """How many epochs in all fit in ``time_budget`` seconds, measured after ``epochs_done`` epochs.

    ``seconds_so_far`` is everything those epochs took (training and test-set estimates,
    compilation and warm-up included) and ``seconds_per_epoch`` the steady-state estimate of
    the training of each further one; a further epoch that takes the test-set estimate (every
    ``eval_every``-th epoch, and the last) costs ``eval_seconds`` more. At least the epochs
    already done (and 1), at most ``max_epochs``.

    Example:
        >>> plan_epochs(100.0, seconds_so_far=30.0, seconds_per_epoch=10.0, max_epochs=20)
        8
        >>> plan_epochs(100.0, seconds_so_far=120.0, seconds_per_epoch=10.0, max_epochs=20)
        1
        >>> plan_epochs(100.0, 30.0, 10.0, 20, eval_seconds=20.0, eval_every=3)  # estimates after epochs 3 and 4
        4
    """
    done = max(1, epochs_done)

    def cost(total: int) -> float:  # of epochs done + 1 ... total
        estimates = total // eval_every - done // eval_every + (total % eval_every != 0)
        return (total - done) * seconds_per_epoch + estimates * eval_seconds

    low, high = done, max(done, max_epochs)  # the cost grows with the total: the largest that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if seconds_so_far + cost(middle) <= time_budget:
            low = middle
        else:
            high = middle - 1
    return low
