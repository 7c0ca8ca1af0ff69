"""The three datasets: language modelling, conversations (SFT) and preferences (DPO).

Every item is a dict of 1-D LongTensors whose ``labels`` are already aligned to
the next token: ``labels[t]`` is the target for the model's output at ``t``
(``labels[t] == input_ids[t + 1]`` wherever it is counted), and
``IGNORE_INDEX`` (-100) wherever nothing is learned.

A plain-text sequence starts with the tokenizer's BOS token when the tokenizer
adds one (``tokenizer.add_bos_token``: always for ByteTokenizer and
BPETokenizer, and for an :class:`~minillm_func.data.HFTokenizer` exactly when
``transformers``' ``tokenizer(text)`` would), so the first real token is
predicted too. Tokenisation happens once, at construction.

Chat template. When the tokenizer has one (an ``HFTokenizer`` from an instruct
model's folder), conversations are rendered by it and tokenised as
``apply_chat_template`` does: the ids are the model's own chat format, and the
labels are on the assistant turns only — content and end-of-turn token, not the
role header nor the newline after the end-of-turn token (the rule is in
:mod:`minillm_func.data.chat`). ``{"prompt", "completion"}`` records become a
user message and an assistant message (TRL's conversational lists are taken as
they are) and only the completion is learned. Pass ``chat_template=False`` to
use the built-in format below instead.

Built-in chat format (for ``{"messages": [...]}`` records when there is no
template), one segment per line::

    <|system|>\\n{content}\\n        (optional)
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}<eos>

Every segment is encoded on its own and the ids concatenated, so no merge of a
sub-word tokenizer can straddle the boundary between prompt and reply and shift
the loss mask. Only assistant contents and the EOS that ends each of them are
supervised.
"""
from __future__ import annotations

import json
import warnings
from typing import Sequence

import torch

from ..labels import IGNORE_INDEX

__all__ = [
    "LanguageModelingDataset", "ConversationDataset", "PreferenceDataset", "PromptDataset",
    "UnpairedPreferenceDataset", "ROLES",
    "render_messages", "chat_prompt", "start_ids", "validate_record", "RECORD_FIELDS",
]

ROLES = ("system", "user", "assistant")

# The fields of each record kind, as users write them in JSON Lines.
RECORD_FIELDS = {
    "pretrain": '{"text": ...}',
    "sft": '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}',
    "dpo": '{"prompt": ..., "chosen": ..., "rejected": ...}',
    "grpo": '{"prompt": ..., "answer": ...} (a prompt, and the columns the reward functions read)',
    "kto": '{"prompt": ..., "completion": ..., "label": true | false} (a reply marked desirable or not)',
}
_STR_OR_MESSAGES = (str, list)


# --------------------------------------------------------------------------- validation


def _field(record: dict, name: str, where: str, *, types=(str,), kind: str) -> object:
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r}; a {kind} record looks like {RECORD_FIELDS[kind]}.")
    value = record[name]
    if not isinstance(value, types):
        also = "; a list of messages (TRL's conversational format) is accepted too" if list in types else ""
        raise ValueError(
            f"{where}: field {name!r} must be a string, got {type(value).__name__} ({value!r:.60}){also}.")
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


def _check_reply(reply, name: str, where: str) -> None:
    """A reply is a string, or (TRL's conversational format) messages that start with the assistant's."""
    if isinstance(reply, list):
        _check_messages(reply, where, need_assistant=False)
        if reply[0]["role"] != "assistant":
            raise ValueError(f"{where}: {name!r} must start with an assistant message (it is the model's reply), "
                             f"got role {reply[0]['role']!r}.")


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
            prompt = _field(record, "prompt", where, types=_STR_OR_MESSAGES, kind=kind)
            if isinstance(prompt, list):
                _check_messages(prompt, where, need_assistant=False)
            _check_reply(_field(record, "completion", where, types=_STR_OR_MESSAGES, kind=kind), "completion", where)
    elif kind == "dpo":
        prompt = _field(record, "prompt", where, types=_STR_OR_MESSAGES, kind=kind)
        if isinstance(prompt, list):
            _check_messages(prompt, where, need_assistant=False)
        for side in ("chosen", "rejected"):
            _check_reply(_field(record, side, where, types=_STR_OR_MESSAGES, kind=kind), side, where)
    elif kind == "kto":
        prompt = _field(record, "prompt", where, types=_STR_OR_MESSAGES, kind=kind)
        if isinstance(prompt, list):
            _check_messages(prompt, where, need_assistant=False)
        _check_reply(_field(record, "completion", where, types=_STR_OR_MESSAGES, kind=kind), "completion", where)
        if not isinstance(record.get("label"), bool):
            raise ValueError(f"{where}: 'label' must be true (a desirable reply) or false, got {record.get('label')!r}.")
    elif kind == "grpo":
        prompt = _field(record, "prompt", where, types=_STR_OR_MESSAGES, kind=kind)
        if isinstance(prompt, list):
            _check_messages(prompt, where, need_assistant=False)
        elif not prompt.strip():
            raise ValueError(f"{where}: 'prompt' is empty; remove the record or give it a prompt.")
    else:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(RECORD_FIELDS)}.")


