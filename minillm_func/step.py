"""The pure train step: ``step(state, batch) -> (new_state, metrics)``.

One call processes one micro-batch:

    forward -> summed loss and its count -> gradient -> unscale + finite check
            -> accumulate -> (every k micro-steps) clip -> AdamW -> schedule -> apply

Every branch is a ``torch.where`` on a 0-d flag (``tree.select``), never a
Python ``if`` on a tensor: the step compiles once, vmaps, and a step with a
non-finite gradient returns params, optimizer state, counters and accumulator
bit-identical to what came in (only the loss scaler backs off).

The loss function returns the *summed* loss of the micro-batch and its count
(tokens, or pairs for DPO); the step divides by the window's total count, so k
micro-batches of any lengths make exactly the update of one batch holding them
all (see ``accumulate.py``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch

from . import amp
from . import tree as T
from .accumulate import AccumState, accum_add, accum_init, accum_ready, accum_reset, accum_result
from .optim import Transform, clipped_norm
from .optim import step as optim_step

__all__ = ["TrainState", "make_train_step", "make_window_step", "init_train_state", "value_and_grad"]

# loss_fn(params, batch, extras) -> (summed loss, (count, metrics dict))
LossFn = Callable[[dict, dict, dict], tuple]


class TrainState(NamedTuple):
    """Everything a run carries from step to step; all leaves are tensors.

    ``step``: optimizer updates done (0-d int64). ``params``: the trained
    weights. ``opt_state``: the optimizer chain's state. ``scaler``: the
    loss-scaler state (scale 1 and never changing when loss scaling is off).
    ``accum``: the gradient-accumulation window. ``extras``: frozen values the
    loss reads but never trains, e.g. the DPO reference params.
    """

    step: torch.Tensor
    params: Any
    opt_state: Any
    scaler: amp.ScalerState
    accum: AccumState
    extras: dict


def init_train_state(params, optimizer: Transform, *, scaler: amp.ScalerState | None = None,
                     extras: dict | None = None) -> TrainState:
    """A fresh state; ``scaler=None`` means no loss scaling (a scale of 1 that never moves)."""
    if scaler is None:
        scaler = amp.scaler_init(init_scale=1.0)
    return TrainState(torch.zeros((), dtype=torch.int64), params, optimizer.init(params), scaler,
                      accum_init(params), extras or {})


def value_and_grad(loss_fn: LossFn, path: str = "auto") -> Callable:
    """``(params, *args) -> ((loss, aux), grads)`` through ``torch.autograd.grad`` or ``torch.func``.

    ``"autograd"`` differentiates the functional loss with plain autograd on
    fresh leaf views of the params (no copy; the caller's tensors are not
    touched). It is the faster path in eager mode on small models, where
    ``torch.func.grad`` pays a per-op overhead (see ``benchmarks/train_step.py``).
    ``"func"`` uses ``torch.func.grad_and_value``; it is required inside
    ``vmap`` and under ``torch.compile``. ``"auto"`` picks ``"func"`` there and
    ``"autograd"`` otherwise.
    """
    if path not in ("auto", "autograd", "func"):
        raise ValueError(f"value_and_grad: path must be 'auto', 'autograd' or 'func', got {path!r}.")
    func_grad = torch.func.grad_and_value(lambda p, *a: loss_fn(p, *a), has_aux=True)

    def autograd_grad(params, *args):
        leaves = [p.detach().requires_grad_(True) for p in T.leaves(params)]
        live = T.unflatten_like(params, leaves)
        with torch.enable_grad():
            loss, aux = loss_fn(live, *args)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
        return (loss.detach(), aux), T.unflatten_like(params, grads)

    def run(params, *args):
        chosen = path
        if chosen == "auto":
            chosen = "func" if T.under_transform(params) else "autograd"
        if chosen == "func":
            grads, (loss, aux) = func_grad(params, *args)
            return (loss, aux), grads
        return autograd_grad(params, *args)

    return run


class _Core(NamedTuple):
    """The two halves every step is made of (shared by the micro-step and the window step)."""

    grads: Callable  # (state, batch) -> (unnormalised grads, count, summed loss, metrics)
    apply: Callable  # (state, grads, count, loss_sum, metrics, *, accumulate) -> (new state, metrics)


def _core(loss_fn: LossFn, optimizer: Transform, *, accumulation_steps: int, loss_scaling: bool,
          lr_schedule: Callable | None, grad_path: str) -> _Core:
    k = accumulation_steps

    def scaled_loss(params, batch, extras, scale):
        loss, aux = loss_fn(params, batch, extras)
        return loss * scale if loss_scaling else loss, (loss.detach(), aux)

    grad_fn = value_and_grad(scaled_loss, grad_path)

    def grads(state: TrainState, batch: dict, micro):
        # The loss also sees extras["rng"] = (updates so far, micro-batch index in the window): a
        # counter from which a loss that needs randomness (LoRA dropout) derives it, purely.
        rng = torch.stack([state.step.reshape(()).to(torch.int64), torch.as_tensor(micro, dtype=torch.int64)])
        extras = {**state.extras, "rng": rng}
        (_, (loss_sum, (count, aux))), g = grad_fn(state.params, batch, extras, state.scaler.scale)
        return g, count, loss_sum, aux

    def apply(state: TrainState, grads, count, loss_sum, aux, *, accumulate: bool):
        """Unscale, check, (accumulate,) update: ``accumulate`` adds to the state's window and
        updates only when it is full; otherwise ``grads`` are a whole window's."""
        if loss_scaling:
            grads, found_inf = amp.unscale(state.scaler, grads)
        else:
            found_inf = ~T.all_finite(grads)
        if accumulate:
            accum = accum_add(state.accum, grads, count)
            ready = accum_ready(accum, k)
            window = accum_result(accum)
        else:  # a whole window at once: no accumulator traffic
            accum, ready = state.accum, torch.ones((), dtype=torch.bool)
            window = _divide(grads, count.clamp_min(1))
        update = ready & ~found_inf
        # A window that is not complete or not finite leaves params and optimizer state as they
        # were: the kernels read `skip` themselves (no extra pass over params and moments).
        params, opt_state = optim_step(optimizer, window, state.opt_state, state.params, skip=~update)
        if accumulate:
            accum = T.select(found_inf, state.accum, T.select(ready, accum_reset(accum), accum))
        scaler = amp.scaler_update(state.scaler, found_inf) if loss_scaling else state.scaler
        new_state = TrainState(state.step + update.long(), params, opt_state, scaler, accum, state.extras)
        metrics = {
            "loss": loss_sum / count.clamp_min(1),
            "tokens": count,
            "grad_norm": clipped_norm(opt_state),
            "lr": lr_schedule(state.step) if lr_schedule is not None else torch.tensor(float("nan")),
            "scale": scaler.scale,
            "skipped": found_inf,
            "updated": update,
            **aux,
        }
        return new_state, metrics

    return _Core(grads, apply)


