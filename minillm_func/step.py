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

from typing import Any, Callable, NamedTuple

import torch

from . import amp
from . import tree as T
from .accumulate import AccumState, accum_add, accum_init, accum_ready, accum_reset, accum_result
from .optim import ClipState, Transform
from .optim import step as optim_step

__all__ = ["TrainState", "make_train_step", "init_train_state", "value_and_grad"]

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
            wrapped = torch.compiler.is_compiling() or T._functorch_wrapped(T.leaves(params))
            chosen = "func" if wrapped else "autograd"
        if chosen == "func":
            grads, (loss, aux) = func_grad(params, *args)
            return (loss, aux), grads
        return autograd_grad(params, *args)

    return run


def make_train_step(loss_fn: LossFn, optimizer: Transform, *, accumulation_steps: int = 1,
                    loss_scaling: bool = False, lr_schedule: Callable | None = None,
                    grad_path: str = "auto", sync: Callable | None = None) -> Callable[[TrainState, dict], tuple]:
    """Build the pure ``step(state, batch) -> (new_state, metrics)``.

    Args:
        loss_fn: ``(params, batch, extras) -> (summed_loss, (count, metrics))``;
            ``summed_loss`` is the sum over the micro-batch's counted tokens (or pairs)
            and ``count`` their number, a 0-d tensor.
        optimizer: a gradient transformation (usually ``chain(clip, adamw)``).
        accumulation_steps: micro-batches per optimizer update (k). With k > 1 the
            optimizer update is computed at every micro-step and kept only on the
            k-th (a select, not a branch): its cost is small next to a forward and
            backward pass unless micro-batches hold only a handful of tokens.
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
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"make_train_step: accumulation_steps must be a positive int, got {accumulation_steps!r}.")
    k = accumulation_steps

    def scaled_loss(params, batch, extras, scale):
        loss, aux = loss_fn(params, batch, extras)
        return loss * scale if loss_scaling else loss, (loss.detach(), aux)

    grad_fn = value_and_grad(scaled_loss, grad_path)

    def micro_grads(state: TrainState, batch: dict):
        """The micro-batch's unnormalised (scaled) gradient, count, summed loss and metrics."""
        (_, (loss_sum, (count, aux))), grads = grad_fn(state.params, batch, state.extras, state.scaler.scale)
        if sync is not None:  # e.g. data parallel: sum grads, counts and losses over ranks
            grads, count, loss_sum = sync(grads, count, loss_sum)
        return grads, count, loss_sum, aux

    def apply_grads(state: TrainState, grads, count, loss_sum, aux):
        """Unscale, check, accumulate and (at the window's end) update: the rest of the step."""
        if loss_scaling:
            grads, found_inf = amp.unscale(state.scaler, grads)
        else:
            found_inf = ~T.all_finite(grads)
        if k == 1:  # a window of one micro-batch: no accumulator traffic
            accum, ready = state.accum, torch.ones((), dtype=torch.bool)
            window = T.tree_map(lambda g: g / count.clamp_min(1).to(g.dtype), grads)
        else:
            accum = accum_add(state.accum, grads, count)
            ready = accum_ready(accum, k)
            window = accum_result(accum)
        new_params, new_opt = optim_step(optimizer, window, state.opt_state, state.params)
        update = ready & ~found_inf
        params, opt_state = T.select(update, (new_params, new_opt), (state.params, state.opt_state))
        if k > 1:
            accum = T.select(found_inf, state.accum, T.select(ready, accum_reset(accum), accum))
        scaler = amp.scaler_update(state.scaler, found_inf) if loss_scaling else state.scaler
        new_state = TrainState(state.step + update.long(), params, opt_state, scaler, accum, state.extras)
        metrics = {
            "loss": loss_sum / count.clamp_min(1),
            "tokens": count,
            "grad_norm": _clip_norm(opt_state),
            "lr": lr_schedule(state.step) if lr_schedule is not None else torch.tensor(float("nan")),
            "scale": scaler.scale,
            "skipped": found_inf,
            "updated": update,
            **aux,
        }
        return new_state, metrics

    def step(state: TrainState, batch: dict):
        return apply_grads(state, *micro_grads(state, batch))

    # The two halves, for callers that split a batch themselves (memory.DynamicBatchSizer):
    # summing micro_grads over the pieces and applying once is the same update.
    step.micro_grads, step.apply_grads = micro_grads, apply_grads
    return step


def _clip_norm(opt_state) -> torch.Tensor:
    """The pre-clip gradient norm the chain recorded, or NaN when it has no clipping."""
    states = opt_state if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields") else (opt_state,)
    for s in states:
        if isinstance(s, ClipState):
            return s.norm
    return torch.tensor(float("nan"))
