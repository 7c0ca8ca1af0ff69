"""From items to batches: padding collation and a deterministic, resumable batch order."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from ..labels import IGNORE_INDEX

__all__ = ["collate", "Batches"]


def _pad_value(key: str, pad_id: int) -> int:
    if key.endswith("input_ids"):
        return pad_id
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith(("attention_mask", "loss_mask")) or key == "position_ids":  # position 0: a sequence of its own
        return 0
    if key == "sequence_ids":  # packed rows: padding belongs to no sequence
        return -1
    if key.endswith("_logps"):  # packed rows: per-pair reference log-probs, padding read by no pair
        return 0
    raise ValueError(f"collate: do not know how to pad sequence field {key!r}.")


def collate(items: Sequence[dict], *, pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Stack items into a batch, right-padding every sequence field to one common length.

    The length is the longest sequence among *all* sequence fields of the batch
    (so ``chosen_*`` and ``rejected_*`` of a preference batch share it, and can
    be run as one ``[2B, T]`` forward), rounded up to ``pad_to_multiple_of``.
    ``*input_ids`` are padded with ``pad_id``, ``*labels`` with ``IGNORE_INDEX``
    and ``*attention_mask`` with 0 (an item without a mask gets ones over its
    length). 0-d fields (e.g. precomputed reference log-probs) are stacked; fields
    that are not tensors (a prompt's reference answer) become lists.
    """
    if not items:
        raise ValueError("collate: got an empty list of items.")
    items = [dict(it) for it in items]
    for it in items:
        for key in [k for k in it if k.endswith("input_ids")]:
            mask_key = key[: -len("input_ids")] + "attention_mask"
            it.setdefault(mask_key, torch.ones_like(it[key]))
    keys = list(items[0])
    if any(set(it) != set(keys) for it in items):
        raise ValueError("collate: items have different fields; batch items of one dataset only.")
    lists = [k for k in keys if not isinstance(items[0][k], torch.Tensor)]  # strings, numbers: kept as lists
    seq_keys = [k for k in keys if k not in lists and items[0][k].dim() == 1]
    T = max(int(it[k].shape[0]) for it in items for k in seq_keys) if seq_keys else 0
    if pad_to_multiple_of:
        T = pad_to_multiple_of * math.ceil(T / pad_to_multiple_of)
    batch = {}
    for k in keys:
        if k in lists:
            batch[k] = [it[k] for it in items]
        elif k in seq_keys:
            value = _pad_value(k, pad_id)
            batch[k] = torch.stack([torch.nn.functional.pad(it[k], (0, T - it[k].shape[0]), value=value)
                                    for it in items])
        else:
            batch[k] = torch.stack([it[k] for it in items])
    return batch


