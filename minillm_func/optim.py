"""Gradient transformations: pure ``init`` / ``update`` pairs over explicit state.

A :class:`Transform` is ``NamedTuple(init, update, apply)``:

- ``init(params) -> state``;
- ``update(grads, state, params) -> (updates, new_state)``; new params are
  ``apply_updates(params, updates) = params + updates`` (optax's convention);
- ``apply(grads, state, params, *, donate=False) -> (new_params, new_state)``,
  optional: a fast path that produces the new params directly. Use it through
  :func:`step`, which falls back to ``update`` + ``apply_updates``.

Transforms compose with :func:`chain`. Counters and learning rates are 0-d
tensors, never Python numbers, so a state checkpoints, crosses ``torch.func``
transforms and does not recompile under ``torch.compile``.

Example::

    opt = chain(clip_by_global_norm(1.0), adamw(learning_rate=1e-4, weight_decay=0.01))
    opt_state = opt.init(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = apply_updates(params, updates)
    # or, in one go and on the fast kernels:
    params, opt_state = step(opt, grads, opt_state, params)
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from . import tree as T

__all__ = [
    "Transform", "chain", "step", "apply_updates", "adamw", "AdamWState", "clip_by_global_norm",
    "ClipState", "masked", "MaskedState", "inject_hyperparams", "InjectHyperparamsState",
    "decay_mask", "fused_adamw_available",
]

PyTree = Any


class Transform(NamedTuple):
    """A gradient transformation: two pure functions, plus an optional fast ``apply``."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree], tuple]
    apply: Callable[..., tuple] | None = None


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates``, leaf by leaf; each param keeps its dtype."""
    return T.tree_map(lambda p, u: (p + u).to(p.dtype), params, updates)


def step(transform: Transform, grads: PyTree, state: PyTree, params: PyTree, *, donate: bool = False):
    """New params and state in one call: the transform's fast ``apply`` where it has one.

    ``donate=True`` hands ``state`` and ``params`` over to the call, like JAX's
    ``donate_argnums``: their buffers may be updated in place and must not be
    used afterwards. Without it, nothing the caller holds changes.
    """
    if transform.apply is not None:
        return transform.apply(grads, state, params, donate=donate)
    updates, new_state = transform.update(grads, state, params)
    return apply_updates(params, updates), new_state


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    ``chain(t)`` behaves exactly like ``t`` (with its state wrapped in a 1-tuple).
    """
    if not transforms:
        raise ValueError("chain() needs at least one transform, e.g. chain(adamw(1e-4)).")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def run(ts, grads, states, params):
        new_states = []
        for t, s in zip(ts, states):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, new_states

    def update(grads, state, params):
        updates, new_states = run(transforms, grads, state, params)
        return updates, tuple(new_states)

    def apply(grads, state, params, *, donate=False):
        grads, new_states = run(transforms[:-1], grads, state[:-1], params)
        params, last = step(transforms[-1], grads, state[-1], params, donate=donate)
        return params, (*new_states, last)

    return Transform(init, update, apply)


# --------------------------------------------------------------------------- clipping


class ClipState(NamedTuple):
    """``norm``: the global gradient norm measured *before* clipping at the last update (for metrics)."""

    norm: torch.Tensor


def clip_by_global_norm(max_norm: float) -> Transform:
    r"""Scale all gradients by one factor so that their global norm is at most ``max_norm``.

    Matches ``torch.nn.utils.clip_grad_norm_`` exactly (not optax's variant):

    .. math::

        n = \Big\|\big(\|g_i\|_2\big)_i\Big\|_2, \qquad
        c = \min\!\Big(1, \frac{\texttt{max\_norm}}{n + 10^{-6}}\Big), \qquad g_i \leftarrow c\, g_i

    The factor is applied always, also when ``c == 1``. The pre-clip norm ``n``
    is kept in the state (``ClipState.norm``) for logging.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be positive, got {max_norm}.")

    def init(params):
        return ClipState(norm=torch.zeros((), dtype=_float_dtype(params)))

    def update(grads, state, params=None):
        norm = T.global_norm(grads)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return T.scale(grads, coef), ClipState(norm=norm.to(state.norm.dtype))

    return Transform(init, update)


def _float_dtype(params) -> torch.dtype:
    leaves = [x for x in T.leaves(params) if x.is_floating_point()]
    return torch.float64 if leaves and leaves[0].dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- AdamW


class AdamWState(NamedTuple):
    """``count``: updates done so far (0-d int64); ``mu``/``nu``: first and second moments, shaped like params."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def fused_adamw_available() -> bool:
    """Whether the installed torch has the private fused AdamW kernel (``torch._fused_adamw_``)."""
    return hasattr(torch, "_fused_adamw_")


