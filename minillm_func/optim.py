r"""Gradient transformations, optax's way: small pure parts, composed with :func:`chain`.

A :class:`Transform` is ``NamedTuple(init, update, apply)``:

- ``init(params) -> state``;
- ``update(grads, state, params) -> (updates, new_state)``; new params are
  ``apply_updates(params, updates) = params + updates`` (optax's convention:
  updates are *added*, so a descent step carries its minus sign);
- ``apply(grads, state, params, *, donate=False) -> (new_params, new_state)``,
  optional: a fast path that produces the new params directly, with the same
  numbers as ``update`` + ``apply_updates`` up to float rounding. Use it
  through :func:`step`, which falls back to ``update`` + ``apply_updates``.

The parts and what they compute (:math:`g` the incoming updates, :math:`t` the
1-based update count):

- :func:`scale_by_adam`: :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)`, Adam's
  bias-corrected moments;
- :func:`add_decayed_weights`: :math:`g + \lambda p` (where a mask allows);
- :func:`scale_by_learning_rate`: :math:`-\eta_t\, g`;
- :func:`clip_by_global_norm`: :math:`g \min(1, c / (\|g\| + 10^{-6}))`, as ``clip_grad_norm_``;
- :func:`adamw` is ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``
  with a fast ``apply`` on fused kernels; :func:`masked` and
  :func:`inject_hyperparams` wrap any transform.

Counters and learning rates are 0-d tensors, never Python numbers, so a state
checkpoints, crosses ``torch.func`` transforms and does not recompile under
``torch.compile``.

Example::

    import torch
    from minillm_func import optim

    params = {"w": torch.randn(3, 3), "b": torch.zeros(3)}
    grads = {"w": torch.randn(3, 3), "b": torch.randn(3)}
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(learning_rate=1e-4, weight_decay=0.01))
    opt_state = opt.init(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optim.apply_updates(params, updates)
    # or, in one go and on the fast kernels (the caller's tensors are not modified):
    params, opt_state = optim.step(opt, grads, opt_state, params)
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
from typing import Any, Callable, NamedTuple

import optree
import torch

from . import native
from . import tree as T

__all__ = [
    "Transform", "chain", "step", "apply_updates",
    "EmptyState", "ScaleByAdamState", "scale_by_adam", "add_decayed_weights", "ScaleByScheduleState",
    "scale_by_learning_rate", "adamw", "AdamWState", "clip_by_global_norm", "ClipState", "clipped_norm",
    "masked", "MaskedState", "inject_hyperparams", "InjectHyperparamsState",
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


def step(transform: Transform, grads: PyTree, state: PyTree, params: PyTree, *, donate: bool = False,
         skip: torch.Tensor | None = None):
    """New params and state in one call: the transform's fast ``apply`` where it has one.

    ``donate=True`` hands ``state`` and ``params`` over to the call, like JAX's
    ``donate_argnums``: their buffers may be updated in place and must not be
    used afterwards. Without it, nothing the caller holds changes.

    ``skip`` (a 0-d bool tensor) makes the result equal to ``(params, state)`` where it
    is true -- a non-finite or not-yet-complete accumulation window -- without a host
    sync: the fused and native kernels read the flag themselves (so a skipped update
    costs no extra pass over params and moments), other transforms are selected
    leaf by leaf. With ``skip`` and a transform whose ``apply`` does not take it,
    ``donate`` is ignored (the old values must survive).

    Example::

        opt = adamw(1e-3)
        opt_state = opt.init(params)
        params, opt_state = step(opt, grads, opt_state, params)               # pure
        params, opt_state = step(opt, grads, opt_state, params, donate=True)  # in place
    """
    if skip is not None and transform.apply is not None and _takes_skip(transform.apply):
        return transform.apply(grads, state, params, donate=donate, skip=skip)
    if transform.apply is not None:
        new_params, new_state = transform.apply(grads, state, params, donate=donate and skip is None)
    else:
        updates, new_state = transform.update(grads, state, params)
        new_params = apply_updates(params, updates)
    if skip is None:
        return new_params, new_state
    return T.select(skip, (params, state), (new_params, new_state))


@functools.lru_cache(maxsize=1024)
def _takes_skip(apply: Callable) -> bool:
    """Whether a transform's ``apply`` handles ``skip`` itself (this library's do); looked up once
    per function, not at every update."""
    try:
        return "skip" in inspect.signature(apply).parameters
    except (TypeError, ValueError):
        return False


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    ``chain(t)`` behaves exactly like ``t`` (with its state wrapped in a 1-tuple).
    Its fast ``apply`` runs every transform but the last through ``update`` and
    the last through its own ``apply`` (where the fused kernels sit).

    Example::

        opt = chain(clip_by_global_norm(1.0), adamw(1e-4))
        state = opt.init(params)          # (ClipState, AdamWState)
    """
    if not transforms:
        raise ValueError("chain() needs at least one transform, e.g. chain(adamw(1e-4)).")
    bad = [i for i, t in enumerate(transforms) if not isinstance(t, Transform)]
    if bad:
        raise TypeError(f"chain: argument {bad[0]} is a {type(transforms[bad[0]]).__name__}, not a Transform; "
                        "pass transforms themselves, e.g. chain(clip_by_global_norm(1.0), adamw(1e-4)).")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def check(state):
        if not isinstance(state, tuple) or hasattr(state, "_fields") or len(state) != len(transforms):
            got = (f"a tuple of {len(state)}" if isinstance(state, tuple) and not hasattr(state, "_fields")
                   else f"a {type(state).__name__}")
            raise ValueError(
                f"chain of {len(transforms)} transforms got {got} as its state; it needs the tuple of "
                f"{len(transforms)} states that its own init returns: state = opt.init(params), then "
                "opt.update(grads, state, params). A state from another optimizer does not fit.")

    def run(ts, grads, states, params):
        new_states = []
        for t, s in zip(ts, states):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, new_states

    def update(grads, state, params=None):
        check(state)
        updates, new_states = run(transforms, grads, state, params)
        return updates, tuple(new_states)

    def apply(grads, state, params, *, donate=False, skip=None):
        check(state)
        grads, new_states = run(transforms[:-1], grads, state[:-1], params)
        if skip is not None:  # the small states of the transforms before the last: a select
            new_states = [T.select(skip, old, new) for old, new in zip(state[:-1], new_states)]
        params, last = step(transforms[-1], grads, state[-1], params, donate=donate, skip=skip)
        return params, (*new_states, last)

    return Transform(init, update, apply)


