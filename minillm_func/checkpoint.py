"""Checkpoints: a state pytree as safetensors (the tensors) plus JSON (everything else). Never pickle.

Example::

    save("runs/ckpt", state, meta={"model": dataclasses.asdict(cfg), "step": 1000})
    state, meta = load("runs/ckpt", like=trainer.init(params))   # `like`: checks shapes and dtypes
    check_meta(meta, {"model": dataclasses.asdict(cfg)})          # same model configuration?

Format
------
A checkpoint is a directory holding two files::

    path/
      tensors.safetensors   every tensor leaf, keyed by its path: "state.opt_state[1].mu['w0']"
      state.json            the pytree's structure, the caller's ``meta``, and the byte size and
                            SHA-256 of tensors.safetensors

``state.json`` is plain, indented JSON::

    {"format": "minillm_func.checkpoint", "version": 1,
     "tensors": {"file": "tensors.safetensors", "bytes": 1234, "sha256": "9f86d0..."},
     "meta": {"model": {"dim": 64}, "step": 1000},
     "tree": {"type": "namedtuple", "class": "minillm_func.amp:ScalerState",
              "fields": {"scale": {"type": "tensor", "key": "state.scale"}, ...}}}

Each node of ``tree`` has a ``type``: ``tensor`` (its ``key`` in the safetensors
file), ``none``, ``bool`` / ``int`` / ``float`` / ``str`` (a Python scalar leaf,
stored inline; non-finite floats as ``"nan"``, ``"inf"``, ``"-inf"``), ``list`` /
``tuple`` (``items``), ``dict`` (``items``, str keys in insertion order) and
``namedtuple`` (``class`` as ``"module:qualname"`` and ``fields`` by name).

Loading runs no code from the file: safetensors holds raw bytes, and a NamedTuple
class named in ``state.json`` is imported only when its module is part of this
library (``minillm_func`` or ``minillm_func.*``). Any other class must be handed
over by the caller (``namedtuple_classes=``, or simply present in ``like``);
otherwise :func:`load` refuses the checkpoint before importing anything.

Atomicity
---------
:func:`save` never writes into ``path`` itself. It writes both files into a hidden
sibling ``.NAME.tmp-<pid>-<random>`` (same parent, so same file system), fsyncs
the files and that directory, and only then renames it into place:

1. no ``path`` yet: ``rename(tmp, path)``;
2. ``path`` exists: ``rename(path, .NAME.old-<pid>-<random>)``, then
   ``rename(tmp, path)``, then the old directory is deleted.

The parent directory is fsynced after each rename. A crash at any point leaves
either the complete old or the complete new checkpoint at ``path``, except in the
window between the two renames of step 2, where ``path`` is missing and both the
old and the new checkpoint are complete siblings. :func:`load` never picks one
silently: it raises a :class:`CheckpointError` that names the complete sibling to
use (the new one when it is complete) and the ``mv`` command that restores it.
Leftover hidden siblings from an interrupted save are removed by the next
successful save to the same ``path``; one process writes a given ``path`` at a time.

Costs: the SHA-256 is computed once at save and once at load (a full extra read
of the tensors file); tensors on an accelerator are copied to the host to be written.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import optree
import safetensors
import safetensors.torch
import torch

__all__ = ["CheckpointError", "save", "load", "check_meta", "TENSORS_FILE", "STATE_FILE"]

PyTree = Any

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FORMAT = "minillm_func.checkpoint"
VERSION = 1

_LIBRARY_MODULE = re.compile(r"minillm_func(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_EARLIER = "Resume from an earlier checkpoint, or start afresh."


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, unsafe to load, or written for a different state."""


# --------------------------------------------------------------------------- save