# --------------------------------------------------------------------------- building sequences


def start_ids(tokenizer) -> list[int]:
    """What a plain-text sequence starts with: ``[bos_id]`` if the tokenizer adds BOS to a text, else nothing."""
    bos = getattr(tokenizer, "bos_id", None)
    return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", True) else []


def _use_template(tokenizer, chat_template: bool | None) -> bool:
    has = getattr(tokenizer, "chat_template", None) is not None
    if chat_template and not has:
        raise ValueError(f"chat_template=True, but {tokenizer!r} has no chat template; load an instruct model's "
                         "tokenizer (HFTokenizer.from_folder) or leave chat_template unset for the built-in format.")
    return has if chat_template is None else bool(chat_template)


def render_messages(messages: Sequence[dict], tokenizer) -> list[tuple[list[int], bool]]:
    """Segments ``(ids, supervised)`` of a conversation in the built-in chat format above."""
    segments = []
    for m in messages:
        segments.append((tokenizer.encode(f"<|{m['role']}|>\n"), False))
        if m["role"] == "assistant":
            segments.append((tokenizer.encode(m["content"]) + [tokenizer.eos_id], True))
        else:
            segments.append((tokenizer.encode(m["content"] + "\n"), False))
    return segments


def chat_prompt(messages: Sequence[dict], tokenizer, *, chat_template: bool | None = None,
                **template_kwargs) -> list[int]:
    """The ids a model sees before its next reply.

    With the tokenizer's chat template: ``apply_chat_template(messages,
    add_generation_prompt=True)``. Built-in format: BOS, the rendered messages
    and an assistant header.
    """
    if _use_template(tokenizer, chat_template):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
    ids = start_ids(tokenizer)
    for seg, _ in render_messages(messages, tokenizer):
        ids += seg
    return ids + tokenizer.encode("<|assistant|>\n")


def _prompt_segments(prompt, tokenizer) -> list[tuple[list[int], bool]]:
    """A prompt is never learned, assistant turns inside it (few-shot examples) included."""
    if isinstance(prompt, str):
        return [(tokenizer.encode(prompt), False)]
    header = (tokenizer.encode("<|assistant|>\n"), False)
    return [(seg, False) for seg, _ in render_messages(prompt, tokenizer)] + [header]


def _reply_segments(reply, tokenizer) -> list[tuple[list[int], bool]]:
    """Built-in format: the reply's tokens and EOS, supervised; later messages of a list reply in the chat format."""
    if isinstance(reply, str):
        return [(tokenizer.encode(reply) + [tokenizer.eos_id], True)]
    return [(tokenizer.encode(reply[0]["content"]) + [tokenizer.eos_id], True)] + render_messages(reply[1:], tokenizer)