# --------------------------------------------------------------------------- hyper-parameters


class _Injected:
    """A hyper-parameter of a transform built by :func:`inject_hyperparams`: reading it
    gives the value held in that transform's state for the update in progress."""

    def __init__(self, name: str, current: dict):
        self.name, self.current = name, current

    def __call__(self, count=None):
        try:
            return self.current[self.name]
        except KeyError:
            raise RuntimeError(f"the injected hyper-parameter {self.name!r} was read outside an update of "
                               "the transform inject_hyperparams built") from None

    def __repr__(self):
        return f"<injected {self.name}>"


def _hyper(value, count):
    """A hyper-parameter's value at update ``count``: a number, a 0-d tensor, or ``value(count)`` for a schedule."""
    return value(count) if callable(value) else value


def _like(x, ref: torch.Tensor):
    """A hyper-parameter (a number, or a 0-d tensor, often float64) in ``ref``'s dtype, as torch casts a Python
    scalar; without it a 0-d leaf times a 0-d float64 tensor would be promoted to float64."""
    return x.to(ref.dtype) if isinstance(x, torch.Tensor) else x


def _check_range(who: str, value, name: str, low: float, high: float):
    """Check a hyper-parameter given as a Python number (tensors and schedules pass unchecked: no host sync)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value < high:
        raise ValueError(f"{who}: {name} must lie in [{low}, {high}), got {value}.")


def _check_number(who: str, value, name: str):
    if callable(value) and not isinstance(value, _Injected):
        raise TypeError(f"{who}: {name} must be a number or a 0-d tensor, got the function {value!r}; only "
                        "learning_rate takes a schedule. To change it during training, hold it in the state: "
                        f"inject_hyperparams(adamw)({name}=...).")


def _bias_corrections(t, b1, b2):
    """``1 - b1^t`` and ``sqrt(1 - b2^t)`` as 0-d float64 tensors: torch computes them in Python floats."""
    t = t.to(torch.float64)
    return 1 - _power(b1, t), (1 - _power(b2, t)) ** 0.5


def _power(b, t):
    """``b ** t``. While ``torch.compile`` traces, as ``exp(t log b)`` (equal to ~1e-15 relative): inductor
    inlined a float64 ``pow`` into every leaf's loop, recomputed per element, which kept the loops scalar
    (the compiled update took 4.9-6.6x torch's fused kernel, 1.7x with ``exp``, which it computes once per
    update; ``benchmarks/RESULTS.md``)."""
    if not torch.compiler.is_compiling():
        return b**t
    log_b = torch.log(b) if isinstance(b, torch.Tensor) else (math.log(b) if b > 0 else -math.inf)
    return torch.exp(t * log_b)


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


def decay_mask(params: PyTree) -> PyTree:
    """The usual weight-decay mask: decay matrices and embeddings (2-D and up), not norms or biases."""
    return T.tree_map(lambda p: p.dim() >= 2, params)


# --------------------------------------------------------------------------- the parts


class EmptyState(NamedTuple):
    """The state of a transform that keeps none (optax's ``EmptyState``)."""


class ScaleByAdamState(NamedTuple):
    """``count``: updates done so far (0-d int64); ``mu``/``nu``: first and second moments, shaped like params."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    r"""Rescale updates by Adam's bias-corrected moment estimates.

    With :math:`t` the incremented count:

    .. math::

        m &\leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad v \leftarrow \beta_2 v + (1-\beta_2)\, g^2 \\
        u &= \frac{m / (1-\beta_1^t)}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    In torch's floating-point order where it matters: ``eps`` outside the square
    root (optax's ``eps_root`` is not offered), the first moment as
    ``m.lerp(g, 1 - b1)``, the bias corrections in float64. Defaults are torch's.

    Example::

        opt = scale_by_adam()
        u, state = opt.update(grads, opt.init(params))   # state: ScaleByAdamState(count=1, mu, nu)
    """
    for name, value, high in (("b1", b1, 1.0), ("b2", b2, 1.0), ("eps", eps, float("inf"))):
        _check_number("scale_by_adam", value, name)
        _check_range("scale_by_adam", value, name, 0.0, high)

    def init(params):
        return ScaleByAdamState(torch.zeros((), dtype=torch.int64), T.zeros_like(params), T.zeros_like(params))

    def update(grads, state, params=None):
        beta1, beta2, epsilon = (_hyper(h, state.count) for h in (b1, b2, eps))
        t = state.count + 1
        bc1, bc2_sqrt = _bias_corrections(t, beta1, beta2)
        mu = T.tree_map(lambda m, g: m.lerp(g, _like(1 - beta1, m)), state.mu, grads)
        nu = T.tree_map(lambda v, g: v * _like(beta2, v) + _like(1 - beta2, g) * g * g, state.nu, grads)
        updates = T.tree_map(
            lambda m, v: m / (v.sqrt() / _like(bc2_sqrt, v) + _like(epsilon, v)) / _like(bc1, m), mu, nu)
        return updates, ScaleByAdamState(t, mu, nu)

    return Transform(init, update)


def add_decayed_weights(weight_decay: float = 0.0, mask=None) -> Transform:
    r"""Add the decoupled weight decay: :math:`u \leftarrow u + \lambda\, p`, where ``mask`` is true.

    ``mask``: a bool pytree shaped like params, or a function ``params -> such a
    tree`` (e.g. :func:`decay_mask`); ``None`` decays every leaf, as torch does.
    Placed before :func:`scale_by_learning_rate`, the decay is multiplied by the
    *current* learning rate, as in ``torch.optim.AdamW``. ``update`` needs
    ``params``. Stateless (:class:`EmptyState`).

    Example::

        opt = chain(scale_by_adam(), add_decayed_weights(0.01, mask=decay_mask), scale_by_learning_rate(1e-4))
        updates, state = opt.update(grads, opt.init(params), params)   # state: (ScaleByAdamState, EmptyState,
                                                                       #         ScaleByScheduleState)
    """
    _check_number("add_decayed_weights", weight_decay, "weight_decay")
    _check_range("add_decayed_weights", weight_decay, "weight_decay", 0.0, float("inf"))

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights: update needs the params it decays; call "
                             "update(grads, state, params).")
        wd = _hyper(weight_decay, None)
        flags = _resolve_mask(mask, params)
        out = [u + _like(wd, u) * p if f else u
               for u, p, f in zip(T.leaves(updates), T.leaves(params), flags)]
        return T.unflatten_like(updates, out), state

    return Transform(init, update)


class ScaleByScheduleState(NamedTuple):
    """``count``: updates done so far (0-d int64), the argument of the learning-rate schedule."""

    count: torch.Tensor


def scale_by_learning_rate(learning_rate=1e-4, *, flip_sign: bool = True) -> Transform:
    r"""Multiply updates by :math:`-\eta_k` (by :math:`\eta_k` with ``flip_sign=False``).

    ``learning_rate`` is a number, a 0-d tensor, or a schedule ``count -> lr``
    called with the number of updates done so far: update :math:`k` (0-based)
    uses ``schedule(k)``, as torch does when the scheduler steps after the
    optimizer. The count is a 0-d int64 tensor in the state.

    Example::

        opt = scale_by_learning_rate(schedules.cosine_annealing(1e-3, T_max=1000))
        updates, state = opt.update(grads, opt.init(params))   # -1e-3 * grads; state.count == 1
    """
    _check_range("scale_by_learning_rate", learning_rate, "learning_rate", 0.0, float("inf"))

    def init(params):
        return ScaleByScheduleState(torch.zeros((), dtype=torch.int64))

    def update(updates, state, params=None):
        lr = _hyper(learning_rate, state.count)
        factor = -lr if flip_sign else lr
        return T.tree_map(lambda u: u * _like(factor, u), updates), ScaleByScheduleState(state.count + 1)

    return Transform(init, update)


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

    Example::

        u, state = clip_by_global_norm(1.0).update(grads, ClipState(torch.zeros(())))
        state.norm                                    # the norm before clipping
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


def clipped_norm(opt_state: PyTree) -> torch.Tensor:
    """The pre-clip global gradient norm that a :func:`clip_by_global_norm` inside ``opt_state``
    recorded at its last update (found through ``chain``, ``masked`` and ``inject_hyperparams``
    states), or NaN when the optimizer does no clipping. For metrics: it reads, never computes.
    """
    found = [s for s in optree.tree_flatten(opt_state, is_leaf=lambda x: isinstance(x, ClipState),
                                            none_is_leaf=True)[0]
             if isinstance(s, ClipState)]
    return found[0].norm if found else torch.tensor(float("nan"))


def _float_dtype(params) -> torch.dtype:
    leaves = [x for x in T.leaves(params) if x.is_floating_point()]
    return torch.float64 if leaves and leaves[0].dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- AdamW


class AdamWState(NamedTuple):
    """``count``: updates done so far (0-d int64); ``mu``/``nu``: first and second moments, shaped like params.

    The state of :func:`adamw`: its chain's three states hold this count twice
    (in :class:`ScaleByAdamState` and :class:`ScaleByScheduleState`) and nothing
    else (:class:`EmptyState`), so they are kept as one. Same fields and
    checkpoint layout as before the parts existed.
    """

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def fused_adamw_available() -> bool:
    """Whether the installed torch has the private fused AdamW kernel (``torch._fused_adamw_``)."""
    return hasattr(torch, "_fused_adamw_")


_IMPLS = ("auto", "reference", "foreach", "fused", "native")
# (impl, donate) -> the kernels to try, in order; "foreach" runs everywhere.
_ORDER = {
    ("foreach", False): ("foreach",), ("foreach", True): ("foreach",),
    ("fused", False): ("fused", "foreach"), ("fused", True): ("fused", "foreach"),
    ("native", False): ("native", "fused", "foreach"), ("native", True): ("native", "fused", "foreach"),
    ("auto", False): ("native", "fused", "foreach"),  # pure: one pass, no copy
    ("auto", True): ("fused", "native", "foreach"),   # donated: torch's own kernel, in place
}

def adamw(learning_rate=1e-4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, mask=None, *, impl: str = "auto", reuse_buffers: bool = True) -> Transform:
    r"""AdamW with decoupled weight decay, exactly as ``torch.optim.AdamW`` updates.

    It is ``chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``: with :math:`t` the incremented
    count, :math:`\eta_t` = ``learning_rate`` (a number, a 0-d tensor, or a
    schedule called with the count of updates done so far) and :math:`\lambda` =
    ``weight_decay``,

    .. math::

        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        p &\leftarrow p - \eta_t \Big(\frac{m/(1-\beta_1^t)}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
             + \lambda p\Big)

    which is torch's ``p ← p(1 − η_t λ)`` (the pre-update parameter decayed with
    the *current* learning rate) followed by ``p ← p − η_t m̂/(√v̂ + ε)``; only the
    float order differs (equal to ``AdamW(foreach=False)`` to 1e-10 relative in
    float64). ``eps`` sits outside the square root, as in torch. Defaults are the
    original design's (lr 1e-4, wd 0.01; betas and eps are torch's). ``mask`` (a
    bool pytree or a function of params, e.g. :func:`decay_mask`) excludes
    leaves from decay; torch decays every parameter, which ``mask=None`` keeps.
    The state is one :class:`AdamWState` (see there).

    ``update`` is the chain above. The fast ``apply`` (through :func:`step`)
    computes the same update on whole lists of tensors; ``impl`` picks how:

    - ``"reference"``: ``update`` + ``apply_updates``. Always used inside
      ``torch.func`` transforms and under ``torch.compile`` (which fuses it);
    - ``"foreach"``: ``torch._foreach_*`` over all leaves (pure, few kernel launches);
    - ``"fused"``: torch's fused AdamW (``torch._fused_adamw_``, private: where it
      refuses a device or dtype, ``"foreach"`` runs). It writes in place: with
      ``donate=True`` on the donated buffers; without, on copies of params and
      moments (three extra passes over them);
    - ``"native"``: this library's one-pass kernel (``minillm_func.native``,
      compiled with the system C compiler on first use): reads old params,
      gradients and moments, writes new ones with streaming stores, so the pure
      update costs what the in-place one does. float32 CPU tensors only; other
      leaves, or no compiler, fall back to ``"fused"``;
    - ``"auto"`` (default): donated, ``"fused"`` in place; pure, ``"native"``;
      each falling back as above.

    ``reuse_buffers`` (pure ``"fused"``/``"native"`` only): write new params and
    moments into the buffers of an earlier update once nothing refers to them
    anymore (not even a view), instead of fresh memory, which on CPU costs a page
    fault and a zeroing per 4 KiB, more than the update itself. The price: the
    buffers of the update before last stay allocated between updates -- one
    copy of params and both moments when the caller keeps only the newest state.
    ``donate=True`` needs no extra memory at all. Measured figures:
    ``benchmarks/RESULTS.md``.

    Example::

        opt = chain(clip_by_global_norm(1.0), adamw(1e-4, weight_decay=0.01, mask=decay_mask))
        state = opt.init(params)
        params, state = step(opt, grads, state, params)          # caller's tensors untouched
        params, state = step(opt, grads, state, params, donate=True)   # torch's fused kernel, in place
    """
    if impl not in _IMPLS:
        raise ValueError(f"adamw: impl must be one of {', '.join(map(repr, _IMPLS))}, got {impl!r}.")
    if impl == "fused" and not fused_adamw_available():
        raise ValueError("adamw: impl='fused' needs torch._fused_adamw_, which this torch lacks; use 'auto'.")
    if impl == "native" and not native.available():
        raise ValueError(f"adamw: impl='native' needs the native kernel, which could not be built "
                         f"({native.unavailable_reason()}); use 'auto'.")
    _check_range("adamw", learning_rate, "learning_rate", 0.0, float("inf"))
    parts = chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask),
                  scale_by_learning_rate(learning_rate))
    pool = _BufferPool() if reuse_buffers else None
    fused_refused: set = set()  # (device, dtype) the fused kernel refused: a speed cache, no numbers depend on it

    def init(params):
        adam, _, _ = parts.init(params)
        return AdamWState(adam.count, adam.mu, adam.nu)

    def update(grads, state, params):
        unpacked = (ScaleByAdamState(*state), EmptyState(), ScaleByScheduleState(state.count))
        updates, (adam, _, _) = parts.update(grads, unpacked, params)
        return updates, AdamWState(*adam)

    def apply(grads, state, params, *, donate=False, skip=None):
        ps, gs, ms, vs = T.leaves(params), T.leaves(grads), T.leaves(state.mu), T.leaves(state.nu)
        bumped = state.count + 1 if skip is None else torch.where(skip, state.count, state.count + 1)
        if not ps:  # nothing to update (e.g. a mask that selects no leaf)
            return params, AdamWState(bumped, state.mu, state.nu)
        plain = all(type(x) is torch.Tensor for x in ps)  # the kernels' skip flag is a plain tensor
        if impl == "reference" or T.under_transform(ps, gs, ms, vs) or (skip is not None and not plain):
            updates, new_state = update(grads, state, params)
            new = apply_updates(params, updates), new_state
            return new if skip is None else T.select(skip, (params, state), new)
        _check_shapes(ps, gs, ms, vs)  # the kernels index raw memory: a wrong size must not get that far
        count = state.count
        decay = _resolve_mask(mask, params)
        lr, beta1, beta2, epsilon, wd = (_hyper(h, count) for h in (learning_rate, b1, b2, eps, weight_decay))
        # The multi-tensor kernels take these as Python numbers; an injected one is a 0-d
        # tensor, and float() of it a host sync: free on CPU, once per step.
        hyper = tuple(float(x) for x in (beta1, beta2, epsilon, wd))
        t = count + 1
        for kernel in _ORDER[impl, donate]:
            if kernel == "native" and native.eligible(ps, gs, ms, vs) and native.available():
                out = (ps, ms, vs) if donate else _outputs(pool, ps, ms, vs)
                native.adamw_into(ps, gs, ms, vs, *out, decay, lr=float(lr), b1=hyper[0], b2=hyper[1],
                                   eps=hyper[2], weight_decay=hyper[3], step=int(count) + 1, skip=skip)
                return _unflatten(params, out, bumped)
            if kernel == "fused" and fused_adamw_available():
                kinds = {(x.device, x.dtype) for x in (*ps, *gs, *ms, *vs)}
                # One device and dtype (the kernel's rule), and contiguous buffers to write in place: the
                # kernel indexes every tensor as contiguous memory (it even reads a strided gradient so,
                # hence the .contiguous() below).
                writable = not donate or all(x.is_contiguous() for x in (*ps, *ms, *vs))
                if len(kinds) == 1 and not kinds & fused_refused and writable:
                    out = (ps, ms, vs) if donate else _outputs(pool, ps, ms, vs, copy=True)
                    try:
                        _adamw_fused(*out, [g.contiguous() for g in gs], decay, lr, t, *hyper, skip=skip)
                        return _unflatten(params, out, bumped)
                    except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype; it
                        fused_refused.update(kinds)             # says so before writing anything
            if kernel == "foreach":
                new = _unflatten(params, _adamw_foreach(ps, gs, ms, vs, decay, lr, t, *hyper), t)
                return new if skip is None else T.select(skip, (params, state), new)
        raise AssertionError("unreachable: foreach always runs")

    return Transform(init, update, apply)


def _check_shapes(ps, gs, ms, vs):
    if not len(ps) == len(gs) == len(ms) == len(vs):
        raise ValueError(f"adamw: {len(ps)} params but {len(gs)} gradients, {len(ms)} first and {len(vs)} second "
                         "moments; pass grads shaped like params and the state that opt.init(params) made.")
    for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        if not p.shape == g.shape == m.shape == v.shape:
            raise ValueError(f"adamw: leaf {i} has param shape {tuple(p.shape)} but gradient {tuple(g.shape)}, "
                             f"moments {tuple(m.shape)} and {tuple(v.shape)}; they must all be equal.")


def _outputs(pool, ps, ms, vs, *, copy: bool = False):
    """Buffers for new params and moments, not the caller's: recycled (``pool``) or fresh. All of one
    dtype and device (what both in-place kernels require). ``copy``: filled with the old values."""
    if any(type(x) is not torch.Tensor for x in ps):
        # Tensor subclasses (a sharded DTensor, ...) keep their type and layout: the pool's
        # plain buffers would not mix with them in one kernel call.
        fresh = (lambda x: x.clone(memory_format=torch.contiguous_format)) if copy else torch.empty_like
        return [[fresh(x) for x in xs] for xs in (ps, ms, vs)]
    if pool is not None:
        out = pool.take(tuple(p.shape for p in ps), ps[0].dtype, ps[0].device, 3)
    else:
        out = [[torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs] for xs in (ps, ms, vs)]
    if copy:
        for dst, src in zip(out, (ps, ms, vs)):
            torch._foreach_copy_(dst, src)
    return out


def _unflatten(params, new, count):
    new_p, new_m, new_v = (T.unflatten_like(params, list(xs)) for xs in new)
    return new_p, AdamWState(count, new_m, new_v)


def _adamw_foreach(ps, gs, ms, vs, decay, lr, t, b1, b2, eps, wd):
    """The update on all leaves at once, out of place: every in-place ``_foreach_*_`` call
    below writes only into lists this function allocated itself; inputs are only read."""
    bc1, bc2_sqrt = _bias_corrections(t, b1, b2)
    step_size = lr / bc1
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


def _adamw_fused(ps, ms, vs, gs, decay, lr, t, b1, b2, eps, wd, *, skip=None):
    """torch's fused kernel, in place on ``ps, ms, vs`` (the caller made sure they may be written).
    ``skip`` goes in as the kernel's ``found_inf``: where true it writes nothing."""
    found_inf = None if skip is None else skip.to(device=ps[0].device, dtype=torch.float32)
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
                                amsgrad=False, maximize=False, found_inf=found_inf)


