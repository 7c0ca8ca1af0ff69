"""The three trainers, each a thin composition: a loss closure + an optimizer chain + ``make_train_step``.

``create_trainer(kind, model, **overrides)`` builds one. A new training stage
is a new loss function ``(params, batch, extras) -> (summed_loss, (count,
metrics))`` handed to :class:`Trainer`; nothing is subclassed.

Defaults reproduce the original imperative loop: AdamW(lr=1e-4, wd=0.01,
betas=(0.9, 0.999), eps=1e-8), CosineAnnealingLR(T_max=1000) stepped after
each optimizer step, clip_grad_norm_(1.0); SFT uses lr=5e-5; DPO beta=0.1.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import threading
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
           "add_reference_logps", "Head", "logits_head", "chunked_head", "KINDS", "NonFiniteError"]

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
            from .distributed import all_reduce_sum
            keys = sorted(totals)
            packed = all_reduce_sum(torch.tensor([count_sum] + [totals[k] for k in keys], dtype=torch.float64))
            count_sum, totals = float(packed[0]), {k: float(v) for k, v in zip(keys, packed[1:])}
        if not count_sum:
            raise ValueError("evaluate: the batches hold no counted token (or pair); nothing to evaluate.")
        out = {k: v / count_sum for k, v in totals.items()}
        if self.kind != "dpo":
            out["perplexity"] = math.exp(min(out["loss"], 700.0))
        return out

    def fit(self, state: TrainState, batches: Iterable[dict], num_steps: int, *,
            eval_batches: Callable[[], Iterable[dict]] | None = None, eval_every: int = 0,
            eval_at_start: bool = True, out_dir=None, checkpoint_every: int = 0, keep_last: int | None = 3,
            log_every: int = 1, max_skipped: int = 100, progress: bool = True, desc: str | None = None,
            meta: dict | None = None, reraise_interrupt: bool = False) -> TrainState:
        """Train until ``state.step == num_steps`` optimizer updates; the impure shell around ``step``.

        Draws a tqdm bar (loss, lr, tokens/s), evaluates every ``eval_every``
        updates on ``eval_batches()`` (a function returning fresh batches; also
        before the first update when ``eval_at_start`` and the run starts at
        step 0), appends metrics to ``out_dir/metrics.jsonl`` (and TensorBoard
        when it is installed), and writes checkpoints to
        ``out_dir/checkpoints/step-NNNNNN/`` every ``checkpoint_every`` updates
        and at the end, keeping the newest ``keep_last`` (``checkpoint.save_step``;
        ``checkpoint.resolve(out_dir)`` finds the newest complete one).

        Exact resume: a checkpoint always holds the state at an update boundary
        and, when ``batches`` has a ``position`` (``Batches``), the position of
        the first batch that state has not seen -- also when Ctrl-C or an error
        arrives in the middle of a step or of an accumulation window (the
        window's micro-batches are then replayed on resume). On resume,
        ``metrics.jsonl`` is cut back to the state's step, so no step is logged twice.

        Ctrl-C stops cleanly: the last state at an update boundary is
        checkpointed (a second Ctrl-C during that save is deferred until it is
        written) and returned -- or, with ``reraise_interrupt``, the
        ``KeyboardInterrupt`` is raised again once the checkpoint is written
        (so that a script or a shell pipeline stops too). After ``max_skipped`` consecutive micro-steps with
        non-finite gradients, ``fit`` raises :class:`NonFiniteError`; params that
        are not finite are never written to a checkpoint. ``meta`` adds
        JSON-serialisable entries (e.g. the tokenizer) to every checkpoint.

        Logged per update: ``loss``, ``tokens`` (input tokens processed by this
        process in the update's micro-batches) and ``tokens_per_s``; for
        pretraining and SFT ``loss_tokens`` (the update's counted targets, the
        loss's normaliser, summed over micro-batches and processes); for DPO
        ``pairs`` and ``pairs_per_s``; plus ``grad_norm``, ``lr``, ``scale`` and the loss's own metrics.
        """
        from . import checkpoint

        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"fit: num_steps must be a non-negative int, got {num_steps!r}.")
        if not isinstance(max_skipped, int) or max_skipped < 1:
            raise ValueError(f"fit: max_skipped must be a positive int, got {max_skipped!r}.")
        main = not _distributed() or torch.distributed.get_rank() == 0  # only rank 0 logs, draws and saves
        out = Path(out_dir) if out_dir is not None and main else None
        progress = progress and main
        done = int(state.step)  # host sync, once: the shell counts updates in Python from here on
        log = _MetricsLog(out, keep_until=done)
        bar = tqdm(total=num_steps, initial=done, disable=not progress, desc=desc or self.kind, dynamic_ncols=True)
        say = bar.write if main else (lambda _: None)
        device = next(iter(T.leaves(state.params))).device
        monitor = MemoryMonitor(device, empty_cache_every=self.memory.empty_cache_every) if self.memory.monitor else None
        count_name = "pairs" if self.kind == "dpo" else "loss_tokens"
        # The last update boundary: the state after the last completed update and the
        # data position of the first batch it has not seen. Only this is ever saved.
        boundary, position = state, _position(batches)
        saved_step = None
        batch_iter = iter(batches)
        window = _Window()
        skipped_in_a_row, last_finite, interrupted = 0, None, False

        def save(at: TrainState, step: int, pos) -> None:
            nonlocal saved_step
            if out is None or saved_step == step:
                return
            if not bool(T.all_finite(at.params)):  # host sync, only when saving
                say(f"{self.kind}: not saving update {step}: its params are not finite.")
                return
            record = {"kind": self.kind, "step": step, "model_config": dataclasses.asdict(self.model.config),
                      "trainer_config": self.config, "data_position": list(pos) if pos is not None else [],
                      **(meta or {})}
            with _deferred_interrupt(say):
                checkpoint.save_step(out, at, step=step, meta=record, keep_last=keep_last)
            saved_step = step

        def evaluate(step: int) -> None:
            ev = self.evaluate(boundary, eval_batches())
            log.write({"split": "eval", "step": step, **ev})
            say(f"{self.kind} step {step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))

        try:
            if eval_at_start and eval_every and eval_batches is not None and done == 0 and done < num_steps:
                evaluate(0)
            while done < num_steps:
                try:
                    batch = next(batch_iter)
                except StopIteration:
                    say(f"{self.kind}: the data ran out after {done} of {num_steps} updates.")
                    break
                state, metrics = self.run_step(state, batch)
                record = {k: float(v) for k, v in metrics.items()}  # host sync: the shell reads every micro-step
                if record["skipped"]:
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= max_skipped:
                        raise NonFiniteError(_diverged_message(self.kind, skipped_in_a_row, last_finite, done,
                                                               self.config))
                    if not record["updated"]:
                        say(f"{self.kind}: non-finite gradient at update {done}; micro-step skipped "
                            f"(scale now {record['scale']:g}).")
                    continue
                skipped_in_a_row = 0
                if math.isfinite(record["loss"]):
                    last_finite = (record["loss"], done + 1)
                window.add(record, _input_tokens(batch))
                if not record["updated"]:
                    continue
                done += 1
                boundary, position = state, _position(batches)
                record.update(window.close(count_name))
                record["step"] = done
                if monitor is not None and done % self.memory.monitor_every == 0:
                    record.update(monitor.read())
                    monitor.maybe_empty_cache(done)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                **({"mem_mb": f"{record['mem/rss']:.0f}"} if "mem/rss" in record else {}),
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                if log_every and done % log_every == 0:
                    log.write({"split": "train", **record})
                if eval_every and eval_batches is not None and done % eval_every == 0:
                    evaluate(done)
                if checkpoint_every and done % checkpoint_every == 0:
                    save(boundary, done, position)
        except KeyboardInterrupt:
            say(f"{self.kind}: interrupted after update {done}; writing a final checkpoint.")
            interrupted = True
        except NonFiniteError:
            save(boundary, done, position)  # the last boundary, if its params are finite
            raise
        finally:
            bar.close()
            log.close()
        save(boundary, done, position)
        if interrupted and reraise_interrupt:
            raise KeyboardInterrupt
        return boundary


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive updates had non-finite gradients."""


def _diverged_message(kind: str, skipped: int, last_finite, done: int, config: dict) -> str:
    last = (f"the last finite loss was {last_finite[0]:.4g} at update {last_finite[1]}" if last_finite
            else "no finite loss was seen")
    return (f"{kind}: {skipped} consecutive micro-steps had non-finite gradients after update {done} ({last}); "
            f"stopped, and nothing non-finite was saved. Likely causes: a learning rate too high "
            f"(it is {config.get('learning_rate')}), or float16 overflow (precision {config.get('precision')}): "
            "lower the learning rate, or train in bf16/fp32.")


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


# Metrics that describe the update, not the micro-batch: the window keeps the last value.
_UPDATE_METRICS = ("lr", "scale", "grad_norm", "skipped", "updated")


class _Window:
    """The micro-steps of one update: count-weighted means of their metrics, tokens and time."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = self.tokens = 0.0
        self.t0 = time.perf_counter()

    def add(self, record: dict, tokens: float) -> None:
        n = record.pop("tokens")  # the loss's normaliser of this micro-batch (tokens, or pairs for DPO)
        self.count += n
        self.tokens += tokens
        for k, v in record.items():
            if k not in _UPDATE_METRICS:
                self.sums[k] = self.sums.get(k, 0.0) + v * n

    def close(self, count_name: str) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = {k: v / max(self.count, 1.0) for k, v in self.sums.items()}
        out.update({"tokens": self.tokens, "tokens_per_s": self.tokens / elapsed, count_name: self.count})
        if count_name == "pairs":
            out["pairs_per_s"] = self.count / elapsed
        self.__init__()
        return out


@contextlib.contextmanager
def _deferred_interrupt(say):
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block is done (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def hold(signum, frame):
        caught.append(signum)
        say("saving the checkpoint; Ctrl-C will take effect once it is written.")

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class _MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard when it is installed.

    ``keep_until``: the step of the state being trained; records of later steps (left by a
    run that was killed after its last checkpoint) and a torn last line are dropped first,
    so a resumed run logs every step once.
    """

    def __init__(self, out: Path | None, keep_until: int = 0):
        self.file = self.tb = None
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.exists():
            _truncate_log(path, keep_until)
        self.file = open(path, "a")
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


def _truncate_log(path: Path, keep_until: int) -> None:
    """Rewrite ``path`` (atomically) without the records past step ``keep_until`` and without torn lines."""
    kept, changed = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            keep = int(json.loads(line).get("step", 0)) <= keep_until
        except (ValueError, AttributeError, TypeError):
            keep = False
        kept += [line] if keep else []
        changed |= not keep
    if changed:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


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