def _check_k(accumulation_steps) -> None:
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"make_train_step: accumulation_steps must be a positive int, got {accumulation_steps!r}.")


def make_train_step(loss_fn: LossFn, optimizer: Transform, *, accumulation_steps: int = 1,
                    loss_scaling: bool = False, lr_schedule: Callable | None = None,
                    grad_path: str = "auto", sync: Callable | None = None) -> Callable[[TrainState, dict], tuple]:
    """Build the pure micro-step ``step(state, batch) -> (new_state, metrics)``.

    Args:
        loss_fn: ``(params, batch, extras) -> (summed_loss, (count, metrics))``;
            ``summed_loss`` is the sum over the micro-batch's counted tokens (or pairs)
            and ``count`` their number, a 0-d tensor. ``extras`` is ``state.extras``
            plus ``extras["rng"]``, int64 ``[2]``: the update count and the
            micro-batch's index in its window, for losses that draw random numbers
            (a pure counter: a resumed run draws the same ones).
        optimizer: a gradient transformation (usually ``chain(clip, adamw)``).
        accumulation_steps: micro-batches per optimizer update (k). With k > 1 each
            call adds one micro-batch to the accumulator in ``state.accum``; the
            update is kept on the k-th call by a select, not a branch, so the
            optimizer is *computed* on every call. When the k micro-batches are at
            hand, :func:`make_window_step` runs the optimizer once per window
            instead (``Trainer.fit`` does).
        loss_scaling: differentiate ``loss * scale`` and unscale, as GradScaler does
            (for float16 compute; bfloat16 does not need it).
        lr_schedule: ``step -> lr``, only to report the learning rate in the metrics.
        grad_path: see :func:`value_and_grad`.
        sync: ``(grads, count, loss_sum) -> (grads, count, loss_sum)``, applied to the
            micro-batch's *unnormalised* gradient before anything else; data
            parallelism sums all three over ranks here, so the normaliser is the
            global count and every rank takes the same update.

    Metrics (0-d tensors; reading them is the caller's host sync): ``loss`` (this
    micro-batch's mean), ``tokens`` (its count), ``grad_norm`` (pre-clip norm of
    the last update), ``lr``, ``scale``, ``skipped`` (non-finite gradient),
    ``updated`` (an optimizer update happened), plus the loss's own metrics.
    """
    _check_k(accumulation_steps)
    core = _core(loss_fn, optimizer, accumulation_steps=accumulation_steps, loss_scaling=loss_scaling,
                 lr_schedule=lr_schedule, grad_path=grad_path)

    def step(state: TrainState, batch: dict):
        micro = state.accum.micro_step if accumulation_steps > 1 else 0
        grads, count, loss_sum, aux = core.grads(state, batch, micro)
        if sync is not None:  # e.g. data parallel: sum grads, counts and losses over ranks
            grads, count, loss_sum = sync(grads, count, loss_sum)
        return core.apply(state, grads, count, loss_sum, aux, accumulate=accumulation_steps > 1)

    return step