def save(path: str | os.PathLike, state: PyTree, *, meta: dict | None = None) -> None:
    """Write ``state`` and ``meta`` to the checkpoint directory ``path``, atomically.

    ``state`` is any pytree of NamedTuples, dicts (str keys), tuples, lists, ``None``,
    tensors (any dtype safetensors knows, 0-d included; written from a CPU copy, loaded
    as plain tensors, so ``nn.Parameter`` and autograd history are not kept)
    and Python ``bool`` / ``int`` / ``float`` / ``str`` leaves. ``meta`` is a dict of
    JSON values (dataclasses such as ``ModelConfig`` are written as dicts): the
    model configuration, the step, the data position, the tokenizer... It comes
    back from :func:`load` exactly as JSON reads it (tuples as lists).

    An existing checkpoint at ``path`` is replaced; see the module docstring for
    why a crash at any moment leaves a complete checkpoint behind. A ``path`` that
    holds anything else than a checkpoint's two files is never replaced.
    """
    path = _absolute(path)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, (), tensors)  # rejects unsupported leaves before touching the disk
    meta = _jsonable({} if meta is None else meta, "meta")
    if not isinstance(meta, dict):
        raise TypeError(f"save: meta must be a dict of JSON values, got {type(meta).__name__}.")
    _check_replaceable(path)

    tmp = _sibling(path, "tmp")
    try:
        _write_checkpoint(tmp, tensors, tree, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, path)
    _remove_leftovers(path)


