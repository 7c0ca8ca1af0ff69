"""The three trainers, each a thin composition: a loss closure + an optimizer chain + ``make_train_step``.

``create_trainer(kind, model, **overrides)`` builds one. A new training stage
is a new loss function ``(params, batch, extras) -> (summed_loss, (count,
metrics))`` handed to :class:`Trainer`; nothing is subclassed.

Defaults reproduce the original imperative loop: AdamW(lr=1e-4, wd=0.01,
betas=(0.9, 0.999), eps=1e-8), CosineAnnealingLR(T_max=1000) stepped after
each optimizer step, clip_grad_norm_(1.0); SFT uses lr=5e-5; DPO beta=0.1.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
from tqdm.auto import tqdm

from . import amp, optim, schedules
from . import tree as T
from .chunked import chunked_cross_entropy, chunked_sequence_logps
from .losses import IGNORE_INDEX, dpo_loss, pretrain_loss, sequence_logps
from .model import Model, output_weight
from .memory import DynamicBatchSizer, MemoryConfig, MemoryMonitor
from .step import TrainState, init_train_state, make_train_step

__all__ = ["Trainer", "create_trainer", "pretrain_objective", "sft_objective", "dpo_objective",
           "add_reference_logps", "Head", "logits_head", "chunked_head", "KINDS"]

KINDS = ("pretrain", "sft", "dpo")
DEFAULT_LR = {"pretrain": 1e-4, "sft": 5e-5, "dpo": 1e-4}


# --------------------------------------------------------------------------- loss closures
# Each returns the micro-batch's *summed* loss and the count it sums over. The
# attention mask is not passed to the model: collation pads on the right, and
# under causal attention no real position can see a padded one, so the mask
# would only cost the fast attention kernel and change nothing that is counted.


class Head(NamedTuple):
    """How a stage turns ``(params, ids, labels)`` into token losses.

    ``ce`` -> the summed cross-entropy over counted labels; ``logps`` -> per-sequence
    ``(summed target log-probs, counts)``. :func:`logits_head` goes through the full
    logits; :func:`chunked_head` through the last hidden state, chunk by chunk.
    """

    ce: Callable
    logps: Callable


def logits_head(apply: Callable) -> Head:
    """Token losses from ``apply(params, ids) -> logits``."""
    return Head(ce=lambda p, ids, y: pretrain_loss(apply(p, ids), y, num_tokens=1),
                logps=lambda p, ids, y: sequence_logps(apply(p, ids), y))


def chunked_head(apply_hidden: Callable, *, chunk_size: int = 1024) -> Head:
    """Token losses from the last hidden state and the output projection, ``chunk_size`` tokens at a time:
    the ``[tokens, vocab]`` float32 logits are never held at once (``MemoryConfig(chunked_loss=True)``)."""
    return Head(
        # recompute=False: inside a train step the gradient is always wanted, so it is
        # built while each chunk's logits are at hand (3 matmuls, as unchunked) instead
        # of recomputing them in the backward (4); see benchmarks/RESULTS.md.
        ce=lambda p, ids, y: chunked_cross_entropy(apply_hidden(p, ids), output_weight(p), y, num_tokens=1,
                                                   chunk_size=chunk_size, recompute=False),
        logps=lambda p, ids, y: chunked_sequence_logps(apply_hidden(p, ids), output_weight(p), y,
                                                       chunk_size=chunk_size))


def _as_head(head_or_apply) -> Head:
    return head_or_apply if isinstance(head_or_apply, Head) else logits_head(head_or_apply)


def pretrain_objective(head: Head | Callable) -> Callable:
    """Next-token loss over every counted label (``head``: a :class:`Head`, or ``apply``)."""
    head = _as_head(head)

    def loss_fn(params, batch, extras):
        labels = batch["labels"]
        return head.ce(params, batch["input_ids"], labels), ((labels != IGNORE_INDEX).sum(), {})

    return loss_fn


def sft_objective(head: Head | Callable) -> Callable:
    """Loss on the reply tokens: ``loss_mask`` if the batch has one, else every counted label."""
    head = _as_head(head)

    def loss_fn(params, batch, extras):
        labels = batch["labels"]
        mask = batch.get("loss_mask")
        mask = (labels != IGNORE_INDEX) if mask is None else (mask.bool() & (labels != IGNORE_INDEX))
        masked = torch.where(mask, labels, torch.full_like(labels, IGNORE_INDEX))
        return head.ce(params, batch["input_ids"], masked), (mask.sum(), {})

    return loss_fn


def _pair_logps(head: Head | Callable, params, batch):
    """Summed log-probs and counts of chosen and rejected replies, in one ``[2B, T]`` forward."""
    B = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logps, counts = _as_head(head).logps(params, ids, labels)
    return logps[:B], logps[B:], counts[:B], counts[B:]


def dpo_objective(head: Head | Callable, *, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, gamma: float = 0.5) -> Callable:
    """``dpo_loss`` summed over pairs. Reference log-probs come from the batch
    (``ref_chosen_logps`` / ``ref_rejected_logps``, see :func:`add_reference_logps`)
    or from the frozen ``extras["ref_params"]``, never differentiated."""
    head = _as_head(head)
    dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=beta, loss_type=loss_type,
             label_smoothing=label_smoothing, gamma=gamma, chosen_counts=torch.ones(1),
             rejected_counts=torch.ones(1))  # validate the hyper-parameters now, not at the first step

    def loss_fn(params, batch, extras):
        pc, pr, nc, nr = _pair_logps(head, params, batch)
        if "ref_chosen_logps" in batch:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif loss_type == "simpo":
            rc = rr = None
        else:
            if "ref_params" not in extras:
                raise ValueError("dpo: no reference log-probs in the batch and no ref_params in the state; "
                                 "build the state with trainer.init(params), or add_reference_logps to the data.")
            with torch.no_grad():
                rc, rr, _, _ = _pair_logps(head, extras["ref_params"], batch)
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                 gamma=gamma, chosen_counts=nc, rejected_counts=nr, num_pairs=1)
        return loss, (torch.tensor(pc.shape[0]), metrics)

    return loss_fn


def add_reference_logps(model: Model, ref_params: dict, dataset, *, batch_size: int = 32):
    """The items of a preference dataset with ``ref_chosen_logps`` / ``ref_rejected_logps`` added.

    Computed once with the frozen reference params, so DPO training needs only
    the policy in memory (``create_trainer("dpo", ..., precomputed_reference=True)``).
    The result is a copy of ``dataset`` holding the extended items; batch it with ``Batches``.
    """
    from .data import collate

    pad_id = dataset.tokenizer.pad_id
    out = []
    with torch.no_grad():
        for s in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
            rc, rr, _, _ = _pair_logps(model.apply, ref_params, collate(items, pad_id=pad_id))
            out += [{**it, "ref_chosen_logps": c, "ref_rejected_logps": r} for it, c, r in zip(items, rc, rr)]
    with_ref = copy.copy(dataset)  # same tokenizer, drop counts and lengths; new items
    with_ref.items = out
    return with_ref


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

    def __post_init__(self):
        self._sizer = DynamicBatchSizer(self.memory.min_micro_batch) if self.memory.dynamic_batch else None

    def run_step(self, state: TrainState, batch: dict):
        """``step``, or, with ``MemoryConfig(dynamic_batch=True)``, the step split on out-of-memory."""
        return self.step(state, batch) if self._sizer is None else self._sizer(self.step, state, batch)

    def init(self, params: dict) -> TrainState:
        """A fresh ``TrainState``. For DPO the reference is a frozen copy of ``params``, held in ``extras``."""
        extras = {"ref_params": T.tree_map(torch.clone, params)} if self.needs_reference else {}
        scaler = amp.scaler_init() if self.loss_scaling else None
        return init_train_state(params, self.optimizer, scaler=scaler, extras=extras)

    def evaluate(self, state: TrainState, batches: Iterable[dict]) -> dict[str, float]:
        """Token-weighted (pair-weighted for DPO) means of the loss and metrics over ``batches``.

        Pretraining and SFT also report ``perplexity = exp(loss)``.
        """
        totals: dict[str, float] = {}
        count_sum = 0.0
        with torch.no_grad():
            for batch in batches:
                loss_sum, (count, metrics) = self.loss_fn(state.params, batch, state.extras)
                n = float(count)
                count_sum += n
                totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * n
        if _distributed():  # every rank evaluated its shard: add up the sums
            keys = sorted(totals)
            packed = torch.tensor([count_sum] + [totals[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(packed)
            count_sum, totals = float(packed[0]), {k: float(v) for k, v in zip(keys, packed[1:])}
        if not count_sum:
            raise ValueError("evaluate: the batches hold no counted token (or pair); nothing to evaluate.")
        out = {k: v / count_sum for k, v in totals.items()}
        if self.kind != "dpo":
            out["perplexity"] = math.exp(min(out["loss"], 700.0))
        return out

    def fit(self, state: TrainState, batches: Iterable[dict], num_steps: int, *,
            eval_batches: Callable[[], Iterable[dict]] | None = None, eval_every: int = 0,
            out_dir=None, checkpoint_every: int = 0, log_every: int = 1, progress: bool = True,
            desc: str | None = None, meta: dict | None = None) -> TrainState:
        """Train until ``state.step == num_steps`` optimizer updates; the impure shell around ``step``.

        Draws a tqdm bar (loss, lr, tokens/s), evaluates every ``eval_every``
        updates on ``eval_batches()`` (a function returning fresh batches),
        appends metrics to ``out_dir/metrics.jsonl`` (and TensorBoard when it is
        installed), writes checkpoints to ``out_dir/checkpoint`` every
        ``checkpoint_every`` updates and at the end. Ctrl-C stops cleanly: the
        last state is checkpointed and returned. If ``batches`` has a
        ``position`` (``Batches``), it is saved so a resumed run sees the same data;
        ``meta`` adds JSON-serialisable entries (e.g. the tokenizer) to every checkpoint.
        """
        from . import checkpoint

        main = not _distributed() or torch.distributed.get_rank() == 0  # only rank 0 logs, draws and saves
        out = Path(out_dir) if out_dir is not None and main else None
        progress = progress and main
        log = _MetricsLog(out)
        done = int(state.step)  # host sync, once: the shell counts updates in Python from here on
        bar = tqdm(total=num_steps, initial=done, disable=not progress, desc=desc or self.kind, dynamic_ncols=True)
        say = bar.write if main else (lambda _: None)
        device = next(iter(T.leaves(state.params))).device
        monitor = MemoryMonitor(device, empty_cache_every=self.memory.empty_cache_every) if self.memory.monitor else None
        batch_iter = iter(batches)
        tokens, t0 = 0.0, time.perf_counter()

        def save():
            if out is not None:
                record = {"kind": self.kind, "step": done, "model_config": dataclasses.asdict(self.model.config),
                          "trainer_config": self.config, "data_position": list(getattr(batches, "position", [])),
                          **(meta or {})}
                checkpoint.save(out / "checkpoint", state, meta=record)

        try:
            while done < num_steps:
                try:
                    batch = next(batch_iter)
                except StopIteration:
                    say(f"{self.kind}: the data ran out after {done} of {num_steps} updates.")
                    break
                state, metrics = self.run_step(state, batch)
                record = {k: float(v) for k, v in metrics.items()}  # host sync: the shell logs every micro-step
                tokens += record["tokens"]
                if not record["updated"]:
                    if record["skipped"]:
                        say(f"{self.kind}: non-finite gradient at update {done}; step skipped "
                                  f"(scale now {record['scale']:g}).")
                    continue
                done += 1
                elapsed = time.perf_counter() - t0
                record.update(step=done, tokens_per_s=tokens / max(elapsed, 1e-9))
                if monitor is not None and done % self.memory.monitor_every == 0:
                    record.update(monitor.read())
                    monitor.maybe_empty_cache(done)
                tokens, t0 = 0.0, time.perf_counter()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                **({"mem_mb": f"{record['mem/rss']:.0f}"} if "mem/rss" in record else {}),
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                if log_every and done % log_every == 0:
                    log.write({"split": "train", **record})
                if eval_every and eval_batches is not None and done % eval_every == 0:
                    ev = self.evaluate(state, eval_batches())
                    log.write({"split": "eval", "step": done, **ev})
                    say(f"{self.kind} step {done}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))
                if checkpoint_every and done % checkpoint_every == 0:
                    save()
        except KeyboardInterrupt:
            say(f"{self.kind}: interrupted at update {done}; writing a final checkpoint.")
        finally:
            bar.close()
            log.close()
        save()
        return state


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, out: Path | None):
        self.file = self.tb = None
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed: JSON lines only
            self.tb = None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        for f in (self.file, self.tb):
            if f is not None:
                f.close()


# --------------------------------------------------------------------------- the factory


def create_trainer(kind: str, model: Model, *, learning_rate: float | None = None, weight_decay: float = 0.01,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_grad_norm: float | None = 1.0,
                   T_max: int = 1000, eta_min: float = 0.0, schedule: Callable | None = None,
                   decay_mask=None, accumulation_steps: int = 1, precision: str | amp.Policy | None = None,
                   loss_scaling: bool | None = None, beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0, gamma: float = 0.5, precomputed_reference: bool = False,
                   grad_path: str = "auto", adamw_impl: str = "auto", compile: bool | str | Callable = False,
                   loss_fn: Callable | None = None, grad_sync: Callable | None = None,
                   memory: MemoryConfig | None = None) -> Trainer:
    """Build the trainer for ``kind`` ("pretrain", "sft" or "dpo").

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
    precedence over ``precision`` and ``accumulation_steps``.
    """
    if kind not in KINDS:
        raise ValueError(f"create_trainer: kind must be one of {KINDS}, got {kind!r}.")
    memory = memory or MemoryConfig()
    if memory.enable_amp:
        precision = memory.amp_dtype
    if memory.gradient_accumulation_steps > 1:
        accumulation_steps = memory.gradient_accumulation_steps
    lr = DEFAULT_LR[kind] if learning_rate is None else learning_rate
    lr_schedule = schedule if schedule is not None else schedules.cosine_annealing(lr, T_max=T_max, eta_min=eta_min)
    policy = _policy(precision)
    head = _make_head(model, policy, memory)
    if memory.activation_checkpointing:
        if compile or grad_path == "func":
            raise ValueError(
                "create_trainer: activation_checkpointing needs the autograd gradient path "
                "(torch.utils.checkpoint does not run under torch.func.grad, which compile and "
                "grad_path='func' use); drop one of them.")
        grad_path = "autograd"
    if loss_fn is None:
        if kind == "pretrain":
            loss_fn = pretrain_objective(head)
        elif kind == "sft":
            loss_fn = sft_objective(head)
        else:
            loss_fn = dpo_objective(head, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                    gamma=gamma)
    adamw = optim.adamw(lr_schedule, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay,
                        mask=decay_mask, impl=adamw_impl)
    optimizer = optim.chain(optim.clip_by_global_norm(max_grad_norm), adamw) if max_grad_norm else optim.chain(adamw)
    scaling = (policy.compute_dtype == torch.float16) if loss_scaling is None else loss_scaling
    step = make_train_step(loss_fn, optimizer, accumulation_steps=accumulation_steps, loss_scaling=scaling,
                           lr_schedule=lr_schedule, grad_path=grad_path, sync=grad_sync)
    if compile:
        # compile=True uses Inductor; a string or callable names another torch.compile
        # backend (tests count recompilations with a cheap one). Learning rate and
        # counters are 0-d tensors in the state, so they never trigger a recompile.
        step = torch.compile(step, backend="inductor" if compile is True else compile)
    config = {"kind": kind, "learning_rate": lr, "weight_decay": weight_decay, "betas": list(betas), "eps": eps,
              "max_grad_norm": max_grad_norm, "T_max": T_max, "eta_min": eta_min,
              "custom_schedule": schedule is not None, "accumulation_steps": accumulation_steps,
              "precision": str(policy.compute_dtype), "loss_scaling": scaling, "compile": compile}
    if kind == "dpo":
        config.update(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
                      precomputed_reference=precomputed_reference)
    needs_reference = kind == "dpo" and loss_type != "simpo" and not precomputed_reference
    config["memory"] = dataclasses.asdict(memory)
    return Trainer(kind, model, loss_fn, optimizer, step, lr_schedule, config, scaling, needs_reference, memory)


def _make_head(model: Model, policy: amp.Policy, memory: MemoryConfig) -> Head:
    """The stage losses' way to the tokens, as the memory config and precision policy ask."""
    checkpoint = memory.activation_checkpointing
    if memory.chunked_loss:
        hidden = lambda p, ids: model.apply_hidden(p, ids, checkpoint=checkpoint)  # noqa: E731
        return chunked_head(policy.wrap(hidden) if policy.mixed else hidden)
    apply = (lambda p, ids: model.apply(p, ids, checkpoint=True)) if checkpoint else model.apply
    return logits_head(policy.wrap(apply) if policy.mixed else apply)


def _policy(precision) -> amp.Policy:
    if isinstance(precision, amp.Policy):
        return precision
    table = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"create_trainer: precision must be 'fp32', 'bf16', 'fp16' or an amp.Policy, got {precision!r}.")
    return amp.Policy(compute_dtype=table[precision])