class _BufferPool:
    """Output buffers for a pure update, reused once nothing outside the pool refers to them.

    Why: a fresh tensor of hundreds of MB comes from ``mmap``; its first write
    page-faults and the kernel zeroes every 4 KiB page, which costs more than
    the AdamW update itself (``benchmarks/RESULTS.md``). Reusing memory that is
    already mapped avoids it.

    Why it is safe: buffers are handed out as views (new tensors sharing their
    memory), and a buffer is taken again only when its storage's use count and
    Python reference count say that the pool's own tensor is the last holder:
    no tensor, view, storage object, numpy array, DLPack capsule or autograd
    graph anywhere refers to it. (Raw ``data_ptr()`` addresses are not tracked,
    as with any allocator.) So the caller's tensors are never written.

    Memory: it holds the buffers of the last two updates. In a loop that keeps
    only the newest state (``params, state = step(...)``), those of the update
    before last are free at the next call and reused then: one copy of params
    and moments stays allocated between calls. A buffer found still in use when
    its turn comes is released to its holders. Tensors under ``MIN_BYTES`` are
    not pooled: glibc serves them from its heap, without page faults.
    """

    _BASELINE = None  # (Python refcount, storage use count) of a storage only its pool tensor holds
    MIN_BYTES = 1 << 18

    def __init__(self):
        self._lock = threading.Lock()
        self._last: list[torch.Tensor] = []    # buffers behind the outputs of the last take(), unchecked
        self._before: list[torch.Tensor] = []  # buffers of the take() before: checked when needed
        self._plans: dict = {}                 # (shapes, dtype, device) -> layout, computed once
        self.enabled = hasattr(torch._C, "_storage_Use_Count")
        if self.enabled and _BufferPool._BASELINE is None:
            _BufferPool._BASELINE = self._holders(torch.empty(1))

    @staticmethod
    def _holders(buf: torch.Tensor) -> tuple[int, int]:
        s = buf.untyped_storage()
        return sys.getrefcount(s), torch._C._storage_Use_Count(s._cdata)

    def _plan(self, shapes: tuple, dtype: torch.dtype, device: torch.device):
        """Which leaves get a pooled buffer (index, numel), and how the small ones split one block."""
        key = (shapes, dtype, device)
        plan = self._plans.get(key)
        if plan is None:
            size = torch.empty((), dtype=dtype).element_size()
            align = max(1, 64 // size)  # each small tensor starts 64-byte aligned, as a fresh one would
            big, small, sizes = [], [], []
            for i, shape in enumerate(shapes):
                n = shape.numel()
                if n * size >= self.MIN_BYTES:
                    big.append((i, n))
                else:
                    small.append((i, len(shape) != 1))
                    sizes += [n, -n % align]
            plan = self._plans[key] = (big, small, sizes)
        return plan

    def _free(self, buffers, free: dict, busy: list | None):
        for buf in buffers:
            if self._holders(buf) == _BufferPool._BASELINE:
                free.setdefault(buf.numel(), []).append(buf)
            elif busy is not None:
                busy.append(buf)

    def take(self, shapes: tuple, dtype: torch.dtype, device: torch.device, groups: int) -> list[list]:
        """``groups`` lists of contiguous tensors of these shapes, dtype and device."""
        big, small, sizes = self._plan(shapes, dtype, device)
        with self._lock:
            free: dict[int, list] = {}
            needed = len(big) * groups
            if self.enabled:
                self._free(self._before, free, None)  # still in use two updates later: dropped
                before = self._last  # most likely this call's inputs: checked at the next call
                if sum(map(len, free.values())) < needed:  # e.g. a caller that dropped the last outputs
                    before = []
                    self._free(self._last, free, before)
            used, out = [], []
            for _ in range(groups):
                views: list = [None] * len(shapes)
                for i, n in big:
                    spare = free.get(n)
                    buf = spare.pop() if spare else torch.empty(n, dtype=dtype, device=device)
                    used.append(buf)
                    views[i] = buf.view(shapes[i])
                if small:
                    parts = torch.empty(sum(sizes), dtype=dtype, device=device).split_with_sizes(sizes)
                    for (i, reshape), part in zip(small, parts[::2]):
                        views[i] = part.view(shapes[i]) if reshape else part
                out.append(views)
            if self.enabled:
                self._before, self._last = before, used
            return out


# --------------------------------------------------------------------------- masking, injection


class MaskedState(NamedTuple):
    """``inner``: the wrapped transform's state over the selected leaves only (a list)."""

    inner: PyTree


def masked(transform: Transform, mask) -> Transform:
    """Apply ``transform`` to the leaves where ``mask`` is true; pass other updates through unchanged.

    ``mask`` is a bool pytree shaped like params or a function ``params -> such a
    tree``. The inner transform sees the selected leaves as a list. Its fast
    ``apply`` is kept: :func:`step` on the masked transform runs the inner
    ``apply`` on the selected leaves (with ``donate`` passed on) and adds the
    unchanged updates to the others.

    Example::

        opt = masked(adamw(1e-3), lambda p: {k: not k.startswith("frozen") for k in p})
        state = opt.init(params)
        params, state = step(opt, grads, state, params)
    """

    def pick(xs, flags):
        return [x for x, f in zip(T.leaves(xs), flags) if f]

    def merge(tree, selected, others, flags):
        it = iter(selected)
        return T.unflatten_like(tree, [next(it) if f else o for o, f in zip(others, flags)])

    def init(params):
        return MaskedState(transform.init(pick(params, _resolve_mask(mask, params))))

    def update(grads, state, params):
        flags = _resolve_mask(mask, params)
        inner_updates, inner = transform.update(pick(grads, flags), state.inner, pick(params, flags))
        return merge(grads, inner_updates, T.leaves(grads), flags), MaskedState(inner)

    def apply(grads, state, params, *, donate=False, skip=None):
        flags = _resolve_mask(mask, params)
        new_selected, inner = step(transform, pick(grads, flags), state.inner, pick(params, flags), donate=donate,
                                   skip=skip)
        passed = [p if f else (p + g).to(p.dtype) for p, g, f in zip(T.leaves(params), T.leaves(grads), flags)]
        if skip is not None:
            passed = [q if f else torch.where(skip, p, q) for p, q, f in zip(T.leaves(params), passed, flags)]
        return merge(params, new_selected, passed, flags), MaskedState(inner)

    return Transform(init, update, apply)


class InjectHyperparamsState(NamedTuple):
    """``count``: updates done; ``hyperparams``: name -> 0-d tensor (edit between steps); ``inner``: the optimizer's state."""

    count: torch.Tensor
    hyperparams: dict
    inner: PyTree


def inject_hyperparams(factory: Callable[..., Transform]) -> Callable[..., Transform]:
    """Hold the numeric hyper-parameters of ``factory`` as 0-d tensors in the state.

    ``inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=0.1)`` updates
    like ``adamw(...)``, but ``state.hyperparams["learning_rate"]`` can be
    replaced between steps without rebuilding anything and without a recompile,
    and a stack of states with different values trains under ``vmap``. A
    hyper-parameter given as a schedule is evaluated at each update from the
    state's count, and its value is stored so it can be logged. Other arguments
    (masks, ``impl``) pass through.

    The inner transform is built once: each injected hyper-parameter reaches it
    as a function that returns the state's value for the update in progress
    (so ``factory`` must accept functions for them, as this module's do). Its
    fast ``apply`` and the caches it keeps (buffers, kernel choice) persist
    across updates.

    Example::

        opt = inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=0.1)
        state = opt.init(params)
        lr = torch.tensor(3e-4, dtype=torch.float64)
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})
    """

    def build(**kwargs):
        factory(**kwargs)  # validate the arguments once, as Python numbers
        numeric = {k: v for k, v in kwargs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scheduled = {k: v for k, v in kwargs.items() if callable(v) and k != "mask"}
        static = {k: v for k, v in kwargs.items() if k not in numeric and k not in scheduled}
        current: dict = {}  # the values of the update in progress, read by the _Injected functions
        inner = factory(**static, **{k: _Injected(k, current) for k in (*numeric, *scheduled)})

        def values(count, hyperparams):
            hp = dict(hyperparams)
            hp.update({k: torch.as_tensor(fn(count), dtype=torch.float64) for k, fn in scheduled.items()})
            return hp

        def run(fn, hp):
            current.update(hp)
            try:
                return fn()
            finally:
                current.clear()

        def init(params):
            zero = torch.zeros((), dtype=torch.int64)
            hp = values(zero, {k: torch.tensor(float(v), dtype=torch.float64) for k, v in numeric.items()})
            return InjectHyperparamsState(zero, hp, run(lambda: inner.init(params), hp))

        def update(grads, state, params):
            hp = values(state.count, state.hyperparams)
            updates, new_inner = run(lambda: inner.update(grads, state.inner, params), hp)
            return updates, InjectHyperparamsState(state.count + 1, hp, new_inner)

        def apply(grads, state, params, *, donate=False, skip=None):
            hp = values(state.count, state.hyperparams)
            new_params, new_inner = run(lambda: step(inner, grads, state.inner, params, donate=donate, skip=skip),
                                        hp)
            count = state.count + 1
            if skip is not None:
                count, hp = T.select(skip, (state.count, state.hyperparams), (count, hp))
            return new_params, InjectHyperparamsState(count, hp, new_inner)

        return Transform(init, update, apply)

    return build
