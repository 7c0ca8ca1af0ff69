"""The three datasets: language modelling, conversations (SFT) and preferences (DPO).

Every item is a dict of 1-D LongTensors whose ``labels`` are already aligned to
the next token: ``labels[t]`` is the target for the model's output at ``t``
(``labels[t] == input_ids[t + 1]`` wherever it is counted), and
``IGNORE_INDEX`` (-100) wherever nothing is learned.

Every sequence starts with the tokenizer's BOS token, so the first real token
is predicted too. Tokenisation happens once, at construction.

Chat format (for ``{"messages": [...]}`` records), one segment per line::

    <|system|>\\n{content}\\n        (optional)
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}<eos>

Every segment is encoded on its own and the ids concatenated, so no merge of a
sub-word tokenizer can straddle the boundary between prompt and reply and shift
the loss mask. Only assistant contents and the EOS that ends each of them are
supervised.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..losses import IGNORE_INDEX

__all__ = [
    "LanguageModelingDataset", "ConversationDataset", "PreferenceDataset", "ROLES",
    "render_messages", "chat_prompt", "validate_record", "RECORD_FIELDS",
]

ROLES = ("system", "user", "assistant")

# The fields of each record kind, as users write them in JSON Lines.
RECORD_FIELDS = {
    "pretrain": '{"text": ...}',
    "sft": '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}',
    "dpo": '{"prompt": ..., "chosen": ..., "rejected": ...}',
}


# --------------------------------------------------------------------------- validation


def _field(record: dict, name: str, where: str, *, types=(str,), kind: str) -> object:
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r}; a {kind} record looks like {RECORD_FIELDS[kind]}.")
    value = record[name]
    if not isinstance(value, types):
        expected = " or ".join("a string" if t is str else "a list of messages" for t in types)
        raise ValueError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__} ({value!r:.60}).")
    return value


def _check_messages(messages: list, where: str, *, need_assistant: bool) -> None:
    if not messages:
        raise ValueError(f"{where}: 'messages' is empty; give at least one user and one assistant message.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{where}: message {i} must be {{\"role\": <string>, \"content\": <string>}}, got {m!r:.80}.")
        if m["role"] not in ROLES:
            raise ValueError(
                f"{where}: message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)} "
                "(rename e.g. 'human' to 'user' and 'gpt'/'bot' to 'assistant').")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no 'assistant' message, so there is nothing to learn from this conversation.")


def validate_record(kind: str, record, where: str) -> None:
    """Raise a ValueError naming ``where`` (e.g. ``data.jsonl:12``) if ``record`` is not a valid ``kind`` record."""
    if kind == "pretrain" and isinstance(record, str):
        record = {"text": record}
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object like {RECORD_FIELDS[kind]}, got {type(record).__name__}.")
    if kind == "pretrain":
        if not _field(record, "text", where, kind=kind).strip():
            raise ValueError(f"{where}: 'text' is empty; remove the record or give it some text.")
    elif kind == "sft":
        if "messages" in record:
            _check_messages(_field(record, "messages", where, types=(list,), kind=kind), where, need_assistant=True)
        else:
            _field(record, "prompt", where, kind=kind)
            _field(record, "completion", where, kind=kind)
    elif kind == "dpo":
        prompt = _field(record, "prompt", where, types=(str, list), kind=kind)
        if isinstance(prompt, list):
            _check_messages(prompt, where, need_assistant=False)
        _field(record, "chosen", where, kind=kind)
        _field(record, "rejected", where, kind=kind)
    else:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(RECORD_FIELDS)}.")


# --------------------------------------------------------------------------- building sequences


def render_messages(messages: Sequence[dict], tokenizer) -> list[tuple[list[int], bool]]:
    """Segments ``(ids, supervised)`` of a conversation in the chat format above."""
    segments = []
    for m in messages:
        segments.append((tokenizer.encode(f"<|{m['role']}|>\n"), False))
        if m["role"] == "assistant":
            segments.append((tokenizer.encode(m["content"]) + [tokenizer.eos_id], True))
        else:
            segments.append((tokenizer.encode(m["content"] + "\n"), False))
    return segments


def chat_prompt(messages: Sequence[dict], tokenizer) -> list[int]:
    """The ids a model sees before its next reply: BOS, the rendered messages and an assistant header."""
    ids = [tokenizer.bos_id]
    for seg, _ in render_messages(messages, tokenizer):
        ids += seg
    return ids + tokenizer.encode("<|assistant|>\n")


def _prompt_segments(prompt, tokenizer) -> list[tuple[list[int], bool]]:
    if isinstance(prompt, str):
        return [(tokenizer.encode(prompt), False)]
    return render_messages(prompt, tokenizer) + [(tokenizer.encode("<|assistant|>\n"), False)]


def _sequence(segments, tokenizer, max_length: int) -> dict | None:
    """BOS + segments, cut to ``max_length``; labels on supervised tokens. None if nothing is supervised."""
    ids, supervised = [tokenizer.bos_id], [False]
    for seg, sup in segments:
        ids += seg
        supervised += [sup] * len(seg)
    ids, supervised = ids[:max_length], supervised[:max_length]
    labels = [ids[t + 1] if supervised[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    if all(y == IGNORE_INDEX for y in labels):
        return None
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "attention_mask": torch.ones(len(ids), dtype=torch.long)}


def _check_max_length(max_length, name: str, minimum: int = 2) -> None:
    if not isinstance(max_length, int) or max_length < minimum:
        raise ValueError(
            f"{name}: max_length must be an int >= {minimum} (a start token plus at least one token to learn), "
            f"got {max_length!r}.")


class _Items:
    """A list of precomputed items; ``num_dropped`` counts examples that had to be left out."""

    items: list
    num_dropped: int = 0
    dropped: list

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def lengths(self) -> list[int]:
        """Sequence length of every item (the longer of a pair), for length-grouped batching."""
        return [max(int(v.shape[0]) for k, v in item.items() if k.endswith("input_ids")) for item in self.items]

    def _collect(self, name: str, kind: str, examples, tokenizer, max_length: int) -> None:
        """Validate and tokenise ``examples`` with ``self._make``; count the ones that come back empty."""
        _check_max_length(max_length, name)
        if not examples:
            raise ValueError(f"{name}: no examples given.")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.items, self.dropped = [], []
        for i, ex in enumerate(examples):
            validate_record(kind, ex, f"example {i}")
            item = self._make(ex)
            if item is None:
                self.dropped.append(i)
            else:
                self.items.append(item)
        self.num_dropped = len(self.dropped)
        self._report_drops(name, max_length, len(examples))

    def _report_drops(self, name: str, max_length: int, total: int) -> None:
        if not self.items:
            raise ValueError(
                f"{name}: max_length={max_length} is too small to hold the prompt and one reply token of any of "
                f"the {total} examples; raise max_length (or shorten the prompts).")
        if self.num_dropped:
            warnings.warn(
                f"{name}: {self.num_dropped} of {total} examples left no reply token to learn after truncation "
                f"to max_length={max_length} and were dropped (indices in .dropped); raise max_length to keep them.",
                stacklevel=4)


# --------------------------------------------------------------------------- datasets


class LanguageModelingDataset(_Items):
    """Pretraining sequences from raw texts.

    Unpacked (default): each text becomes ``BOS text EOS``, truncated or padded
    to ``max_length``; labels are the next token, and the last position and
    padding get ``IGNORE_INDEX``. Every item has length ``max_length``.

    ``pack=True``: documents are joined into one stream ``doc1 EOS doc2 EOS ...``
    (after a single BOS) and cut into consecutive blocks of ``max_length``; each
    block's last label is the next block's first token, so every token of the
    stream is an input once and a target once. Only the final block is padded.
    Attention crosses document boundaries inside a block (the usual GPT-2
    practice); the EOS tells the model a new document starts.
    """

    def __init__(self, texts: Sequence[str], tokenizer, max_length: int, *, pack: bool = False):
        _check_max_length(max_length, "LanguageModelingDataset")
        if isinstance(texts, str):
            raise ValueError("LanguageModelingDataset: texts must be a list of strings, not one string; wrap it: [text].")
        if not texts:
            raise ValueError("LanguageModelingDataset: no texts given.")
        for i, text in enumerate(texts):
            validate_record("pretrain", text, f"text {i}")
        self.tokenizer, self.max_length, self.pack = tokenizer, max_length, pack
        self.dropped = []
        if pack:
            stream = [tokenizer.bos_id]
            for text in texts:
                stream += tokenizer.encode(text) + [tokenizer.eos_id]
            self.items = [self._item(stream[s:s + max_length], stream[s + 1:s + max_length + 1])
                          for s in range(0, len(stream), max_length)]
        else:
            self.items = []
            for text in texts:
                ids = ([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id])[:max_length]
                self.items.append(self._item(ids, ids[1:]))

    def _item(self, ids: list[int], targets: list[int]) -> dict:
        n, T = len(ids), self.max_length
        labels = targets + [IGNORE_INDEX] * (T - len(targets))
        return {"input_ids": torch.tensor(ids + [self.tokenizer.pad_id] * (T - n)),
                "labels": torch.tensor(labels),
                "attention_mask": torch.tensor([1] * n + [0] * (T - n))}


class ConversationDataset(_Items):
    """SFT sequences; the loss is on the assistant's replies only.

    Each example is ``{"prompt", "completion"}`` (the prompt is used verbatim,
    no template) or ``{"messages": [...]}`` (the chat format in the module
    docstring). The sequence is ``BOS prompt reply EOS``; the supervised
    positions are exactly the reply tokens and the EOS, shifted by one: their
    count is ``min(len(reply) + 1, room left after the prompt)``.

    Truncation keeps the prompt's start and as much of the reply as fits. An
    example left with no supervised token is dropped, counted in
    ``num_dropped`` (indices in ``dropped``) and reported with a warning; if
    every example is dropped, construction fails with an error that says so.
    Items are not padded (``collate`` pads a batch to its longest item).
    """

    def __init__(self, examples: Sequence[dict], tokenizer, max_length: int):
        self._collect("ConversationDataset", "sft", examples, tokenizer, max_length)

    def _make(self, ex: dict) -> dict | None:
        tok = self.tokenizer
        if "messages" in ex:
            segments = render_messages(ex["messages"], tok)
        else:
            segments = _prompt_segments(ex["prompt"], tok) + [(tok.encode(ex["completion"]) + [tok.eos_id], True)]
        return _sequence(segments, tok, self.max_length)


class PreferenceDataset(_Items):
    """DPO pairs: the same prompt tokens, then the chosen or the rejected reply.

    Each example is ``{"prompt", "chosen", "rejected"}``; the prompt is a
    string (verbatim) or a list of messages (rendered in the chat format,
    followed by an assistant header). Items hold ``chosen_input_ids``,
    ``chosen_labels``, ``chosen_attention_mask`` and the same three for
    ``rejected``; only reply tokens and their EOS are supervised. A pair in
    which either side keeps no supervised token after truncation is dropped
    and counted, as in :class:`ConversationDataset`.
    """

    def __init__(self, examples: Sequence[dict], tokenizer, max_length: int):
        self._collect("PreferenceDataset", "dpo", examples, tokenizer, max_length)

    def _make(self, ex: dict) -> dict | None:
        tok = self.tokenizer
        prompt = _prompt_segments(ex["prompt"], tok)
        sides = {side: _sequence(prompt + [(tok.encode(ex[side]) + [tok.eos_id], True)], tok, self.max_length)
                 for side in ("chosen", "rejected")}
        if any(v is None for v in sides.values()):
            return None
        return {f"{side}_{k}": v for side, item in sides.items() for k, v in item.items()}