def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _masked_item(ids: list[int], supervised: list[bool], max_length: int) -> dict | None:
    """``ids`` cut to ``max_length``; ``labels[t] = ids[t+1]`` where token t+1 is supervised. None if none is."""
    ids, supervised = ids[:max_length], supervised[:max_length]
    labels = [ids[t + 1] if supervised[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    if all(y == IGNORE_INDEX for y in labels):
        return None
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "attention_mask": torch.ones(len(ids), dtype=torch.long)}


def _sequence(segments, tokenizer, max_length: int) -> dict | None:
    """BOS (when the tokenizer adds one) + segments, cut to ``max_length``; labels on supervised tokens."""
    ids = start_ids(tokenizer)
    supervised = [False] * len(ids)
    for seg, sup in segments:
        ids += seg
        supervised += [sup] * len(seg)
    return _masked_item(ids, supervised, max_length)


def _template_sequence(messages, tokenizer, max_length: int, supervise_from: int, template_kwargs) -> dict | None:
    from .chat import tokenize_chat
    ids, mask = tokenize_chat(tokenizer, messages, supervise_from=supervise_from, **template_kwargs)
    return _masked_item(ids, mask, max_length)


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

    Unpacked (default): each text becomes ``BOS text EOS`` (no BOS for a
    tokenizer that adds none, e.g. Qwen's), truncated or padded
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
            stream = start_ids(tokenizer)
            for text in texts:
                stream += tokenizer.encode(text) + [tokenizer.eos_id]
            self.items = [self._item(stream[s:s + max_length], stream[s + 1:s + max_length + 1])
                          for s in range(0, len(stream), max_length)]
        else:
            self.items = []
            for text in texts:
                ids = (start_ids(tokenizer) + tokenizer.encode(text) + [tokenizer.eos_id])[:max_length]
                self.items.append(self._item(ids, ids[1:]))

    def _item(self, ids: list[int], targets: list[int]) -> dict:
        n, T = len(ids), self.max_length
        labels = targets + [IGNORE_INDEX] * (T - len(targets))
        return {"input_ids": torch.tensor(ids + [self.tokenizer.pad_id] * (T - n)),
                "labels": torch.tensor(labels),
                "attention_mask": torch.tensor([1] * n + [0] * (T - n))}


class _ChatItems(_Items):
    """Items rendered with the tokenizer's chat template when it has one (``chat_template=None``)."""

    NAME, KIND = "", ""

    def __init__(self, examples: Sequence[dict], tokenizer, max_length: int, *, chat_template: bool | None = None,
                 template_kwargs: dict | None = None):
        self.use_template = _use_template(tokenizer, chat_template)
        self.template_kwargs = dict(template_kwargs or {})
        self._collect(self.NAME, self.KIND, examples, tokenizer, max_length)


class ConversationDataset(_ChatItems):
    """SFT sequences; the loss is on the assistant's replies only.

    Each example is ``{"messages": [...]}`` or ``{"prompt", "completion"}``
    (strings, or TRL's conversational lists of messages).

    With the tokenizer's chat template (the default when it has one): the ids
    are ``apply_chat_template`` of the conversation (a string prompt becomes a
    user message and a string completion an assistant message), and the
    supervised tokens are the assistant turns — all of them for ``messages``,
    the completion's for prompt/completion — as
    :func:`~minillm_func.data.chat.tokenize_chat` defines them (content and
    end-of-turn token). ``template_kwargs`` are passed to the template
    (``enable_thinking=False``, ``date_string=...``).

    Built-in format (``chat_template=False``, or a tokenizer without one): a
    prompt string is used verbatim, messages are rendered in the module's chat
    format. The sequence is ``BOS prompt reply EOS``; the supervised positions
    are exactly the reply tokens and the EOS, shifted by one: their count is
    ``min(len(reply) + 1, room left after the prompt)``.

    Truncation keeps the start and as much of the reply as fits. An example
    left with no supervised token is dropped, counted in ``num_dropped``
    (indices in ``dropped``) and reported with a warning; if every example is
    dropped, construction fails with an error that says so. Items are not
    padded (``collate`` pads a batch to its longest item).
    """

    NAME, KIND = "ConversationDataset", "sft"

    def _make(self, ex: dict) -> dict | None:
        tok = self.tokenizer
        if self.use_template:
            if "messages" in ex:
                return _template_sequence(ex["messages"], tok, self.max_length, 0, self.template_kwargs)
            prompt = _as_messages(ex["prompt"], "user")
            return _template_sequence(prompt + _as_messages(ex["completion"], "assistant"), tok, self.max_length,
                                      len(prompt), self.template_kwargs)
        if "messages" in ex:
            segments = render_messages(ex["messages"], tok)
        else:
            segments = _prompt_segments(ex["prompt"], tok) + _reply_segments(ex["completion"], tok)
        return _sequence(segments, tok, self.max_length)


class PreferenceDataset(_ChatItems):
    """DPO pairs: the same prompt, then the chosen or the rejected reply.

    Each example is ``{"prompt", "chosen", "rejected"}``: strings, or TRL's
    conversational preference format (``prompt`` a list of messages,
    ``chosen``/``rejected`` lists of assistant messages). Items hold
    ``chosen_input_ids``, ``chosen_labels``, ``chosen_attention_mask`` and the
    same three for ``rejected``; only reply tokens and their end of turn are
    supervised.

    With the tokenizer's chat template: the prompt is rendered with
    ``add_generation_prompt=True`` and each reply appended as the template
    renders it, so ``chosen_input_ids`` equals
    ``apply_chat_template(prompt + chosen)`` and starts with the prompt's
    generation-prompt ids — except for a template that renders the prompt
    differently once a reply follows (Mistral v0.3 keeps the system prompt only
    while the last message is the user's): the ids are still the template's
    rendering of prompt + reply, and the supervised span is found in it.
    Built-in format: a prompt string verbatim, or messages rendered in the chat
    format followed by an assistant header; the reply and EOS after it.

    A pair in which either side keeps no supervised token after truncation is
    dropped and counted, as in :class:`ConversationDataset`.
    """

    NAME, KIND = "PreferenceDataset", "dpo"

    def _make(self, ex: dict) -> dict | None:
        tok = self.tokenizer
        if self.use_template:
            prompt = _as_messages(ex["prompt"], "user")
            sides = {side: _template_sequence(prompt + _as_messages(ex[side], "assistant"), tok, self.max_length,
                                              len(prompt), self.template_kwargs)
                     for side in ("chosen", "rejected")}
        else:
            prompt = _prompt_segments(ex["prompt"], tok)
            sides = {side: _sequence(prompt + _reply_segments(ex[side], tok), tok, self.max_length)
                     for side in ("chosen", "rejected")}
        if any(v is None for v in sides.values()):
            return None
        return {f"{side}_{k}": v for side, item in sides.items() for k, v in item.items()}


class PromptDataset(_ChatItems):
    """Prompts for online RL (GRPO): each item is the tokenised prompt, plus the record's other columns.

    Each example is ``{"prompt", ...}``: a string or a list of messages, and any
    further fields (``answer``, ...) that the reward functions read. Items hold
    ``prompt_input_ids`` (what the policy continues: with the tokenizer's chat template
    the prompt rendered with its generation prompt, else BOS + the prompt, or
    messages in the built-in chat format followed by an assistant header),
    ``prompt_attention_mask``, and every other field as it is (``prompt`` as the
    text given, for the reward functions). Prompts longer than ``max_length`` keep
    their last ``max_length`` tokens (the end of a prompt is what is continued).
    """

    NAME, KIND = "PromptDataset", "grpo"

    def __init__(self, examples: Sequence[dict], tokenizer, max_length: int, *, chat_template: bool | None = None,
                 template_kwargs: dict | None = None):
        examples = list(examples)
        columns = set(examples[0]) if examples and isinstance(examples[0], dict) else None
        for i, ex in enumerate(examples):  # a batch gathers each column: every record must have the same ones
            if columns is not None and isinstance(ex, dict) and set(ex) != columns:
                raise ValueError(f"{self.NAME}: example {i} has the columns {sorted(ex)}, example 0 has "
                                 f"{sorted(columns)}; give every prompt record the same columns.")
        super().__init__(examples, tokenizer, max_length, chat_template=chat_template,
                         template_kwargs=template_kwargs)

    def _make(self, ex: dict) -> dict | None:
        tok, prompt = self.tokenizer, ex["prompt"]
        if self.use_template:
            ids = list(tok.apply_chat_template(_as_messages(prompt, "user"), add_generation_prompt=True,
                                               **self.template_kwargs))
        else:
            ids = start_ids(tok) + [t for seg, _ in _prompt_segments(prompt, tok) for t in seg]
        ids = ids[-self.max_length:]
        columns = {k: v for k, v in ex.items() if k != "prompt"}
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        return {"prompt_input_ids": torch.tensor(ids), "prompt_attention_mask": torch.ones(len(ids), dtype=torch.long),
                "prompt": text, **columns}

    def lengths(self) -> list[int]:
        return [int(item["prompt_input_ids"].shape[0]) for item in self.items]


class UnpairedPreferenceDataset(ConversationDataset):
    """KTO's data: single replies marked desirable or not, ``{"prompt", "completion", "label"}``.

    Items hold the reply as an SFT item (``input_ids``, ``labels`` on the reply,
    ``attention_mask``), ``desirable`` (a 0-d bool), and the *mismatched* pair KTO
    estimates its KL reference point from: this prompt with the previous
    example's completion (``kl_input_ids``, ``kl_labels``, ``kl_attention_mask``; the
    first example takes the last one's), as TRL builds it by rotating completions.
    """

    NAME, KIND = "UnpairedPreferenceDataset", "kto"

    def __init__(self, examples: Sequence[dict], tokenizer, max_length: int, *, chat_template: bool | None = None,
                 template_kwargs: dict | None = None):
        examples = list(examples)
        for i, ex in enumerate(examples):  # before the rotation reads another example's completion
            validate_record(self.KIND, ex, f"example {i}")
        rotated = [{**ex, "_kl_completion": examples[i - 1]["completion"]} for i, ex in enumerate(examples)]
        super().__init__(rotated, tokenizer, max_length, chat_template=chat_template, template_kwargs=template_kwargs)

    def _make(self, ex: dict) -> dict | None:
        reply = super()._make({"prompt": ex["prompt"], "completion": ex["completion"]})
        kl = super()._make({"prompt": ex["prompt"], "completion": ex["_kl_completion"]})
        if reply is None or kl is None:
            return None
        return {**reply, "kl_input_ids": kl["input_ids"], "kl_labels": kl["labels"],
                "kl_attention_mask": kl["attention_mask"], "desirable": torch.tensor(bool(ex["label"]))}
