"""The trainers: a stage loss, an optimizer chain and the pure steps built from them, plus the ``fit`` shell.

``create_trainer(kind, model, **overrides)`` builds one. A new training stage
is a new loss function ``(params, batch, extras) -> (summed_loss, (count,
metrics))`` (see :mod:`minillm_func.objectives`) handed to ``create_trainer(...,
loss_fn=...)``; nothing is subclassed.

Defaults reproduce the original imperative loop (:mod:`minillm_func.stages`):
AdamW(lr=1e-4, wd=0.01, betas=(0.9, 0.999), eps=1e-8), CosineAnnealingLR(T_max=1000)
stepped after each optimizer step, clip_grad_norm_(1.0); SFT uses lr=5e-5; DPO beta=0.1.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from . import amp, distributed, lora, optim, schedules
from . import tree as T
from .hooks import Checkpoint, Evaluate, Hook, MetricsLog, ProgressBar, Run
from .lora import LoraConfig
from .lora import apply as lora_apply
from .lora import objective as lora_objective
from .memory import DynamicBatchSizer, MemoryConfig, MemoryMonitor
from .losses import dpo_needs_reference, token_logps
from .model import Model
from .objectives import (dpo_objective, grpo_objective, kto_logps, kto_objective, make_head, orpo_objective, pair_logps,
                         pretrain_objective, sft_objective)
from .rl import make_sampler
from .stages import KINDS, default_learning_rate
from .step import TrainState, init_train_state, make_train_step, make_window_step

__all__ = ["Trainer", "create_trainer", "NonFiniteError"]


# --------------------------------------------------------------------------- the trainer


@dataclasses.dataclass
class Trainer:
    """A loss, an optimizer and the pure step built from them, plus the impure ``fit`` shell."""

    kind: str
    model: Model
    loss_fn: Callable
    optimizer: optim.Transform
    step: Callable[[TrainState, dict], tuple]
    lr_schedule: Callable
    config: dict
    loss_scaling: bool = False
    needs_reference: bool = False
    memory: MemoryConfig = MemoryConfig()
    window_step: Callable[[TrainState, Sequence[dict]], tuple] | None = None
    accumulation_steps: int = 1
    lora: LoraConfig | None = None
    # (state, batch, micro-batch index) -> the batch the step trains on: GRPO's sampling (impure,
    # in the shell; fit and evaluate call it on each batch they take). None: batches as they come.
    prepare: Callable[[TrainState, dict, int], dict] | None = None

    def __post_init__(self):
        self._sizer = DynamicBatchSizer(self.memory.min_micro_batch) if self.memory.dynamic_batch else None

    def run_window(self, state: TrainState, micro_batches: Sequence[dict]):
        """One update from ``micro_batches`` (``window_step``), split on out-of-memory with
        ``MemoryConfig(dynamic_batch=True)``: the same update either way."""
        if self._sizer is None:
            return self.window_step(state, micro_batches)
        return self._sizer(self.window_step, state, micro_batches)

    def run_step(self, state: TrainState, batch: dict):
        """``step``; a whole-window trainer (``accumulation_steps == 1``) goes through :meth:`run_window`,
        so ``MemoryConfig(dynamic_batch=True)`` splits the batch on out-of-memory."""
        return self.run_window(state, [batch]) if self.accumulation_steps == 1 else self.step(state, batch)

    def init(self, params: dict, *, seed: int = 0) -> TrainState:
        """A fresh ``TrainState``. For DPO the reference is a frozen copy of ``params``, held in ``extras``.

        With LoRA, ``params`` is the base: the state's params are fresh adapters (``lora.init(params,
        config, seed)``), the base is held, not copied, in ``extras["lora_base"]`` and is also DPO's
        reference; ``seed`` also seeds the adapters' dropout masks.
        """
        scaler = amp.scaler_init() if self.loss_scaling else None
        if self.lora is not None:
            extras = {"lora_base": dict(params), "lora_seed": torch.tensor(int(seed), dtype=torch.int64)}
            return init_train_state(lora.init(params, self.lora, seed), self.optimizer, scaler=scaler,
                                    extras=extras)
        extras = {"ref_params": T.tree_map(torch.clone, params)} if self.needs_reference else {}
        return init_train_state(params, self.optimizer, scaler=scaler, extras=extras)

    def saved_state(self, state: TrainState) -> TrainState:
        """What a checkpoint holds of ``state``: all of it, except a LoRA run's frozen base
        (its checkpoints keep the adapters; the base is read again from where it came from)."""
        if self.lora is None:
            return state
        return state._replace(extras={k: v for k, v in state.extras.items() if k != "lora_base"})

    def with_base(self, saved: TrainState, base: dict) -> TrainState:
        """The inverse of :meth:`saved_state`: a loaded LoRA state with its base ``base`` put back."""
        if self.lora is None:
            return saved
        return saved._replace(extras={**saved.extras, "lora_base": dict(base)})

    def evaluate(self, state: TrainState, batches: Iterable[dict]) -> dict[str, float]:
        """Token-weighted (pair-weighted for DPO) means of the loss and metrics over ``batches``.

        Pretraining and SFT also report ``perplexity = exp(loss)``.
        """
        totals: dict[str, float] = {}
        count_sum = 0.0
        params = optim.evaluation_params(state.opt_state, state.params)  # schedule-free: the average
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if self.prepare is not None:
                    batch = self.prepare(state, batch, i)
                loss_sum, (count, metrics) = self.loss_fn(params, batch, state.extras)
                n = float(count)
                count_sum += n
                totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * n
        if distributed.world_size() > 1:  # every rank evaluated its shard: add up the sums
            keys = sorted(totals)
            packed = distributed.all_reduce_sum(torch.tensor([count_sum] + [totals[k] for k in keys], dtype=torch.float64))
            count_sum, totals = float(packed[0]), {k: float(v) for k, v in zip(keys, packed[1:])}
        if not count_sum:
            raise ValueError("evaluate: the batches hold no counted token (or pair); nothing to evaluate.")
        out = {k: v / count_sum for k, v in totals.items()}
        if self.kind in ("pretrain", "sft"):
            out["perplexity"] = math.exp(min(out["loss"], 700.0))
        return out

    def fit(self, state: TrainState, batches: Iterable[dict], num_steps: int | None = None, *,
            eval_batches: Callable[[], Iterable[dict]] | None = None, eval_every: int = 0,
            eval_at_start: bool = True, out_dir=None, checkpoint_every: int = 0, keep_last: int | None = 3,
            log_every: int = 1, max_skipped: int = 100, progress: bool = True, desc: str | None = None,
            meta: dict | None = None, reraise_interrupt: bool = False, hooks: Sequence[Hook] = ()) -> TrainState:
        """Train until ``state.step == num_steps`` optimizer updates (``None``: until ``batches`` runs out,
        e.g. one pass over a list of batches); the impure shell around the pure step.

        Each update takes ``accumulation_steps`` micro-batches from ``batches`` and
        runs :attr:`window_step` once (one optimizer update per window). Around it
        run the hooks (:mod:`minillm_func.hooks`), each at its own cadence: a
        metrics log (``out_dir/metrics.jsonl``, and TensorBoard when it is
        installed) every ``log_every`` updates; an evaluation on ``eval_batches()``
        (a function returning fresh batches) every ``eval_every`` updates and before
        the first one when ``eval_at_start`` and the run starts at step 0;
        checkpoints to ``out_dir/checkpoints/step-NNNNNN/`` every
        ``checkpoint_every`` updates and at the end, keeping the newest ``keep_last``
        (``checkpoint.resolve(out_dir)`` finds the newest complete one); a tqdm bar;
        then ``hooks``. Only rank 0 of a data-parallel group logs, draws and writes.

        Host syncs: one per update (the ``updated`` flag, so that updates are counted
        exactly); the metrics themselves reach the host only on logging steps.

        Exact resume: a checkpoint holds the state after a whole update and, when
        ``batches`` has a ``position`` (``Batches``), the position of the first batch
        that state has not seen -- also when Ctrl-C or an error arrives in the middle
        of a window (its micro-batches are replayed on resume). On resume
        ``metrics.jsonl`` is cut back to the state's step, so no step is logged twice.

        Ctrl-C stops cleanly: the last state is checkpointed (a second Ctrl-C during
        that save is held until it is written) and returned -- or, with
        ``reraise_interrupt``, the ``KeyboardInterrupt`` is raised again once the
        checkpoint is written (so that a script or a shell pipeline stops too).
        A window whose gradient is not finite is skipped whole (as GradScaler skips
        an accumulated step); after ``max_skipped`` consecutive skipped windows
        ``fit`` raises :class:`NonFiniteError`. Params that are not finite are never
        written to a checkpoint. ``meta`` adds JSON-serialisable entries (e.g. the
        tokenizer) to every checkpoint.

        Logged per update: ``loss`` (the window's token-weighted mean), ``tokens``
        and ``tokens_per_s`` (input tokens this process ran since the previous
        record), for pretraining and SFT ``loss_tokens`` (the update's counted
        targets over all micro-batches and processes: the loss's normaliser), for
        DPO ``pairs`` and ``pairs_per_s``, plus ``grad_norm``, ``lr``, ``scale`` and
        the loss's own metrics; and ``epoch`` (epochs done, fractional) when ``batches``
        has a ``position`` and a length per epoch (``Batches``). The progress bar counts
        updates out of ``num_steps``, or out of what the data holds when ``num_steps`` is
        ``None`` and ``batches`` has a length (without one, it counts without a total).
        """
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 0):
            raise ValueError(f"fit: num_steps must be a non-negative int or None, got {num_steps!r}.")
        if not isinstance(max_skipped, int) or max_skipped < 1:
            raise ValueError(f"fit: max_skipped must be a positive int, got {max_skipped!r}.")
        main = distributed.is_main()
        out = Path(out_dir) if out_dir is not None and main else None
        run = Run(self, state, int(state.step), _position(batches), out,  # int(): one host sync, at the start
                  say=print if main else (lambda _: None))
        log = MetricsLog(out, every=log_every or 0)
        shell: list[Hook] = []
        if self.memory.monitor:  # before the log, which writes its readings
            shell.append(_Monitor(self.memory, next(iter(T.leaves(state.params))).device))
        if log_every:
            shell.append(log)
        if eval_every and eval_batches is not None:
            shell.append(Evaluate(eval_batches, eval_every, log, at_start=eval_at_start))
        shell.append(Checkpoint(out, checkpoint_every, keep_last=keep_last, meta=meta))
        shell.append(ProgressBar(num_steps if num_steps is not None else _updates_in(batches, run.step,
                                                                                self.accumulation_steps),
                                 enabled=progress and main, desc=desc or self.kind))
        all_hooks = [*shell, *hooks]
        count_name = {"dpo": "pairs", "orpo": "pairs", "kto": "examples", "grpo": "loss_items"}.get(self.kind,
                                                                                                 "loss_tokens")
        batch_iter = iter(batches)
        skipped, last_loss = 0, None
        try:
            for hook in all_hooks:
                hook.on_start(run)
            while num_steps is None or run.step < num_steps:
                window = list(_take(batch_iter, self.accumulation_steps))
                if len(window) < self.accumulation_steps:
                    if num_steps is not None:
                        run.say(f"{self.kind}: the data ran out after {run.step} of {num_steps} updates.")
                    elif window:
                        run.say(f"{self.kind}: {len(window)} batch(es) left at the end, fewer than the "
                                f"{self.accumulation_steps} of an update; not used.")
                    break
                if self.prepare is not None:  # e.g. GRPO: sample completions with the current policy
                    window = [self.prepare(run.state, b, i) for i, b in enumerate(window)]
                new_state, metrics = self.run_window(run.state, window)
                if not bool(metrics["updated"]):  # host sync: the loop counts updates exactly
                    skipped += 1
                    run.state, run.position = new_state, _position(batches)  # the skip is the window's outcome
                    if skipped >= max_skipped:
                        raise NonFiniteError(_diverged_message(self.kind, skipped, last_loss, run.step, self.config))
                    run.say(f"{self.kind}: non-finite gradient in the window after update {run.step}; skipped "
                            f"(scale now {float(metrics['scale']):g}).")
                    continue
                skipped, last_loss = 0, (metrics["loss"], run.step + 1)
                metrics = {(count_name if k == "tokens" else k): v for k, v in metrics.items()}
                metrics.pop("updated"), metrics.pop("skipped")
                epoch = _epochs_done(batches)
                if epoch is not None:
                    metrics["epoch"] = epoch
                run.advance(new_state, metrics, _position(batches), sum(_input_tokens(b) for b in window))
                for hook in all_hooks:
                    if hook.every and run.step % hook.every == 0:
                        hook.on_update(run)
        except KeyboardInterrupt:
            run.say(f"{self.kind}: interrupted after update {run.step}; writing a final checkpoint.")
            run.interrupted = True
        finally:
            for hook in all_hooks:
                hook.on_end(run)
        if run.interrupted and reraise_interrupt:
            raise KeyboardInterrupt
        return run.state


def _take(iterator, n: int):
    """Up to ``n`` items of ``iterator``."""
    for _ in range(n):
        try:
            yield next(iterator)
        except StopIteration:
            return


class _Monitor(Hook):
    """Memory readings in the record every ``monitor_every`` updates (``MemoryConfig(monitor=True)``)."""

    def __init__(self, memory: MemoryConfig, device):
        self.every, self.memory = memory.monitor_every, memory
        self.monitor = MemoryMonitor(device, empty_cache_every=memory.empty_cache_every)

    def on_update(self, run: Run) -> None:
        run.record().update(self.monitor.read())
        self.monitor.maybe_empty_cache(run.step)


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive updates had non-finite gradients."""


def _diverged_message(kind: str, skipped: int, last_loss, done: int, config: dict) -> str:
    last = (f"the last finite loss was {float(last_loss[0]):.4g} at update {last_loss[1]}" if last_loss
            else "no update was applied")
    return (f"{kind}: {skipped} consecutive windows had non-finite gradients after update {done} ({last}); "
            f"stopped, and nothing non-finite was saved. Likely causes: a learning rate too high "
            f"(it is {config.get('learning_rate')}), or float16 overflow (precision {config.get('precision')}): "
            "lower the learning rate, or train in bf16/fp32.")


def _per_epoch(batches) -> int | None:
    """Batches per epoch (``len(batches)``), or None for an iterable that does not say."""
    try:
        return len(batches)
    except TypeError:
        return None


def _epochs_done(batches) -> float | None:
    """Epochs ``batches`` has yielded, fractional (``Batches``: from its position and batches per epoch)."""
    position, per_epoch = _position(batches), _per_epoch(batches)
    if position is None or len(position) != 2 or not per_epoch:
        return None
    return position[0] + position[1] / per_epoch


def _updates_in(batches, done: int, k: int) -> int | None:
    """The update count at which ``batches`` runs out, when it says how long it is; else None."""
    per_epoch, epochs, position = _per_epoch(batches), getattr(batches, "epochs", 1), _position(batches)
    if per_epoch is None or epochs is None:  # it does not say, or it is endless
        return None
    left = epochs * per_epoch - (position[0] * per_epoch + position[1] if position and len(position) == 2 else 0)
    return done + max(0, left) // k


def _position(batches):
    """The position of the next batch ``batches`` will yield (``Batches.position``), or None."""
    position = getattr(batches, "position", None)
    return tuple(position) if position is not None else None


def _input_tokens(batch: dict) -> float:
    """Tokens the forward pass processes (padding excluded when the batch has an attention mask)."""
    total = 0.0
    for key, value in batch.items():
        if key.endswith("input_ids"):
            mask = batch.get(key[: -len("input_ids")] + "attention_mask")
            total += float(mask.sum()) if mask is not None else float(value.numel())
    return total


# --------------------------------------------------------------------------- the factory


def create_trainer(kind: str, model: Model, *, learning_rate: float | None = None, weight_decay: float = 0.01,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_grad_norm: float | None = 1.0,
                   T_max: int = 1000, eta_min: float = 0.0, schedule: Callable | None = None,
                   decay_mask=None, accumulation_steps: int = 1, precision: str | amp.Policy | None = None,
                   loss_scaling: bool | None = None, beta: float | None = None,
                   loss_type: str | Sequence[str] | None = None,
                   label_smoothing: float = 0.0, gamma: float = 0.5, loss_weights: Sequence[float] | None = None,
                   f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                   discopop_tau: float = 0.05, precomputed_reference: bool = False,
                   grad_path: str = "auto", adamw_impl: str = "auto", compile: bool | str | Callable = False,
                   loss_fn: Callable | None = None, grad_sync: Callable | None = None,
                   memory: MemoryConfig | None = None, lora: LoraConfig | None = None,
                   optimizer: optim.Transform | Callable | None = None,
                   tokenizer=None, reward_fns: Sequence[Callable] | None = None, reward_weights=None,
                   num_generations: int = 8, max_completion_length: int = 32, temperature: float = 1.0,
                   top_p: float | None = None, top_k: int | None = None, scale_rewards: str = "group",
                   epsilon: float = 0.2, epsilon_high: float | None = None,
                   importance_sampling_level: str = "token", sampling_seed: int = 0,
                   desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Trainer:
    """Build the trainer for ``kind`` ("pretrain", "sft", "dpo", "orpo", "kto" or "grpo").

    Every keyword overrides one default: the optimizer (``learning_rate``
    (default 1e-4; 5e-5 for "sft"), ``weight_decay``, ``betas``, ``eps``,
    ``decay_mask``), clipping (``max_grad_norm``, None for none), the schedule
    (``CosineAnnealingLR(T_max, eta_min)`` semantics, or any ``schedule(step)``,
    e.g. ``schedules.warmup_cosine``), ``accumulation_steps``, ``precision``
    ("fp32", "bf16", "fp16" or an ``amp.Policy``; "fp16" turns loss scaling
    on), DPO's ``beta``, ``loss_type``, ``label_smoothing``, ``gamma`` and
    ``precomputed_reference`` (batches carry reference log-probs, so the state
    holds no reference params), and ``compile`` (wrap the pure step in
    ``torch.compile``). ``loss_fn`` replaces the stage's loss: that is how a new
    stage is added. ``grad_sync`` is handed to ``make_train_step`` as ``sync``
    (the data-parallel all-reduce). ``memory`` (a :class:`MemoryConfig`) switches on
    memory strategies; where it sets mixed precision or accumulation, it takes
    precedence over ``precision`` and ``accumulation_steps``. ``lora`` (a
    :class:`~minillm_func.lora.LoraConfig`) trains low-rank adapters over a frozen base:
    ``trainer.init(base_params)`` makes a state whose params are the adapters; a
    ``loss_fn`` given with it is written over the full params (base and adapters in one dict).

    ``optimizer`` replaces AdamW (clipping by ``max_grad_norm`` still runs first): a
    function ``schedule -> Transform``, called with the trainer's learning-rate schedule
    (``learning_rate``, ``T_max``/``schedule`` as above), e.g.
    ``optimizer=lambda lr: optim.muon_with_adamw(lr, adam_learning_rate=3e-3)``; or a
    ready ``Transform``, used as it is -- the metrics' ``lr`` is then ``schedule(step)``
    when a ``schedule`` is given, else ``learning_rate`` when given, else NaN (the
    trainer cannot see inside it). A schedule-free optimizer is evaluated at its average:
    :meth:`Trainer.evaluate` uses :func:`~minillm_func.optim.evaluation_params`.

    "grpo" (online RL, :mod:`minillm_func.rl`): batches are prompt batches of a
    ``PromptDataset``; for each, the trainer's ``prepare`` samples ``num_generations``
    completions per prompt with the current policy (``max_completion_length``,
    ``temperature``, ``top_p``, ``top_k``; decoded with ``tokenizer``), scores them with
    ``reward_fns`` (weighted by ``reward_weights``), and the step minimises
    ``grpo_loss`` (``loss_type`` default "dapo", ``epsilon``, ``epsilon_high``, ``beta``
    default 0.0: a KL term to the frozen initial params when positive,
    ``importance_sampling_level``) with group-normalised advantages (``scale_rewards``).
    ``beta`` and ``loss_type`` default per stage: DPO 0.1 and "sigmoid".

    "orpo" (``orpo_loss``, reference-free; ``beta`` weighs the odds-ratio term) trains on
    DPO's pairs; "kto" (``kto_loss``, ``desirable_weight``, ``undesirable_weight``) on the
    items of an ``UnpairedPreferenceDataset``, against a frozen reference like DPO's.
    """
    if kind not in KINDS:
        raise ValueError(f"create_trainer: kind must be one of {KINDS}, got {kind!r}.")
    memory = memory or MemoryConfig()
    if memory.enable_amp:
        precision = memory.amp_dtype
    if memory.gradient_accumulation_steps > 1:
        accumulation_steps = memory.gradient_accumulation_steps
    lr = default_learning_rate(kind) if learning_rate is None else learning_rate
    if beta is None:
        beta = 0.0 if kind == "grpo" else 0.1
    if loss_type is None:
        loss_type = "dapo" if kind == "grpo" else "sigmoid"
    lr_schedule = schedule if schedule is not None else schedules.cosine_annealing(lr, T_max=T_max, eta_min=eta_min)
    policy = _policy(precision)
    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"create_trainer: lora must be a minillm_func.lora.LoraConfig, got {type(lora).__name__}.")
    adapted = lora_apply(model, lora) if lora is not None else model
    head = make_head(adapted, policy, memory)
    if memory.activation_checkpointing:
        if compile or grad_path == "func":
            raise ValueError(
                "create_trainer: activation_checkpointing needs the autograd gradient path "
                "(torch.utils.checkpoint does not run under torch.func.grad, which compile and "
                "grad_path='func' use); drop one of them.")
        grad_path = "autograd"
    dpo_options = dict(loss_weights=loss_weights, f_divergence_type=f_divergence_type,
                       f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau)
    if loss_fn is None:
        if kind == "pretrain":
            loss_fn = pretrain_objective(head)
        elif kind == "sft":
            loss_fn = sft_objective(head)
        elif kind == "orpo":
            loss_fn = orpo_objective(head, beta=beta)
        elif kind == "kto":
            loss_fn = kto_objective(head, beta=beta, desirable_weight=desirable_weight,
                                    undesirable_weight=undesirable_weight)
        elif kind == "grpo":
            loss_fn = grpo_objective(_logits_fn(adapted, policy), loss_type=loss_type, epsilon=epsilon,
                                     epsilon_high=epsilon_high, beta=beta,
                                     importance_sampling_level=importance_sampling_level,
                                     max_completion_length=max_completion_length, temperature=temperature)
        else:
            loss_fn = dpo_objective(head, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                    gamma=gamma, **dpo_options)
    needs_reference = ((kind == "dpo" and dpo_needs_reference(loss_type) and not precomputed_reference)
                       or (kind == "grpo" and beta > 0) or kind == "kto")
    if lora is not None and kind == "grpo":
        # GRPO's KL reference is the base, adapters off.
        base_logits = _logits_fn(model, policy)
        reference = (lambda base, batch: {"ref_logps": token_logps(base_logits(base, batch["input_ids"]) / temperature,
                                                                   batch["labels"])}) if needs_reference else None
        loss_fn = lora_objective(loss_fn, lora, reference=reference, reference_keys=("ref_logps",))
        needs_reference = False
    elif lora is not None and kind == "kto":
        kto_ref_head = make_head(model, policy, memory)
        reference = lambda base, batch: dict(zip(("ref_logps", "ref_kl_logps"),  # noqa: E731
                                                 kto_logps(kto_ref_head, base, batch)))
        loss_fn = lora_objective(loss_fn, lora, reference=reference, reference_keys=("ref_logps", "ref_kl_logps"))
        needs_reference = False
    elif lora is not None:
        # DPO's reference is the base itself, adapters off: no second copy of the model. Its
        # log-probs need no gradient, so they are taken chunk by chunk from the hidden states:
        # the reference pass never holds a [tokens, vocab] logits tensor.
        ref_head = make_head(model, policy, dataclasses.replace(memory, chunked_loss=True,
                                                                activation_checkpointing=False))
        reference = (lambda base, batch: dict(zip(("ref_chosen_logps", "ref_rejected_logps"),
                                                  pair_logps(ref_head, base, batch)[:2]))) if needs_reference else None
        loss_fn = lora_objective(loss_fn, lora, reference=reference)
        needs_reference = False
    if optimizer is None:
        update_rule = optim.adamw(lr_schedule, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay,
                                  mask=decay_mask, impl=adamw_impl)
    elif isinstance(optimizer, optim.Transform):
        update_rule = optimizer
        if schedule is None:  # what the metrics report: the trainer cannot read a rate out of a Transform
            lr_schedule = schedules.constant(learning_rate) if learning_rate is not None else None
    elif callable(optimizer):
        update_rule = optimizer(lr_schedule)
        if not isinstance(update_rule, optim.Transform):
            raise TypeError(f"create_trainer: optimizer(schedule) returned a {type(update_rule).__name__}, not a "
                            "Transform; e.g. optimizer=lambda lr: optim.muon_with_adamw(lr).")
    else:
        raise TypeError(f"create_trainer: optimizer must be a Transform or a function schedule -> Transform, got "
                        f"{type(optimizer).__name__}.")
    optimizer = (optim.chain(optim.clip_by_global_norm(max_grad_norm), update_rule) if max_grad_norm
                 else optim.chain(update_rule))
    scaling = (policy.compute_dtype == torch.float16) if loss_scaling is None else loss_scaling
    step = make_train_step(loss_fn, optimizer, accumulation_steps=accumulation_steps, loss_scaling=scaling,
                           lr_schedule=lr_schedule, grad_path=grad_path, sync=grad_sync)
    window_step = make_window_step(loss_fn, optimizer, loss_scaling=scaling, lr_schedule=lr_schedule,
                                   grad_path=grad_path, sync=grad_sync)
    if compile:
        # compile=True uses Inductor; a string or callable names another torch.compile
        # backend (tests count recompilations with a cheap one). Learning rate and
        # counters are 0-d tensors in the state, so they never trigger a recompile.
        backend = "inductor" if compile is True else compile
        step, window_step = torch.compile(step, backend=backend), torch.compile(window_step, backend=backend)
    config = {"kind": kind, "learning_rate": lr, "weight_decay": weight_decay, "betas": list(betas), "eps": eps,
              "max_grad_norm": max_grad_norm, "T_max": T_max, "eta_min": eta_min,
              "custom_schedule": schedule is not None, "accumulation_steps": accumulation_steps,
              "precision": str(policy.compute_dtype), "loss_scaling": scaling, "compile": compile}
    prepare = None
    if kind == "grpo":
        if tokenizer is None:
            raise ValueError("create_trainer('grpo'): pass tokenizer= (completions are decoded for the rewards).")
        sampler = make_sampler(adapted, tokenizer, reward_fns or (), num_generations=num_generations,
                               max_completion_length=max_completion_length, temperature=temperature, top_p=top_p,
                               top_k=top_k, scale_rewards=scale_rewards, reward_weights=reward_weights,
                               seed=sampling_seed)
        prepare = _grpo_prepare(sampler, lora)
        config.update(beta=beta, loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high,
                      importance_sampling_level=importance_sampling_level, num_generations=num_generations,
                      max_completion_length=max_completion_length, temperature=temperature, top_p=top_p,
                      top_k=top_k, scale_rewards=scale_rewards, sampling_seed=sampling_seed,
                      rewards=[getattr(f, "__name__", "reward") for f in reward_fns or ()],
                      reward_weights=list(reward_weights) if reward_weights is not None else None)
    if kind == "orpo":
        config.update(beta=beta)
    if kind == "kto":
        config.update(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    if kind == "dpo":
        config.update(beta=beta, loss_type=loss_type if isinstance(loss_type, str) else list(loss_type),
                      label_smoothing=label_smoothing, gamma=gamma, precomputed_reference=precomputed_reference,
                      **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dpo_options.items()})
    if lora is not None:
        config["lora"] = dataclasses.asdict(lora)
    config["memory"] = dataclasses.asdict(memory)
    return Trainer(kind, model, loss_fn, optimizer, step, lr_schedule, config, scaling, needs_reference, memory,
                   window_step, accumulation_steps, lora, prepare)


def _logits_fn(model: Model, policy: amp.Policy) -> Callable:
    """``(params, ids) -> logits`` under the precision policy."""
    return policy.wrap(model.apply) if policy.mixed else model.apply


def _grpo_prepare(sampler: Callable, lora_config: LoraConfig | None) -> Callable:
    """GRPO's shell step: sample with the state's current policy. The sampling seed is a function of
    the update count and the micro-batch's index (one host read of ``state.step``), so a resumed run
    samples what the uninterrupted one did."""
    def prepare(state: TrainState, batch: dict, micro: int) -> dict:
        params = state.params
        if lora_config is not None:
            params = lora.combine(state.extras["lora_base"], state.params, lora_config)
        return sampler(params, batch, int(state.step) * 4096 + micro)

    return prepare


def _policy(precision) -> amp.Policy:
    if isinstance(precision, amp.Policy):
        return precision
    table = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"create_trainer: precision must be 'fp32', 'bf16', 'fp16' or an amp.Policy, got {precision!r}.")
    return amp.Policy(compute_dtype=table[precision])