def decay_mask(params: PyTree) -> PyTree:
    """The usual weight-decay mask: decay matrices and embeddings (2-D and up), not norms or biases."""
    return T.tree_map(lambda p: p.dim() >= 2, params)


def _resolve_mask(mask, params) -> list[bool]:
    n = len(T.leaves(params))
    if mask is None:
        return [True] * n
    flags = optree.tree_leaves(mask(params) if callable(mask) else mask)
    if len(flags) != n:
        raise ValueError(
            f"mask has {len(flags)} leaves but params have {n}; give one bool per parameter (same "
            "structure as params) or a function params -> such a tree, e.g. optim.decay_mask.")
    return [bool(f) for f in flags]


def _check_range(value, name: str, low: float, high: float):
    """Check a hyper-parameter given as a Python number (tensors pass unchecked: no host sync)."""
    if isinstance(value, (int, float)) and not low <= value < high:
        raise ValueError(f"adamw: {name} must lie in [{low}, {high}), got {value}.")


def adamw(learning_rate=1e-4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, mask=None, *, impl: str = "auto") -> Transform:
    r"""AdamW with decoupled weight decay, exactly as ``torch.optim.AdamW`` updates.

    With :math:`t` the incremented count, :math:`\eta_t` = ``learning_rate``
    (a number, a 0-d tensor, or a schedule called with the count of updates
    done so far, so update :math:`k` uses ``schedule(k)``, as torch does when the
    scheduler steps after the optimizer) and :math:`\lambda` = ``weight_decay``:

    .. math::

        p &\leftarrow p\,(1 - \eta_t \lambda) \quad \text{(decay of the pre-update parameter, where mask is true)} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        p &\leftarrow p - \frac{\eta_t}{1-\beta_1^t}\cdot\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    ``eps`` sits outside the square root, as in torch. Defaults are the
    original design's (lr 1e-4, wd 0.01; betas and eps are torch's). ``mask``
    (a bool pytree or a function of params, e.g. :func:`decay_mask`) excludes
    leaves from decay; torch decays every parameter, which ``mask=None`` keeps.

    ``impl`` picks how the fast ``apply`` runs (``update`` always uses ``"reference"``):

    - ``"reference"``: per-leaf tensor ops in torch's single-tensor order. Used
      inside ``torch.func`` transforms (vmap, grad) and under ``torch.compile``
      (which fuses them), whatever ``impl`` says;
    - ``"foreach"``: the same math on all leaves at once with ``torch._foreach_*``
      (few kernel launches: what matters for small models);
    - ``"fused"``: torch's fused AdamW kernel (``torch._fused_adamw_``), one pass
      over memory. The kernel writes in place, so without ``donate`` it first
      copies params and moments into fresh buffers and updates those -- the
      caller's tensors are never touched, at the cost of the copies. With
      ``donate=True`` it updates the donated buffers directly: safe because the
      caller gave them up, and as fast as ``torch.optim.AdamW(fused=True)``;
    - ``"auto"``: ``"fused"`` when the kernel exists, else ``"foreach"``. If the
      fused kernel refuses a device or dtype, it falls back to ``"foreach"``.
    """
    _check_range(b1, "b1", 0.0, 1.0)
    _check_range(b2, "b2", 0.0, 1.0)
    _check_range(eps, "eps", 0.0, float("inf"))
    _check_range(weight_decay, "weight_decay", 0.0, float("inf"))
    _check_range(learning_rate, "learning_rate", 0.0, float("inf"))
    if impl not in ("auto", "reference", "foreach", "fused"):
        raise ValueError(f"adamw: impl must be 'auto', 'reference', 'foreach' or 'fused', got {impl!r}.")
    if impl == "fused" and not fused_adamw_available():
        raise ValueError("adamw: impl='fused' needs torch._fused_adamw_, which this torch lacks; use 'auto'.")
    fused_refused: set = set()  # (device, dtype) the fused kernel refused: a speed cache, no numbers depend on it

    def lr_at(count):
        return learning_rate(count) if callable(learning_rate) else learning_rate

    def init(params):
        return AdamWState(count=torch.zeros((), dtype=torch.int64),
                          mu=T.zeros_like(params), nu=T.zeros_like(params))

    def flat_args(grads, state, params):
        return (T.leaves(params), T.leaves(grads), T.leaves(state.mu), T.leaves(state.nu),
                _resolve_mask(mask, params), lr_at(state.count), state.count + 1)

    def update(grads, state, params):
        ps, gs, ms, vs, decay, lr, t = flat_args(grads, state, params)
        new_p, new_m, new_v = _adamw_reference(ps, gs, ms, vs, decay, lr, t, b1, b2, eps, weight_decay)
        updates = [n - p for n, p in zip(new_p, ps)]
        _, new_state = _unflatten(params, (new_p, new_m, new_v), t)
        return optree.tree_unflatten(optree.tree_structure(params), updates), new_state

    def apply(grads, state, params, *, donate=False):
        ps, gs, ms, vs, decay, lr, t = flat_args(grads, state, params)
        chosen = "fused" if impl == "auto" and fused_adamw_available() else impl
        chosen = "foreach" if chosen == "auto" else chosen
        if torch.compiler.is_compiling() or T._functorch_wrapped(ps + gs + ms + vs):
            chosen = "reference"  # no vmap rule for multi-tensor kernels; the compiler fuses per-leaf ops
        if chosen == "reference":
            return _unflatten(params, _adamw_reference(ps, gs, ms, vs, decay, lr, t, b1, b2, eps, weight_decay), t)
        # The multi-tensor kernels take these as Python numbers. When they were
        # injected as tensors, float() is a host sync: free on CPU, once per step.
        hyper = tuple(float(x) for x in (b1, b2, eps, weight_decay))
        if chosen == "fused" and not {(p.device, p.dtype) for p in ps} & fused_refused:
            try:
                return _unflatten(params, _adamw_fused(ps, gs, ms, vs, decay, lr, t, *hyper, donate), t)
            except (RuntimeError, NotImplementedError):  # no kernel for this device/dtype
                fused_refused.update((p.device, p.dtype) for p in ps)
        return _unflatten(params, _adamw_foreach(ps, gs, ms, vs, decay, lr, t, *hyper), t)

    return Transform(init, update, apply)