def _write_checkpoint(directory: Path, tensors: dict, tree: dict, meta: dict) -> None:
    """Both files, fsynced, in a fresh ``directory``; state.json last, since it vouches for the tensors."""
    directory.mkdir()
    tensors_path = directory / TENSORS_FILE
    safetensors.torch.save_file(tensors, str(tensors_path))
    _fsync_file(tensors_path)
    doc = {
        "format": FORMAT, "version": VERSION,
        "tensors": {"file": TENSORS_FILE, "bytes": tensors_path.stat().st_size,
                    "sha256": _sha256_file(tensors_path)},
        "meta": meta,
        "tree": tree,
    }
    with open(directory / STATE_FILE, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=1, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(directory)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` to ``path``; an existing ``path`` is first renamed aside, then deleted."""
    if not path.exists():
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    _fsync_dir(path.parent)
    # A crash here leaves no `path`, and `old` and `tmp` both complete: load() says which to use.
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old)


def _check_replaceable(path: Path) -> None:
    """Refuse to replace a file, or a directory holding anything but a checkpoint's files."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"save: {path} exists and is not a checkpoint directory. "
                              "Choose a new path, e.g. save('runs/ckpt', state).")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in (TENSORS_FILE, STATE_FILE))
    if foreign:
        raise FileExistsError(
            f"save: refusing to replace {path}: it holds files that are not part of a checkpoint "
            f"({', '.join(foreign[:5])}). Choose an empty or new directory, e.g. {path / 'checkpoint'}.")


def _remove_leftovers(path: Path) -> None:
    """Delete hidden siblings left by earlier interrupted saves to ``path`` (one writer per path)."""
    for prefix in (f".{path.name}.tmp-", f".{path.name}.old-"):
        for leftover in path.parent.glob(glob.escape(prefix) + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------- encoding


def _encode(node: Any, path: tuple, tensors: dict) -> dict:
    """The JSON node for ``node``; its tensors are added to ``tensors`` under unique keys."""
    kind = type(node)
    if isinstance(node, torch.Tensor):
        return {"type": "tensor", "key": _add_tensor(node, path, tensors)}
    if node is None:
        return {"type": "none"}
    if kind is float and not math.isfinite(node):
        return {"type": "float", "value": repr(node)}  # "nan", "inf", "-inf": strict JSON has none
    if kind in _SCALARS:
        return {"type": _SCALARS[kind], "value": node}
    if _is_namedtuple(kind):
        return {"type": "namedtuple", "class": _class_name(kind, path),
                "fields": {f: _encode(v, (*path, f".{f}"), tensors) for f, v in zip(kind._fields, node)}}
    if kind in (tuple, list):
        return {"type": kind.__name__,
                "items": [_encode(v, (*path, f"[{i}]"), tensors) for i, v in enumerate(node)]}
    if kind is dict:
        bad = [k for k in node if type(k) is not str]
        if bad:
            raise TypeError(f"save: dict keys must be str; {_render(path)} has the key {bad[0]!r}.")
        return {"type": "dict", "items": {k: _encode(v, (*path, f"[{k!r}]"), tensors) for k, v in node.items()}}
    raise TypeError(
        f"save: cannot store {_render(path)} of type {kind.__module__}.{kind.__qualname__}. A state holds "
        "NamedTuples, dicts, tuples, lists, None, tensors and Python bool/int/float/str; convert it "
        "first (e.g. float(x) for a NumPy number, dict(x) for an OrderedDict).")


def _add_tensor(t: torch.Tensor, path: tuple, tensors: dict) -> str:
    """Store a host copy of ``t`` under its path (``state.opt_state[1].mu['w0']``), unique by construction."""
    if t.layout != torch.strided:
        raise TypeError(f"save: {_render(path)} is a {t.layout} tensor; call .to_dense() first.")
    t = t.detach().to("cpu").contiguous()
    if any(_shares_memory(t, other) for other in tensors.values()):
        t = t.clone()  # safetensors refuses tensors that share memory (views, tied entries)
    key = _render(path)
    tensors[key] = t
    return key


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() > 0 and b.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _is_namedtuple(kind: type) -> bool:
    return issubclass(kind, tuple) and isinstance(getattr(kind, "_fields", None), tuple)


def _class_name(kind: type, path: tuple) -> str:
    if "<locals>" in kind.__qualname__:
        raise TypeError(f"save: {_render(path)} is a {kind.__qualname__}, a NamedTuple defined inside a "
                        "function, which cannot be found again at load time. Define it at module level.")
    return f"{kind.__module__}:{kind.__qualname__}"


def _jsonable(value: Any, what: str) -> Any:
    """``value`` as JSON reads it back (dataclasses become dicts); a clear error if it is not JSON."""
    def default(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(value, default=default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must hold JSON values only (dicts with str keys, lists, str, finite "
                        f"numbers, bools, None): {e}.") from None


# --------------------------------------------------------------------------- load


def load(path: str | os.PathLike, *, like: PyTree = None,
         namedtuple_classes: Mapping[str, type] | Iterable[type] | None = None) -> tuple[PyTree, dict]:
    """Read the checkpoint at ``path``; returns ``(state, meta)``.

    The tensors file's size and SHA-256 are checked against ``state.json`` before
    any tensor is read: a truncated or corrupted checkpoint raises
    :class:`CheckpointError`, as does a missing file.

    ``like``: a template state (e.g. ``trainer.init(params)``). When given, the
    loaded state must have its structure, NamedTuple classes, tensor shapes and
    dtypes, else the first mismatching leaf is reported; the tensors are then
    placed on the devices of ``like``'s tensors. The NamedTuple classes found in
    ``like`` are trusted as if passed in ``namedtuple_classes``.

    ``namedtuple_classes``: NamedTuple classes from outside ``minillm_func`` that
    the checkpoint may name, as classes (matched by ``module:qualname``) or as a
    mapping ``{"module:qualname": class}`` (for a class that has moved). No other
    class is ever imported.
    """
    path = _absolute(path)
    doc = _read_state_file(path)
    allowed = {**_classes_in(like), **_allow_list(namedtuple_classes)}
    tensors = _read_tensors(path, doc["tensors"])
    state = _decode_tree(doc["tree"], tensors, allowed, path)
    if like is not None:
        mismatch = _first_mismatch(state, like, ())
        if mismatch:
            raise CheckpointError(
                f"The checkpoint {path} does not match the expected state (`like`): {mismatch}. It was "
                "probably written for a different model configuration or optimizer; load it with the "
                "configuration it was written for (see its meta), or save to a new directory to start afresh.")
        state = optree.tree_map(lambda x, ref: x.to(ref.device) if isinstance(x, torch.Tensor) else x,
                                state, like)
    return state, doc["meta"]


def _read_state_file(path: Path) -> dict:
    """The parsed, format-checked ``state.json`` of ``path``."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory (one with {STATE_FILE} and "
                              f"{TENSORS_FILE}).")
    if not path.is_dir():
        raise CheckpointError(_missing_checkpoint_message(path))
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing: {path} is not a complete checkpoint (was it copied "
                              f"only in part?). {_EARLIER}")
    try:
        doc = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_path} is corrupted (not valid JSON: {e}). {_EARLIER}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{state_path} is not a minillm_func checkpoint (no \"format\": \"{FORMAT}\").")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{state_path} has format version {doc.get('version')!r}; this library reads "
                              f"version {VERSION}. Load it with the version of minillm_func that wrote it.")
    for field in ("tensors", "meta", "tree"):
        if not isinstance(doc.get(field), dict):
            raise CheckpointError(f"{state_path} is corrupted: it has no \"{field}\" entry. {_EARLIER}")
    return doc


def _read_tensors(path: Path, record: dict) -> dict[str, torch.Tensor]:
    """The tensors file's contents, after checking its size and SHA-256 against ``record``."""
    file = path / TENSORS_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint {path} is incomplete. {_EARLIER}")
    size, expected = file.stat().st_size, record.get("bytes")
    if size != expected:
        how = "truncated" if isinstance(expected, int) and size < expected else "corrupted"
        raise CheckpointError(f"{file} is damaged: it holds {size} bytes but {STATE_FILE} records {expected}; "
                              f"the checkpoint is {how}. {_EARLIER}")
    if _sha256_file(file) != record.get("sha256"):
        raise CheckpointError(f"{file} is damaged: its SHA-256 differs from the one recorded in {STATE_FILE}; "
                              f"the checkpoint is corrupted. {_EARLIER}")
    try:
        return safetensors.torch.load_file(str(file), device="cpu")
    except (safetensors.SafetensorError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file} is corrupted ({e}). {_EARLIER}") from None


def _missing_checkpoint_message(path: Path) -> str:
    """Why ``path`` is missing, naming the complete sibling to use after an interrupted save."""
    message = f"No checkpoint at {path}: the directory does not exist."
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    siblings = [s for s in path.parent.glob(glob.escape(f".{path.name}.") + "*") if s.name.startswith(prefixes)]
    complete = [s for s in siblings if _is_complete(s)]
    if not complete:
        return message
    new = [s for s in complete if s.name.startswith(f".{path.name}.tmp-")]
    use = max(new or complete, key=lambda s: (s / STATE_FILE).stat().st_mtime)
    which = "the new checkpoint being saved" if new else "the previous checkpoint"
    others = [str(s) for s in complete if s != use]
    return (f"{message} A save into it was interrupted; {use} is complete and holds {which}. "
            f"To use it: mv '{use}' '{path}'"
            + (f" (also complete, and older or previous: {', '.join(others)})." if others else "."))


def _is_complete(directory: Path) -> bool:
    """Both files present and the tensors file matching its recorded size and SHA-256."""
    try:
        _read_tensors(directory, _read_state_file(directory)["tensors"])
    except (CheckpointError, OSError):
        return False
    return True


# --------------------------------------------------------------------------- decoding


def _decode_tree(tree: dict, tensors: dict, allowed: dict, path: Path) -> PyTree:
    """The state described by ``tree``; a malformed tree is reported as a corrupted state.json."""
    try:
        return _decode(tree, (), tensors, allowed)
    except CheckpointError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is corrupted: its \"tree\" is malformed ({e!r}). "
                              f"{_EARLIER}") from None


def _decode(node: Any, path: tuple, tensors: dict, allowed: dict) -> Any:
    """The value for a JSON ``node``; the inverse of :func:`_encode`."""
    kind = node.get("type") if isinstance(node, dict) else None
    if kind == "tensor":
        if node.get("key") not in tensors:
            raise CheckpointError(f"The tensor for {_render(path)} ({node.get('key')!r}) is missing from "
                                  f"{TENSORS_FILE}: the checkpoint is corrupted. {_EARLIER}")
        return tensors[node["key"]]
    if kind == "none":
        return None
    if kind == "float":
        value = node.get("value")
        return _NON_FINITE[value] if value in _NON_FINITE else float(value)
    if kind in ("bool", "int", "str"):
        value = node.get("value")
        if _SCALARS.get(type(value)) != kind:
            raise TypeError(f"{_render(path)} should be of type {kind}, the file holds {value!r:.40}")
        return value
    if kind in ("tuple", "list"):
        items = [_decode(v, (*path, f"[{i}]"), tensors, allowed) for i, v in enumerate(node["items"])]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode(v, (*path, f"[{k!r}]"), tensors, allowed) for k, v in node["items"].items()}
    if kind == "namedtuple":
        cls = _resolve_class(node.get("class"), allowed, path)
        fields = node["fields"]
        if list(fields) != list(cls._fields):
            raise CheckpointError(
                f"{_render(path)}: {node['class']} now has the fields {cls._fields}, but the checkpoint has "
                f"{tuple(fields)}; it was written by another version of that class. Load it with that version.")
        return cls._make(_decode(v, (*path, f".{f}"), tensors, allowed) for f, v in fields.items())
    raise CheckpointError(f"{STATE_FILE} is corrupted: {_render(path)} has no valid node type ({node!r:.80}).")


def _resolve_class(name: Any, allowed: dict, path: tuple) -> type:
    """The NamedTuple class ``name`` ("module:qualname"): allowed by the caller, or imported from minillm_func."""
    if name in allowed:
        return allowed[name]
    module, _, qualname = str(name).partition(":")
    parts = qualname.split(".")
    if not _LIBRARY_MODULE.fullmatch(module) or not all(p.isidentifier() and not p.startswith("__")
                                                        for p in parts):
        raise CheckpointError(
            f"Refusing to load {_render(path)}: the checkpoint names the class {name!r}, which is not part of "
            "minillm_func, and loading never imports code a file asks for. If you trust this class, pass it: "
            "load(path, namedtuple_classes={YourState}).")
    try:
        obj = importlib.import_module(module)
        for part in parts:
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise CheckpointError(f"{_render(path)}: the class {name} no longer exists; the checkpoint was written "
                              "by another version of minillm_func. Pass its replacement: "
                              f"load(path, namedtuple_classes={{{name!r}: NewClass}}).") from None
    if not (isinstance(obj, type) and _is_namedtuple(obj)):
        raise CheckpointError(f"Refusing to load {_render(path)}: {name} is not a NamedTuple class.")
    return obj


def _allow_list(classes: Mapping[str, type] | Iterable[type] | None) -> dict[str, type]:
    if classes is None:
        return {}
    pairs = classes.items() if isinstance(classes, Mapping) else ((_qualified(c), c) for c in classes)
    allowed = dict(pairs)
    bad = [c for c in allowed.values() if not (isinstance(c, type) and _is_namedtuple(c))]
    if bad:
        raise TypeError(f"load: namedtuple_classes must hold NamedTuple classes, got {bad[0]!r}.")
    return allowed


def _classes_in(tree: PyTree) -> dict[str, type]:
    """The NamedTuple classes that occur in ``tree``, by "module:qualname"."""
    found = {}
    if _is_namedtuple(type(tree)):
        found[_qualified(type(tree))] = type(tree)
    if isinstance(tree, (tuple, list)):
        for item in tree:
            found.update(_classes_in(item))
    elif isinstance(tree, dict):
        for item in tree.values():
            found.update(_classes_in(item))
    return found


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# --------------------------------------------------------------------------- comparing with `like`


def _first_mismatch(found: Any, expected: Any, path: tuple) -> str | None:
    """A description of the first leaf where ``found`` differs from ``expected`` in kind, shape or dtype."""
    where = _render(path)
    if isinstance(expected, torch.Tensor):
        if not isinstance(found, torch.Tensor) or found.shape != expected.shape or found.dtype != expected.dtype:
            return f"at {where} expected {_describe(expected)}, found {_describe(found)}"
        return None
    if type(found) is not type(expected):
        return f"at {where} expected {_describe(expected)}, found {_describe(found)}"
    if isinstance(expected, dict):
        missing = [k for k in expected if k not in found]
        extra = [k for k in found if k not in expected]
        if missing:
            key = missing[0]
            return (f"at {_render((*path, f'[{key!r}]'))} expected {_describe(expected[key])}, found nothing "
                    "(the key is missing from the checkpoint)")
        if extra:
            key = extra[0]
            return (f"at {_render((*path, f'[{key!r}]'))} expected nothing, found {_describe(found[key])} "
                    "(the checkpoint has an extra key)")
        pairs = [((*path, f"[{k!r}]"), found[k], expected[k]) for k in expected]
    elif isinstance(expected, (tuple, list)):
        if len(found) != len(expected):
            return f"at {where} expected {len(expected)} items, found {len(found)}"
        names = ([f".{f}" for f in expected._fields] if _is_namedtuple(type(expected))
                 else [f"[{i}]" for i in range(len(expected))])
        pairs = [((*path, n), f, e) for n, f, e in zip(names, found, expected)]
    else:
        return None  # None and Python scalars: same type is all a template can promise
    return next((m for p, f, e in pairs if (m := _first_mismatch(f, e, p))), None)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return "None" if x is None else f"a value of type {type(x).__qualname__}"


def _render(path: tuple) -> str:
    """A leaf path as Python would reach it, e.g. ``state.opt_state[1].mu['w0']``.

    ``path`` holds accessors: ``.field`` (NamedTuple), ``[0]`` (tuple, list), ``['key']`` (dict).
    """
    return "state" + "".join(path)


# --------------------------------------------------------------------------- meta


def check_meta(meta: dict, expected: dict) -> None:
    """Raise :class:`CheckpointError` naming every key of ``expected`` whose value differs in ``meta``.

    Nested dicts are compared key by key (the error says ``model.dim``, not
    ``model``); keys of ``meta`` that ``expected`` does not mention are ignored.
    Values are compared as JSON sees them, so a tuple equals a list and a
    dataclass equals its ``asdict``. Example::

        state, meta = load("runs/ckpt")
        check_meta(meta, {"model": dataclasses.asdict(cfg)})
    """
    diffs = _meta_differences(_jsonable(meta or {}, "meta"), _jsonable(expected, "expected"), "")
    if diffs:
        raise CheckpointError(
            "This checkpoint was written for a different model configuration:\n  " + "\n  ".join(diffs)
            + "\nLoad it with the configuration it was written for, or save to a new directory to start afresh.")


def _meta_differences(found: dict, expected: dict, prefix: str) -> list[str]:
    diffs = []
    for key, want in expected.items():
        name = f"{prefix}{key}"
        if not isinstance(found, dict) or key not in found:
            diffs.append(f"{name}: missing in the checkpoint, {json.dumps(want)} now")
        elif isinstance(want, dict) and isinstance(found[key], dict):
            diffs.extend(_meta_differences(found[key], want, f"{name}."))
        elif found[key] != want or type(found[key]) is not type(want):
            diffs.append(f"{name}: {json.dumps(found[key])} in the checkpoint, {json.dumps(want)} now")
    return diffs


# --------------------------------------------------------------------------- files


def _absolute(path: str | os.PathLike) -> Path:
    path = Path(os.path.abspath(os.fspath(path)))
    if not path.name:
        raise ValueError(f"A checkpoint path needs a directory name, got {path}; e.g. {path / 'checkpoint'}.")
    return path


def _sibling(path: Path, role: str) -> Path:
    """A fresh hidden sibling of ``path``: ``.NAME.tmp-<pid>-<random>`` or ``.NAME.old-<pid>-<random>``."""
    return path.parent / f".{path.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}"


def _sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a directory's entries (new files, renames) durable; POSIX only (Windows cannot open a directory)."""
    if os.name == "posix":
        _fsync_file(directory)
