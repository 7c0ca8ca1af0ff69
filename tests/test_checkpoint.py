import importlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm_func import accumulate, amp, optim
from minillm_func import checkpoint as ckpt
from minillm_func import tree as T
from minillm_func.checkpoint import CheckpointError, check_meta, load, save
from strategies import gen, param_trees, seeds


class Pair(NamedTuple):
    """A NamedTuple from outside minillm_func: loading it needs the caller's permission."""

    first: Any
    second: Any


class Other(NamedTuple):
    first: Any
    second: Any


# --------------------------------------------------------------------------- strategies and helpers

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32,
          torch.uint8, torch.bool]


@st.composite
def tensors(draw, *, max_rank=3, max_side=3):
    """A tensor of any supported dtype, 0-d and empty shapes included, with NaN/inf/-0.0 in float ones."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, max_side), max_size=max_rank))
    g = gen(draw(seeds))
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 200, shape, generator=g).to(dtype)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    if x.numel() and draw(st.booleans()):
        x.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf, -0.0]))
    return x


scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=6) | st.floats()
keys = st.text(max_size=6)  # any str: empty, dots, quotes, unicode


def states(leaves=tensors() | scalars):
    """Nested NamedTuples (minillm_func's and a foreign one), tuples, lists and dicts."""
    def grow(children):
        return (st.lists(children, max_size=3) | st.lists(children, max_size=3).map(tuple)
                | st.dictionaries(keys, children, max_size=3)
                | st.builds(Pair, children, children)
                | st.builds(optim.ClipState, children))
    return st.recursive(leaves, grow, max_leaves=10)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)
