"""Tokenizers: the embedded byte-level default, a trained BPE, and any Hugging Face folder's tokenizer.

All share one interface: ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``,
``eos_ids`` (every id that ends a generation), ``add_bos_token`` (whether a
document starts with ``bos_id``), ``encode(str) -> list[int]`` (no special
tokens added), ``decode(list[int]) -> str`` (special tokens dropped),
``to_json()`` (rebuilt by :func:`load_tokenizer`) and ``save_pretrained(folder)``
(a folder ``transformers.AutoTokenizer.from_pretrained`` loads offline, with
the same ids).

Only :class:`HFTokenizer` may have a chat template (``chat_template``,
``apply_chat_template``, ``render_chat``); the datasets use the built-in chat
format for the other two.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["ByteTokenizer", "BPETokenizer", "HFTokenizer", "load_tokenizer", "parse_tokenizer_spec", "named_tokenizer"]


def _tokenizers_lib():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "this tokenizer needs the `tokenizers` package: pip install 'minillm_func[bpe]' "
            "(or use ByteTokenizer, which needs nothing).") from e
    return tokenizers


def _write_folder(folder, backend, config: dict, chat_template: str | None = None) -> Path:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja), as transformers 5 lays a folder out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {k: v for k, v in config.items() if k != "chat_template"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return folder


def _own_config(backend, specials: dict, *, split_special_tokens: bool) -> dict:
    """The tokenizer_config.json of our own tokenizers (tokenizer.json's post-processor adds the BOS)."""
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(backend.get_added_tokens_decoder().items())}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
            **specials, "unk_token": None, "clean_up_tokenization_spaces": False,
            "split_special_tokens": split_special_tokens}


def _bos_post_processor(tk, bos: str, bos_id: int):
    return tk.processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                            special_tokens=[(bos, bos_id)])


