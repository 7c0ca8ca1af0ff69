"""Pytree helpers over ``optree``.

States in this library are NamedTuples, dicts, tuples and lists of tensors:
containers that both ``optree`` and ``torch.utils._pytree`` understand, so they
pass through ``torch.func`` transforms and ``torch.compile`` unchanged. Every
helper here returns a new tree and never mutates its inputs.
"""
from __future__ import annotations

from typing import Any, Callable

import optree
import torch

PyTree = Any

__all__ = [
    "leaves", "unflatten_like", "tree_map", "zeros_like", "add", "sub", "scale", "global_norm",
    "all_finite", "select", "cast", "num_params",
]


def leaves(tree: PyTree) -> list:
    """The leaves of ``tree`` in ``optree``'s canonical order (dict keys sorted)."""
    return optree.tree_leaves(tree)


def unflatten_like(tree: PyTree, new_leaves: list) -> PyTree:
    """A tree with the structure of ``tree`` and the given leaves (in ``leaves(tree)`` order)."""
    return optree.tree_unflatten(optree.tree_structure(tree), new_leaves)


def tree_map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` applied leaf by leaf over trees of the same structure."""
    return optree.tree_map(fn, tree, *rest)


def zeros_like(tree: PyTree) -> PyTree:
    """A tree of the same structure whose tensors are zeros of the same shape and dtype."""
    return tree_map(torch.zeros_like, tree)


def add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a + b``."""
    return tree_map(torch.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``."""
    return tree_map(torch.sub, a, b)


def scale(tree: PyTree, factor) -> PyTree:
    """Leafwise ``factor * x``; ``factor`` is a number or a 0-d tensor (no host sync)."""
    return tree_map(lambda x: x * factor, tree)


def global_norm(tree: PyTree) -> torch.Tensor:
    """``sqrt(sum_i ||x_i||^2)`` over every leaf, as a 0-d tensor.

    Computed the way ``torch.nn.utils.clip_grad_norm_`` does: the 2-norm of each
    leaf, then the 2-norm of those norms, in the leaves' dtype. An empty tree
    has norm 0.
    """
    xs = leaves(tree)
    if not xs:
        return torch.zeros(())
    if len({x.dtype for x in xs}) > 1:  # mixed dtypes: measure all in float32
        xs = [x.float() for x in xs]
    if _functorch_wrapped(xs):  # foreach kernels have no vmap batching rule
        norms = [torch.linalg.vector_norm(x) for x in xs]
    else:  # one fused kernel launch for all leaves, as clip_grad_norm_ does
        norms = torch._foreach_norm(xs)
    return torch.linalg.vector_norm(torch.stack(norms))


def _functorch_wrapped(xs: list) -> bool:
    """True inside ``torch.func`` transforms (vmap, grad), where ``torch._foreach_*`` may not apply.

    Under ``torch.compile`` it answers False without asking (the compiler cannot trace
    the query, and callers there take their per-leaf path anyway).
    """
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in xs)


def all_finite(tree: PyTree) -> torch.Tensor:
    """A 0-d bool tensor: true when no leaf holds an inf or a NaN (no host sync)."""
    xs = leaves(tree)
    if not xs:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(x).all() for x in xs]).all()


def select(pred: torch.Tensor, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``where(pred, on_true, on_false)`` for a 0-d bool ``pred``.

    The way to branch on a tensor value inside a pure step: both sides are
    computed, one is kept, and nothing waits on the host. Leaves keep their dtype.
    """
    return tree_map(lambda t, f: torch.where(pred, t, f), on_true, on_false)


def cast(tree: PyTree, dtype: torch.dtype) -> PyTree:
    """Floating-point leaves converted to ``dtype``; integer and bool leaves kept."""
    return tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)


def num_params(tree: PyTree) -> int:
    """Total number of elements over all leaves."""
    return sum(x.numel() for x in leaves(tree))
