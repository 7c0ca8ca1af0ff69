"""What ``Trainer.fit`` does around the pure step, as hooks with their own cadence.

A hook has ``every`` (run it after every N-th update) and three methods, each
given the :class:`Run` -- the fit's live context (state, update count, data
position, the last update's metrics):

- ``on_start(run)``: before the first update;
- ``on_update(run)``: after each update whose number is a multiple of ``every``;
- ``on_end(run)``: once, however the fit ends (the data ran out, Ctrl-C, an error).

``fit`` builds :class:`MetricsLog`, :class:`Evaluate`, :class:`Checkpoint` and
:class:`ProgressBar` from its keyword arguments; pass more with ``fit(hooks=[...])``.
Metrics are tensors until a hook asks for them with :meth:`Run.record` -- the one
host sync of a logging step; on other steps nothing is copied to the host.

Example, a hook that prints the learning rate every 100 updates::

    class PrintLR(Hook):
        every = 100
        def on_update(self, run):
            run.say(f"update {run.step}: lr {run.record()['lr']:.2e}")

    trainer.fit(state, batches, 1000, hooks=[PrintLR()])
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from . import tree as T

__all__ = ["Run", "Hook", "MetricsLog", "Evaluate", "Checkpoint", "ProgressBar"]


@dataclasses.dataclass
class Run:
    """The live context of one ``fit``: what the hooks read.

    ``state`` is always the state after the last whole update, and ``position``
    the data position of the first batch it has not seen (``Batches.position``),
    so saving both gives an exact resume. ``metrics`` are the last update's, as
    tensors; ``tokens`` counts the input tokens processed by this process.
    """

    trainer: Any
    state: Any
    step: int
    position: tuple | None
    out: Path | None
    say: Callable[[str], None]
    metrics: dict = dataclasses.field(default_factory=dict)
    tokens: float = 0.0
    interrupted: bool = False
    _record: dict | None = None

    def record(self) -> dict[str, float]:
        """The last update's metrics as Python floats (a host sync, once per update however many ask)."""
        if self._record is None:
            self._record = {k: float(v) for k, v in self.metrics.items()}
        return self._record

    def advance(self, state, metrics: dict, position, tokens: float) -> None:
        self.state, self.metrics, self.position, self._record = state, metrics, position, None
        self.step += 1
        self.tokens += tokens


class Hook:
    """Base class: override any of the three methods; ``every`` sets the cadence of ``on_update``."""

    every: int = 1

    def on_start(self, run: Run) -> None:
        pass

    def on_update(self, run: Run) -> None:
        pass

    def on_end(self, run: Run) -> None:
        pass


class MetricsLog(Hook):
    """Appends ``{"split": "train", "step", ...metrics, "tokens", "tokens_per_s"}`` to ``out/metrics.jsonl``
    every ``every`` updates (and mirrors numbers to TensorBoard when it is installed).

    ``tokens`` and ``tokens_per_s`` count the input tokens this process ran since the
    previous record. Records past the run's starting step (a run killed after its last
    checkpoint) and a torn last line are dropped at the start, so a resumed run logs
    every step once.
    """

    def __init__(self, out: Path | None, every: int = 1):
        self.out, self.every = out, every
        self.file = self.tb = None
        self.tokens0, self.t0 = 0.0, time.perf_counter()

    def on_start(self, run: Run) -> None:
        self.tokens0, self.t0 = run.tokens, time.perf_counter()
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.jsonl"
        if path.exists():
            _truncate_log(path, run.step)
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        except Exception:  # tensorboard not installed: JSON lines only
            self.tb = None

    def on_update(self, run: Run) -> None:
        now = time.perf_counter()
        tokens = run.tokens - self.tokens0
        record = {"split": "train", **run.record(), "tokens": tokens,
                  "tokens_per_s": tokens / max(now - self.t0, 1e-9), "step": run.step}
        if run.trainer.kind == "dpo":
            record["pairs_per_s"] = record["pairs"] / max(now - self.t0, 1e-9)
        self.tokens0, self.t0 = run.tokens, now
        run._record = {**run.record(), **{k: record[k] for k in ("tokens", "tokens_per_s")}}
        self.write(record)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def on_end(self, run: Run) -> None:
        for f in (self.file, self.tb):
            if f is not None:
                f.close()
        self.file = self.tb = None


