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
    "evaluation_params", "muon", "scale_by_muon", "MuonState", "scale_by_shape", "orthogonalize_via_newton_schulz",
    "partition", "multi_transform", "PartitionState", "MultiTransformState", "muon_labels", "muon_with_adamw",
    "Transform", "chain", "step", "apply_updates", "EmptyState", "ScaleByAdamState", "scale_by_adam",
    "add_decayed_weights", "ScaleByScheduleState", "scale_by_learning_rate", "adamw", "AdamWState",
    "clip_by_global_norm", "ClipState", "clipped_norm", "masked", "MaskedState", "inject_hyperparams",
    "InjectHyperparamsState", "decay_mask", "fused_adamw_available", "schedule_free", "schedule_free_adamw",
    "schedule_free_eval_params", "ScheduleFreeState", "ScaleByRmsState", "ema", "EmaState", "ema_params",
    "EmaParamsState", "averaged_params", "lookahead", "LookaheadState", "lookahead_slow_params", "apply_if_finite",
    "ApplyIfFiniteState", "skip_large_updates", "SkipLargeUpdatesState",
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


# --------------------------------------------------------------------------- partition, Muon


class PartitionState(NamedTuple):
    """``inner_states``: label -> the state of that label's transform, over its own leaves only."""

    inner_states: dict


MultiTransformState = PartitionState  # optax's former name, kept there too


def _leaf_names(tree: PyTree) -> list[str]:
    """Each leaf's key path joined with dots: a flat params dict's own keys, ``"a.b.0"`` in nested trees."""
    names = [".".join(map(str, path)) for path in optree.tree_paths(tree)]
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise ValueError(f"two leaves are both named {dup!r} (a key that contains a dot?); partition and "
                         "muon_labels name a leaf by its key path joined with '.', so those must differ.")
    return names


def partition(transforms: dict, param_labels, *, allow_unused: bool = False) -> Transform:
    r"""Send each leaf's update through exactly one of ``transforms``, picked by the leaf's label.

    ``param_labels`` is a pytree of labels (keys of ``transforms``) shaped like
    params -- or a prefix of it, as in optax: one label for a whole subtree --
    or a function ``params -> such a tree`` (e.g. :func:`muon_labels`). The
    function is called with params at ``init`` and with the gradients at each
    ``update`` (as optax does; ``params`` may be absent there), so it should
    look at names and shapes only. With :math:`\ell(i)` the label of leaf
    :math:`i` and :math:`S_k = \{j : \ell(j) = k\}`,

    .. math::

        u_i = \big[\mathcal T_{\ell(i)}\big((g_j)_{j \in S_{\ell(i)}}\big)\big]_i

    Each transform sees only its own leaves, as a dict ``name -> leaf`` where
    ``name`` is the leaf's key path joined with dots: for this library's flat
    params dicts, the sub-dict of params with those keys. So a mask (e.g.
    :func:`decay_mask`) or a name-based rule inside it works as it would on the
    full params. The state is :class:`PartitionState`: ``inner_states[label]``
    is that transform's own state.

    A label with no transform is an error that names its leaves. So is a
    transform that no leaf uses (a misspelt label would otherwise leave it
    idle) unless ``allow_unused=True``; it then runs on an empty dict. The fast
    ``apply`` runs each transform's own (through :func:`step`), so AdamW keeps
    its fused kernels.

    ``optax.partition`` (formerly ``multi_transform``, an alias here too), with
    two differences: optax hands each transform the full tree with the other
    leaves masked out, and it accepts unused transforms silently.

    Example::

        labels = lambda p: {k: "decay" if v.dim() >= 2 else "no_decay" for k, v in p.items()}
        opt = partition({"decay": adamw(1e-3, weight_decay=0.1), "no_decay": adamw(1e-3, weight_decay=0.0)},
                        labels)
        state = opt.init(params)                 # PartitionState({"decay": AdamWState, "no_decay": AdamWState})
        params, state = step(opt, grads, state, params)
    """
    if not hasattr(transforms, "items") or not transforms:
        raise TypeError("partition: transforms must be a non-empty dict label -> Transform, e.g. "
                        "partition({'muon': muon(0.02), 'adamw': adamw(3e-4)}, muon_labels).")
    transforms = dict(transforms)
    bad = [k for k, t in transforms.items() if not isinstance(t, Transform)]
    if bad:
        raise TypeError(f"partition: transforms[{bad[0]!r}] is a {type(transforms[bad[0]]).__name__}, not a "
                        "Transform; pass transforms themselves, e.g. {'adamw': adamw(3e-4)}.")
    known = ", ".join(map(repr, transforms))

    def labels_of(tree):
        """The leaves' names and labels, checked: every label has a transform (and every transform a leaf)."""
        labels = param_labels(tree) if callable(param_labels) else param_labels
        try:
            flat = optree.tree_leaves(optree.tree_broadcast_prefix(labels, tree))
        except ValueError as e:
            raise ValueError(f"partition: param_labels must be a tree of labels shaped like the params (or a "
                             f"prefix of them), or a function params -> such a tree; they do not match: {e}") from None
        names = _leaf_names(tree)
        orphans: dict = {}
        for name, label in zip(names, flat):
            if label not in transforms:
                orphans.setdefault(label, []).append(name)
        if orphans:
            label, leaves = next(iter(orphans.items()))
            shown = ", ".join(map(repr, leaves[:3])) + (f" and {len(leaves) - 3} more" if len(leaves) > 3 else "")
            raise ValueError(f"partition: the label {label!r} (of {shown}) has no transform; the transforms are "
                             f"{known}. Add transforms[{label!r}] or give those leaves one of these labels.")
        if not allow_unused:
            used = set(flat)
            idle = [k for k in transforms if k not in used]
            if idle:
                raise ValueError(f"partition: no leaf has the label {idle[0]!r} (labels in use: "
                                 f"{', '.join(map(repr, sorted(used, key=str)))}); drop transforms[{idle[0]!r}], "
                                 "fix the labels, or pass allow_unused=True.")
        return names, flat

    def split(names, labels, tree):
        """label -> dict name -> leaf."""
        xs = T.leaves(tree)
        if len(xs) != len(names):
            raise ValueError(f"partition: the gradients have {len(names)} leaves but the params {len(xs)}; pass "
                             "grads shaped like params.")
        groups: dict = {k: {} for k in transforms}
        for name, label, x in zip(names, labels, xs):
            groups[label][name] = x
        return groups

    def check(state):
        if not isinstance(state, PartitionState) or set(state.inner_states) != set(transforms):
            got = (f"inner states for {', '.join(map(repr, state.inner_states))}"
                   if isinstance(state, PartitionState) else f"a {type(state).__name__}")
            raise ValueError(f"partition over {known} got {got} as its state; it needs the PartitionState that "
                             "its own init returns: state = opt.init(params), then opt.update(grads, state, params).")

    def init(params):
        groups = split(*labels_of(params), params)
        return PartitionState({k: t.init(groups[k]) for k, t in transforms.items()})

    def update(grads, state, params=None):
        check(state)
        names, labels = labels_of(grads)
        gs = split(names, labels, grads)
        ps = split(names, labels, params) if params is not None else dict.fromkeys(transforms)
        out, inner = {}, {}
        for k, t in transforms.items():
            updates, inner[k] = t.update(gs[k], state.inner_states[k], ps[k])
            out.update(updates)
        return T.unflatten_like(grads, [out[n] for n in names]), PartitionState(inner)

    def apply(grads, state, params, *, donate=False, skip=None):
        check(state)
        names, labels = labels_of(grads)
        gs, ps = split(names, labels, grads), split(names, labels, params)
        out, inner = {}, {}
        for k, t in transforms.items():
            new, inner[k] = step(t, gs[k], state.inner_states[k], ps[k], donate=donate, skip=skip)
            out.update(new)
        return T.unflatten_like(params, [out[n] for n in names]), PartitionState(inner)

    return Transform(init, update, apply)


multi_transform = partition  # optax's former name


