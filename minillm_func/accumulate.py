"""Gradient accumulation as pure state.

Micro-batch gradients are added *unnormalised* (gradients of the summed token
loss) together with their counts (tokens, or pairs for DPO); at the end of a
window the sum is divided by the window's total count. ``k`` micro-batches of
any lengths thus give exactly the full-batch gradient

    g = (sum_i grad S_i) / (sum_i N_i),

never the mean of per-micro-batch means, which weights short micro-batches up.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import tree as T

__all__ = ["AccumState", "accum_init", "accum_add", "accum_ready", "accum_result", "accum_reset"]


class AccumState(NamedTuple):
    """``grad_sum``: summed unnormalised gradients (like params); ``token_sum``: summed counts
    (0-d float64); ``micro_step``: micro-batches added since the last update (0-d int64)."""

    grad_sum: Any
    token_sum: torch.Tensor
    micro_step: torch.Tensor


def accum_init(params: Any) -> AccumState:
    """An empty window."""
    return AccumState(T.zeros_like(params), torch.zeros((), dtype=torch.float64),
                      torch.zeros((), dtype=torch.int64))


def accum_add(state: AccumState, grads: Any, count) -> AccumState:
    """Add one micro-batch: ``grads`` of its *summed* loss and its ``count`` of tokens (or pairs)."""
    return AccumState(T.add(state.grad_sum, grads), state.token_sum + count, state.micro_step + 1)


def accum_ready(state: AccumState, every: int) -> torch.Tensor:
    """0-d bool: the window holds ``every`` micro-batches."""
    return state.micro_step >= every


def accum_result(state: AccumState) -> Any:
    """The window's gradient: ``grad_sum / token_sum`` (a window with no token gives zeros, never NaN)."""
    count = state.token_sum.clamp_min(1.0)
    return T.tree_map(lambda g: g / count.to(g.dtype), state.grad_sum)  # keeps each leaf's dtype


def accum_reset(state: AccumState) -> AccumState:
    """An empty window with the same structure."""
    return AccumState(T.zeros_like(state.grad_sum), torch.zeros_like(state.token_sum),
                      torch.zeros_like(state.micro_step))
