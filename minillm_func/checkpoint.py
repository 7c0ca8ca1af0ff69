"""Checkpoints: a state pytree as safetensors (the tensors) plus JSON (everything else). Never pickle.

Example::

    save("runs/ckpt", state, meta={"model": dataclasses.asdict(cfg), "step": 1000})
    state, meta = load("runs/ckpt", like=trainer.init(params))   # `like`: checks shapes and dtypes
    check_meta(meta, {"model": dataclasses.asdict(cfg)})          # same model configuration?

A run that checkpoints as it trains keeps a history instead (see *History* below)::

    save_step("runs/x", state, step=120, meta={"step": 120}, keep_last=3)  # runs/x/checkpoints/step-000120/
    state, meta = load(resolve("runs/x"), like=trainer.init(params))       # its newest complete checkpoint

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
use (the new one when it is complete) and the ``mv`` command that restores it;
:func:`latest` and :func:`resolve` on ``path`` (or on the run folder holding it, when
``path`` is its ``checkpoint/``) run that ``mv`` themselves.
Leftover hidden siblings from an interrupted save are removed by the next
successful save to the same ``path``; one process writes a given ``path`` at a time.

History
-------
:func:`save_step` keeps a run's checkpoints over time, one folder per step, each
a checkpoint as above::

    runs/x/checkpoints/
      step-000100/        tensors.safetensors + state.json
      step-000120/
      latest              the line "step-000120": the newest step folder, for people and tools
                          (the convention of DeepSpeed's ``latest`` file)

- ``save_step(run_dir, state, *, step, meta=None, keep_last=3) -> Path`` writes
  ``step-{step:06d}/``, updates ``latest``, then deletes all but the ``keep_last``
  newest complete step folders (``None`` or ``0``: keep them all).
- ``latest(path) -> Path | None``: the newest complete checkpoint under ``path`` (a
  run folder, its ``checkpoints/``, a checkpoint folder, or a run folder of the
  single-``checkpoint/`` layout that :func:`save` writes); ``None`` when there is none.
- ``resolve(path) -> Path``: the same, or a :class:`CheckpointError` that says what
  was looked for and where. :func:`load` takes checkpoint folders only:
  ``load(resolve(run_dir))``.
- ``history(run_dir) -> list[Path]``: the complete step folders, oldest first.

*Complete* means both files present and the tensors file matching the size and
SHA-256 recorded in ``state.json``: checking it reads the tensors file once.

How a save stays atomic. The new step is written into a hidden
``.step-000120.tmp-<pid>-<random>`` inside ``checkpoints/`` (files and folder
fsynced), moved into place with one ``rename`` (``checkpoints/`` fsynced), and only
then is ``latest`` replaced (temporary file, fsync, ``os.replace``, fsync) and are
old steps pruned (each renamed to a hidden ``.step-N.del-*`` first, so a step
folder disappears at once, never half-deleted). Before the rename, every step
folder on disk is the one that was there; after it, the new one is complete. A
crash or SIGKILL at any instruction therefore leaves the previous complete
checkpoint, or the new one, for :func:`latest` to find.

Saving a step that already exists (a re-save after resuming from an earlier
step, or twice in a row) moves the old folder aside to a hidden
``.step-000120.old-<pid>-<random>``, renames the new one into place, then deletes
the old one. Between those two renames there is no ``step-000120``, but the old
checkpoint is complete under its hidden name, and :func:`latest` counts a complete
``.old`` folder whose step has no visible folder as that step: it renames it back
(the interrupted re-save is undone, as if it had never started) and returns it.
It never renames a folder whose writer (the ``<pid>`` in its name) is another
process still running, since that writer may be between its two renames; it
returns the hidden folder as is instead. The next :func:`save_step` restores such
folders too, then removes every other hidden leftover (incomplete ``.tmp``
folders, replaced ``.old`` folders, half-deleted ``.del`` folders).

How :func:`latest` chooses. It reads ``latest`` first and returns the folder it
names when that folder is complete and no newer step folder exists. Otherwise
(``latest`` missing, naming a missing, older or incomplete folder) the folders
win: the step folders are scanned newest first and the first complete one is
returned. A pointer older than a step folder happens after a crash between the
rename and the pointer update; that newer folder was renamed into place complete,
so nothing is lost. Histories only move forward: :func:`save_step` refuses a step
older than a complete step folder already there (resume from :func:`resolve` instead, or
start a new run folder), so the newest complete folder is always the run's present.

One process writes a given run at a time. Other processes may read it while it
trains, but the writer prunes and replaces folders: a reader that loses such a
race gets a :class:`CheckpointError` and can simply call :func:`resolve` again.

Costs: the SHA-256 is computed once at save and once at load (a full extra read
of the tensors file); tensors on an accelerator are copied to the host to be written.
:func:`latest` hashes the checkpoint it returns (and any newer, damaged ones it
skips), and :func:`save_step` hashes the ``keep_last - 1`` older folders it keeps,
so that pruning never keeps a damaged folder in place of a complete one.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import json
import math
import operator
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

__all__ = ["CheckpointError", "save", "load", "read_meta", "check_meta", "save_step", "latest", "resolve", "history",
           "TENSORS_FILE", "STATE_FILE", "CHECKPOINTS_DIR", "POINTER_FILE"]

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
    encoded = _encode_state(state, meta, "save")  # rejects unsupported leaves before touching the disk
    _check_replaceable(path)
    _publish(path, *encoded)
    _remove_leftovers(path)


def _encode_state(state: PyTree, meta: dict | None, who: str) -> tuple[dict, dict, dict]:
    """``(tensors, tree, meta)`` ready to write; a clear error for a leaf or meta that cannot be stored."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, (), tensors)
    meta = _jsonable({} if meta is None else meta, "meta")
    if not isinstance(meta, dict):
        raise TypeError(f"{who}: meta must be a dict of JSON values, got {type(meta).__name__}.")
    return tensors, tree, meta