class ByteTokenizer:
    """Bytes 0-255 of the UTF-8 encoding, then ``pad`` (256), ``bos`` (257), ``eos`` (258).

    Needs no file and round-trips every Python string, lone surrogates included
    (they are encoded with UTF-8's ``surrogatepass``).
    """

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258
    unk_id = None
    eos_ids = (258,)
    add_bos_token = True
    chat_template = None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of ``text``; ``add_special_tokens=True`` puts BOS in front (as the exported folder does)."""
        ids = list(text.encode("utf-8", errors="surrogatepass"))
        return [self.bos_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:  # e.g. generation stopped inside a multi-byte character
            return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": "byte"}

    def backend(self):
        """An equivalent ``tokenizers.Tokenizer``: byte b -> id b, ``<pad>``/``<bos>``/``<eos>`` -> 256/257/258.

        A BPE model with no merges over the 256 byte-level symbols, after a
        byte-level pre-tokenizer that maps every UTF-8 byte to its symbol, so
        ``encode`` gives the same ids as :meth:`encode` for every string
        ``tokenizers`` accepts. The one exception is a string holding a lone
        surrogate (e.g. ``"\\ud800"``): it is not valid Unicode, Rust (hence
        ``tokenizers`` and ``transformers``) refuses it, while :meth:`encode`
        writes it with ``surrogatepass``. The special tokens are matched only
        if ``encode_special_tokens`` is off; the saved folder sets
        ``split_special_tokens`` so that ``"<eos>"`` in a text stays five bytes,
        as here.
        """
        tk = _tokenizers_lib()
        symbols = tk.pre_tokenizers.ByteLevel.alphabet()
        byte_to_symbol = _bytes_to_unicode()
        if set(byte_to_symbol.values()) != set(symbols):  # pragma: no cover - a change in `tokenizers`
            raise RuntimeError("tokenizers' ByteLevel alphabet is not GPT-2's byte map; ByteTokenizer cannot export.")
        vocab = {byte_to_symbol[b]: b for b in range(256)}
        backend = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = tk.decoders.ByteLevel()
        backend.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
        backend.post_processor = _bos_post_processor(tk, "<bos>", self.bos_id)
        backend.encode_special_tokens = True
        return backend

    def save_pretrained(self, folder) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained(folder)`` loads it.

        ``tokenizer(text)`` then gives ``[bos_id] + encode(text)`` (our datasets'
        start) and ``tokenizer(text, add_special_tokens=False)`` gives ``encode(text)``.
        """
        specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        backend = self.backend()
        return _write_folder(folder, backend, _own_config(backend, specials, split_special_tokens=True))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


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
        self.unk_id = None
        self.eos_ids = (self.eos_id,)
        self.add_bos_token = True
        self.chat_template = None

    @staticmethod
    def _lib():
        return _tokenizers_lib()

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

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; ``add_special_tokens=True`` puts BOS in front (as the exported folder does)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_special_tokens else ids

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

    def save_pretrained(self, folder) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained(folder)`` loads it.

        The saved ``tokenizer.json`` adds ``<bos>`` in front of a text when
        special tokens are requested, so ``tokenizer(text)`` is ``[bos_id] +
        encode(text)``, the start of our datasets' sequences.
        """
        tk = self._lib()
        backend = tk.Tokenizer.from_str(self._tok.to_str())
        backend.post_processor = _bos_post_processor(tk, "<bos>", self.bos_id)
        specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        return _write_folder(folder, backend, _own_config(backend, specials, split_special_tokens=False))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _token_content(value, name: str, where: str):
    """A special token from tokenizer_config.json: a string, an AddedToken-like dict with "content", or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: {name} must be a string, {{\"content\": ...}} or null, got {value!r:.80}.")


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (for folders whose config sets ``clean_up_tokenization_spaces``)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class HFTokenizer:
    """The tokenizer of a Hugging Face folder: ``tokenizer.json`` run by the ``tokenizers`` library.

    ``HFTokenizer.from_folder(path)`` reads ``tokenizer.json``,
    ``tokenizer_config.json`` (special tokens, ``add_bos_token``, the chat
    template of older folders), ``chat_template.jinja`` (transformers 5; it
    wins over the config field), ``special_tokens_map.json`` (only in legacy
    folders whose config has no ``added_tokens_decoder``; there it wins, as in
    transformers 5) and ``generation_config.json`` (extra stop ids).

    Special tokens: ``bos_token``, ``eos_token``, ``pad_token`` and
    ``unk_token`` may each be a string, an AddedToken-like dict or null. A token
    the folder names but the vocabulary lacks is a ``ValueError`` (transformers
    would silently add a new id past the model's embedding). ``bos_id`` is None
    when the model has none (Qwen: ``bos_token: null``). A missing pad falls
    back to EOS with a warning; ``eos_ids`` is EOS followed by the ids
    ``generation_config.json`` lists in ``eos_token_id``.

    BOS rule — ``tokenizer(text)`` in transformers 5 adds what the post-processor
    of ``tokenizer.json`` adds (Llama 3's and Mistral's add BOS; Qwen's and
    SmolLM2's add nothing, although SmolLM2 names a ``bos_token``), and so do
    we. ``add_bos_token``/``add_eos_token`` in ``tokenizer_config.json`` are
    ignored, as transformers 5 ignores them whenever ``tokenizer.json`` exists;
    a ``tokenizer.json`` without a post-processor adds nothing. ``add_bos_token``
    here is the result — whether ``encode(text, add_special_tokens=True)``
    starts with ``bos_id`` — and the datasets start a plain-text sequence with
    BOS exactly when it is True, so their ids equal ``tokenizer(text)``'s. Chat-template
    sequences never get an extra BOS: the template writes it when the model
    wants one, and the rendering is tokenised with ``add_special_tokens=False``,
    as transformers does.

    ``vocab_size`` is ``tokenizer.json``'s size with added tokens: the rows the
    model's embedding must have at least (checkpoints often pad beyond it).

    One difference from transformers to know: for some classes
    (``Qwen2Tokenizer``, ``LlamaTokenizer``, ``GPT2Tokenizer``, ...)
    transformers 5 rebuilds the normalizer and pre-tokenizer from its own code
    and keeps only the vocabulary, merges and post-processor of
    ``tokenizer.json``. We run ``tokenizer.json`` as written; for the official
    checkpoints the two are the same pipeline. A folder whose ``tokenizer.json``
    disagrees with its class (e.g. an old SentencePiece "legacy" normaliser
    under ``LlamaTokenizer``) can tokenise differently in the two.
    """

    def __init__(self, backend, config: dict | None = None, *, chat_template=None,
                 generation_eos_ids: Sequence[int] = (), special_tokens_map: dict | None = None,
                 warn: bool = True, where: str = "tokenizer"):
        self._tok = backend
        backend.no_truncation()  # a tokenizer.json may carry truncation/padding; transformers turns them off per call
        backend.no_padding()
        self.config = dict(config or {})
        if "chat_template" in self.config:
            self.config.pop("chat_template")
        self.chat_template = chat_template
        self.split_special_tokens = bool(self.config.get("split_special_tokens", False))
        backend.encode_special_tokens = self.split_special_tokens

        # special_tokens_map.json counts only in legacy folders (no added_tokens_decoder in the config), and there
        # it wins over the config: transformers 5's rule.
        legacy_map = special_tokens_map if "added_tokens_decoder" not in self.config else None
        names = {}
        for name in _SPECIAL_NAMES:
            if legacy_map and name in legacy_map:
                names[name] = _token_content(legacy_map[name], name, where)
            elif name in self.config:
                names[name] = _token_content(self.config[name], name, where)
        self._special_tokens = {k: v for k, v in names.items() if v is not None}
        ids = {}
        for name, content in self._special_tokens.items():
            i = backend.token_to_id(content)
            if i is None:
                raise ValueError(
                    f"{where}: {name} {content!r} is not in the vocabulary of tokenizer.json; fix "
                    f"tokenizer_config.json (set {name} to a token of the vocabulary, or null if the model has none).")
            ids[name] = i
        self.bos_id = ids.get("bos_token")
        self.unk_id = ids.get("unk_token")
        self.eos_id = ids.get("eos_token")
        if self.eos_id is None:
            if not generation_eos_ids:
                raise ValueError(
                    f"{where}: no eos_token in tokenizer_config.json (or special_tokens_map.json) and no eos_token_id "
                    "in generation_config.json; name the token that ends a text, e.g. \"eos_token\": \"</s>\".")
            self.eos_id = int(generation_eos_ids[0])
        self.eos_ids = tuple(dict.fromkeys([self.eos_id, *(int(i) for i in generation_eos_ids)]))
        self.pad_id = ids.get("pad_token")
        if self.pad_id is None:
            self.pad_id = self.eos_id
            if warn:
                warnings.warn(
                    f"{where}: no pad_token; padding with the eos token {backend.id_to_token(self.eos_id)!r} "
                    f"(id {self.eos_id}). Padded positions are masked out, so this changes no loss; set pad_token "
                    "in tokenizer_config.json to silence this.", UserWarning, stacklevel=3)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

        # What transformers' tokenizer(text) adds around a text (see the class docstring).
        self._prefix, self._suffix = self._post_processor_ids()
        self.add_bos_token = self.bos_id is not None and self._prefix[:1] == [self.bos_id]

    def _post_processor_ids(self) -> tuple[list[int], list[int]]:
        """Ids ``tokenizer.json``'s post-processor puts before and after a text (probed on a short text)."""
        if self._tok.post_processor is None:
            return [], []
        for probe in ("a", "0", " ", "\u00e9"):
            plain = self._tok.encode(probe, add_special_tokens=False).ids
            full = self._tok.encode(probe, add_special_tokens=True).ids
            if not plain:
                continue
            for k in range(len(full) - len(plain) + 1):
                if full[k:k + len(plain)] == plain:
                    return full[:k], full[k + len(plain):]
        raise ValueError("tokenizer.json's post-processor rewrites the text itself; HFTokenizer cannot tell which "
                         "special tokens it adds around a text.")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_folder(cls, path, *, warn: bool = True) -> "HFTokenizer":
        """The tokenizer of a Hugging Face model folder (``tokenizer.json`` is required)."""
        tk = _tokenizers_lib()
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            hint = (" It has tokenizer.model only (SentencePiece): convert it once with transformers, "
                    "AutoTokenizer.from_pretrained(path).save_pretrained(path)." if "tokenizer.model" in found else "")
            raise FileNotFoundError(f"{folder}: no tokenizer.json (found: {', '.join(found) or 'nothing'}).{hint}")

        def read(name):
            p = folder / name
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

        config = read("tokenizer_config.json") or {}
        template = config.get("chat_template")
        templates = {}
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                templates[f.stem] = f.read_text(encoding="utf-8")
        if templates:  # the .jinja files win over the config field, as in transformers
            template = templates["default"] if list(templates) == ["default"] else templates
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
        gen = read("generation_config.json") or {}
        eos = gen.get("eos_token_id")
        gen_eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        backend = tk.Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(backend, config, chat_template=template, generation_eos_ids=gen_eos,
                   special_tokens_map=read("special_tokens_map.json"), warn=warn, where=str(folder))

    def to_json(self) -> dict:
        return {"type": "hf", "tokenizer": json.loads(self.backend_json()), "config": self.config,
                "special_tokens": self._special_tokens, "chat_template": self.chat_template,
                "eos_ids": list(self.eos_ids)}

    @classmethod
    def _from_spec(cls, spec: dict) -> "HFTokenizer":
        tk = _tokenizers_lib()
        config = {**spec.get("config", {}), **spec.get("special_tokens", {})}
        return cls(tk.Tokenizer.from_str(json.dumps(spec["tokenizer"])), config,
                   chat_template=spec.get("chat_template"), generation_eos_ids=spec.get("eos_ids", ()),
                   warn=False, where="checkpoint tokenizer")

    def backend_json(self) -> str:
        """``tokenizer.json`` as loaded."""
        return self._tok.to_str()

    def save(self, path) -> None:
        """Write ``tokenizer.json`` alone (see :meth:`save_pretrained` for a whole folder)."""
        Path(path).write_text(self.backend_json(), encoding="utf-8")

    def save_pretrained(self, folder) -> Path:
        """``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (when there is one).

        ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it offline
        with the same ids and special tokens. Several named templates are
        written as ``chat_template.jinja`` (the default) plus
        ``additional_chat_templates/NAME.jinja``. ``generation_config.json``
        (the extra stop ids of ``eos_ids``) belongs to the model folder and is
        not written here.
        """
        tk = _tokenizers_lib()
        backend = tk.Tokenizer.from_str(self.backend_json())
        config = dict(self.config)
        for name, content in self._special_tokens.items():
            if not isinstance(config.get(name), dict):  # keep AddedToken dicts as they were
                config[name] = content
        template = self.chat_template
        folder = _write_folder(folder, backend, config, template if isinstance(template, str) else None)
        if isinstance(template, dict):
            extra = folder / "additional_chat_templates"
            for name, text in template.items():
                if name == "default":
                    (folder / "chat_template.jinja").write_text(text, encoding="utf-8")
                else:
                    extra.mkdir(exist_ok=True)
                    (extra / f"{name}.jinja").write_text(text, encoding="utf-8")
        return folder

    # ------------------------------------------------------------------ text

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; ``add_special_tokens=True`` adds what ``tokenizer(text)`` adds (BOS for Llama)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._prefix + ids + self._suffix if add_special_tokens else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (no special tokens added) and each token's ``(start, end)`` characters in ``text``."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of ``ids``; the clean-up of spaces before punctuation follows the folder's config unless given."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces"))
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def added_token_strings(self) -> list[str]:
        """Every added token (special or not), longest first."""
        return sorted((t.content for t in self._tok.get_added_tokens_decoder().values()), key=len, reverse=True)

    # ------------------------------------------------------------------ chat

    def template_special_tokens(self) -> dict[str, str]:
        """The template variables transformers sets from the special tokens (``bos_token``, ``eos_token``, ...)."""
        return dict(self._special_tokens)

    def get_chat_template(self, *, tools=None, name: str | None = None) -> str:
        from .chat import select_template
        return select_template(self.chat_template, tools=tools, name=name)

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                    chat_template_name: str | None = None, **kwargs) -> str:
        """The conversation rendered by the chat template (``apply_chat_template(..., tokenize=False)``).

        Extra keywords are template variables: ``tools=[...]``,
        ``enable_thinking=False`` (Qwen3), ``date_string="26 Jul 2024"`` (Llama 3.x).
        """
        from .chat import render_chat
        template = self.get_chat_template(tools=kwargs.get("tools"), name=chat_template_name)
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self._special_tokens, **kwargs)

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                            **kwargs) -> list[int]:
        """Ids of the rendered conversation, equal to transformers' ``apply_chat_template(..., tokenize=True)``.

        The rendering is tokenised without added special tokens: the template
        writes BOS itself when the model wants one.
        """
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs))

    def __repr__(self) -> str:
        return (f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
                f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})")