def muon_labels(params: PyTree) -> PyTree:
    """Muon's usual split of a transformer's params (modded-nanogpt's): ``"muon"`` or ``"adamw"`` per leaf.

    ``"muon"`` for the 2-D weights inside the repeated blocks -- the attention
    and MLP projections, ``layers.3.attn.wq.weight`` -- and ``"adamw"`` for
    everything else: the embeddings, the output head, norms, biases. A leaf's
    name is its key path joined with dots (for this library's params, its key);
    it is inside a block when a dotted segment before the last is a number, and
    an embedding wherever it sits when a segment contains ``emb`` (or is GPT-2's
    ``wte``/``wpe``). Why not Muon everywhere: its update orthogonalises a
    matrix that maps hidden vectors to hidden vectors; an embedding is a lookup
    table (one row per token, each row should move on its own) and the head
    maps to logits, and both train better with Adam (Keller Jordan's
    experiments; norms and biases are not matrices at all).

    Example::

        params = {"tok_emb.weight": torch.randn(10, 4), "layers.0.attn.wq.weight": torch.randn(4, 4),
                  "layers.0.attn_norm.weight": torch.ones(4)}
        muon_labels(params)   # {"tok_emb.weight": "adamw", "layers.0.attn.wq.weight": "muon", "...norm.weight": "adamw"}
        opt = partition({"muon": chain(scale_by_muon(), scale_by_shape(), scale_by_learning_rate(0.02)),
                         "adamw": adamw(3e-4)}, muon_labels)              # muon_with_adamw(0.02, 3e-4) builds this
        state = opt.init(params)
    """

    def label(name, x):
        parts = name.split(".")
        in_block = any(p.isdigit() for p in parts[:-1])
        embedding = any("emb" in p.lower() or p in ("wte", "wpe") for p in parts)
        return "muon" if x.dim() == 2 and in_block and not embedding else "adamw"

    return _map_named(label, params)


def _map_named(fn: Callable, tree: PyTree, prefix: str = "") -> PyTree:
    """``fn(name, leaf)`` over nested dicts, lists and tuples, names as in :func:`_leaf_names`, built container
    by container. Not through a flatten: while ``torch.compile`` traces, its optree visits a dict's leaves in
    insertion order in ``tree_map`` but sorted in ``tree_leaves``, and unflattens tensors only."""
    if isinstance(tree, dict):
        return {k: _map_named(fn, v, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_map_named(fn, v, f"{prefix}{i}.") for i, v in enumerate(tree)]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return None if tree is None else fn(prefix[:-1], tree)


_NS_COEFFS = (3.4445, -4.7750, 2.0315)
_NS_PRESETS = {
    "standard": _NS_COEFFS,
    "dion": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)),
}
_PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")


def _ns_plan(who: str, ns_coeffs, ns_steps, preconditioning) -> tuple:
    """The coefficients ``(a, b, c)`` of each Newton-Schulz step, as Python floats (static: no recompile)."""
    if isinstance(ns_steps, _Injected) or isinstance(ns_coeffs, _Injected):
        raise TypeError(f"{who}: ns_steps and ns_coeffs set how many matrix products run, so they are fixed when "
                        "the transform is built and cannot be injected; bind them first: "
                        "inject_hyperparams(functools.partial(muon, ns_steps=3))(learning_rate=0.02).")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"{who}: ns_steps must be a positive int, got {ns_steps!r}.")
    if preconditioning not in _PRECONDITIONINGS:
        raise ValueError(f"{who}: preconditioning must be one of {', '.join(map(repr, _PRECONDITIONINGS))}, "
                         f"got {preconditioning!r}.")
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in _NS_PRESETS:
            raise ValueError(f"{who}: unknown ns_coeffs preset {ns_coeffs!r}; the presets are "
                             f"{', '.join(map(repr, _NS_PRESETS))}, or pass the numbers, e.g. "
                             "(3.4445, -4.7750, 2.0315).")
        ns_coeffs = _NS_PRESETS[ns_coeffs]
    try:
        rows = torch.as_tensor(ns_coeffs, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        rows = None
    if rows is not None and rows.shape == (3,):
        return (tuple(rows.tolist()),) * ns_steps
    if rows is not None and rows.dim() == 2 and rows.shape[1] == 3 and 1 <= len(rows) <= ns_steps:
        return tuple(tuple(r) for r in rows.tolist())
    if rows is not None and rows.dim() == 2 and rows.shape[1] == 3 and len(rows) > ns_steps:
        raise ValueError(f"{who}: {len(rows)} per-step coefficient triples but ns_steps={ns_steps}; each triple is one "
                         f"step (ns_steps is then ignored, as in optax, but must be at least {len(rows)}).")
    raise ValueError(f"{who}: ns_coeffs must be one triple (a, b, c), e.g. (3.4445, -4.7750, 2.0315), a sequence "
                     f"of triples (one per step), or a preset name ('standard', 'dion'); got {ns_coeffs!r}.")


def _newton_schulz(x: torch.Tensor, plan: tuple, preconditioning: str, eps) -> torch.Tensor:
    """The iteration on a stack of wide matrices ``[B, m, n]``, ``m <= n`` (so ``X X^T`` is the small Gram)."""
    if preconditioning == "frobenius":
        x = x / (torch.linalg.matrix_norm(x, keepdim=True) + _like(eps, x))
    elif preconditioning == "spectral":
        x = x / (torch.linalg.matrix_norm(x, ord=2, keepdim=True) + _like(eps, x))
    for i, (a, b, c) in enumerate(plan):
        gram = x @ x.mT
        if i == 0 and preconditioning == "aol":  # rows rescaled by their Gram row sums (Turbo-Muon)
            s = gram.abs().sum(-1, keepdim=True).clamp(min=_like(eps, gram)).rsqrt()
            x, gram = x * s, gram * s * s.mT
        elif i == 0 and preconditioning == "schatten":  # divided by the Schatten-4 norm, ||X X^T||_F^(1/2)
            s = torch.linalg.matrix_norm(gram, keepdim=True).clamp(min=_like(eps, gram)).rsqrt()
            x, gram = x * s, gram * (s * s)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)   # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)                      # a X + (b A + c A^2) X
    return x


def orthogonalize_via_newton_schulz(x: torch.Tensor, ns_coeffs=_NS_COEFFS, ns_steps: int = 5,
                                    preconditioning: str = "frobenius", eps: float = 1e-8) -> torch.Tensor:
    r"""An approximately orthogonal matrix with the singular vectors of ``x``: :math:`U S' V^T` for :math:`x = U S V^T`.

    ``x`` has shape ``[..., m, n]`` (leading dimensions are a batch). With the
    default (Frobenius) preconditioning :math:`X_0 = x / (\|x\|_F + \epsilon)`,
    so every singular value lies in :math:`[0, 1]`; then ``ns_steps`` times,
    with :math:`(a, b, c)` = ``ns_coeffs``:

    .. math::

        A = X X^T, \qquad X \leftarrow a X + (b A + c A^2)\, X

    which maps each singular value :math:`\sigma \mapsto a\sigma + b\sigma^3 +
    c\sigma^5` and leaves the singular vectors alone. The default coefficients
    (Keller Jordan's) maximise the slope at zero, so small singular values grow
    fast; the price is that the iteration does not converge to 1 but oscillates
    in a band: after 5 steps every singular value with
    :math:`\sigma / \|x\|_F \ge 3\cdot 10^{-3}` lies in :math:`[0.68, 1.21]`
    (iterate the scalar polynomial to check; optax's docstring says "roughly
    [0.5, 1.5]"; smaller ones have not grown into the band yet), which trains
    as well as the exact :math:`U V^T`.
    A tall ``x`` (m > n) is transposed first, so :math:`A` is the smaller Gram
    matrix; :math:`f(X^T) = f(X)^T` makes that exact.

    ``ns_coeffs`` may also be one triple per step (``ns_steps`` is then ignored)
    or a preset: ``"standard"`` (the default) or ``"dion"``. ``preconditioning``:
    ``"frobenius"`` (default), ``"spectral"`` (divide by the largest singular
    value, an SVD: costly, but every singular value starts in the band's
    reach), ``"aol"`` (the first step rescales row :math:`i` by
    :math:`(\sum_j |A_{ij}|)^{-1/2}`, Boissin et al.) or ``"schatten"`` (the
    first step divides by :math:`\|X X^T\|_F^{1/2}`, Grishina et al.); the last
    two clamp their denominators at ``eps`` (optax fixes 1e-8 there).

    The matrix products run in ``x``'s dtype: float32 on CPU (bfloat16 matmuls
    are slower there); Keller Jordan runs them in bfloat16 on GPUs, which the
    iteration tolerates -- cast ``x`` first, or pass ``ns_dtype`` to
    :func:`scale_by_muon`. Same numbers as optax's function of this name.

    Example::

        o = orthogonalize_via_newton_schulz(torch.randn(64, 256))
        torch.linalg.svdvals(o)          # all within [0.68, 1.21]
    """
    if x.dim() < 2:
        raise ValueError(f"orthogonalize_via_newton_schulz needs a matrix (or a batch of them, [..., m, n]), got "
                         f"shape {tuple(x.shape)}.")
    plan = _ns_plan("orthogonalize_via_newton_schulz", ns_coeffs, ns_steps, preconditioning)
    tall = x.shape[-2] > x.shape[-1]
    wide = x.mT if tall else x
    out = _newton_schulz(wide.reshape(-1, *wide.shape[-2:]), plan, preconditioning, eps).reshape(wide.shape)
    return out.mT if tall else out


