"""Tokenizers: the embedded byte-level default, and an optional trained BPE.

Both share one interface: ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``,
``encode(str) -> list[int]`` (no special tokens added) and
``decode(list[int]) -> str`` (special tokens dropped).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

__all__ = ["ByteTokenizer", "BPETokenizer", "load_tokenizer"]


class ByteTokenizer:
    """Bytes 0-255 of the UTF-8 encoding, then ``pad`` (256), ``bos`` (257), ``eos`` (258).

    Needs no file and round-trips every Python string, lone surrogates included
    (they are encoded with UTF-8's ``surrogatepass``).
    """

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:  # e.g. generation stopped inside a multi-byte character
            return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": "byte"}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


SPECIALS = ("<pad>", "<bos>", "<eos>")


class BPETokenizer:
    """Byte-level BPE on the Hugging Face ``tokenizers`` library (``pip install 'minillm_func[bpe]'``).

    Train with :meth:`train`, save with :meth:`save`, load with :meth:`load`.
    Special tokens ``<pad>``, ``<bos>``, ``<eos>`` take ids 0, 1, 2.
    """

    def __init__(self, backend):
        self._tok = backend
        self.pad_id, self.bos_id, self.eos_id = (backend.token_to_id(s) for s in SPECIALS)
        missing = [s for s, i in zip(SPECIALS, (self.pad_id, self.bos_id, self.eos_id)) if i is None]
        if missing:
            raise ValueError(
                f"BPETokenizer: the tokenizer has no {', '.join(missing)} token; this tokenizer class needs "
                f"{', '.join(SPECIALS)} (train one with BPETokenizer.train, or --tokenizer bpe:VOCAB).")
        self.vocab_size = backend.get_vocab_size()

    @staticmethod
    def _lib():
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                "BPETokenizer needs the `tokenizers` package: pip install 'minillm_func[bpe]' "
                "(or use ByteTokenizer, which needs nothing).") from e
        return tokenizers

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges on ``texts`` up to ``vocab_size`` tokens (the 256 bytes and 3 specials included)."""
        if vocab_size < 259:
            raise ValueError(f"BPETokenizer.train: vocab_size must be at least 259 (bytes + specials), got {vocab_size}.")
        tk = cls._lib()
        backend = tk.Tokenizer(tk.models.BPE())
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path) -> None:
        """Write the tokenizer as one JSON file (the ``tokenizers`` format)."""
        self._tok.save(str(path))

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        tk = cls._lib()
        if not Path(path).is_file():
            raise FileNotFoundError(f"BPETokenizer.load: no tokenizer file at {path}.")
        return cls(tk.Tokenizer.from_file(str(path)))

    def to_json(self) -> dict:
        return {"type": "bpe", "tokenizer": json.loads(self._tok.to_str())}

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(spec: dict):
    """Rebuild a tokenizer from its ``to_json()`` description (as stored in checkpoints)."""
    if spec.get("type") == "byte":
        return ByteTokenizer()
    if spec.get("type") == "bpe":
        return BPETokenizer(BPETokenizer._lib().Tokenizer.from_str(json.dumps(spec["tokenizer"])))
    raise ValueError(f"load_tokenizer: unknown tokenizer description {spec.get('type')!r}; expected 'byte' or 'bpe'.")
