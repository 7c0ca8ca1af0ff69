"""Learning-rate schedules: pure functions ``step -> lr``.

``step`` is the number of optimizer updates already done (an int or a 0-d
tensor, also a batched one under ``vmap``); the result is a float64 tensor of
the same shape. No Python branching on the step: every schedule is one
expression, so it compiles once and vmaps.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["constant", "cosine_annealing", "warmup_cosine"]

Schedule = Callable[[torch.Tensor], torch.Tensor]


def _steps(step) -> torch.Tensor:
    return torch.as_tensor(step).to(torch.float64)


def constant(value: float) -> Schedule:
    """``lr(step) = value``."""
    return lambda step: torch.full_like(_steps(step), value)


def cosine_annealing(base_lr: float, T_max: int = 1000, eta_min: float = 0.0) -> Schedule:
    r"""The learning rate ``torch.optim.lr_scheduler.CosineAnnealingLR`` gives after ``step`` scheduler steps.

    .. math:: \eta(s) = \eta_{min} + (\eta_{base} - \eta_{min})\,\frac{1 + \cos(\pi s / T_{max})}{2}

    Like torch's scheduler this does **not** stop at ``T_max``: it is periodic,
    reaching ``eta_min`` at ``T_max`` and climbing back to ``base_lr`` at
    ``2 T_max``. torch computes it recursively (a ratio of consecutive cosines);
    this closed form gives the same values to float64 rounding, for every step.
    Kept for parity with the original design; for new runs prefer
    :func:`warmup_cosine`, which holds its final value.
    """
    if T_max <= 0:
        raise ValueError(f"cosine_annealing: T_max must be a positive number of steps, got {T_max}.")

    def schedule(step):
        return eta_min + (base_lr - eta_min) * (1 + torch.cos(math.pi * _steps(step) / T_max)) / 2

    return schedule


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0) -> Schedule:
    r"""Linear warm-up, then a half cosine from ``peak_lr`` to ``end_lr``, then constant at ``end_lr``.

    .. math::

        \eta(s) = \begin{cases}
            \eta_{peak}\,(s + 1)/w & s < w \\
            \eta_{end} + (\eta_{peak} - \eta_{end})\,\frac{1 + \cos(\pi \min(1, (s - w)/(S - w)))}{2} & s \ge w
        \end{cases}

    with :math:`w` = ``warmup_steps`` and :math:`S` = ``total_steps``. The
    first update already gets a non-zero rate; past ``total_steps`` the rate
    stays at ``end_lr`` (no restart).
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_cosine: need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}.")

    def schedule(step):
        s = _steps(step)
        warm = peak_lr * (s + 1) / max(warmup_steps, 1)
        progress = ((s - warmup_steps) / (total_steps - warmup_steps)).clamp(0.0, 1.0)
        decay = end_lr + (peak_lr - end_lr) * (1 + torch.cos(math.pi * progress)) / 2
        return torch.where(s < warmup_steps, warm, decay)

    return schedule