class Batches:
    """Deterministic batches over a dataset, by epoch, resumable from a position.

    The order of epoch ``e`` depends only on ``(seed, e)``: shuffled with a
    private generator (the global RNG is untouched), or in dataset order with
    ``shuffle=False``. ``group_by_length=True`` sorts shuffled windows of
    ``50 * batch_size`` items by length before cutting batches, then shuffles
    the batches (less padding, still random). ``position = (epoch, batch)`` is
    the next batch to yield; give it back to the constructor to resume: the
    resumed run sees exactly the batches the uninterrupted run would have seen.

    Iterating runs through ``epochs`` epochs (forever when ``None``).

    Memory: an epoch's order is kept as one int64 tensor (8 bytes per item) and
    each batch's indices are sliced out of it when the batch is due, so a dataset
    of millions of items (the blocks of :class:`~minillm_func.data.TokenShards`)
    costs tens of megabytes here, not the gigabytes of Python lists of ints.
    :meth:`epoch_order` still returns the batches as lists, for inspection.

    A dataset whose items depend on the epoch (``TokenShards(mode="windows")``
    draws new random windows every epoch) has a method ``for_epoch(epoch)`` that
    returns the dataset as seen in that epoch; the batches of epoch ``e`` read
    ``dataset.for_epoch(e)``.

    Data parallelism: with ``world_size > 1``, ``batch_size`` is the *global*
    batch. Every rank computes the same order and ``position``, and yields only
    its contiguous slice of each global batch (rank ``r`` of ``N`` takes
    ``B // N`` items, one more for the first ``B % N`` ranks), so ``N`` ranks
    together see exactly the batches of one process with ``world_size=1``, and a
    position saved by any number of ranks resumes with any other number. A
    global batch must hold at least ``world_size`` items (no rank gets nothing):
    the constructor refuses a ``batch_size`` or a short last batch that breaks this.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, group_by_length: bool = False, epochs: int | None = None,
                 position: tuple[int, int] = (0, 0), pad_to_multiple_of: int | None = None,
                 collate_fn: Callable | None = None, rank: int = 0, world_size: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Batches: batch_size must be a positive int, got {batch_size!r}.")
        if len(dataset) == 0:
            raise ValueError("Batches: the dataset is empty.")
        if drop_last and batch_size > len(dataset):
            raise ValueError(
                f"Batches: batch_size={batch_size} exceeds the {len(dataset)} items and drop_last=True would "
                "yield nothing; lower batch_size or set drop_last=False.")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"Batches: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}.")
        if world_size > 1:
            smallest = min(batch_size, len(dataset)) if drop_last else (len(dataset) % batch_size or batch_size)
            if smallest < world_size:
                raise ValueError(
                    f"Batches: a global batch of {smallest} item(s) cannot be split over {world_size} ranks "
                    f"(batch_size={batch_size} is the global batch; the dataset has {len(dataset)} items, "
                    f"so the last batch of each epoch holds {len(dataset) % batch_size or batch_size}). "
                    f"Use batch_size >= world_size, and drop_last=True when the last batch is short, e.g. "
                    f"Batches(data, {max(batch_size, world_size)}, drop_last=True, rank={rank}, "
                    f"world_size={world_size}).")
        self.rank, self.world_size = rank, world_size
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.group_by_length, self.epochs = group_by_length, epochs
        self.position = tuple(position)
        pad_id = getattr(getattr(dataset, "tokenizer", None), "pad_id", 0)
        self.collate_fn = collate_fn or (lambda items: collate(items, pad_id=pad_id,
                                                              pad_to_multiple_of=pad_to_multiple_of))

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def epoch_indices(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, batch_ids)`` of ``epoch``: batch ``k`` is ``order[j * B:(j + 1) * B]`` for ``j = batch_ids[k]``.

        Both are int64 tensors: 8 bytes per item and per batch, whatever the
        dataset's size (see the class docstring). The permutation is the one
        :meth:`epoch_order` lists, drawn from the same generator in the same order.
        """
        n, B = len(self.dataset), self.batch_size
        g = self._generator(epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.group_by_length:  # per item Python work: length grouping is for datasets that fit in a list
            lengths = self.dataset.lengths()
            window = 50 * B
            listed = order.tolist()
            order = torch.tensor([i for s in range(0, n, window)
                                  for i in sorted(listed[s:s + window], key=lambda i: -lengths[i])],
                                 dtype=torch.long)
        num_batches = len(self)  # a short last batch is dropped with drop_last
        if self.group_by_length and self.shuffle:
            batch_ids = torch.randperm(num_batches, generator=g)
        else:
            batch_ids = torch.arange(num_batches)
        return order, batch_ids

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The index batches of ``epoch``, in order (as lists; :meth:`epoch_indices` is the compact form)."""
        order, batch_ids = self.epoch_indices(epoch)
        B = self.batch_size
        return [order[j * B:(j + 1) * B].tolist() for j in batch_ids.tolist()]

    def rank_slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of one global batch of indices (all of it when ``world_size == 1``)."""
        n, N, r = len(batch), self.world_size, self.rank
        start = r * (n // N) + min(r, n % N)
        return batch[start:start + n // N + (r < n % N)]

    def __len__(self) -> int:
        """Batches per epoch."""
        n, B = len(self.dataset), self.batch_size
        return n // B if self.drop_last else math.ceil(n / B)

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.position
        B = self.batch_size
        while self.epochs is None or epoch < self.epochs:
            order, batch_ids = self.epoch_indices(epoch)
            data = self.dataset.for_epoch(epoch) if hasattr(self.dataset, "for_epoch") else self.dataset
            for b in range(start, len(batch_ids)):
                self.position = (epoch, b + 1) if b + 1 < len(batch_ids) else (epoch + 1, 0)
                j = int(batch_ids[b])
                yield self.collate_fn([data[i] for i in self.rank_slice(order[j * B:(j + 1) * B].tolist())])
            epoch, start = epoch + 1, 0