class Evaluate(Hook):
    """``trainer.evaluate`` on ``batches()`` (a function giving fresh batches) every ``every`` updates,
    and before the first update when the run starts at step 0 and ``at_start``."""

    def __init__(self, batches: Callable[[], Iterable[dict]], every: int, log: MetricsLog | None = None, *,
                 at_start: bool = True):
        self.batches, self.every, self.log, self.at_start = batches, every, log, at_start

    def _run(self, run: Run) -> None:
        ev = run.trainer.evaluate(run.state, self.batches())
        if self.log is not None:
            self.log.write({"split": "eval", "step": run.step, **ev})
        run.say(f"{run.trainer.kind} step {run.step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))

    def on_start(self, run: Run) -> None:
        if self.at_start and run.step == 0:
            self._run(run)

    def on_update(self, run: Run) -> None:
        self._run(run)


class Checkpoint(Hook):
    """Saves ``run.state`` to ``out/checkpoints/step-NNNNNN/`` every ``every`` updates (0: never on the way)
    and at the end, keeping the newest ``keep_last`` (``checkpoint.save_step``).

    The meta records the stage, the step, the model and trainer configurations and
    the data position (plus ``meta``). A LoRA run saves its adapters, not its frozen
    base, and records the base's fingerprint (``lora.fingerprint``). Params that are not all finite are never
    written (a host sync, only when saving). A Ctrl-C that arrives during a save
    is held until the checkpoint is written.
    """

    def __init__(self, out: Path | None, every: int = 0, *, keep_last: int | None = 3, meta: dict | None = None):
        self.out, self.keep_last, self.meta = out, keep_last, meta or {}
        self.every = every if every else 0
        self.saved_step: int | None = None
        self._base_fingerprint: str | None = None  # a LoRA run's base, hashed once per run

    def save(self, run: Run) -> None:
        from . import checkpoint

        if self.out is None or self.saved_step == run.step:
            return
        if not bool(T.all_finite(run.state.params)):
            run.say(f"{run.trainer.kind}: not saving update {run.step}: its params are not finite.")
            return
        trainer = run.trainer
        record = {"kind": trainer.kind, "step": run.step, "model_config": dataclasses.asdict(trainer.model.config),
                  "trainer_config": trainer.config,
                  "data_position": list(run.position) if run.position is not None else [], **self.meta}
        if trainer.lora is not None:
            from . import lora

            if self._base_fingerprint is None:
                self._base_fingerprint = lora.fingerprint(run.state.extras["lora_base"])
            record["lora_base_fingerprint"] = self._base_fingerprint
        with _deferred_interrupt(run.say):
            checkpoint.save_step(self.out, trainer.saved_state(run.state), step=run.step, meta=record,
                                 keep_last=self.keep_last)
        self.saved_step = run.step

    def on_update(self, run: Run) -> None:
        self.save(run)

    def on_end(self, run: Run) -> None:
        self.save(run)


class ProgressBar(Hook):
    """A tqdm bar over the updates; its loss, lr and tokens/s come from the logged records
    (so drawing it adds no host sync of its own)."""

    def __init__(self, total: int, *, enabled: bool = True, desc: str = ""):
        self.total, self.enabled, self.desc = total, enabled, desc
        self.bar = None

    def on_start(self, run: Run) -> None:
        self.bar = tqdm(total=self.total, initial=run.step, disable=not self.enabled, desc=self.desc,
                        dynamic_ncols=True)
        if self.enabled:  # messages go above the bar instead of through it
            run.say = self.bar.write

    def on_update(self, run: Run) -> None:
        self.bar.update(run.step - self.bar.n)
        record = run._record
        if record is not None:  # a logging step: the numbers are already on the host
            extra = {"mem_mb": f"{record['mem/rss']:.0f}"} if "mem/rss" in record else {}
            if "epoch" in record:
                extra["epoch"] = f"{record['epoch']:.2f}"
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", **extra,
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)

    def on_end(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()


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