def _publish(path: Path, tensors: dict, tree: dict, meta: dict) -> None:
    """Write a complete checkpoint into a hidden sibling, then rename it to ``path`` (see the docstring)."""
    tmp = _sibling(path, "tmp")
    try:
        _write_checkpoint(tmp, tensors, tree, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, path)  # the one rename that publishes it (two when replacing an existing path)


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
    # A crash here leaves no `path`, and `old` and `tmp` both complete: load() says which to use, and
    # latest() puts one back (save_step's history: `old`, as if the re-save had never started).
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


# --------------------------------------------------------------------------- history: one run, many steps

CHECKPOINTS_DIR = "checkpoints"
POINTER_FILE = "latest"
_SINGLE_DIR = "checkpoint"  # the layout of a run that calls save(run_dir / "checkpoint", ...)
_STEP_DIR = re.compile(r"step-(\d{6,})")
_HIDDEN_STEP = re.compile(r"\.(step-\d{6,})\.(tmp|old|del)-(\d+)-[0-9a-f]+")
_HIDDEN_POINTER = re.compile(r"\." + re.escape(POINTER_FILE) + r"\.tmp-\d+-[0-9a-f]+")


def save_step(run_dir: str | os.PathLike, state: PyTree, *, step: int, meta: dict | None = None,
              keep_last: int | None = 3) -> Path:
    """Write ``state`` as step ``step`` of the run in ``run_dir``; returns the new folder.

    The checkpoint goes to ``run_dir/checkpoints/step-{step:06d}/`` (the two files of
    :func:`save`), then ``run_dir/checkpoints/latest`` is set to its name, then all
    but the ``keep_last`` newest complete step folders are deleted (``None`` or
    ``0``: keep every one; the folder just written is always kept), and the hidden
    leftovers of interrupted saves are removed. A crash or SIGKILL at any moment
    leaves the previous or the new checkpoint for :func:`latest` to find; the
    module docstring says how, including for a re-save of an existing step (the
    old folder is moved aside, and :func:`latest` moves it back if the save dies
    before the new one is in place).

    ``step``: a non-negative int (a NumPy integer or a 0-d integer tensor such as
    ``state.step`` is read with ``int()``, a host sync). It may not be older than a
    complete step folder already in the run: a history only moves forward. ``state`` and
    ``meta``: as for :func:`save`. One process writes a given run at a time.

    Example::

        for batch in batches:
            state, metrics = trainer.step(state, batch)
            if int(state.step) % 100 == 0:
                save_step("runs/x", state, step=int(state.step), meta={"model": cfg})
        state, meta = load(resolve("runs/x"), like=state)
    """
    step = _check_step(step)
    keep_last = _check_keep_last(keep_last)
    encoded = _encode_state(state, meta, "save_step")  # rejects unsupported leaves before touching the disk

    run_dir = _absolute(run_dir)
    folder = _make_checkpoints_dir(run_dir)
    folders = _step_folders(folder, writer=True)  # puts back what an interrupted re-save moved aside
    newer = [f.name for n, f in sorted(folders.items()) if n > step and _is_complete(f)]  # damaged ones: pruned
    if newer:
        raise ValueError(
            f"save_step: {folder} already holds {', '.join(newer[-3:])}, newer than step {step}; a run's history "
            f"only moves forward. Resume from its newest checkpoint (state, meta = load(resolve('{run_dir}'))), "
            "save into a new run folder, or delete the newer step folders first.")
    path = folder / _step_name(step)
    _check_replaceable(path)
    _publish(path, *encoded)
    _write_pointer(folder, path.name)
    _prune(folder, keep=path, keep_last=keep_last)
    _remove_history_leftovers(folder)
    return path


