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
    "leaves", "unflatten_like", "tree_map", "zeros_like", "add", "scale", "global_norm",
    "all_finite", "select", "cast", "under_transform",
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
    if under_transform(xs):  # foreach kernels have no vmap batching rule
        norms = [torch.linalg.vector_norm(x) for x in xs]
    else:  # one fused kernel launch for all leaves, as clip_grad_norm_ does
        norms = torch._foreach_norm(xs)
    return torch.linalg.vector_norm(torch.stack(norms))


def under_transform(*trees: PyTree) -> bool:
    """True inside a ``torch.func`` transform or while ``torch.compile`` traces; False in plain eager code.

    The one question behind every "fast path or safe path?" choice in the library:
    fused multi-tensor kernels (``torch._foreach_*``, fused AdamW), in-place updates of
    scratch buffers and ``torch.utils.checkpoint`` are only valid on plain eager tensors;
    the per-tensor, out-of-place path is valid everywhere.

    - ``grad``, ``grad_and_value``, ``vmap`` (and the other ``torch.func`` transforms) wrap
      the tensors they differentiate or batch, and everything computed from them: true when
      any tensor leaf of ``trees`` is such a functorch-wrapped tensor. A tensor the transform
      never saw (a constant closed over) is plain, so pass the tensors the choice is about.
      Non-tensor leaves are ignored. Costs a flatten and one C++ query per leaf, no host sync.
    - The rule for ``torch.compile``: while it traces, the answer is **True**, whatever the
      tensors. The tracer cannot inspect a functorch wrapper (the query would break the
      graph), so it cannot tell a compiled ``torch.func.grad`` from compiled plain autograd,
      and the path valid inside transforms is the one that is valid in both. Little is
      lost: the compiler generates (and fuses) its own kernels for the per-leaf ops.

    Example::

        under_transform(params)                                    # False
        torch.func.grad(lambda p: ... under_transform(p) ...)      # True inside
        torch.compile(lambda x: ... under_transform(x) ...)        # True while tracing
    """
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)
               for x in leaves(trees))



def all_finite(tree: PyTree) -> torch.Tensor:
    """A 0-d bool tensor: true when no leaf holds an inf or a NaN (no host sync)."""
    xs = [x for x in leaves(tree) if x.is_floating_point() and x.numel()]  # integers are always finite
    if not xs:
        return torch.ones((), dtype=torch.bool)
    if under_transform(xs):  # foreach kernels have no vmap batching rule
        return torch.stack([torch.isfinite(x).all() for x in xs]).all()
    # One fused read of every leaf: the largest |x| is finite exactly when every element is
    # (a NaN propagates through the max), with no boolean tensor the size of the leaf.
    return torch.isfinite(torch.stack(torch._foreach_norm(xs, float("inf")))).all()


def select(pred: torch.Tensor, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``where(pred, on_true, on_false)`` for a 0-d bool ``pred``.

    The way to branch on a tensor value inside a pure step: both sides are
    computed, one is kept, and nothing waits on the host. Leaves keep their dtype.
    """
    return tree_map(lambda t, f: torch.where(pred, t, f), on_true, on_false)


def cast(tree: PyTree, dtype: torch.dtype) -> PyTree:
    """Floating-point leaves converted to ``dtype``; integer and bool leaves kept."""
    return tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)