def make_window_step(loss_fn: LossFn, optimizer: Transform, *, loss_scaling: bool = False,
                     lr_schedule: Callable | None = None, grad_path: str = "auto",
                     sync: Callable | None = None) -> Callable[[TrainState, Sequence[dict]], tuple]:
    """Build the pure window step ``step(state, micro_batches) -> (new_state, metrics)``: one update per window.

    The gradients of the micro-batches' *summed* losses are added up, with their
    counts; the sum is divided once by the window's total count, then clipped,
    and the optimizer and schedule run once -- exactly the update of one batch
    holding every micro-batch, whatever their lengths (levanter's accumulation).
    ``sync`` (data parallelism) runs once per window, on the sums. The loop over
    ``micro_batches`` is over a Python list, not over tensor values: it unrolls
    under ``torch.compile`` and runs unchanged under ``vmap``.

    A window whose summed gradient is not finite is skipped whole, as
    ``GradScaler`` skips an accumulated step: params, optimizer state, step and
    accumulator come back bit-identical, and only the loss scaler backs off.
    ``state.accum`` is neither read nor written (see :func:`make_train_step` for
    feeding micro-batches one call at a time).

    Metrics as :func:`make_train_step`'s, over the window: ``loss`` is its
    token-weighted mean, ``tokens`` its count, the loss's own metrics are
    count-weighted means over the micro-batches.
    """
    core = _core(loss_fn, optimizer, accumulation_steps=1, loss_scaling=loss_scaling, lr_schedule=lr_schedule,
                 grad_path=grad_path)

    def step(state: TrainState, micro_batches: Sequence[dict]):
        if not micro_batches:
            raise ValueError("window step: got no micro-batch; pass a list of at least one batch dict.")
        total = count = loss_sum = weighted = None
        for i, batch in enumerate(micro_batches):
            grads, n, ls, aux = core.grads(state, batch, i)
            if total is None:  # the first micro-batch's gradients are fresh tensors: ours to add into
                total, count, loss_sum, weighted = grads, n, ls, {k: v * n for k, v in aux.items()}
                continue
            total = _add_into(total, grads)
            count, loss_sum = count + n, loss_sum + ls
            weighted = {k: weighted[k] + v * n for k, v in aux.items()}
        if sync is not None:
            total, count, loss_sum = sync(total, count, loss_sum)
        aux = {k: v / count.clamp_min(1) for k, v in weighted.items()}
        return core.apply(state, total, count, loss_sum, aux, accumulate=False)

    return step


def _divide(grads, count: torch.Tensor):
    """``grads / count`` leaf by leaf (each in its own dtype); one multi-tensor kernel in eager mode."""
    leaves = T.leaves(grads)
    dtypes = {g.dtype for g in leaves}
    if len(dtypes) != 1 or T.under_transform(grads):
        return T.tree_map(lambda g: g / count.to(g.dtype), grads)
    return T.unflatten_like(grads, list(torch._foreach_div(leaves, count.to(dtypes.pop()))))


def _add_into(total, grads):
    """``total + grads``; in place on ``total`` (fresh gradient tensors the window step owns) in eager
    mode, which saves one gradient-sized allocation per micro-batch, out of place under transforms."""
    leaves, new = T.leaves(total), T.leaves(grads)
    if T.under_transform(total, grads):
        return T.add(total, grads)
    torch._foreach_add_(leaves, new)
    return total
