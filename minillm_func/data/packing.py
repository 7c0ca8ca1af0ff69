"""Padding-free packing: several examples share one row, and nothing passes between them.

A padded batch of examples whose lengths vary (as replies do: a few long, many
short) spends most of its compute on padding. A packed row concatenates whole
examples up to a capacity; ``position_ids`` restart at 0 at each example, and
the model turns them into a block-diagonal causal mask
(:func:`~minillm_func.model.packed_causal_mask`), so each example is rotated by
its own positions and attends to itself only: its logits are those it would get
alone, and the loss over the packed batch equals the loss over the same
examples padded. Labels are each example's own (already aligned to the next
token inside the example), so no target crosses a boundary either.

Which examples share a row is chosen once, by best-fit decreasing
(:func:`best_fit_decreasing`, as TRL's ``"bfd"`` strategy): rows come out nearly
full, with few of them. An example is never split.

Rows of a preference dataset hold whole *pairs*: the chosen reply of pair ``k``
of a row has ``sequence_ids == 2k`` and its rejected reply ``2k + 1`` (``-1`` on
padding), so the stage losses can sum each sequence's log-probs back out of the
row. A pair stays in one row, so the rows of a batch are independent of each
other: splitting a batch by rows (micro-batches, data-parallel ranks, the
out-of-memory splitter) keeps every pair whole. The losses themselves only read
``sequence_ids``; they would take a chosen and a rejected reply in different
rows just the same.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import torch

__all__ = ["best_fit_decreasing", "PackedDataset", "is_packed"]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose ``lengths`` add up to at most ``capacity``; every index in exactly one bin.

    Best-fit decreasing: take the items from the longest to the shortest (ties by
    index), and put each in the open bin with the *least* room that still holds
    it, opening a new bin when none does. Deterministic; ``O(n log n)`` lookups.
    Within a bin, items keep the order in which they were placed (longest first).
    """
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"best_fit_decreasing: capacity must be a positive int, got {capacity!r}.")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i = too_long[0]
        raise ValueError(f"best_fit_decreasing: item {i} has length {lengths[i]} > capacity {capacity}; "
                         "raise the capacity or truncate the items first.")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (room left, bin) of the bins that can still take something
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        j = bisect.bisect_left(room, (n, -1))  # the first bin with room >= n: the best fit
        if j == len(room):
            bins.append([i])
            b, left = len(bins) - 1, capacity - n
        else:
            left, b = room.pop(j)
            bins[b].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, b))
    return bins


def is_packed(batch: dict) -> bool:
    """Whether ``batch`` holds packed rows (it carries ``position_ids``)."""
    return "position_ids" in batch


def _length(item: dict, prefix: str = "") -> int:
    """Real tokens of a sequence of ``item`` (trailing padding, where its attention mask says so, excluded)."""
    mask = item.get(prefix + "attention_mask")
    return int(mask.sum()) if mask is not None else int(item[prefix + "input_ids"].shape[0])


class PackedDataset:
    """Rows of several whole examples each, packed by best-fit decreasing; ``position_ids`` restart per example.

    ``dataset``: a :class:`~minillm_func.data.ConversationDataset` (SFT; also any
    dataset of ``{"input_ids", "labels"}`` items, e.g. unpacked pretraining texts,
    whose padding is dropped) or a :class:`~minillm_func.data.PreferenceDataset`
    (DPO, ORPO; with precomputed reference log-probs too). ``capacity``: tokens per
    row, by default the dataset's ``max_length`` for SFT and twice it for pairs (a
    pair, chosen and rejected, always fits one row).

    An SFT row is ``{"input_ids", "labels", "position_ids"}``; a preference row adds
    ``sequence_ids`` (chosen of its ``k``-th pair ``2k``, rejected ``2k + 1``) and, when
    the items carry them, ``ref_chosen_logps`` / ``ref_rejected_logps`` of its pairs
    (``[pairs]``). Batch rows with :class:`~minillm_func.data.Batches` as any dataset;
    the stage losses see a packed batch by its ``position_ids``.
    ``examples_per_row`` and ``fill`` (the fraction of row capacity holding tokens)
    tell how well it packed.
    """

    def __init__(self, dataset, capacity: int | None = None):
        if len(dataset) == 0:
            raise ValueError("PackedDataset: the dataset is empty.")
        first = dataset[0]
        self.pairs = "chosen_input_ids" in first
        if not self.pairs and not {"input_ids", "labels"} <= set(first):
            raise ValueError(f"PackedDataset: packs SFT items ({{input_ids, labels}}) or preference pairs "
                             f"(chosen_*/rejected_*); got items with {sorted(first)}.")
        if not self.pairs and any(k.startswith("kl_") for k in first):
            raise ValueError("PackedDataset: KTO items (with kl_* mismatched pairs) are not packed; "
                             "train KTO unpacked.")
        unknown = [k for k, v in first.items() if not isinstance(v, torch.Tensor)]
        if unknown:
            raise ValueError(f"PackedDataset: items carry fields that are not tensors ({unknown}); prompt "
                             "datasets (GRPO) are not packed.")
        max_length = getattr(dataset, "max_length", None)
        if capacity is None:
            if max_length is None:
                raise ValueError("PackedDataset: the dataset has no max_length; give capacity= (tokens per row).")
            capacity = 2 * max_length if self.pairs else max_length
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"PackedDataset: capacity must be an int >= 2, got {capacity!r}.")
        self.tokenizer = getattr(dataset, "tokenizer", None)
        self.max_length, self.capacity = capacity, capacity
        self.source = dataset
        self.num_dropped = getattr(dataset, "num_dropped", 0)
        self.dropped = getattr(dataset, "dropped", [])
        if self.pairs:
            units = [_length(dataset[i], "chosen_") + _length(dataset[i], "rejected_") for i in range(len(dataset))]
        else:
            units = [_length(dataset[i]) for i in range(len(dataset))]
        self.rows = best_fit_decreasing(units, capacity)
        self._lengths = [sum(units[i] for i in row) for row in self.rows]
        self.examples_per_row = len(dataset) / len(self.rows)
        self.fill = sum(units) / (capacity * len(self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> list[int]:
        """Tokens in each row, for length-grouped batching."""
        return list(self._lengths)

    def __getitem__(self, i: int) -> dict:
        items = [self.source[j] for j in self.rows[i]]
        return self._pack_pairs(items) if self.pairs else self._pack(items)

    @staticmethod
    def _pack(items: list[dict]) -> dict:
        n = [_length(it) for it in items]
        row = {"position_ids": torch.cat([torch.arange(k) for k in n])}
        for key in items[0]:
            if key != "attention_mask":
                row[key] = torch.cat([it[key][:k] for it, k in zip(items, n)])
        return row

    @staticmethod
    def _pack_pairs(items: list[dict]) -> dict:
        ids, labels, positions, sequences = [], [], [], []
        for k, it in enumerate(items):
            for side, seq in (("chosen_", 2 * k), ("rejected_", 2 * k + 1)):
                n = _length(it, side)
                ids.append(it[side + "input_ids"][:n])
                labels.append(it[side + "labels"][:n])
                positions.append(torch.arange(n))
                sequences.append(torch.full((n,), seq))
        row = {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "position_ids": torch.cat(positions),
               "sequence_ids": torch.cat(sequences)}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in items[0]:
                row[key] = torch.stack([it[key] for it in items])
        return row
