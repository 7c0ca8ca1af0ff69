"""Memory tools: one config the trainers read, a monitor, and out-of-memory batch splitting.

- :class:`MemoryConfig` gathers the memory strategies; ``create_trainer(...,
  memory=MemoryConfig(...))`` reads each field (a new strategy is a new field
  read there).
- :class:`MemoryMonitor` reports current and peak memory of the device in use
  (CUDA: allocated / reserved / peak; MPS: allocated / driver; CPU: process
  RSS and its peak), for the metrics and the progress bar, and can empty the
  allocator cache periodically.
- :class:`DynamicBatchSizer` retries a micro-batch that ran out of memory in
  halves, down to ``min_micro_batch``, and remembers the size that worked.
  Because gradients are accumulated unnormalised and divided by the total
  count once, the update after a split is the update of the unsplit batch.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import resource
import sys

import torch


__all__ = ["MemoryConfig", "MemoryMonitor", "DynamicBatchSizer", "is_out_of_memory", "split_batch"]


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Memory strategies, each read by ``create_trainer``.

    Attributes:
        enable_amp: run the model under autocast to ``amp_dtype``.
        amp_dtype: "bf16" (CPU and CUDA) or "fp16" (CUDA; turns loss scaling on).
        gradient_accumulation_steps: micro-batches per optimizer update.
        dynamic_batch: on out-of-memory, split the micro-batch in halves and retry.
        min_micro_batch: the smallest piece ``dynamic_batch`` may try.
        monitor: add memory readings to the metrics and the progress bar.
        monitor_every: read memory every this many updates (a reading costs a system call).
        empty_cache_every: empty the device allocator's cache every this many updates (0: never).
        chunked_loss: compute the loss from the last hidden state in chunks of tokens,
            never holding the full ``[tokens, vocab]`` float32 logits.
        activation_checkpointing: recompute each transformer block in the backward
            pass instead of storing its activations.
    """

    enable_amp: bool = False
    amp_dtype: str = "bf16"
    gradient_accumulation_steps: int = 1
    dynamic_batch: bool = False
    min_micro_batch: int = 1
    monitor: bool = False
    monitor_every: int = 10
    empty_cache_every: int = 0
    chunked_loss: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.amp_dtype not in ("bf16", "fp16"):
            raise ValueError(f"MemoryConfig: amp_dtype must be 'bf16' or 'fp16', got {self.amp_dtype!r}.")
        for name in ("gradient_accumulation_steps", "min_micro_batch", "monitor_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MemoryConfig: {name} must be a positive int, got {getattr(self, name)!r}.")
        if not isinstance(self.empty_cache_every, int) or self.empty_cache_every < 0:
            raise ValueError(f"MemoryConfig: empty_cache_every must be an int >= 0, got {self.empty_cache_every!r}.")


# --------------------------------------------------------------------------- monitor


def _rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class MemoryMonitor:
    """Current and peak memory of ``device``, in MiB, as a flat dict of floats.

    CUDA: ``mem/allocated``, ``mem/reserved``, ``mem/peak_allocated``
    (``torch.cuda`` counters, no device sync). MPS: ``mem/allocated``,
    ``mem/driver``. CPU: ``mem/rss`` and ``mem/peak_rss`` of the process.
    """

    def __init__(self, device: str | torch.device = "cpu", *, empty_cache_every: int = 0):
        self.device = torch.device(device)
        self.empty_cache_every = empty_cache_every

    def read(self) -> dict[str, float]:
        mib = 2.0**20
        kind = self.device.type
        if kind == "cuda":
            return {"mem/allocated": torch.cuda.memory_allocated(self.device) / mib,
                    "mem/reserved": torch.cuda.memory_reserved(self.device) / mib,
                    "mem/peak_allocated": torch.cuda.max_memory_allocated(self.device) / mib}
        if kind == "mps":
            return {"mem/allocated": torch.mps.current_allocated_memory() / mib,
                    "mem/driver": torch.mps.driver_allocated_memory() / mib}
        rss = _rss_bytes()
        out = {"mem/peak_rss": _peak_rss_bytes() / mib}
        if rss is not None:
            out["mem/rss"] = rss / mib
        return out

    def maybe_empty_cache(self, step: int) -> bool:
        """Empty the allocator cache every ``empty_cache_every`` steps; True when it did."""
        if not self.empty_cache_every or step % self.empty_cache_every:
            return False
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()
        return True


# --------------------------------------------------------------------------- dynamic batch


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's out-of-memory errors on any device (CUDA, MPS, the CPU allocator)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def split_batch(batch: dict, size: int) -> list[dict]:
    """Consecutive pieces of at most ``size`` rows (every tensor is split along dim 0)."""
    rows = next(iter(batch.values())).shape[0]
    return [{k: v[s:s + size] for k, v in batch.items()} for s in range(0, rows, size)]


class DynamicBatchSizer:
    """Run a window step, splitting its micro-batches in halves whenever it runs out of memory.

    ``sizer(window_step, state, micro_batches)`` works with a step from
    ``make_window_step`` (``Trainer.run_window`` calls it so): the pieces of every
    micro-batch become the window, whose gradients, counts and losses the window
    step sums before its one update -- so the new state and the metrics are the
    ones the unsplit batches would have given. The size that worked is remembered
    (``micro_batch``) and used for the next windows. Below ``min_micro_batch`` it
    raises a ``RuntimeError`` naming every size tried; a batch is never dropped.
    """

    def __init__(self, min_micro_batch: int = 1):
        if min_micro_batch < 1:
            raise ValueError(f"DynamicBatchSizer: min_micro_batch must be >= 1, got {min_micro_batch}.")
        self.min_micro_batch = min_micro_batch
        self.micro_batch: int | None = None  # None: whole batches have fit so far

    def __call__(self, step, state, micro_batches):
        if isinstance(micro_batches, dict):  # one batch
            micro_batches = [micro_batches]
        rows = max(next(iter(b.values())).shape[0] for b in micro_batches)
        size = min(self.micro_batch or rows, rows)
        tried = []
        while True:
            tried.append(size)
            try:
                result = self._run(step, state, micro_batches, size)
                if size < rows:
                    self.micro_batch = size
                return result
            except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
                if not is_out_of_memory(error):
                    raise
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if size <= self.min_micro_batch:
                    raise RuntimeError(
                        f"DynamicBatchSizer: out of memory even at micro-batch {size} (sizes tried: {tried}, "
                        f"min_micro_batch={self.min_micro_batch}). Shorten the sequences, enable "
                        "activation_checkpointing or chunked_loss, or use a smaller model.") from error
                size = max(self.min_micro_batch, size // 2)

    @staticmethod
    def _run(step, state, micro_batches, size):
        return step(state, [piece for batch in micro_batches for piece in split_batch(batch, size)])
