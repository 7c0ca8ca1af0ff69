"""Token shards: a corpus tokenised once into flat binary files, trained on without ever loading it.

Two halves::

    mf.data.prepare(["corpus/", "more.jsonl.gz"], "bpe:8192", "tokens/")   # once: text -> shards on disk
    data = mf.data.TokenShards("tokens/", max_length=1024)                 # every run: blocks read on demand
    batches = mf.data.Batches(data, 16, seed=0)                            # deterministic, resumable, by rank

:func:`prepare` streams the inputs (memory does not grow with the corpus),
encodes documents in batches (``tokenizers``' multi-threaded ``encode_batch``
for BPE and Hugging Face tokenizers, numpy on the UTF-8 bytes for
:class:`~minillm_func.data.ByteTokenizer`), and writes shards of about
``shard_tokens`` tokens. It can be killed at any moment: run again with the same
arguments, it continues after the last complete shard and the folder ends up
byte for byte what an uninterrupted run writes. :class:`TokenShards` reads the
shards with short-lived ``numpy.memmap`` views, so neither the corpus nor the
pages it touched stay in the process's memory.

The token stream is exactly :class:`~minillm_func.data.LanguageModelingDataset`'s
packed stream, ``start_ids(tokenizer) + doc1 EOS doc2 EOS ...``: the start
token (BOS, for tokenizers that add one) once at the very beginning, then every
document as ``encode(text) + [eos_id]``. Blocks of ``TokenShards(mode="blocks")``
are therefore the items of ``LanguageModelingDataset(texts, tok, L, pack=True)``,
and training on a token folder is training on the text file it came from.

Documents, per input format (read by suffix; ``.gz`` is decompressed on the fly):

- ``.txt``: documents are separated by blank lines and stripped, as
  :func:`~minillm_func.data.read_records` reads a text file;
- ``.jsonl`` / ``.ndjson``: one JSON object per line, the document is its
  ``text_field`` (default ``"text"``), taken as it is;
- ``.parquet``, ``.arrow`` (Arrow IPC file or stream, as ``datasets`` writes it)
  and folders written by ``datasets.Dataset.save_to_disk`` (their ``train``
  split for a ``DatasetDict``): the ``text_field`` column. These need
  ``pyarrow`` / ``datasets`` (``pip install 'minillm_func[hf]'``), imported only
  when such an input is met.

A folder is read recursively, its files in sorted order of their paths;
hidden entries are ignored and other files are skipped with a warning that
names them. A record whose text is empty or blank (or null) holds no document:
it is skipped and counted in the index's ``skipped_empty``.

On-disk format (``FORMAT`` version ``VERSION``)::

    tokens/
      index.json              written last: its presence means the folder is complete
      shard-00000.bin         token ids, little-endian uint16 (vocab_size <= 65536) or uint32, no header
      shard-00000.docs.npy    int64 offsets (numpy .npy), num_documents + 1 of them: 0, end of doc 0, ..., num_tokens
      shard-00001.bin ...

A shard ends after the document that brings it to ``shard_tokens`` tokens or
more: documents never straddle shards, so document ``j`` of a shard is
``tokens[offsets[j]:offsets[j + 1]]`` -- ``encode(text) + [eos_id]``, after
the start ids for the corpus's first document -- and decoding it gives the
text back. ``index.json`` holds ``format``, ``version``, ``dtype``,
``start_ids``, ``eos_id``, ``tokenizer`` (``tokenizer.to_json()``;
:func:`~minillm_func.data.load_tokenizer` rebuilds it), one entry per shard
(``file``, ``num_tokens``, ``num_documents``, ``sha256``, ``docs_file``,
``docs_bytes``, ``docs_sha256``), the totals ``num_tokens``, ``num_documents``
and ``skipped_empty``, and ``source``: what the folder was made from (each
input's path, size and modification time; the tokenizer, as the sha256 of its
``to_json()`` or ``{"train_bpe": VOCAB, "sample_bytes": ...}``; ``text_field``;
``shard_tokens``), which a re-run must match. While ``prepare`` runs, the
folder holds ``progress.json`` instead (the same fields, the shards done so far
and the next input record to read); shards are written under hidden temporary
names, fsynced, then renamed.

Integrity: :class:`TokenShards` always checks that every file has the size the
index says (a truncated shard is caught for free), and with ``verify=True`` (the
default) it also checks every file's sha256 when it opens -- one read of the
corpus, spread over threads (about a second per GB per core with SHA-NI),
cheap next to training on it once. ``minillm-func train --data TOKENS_DIR``
verifies this way at the start of every run (each data-parallel process does;
they read through the same page cache). Pass ``verify=False`` to skip the
hashes (sizes are still checked).
"""
from __future__ import annotations

import codecs
import copy
import gzip
import hashlib
import io
import itertools
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..labels import IGNORE_INDEX
from .datasets import start_ids
from .tokenizers import (BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer, named_tokenizer,
                         parse_tokenizer_spec)

