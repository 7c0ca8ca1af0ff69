"""Files on disk -> records -> datasets.

Formats, detected from the content (the suffix only breaks ties):

- plain text (``.txt``, or anything that is not JSON Lines): pretraining text;
  documents are separated by blank lines;
- JSON Lines, one object per line, whose fields say the kind:
  ``{"text"}`` (pretrain), ``{"prompt", "completion"}`` or ``{"messages"}``
  (sft), ``{"prompt", "chosen", "rejected"}`` (dpo);
- a Hugging Face ``datasets.Dataset`` (or a folder one can load) with those
  columns, when the ``datasets`` package is installed -- never required.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..stages import KINDS
from .datasets import (RECORD_FIELDS, ConversationDataset, LanguageModelingDataset, PreferenceDataset,
                       PromptDataset, UnpairedPreferenceDataset, validate_record)
from .packing import PackedDataset

__all__ = ["read_records", "detect_kind", "load_dataset", "records_from_hf", "KINDS"]



def detect_kind(record, where: str) -> str:
    """The record kind from its fields."""
    if isinstance(record, str):
        return "pretrain"
    if isinstance(record, dict):
        if "chosen" in record or "rejected" in record:
            return "dpo"
        if isinstance(record.get("label"), bool) and "completion" in record:  # KTO's desirable / not
            return "kto"
        if "messages" in record or "completion" in record:
            return "sft"
        if "text" in record:
            return "pretrain"
        if "prompt" in record:  # a prompt alone (with the columns rewards read): online RL
            return "grpo"
        fields = ", ".join(map(repr, record)) or "none"
    else:
        fields = f"a {type(record).__name__}, not an object"
    raise ValueError(
        f"{where}: cannot tell what this record is for (fields: {fields}). Expected one of: "
        + "; ".join(f"{k}: {v}" for k, v in RECORD_FIELDS.items()) + ".")


def _read_text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file.")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a .jsonl or .txt file (or install `datasets` to load a folder).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); re-encode it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed.{path.suffix.lstrip('.') or 'txt'}`.") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; put one record per line (or plain text) in it.")
    return text.removeprefix("\ufeff")


def _looks_like_jsonl(path: Path, text: str) -> bool:
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return True
    if path.suffix == ".txt":
        return False
    first = next(line for line in text.splitlines() if line.strip()).strip()
    if not first.startswith("{"):
        return False
    try:
        json.loads(first)
        return True
    except json.JSONDecodeError:
        return False


def read_records(path) -> tuple[str, list]:
    """``(kind, records)`` from a JSON Lines or text file; every record validated, errors name file and line."""
    path = Path(path)
    text = _read_text(path)
    if not _looks_like_jsonl(path, text):
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
        return "pretrain", [{"text": d} for d in docs]
    records, wheres = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must hold one complete "
                "JSON object.") from None
        wheres.append(where)
    kind = detect_kind(records[0], wheres[0])
    for record, where in zip(records, wheres):
        validate_record(kind, record, where)
    return kind, records


def records_from_hf(dataset) -> list[dict]:
    """Rows of a Hugging Face ``datasets.Dataset`` (or anything iterable over dict rows with ``column_names``)."""
    if not hasattr(dataset, "column_names"):
        raise TypeError(f"records_from_hf: expected a datasets.Dataset, got {type(dataset).__name__}.")
    return [dict(row) for row in dataset]


def _load_hf_folder(path: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path} is a folder; loading a dataset folder needs the `datasets` package (pip install datasets). "
            "Without it, give a .jsonl or .txt file.") from None
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: the dataset has splits {list(ds)} but no 'train' split.")
        ds = ds["train"]
    return records_from_hf(ds)


def load_dataset(source, tokenizer, max_length: int, *, kind: str | None = None, pack: bool | None = None):
    """A dataset from a file path, a dataset folder, a ``datasets.Dataset`` or a list of records.

    ``kind`` ("pretrain", "sft", "dpo", "orpo" (DPO's pairs), "kto" or "grpo") is what the caller will train; the
    records' own kind must match it. ``pack``: for pretraining, documents joined into
    full blocks (the default); for SFT and preference pairs, padding-free packing
    (default off): a :class:`~minillm_func.data.packing.PackedDataset` whose rows hold
    several whole examples, ``max_length`` tokens per SFT row and ``2 * max_length`` per
    row of pairs (``max_length`` stays the limit of each sequence).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"load_dataset: kind must be one of {KINDS}, got {kind!r}.")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            records = _load_hf_folder(path)
            found = detect_kind(records[0], f"{path} row 0") if records else None
        else:
            found, records = read_records(path)
        name = str(path)
    else:
        records = records_from_hf(source) if hasattr(source, "column_names") else list(source)
        name = "records"
        found = detect_kind(records[0], f"{name} row 0") if records else None
    if not records:
        raise ValueError(f"{name}: no records.")
    if kind == "orpo":  # ORPO trains on DPO's pairs
        kind = "dpo"
    if kind == "kto" and found == "sft" and "label" in records[0]:  # a KTO record whose label is not a bool
        validate_record("kto", records[0], f"{name} row 0")
    if kind is not None and found != kind:
        raise ValueError(
            f"{name} holds {found} records ({RECORD_FIELDS[found]}), but {kind} training needs "
            f"{RECORD_FIELDS[kind]}" + (" or a plain .txt file." if kind == "pretrain" else "."))
    kind = found
    if kind == "pretrain":
        texts = [r if isinstance(r, str) else r.get("text") for r in records]
        return LanguageModelingDataset(texts, tokenizer, max_length, pack=True if pack is None else pack)
    if pack and kind not in ("sft", "dpo"):
        raise ValueError(f"load_dataset: pack=True packs pretraining, SFT and preference-pair data; {kind} records "
                         "are not packed: drop pack.")
    if kind == "sft":
        data = ConversationDataset(records, tokenizer, max_length)
        return PackedDataset(data) if pack else data
    if kind == "grpo":
        return PromptDataset(records, tokenizer, max_length)
    if kind == "kto":
        return UnpairedPreferenceDataset(records, tokenizer, max_length)
    data = PreferenceDataset(records, tokenizer, max_length)
    return PackedDataset(data) if pack else data