def _orthogonalize_all(xs: list, plan: tuple, preconditioning: str, eps, ns_dtype) -> list:
    """Every matrix of ``xs`` orthogonalised; those of one shape (up to a transpose), dtype and device
    go through the iteration together as one stack, so a model's many equal projections cost a few
    batched matrix products instead of many small ones.

    Each runs in the orientation with fan-in as rows (a square ``(out, in)`` weight is transposed too):
    that is how optax sees a JAX ``(in, out)`` weight, and the one preconditioning that is not
    transpose-invariant ("aol" rescales rows) then gives optax's numbers."""
    groups: dict = {}
    for i, x in enumerate(xs):
        groups.setdefault((min(x.shape), max(x.shape), x.dtype, x.device), []).append(i)
    out: list = [None] * len(xs)
    for idx in groups.values():
        tall = [xs[i].shape[0] >= xs[i].shape[1] for i in idx]
        stack = torch.stack([xs[i].mT if t else xs[i] for i, t in zip(idx, tall)])
        o = _newton_schulz(stack if ns_dtype is None else stack.to(ns_dtype), plan, preconditioning, eps)
        for i, t, oi in zip(idx, tall, o.to(stack.dtype).unbind(0)):
            out[i] = oi.mT if t else oi
    return out


def _check_matrices(who: str, tree: PyTree):
    xs = T.leaves(tree)
    bad = [i for i, x in enumerate(xs) if x.dim() != 2]
    if bad:
        name, shape = _leaf_names(tree)[bad[0]], tuple(xs[bad[0]].shape)
        raise ValueError(
            f"{who} works on matrices, but the leaf {name!r} has shape {shape}. Send it elsewhere: "
            "muon(...) routes non-matrix leaves to Adam, and partition({'muon': ..., 'adamw': adamw(...)}, "
            "muon_labels) picks the leaves by name (muon_with_adamw builds that).")


def _debiased_momentum(ms: list, gs: list, b, t: torch.Tensor, nesterov: bool) -> list:
    r"""optax's bias-corrected momentum: :math:`m_t/(1-\beta^t)`, or with Nesterov
    :math:`\beta\, m_t/(1-\beta^{t+1}) + (1-\beta)\, g/(1-\beta^t)` (corrections in float64)."""
    t = t.to(torch.float64)
    bc = 1 - _power(b, t)
    if not nesterov:
        return [m * _like(1 / bc, m) for m in ms]
    c_m, c_g = b / (1 - _power(b, t + 1)), (1 - b) / bc  # 0-d: three passes over each leaf, not five
    return [m * _like(c_m, m) + g * _like(c_g, g) for m, g in zip(ms, gs)]


class MuonState(NamedTuple):
    """``count``: updates done so far (0-d int64); ``mu``: the momentum, an average of past gradients shaped
    like params (in ``mu_dtype``). optax also stores the Newton-Schulz coefficients here; they are
    fixed Python numbers of the transform in this library (no host sync to read them)."""

    count: torch.Tensor
    mu: PyTree


def scale_by_muon(ns_coeffs=_NS_COEFFS, ns_steps: int = 5, beta: float = 0.95, eps: float = 1e-8,
                  mu_dtype: torch.dtype | None = None, *, nesterov: bool = True, adaptive: bool = False,
                  preconditioning: str = "frobenius", ns_dtype: torch.dtype | None = None) -> Transform:
    r"""Muon's direction: the momentum of the gradients, orthogonalised by Newton-Schulz (no learning rate).

    Every leaf must be a matrix. With :math:`t` the incremented count and
    :math:`\beta` = ``beta``:

    .. math::

        m_t &= \beta\, m_{t-1} + (1-\beta)\, g \\
        \hat m &= \frac{m_t}{1-\beta^t} \quad\text{or, with Nesterov,}\quad
            \hat m = \beta\,\frac{m_t}{1-\beta^{t+1}} + (1-\beta)\,\frac{g}{1-\beta^t} \\
        u &= \mathrm{NS}(\hat m) \quad\text{(}\times \langle \hat m, \mathrm{NS}(\hat m)\rangle
            \text{ with ``adaptive``)}

    where NS is :func:`orthogonalize_via_newton_schulz` (``ns_coeffs``,
    ``ns_steps``, ``preconditioning``, ``eps``). This is optax's
    ``scale_by_muon``: the momentum is an average (Keller Jordan's reference
    now lerps too) and bias-corrected, as Adam's first moment; since NS divides
    by the norm, the correction only changes the Nesterov mix of the first few
    steps. Defaults are optax's (``beta`` 0.95 and Nesterov as in Keller
    Jordan's reference; ``eps`` 1e-8, his is 1e-7: it only guards a zero
    matrix). The update's size comes from the shape, not from the gradient's
    scale: every singular value is near 1, so scale it next
    (:func:`scale_by_shape`) and by a learning rate, as :func:`muon` does.

    Matrices of one shape (up to a transpose) go through the iteration as one
    batched stack, each with fan-in as rows (optax's orientation of a JAX
    weight; only ``"aol"`` can tell); the products run in the update's dtype, or in ``ns_dtype``
    (e.g. ``torch.bfloat16`` on a GPU, as Keller Jordan does; on CPU float32 is
    faster). ``mu_dtype``: the momentum's dtype (default: the params').

    Example::

        opt = chain(scale_by_muon(), scale_by_shape(), scale_by_learning_rate(0.02))
        matrices = {"w": torch.randn(4, 6)}            # every leaf a matrix
        u, state = opt.update(matrices, opt.init(matrices))   # (MuonState, EmptyState, ScaleByScheduleState)
    """
    plan = _ns_plan("scale_by_muon", ns_coeffs, ns_steps, preconditioning)
    for name, value, high in (("beta", beta, 1.0), ("eps", eps, float("inf"))):
        _check_number("scale_by_muon", value, name)
        _check_range("scale_by_muon", value, name, 0.0, high)

    def init(params):
        _check_matrices("scale_by_muon", params)
        return MuonState(torch.zeros((), dtype=torch.int64),
                         T.tree_map(lambda p: torch.zeros_like(p, dtype=mu_dtype), params))

    def update(grads, state, params=None):
        _check_matrices("scale_by_muon", grads)
        b, epsilon = _hyper(beta, state.count), _hyper(eps, state.count)
        t = state.count + 1
        gs, ms = T.leaves(grads), T.leaves(state.mu)
        # m + (1 - beta)(g - m), in the wider of the two dtypes (a bfloat16 mu_dtype is only how it is stored)
        new_ms = [m.to(dt).lerp(g.to(dt), _like(1 - b, g.to(dt)))
                  for m, g in zip(ms, gs) for dt in [torch.promote_types(m.dtype, g.dtype)]]
        hats = _debiased_momentum(new_ms, gs, b, t, nesterov)
        out = _orthogonalize_all(hats, plan, preconditioning, epsilon, ns_dtype)
        if adaptive:  # scaled by the dual norm <m, NS(m)> (Bernstein & Newhouse)
            out = [(h * o).sum() * o for h, o in zip(hats, out)]
        updates = T.unflatten_like(grads, [o.to(g.dtype) for o, g in zip(out, gs)])
        return updates, MuonState(t, T.unflatten_like(state.mu, [n.to(m.dtype) for n, m in zip(new_ms, ms)]))

    return Transform(init, update)


def scale_by_shape(consistent_rms: float | None = None) -> Transform:
    r"""Scale each matrix's update by a factor of its shape, so one learning rate suits every layer.

    For an :math:`r \times c` matrix in torch's ``(out_features, in_features)``
    layout (:math:`r` = fan-out, :math:`c` = fan-in):

    .. math::

        u \leftarrow \sqrt{\max(1,\ r / c)}\; u \quad\text{(default; Keller Jordan's reference)},
        \qquad u \leftarrow \rho \sqrt{\max(r, c)}\; u \quad\text{(``consistent\_rms`` = } \rho\text{)}

    The first keeps the update's spectral norm at :math:`\sqrt{\text{fan-out}/
    \text{fan-in}}` for expanding layers; the second (Liu et al., Moonlight)
    gives every matrix an update RMS of about :math:`\rho` (0.2 matches AdamW's
    typical RMS, so AdamW's learning rate and weight decay carry over).
    optax's ``scale_by_shape`` computes the same fan-out/fan-in rule for JAX's
    ``(in, out)`` layout, i.e. :math:`\sqrt{\max(1, c/r)}` on the same array:
    this is optax's rule on the transposed (torch-layout) weight. Stateless.

    Example::

        u, _ = scale_by_shape().update({"w1": torch.ones(352, 128)}, EmptyState())   # times sqrt(352/128)
    """
    if consistent_rms is not None:
        _check_number("scale_by_shape", consistent_rms, "consistent_rms")
        _check_range("scale_by_shape", consistent_rms, "consistent_rms", 0.0, float("inf"))

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        _check_matrices("scale_by_shape", updates)
        rms = _hyper(consistent_rms, None)

        def one(u):
            rows, cols = u.shape
            if rms is None:
                return u * math.sqrt(max(1.0, rows / cols))
            return u * (_like(rms, u) * math.sqrt(max(rows, cols)))

        return T.tree_map(one, updates), state

    return Transform(init, update)