__all__ = ["prepare", "TokenShards", "read_index", "is_token_folder", "FORMAT", "VERSION",
           "DEFAULT_SHARD_TOKENS", "DEFAULT_BPE_SAMPLE_BYTES"]

FORMAT, VERSION = "minillm_func.token_shards", 1
INDEX, PROGRESS = "index.json", "progress.json"
DEFAULT_SHARD_TOKENS = 64 * 2**20   # 128 MB of uint16 per shard: few files, each quick to hash
DEFAULT_BPE_SAMPLE_BYTES = 100 * 2**20  # enough text to learn merges of vocabularies up to ~32k
_BATCH_BYTES, _BATCH_DOCS = 4 * 2**20, 4096  # one encode_batch call: enough work for every core, bounded memory
_READ_CHUNK = 2**20  # bytes of a text file decoded at a time
_CHECK_DOCS = 256  # documents on which a rebuilt tokenizers backend is compared with tokenizer.encode
_ACCEPTED = ".txt, .jsonl, .ndjson (each also .gz), .parquet, .arrow, or a datasets.save_to_disk folder"


# --------------------------------------------------------------------------- inputs


def _kind_of(path: Path) -> tuple[str | None, bool]:
    """``(kind, gzipped)`` of a file from its suffixes: text, jsonl, parquet, arrow, or None."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = os.path.splitext(name[:-3] if gz else name)[1]
    if suffix == ".txt":
        return "text", gz
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl", gz
    if suffix in (".parquet", ".arrow") and not gz:
        return suffix[1:], False
    return None, gz


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict of splits)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _sources(inputs, out: Path) -> tuple[list[tuple[Path, str, bool]], list[Path]]:
    """``([(path, kind, gzipped), ...], skipped files)`` of the inputs, folders walked in sorted order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("prepare: no inputs given; pass a file, a folder, or a list of them.")
    sources, skipped = [], []
    out = out.resolve()
    for p in inputs:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder.")
        if p.is_file():
            kind, gz = _kind_of(p)
            if kind is None:
                raise ValueError(f"{p}: prepare cannot read this file; it reads {_ACCEPTED}.")
            sources.append((p, kind, gz))
        elif _is_saved_dataset(p):
            sources.append((p, "hf", False))
        else:
            found = []  # sorted by the path below p at the end: b/c.txt comes between a.txt and c.txt
            for root, dirs, files in os.walk(p):
                root_path = Path(root)
                dirs[:] = [d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != out]
                for d in [d for d in dirs if _is_saved_dataset(root_path / d)]:
                    dirs.remove(d)  # a saved dataset is one input; its own files are not walked
                    found.append((root_path / d, "hf", False))
                for name in (f for f in files if not f.startswith(".")):
                    kind, gz = _kind_of(root_path / name)
                    found.append((root_path / name, kind, gz))
            for path, kind, gz in sorted(found, key=lambda source: source[0].relative_to(p).parts):
                if kind is None:
                    skipped.append(path)
                else:
                    sources.append((path, kind, gz))
    if not sources:
        raise ValueError(f"prepare: no corpus files in {', '.join(map(str, inputs))}; it reads {_ACCEPTED}.")
    return sources, skipped


def _fingerprint(sources) -> list[dict]:
    """Path, size and modification time of every file read: what a re-run must find unchanged."""
    files = []
    for path, kind, _ in sources:
        members = sorted(f for f in path.rglob("*") if f.is_file()) if kind == "hf" else [path]
        for f in members:
            st = f.stat()
            files.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return files


def _open_binary(path: Path, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _text_value(value, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field!r} must be a string, got {type(value).__name__} ({value!r:.60}).")
    return value


def _text_records(path: Path, gz: bool) -> Iterator[str | None]:
    """Documents of a text file: blank-line separated and stripped, exactly as ``read_records`` splits one.

    Streamed in chunks: ``\\r\\n`` is normalised across chunk ends, and the text
    is split only where a separator can be (so a huge paragraph costs linear time).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    pieces, last, pending_cr, first, offset = [], "", "", True, 0
    with _open_binary(path, gz) as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            final = not chunk
            try:
                text = decoder.decode(chunk, final)
            except UnicodeDecodeError as e:
                at = offset + e.start if not gz else "(decompressed) " + str(offset + e.start)
                raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {at}); "
                                 "re-encode it, e.g. `iconv -f latin1 -t utf-8`.") from None
            offset += len(chunk)
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            text = pending_cr + text
            pending_cr = ""
            if not final and text.endswith("\r"):  # maybe the first half of a \r\n
                text, pending_cr = text[:-1], "\r"
            if "\r" in text:
                text = text.replace("\r\n", "\n")
            if "\n\n" in text or (last == "\n" and text.startswith("\n")):
                parts = ("".join(pieces) + text).split("\n\n")
                pieces = [parts.pop()]
                for part in parts:
                    yield part.strip() or None
            else:
                pieces.append(text)
            last = text[-1:] or last
            if final:
                yield "".join(pieces).strip() or None
                return


def _jsonl_records(path: Path, gz: bool, field: str, start: int) -> Iterator[str | None]:
    """The ``field`` of each line's object (None for a blank line); lines before ``start`` are not parsed."""
    with _open_binary(path, gz) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno <= start:
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "re-encode the file.") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                yield None
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must hold "
                                 "one complete JSON object.") from None
            if not isinstance(record, dict) or field not in record:
                fields = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{where}: no {field!r} field (found: {fields or 'none'}); pretraining reads "
                                 f"{{{field!r}: ...}} records; name the text field with text_field= "
                                 "(--text-field).")
            yield _text_value(record[field], where, field)


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError(f"{path}: reading {path.suffix or 'dataset'} files needs pyarrow: "
                          "pip install 'minillm_func[hf]' (or convert the data to .jsonl).") from None
    return pyarrow


