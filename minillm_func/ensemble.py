"""Ensembles: train K models at once by ``vmap``-ing the pure train step.

Because the step is a pure function of a state pytree, K states stacked along
a new leading axis are trained by ``torch.func.vmap(step)`` in one call: K
seeds, K learning rates (held in the state with ``optim.inject_hyperparams``),
K data orders. Each member follows exactly the trajectory it would follow
alone. No imperative trainer can do this without K copies of its loop.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import tree as T

__all__ = ["stack", "unstack", "vmap_step"]


def stack(trees: Sequence[Any]) -> Any:
    """K pytrees of the same structure -> one pytree whose leaves have a leading axis of size K."""
    if not trees:
        raise ValueError("stack: got no trees; pass one state per ensemble member.")
    return T.tree_map(lambda *xs: torch.stack(xs), *trees)


def unstack(tree: Any) -> list:
    """The inverse of :func:`stack`: member ``i`` is every leaf's ``[i]``."""
    k = T.leaves(tree)[0].shape[0]
    return [T.tree_map(lambda x: x[i], tree) for i in range(k)]


def vmap_step(step: Callable, *, shared_batch: bool = True) -> Callable:
    """``step`` over stacked states: ``(states, batch) -> (states, metrics)``, metrics stacked too.

    ``shared_batch=True``: every member sees the same batch; ``False``: the
    batch is stacked too (member ``i`` gets ``batch[...][i]``). The gradient is
    taken with ``torch.func`` inside ``vmap`` (``value_and_grad`` picks it), and
    the optimizer takes its per-leaf path there.
    """
    vstep = torch.func.vmap(step, in_dims=(0, None if shared_batch else 0), randomness="error")

    def run(states, batch):
        # The CPU flash-attention kernel has no vmap batching rule (torch falls back to
        # a slow per-member loop); the math kernel is plain matmuls and softmax, which batch.
        with sdpa_kernel(SDPBackend.MATH):
            return vstep(states, batch)

    return run