def _scale_by_adam_optax(b1, b2, eps, eps_root, mu_dtype, nesterov) -> Transform:
    r"""optax's ``scale_by_adam`` (what :func:`muon` gives the non-matrix leaves): ``eps_root`` inside the root,
    :math:`u = \hat m / (\sqrt{v/(1-\beta_2^t) + \epsilon_{root}} + \epsilon)`, and Nesterov's :math:`\hat m`
    (NAdam) as in :func:`scale_by_muon`. State: :class:`ScaleByAdamState`."""
    for name, value, high in (("adam_b1", b1, 1.0), ("adam_b2", b2, 1.0), ("eps", eps, float("inf")),
                              ("adam_eps_root", eps_root, float("inf"))):
        _check_number("muon", value, name)
        _check_range("muon", value, name, 0.0, high)

    def init(params):
        return ScaleByAdamState(torch.zeros((), dtype=torch.int64),
                                T.tree_map(lambda p: torch.zeros_like(p, dtype=mu_dtype), params),
                                T.zeros_like(params))

    def update(grads, state, params=None):
        beta1, beta2, e, er = (_hyper(h, state.count) for h in (b1, b2, eps, eps_root))
        t = state.count + 1
        gs, ms, vs = T.leaves(grads), T.leaves(state.mu), T.leaves(state.nu)
        new_ms = [_like(1 - beta1, g) * g + _like(beta1, m) * m for m, g in zip(ms, gs)]
        new_vs = [_like(1 - beta2, g) * (g * g) + _like(beta2, v) * v for v, g in zip(vs, gs)]
        hats = _debiased_momentum(new_ms, gs, beta1, t, nesterov)
        bc2 = 1 - _power(beta2, t.to(torch.float64))
        out = [(h / ((v / _like(bc2, v) + _like(er, v)).sqrt() + _like(e, v))).to(g.dtype)
               for h, v, g in zip(hats, new_vs, gs)]
        return T.unflatten_like(grads, out), ScaleByAdamState(
            t, T.unflatten_like(state.mu, [n.to(m.dtype) for n, m in zip(new_ms, ms)]),
            T.unflatten_like(state.nu, [n.to(v.dtype) for n, v in zip(new_vs, vs)]))

    return Transform(init, update)


def _branch_mask(mask):
    """A weight-decay mask for one branch of :func:`partition`: a function is kept (it receives the branch's
    dict name -> leaf); a tree of bools shaped like the full params is looked up by leaf name."""
    if mask is None or callable(mask):
        return mask
    flags = dict(zip(_leaf_names(mask), optree.tree_leaves(mask)))

    def lookup(sub):
        missing = [n for n in sub if n not in flags]
        if missing:
            raise ValueError(f"weight_decay_mask has no entry for the param {missing[0]!r}; give one bool per "
                             "param (a tree shaped like params) or a function of the params.")
        return {n: flags[n] for n in sub}

    return lookup


def _muon_chain(learning_rate, ns_coeffs, ns_steps, beta, eps, weight_decay, weight_decay_mask, mu_dtype,
                nesterov, adaptive, preconditioning, consistent_rms, ns_dtype) -> Transform:
    return chain(scale_by_muon(ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov=nesterov, adaptive=adaptive,
                               preconditioning=preconditioning, ns_dtype=ns_dtype),
                 scale_by_shape(consistent_rms),
                 add_decayed_weights(weight_decay, _branch_mask(weight_decay_mask)),
                 scale_by_learning_rate(learning_rate))


def _matrix_or_adam(params):
    return T.tree_map(lambda p: "muon" if p.dim() == 2 else "adam", params)


def muon(learning_rate, ns_coeffs=_NS_COEFFS, ns_steps: int = 5, beta: float = 0.95, eps: float = 1e-8,
         weight_decay: float = 0.0, weight_decay_mask=None, mu_dtype: torch.dtype | None = None, *,
         nesterov: bool = True, adaptive: bool = False, preconditioning: str = "frobenius",
         adam_b1: float = 0.9, adam_b2: float = 0.999, adam_eps_root: float = 0.0,
         adam_weight_decay: float = 0.0, adam_learning_rate=None, consistent_rms: float | None = None,
         ns_dtype: torch.dtype | None = None) -> Transform:
    r"""Muon (MomentUm Orthogonalized by Newton-Schulz): optax's ``optax.contrib.muon``, argument for argument.

    Matrices (2-D leaves) take Muon's step; with :math:`\hat m` the
    bias-corrected (Nesterov) momentum of :func:`scale_by_muon`, NS its
    Newton-Schulz orthogonalisation, :math:`s` the shape factor of
    :func:`scale_by_shape`, :math:`\eta_k` = ``learning_rate`` (a number, a 0-d
    tensor, or a schedule called with the count of updates done so far) and
    :math:`\lambda` = ``weight_decay``:

    .. math::

        p \leftarrow p - \eta_k \big(s\, \mathrm{NS}(\hat m) + \lambda p\big),
        \qquad s = \sqrt{\max(1, \text{fan-out}/\text{fan-in})}
        \ \text{or}\ \rho\sqrt{\max(\text{fan-in}, \text{fan-out})}

    Every other leaf (vectors, scalars, 3-D and up) takes optax's AdamW step,
    Nesterov's variant (NAdam) when ``nesterov`` (optax passes it on), with
    ``adam_b1``, ``adam_b2``, the same ``eps`` and ``mu_dtype``,
    ``adam_eps_root`` inside the square root, ``adam_weight_decay`` and
    ``adam_learning_rate`` (default: ``learning_rate``):

    .. math::

        p \leftarrow p - \eta'_k \Big(\frac{\hat m}{\sqrt{v / (1-\beta_2^t) + \epsilon_{root}} + \epsilon}
            + \lambda' p\Big)

    It is ``partition({"muon": chain(scale_by_muon, scale_by_shape,
    add_decayed_weights(weight_decay, weight_decay_mask), scale_by_learning_rate),
    "adam": chain(<optax's adam>, add_decayed_weights(adam_weight_decay),
    scale_by_learning_rate(adam_learning_rate))}, 2-D -> "muon")``; its state
    is that :class:`PartitionState`. The decay is multiplied by the learning
    rate, as in torch and optax. ``weight_decay_mask``: a tree of bools shaped
    like params, or a function that receives the matrices as a dict
    ``name -> tensor``.

    Differences from optax, all forced by torch's conventions: the shape factor
    reads fan-out/fan-in from torch's ``(out, in)`` layout, so on a torch
    weight it equals optax's on the transposed JAX weight; optax's
    ``muon_weight_dimension_numbers`` (Muon on 3-D+ leaves) is not offered:
    those go to Adam, or pick leaves by name with :func:`muon_with_adamw` /
    :func:`partition`. ``ns_dtype`` is extra (see :func:`scale_by_muon`).
    Defaults are optax's: Keller Jordan's coefficients, 5 steps, ``beta`` 0.95,
    Nesterov; no weight decay.

    For a language model the matrices that should take Muon are the hidden
    ones only (embeddings and the head train better with AdamW):
    :func:`muon_with_adamw` makes that split by name.

    Example::

        opt = muon(learning_rate=schedules.cosine_annealing(0.02, T_max=1000), weight_decay=0.01)
        state = opt.init(params)          # PartitionState({"muon": (MuonState, ...), "adam": (...)})
        params, state = step(opt, grads, state, params)
    """
    adam_learning_rate = _check_muon_rates("muon", learning_rate, adam_learning_rate)
    matrices = _muon_chain(learning_rate, ns_coeffs, ns_steps, beta, eps, weight_decay, weight_decay_mask,
                           mu_dtype, nesterov, adaptive, preconditioning, consistent_rms, ns_dtype)
    adam = chain(_scale_by_adam_optax(adam_b1, adam_b2, eps, adam_eps_root, mu_dtype, nesterov),
                 add_decayed_weights(adam_weight_decay), scale_by_learning_rate(adam_learning_rate))
    return partition({"muon": matrices, "adam": adam}, _matrix_or_adam, allow_unused=True)