def _column_values(batches, path: Path, field: str, start: int, row: int = 0) -> Iterator[str | None]:
    """The ``field`` column of Arrow record batches (or tables) whose first row is ``row``, from row ``start`` on.

    Batches that end before ``start`` are counted, not decoded (a resumed run skips them quickly).
    """
    for batch in batches:
        n = batch.num_rows
        if row + n > start:
            names = batch.schema.names
            if field not in names:
                raise ValueError(f"{path}: no {field!r} column (columns: {', '.join(names)}); name the text "
                                 "column with text_field= (--text-field).")
            for k, value in enumerate(batch.column(field).to_pylist()[max(0, start - row):], max(row, start)):
                yield _text_value(value, f"{path} row {k}", field)
        row += n


def _parquet_records(path: Path, field: str, start: int) -> Iterator[str | None]:
    pa = _pyarrow(path)
    pf = pa.parquet.ParquetFile(str(path))
    if field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no {field!r} column (columns: {', '.join(pf.schema_arrow.names)}); name the "
                         "text column with text_field= (--text-field).")
    yield from _column_values(pf.iter_batches(batch_size=1024, columns=[field]), path, field, start)


def _arrow_records(path: Path, field: str, start: int) -> Iterator[str | None]:
    pa = _pyarrow(path)
    with pa.memory_map(str(path)) as source:  # mapped, not read: the file's pages are not kept
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # datasets writes the IPC stream format
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        yield from _column_values(batches, path, field, start)


def _saved_dataset_records(path: Path, field: str, start: int) -> Iterator[str | None]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a datasets.save_to_disk folder; reading it needs the `datasets` package: "
                          "pip install 'minillm_func[hf]'.") from None
    ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: nothing is loaded
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: the dataset has splits {list(ds)} but no 'train' split; give the split's "
                             "own folder.")
        ds = ds["train"]
    if field not in ds.column_names:
        raise ValueError(f"{path}: no {field!r} column (columns: {', '.join(ds.column_names)}); name the text "
                         "column with text_field= (--text-field).")
    ds = ds.select_columns([field]).with_format("arrow")
    step, first = 1024, start - start % 1024
    yield from _column_values((ds[s:s + step] for s in range(first, len(ds), step)), path, field, start, first)


def _records(source, field: str, start: int) -> Iterator[str | None]:
    """The records of one input from record ``start``: a text, ``""`` (an empty one) or None (no record)."""
    path, kind, gz = source
    try:
        if kind == "text":
            yield from itertools.islice(_text_records(path, gz), start, None)
        elif kind == "jsonl":
            yield from _jsonl_records(path, gz, field, start)
        elif kind == "parquet":
            yield from _parquet_records(path, field, start)
        elif kind == "arrow":
            yield from _arrow_records(path, field, start)
        else:
            yield from _saved_dataset_records(path, field, start)
    except (EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: damaged gzip file ({e}); decompress it with `gzip -t` to check, "
                         "and replace it.") from None


class _Documents:
    """Batches of documents from record ``start = (input, record)`` on; counts the empty records it passes.

    Each batch is ``(texts, positions, empties)``: ``positions[j]`` is the
    ``(input, record)`` of text ``j`` and ``empties[j]`` the empty records seen
    before it in this pass -- what a progress file records to resume after it.
    """

    def __init__(self, sources, field: str, start: tuple[int, int]):
        self.sources, self.field, self.start = sources, field, start
        self.empty = 0

    def __iter__(self) -> Iterator[tuple[int, int, str]]:
        first, record = self.start
        for i in range(first, len(self.sources)):
            r0 = record if i == first else 0
            for r, text in enumerate(_records(self.sources[i], self.field, r0), r0):
                if text is None:
                    continue
                if not text.strip():
                    self.empty += 1
                    continue
                yield i, r, text

    def batches(self) -> Iterator[tuple[list[str], list[tuple[int, int]], list[int]]]:
        texts, positions, empties, size = [], [], [], 0
        for i, r, text in self:
            texts.append(text)
            positions.append((i, r))
            empties.append(self.empty)
            size += len(text)
            if size >= _BATCH_BYTES or len(texts) >= _BATCH_DOCS:
                yield texts, positions, empties
                texts, positions, empties, size = [], [], [], 0
        if texts:
            yield texts, positions, empties