metas = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def assert_same(a, b, path="state"):
    """Same container types and NamedTuple classes, same scalars, tensors equal bit for bit with the same dtype."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(bits(a), bits(b)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def training_state(params, seed):
    """The states a trainer checkpoints, after one real update so that no moment is all zeros."""
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    injected = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.1)
    g = gen(seed)
    grads = T.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)
    _, opt_state = opt.update(grads, opt.init(params), params)
    _, inj_state = injected.update(grads, injected.init(params), params)
    scaler = amp.scaler_update(amp.scaler_init(), torch.tensor(True))
    accum = accumulate.accum_add(accumulate.accum_init(params), grads, 7)
    return Pair(
        first={"step": torch.tensor(3), "params": params, "opt_state": opt_state, "scaler": scaler},
        second=(accum, inj_state, None, {"bf16": torch.randn(2, 3, generator=g).bfloat16(),
                                         "mask": torch.tensor([True, False]), "lr": 1e-3}))


def visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------- round trips


@given(states(), metas)
def test_round_trip_any_state(tmp_path_factory, state, meta):
    path = tmp_path_factory.mktemp("rt") / "ckpt"
    save(path, state, meta=meta)
    loaded, loaded_meta = load(path, namedtuple_classes={Pair})
    assert_same(loaded, state)
    assert loaded_meta == meta
    assert sorted(os.listdir(path)) == [ckpt.STATE_FILE, ckpt.TENSORS_FILE]


@given(param_trees(dtype=torch.float32) | param_trees(dtype=torch.float64), seeds, st.integers(0, 10**6))
def test_round_trip_training_state(tmp_path_factory, params, seed, step):
    state = training_state(params, seed)
    meta = {"model": {"dim": 64, "n_layers": 2}, "step": step, "data": {"epoch": 1, "position": 17},
            "tokenizer": {"kind": "byte", "vocab_size": 259}}
    path = tmp_path_factory.mktemp("train") / "ckpt"
    save(path, state, meta=meta)
    loaded, loaded_meta = load(path, like=state)  # the classes in `like` are trusted
    assert_same(loaded, state)
    assert type(loaded.first["opt_state"][1]) is optim.AdamWState
    assert type(loaded.second[1]) is optim.InjectHyperparamsState
    assert loaded_meta == meta
    again, _ = load(path, namedtuple_classes=[Pair])
    assert_same(again, state)


def test_tensors_sharing_memory_are_saved_as_separate_copies(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "view": torch.arange(6.0)[1:3]}
    state["tied"] = state["w"]  # shares memory: safetensors alone would refuse it
    save(tmp_path / "ckpt", state)
    loaded, meta = load(tmp_path / "ckpt")
    loaded["w"].add_(1)  # writable, and not aliased to `tied`
    assert torch.equal(loaded["tied"], state["w"]) and torch.equal(loaded["view"], torch.tensor([1.0, 2.0]))
    assert meta == {}


def test_save_replaces_an_existing_checkpoint_and_leaves_nothing_else(tmp_path):
    save(tmp_path / "ckpt", {"x": torch.zeros(3)}, meta={"step": 1})
    save(tmp_path / "ckpt", {"x": torch.ones(2), "y": None}, meta={"step": 2})
    state, meta = load(tmp_path / "ckpt")
    assert_same(state, {"x": torch.ones(2), "y": None})
    assert meta == {"step": 2}
    assert os.listdir(tmp_path) == ["ckpt"]


def test_tensor_keys_are_the_leaf_paths(tmp_path):
    save(tmp_path / "ckpt", optim.AdamWState(torch.tensor(1), {"w": torch.ones(2)}, [torch.zeros(1)]))
    keys = set(safetensors.torch.load_file(tmp_path / "ckpt" / ckpt.TENSORS_FILE))
    assert keys == {"state.count", "state.mu['w']", "state.nu[0]"}


# --------------------------------------------------------------------------- crashes during save


class Crash(BaseException):
    """Stands for the process dying: nothing in save() handles it."""


def fail_on_call(real, n):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise Crash(f"simulated crash at call {n}")
        return real(*args, **kwargs)
    return wrapper


OLD = {"w": torch.arange(4.0), "step": torch.tensor(1)}
NEW = {"w": torch.arange(4.0) * 10, "step": torch.tensor(2), "extra": [torch.ones(3)]}


@pytest.mark.parametrize("where", ["tensors_write", "fsync", "first_rename", "between_renames", "delete_old"])
def test_a_crash_during_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "ckpt"
    save(path, OLD, meta={"step": 1})
    if where == "tensors_write":
        real = safetensors.torch.save_file

        def half(tensors, filename, **kw):
            real(tensors, filename, **kw)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise Crash("simulated crash while writing tensors")
        monkeypatch.setattr(safetensors.torch, "save_file", half)
    elif where == "fsync":  # the last fsync before any rename: both files fully written
        monkeypatch.setattr(ckpt, "_fsync_dir", fail_on_call(ckpt._fsync_dir, 1))
    elif where == "first_rename":
        monkeypatch.setattr(os, "rename", fail_on_call(os.rename, 1))
    elif where == "between_renames":
        monkeypatch.setattr(os, "rename", fail_on_call(os.rename, 2))
    else:
        monkeypatch.setattr(shutil, "rmtree", fail_on_call(shutil.rmtree, 1))

    with pytest.raises(Crash):
        save(path, NEW, meta={"step": 2})
    monkeypatch.undo()

    assert visible(tmp_path) in (["ckpt"], [])  # never a half-written `ckpt`
    if where == "between_renames":
        # `ckpt` is gone, the new and the old checkpoints are both complete hidden siblings
        with pytest.raises(CheckpointError, match="interrupted") as err:
            load(path)
        (new_dir,) = tmp_path.glob(".ckpt.tmp-*")
        (old_dir,) = tmp_path.glob(".ckpt.old-*")
        assert f"mv '{new_dir}' '{path}'" in str(err.value)
        assert_same(load(old_dir)[0], OLD)
        os.rename(new_dir, path)  # what the error says to do
        assert_same(load(path)[0], NEW)
    elif where == "delete_old":
        assert_same(load(path), (NEW, {"step": 2}))
    else:
        assert_same(load(path), (OLD, {"step": 1}))

    save(path, NEW, meta={"step": 3})  # the next save works and sweeps the leftovers away
    assert os.listdir(tmp_path) == ["ckpt"]
    assert_same(load(path), (NEW, {"step": 3}))


def test_a_crash_before_the_first_checkpoint_lands_names_the_complete_one(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "rename", fail_on_call(os.rename, 1))
    with pytest.raises(Crash):
        save(tmp_path / "ckpt", NEW)
    monkeypatch.undo()
    (new_dir,) = tmp_path.glob(".ckpt.tmp-*")
    with pytest.raises(CheckpointError, match="holds the new checkpoint being saved") as err:
        load(tmp_path / "ckpt")
    assert f"mv '{new_dir}' '{tmp_path / 'ckpt'}'" in str(err.value)


def test_missing_checkpoint_without_leftovers(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint at .*does not exist") as err:
        load(tmp_path / "nothing")
    assert "mv" not in str(err.value)


# --------------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    save(path, {"w": torch.randn(64, 64), "count": torch.tensor(5)}, meta={"step": 5})
    return path


def test_truncated_tensors_file_is_refused(saved):
    file = saved / ckpt.TENSORS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load(saved)
    assert str(file) in str(err.value) and "earlier checkpoint" in str(err.value)


def test_corrupted_tensors_file_is_refused(saved):
    file = saved / ckpt.TENSORS_FILE
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as err:
        load(saved)
    assert str(file) in str(err.value) and "SHA-256" in str(err.value)


@pytest.mark.parametrize("name", [ckpt.STATE_FILE, ckpt.TENSORS_FILE])
def test_missing_file_is_refused(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match="is missing") as err:
        load(saved)
    assert str(saved / name) in str(err.value)


@pytest.mark.parametrize("text", ["{not json", '{"format": "something else"}', "[]"])
def test_garbled_state_file_is_refused(saved, text):
    (saved / ckpt.STATE_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=ckpt.STATE_FILE):
        load(saved)


@pytest.mark.parametrize("node, match", [
    ({"type": "tensor", "key": "no such key"}, r"state\['w'\].*missing from"),
    ({"type": "int", "value": [1]}, r"corrupted.*state\['w'\] should be of type int"),
    ({"type": "pickle", "value": "..."}, r"corrupted.*state\['w'\] has no valid node type"),
    ({"type": "list"}, r"state.json is corrupted.*malformed"),
])
def test_malformed_tree_is_refused(saved, node, match):
    doc = json.loads((saved / ckpt.STATE_FILE).read_text())
    doc["tree"]["items"]["w"] = node
    (saved / ckpt.STATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=match):
        load(saved)


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        load(tmp_path / "ckpt")


# --------------------------------------------------------------------------- `like`: the state the caller expects


LIKE = {"params": {"w": torch.zeros(3, 2), "b": torch.zeros(2)},
        "opt": optim.AdamWState(torch.tensor(0), {"w": torch.zeros(3, 2)}, {"w": torch.zeros(3, 2)})}


@pytest.mark.parametrize("change, leaf, expected, found", [
    (lambda s: s["params"].update(w=torch.zeros(2, 3)), "state['params']['w']", "(3, 2)", "(2, 3)"),
    (lambda s: s["params"].update(b=torch.zeros(2, dtype=torch.bfloat16)), "state['params']['b']",
     "torch.float32", "torch.bfloat16"),
    (lambda s: s["params"].pop("b"), "state['params']['b']", "a tensor of shape (2,)", "found nothing"),
    (lambda s: s["params"].update(c=torch.zeros(1)), "state['params']['c']", "expected nothing", "(1,)"),
    (lambda s: s["opt"].mu.update(w=torch.zeros(3)), "state['opt'].mu['w']", "(3, 2)", "(3,)"),
    (lambda s: s.update(opt=tuple(s["opt"])), "state['opt']", "AdamWState", "tuple"),
])
def test_like_mismatch_names_the_leaf(tmp_path, change, leaf, expected, found):
    state = {"params": dict(LIKE["params"]), "opt": LIKE["opt"]._replace(mu=dict(LIKE["opt"].mu))}
    change(state)
    save(tmp_path / "ckpt", state)
    with pytest.raises(CheckpointError, match="different model configuration") as err:
        load(tmp_path / "ckpt", like=LIKE)
    message = str(err.value)
    assert f"at {leaf} expected" in message and expected in message and found in message


def test_like_accepts_a_matching_state(tmp_path):
    save(tmp_path / "ckpt", LIKE)
    loaded, _ = load(tmp_path / "ckpt", like=T.tree_map(torch.ones_like, LIKE))
    assert_same(loaded, LIKE)


# --------------------------------------------------------------------------- loading runs no code from the file


def rename_class(path: Path, name: str):
    doc = json.loads((path / ckpt.STATE_FILE).read_text())
    doc["tree"]["class"] = name
    (path / ckpt.STATE_FILE).write_text(json.dumps(doc))


def test_foreign_namedtuple_needs_permission(tmp_path):
    save(tmp_path / "ckpt", Pair(torch.ones(1), 2))
    with pytest.raises(CheckpointError, match="Refusing.*namedtuple_classes"):
        load(tmp_path / "ckpt")
    assert_same(load(tmp_path / "ckpt", namedtuple_classes={Pair})[0], Pair(torch.ones(1), 2))
    assert_same(load(tmp_path / "ckpt", namedtuple_classes={f"{Pair.__module__}:Pair": Other})[0],
                Other(torch.ones(1), 2))


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "subprocess:Popen", "minillm_func_evil:X",
                                  "minillm_func.optim:Transform.__init__", "minillm_func.optim:__builtins__",
                                  "minillm_func.optim:adamw", "minillm_func.nowhere:State"])
def test_unsafe_classes_are_refused_without_importing_them(tmp_path, monkeypatch, name):
    save(tmp_path / "ckpt", Pair(torch.ones(1), 2))
    rename_class(tmp_path / "ckpt", name)
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda module, *a: imported.append(module) or real(module, *a))
    with pytest.raises(CheckpointError, match="Refusing|no longer exists"):
        load(tmp_path / "ckpt", namedtuple_classes={Pair})
    assert all(m.startswith("minillm_func.") for m in imported)
    assert imported == (["minillm_func.nowhere"] if name == "minillm_func.nowhere:State"
                        else ["minillm_func.optim"] if name == "minillm_func.optim:adamw" else [])


def test_a_module_named_by_the_file_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "ckpt_payload.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from typing import NamedTuple\nclass Payload(NamedTuple):\n    a: int\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    save(tmp_path / "ckpt", Pair(torch.ones(1), 2))
    rename_class(tmp_path / "ckpt", "ckpt_payload:Payload")
    with pytest.raises(CheckpointError, match="Refusing .*'ckpt_payload:Payload'"):
        load(tmp_path / "ckpt")
    assert not marker.exists() and "ckpt_payload" not in sys.modules


def test_changed_fields_are_reported(tmp_path):
    save(tmp_path / "ckpt", amp.scaler_init())
    doc = json.loads((tmp_path / "ckpt" / ckpt.STATE_FILE).read_text())
    doc["tree"]["fields"]["old_name"] = doc["tree"]["fields"].pop("scale")
    (tmp_path / "ckpt" / ckpt.STATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="another version"):
        load(tmp_path / "ckpt")


# --------------------------------------------------------------------------- save refuses bad input


@pytest.mark.parametrize("state, match", [
    ({"x": {1, 2}}, r"state\['x'\] of type builtins.set"),
    ({1: torch.ones(1)}, "dict keys must be str"),
    ([torch.ones(1).to_sparse()], "to_dense"),
    ({"x": torch.ones(1).numpy()[0]}, "float"),
])
def test_save_rejects_unsupported_leaves_before_writing(tmp_path, state, match):
    with pytest.raises(TypeError, match=match):
        save(tmp_path / "ckpt", state)
    assert os.listdir(tmp_path) == []


def test_save_rejects_local_namedtuples_and_bad_meta(tmp_path):
    Local = NamedTuple("Local", [("a", int)])
    Local.__qualname__ = "f.<locals>.Local"
    with pytest.raises(TypeError, match="inside a function"):
        save(tmp_path / "ckpt", Local(1))
    with pytest.raises(TypeError, match="meta must hold JSON values"):
        save(tmp_path / "ckpt", {}, meta={"bad": object()})
    assert os.listdir(tmp_path) == []


def test_save_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not part of a checkpoint"):
        save(tmp_path, {"x": torch.ones(1)})
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- check_meta


def test_check_meta_names_each_differing_key():
    meta = {"model": {"dim": 64, "n_layers": 2, "vocab_size": 259}, "step": 10}
    with pytest.raises(CheckpointError, match="different model configuration") as err:
        check_meta(meta, {"model": {"dim": 128, "n_layers": 2, "n_heads": 4}})
    message = str(err.value)
    assert "model.dim: 64 in the checkpoint, 128 now" in message
    assert "model.n_heads: missing in the checkpoint" in message
    assert "n_layers" not in message and "step" not in message


def test_check_meta_compares_as_json():
    check_meta({"shape": [1, 2], "flag": True}, {"shape": (1, 2), "flag": True})
    with pytest.raises(CheckpointError, match="flag: 1 in the checkpoint, true now"):
        check_meta({"flag": 1}, {"flag": True})