def _check_muon_rates(who: str, learning_rate, adam_learning_rate):
    """Muon's rate checked; the Adam side's rate, ``learning_rate`` when not given (optax's rule)."""
    _check_range(who, learning_rate, "learning_rate", 0.0, float("inf"))
    return learning_rate if adam_learning_rate is None else adam_learning_rate


def muon_with_adamw(learning_rate, adam_learning_rate=None, *, beta: float = 0.95, nesterov: bool = True,
                    ns_coeffs=_NS_COEFFS, ns_steps: int = 5, eps: float = 1e-8, weight_decay: float = 0.0,
                    weight_decay_mask=None, consistent_rms: float | None = None, adaptive: bool = False,
                    preconditioning: str = "frobenius", mu_dtype: torch.dtype | None = None,
                    ns_dtype: torch.dtype | None = None, adam_b1: float = 0.9, adam_b2: float = 0.999,
                    adam_eps: float = 1e-8, adam_weight_decay: float = 0.0, adam_mask=None,
                    param_labels=muon_labels, impl: str = "auto") -> Transform:
    r"""Muon for a transformer's hidden matrices, this library's AdamW for the rest, as modded-nanogpt trains.

    ``partition({"muon": <muon's matrix step>, "adamw": adamw(...)}, param_labels)``
    with :func:`muon_labels` as the default split: the blocks' 2-D weights take

    .. math::

        p \leftarrow p - \eta_k \big(s\, \mathrm{NS}(\hat m) + \lambda p\big)

    exactly as in :func:`muon` (same arguments: ``beta``, ``nesterov``,
    ``ns_coeffs``, ``ns_steps``, ``eps``, ``weight_decay``,
    ``weight_decay_mask``, ``consistent_rms``, ``adaptive``, ``preconditioning``,
    ``mu_dtype``, ``ns_dtype``), and the embeddings, head, norms and biases take
    :func:`adamw` -- torch's AdamW, fused kernels included (``impl``) -- with
    ``adam_learning_rate`` (default: ``learning_rate``), ``adam_b1``,
    ``adam_b2``, ``adam_eps``, ``adam_weight_decay`` and ``adam_mask`` (its
    decay mask; it receives those leaves as a dict ``name -> tensor``).

    The two learning rates differ in kind: Muon's update has spectral norm
    about :math:`s` whatever the gradient's scale (0.02 is Keller Jordan's
    value), Adam's has entries of about 1 (1e-3 to 3e-3 at small sizes). With
    ``consistent_rms=0.2`` Muon's RMS matches Adam's, and one learning rate
    (and weight decay) serves both (Liu et al., Moonlight). Weight decay is 0
    by default on both sides (optax's and modded-nanogpt's defaults). Leaves
    are named by key path (see :func:`partition`); pass ``param_labels`` (a
    tree or a function giving ``"muon"`` or ``"adamw"`` per leaf) for other
    models. A side with no leaves is allowed.

    Example::

        opt = chain(clip_by_global_norm(1.0), muon_with_adamw(0.02, 3e-3))
        state = opt.init(params)   # (ClipState, PartitionState({"muon": (MuonState, ...), "adamw": AdamWState}))
        params, state = step(opt, grads, state, params)
    """
    adam_learning_rate = _check_muon_rates("muon_with_adamw", learning_rate, adam_learning_rate)
    matrices = _muon_chain(learning_rate, ns_coeffs, ns_steps, beta, eps, weight_decay, weight_decay_mask,
                           mu_dtype, nesterov, adaptive, preconditioning, consistent_rms, ns_dtype)
    rest = adamw(adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay, adam_mask, impl=impl)
    return partition({"muon": matrices, "adamw": rest}, param_labels, allow_unused=True)


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
        # Masks and label functions route leaves; they are not hyper-parameters of the step count.
        scheduled = {k: v for k, v in kwargs.items()
                     if callable(v) and k != "mask" and not k.endswith("_mask") and k != "param_labels"}
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


# --------------------------------------------------------------------------- wrappers: finding a state


def _states_of(opt_state: PyTree, cls: type) -> list:
    """Every ``cls`` state inside ``opt_state`` (through chain, masked, inject_hyperparams and the wrappers)."""
    return [s for s in optree.tree_flatten(opt_state, is_leaf=lambda x: isinstance(x, cls), none_is_leaf=True)[0]
            if isinstance(s, cls)]


def _find_state(opt_state: PyTree, cls: type, who: str, hint: str):
    """The one ``cls`` state inside ``opt_state``."""
    found = _states_of(opt_state, cls)
    if len(found) != 1:
        raise ValueError(f"{who}: opt_state holds {len(found) or 'no'} {cls.__name__}{'s' if found else ''}, it "
                         f"needs exactly one. {hint}")
    return found[0]


def _f64(x) -> torch.Tensor:
    """A hyper-parameter (a number or a 0-d tensor) as a 0-d float64 tensor."""
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def _check_inner(who: str, inner) -> None:
    if not isinstance(inner, Transform):
        raise TypeError(f"{who}: the wrapped optimizer must be a Transform, got a {type(inner).__name__}; "
                        f"e.g. {who}(adamw(1e-3), ...).")


# --------------------------------------------------------------------------- schedule-free


class ScaleByRmsState(NamedTuple):
    """``count``: updates done so far (0-d int64); ``nu``: the second moment, shaped like params."""

    count: torch.Tensor
    nu: PyTree


def _scale_by_rms(b2: float, eps: float) -> Transform:
    r"""Adam without its first moment: :math:`g / (\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon)` (optax's
    ``scale_by_rms(b2, eps, eps_in_sqrt=False, bias_correction=True)``), in :func:`scale_by_adam`'s float order."""
    for name, value, high in (("b2", b2, 1.0), ("eps", eps, float("inf"))):
        _check_number("schedule_free_adamw", value, name)
        _check_range("schedule_free_adamw", value, name, 0.0, high)

    def init(params):
        return ScaleByRmsState(torch.zeros((), dtype=torch.int64), T.zeros_like(params))

    def update(grads, state, params=None):
        beta2, epsilon = _hyper(b2, state.count), _hyper(eps, state.count)
        t = state.count + 1
        bc2_sqrt = (1 - _power(beta2, t.to(torch.float64))) ** 0.5
        nu = T.tree_map(lambda v, g: v * _like(beta2, v) + _like(1 - beta2, g) * g * g, state.nu, grads)
        updates = T.tree_map(lambda g, v: g / (v.sqrt() / _like(bc2_sqrt, v) + _like(epsilon, v)), grads, nu)
        return updates, ScaleByRmsState(t, nu)

    return Transform(init, update)


class ScheduleFreeState(NamedTuple):
    r"""The state of :func:`schedule_free` (optax's fields; ``count`` is optax's ``step_count`` minus one).

    ``b1``: the interpolation weight that formed the current params y (0-d
    float64; :func:`schedule_free_eval_params` reads it); ``weight_sum``: the sum
    of the averaging weights so far, :math:`\sum_i \gamma_{max,i}^{p}` (0-d
    float64); ``count``: updates done (0-d int64); ``max_lr``: the largest
    learning rate so far (0-d float64); ``base_optimizer_state``: the base
    optimizer's state; ``z``: the z sequence, shaped like params (in
    ``state_dtype`` when given).
    """

    b1: torch.Tensor
    weight_sum: torch.Tensor
    count: torch.Tensor
    max_lr: torch.Tensor
    base_optimizer_state: PyTree
    z: PyTree