# --------------------------------------------------------------------------- encoding


def _canonical(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, ensure_ascii=False)


class _Encoder:
    """Texts -> ``(ids, lengths, nbytes)``: every document as ``encode(text) + [eos_id]``, a batch at a time.

    ``ids`` come in the shards' ``dtype``; an id it cannot hold is an error, never a silent wrap-around.

    ByteTokenizer: the UTF-8 bytes of the whole batch through one numpy buffer.
    BPE / Hugging Face tokenizers: ``tokenizers``' ``encode_batch`` (Rust threads)
    on a backend rebuilt from ``to_json()``; its ids are compared with
    ``tokenizer.encode`` on the first batch, and a tokenizer that disagrees is
    encoded text by text instead (with a warning). Anything else: ``encode`` per text.
    """

    def __init__(self, tokenizer, dtype: np.dtype):
        self.tokenizer, self.eos, self.dtype = tokenizer, int(tokenizer.eos_id), dtype
        self.bytes = isinstance(tokenizer, ByteTokenizer)
        self.backend = None if self.bytes else _batch_backend(tokenizer)
        self.checked = False

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        if self.bytes:
            blobs = [t.encode("utf-8", errors="surrogatepass") for t in texts]
            lengths = np.fromiter((len(b) + 1 for b in blobs), np.int64, len(blobs))
            ids = np.empty(int(lengths.sum()), self.dtype)
            s = 0
            for b in blobs:  # one C copy per document; the byte values are the ids
                ids[s:s + len(b)] = np.frombuffer(b, np.uint8)
                s += len(b)
                ids[s] = self.eos
                s += 1
            return ids, lengths, len(ids) - len(blobs)
        nbytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
        if self.backend is not None:
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            lists = [e.ids for e in encode(texts, add_special_tokens=False)]
            if not self.checked:  # a few documents suffice to catch a backend that differs
                self.checked = True
                if lists[:_CHECK_DOCS] != [list(self.tokenizer.encode(t)) for t in texts[:_CHECK_DOCS]]:
                    warnings.warn(f"prepare: {self.tokenizer!r} does not encode as its tokenizer.json does; "
                                  "encoding text by text (slower).", stacklevel=3)
                    self.backend = None
        if self.backend is None:
            lists = [self.tokenizer.encode(t) for t in texts]
        lengths = np.fromiter((len(x) + 1 for x in lists), np.int64, len(lists))
        eos = (self.eos,)
        ids = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, eos) for x in lists), np.int64,
                          int(lengths.sum()))
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise ValueError(f"prepare: {self.tokenizer!r} produced id {bad}, outside {self.dtype.name} (chosen from "
                             f"its vocab_size {self.tokenizer.vocab_size}); vocab_size must exceed every id it makes.")
        return ids.astype(self.dtype), lengths, nbytes


def _batch_backend(tokenizer):
    """A ``tokenizers.Tokenizer`` equal to ``tokenizer``'s (rebuilt from ``to_json()``), or None."""
    if not isinstance(tokenizer, (BPETokenizer, HFTokenizer)):
        return None
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - both classes need it
        return None
    spec = tokenizer.to_json()
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec["tokenizer"]))
    backend.no_truncation()
    backend.no_padding()
    if spec["type"] == "hf":  # HFTokenizer's rule: special-token strings in a text are split when the folder says so
        backend.encode_special_tokens = bool(spec.get("config", {}).get("split_special_tokens", False))
    return backend