def latest(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint reachable from ``path``, or ``None`` when there is none.

    ``path`` may be a run folder (holding ``checkpoints/``, or the single
    ``checkpoint/`` that ``save(run_dir / "checkpoint", ...)`` writes), a
    ``checkpoints/`` folder, or a checkpoint folder itself (returned when complete).
    Within ``checkpoints/``, the folder that ``latest`` names is taken when it is
    complete and no newer step folder exists; otherwise the step folders are
    scanned newest first and the first complete one wins.

    An interrupted save is recovered here, with no ``mv`` by hand: a step folder
    that a re-save had moved aside (``.step-N.old-*``), or a ``checkpoint/`` that
    :func:`save` left as a complete hidden sibling, is renamed back into place and
    returned (unless the process that wrote it is still running: then the hidden
    folder is returned as is). Use :func:`resolve` for an error instead of ``None``.
    """
    path = _absolute(path)
    if _holds_checkpoint_files(path):
        return path if _is_complete(path) else None
    if path.is_dir():
        for folder in (path / CHECKPOINTS_DIR, path):
            found = _latest_step(folder) if folder.is_dir() else None
            if found is not None:
                return found
        return _single(path / _SINGLE_DIR)
    if not path.exists():  # a checkpoint folder moved aside by an interrupted save
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.name == _step_name(int(match[1])) and path.parent.is_dir():
            found = _step_folders(path.parent).get(int(match[1]))
            return found if found is not None and _is_complete(found) else None
        return _single(path)
    return None


def resolve(path: str | os.PathLike) -> Path:
    """:func:`latest`, or a :class:`CheckpointError` saying what was looked for, and where.

    Example::

        state, meta = load(resolve("runs/x"))   # a run folder, its checkpoints/, or a checkpoint folder
    """
    found = latest(path)
    if found is not None:
        return found
    path = _absolute(path)
    if _holds_checkpoint_files(path):
        try:
            _read_tensors(path, _read_state_file(path)["tensors"])
        except CheckpointError as e:
            raise CheckpointError(f"{path} is not a complete checkpoint: {e}") from None
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {path}: it does not exist. Train first (save_step('{path}', "
                              "state, step=...) writes one), or pass an existing run or checkpoint folder.")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a run or checkpoint folder; pass the folder that holds "
                              f"{CHECKPOINTS_DIR}/ or {STATE_FILE}.")
    damaged = [f.name for folder in (path / CHECKPOINTS_DIR, path) for _, f in sorted(_step_folders(folder).items())]
    raise CheckpointError(
        f"No complete checkpoint in {path} (looked for {path / CHECKPOINTS_DIR}/step-*/, {path}/step-*/ and "
        f"{path / _SINGLE_DIR}/"
        + (f"; found only damaged or incomplete ones: {', '.join(damaged[-3:])}" if damaged else "")
        + "); train first, or pass the checkpoint folder.")


def history(run_dir: str | os.PathLike) -> list[Path]:
    """The complete step folders of a run (``run_dir`` or its ``checkpoints/``), oldest first.

    Interrupted re-saves are recovered as in :func:`latest`; a run of the single
    ``checkpoint/`` layout has no step folders, so its history is ``[]``. Example::

        for folder in history("runs/x"):
            state, meta = load(folder)
            print(folder.name, meta["step"])
    """
    run_dir = _absolute(run_dir)
    folder = run_dir / CHECKPOINTS_DIR if (run_dir / CHECKPOINTS_DIR).is_dir() else run_dir
    return [f for _, f in sorted(_step_folders(folder).items()) if _is_complete(f)]


def _check_step(step: Any) -> int:
    """``step`` as an int; a ValueError that teaches otherwise."""
    try:
        value = operator.index(step) if not isinstance(step, bool) else None
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"save_step: step must be a non-negative int, got {step!r}; e.g. "
                         "save_step(run_dir, state, step=int(state.step)).")
    return value


def _check_keep_last(keep_last: Any) -> int:
    """``keep_last`` as a count, 0 meaning all; a ValueError that teaches otherwise."""
    if keep_last is None:
        return 0
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"save_step: keep_last must be a positive int (how many of the newest checkpoints to "
                         f"keep), or None or 0 (keep them all), got {keep_last!r}; e.g. keep_last=3.")
    return keep_last


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def _holds_checkpoint_files(path: Path) -> bool:
    return (path / STATE_FILE).exists() or (path / TENSORS_FILE).exists()


def _make_checkpoints_dir(run_dir: Path) -> Path:
    """``run_dir/checkpoints``, created (and its entry made durable) when missing."""
    folder = run_dir / CHECKPOINTS_DIR
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"save_step: {folder} exists and is not a folder; it is where the run's "
                              "checkpoints go. Move it away, or choose another run folder.")
    if not folder.is_dir():
        run_dir.mkdir(parents=True, exist_ok=True)
        folder.mkdir(exist_ok=True)
        _fsync_dir(run_dir)
        _fsync_dir(run_dir.parent)
    return folder


def _step_folders(folder: Path, *, writer: bool = False) -> dict[int, Path]:
    """The step folders in ``folder`` by step, complete or not, after recovering interrupted re-saves.

    A step with no visible folder but a complete ``.step-N.old-*`` (moved aside by a
    re-save that died before its new folder was in place) is renamed back. A reader
    does not rename a folder whose writer is another running process (it returns
    the hidden one); the writer (``writer=True``, the run's only one) always does.
    """
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    visible: dict[int, Path] = {}
    aside: dict[int, list[Path]] = {}
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        if (match := _STEP_DIR.fullmatch(entry.name)) and entry.name == _step_name(int(match[1])):
            visible[int(match[1])] = Path(entry.path)
        elif (match := _HIDDEN_STEP.fullmatch(entry.name)) and match[2] == "old":
            aside.setdefault(int(match[1][len("step-"):]), []).append(Path(entry.path))
    for step, moved in aside.items():
        complete = [m for m in moved if step not in visible and _is_complete(m)]
        if complete:
            newest = max(complete, key=lambda m: (m / STATE_FILE).stat().st_mtime)
            visible[step] = _restore(newest, folder / _step_name(step), writer=writer)
    return visible


def _latest_step(folder: Path) -> Path | None:
    """The newest complete step folder in ``folder``: the pointer's when it is the newest, else by scanning."""
    folders = _step_folders(folder)
    if not folders:
        return None
    newest = max(folders)
    named = _read_pointer(folder)
    if named == folders[newest].name and _is_complete(folders[newest]):
        return folders[newest]  # the usual case: the pointer and the folders agree
    skip = folders[newest] if named == folders[newest].name else None  # already found incomplete
    return next((f for _, f in sorted(folders.items(), reverse=True) if f != skip and _is_complete(f)), None)


def _single(path: Path) -> Path | None:
    """``path`` (a checkpoint written by :func:`save`) when complete, else its interrupted save, put back."""
    if path.is_dir():
        return path if _is_complete(path) else None
    if path.exists() or not path.parent.is_dir():
        return None
    complete = _interrupted_save_siblings(path)
    return _restore(complete[0], path, writer=False) if complete else None


def _restore(hidden: Path, path: Path, *, writer: bool) -> Path:
    """Rename the complete ``hidden`` folder back to ``path``; returns where the checkpoint now is.

    A reader leaves ``hidden`` alone when the process named in it is still running
    (it may be a save between its two renames), and when the rename fails (the folder
    is read-only, or ``path`` came back meanwhile); the writer must succeed.
    """
    if not writer and _writer_running(hidden):
        return hidden
    try:
        os.rename(hidden, path)
    except OSError:
        if writer:
            raise
        return path if path.is_dir() else hidden
    _fsync_dir(path.parent)
    return path


def _writer_running(hidden: Path) -> bool:
    """Whether the pid in ``.NAME.role-<pid>-<random>`` is another process that is still running."""
    match = re.search(r"-(\d+)-[0-9a-f]+$", hidden.name)
    if match is None or int(match[1]) == os.getpid() or os.name != "posix":
        return False  # this process is not saving now (one save at a time); elsewhere, no cheap probe
    try:
        os.kill(int(match[1]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _read_pointer(folder: Path) -> str | None:
    """The step folder name that ``folder/latest`` holds; ``None`` when missing or not a step folder name."""
    try:
        name = (folder / POINTER_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    match = _STEP_DIR.fullmatch(name)
    return name if match and name == _step_name(int(match[1])) else None


def _write_pointer(folder: Path, name: str) -> None:
    """Replace ``folder/latest`` atomically: a fsynced temporary file, ``os.replace``, the folder fsynced."""
    tmp = folder / f".{POINTER_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / POINTER_FILE)
    _fsync_dir(folder)


def _prune(folder: Path, *, keep: Path, keep_last: int) -> None:
    """Delete all step folders but ``keep`` and the newest complete ones, ``keep_last`` in all (0: none deleted).

    Each folder is renamed to a hidden ``.step-N.del-*`` before it is deleted, so it
    vanishes from the history at once rather than file by file.
    """
    if keep_last == 0:
        return
    kept = 1  # `keep`, just written and complete
    for _, path in sorted(_step_folders(folder, writer=True).items(), reverse=True):
        if path == keep:
            continue
        if kept < keep_last and _is_complete(path):
            kept += 1
            continue
        doomed = _sibling(path, "del")
        os.rename(path, doomed)
        _fsync_dir(folder)
        shutil.rmtree(doomed)


def _remove_history_leftovers(folder: Path) -> None:
    """Delete the hidden folders and files that interrupted saves, re-saves and prunes left in ``folder``.

    Called by the run's writer after :func:`_step_folders` has put back every complete
    ``.old`` folder that a step still needs.
    """
    for entry in list(os.scandir(folder)):
        if _HIDDEN_STEP.fullmatch(entry.name):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif _HIDDEN_POINTER.fullmatch(entry.name):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


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


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` of the checkpoint folder ``path``, without reading its tensors.

    For deciding how to rebuild the state (model configuration, tokenizer, step)
    before :func:`load`; the tensors file is neither read nor verified here.
    """
    return _read_state_file(_absolute(path))["meta"]


def _read_state_file(path: Path) -> dict:
    """The parsed, format-checked ``state.json`` of ``path``."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory (one with {STATE_FILE} and "
                              f"{TENSORS_FILE}).")
    if not path.is_dir():
        raise CheckpointError(_missing_checkpoint_message(path))
    state_path = path / STATE_FILE
    if not state_path.is_file() and not (path / TENSORS_FILE).exists() and (
            (path / CHECKPOINTS_DIR).is_dir() or (path / _SINGLE_DIR).exists() or (path / POINTER_FILE).exists()):
        raise CheckpointError(f"{path} is a run folder, not a checkpoint: load(resolve('{path}')) loads its "
                              "newest complete checkpoint.")
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
    complete = _interrupted_save_siblings(path)
    if not complete:
        return message
    use = complete[0]
    which = ("the new checkpoint being saved" if use.name.startswith(f".{path.name}.tmp-")
             else "the previous checkpoint")
    others = [str(s) for s in complete[1:]]
    return (f"{message} A save into it was interrupted; {use} is complete and holds {which}. "
            f"To use it: mv '{use}' '{path}'"
            + (f" (also complete, and older or previous: {', '.join(others)})." if others else "."))


def _interrupted_save_siblings(path: Path) -> list[Path]:
    """The complete hidden siblings a :func:`save` to ``path`` left behind, the one to use first.

    The one to use is the newest complete ``.NAME.tmp-*`` (the new checkpoint), else the
    newest complete ``.NAME.old-*`` (the previous one).
    """
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    siblings = [s for s in path.parent.glob(glob.escape(f".{path.name}.") + "*") if s.name.startswith(prefixes)]
    complete = [s for s in siblings if _is_complete(s)]
    new = [s for s in complete if s.name.startswith(prefixes[0])]
    if not complete:
        return []
    use = max(new or complete, key=lambda s: (s / STATE_FILE).stat().st_mtime)
    return [use] + [s for s in complete if s != use]


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