def schedule_free(base_optimizer: Transform, learning_rate, b1: float = 0.9, weight_lr_power: float = 2.0,
                  state_dtype: torch.dtype | None = None) -> Transform:
    r"""Make ``base_optimizer`` schedule-free (Defazio et al. 2024, "The Road Less Scheduled"), as optax's
    ``contrib.schedule_free``.

    Three sequences: z, which the base optimizer steps; x, a weighted average of
    the z's, the params to *evaluate*; and y, their interpolation, the params
    the gradients are taken at -- the ``params`` this transform is given and
    returns updates for. With :math:`\Delta_k` the base optimizer's update for
    the gradient at :math:`y_k` and :math:`\gamma_k` the learning rate of update
    :math:`k` (0-based: a schedule is called with the count of updates done,
    as ``scale_by_learning_rate`` calls it; optax calls the wrapper's schedule
    with :math:`k + 1` and the base optimizer's with :math:`k`):

    .. math::

        z_{k+1} &= z_k + \Delta_k, \qquad
        x_k = \frac{y_k - (1-\beta_1)\, z_k}{\beta_1} \\
        c_{k+1} &= \frac{\gamma_{max,k}^{\,p}}{\sum_{i \le k} \gamma_{max,i}^{\,p}}, \qquad
        \gamma_{max,k} = \max_{i \le k} \gamma_i \\
        x_{k+1} &= (1 - c_{k+1})\, x_k + c_{k+1}\, z_{k+1}, \qquad
        y_{k+1} = \beta_1 x_{k+1} + (1-\beta_1)\, z_{k+1}

    with :math:`p` = ``weight_lr_power`` and :math:`y_0 = z_0 = x_0` the initial
    params. x is not stored: it is recovered from y and z (so the memory is the
    base optimizer's plus one copy of params), and the update returned is
    :math:`y_{k+1} - y_k`. For evaluation, take x:
    ``schedule_free_eval_params(state, params)``. A weight that is 0/0 (a zero
    learning rate so far) counts as 0, as in optax.

    The base optimizer should have no momentum (the interpolation replaces it)
    and must see the same learning rate :math:`\gamma_k` (pass it the same
    schedule). Defaults are optax's (``b1`` 0.9, ``weight_lr_power`` 2: the
    paper's weighting, which discounts the small warm-up steps). ``b1`` must be
    in (0, 1]: x is recovered by dividing by it.

    Example::

        base = chain(scale_by_learning_rate(0.1))        # SGD without momentum
        opt = schedule_free(base, 0.1, b1=0.9)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)            # y: where the next gradient is taken
        x = schedule_free_eval_params(state, params)       # x: what to evaluate
    """
    _check_inner("schedule_free", base_optimizer)
    _check_range("schedule_free", learning_rate, "learning_rate", 0.0, float("inf"))
    for name, value in (("b1", b1), ("weight_lr_power", weight_lr_power)):
        _check_number("schedule_free", value, name)
    if isinstance(b1, (int, float)) and not 0 < b1 <= 1:
        raise ValueError(f"schedule_free: b1 must lie in (0, 1], got {b1}; the evaluation params are "
                         "(y - (1 - b1) z) / b1. optax's default is 0.9.")

    def init(params):
        zero = torch.zeros((), dtype=torch.int64)
        z = T.tree_map(lambda p: p.to(state_dtype or p.dtype, copy=True), params)  # never an alias of params
        return ScheduleFreeState(b1=_f64(_hyper(b1, zero)), weight_sum=torch.zeros((), dtype=torch.float64),
                                 count=zero, max_lr=torch.zeros((), dtype=torch.float64),
                                 base_optimizer_state=base_optimizer.init(params), z=z)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("schedule_free: update needs the current params y; call update(grads, state, params).")
        lr = _f64(_hyper(learning_rate, state.count))
        beta1 = _f64(_hyper(b1, state.count))
        max_lr = torch.maximum(state.max_lr, lr)
        weight = max_lr ** _hyper(weight_lr_power, state.count)
        weight_sum = state.weight_sum + weight
        ck = torch.where(torch.isnan(weight) | torch.isnan(weight_sum), torch.full_like(weight, math.nan),
                         torch.nan_to_num(weight / weight_sum, nan=0.0, posinf=math.inf))
        base_updates, base_state = base_optimizer.update(grads, state.base_optimizer_state, params)
        z = T.tree_map(lambda zi, u: (zi + u).to(zi.dtype), state.z, base_updates)

        def new_y(y, z_old, z_new):
            x_old = (y - _like(1 - state.b1, y) * z_old) / _like(state.b1, y)  # the b1 that formed y
            x = _like(1 - ck, x_old) * x_old + _like(ck, x_old) * z_new
            return _like(beta1, x) * x + _like(1 - beta1, x) * z_new - y

        updates = T.tree_map(new_y, params, state.z, z)
        return updates, ScheduleFreeState(beta1, weight_sum, state.count + 1, max_lr, base_state, z)

    return Transform(init, update)


def schedule_free_eval_params(state: PyTree, params: PyTree) -> PyTree:
    r"""The params to evaluate a :func:`schedule_free` model at: :math:`x = (y - (1-\beta_1) z) / \beta_1`.

    ``params`` are the training params y (what the updates were applied to);
    ``state`` is the optimizer state holding one :class:`ScheduleFreeState`
    (alone, or inside a chain or another wrapper). Each leaf keeps its dtype.

    Example::

        opt = schedule_free_adamw(1e-3, warmup_steps=100)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
        eval_params = schedule_free_eval_params(state, params)
    """
    s = _find_state(state, ScheduleFreeState, "schedule_free_eval_params",
                    "Pass the state of schedule_free / schedule_free_adamw (or of a chain holding one).")
    return T.tree_map(lambda y, z: ((y - _like(1 - s.b1, y) * z) / _like(s.b1, y)).to(y.dtype), params, s.z)


def _warmed_up(learning_rate, warmup_steps: int):
    """``learning_rate`` times ``min(1, (k + 1) / warmup_steps)`` at update ``k``; unchanged without warm-up."""
    if not warmup_steps:
        return learning_rate

    def schedule(count):
        ramp = ((torch.as_tensor(count).to(torch.float64) + 1) / warmup_steps).clamp(max=1.0)
        return _hyper(learning_rate, count) * ramp

    return schedule


def schedule_free_adamw(learning_rate=0.0025, warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-8, weight_decay: float = 0.0, weight_lr_power: float = 2.0,
                        state_dtype: torch.dtype | None = None, *, mask=None) -> Transform:
    r"""Schedule-free AdamW (Defazio et al. 2024), as optax's ``contrib.schedule_free_adamw``.

    :func:`schedule_free` around AdamW without momentum,
    ``chain(<rms scaling>, add_decayed_weights(weight_decay, mask), scale_by_learning_rate(γ))``:

    .. math::

        v &\leftarrow \beta_2 v + (1-\beta_2)\, g^2, \qquad
        \Delta_k = -\gamma_k \Big(\frac{g}{\sqrt{v}/\sqrt{1-\beta_2^{k+1}} + \epsilon} + \lambda\, y_k\Big) \\
        \gamma_k &= \eta \min\!\big(1, (k+1)/w\big)

    then z, x and y as in :func:`schedule_free` (``b1`` is the interpolation
    weight :math:`\beta_1` there, not a momentum). The gradient and the weight
    decay are taken at y, the ``params`` of the train step; evaluate at x,
    ``schedule_free_eval_params(state, params)``. ``learning_rate`` :math:`\eta`
    is a number, a 0-d tensor or a schedule (called with the update count);
    with ``warmup_steps`` :math:`w > 0` it is ramped linearly, the first update
    already getting :math:`\eta / w` (as :func:`~minillm_func.schedules.wsd` and
    ``warmup_cosine`` do). Defaults are optax's: no decay schedule is needed,
    which is the method's point.

    Differences from optax, both about warm-up:

    - ``warmup_steps=0`` means no warm-up (optax's ``None``; optax's ``0`` gives
      a learning rate of 0 for ever);
    - the z step and the averaging weight use the same :math:`\gamma_k`, as in
      the paper's Algorithm 1 (:math:`\gamma_t = \gamma \min(1, t/T_{warmup})`,
      :math:`t` 1-based, for both). optax evaluates
      its warm-up at :math:`k` for the z step (so its first update has
      learning rate 0 and moves nothing) and at :math:`k+1` for the weight.
      Without warm-up the two agree exactly.

    ``mask`` (as in :func:`adamw`) excludes leaves from weight decay;
    ``state_dtype`` keeps z in another dtype (e.g. float32 for bfloat16 params).

    Example::

        opt = schedule_free_adamw(1e-3, warmup_steps=100, weight_decay=0.01)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)   # grads taken at params = y
        params = apply_updates(params, updates)
        eval_params = schedule_free_eval_params(state, params)   # x, for validation and export
    """
    if warmup_steps is None:  # optax's spelling of "no warm-up"
        warmup_steps = 0
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"schedule_free_adamw: warmup_steps must be an int >= 0 (0: no warm-up), got "
                         f"{warmup_steps!r}.")
    _check_range("schedule_free_adamw", learning_rate, "learning_rate", 0.0, float("inf"))
    lr = _warmed_up(learning_rate, warmup_steps)
    base = chain(_scale_by_rms(b2, eps), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))
    return schedule_free(base, lr, b1=b1, weight_lr_power=weight_lr_power, state_dtype=state_dtype)


# --------------------------------------------------------------------------- moving averages


class EmaState(NamedTuple):
    """``count``: updates done (0-d int64); ``ema``: the moving average of the updates (``accumulator_dtype``
    when given, else the params' dtypes)."""

    count: torch.Tensor
    ema: PyTree


