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

__all__ = ["constant", "cosine_annealing", "warmup_cosine", "linear_schedule", "linear_decay", "wsd"]

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


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    r"""optax's ``linear_schedule``: ``init_value`` for ``transition_begin`` steps, then a straight line to
    ``end_value`` over ``transition_steps`` steps, then ``end_value``.

    .. math:: \eta(s) = E + (I - E)\Big(1 - \frac{\min(\max(s - B,\, 0),\, T)}{T}\Big)

    with :math:`I, E, B, T` the arguments in order. As in optax,
    ``transition_steps <= 0`` gives the constant ``init_value``; a negative
    ``transition_begin`` (which optax replaces by 0 with a log line) is an error.

    Example::

        lr = linear_schedule(1e-3, 0.0, transition_steps=1000)   # lr(0) = 1e-3, lr(500) = 5e-4, lr(1000) = 0
    """
    if transition_begin < 0:
        raise ValueError(f"linear_schedule: transition_begin must be >= 0 (steps to hold init_value), got "
                         f"{transition_begin}.")
    if transition_steps <= 0:
        return constant(init_value)

    def schedule(step):
        done = (_steps(step) - transition_begin).clamp(0, transition_steps)
        return (init_value - end_value) * (1 - done / transition_steps) + end_value

    return schedule


def linear_decay(peak_value: float, total_steps: int, end_value: float = 0.0) -> Schedule:
    r"""From ``peak_value`` at step 0 straight down to ``end_value`` at ``total_steps``, then held:
    ``linear_schedule(peak_value, end_value, total_steps)``.

    .. math:: \eta(s) = \eta_{end} + (\eta_{peak} - \eta_{end}) \big(1 - \min(s, S)/S\big)
    """
    if total_steps <= 0:
        raise ValueError(f"linear_decay: total_steps must be a positive number of steps, got {total_steps}.")
    return linear_schedule(peak_value, end_value, total_steps)


_WSD_SHAPES = ("linear", "1-sqrt")


def wsd(peak_value: float, total_steps: int, warmup_steps: int = 0, decay_steps: int | None = None,
        end_value: float = 0.0, decay_shape: str = "linear", *, decay_fraction: float | None = None) -> Schedule:
    r"""Warm-up, stable, decay: the trapezoid of Hägele et al. 2024 ("Scaling Laws and Compute-Optimal
    Training Beyond Fixed Training Durations").

    With :math:`w` = ``warmup_steps``, :math:`S` = ``total_steps``, :math:`D` the
    cool-down length and :math:`p = (s - (S - D)) / D`:

    .. math::

        \eta(s) = \begin{cases}
            \eta_{peak}\,(s + 1)/w & s < w \\
            \eta_{peak} & w \le s < S - D \\
            \eta_{end} + (\eta_{peak} - \eta_{end})\, f(p) & S - D \le s < S \\
            \eta_{end} & s \ge S
        \end{cases}
        \qquad f(p) = \begin{cases} 1 - p & \text{"linear"} \\ 1 - \sqrt{p} & \text{"1-sqrt"} \end{cases}

    The warm-up is linear from 0 as :func:`warmup_cosine`'s (the first update
    already gets :math:`\eta_{peak}/w`, the peak is reached at update
    :math:`w - 1`). The cool-down starts at the peak at :math:`s = S - D` and
    reaches ``end_value`` at :math:`s = S`, as in the paper's code. "1-sqrt" is
    the cool-down the paper found best (it drops fast at first and flattens
    out); "linear" is the common default.

    Give the cool-down length as ``decay_steps`` or as ``decay_fraction`` of
    ``total_steps`` (rounded to the nearest step); with neither, 20% (the
    paper's usual choice). The stable phase, and so the point where a run can
    be branched into a cool-down, needs no other setting: with ``decay_steps``
    fixed, the same schedule with a larger ``total_steps`` is identical up to
    the old cool-down's start.

    Example::

        lr = wsd(3e-4, total_steps=10_000, warmup_steps=500, decay_shape="1-sqrt")   # 2000-step cool-down
    """
    if decay_shape not in _WSD_SHAPES:
        raise ValueError(f"wsd: decay_shape must be one of {', '.join(map(repr, _WSD_SHAPES))}, got {decay_shape!r}.")
    if decay_steps is not None and decay_fraction is not None:
        raise ValueError("wsd: give the cool-down as decay_steps or as decay_fraction, not both.")
    if total_steps <= 0:
        raise ValueError(f"wsd: total_steps must be a positive number of steps, got {total_steps}.")
    if decay_steps is None:
        fraction = 0.2 if decay_fraction is None else decay_fraction
        if not 0 < fraction <= 1:
            raise ValueError(f"wsd: decay_fraction must lie in (0, 1], got {fraction}.")
        decay_steps = max(1, round(fraction * total_steps))
    if not (0 <= warmup_steps and 1 <= decay_steps and warmup_steps + decay_steps <= total_steps):
        raise ValueError(
            f"wsd: need warmup_steps >= 0, decay_steps >= 1 and warmup_steps + decay_steps <= total_steps, got "
            f"warmup_steps={warmup_steps}, decay_steps={decay_steps}, total_steps={total_steps}.")
    decay_start = total_steps - decay_steps

    def schedule(step):
        s = _steps(step)
        warm = peak_value * (s + 1) / max(warmup_steps, 1)
        p = ((s - decay_start) / decay_steps).clamp(0.0, 1.0)
        shape = 1 - p if decay_shape == "linear" else 1 - p.sqrt()
        cool = end_value + (peak_value - end_value) * shape
        return torch.where(s < warmup_steps, warm, torch.where(s < decay_start, torch.full_like(s, peak_value), cool))

    return schedule