# --------------------------------------------------------------------------- writing


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, value: dict) -> None:
    _write_durably(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.bin"


def _docs_name(k: int) -> str:
    return f"shard-{k:05d}.docs.npy"


class _ShardWriter:
    """Appends encoded documents to the open shard (a hidden temporary file) and closes it into place."""

    def __init__(self, out: Path, dtype: np.dtype, k: int):
        self.out, self.dtype, self.k = out, dtype, k
        self.file = None
        self.num_tokens = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if self.file is None:
            self.tmp = self.out / f".{_shard_name(self.k)}.tmp"
            self.file, self.hash, self.lengths, self.num_tokens = open(self.tmp, "wb"), hashlib.sha256(), [], 0
        self.file.write(ids)  # ids: contiguous, already in the shard's dtype
        self.hash.update(ids)
        self.num_tokens += len(ids)
        self.lengths.append(lengths)

    def close(self) -> dict:
        """Fsync and rename the shard and its document offsets; return its index entry."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        offsets = np.zeros(sum(len(x) for x in self.lengths) + 1, dtype="<i8")
        np.cumsum(np.concatenate(self.lengths), out=offsets[1:])
        buffer = io.BytesIO()
        np.save(buffer, offsets)
        docs = buffer.getvalue()
        _write_durably(self.out / _docs_name(self.k), docs)
        os.replace(self.tmp, self.out / _shard_name(self.k))
        _fsync_dir(self.out)
        entry = {"file": _shard_name(self.k), "num_tokens": self.num_tokens, "num_documents": len(offsets) - 1,
                 "sha256": self.hash.hexdigest(), "docs_file": _docs_name(self.k), "docs_bytes": len(docs),
                 "docs_sha256": hashlib.sha256(docs).hexdigest()}
        self.k, self.file, self.num_tokens = self.k + 1, None, 0
        return entry


# --------------------------------------------------------------------------- prepare


def _tokenizer_source(tokenizer, bpe_sample_bytes: int):
    """``(tokenizer or None, what the index records as its source)``; None: a BPE still to be trained."""
    if isinstance(tokenizer, (str, os.PathLike)):
        spec = str(tokenizer)
        try:
            kind, arg = parse_tokenizer_spec(spec)
        except ValueError as e:
            raise ValueError(f"prepare: tokenizer {e} (or pass a tokenizer object)") from None
        if kind == "bpe":
            return None, {"train_bpe": arg, "sample_bytes": bpe_sample_bytes}
        tokenizer = named_tokenizer(kind, arg)
    for name in ("encode", "eos_id", "vocab_size", "to_json"):
        if not hasattr(tokenizer, name):
            raise TypeError(f"prepare: the tokenizer must have {name} (like mf.ByteTokenizer()), "
                            f"got {type(tokenizer).__name__}.")
    spec = tokenizer.to_json()
    return tokenizer, {"sha256": hashlib.sha256(_canonical(spec).encode("utf-8")).hexdigest()}


def _train_bpe(sources, field: str, vocab: int, limit: int) -> BPETokenizer:
    """A BPE trained on the first ``limit`` bytes of the corpus's documents (bounded memory and time)."""
    def sample():
        seen = 0
        for _, _, text in _Documents(sources, field, (0, 0)):
            yield text
            seen += len(text.encode("utf-8", errors="surrogatepass"))
            if seen >= limit:
                return
    return BPETokenizer.train(sample(), vocab_size=vocab)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); delete {path.parent} and run prepare again.") from None


_SOURCE_WORDS = {"inputs": "other inputs (or inputs changed since: size or modification time)",
                 "tokenizer": "another tokenizer", "text_field": "another text_field",
                 "shard_tokens": "another shard_tokens"}


def _check_source(out: Path, found: dict, source: dict) -> None:
    if found.get("source") != source:
        differ = [w for k, w in _SOURCE_WORDS.items() if (found.get("source") or {}).get(k) != source[k]]
        raise ValueError(f"{out} holds token shards prepared with {' and '.join(differ) or 'other settings'}; "
                         f"prepare into another folder, or delete {out} to prepare it again.")