def ema(decay: float, debias: bool = True, accumulator_dtype: torch.dtype | None = None) -> Transform:
    r"""An exponential moving average of the *updates* (optax's ``ema``): momentum in its ``(1 - decay)`` form.

    .. math::

        e_t = \delta\, e_{t-1} + (1-\delta)\, g_t, \qquad
        u_t = e_t / (1 - \delta^t) \;\text{(debias)} \quad\text{or}\quad e_t

    with :math:`e_0 = 0` and :math:`t` the incremented count. The debiasing
    makes the first outputs an average rather than a shrunk sum. The state
    keeps :math:`e_t` in ``accumulator_dtype`` (the updates returned are not
    cast). To average the *params* for evaluation, see :func:`ema_params`.

    Example::

        opt = chain(ema(0.9), scale_by_learning_rate(1e-2))   # SGD with (debiased) EMA momentum
        updates, state = opt.update(grads, opt.init(params), params)
    """
    _check_number("ema", decay, "decay")
    _check_range("ema", decay, "decay", 0.0, 1.0)

    def init(params):
        return EmaState(torch.zeros((), dtype=torch.int64),
                        T.tree_map(lambda p: torch.zeros_like(p, dtype=accumulator_dtype), params))

    def update(updates, state, params=None):
        d = _hyper(decay, state.count)
        t = state.count + 1

        def average(u, e):  # in the wider of the two dtypes (a bfloat16 (1 - d) u would lose the update)
            u, e = (x.to(torch.promote_types(u.dtype, e.dtype)) for x in (u, e))
            return _like(1 - d, u) * u + _like(d, e) * e

        new = T.tree_map(average, updates, state.ema)
        out = new
        if debias:
            bc = 1 - _power(d, t.to(torch.float64))
            out = T.tree_map(lambda e: e / _like(bc, e), new)
        return out, EmaState(t, T.tree_map(lambda e, old: e.to(old.dtype), new, state.ema))

    return Transform(init, update)


class EmaParamsState(NamedTuple):
    """``count``: updates done (0-d int64); ``ema``: the moving average of the params after each update
    (``accumulator_dtype`` when given, else the params' dtypes)."""

    count: torch.Tensor
    ema: PyTree