def load_tokenizer(spec: dict):
    """Rebuild a tokenizer from its ``to_json()`` description (as stored in checkpoints)."""
    if spec.get("type") == "byte":
        return ByteTokenizer()
    if spec.get("type") == "bpe":
        return BPETokenizer(BPETokenizer._lib().Tokenizer.from_str(json.dumps(spec["tokenizer"])))
    if spec.get("type") == "hf":
        return HFTokenizer._from_spec(spec)
    raise ValueError(
        f"load_tokenizer: unknown tokenizer description {spec.get('type')!r}; expected 'byte', 'bpe' or 'hf'.")


def parse_tokenizer_spec(spec: str) -> tuple[str, object]:
    """What a tokenizer named on the command line is: ``"byte"`` -> ``("byte", None)``; ``"bpe:VOCAB"`` ->
    ``("bpe", VOCAB)`` (one still to be trained); a folder -> ``("folder", path)`` (a Hugging Face
    tokenizer); a file -> ``("file", path)`` (a tokenizer.json). A ``ValueError`` names what is wrong."""
    from pathlib import Path

    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise ValueError(f"{spec}: the BPE vocabulary size must be a whole number, e.g. bpe:4096.") from None
        if vocab < 259:
            raise ValueError(f"{spec}: the vocabulary needs at least 259 entries (bytes + specials).")
        return "bpe", vocab
    path = Path(spec)
    if path.is_dir():
        return "folder", path
    if not path.is_file():
        raise ValueError(f"{spec}: no such file; use byte, bpe:VOCAB, a path to a tokenizer.json, or a Hugging Face "
                         "folder holding tokenizer.json and tokenizer_config.json.")
    return "file", path


def named_tokenizer(kind: str, arg):
    """The tokenizer :func:`parse_tokenizer_spec` named: ``("byte", None)``, ``("file", path)`` (a
    tokenizer.json) or ``("folder", path)`` (a Hugging Face folder). A ``"bpe"`` one has to be trained
    first (``BPETokenizer.train``), on data only the caller has."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        return BPETokenizer.load(arg)
    if kind == "folder":
        return HFTokenizer.from_folder(arg)
    raise ValueError(f"named_tokenizer: a {kind!r} tokenizer is not built from its name; "
                     "expected byte, file or folder.")