def prepare(inputs, tokenizer, out_dir, *, text_field: str = "text", shard_tokens: int = DEFAULT_SHARD_TOKENS,
            bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES, progress: bool = True,
            on_shard: Callable[[dict], None] | None = None) -> Path:
    """Tokenise a corpus once into token shards in ``out_dir`` (see the module docstring); returns ``out_dir``.

    Args:
      inputs: a file, a folder (read recursively), or a list of them: ``.txt``,
        ``.jsonl``/``.ndjson`` (also gzipped), ``.parquet``, ``.arrow`` and
        ``datasets.save_to_disk`` folders.
      tokenizer: a tokenizer object (``ByteTokenizer()``, a ``BPETokenizer``,
        an ``HFTokenizer``, ...), or ``"byte"``, a ``tokenizer.json`` path, a
        Hugging Face folder, or ``"bpe:VOCAB"``: a byte-level BPE of ``VOCAB``
        tokens trained on the first ``bpe_sample_bytes`` of the corpus's text
        (in input order; a bounded sample keeps training's memory and time
        independent of the corpus size). The trained BPE is kept in the folder:
        a resumed run uses it rather than training again.
      text_field: the field (JSON Lines) or column (tables) holding the text.
      shard_tokens: a shard is closed after the document that brings it to this
        many tokens (a document is never split).
      progress: a tqdm bar of the input text read, in bytes (MB/s).
      on_shard: called with each shard's index entry once the shard is on disk
        and recorded as done (to log it, upload it, or stop a test run there).

    Re-running with the same arguments continues an interrupted run after its
    last complete shard, and is a no-op on a finished folder; the result is byte
    for byte that of one uninterrupted run. A folder prepared from other inputs
    or settings, or one holding other files, is refused.

    Example::

        >>> mf.data.prepare("corpus/", mf.ByteTokenizer(), "tokens/", progress=False)
        PosixPath('tokens')
    """
    out = Path(out_dir)
    if not isinstance(shard_tokens, int) or isinstance(shard_tokens, bool) or shard_tokens < 1:
        raise ValueError(f"prepare: shard_tokens must be a positive int, got {shard_tokens!r}.")
    if not isinstance(bpe_sample_bytes, int) or bpe_sample_bytes < 1:
        raise ValueError(f"prepare: bpe_sample_bytes must be a positive int, got {bpe_sample_bytes!r}.")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"prepare: text_field must name a field, got {text_field!r}.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"prepare: {out} is a file; give a folder to write the shards to.")
    sources, skipped = _sources(inputs, out)
    tokenizer, tokenizer_source = _tokenizer_source(tokenizer, bpe_sample_bytes)
    source = {"inputs": _fingerprint(sources), "tokenizer": tokenizer_source, "text_field": text_field,
              "shard_tokens": shard_tokens}

    found = None
    if (out / INDEX).is_file():
        _check_source(out, _read_json(out / INDEX), source)
        (out / PROGRESS).unlink(missing_ok=True)  # killed between writing the index and removing it
        return out
    if (out / PROGRESS).is_file():
        found = _read_json(out / PROGRESS)
        _check_source(out, found, source)
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"prepare: {out} already holds other files and no token shards; choose a new or "
                         "empty folder.")
    if skipped:
        names = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        warnings.warn(f"prepare: skipped {len(skipped)} file(s) that are not corpus files ({names}); it reads "
                      f"{_ACCEPTED}.", stacklevel=2)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer is None:  # "bpe:VOCAB": trained once; a resumed run takes the one progress.json keeps
        tokenizer = (load_tokenizer(found["tokenizer"]) if found is not None else
                     _train_bpe(sources, text_field, tokenizer_source["train_bpe"], bpe_sample_bytes))
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 2**16 else np.dtype("<u4")
    header = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "start_ids": start_ids(tokenizer),
              "eos_id": int(tokenizer.eos_id),
              "tokenizer": found["tokenizer"] if found is not None else tokenizer.to_json(),  # as first written
              "source": source}
    shards = list(found["shards"]) if found else []
    position = tuple(found["next"]) if found else (0, 0)
    empty_before = found["skipped_empty"] if found else 0
    done = {s["file"] for s in shards} | {s["docs_file"] for s in shards}
    for p in out.iterdir():  # a shard being written when the run stopped, or one written but not recorded
        if (p.name.startswith(".") and p.name.endswith(".tmp")) or (p.name.startswith("shard-") and p.name not in done):
            p.unlink()
    if found is None:
        _write_json(out / PROGRESS, {**header, "shards": [], "next": [0, 0], "skipped_empty": 0})

    encode = _Encoder(tokenizer, dtype)
    writer = _ShardWriter(out, dtype, len(shards))
    documents = _Documents(sources, text_field, position)
    first = not shards
    bar = _progress_bar(progress)

    def close(next_position, skipped_empty):
        shards.append(writer.close())
        _write_json(out / PROGRESS, {**header, "shards": shards, "next": list(next_position),
                                     "skipped_empty": skipped_empty})
        if on_shard is not None:
            on_shard(shards[-1])

    try:
        for texts, positions, empties in documents.batches():
            ids, lengths, nbytes = encode(texts)
            if first:  # the corpus's start token, once, in front of its first document
                ids = np.concatenate([np.asarray(header["start_ids"], dtype), ids])
                lengths[0] += len(header["start_ids"])
                first = False
            ends = np.cumsum(lengths)
            i, base = 0, 0
            while i < len(lengths):
                # the first document at which the open shard reaches shard_tokens
                j = int(np.searchsorted(ends, base + shard_tokens - writer.num_tokens, side="left"))
                if j >= len(lengths):
                    writer.add(ids[base:], lengths[i:])
                    break
                writer.add(ids[base:ends[j]], lengths[i:j + 1])
                close((positions[j][0], positions[j][1] + 1), empty_before + empties[j])
                i, base = j + 1, int(ends[j])
            bar.update(nbytes)
            bar.set_postfix(shards=len(shards), tokens=f"{sum(s['num_tokens'] for s in shards) + writer.num_tokens:,}")
        if writer.num_tokens:
            close((len(sources), 0), empty_before + documents.empty)
    finally:
        bar.close()
        if writer.file is not None:
            writer.file.close()
    if not shards:  # nothing was written: leave no half-made token folder behind
        (out / PROGRESS).unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise ValueError(f"prepare: the inputs hold no documents (only empty or blank texts); nothing to "
                         "tokenise: check --data and the text field.")
    index = {**header, "num_tokens": sum(s["num_tokens"] for s in shards),
             "num_documents": sum(s["num_documents"] for s in shards),
             "skipped_empty": empty_before + documents.empty, "shards": shards}
    _write_json(out / INDEX, index)  # written last: the folder is complete from here on
    (out / PROGRESS).unlink()
    _fsync_dir(out)
    return out