def ema_params(decay: float, accumulator_dtype: torch.dtype | None = None) -> Transform:
    r"""Keep an exponential moving average of the *params* in the state; pass the updates through unchanged.

    Polyak averaging (optax's ``incremental_update`` with ``step_size = 1 - decay``),
    of the params each update produces, :math:`p_t = p_{t-1} + u_t`:

    .. math::

        \bar p_0 = p_0, \qquad \bar p_t = \delta\, \bar p_{t-1} + (1-\delta)\, p_t

    so :math:`\bar p_t = \delta^t p_0 + (1-\delta)\sum_{i=1}^{t} \delta^{t-i} p_i`
    (starting from the initial params, as ``torch.optim.swa_utils.AveragedModel``
    with ``get_ema_multi_avg_fn`` does: no debiasing is needed). Put it **last**
    in a chain: it must see the final updates. ``update`` needs ``params``.
    Read the average with :func:`averaged_params`. The cost: one more copy of
    the params, one pass over them per update, and, through :func:`step`, the
    parts before it take their ``update`` path (a chain runs only its last
    part's fast ``apply``, so adamw's fused kernels are not used). ``accumulator_dtype`` keeps it
    in another dtype (e.g. float32 for bfloat16 params, where a decay of 0.999
    would otherwise round every small change away). This differs from
    :func:`ema`, optax's EMA of the *updates*.

    Example::

        opt = chain(clip_by_global_norm(1.0), adamw(1e-3), ema_params(0.999))
        state = opt.init(params)
        params, state = step(opt, grads, state, params)
        eval_params = averaged_params(state)
    """
    _check_number("ema_params", decay, "decay")
    _check_range("ema_params", decay, "decay", 0.0, 1.0)

    def init(params):
        return EmaParamsState(torch.zeros((), dtype=torch.int64),
                              T.tree_map(lambda p: p.to(accumulator_dtype or p.dtype, copy=True), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema_params: update needs the params it averages; call update(grads, state, params).")
        d = _hyper(decay, state.count)
        new_params = apply_updates(params, updates)  # exactly the params the caller gets
        avg = T.tree_map(lambda e, p: e.lerp(p.to(e.dtype), _like(1 - d, e)), state.ema, new_params)
        return updates, EmaParamsState(state.count + 1, avg)

    return Transform(init, update)


def averaged_params(opt_state: PyTree) -> PyTree:
    """The moving average of the params that the :func:`ema_params` inside ``opt_state`` keeps.

    Example::

        opt = chain(adamw(1e-3), ema_params(0.99))
        state = opt.init(params)
        params, state = step(opt, grads, state, params)
        averaged_params(state)      # 0.99 * initial params + 0.01 * new params
    """
    return _find_state(opt_state, EmaParamsState, "averaged_params",
                       "Build the optimizer with ema_params(decay) as the last part of its chain.").ema


# --------------------------------------------------------------------------- lookahead


class LookaheadState(NamedTuple):
    """``fast_state``: the fast optimizer's state; ``steps_since_sync``: fast steps since the last
    synchronisation (0-d int64, in ``[0, sync_period)``); ``slow``: the slow params, shaped like params
    (optax keeps them in ``LookaheadParams.slow``; here the params are the fast ones only)."""

    fast_state: PyTree
    steps_since_sync: torch.Tensor
    slow: PyTree


def lookahead(fast_optimizer: Transform, sync_period: int, slow_step_size: float,
              reset_state: bool = False) -> Transform:
    r"""Lookahead (Zhang et al. 2019, "k steps forward, 1 step back"), as optax's ``lookahead``.

    The ``params`` are the *fast* weights (take gradients there); the slow
    weights live in the state (``lookahead_slow_params(state)``: evaluate
    there). With :math:`u` the fast optimizer's update, :math:`k` =
    ``sync_period`` and :math:`\alpha` = ``slow_step_size``, every update is a
    fast step, and every :math:`k`-th also a synchronisation:

    .. math::

        d &= \phi + u - \theta, \qquad
        \theta \leftarrow \theta + \alpha\, d, \qquad
        \phi \leftarrow \theta \quad\text{(the update returned is } u - (1-\alpha)\, d)

    (:math:`\phi` fast, :math:`\theta` slow; between synchronisations the update
    is :math:`u` and :math:`\theta` stays). The same numbers as optax, whose
    params are ``LookaheadParams(fast, slow)``: our ``params`` are its
    ``params.fast``, our ``state.slow`` its ``params.slow``, our ``state.fast_state``
    and ``steps_since_sync`` its state's. As there, the updates must be applied
    unchanged (put lookahead last), else fast and slow weights drift apart.
    ``reset_state`` re-initialises the fast optimizer's state at each
    synchronisation. The paper's defaults are :math:`k = 5`, :math:`\alpha = 0.5`.

    Example::

        opt = lookahead(adamw(1e-3), sync_period=5, slow_step_size=0.5)
        state = opt.init(params)
        params, state = step(opt, grads, state, params)    # params: the fast weights
        eval_params = lookahead_slow_params(state)
    """
    _check_inner("lookahead", fast_optimizer)
    if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
        raise ValueError(f"lookahead: sync_period must be an int >= 1 (fast steps per synchronisation), got "
                         f"{sync_period!r}; the paper uses 5.")
    _check_number("lookahead", slow_step_size, "slow_step_size")
    if isinstance(slow_step_size, (int, float)) and not 0 <= slow_step_size <= 1:
        raise ValueError(f"lookahead: slow_step_size must lie in [0, 1], got {slow_step_size}; the paper uses 0.5.")

    def init(params):
        return LookaheadState(fast_optimizer.init(params), torch.zeros((), dtype=torch.int64),
                              T.tree_map(lambda p: p.clone(), params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("lookahead: update needs the fast params; call update(grads, state, params).")
        updates, fast_state = fast_optimizer.update(grads, state.fast_state, params)
        sync = state.steps_since_sync == sync_period - 1
        alpha = _hyper(slow_step_size, state.steps_since_sync)
        diff = T.tree_map(lambda f, u, s: f + u - s, params, updates, state.slow)
        slow = T.tree_map(lambda s, d: torch.where(sync, s + _like(alpha, d) * d, s), state.slow, diff)
        updates = T.tree_map(lambda u, d: torch.where(sync, u - _like(1 - alpha, d) * d, u), updates, diff)
        if reset_state:
            fast_state = T.select(sync, fast_optimizer.init(params), fast_state)
        return updates, LookaheadState(fast_state, (state.steps_since_sync + 1) % sync_period, slow)

    return Transform(init, update)


def lookahead_slow_params(opt_state: PyTree) -> PyTree:
    """The slow weights of the :func:`lookahead` inside ``opt_state`` (optax's ``params.slow``): the
    params to evaluate.

    Example::

        opt = lookahead(adamw(1e-3), sync_period=2, slow_step_size=0.5)
        state = opt.init(params)
        for _ in range(2):
            params, state = step(opt, grads, state, params)
        lookahead_slow_params(state)    # equal to params (to rounding) right after a synchronisation
    """
    return _find_state(opt_state, LookaheadState, "lookahead_slow_params",
                       "Build the optimizer with lookahead(fast_optimizer, sync_period, slow_step_size).").slow


# --------------------------------------------------------------------------- skipping bad updates


class ApplyIfFiniteState(NamedTuple):
    """The state of :func:`apply_if_finite` (optax's fields).

    ``notfinite_count``: consecutive updates with a non-finite gradient, reset
    by a finite one (0-d int64); ``last_finite``: whether the last gradient was
    finite (0-d bool); ``total_notfinite``: non-finite gradients since
    ``init``, never reset (0-d int64); ``inner_state``: the wrapped optimizer's
    state.
    """

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: PyTree


def _skipping(inner: Transform, state_cls: type, judge: Callable, init_extra: Callable) -> Transform:
    """A wrapper that runs ``inner`` only where ``judge(grads, state) -> (apply, counters)`` says so:
    otherwise zero updates and the inner state unchanged. Both outcomes are computed and one is selected
    (``torch.where``): no host sync, no Python branch on a value. Its fast ``apply`` hands the decision to
    :func:`step`'s ``skip``, so the inner fused kernels still run (and write nothing when skipped)."""
    def init(params):
        return state_cls(*init_extra(params), inner.init(params))

    def update(grads, state, params=None):
        ok, counters = judge(grads, state)
        updates, new_inner = inner.update(grads, state.inner_state, params)
        updates = T.tree_map(lambda u: torch.where(ok, u, u.new_zeros(())), updates)
        return updates, state_cls(*counters, T.select(ok, new_inner, state.inner_state))

    def apply(grads, state, params, *, donate=False, skip=None):
        ok, counters = judge(grads, state)
        inner_skip = ~ok if skip is None else ~ok | skip
        new_params, new_inner = step(inner, grads, state.inner_state, params, donate=donate, skip=inner_skip)
        if skip is not None:
            counters = T.select(skip, tuple(state[:-1]), tuple(counters))
        return new_params, state_cls(*counters, new_inner)

    return Transform(init, update, apply)


def apply_if_finite(inner: Transform, max_consecutive_errors: int) -> Transform:
    r"""Skip updates whose gradients hold an inf or a NaN, as optax's ``apply_if_finite``.

    With :math:`n` the count of consecutive non-finite gradients (reset to 0 by
    a finite one) and :math:`M` = ``max_consecutive_errors``: the inner update
    is applied when the gradients are finite or :math:`n > M` (it gives up:
    after :math:`M` skipped updates in a row, the :math:`(M+1)`-th goes through,
    NaN and all, so a run that diverges for good fails loudly instead of
    stalling silently). Otherwise the updates are zeros and the inner state
    stays exactly as it was. The counters live in :class:`ApplyIfFiniteState`.

    Both outcomes are computed and one selected with ``torch.where``: no host
    sync, vmappable, compilable. Through :func:`step` the inner fast ``apply``
    runs with the decision as its ``skip`` flag (the fused kernels write
    nothing when skipped). Compared with the loss scaler's skip
    (``minillm_func.amp``), this one lives in the optimizer state and needs no
    scaler.

    Example::

        opt = apply_if_finite(chain(clip_by_global_norm(1.0), adamw(1e-3)), max_consecutive_errors=5)
        state = opt.init(params)
        bad = {k: torch.full_like(g, float("nan")) for k, g in grads.items()}
        new, state = step(opt, bad, state, params)     # skipped: new == params
        int(state.notfinite_count), bool(state.last_finite)    # (1, False)
    """
    _check_inner("apply_if_finite", inner)
    if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int) \
            or max_consecutive_errors < 0:
        raise ValueError(f"apply_if_finite: max_consecutive_errors must be an int >= 0 (how many non-finite "
                         f"updates in a row to skip before giving up), got {max_consecutive_errors!r}.")

    def init_extra(params):
        zero = torch.zeros((), dtype=torch.int64)
        return zero, torch.ones((), dtype=torch.bool), zero.clone()

    def judge(grads, state):
        finite = T.all_finite(grads)
        count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        total = torch.where(finite, state.total_notfinite, state.total_notfinite + 1)
        return finite | (count > max_consecutive_errors), (count, finite, total)

    return _skipping(inner, ApplyIfFiniteState, judge, init_extra)


class SkipLargeUpdatesState(NamedTuple):
    """The state of :func:`skip_large_updates`.

    ``should_skip``: whether the last update was skipped (0-d bool);
    ``norm_squared``: the squared global norm of the last gradients (0-d, float64
    for float64 params, else float32; optax's ``skip_state``'s two entries);
    ``total_skipped``: updates skipped since ``init`` (0-d int64);
    ``inner_state``: the wrapped optimizer's state.
    """

    should_skip: torch.Tensor
    norm_squared: torch.Tensor
    total_skipped: torch.Tensor
    inner_state: PyTree


def skip_large_updates(inner: Transform, max_squared_norm=None, *, max_norm=None) -> Transform:
    r"""Skip updates whose incoming gradients are too large (or not finite).

    With :math:`g` the gradients this wrapper receives (before ``inner``):
    skip when :math:`\lnot(\|g\|^2 < \texttt{max\_squared\_norm})` -- or
    :math:`\lnot(\|g\| < \texttt{max\_norm})` -- which also skips a NaN or an
    inf. A skipped update returns zeros and leaves the inner state exactly as
    it was. The global norm is measured as :func:`clip_by_global_norm` does.

    This is optax's ``skip_large_updates`` predicate as a wrapper:
    ``skip_large_updates(inner, M)`` updates like
    ``optax.MultiSteps(inner, every_k_schedule=1,
    should_skip_update_fn=functools.partial(optax.skip_large_updates, max_squared_norm=M))``.
    Give exactly one of ``max_squared_norm`` (optax's argument) and ``max_norm``.
    Selection by ``torch.where`` (no host sync); through :func:`step` the
    decision reaches the inner fast ``apply`` as its ``skip`` flag.

    Example::

        opt = skip_large_updates(adamw(1e-3), max_norm=100.0)
        state = opt.init(params)
        huge = {k: g * 1e6 for k, g in grads.items()}
        new, state = step(opt, huge, state, params)    # skipped: new == params
        bool(state.should_skip), int(state.total_skipped)    # (True, 1)
    """
    _check_inner("skip_large_updates", inner)
    if (max_squared_norm is None) == (max_norm is None):
        raise ValueError("skip_large_updates: give exactly one bound, e.g. skip_large_updates(inner, "
                         "max_squared_norm=1e4) (optax's argument) or skip_large_updates(inner, max_norm=100.0).")
    name, bound = ("max_squared_norm", max_squared_norm) if max_norm is None else ("max_norm", max_norm)
    _check_number("skip_large_updates", bound, name)
    if isinstance(bound, (int, float)) and not bound > 0:
        raise ValueError(f"skip_large_updates: {name} must be positive, got {bound}.")

    def init_extra(params):
        return (torch.zeros((), dtype=torch.bool), torch.zeros((), dtype=_float_dtype(params)),
                torch.zeros((), dtype=torch.int64))

    def judge(grads, state):
        norm = T.global_norm(grads)
        norm_sq = norm * norm
        small = norm < _hyper(bound, None) if max_norm is not None else norm_sq < _hyper(bound, None)
        skipped = ~small
        counters = (skipped, norm_sq.to(state.norm_squared.dtype), state.total_skipped + skipped.to(torch.int64))
        return small, counters

    return _skipping(inner, SkipLargeUpdatesState, judge, init_extra)


# --------------------------------------------------------------------------- evaluation


def evaluation_params(opt_state: PyTree, params: PyTree) -> PyTree:
    """The params to evaluate, generate from and export: the ones the optimizer's state says are the model.

    For a schedule-free optimizer (:func:`schedule_free`, :func:`schedule_free_adamw`,
    alone or inside a chain) the training params are the iterate :math:`y` where
    gradients are taken, and the model is the average :math:`x`
    (:func:`schedule_free_eval_params`); for every other optimizer, ``params`` themselves.
    """
    return schedule_free_eval_params(opt_state, params) if _states_of(opt_state, ScheduleFreeState) else params