def _unflatten(params, new, count):
    spec = optree.tree_structure(params)
    new_p, new_m, new_v = (optree.tree_unflatten(spec, xs) for xs in new)
    return new_p, AdamWState(count, new_m, new_v)


def _bias_corrections(lr, t, b1, b2):
    """``lr / (1 - b1^t)`` and ``sqrt(1 - b2^t)`` in float64, as torch computes them in Python floats."""
    t = t.to(torch.float64)
    return lr / (1 - b1**t), (1 - b2**t) ** 0.5


def _adamw_reference(ps, gs, ms, vs, decay, lr, t, b1, b2, eps, wd):
    """torch's single-tensor AdamW, out of place, one leaf at a time."""
    step_size, bc2_sqrt = _bias_corrections(lr, t, b1, b2)
    out_p, out_m, out_v = [], [], []
    for p, g, m, v, d in zip(ps, gs, ms, vs, decay):
        dtype = p.dtype  # 0-d leaves would otherwise be promoted by 0-d float64 hyper-parameters
        if d:
            p = p * _like(1 - lr * wd, p)
        m = m.lerp(g, _like(1 - b1, m))
        v = v * b2 + (1 - b2) * g * g
        out_p.append((p - step_size * m / (v.sqrt() / bc2_sqrt + eps)).to(dtype))
        out_m.append(m.to(dtype))
        out_v.append(v.to(dtype))
    return out_p, out_m, out_v


def _like(x, ref: torch.Tensor):
    """A hyper-parameter computed in float64, in ``ref``'s dtype (as torch casts a Python scalar)."""
    return x.to(ref.dtype) if isinstance(x, torch.Tensor) else x