def _progress_bar(enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(desc="prepare", unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


# --------------------------------------------------------------------------- reading


def is_token_folder(path) -> bool:
    """Whether ``path`` is a folder :func:`prepare` wrote to (finished, unfinished, or damaged)."""
    p = Path(path)
    return p.is_dir() and ((p / INDEX).is_file() or (p / PROGRESS).is_file() or any(p.glob("shard-*.bin")))


def read_index(path) -> dict:
    """The ``index.json`` of a finished token folder; a one-line error says what is wrong with any other path."""
    p = Path(path)
    make = f"make one with `minillm-func prepare --data FILES --out {p}` (mf.data.prepare)"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such token folder; {make}.")
    if not p.is_dir():
        raise ValueError(f"{p} is a file, not a token folder; {make}.")
    if not (p / INDEX).is_file():
        if (p / PROGRESS).is_file():
            done = len(_read_json(p / PROGRESS).get("shards", []))
            raise ValueError(f"{p}: prepare has not finished ({done} shard(s) written); run the same prepare "
                             "command again to complete it.")
        if any(p.glob("shard-*.bin")):
            raise ValueError(f"{p} holds shards but no {INDEX}: the token folder is damaged; delete it and run "
                             "prepare again.")
        raise ValueError(f"{p} holds no {INDEX}: it is not a token folder; {make}.")
    index = _read_json(p / INDEX)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{p / INDEX} is {index.get('format')!r} version {index.get('version')!r}, and this "
                         f"version of minillm_func reads {FORMAT!r} version {VERSION}; prepare the corpus again.")
    return index


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buffer = bytearray(2**20)  # per thread: verifying adds a few MB to the process, whatever the corpus
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])  # releases the GIL: files hash in parallel threads
    return h.hexdigest()


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit hash of ``x`` (a counter-based random number)."""
    m = 2**64 - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


class TokenShards:
    """Training items read straight from a token folder made by :func:`prepare`.

    A map-style dataset (``len``, ``[i]``, ``.tokenizer``), so
    :class:`~minillm_func.data.Batches` drives it: deterministic order from the
    seed, exact resume from ``position``, each data-parallel rank reading only
    its own slice of every global batch. Items are
    ``{"input_ids", "labels", "attention_mask"}``, LongTensors of ``max_length``,
    labels aligned (``labels[t]`` is the token after input ``t``; IGNORE_INDEX
    where there is none).

    ``mode="blocks"`` (default): the stream cut into ``ceil(num_tokens /
    max_length)`` consecutive blocks; each block's last label is the next
    block's first token, and only the last block is padded (``pad_id``,
    IGNORE_INDEX, mask 0). Every token is an input exactly once per epoch, and
    the items equal ``LanguageModelingDataset(texts, tok, max_length, pack=True)``'s.
    A block may straddle shards.

    ``mode="windows"`` (nanoGPT's sampling): item ``i`` of epoch ``e`` is the
    window of ``max_length + 1`` tokens at an offset hashed from
    ``(seed, e, i)`` -- new windows every epoch, the same ones on every run and
    every rank. ``windows_per_epoch`` defaults to ``(num_tokens - 1) //
    max_length`` (an epoch reads about the corpus once). Needs ``num_tokens >
    max_length``.

    Memory: each item reads its tokens through a ``numpy.memmap`` of just that
    range, dropped once copied (nanoGPT re-creates its memmap per batch for the
    same reason): a long-lived map of a large corpus would count every page it
    touched as the process's resident memory.

    ``verify``: check every file's sha256 against the index when opening (see the
    module docstring); sizes are checked always. ``tokenizer``: the tokenizer
    the caller trains with, which must be the one the shards were made with
    (compared by ``to_json()``); by default it is rebuilt from the index.
    """

    def __init__(self, path, max_length: int, *, mode: str = "blocks", seed: int = 0, verify: bool = True,
                 tokenizer=None, windows_per_epoch: int | None = None):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"TokenShards: max_length must be a positive int, got {max_length!r}.")
        if mode not in ("blocks", "windows"):
            raise ValueError(f"TokenShards: mode must be 'blocks' (every token once per epoch) or 'windows' "
                             f"(random windows), got {mode!r}.")
        self.path = Path(path)
        self.index = read_index(self.path)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.shards = self.index["shards"]
        self._check_files(verify)
        if tokenizer is None:
            tokenizer = load_tokenizer(self.index["tokenizer"])
        elif _canonical(getattr(tokenizer, "to_json", dict)()) != _canonical(self.index["tokenizer"]):
            made = load_tokenizer(self.index["tokenizer"]) if self.index["tokenizer"].get("type") in (
                "byte", "bpe", "hf") else self.index["tokenizer"].get("type")
            raise ValueError(f"{self.path} was tokenised with {made!r}, not with the tokenizer given ({tokenizer!r}); "
                             "train with the folder's own tokenizer, or prepare the corpus again with this one.")
        self.tokenizer = tokenizer
        self.max_length, self.mode, self.seed, self.epoch = max_length, mode, seed, 0
        self._files = [str(self.path / s["file"]) for s in self.shards]
        self._starts = np.zeros(len(self.shards) + 1, np.int64)
        np.cumsum([s["num_tokens"] for s in self.shards], out=self._starts[1:])
        self.num_tokens = int(self._starts[-1])
        self.num_documents = int(self.index["num_documents"])
        if mode == "windows":
            if self.num_tokens <= max_length:
                raise ValueError(f"TokenShards: {self.path} holds {self.num_tokens} tokens, too few for a window of "
                                 f"max_length + 1 = {max_length + 1}; lower max_length or use mode='blocks'.")
            default = max(1, (self.num_tokens - 1) // max_length)
            self.windows_per_epoch = default if windows_per_epoch is None else windows_per_epoch
            if not isinstance(self.windows_per_epoch, int) or self.windows_per_epoch < 1:
                raise ValueError(f"TokenShards: windows_per_epoch must be a positive int, got {windows_per_epoch!r}.")
        elif windows_per_epoch is not None:
            raise ValueError("TokenShards: windows_per_epoch applies to mode='windows'; drop it for blocks.")

    def _check_files(self, verify: bool) -> None:
        again = f"delete {self.path} and run prepare again (same arguments) to rebuild it"
        files = []
        for s in self.shards:
            for name, size in ((s["file"], s["num_tokens"] * self.dtype.itemsize), (s["docs_file"], s["docs_bytes"])):
                f = self.path / name
                if not f.is_file():
                    raise ValueError(f"{f} is missing; the token folder is incomplete: {again}.")
                actual = f.stat().st_size
                if actual != size:
                    raise ValueError(f"{f} holds {actual} bytes, and {INDEX} says {size}: the file was truncated or "
                                     f"replaced; {again}.")
            files += [(self.path / s["file"], s["sha256"]), (self.path / s["docs_file"], s["docs_sha256"])]
        if verify:
            with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
                digests = list(pool.map(_sha256_file, [f for f, _ in files]))
            for (f, expected), digest in zip(files, digests):
                if digest != expected:
                    raise ValueError(f"{f} is corrupted (its sha256 differs from the one in {INDEX}); {again}.")

    # ------------------------------------------------------------------ the stream

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the whole stream as int64, read across shard boundaries."""
        start, stop = max(0, start), min(stop, self.num_tokens)
        out = np.empty(max(0, stop - start), np.int64)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo, hi = pos - self._starts[k], min(stop, self._starts[k + 1]) - self._starts[k]
            view = np.memmap(self._files[k], dtype=self.dtype, mode="r",
                             offset=int(lo) * self.dtype.itemsize, shape=(int(hi - lo),))
            out[pos - start:pos - start + len(view)] = view
            del view  # unmapped now: the pages it touched leave this process's resident memory
            pos += int(hi - lo)
            k += 1
        return out

    def documents(self, shard: int) -> np.ndarray:
        """Document offsets of shard ``shard``: document ``j`` is its tokens ``[offsets[j], offsets[j + 1])``."""
        return np.load(self.path / self.shards[shard]["docs_file"])

    # ------------------------------------------------------------------ map-style dataset

    def __len__(self) -> int:
        if self.mode == "windows":
            return self.windows_per_epoch
        return -(-self.num_tokens // self.max_length)

    def for_epoch(self, epoch: int) -> "TokenShards":
        """The dataset as seen in ``epoch`` (the windows of that epoch; blocks do not change). ``Batches`` calls it."""
        if self.mode == "blocks" or epoch == self.epoch:
            return self
        view = copy.copy(self)
        view.epoch = epoch
        return view

    def window_offset(self, i: int, epoch: int | None = None) -> int:
        """Where window ``i`` of ``epoch`` starts in the stream: a hash of ``(seed, epoch, i)``."""
        epoch = self.epoch if epoch is None else epoch
        key = _mix64(_mix64(_mix64(self.seed) ^ epoch) ^ i)
        return key % (self.num_tokens - self.max_length)

    def __getitem__(self, i: int) -> dict:
        n, L = len(self), self.max_length
        if not -n <= i < n:
            raise IndexError(f"TokenShards: index {i} out of range for {n} items.")
        i = int(i) % n  # a Python int: numpy's int64 would overflow in the 64-bit hash
        start = self.window_offset(i) if self.mode == "windows" else i * L
        x = self.tokens(start, start + L + 1)  # L inputs and the token after them (absent at the very end)
        m = min(L, len(x))
        ids = np.full(L, self.tokenizer.pad_id, np.int64)
        labels = np.full(L, IGNORE_INDEX, np.int64)
        mask = np.zeros(L, np.int64)
        ids[:m], labels[:len(x) - 1], mask[:m] = x[:m], x[1:], 1
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(mask)}

    def lengths(self) -> np.ndarray:
        """Unpadded length of every item (all ``max_length`` but the last block)."""
        out = np.full(len(self), self.max_length, np.int64)
        if self.mode == "blocks":
            out[-1] = self.num_tokens - (len(self) - 1) * self.max_length
        return out

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.path)!r}, max_length={self.max_length}, mode={self.mode!r}: "
                f"{self.num_tokens:,} tokens, {self.num_documents:,} documents, {len(self.shards)} shards, "
                f"{self.dtype.name})")