def _adamw_foreach(ps, gs, ms, vs, decay, lr, t, b1, b2, eps, wd):
    """The same update on all leaves at once. Every in-place ``_foreach_*_`` call
    below writes only into lists this function allocated itself; inputs are only read."""
    step_size, bc2_sqrt = _bias_corrections(lr, t, b1, b2)
    new_m = torch._foreach_lerp(ms, gs, 1 - b1)
    new_v = torch._foreach_mul(vs, b2)
    torch._foreach_addcmul_(new_v, gs, gs, value=1 - b2)
    denom = torch._foreach_sqrt(new_v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    delta = torch._foreach_div(new_m, denom)
    torch._foreach_mul_(delta, -step_size)
    decayed = [p * _like(1 - lr * wd, p) if d else p for p, d in zip(ps, decay)]
    return torch._foreach_add(decayed, delta), new_m, new_v


def _adamw_fused(ps, gs, ms, vs, decay, lr, t, b1, b2, eps, wd, donate):
    """torch's fused kernel. It writes params and moments in place, so unless the
    caller donated them it works on fresh copies; grads are only read."""
    if not donate:
        ps, ms, vs = (torch._foreach_add(xs, 0) for xs in (ps, ms, vs))
    # The kernel reads the (already incremented) step count and never writes it,
    # so one tensor can serve every leaf.
    steps = [t.to(torch.float32)] * len(ps)
    lr = torch.as_tensor(lr, dtype=torch.float64, device=ps[0].device)
    for decayed in (True, False):
        idx = [i for i, d in enumerate(decay) if d == decayed]
        if idx:
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            torch._fused_adamw_(pick(ps), pick(gs), pick(ms), pick(vs), [], pick(steps), lr=lr,
                                beta1=b1, beta2=b2, weight_decay=wd if decayed else 0.0, eps=eps,
                                amsgrad=False, maximize=False)
    return ps, ms, vs


# --------------------------------------------------------------------------- masking, injection


class MaskedState(NamedTuple):
    """``inner``: the wrapped transform's state over the selected leaves only (a list)."""

    inner: PyTree


def masked(transform: Transform, mask) -> Transform:
    """Apply ``transform`` to the leaves where ``mask`` is true; pass other updates through unchanged.

    ``mask`` is a bool pytree shaped like params or a function ``params -> such a tree``.
    """

    def pick(xs, flags):
        return [x for x, f in zip(T.leaves(xs), flags) if f]

    def init(params):
        return MaskedState(transform.init(pick(params, _resolve_mask(mask, params))))

    def update(grads, state, params):
        flags = _resolve_mask(mask, params)
        inner_updates, inner = transform.update(pick(grads, flags), state.inner, pick(params, flags))
        it = iter(inner_updates)
        out = [next(it) if f else g for g, f in zip(T.leaves(grads), flags)]
        return optree.tree_unflatten(optree.tree_structure(grads), out), MaskedState(inner)

    return Transform(init, update)


class InjectHyperparamsState(NamedTuple):
    """``count``: updates done; ``hyperparams``: name -> 0-d tensor (edit between steps); ``inner``: the optimizer's state."""

    count: torch.Tensor
    hyperparams: dict
    inner: PyTree


def inject_hyperparams(factory: Callable[..., Transform]) -> Callable[..., Transform]:
    """Hold the numeric hyper-parameters of ``factory`` as 0-d tensors in the state.

    ``inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=0.1)`` updates
    like ``adamw(...)``, but ``state.hyperparams["learning_rate"]`` can be
    replaced between steps (``state._replace(hyperparams={**state.hyperparams,
    "learning_rate": torch.tensor(3e-4, dtype=torch.float64)})``) without
    rebuilding anything and without a recompile. A hyper-parameter given as a
    schedule is evaluated at each update from the state's count, and its value
    is stored so it can be logged. Other arguments (masks, ``impl``) pass through.
    """

    def build(**kwargs):
        factory(**kwargs)  # validate the arguments once, as Python numbers
        numeric = {k: v for k, v in kwargs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scheduled = {k: v for k, v in kwargs.items() if callable(v) and k != "mask"}
        static = {k: v for k, v in kwargs.items() if k not in numeric and k not in scheduled}

        def current(count, hyperparams):
            hp = dict(hyperparams)
            hp.update({k: torch.as_tensor(fn(count), dtype=torch.float64) for k, fn in scheduled.items()})
            return hp

        def init(params):
            zero = torch.zeros((), dtype=torch.int64)
            hp = current(zero, {k: torch.tensor(float(v), dtype=torch.float64) for k, v in numeric.items()})
            return InjectHyperparamsState(zero, hp, factory(**kwargs).init(params))

        def update(grads, state, params):
            hp = current(state.count, state.hyperparams)
            updates, inner = factory(**static, **hp).update(grads, state.inner, params)
            return updates, InjectHyperparamsState(state.count + 1, hp, inner)

        def apply(grads, state, params, *, donate=False):
            hp = current(state.count, state.hyperparams)
            new_params, inner = step(factory(**static, **hp), grads, state.inner, params, donate=donate)
            return new_params, InjectHyperparamsState(state.count + 1, hp, inner)

        return Transform(init, update, apply)

    return build
