"""A run's checkpoint history: save_step, latest, resolve, history.

The properties the module docstring promises: the newest ``keep_last`` complete
steps are kept; ``latest`` finds the newest complete one whatever the pointer
says; and a crash (an exception at any file-system call, a snapshot of the disk
between any two calls, or a SIGKILL at a random moment) always leaves a complete
checkpoint holding the previous or the new state, recovered without a ``mv`` by hand.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optree
import pytest
import safetensors.torch
import torch

from minillm_func import checkpoint as ckpt
from minillm_func import optim
from minillm_func.checkpoint import CheckpointError, history, latest, load, resolve, save, save_step
from minillm_func.step import TrainState, init_train_state


# --------------------------------------------------------------------------- helpers


def train_state(step: int) -> TrainState:
    """A TrainState whose every tensor depends on ``step``, so that two steps never look alike."""
    g = torch.Generator().manual_seed(step)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).bfloat16()}
    state = init_train_state(params, optim.adamw(1e-3))
    mu = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in params.items()}
    return state._replace(step=torch.tensor(step), opt_state=state.opt_state._replace(mu=mu))


def assert_same(a, b):
    """Same structure and NamedTuple classes; tensors equal bit for bit, with the same dtype and shape."""
    leaves_a, spec_a = optree.tree_flatten(a, none_is_leaf=True)
    leaves_b, spec_b = optree.tree_flatten(b, none_is_leaf=True)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        else:
            assert x == y


def same(a, b) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return False
    return True


def step_of(folder: Path) -> int:
    assert folder.name.startswith("step-"), folder
    return int(folder.name[len("step-"):])


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def truncate(folder: Path) -> None:
    file = folder / ckpt.TENSORS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


class Crash(BaseException):
    """Stands for the process dying: nothing in save_step handles it."""


# --------------------------------------------------------------------------- saving a history


def test_keep_last_keeps_the_newest_steps_and_latest_names_the_last(tmp_path):
    run = tmp_path / "run"
    returned = [save_step(run, train_state(s), step=s, meta={"step": s}, keep_last=3) for s in range(1, 6)]
    folder = run / ckpt.CHECKPOINTS_DIR
    assert returned == [folder / f"step-{s:06d}" for s in range(1, 6)]
    assert sorted(os.listdir(folder)) == ["latest", "step-000003", "step-000004", "step-000005"]
    assert (folder / "latest").read_text() == "step-000005\n"
    assert history(run) == [folder / f"step-{s:06d}" for s in (3, 4, 5)]
    assert latest(run) == latest(folder) == resolve(run) == folder / "step-000005"
    assert latest(folder / "step-000004") == folder / "step-000004"  # a checkpoint folder itself
    state, meta = load(latest(run))
    assert_same(state, train_state(5))
    assert type(state) is TrainState and meta == {"step": 5}
    assert_same(load(folder / "step-000003", like=train_state(0))[0], train_state(3))


@pytest.mark.parametrize("keep_last, kept", [(None, [1, 2, 3, 4]), (0, [1, 2, 3, 4]), (1, [4]), (2, [3, 4])])
def test_keep_last_none_or_zero_keeps_everything(tmp_path, keep_last, kept):
    for s in range(1, 5):
        save_step(tmp_path, {"x": torch.full((2,), float(s))}, step=s, keep_last=keep_last)
    assert [step_of(f) for f in history(tmp_path)] == kept


def test_pruning_keeps_complete_folders_in_place_of_damaged_ones(tmp_path):
    for s in (1, 2, 3):
        save_step(tmp_path, {"x": torch.full((8,), float(s))}, step=s, keep_last=0)
    truncate(tmp_path / "checkpoints" / "step-000003")
    save_step(tmp_path, {"x": torch.full((8,), 4.0)}, step=4, keep_last=2)
    # step 3 is damaged, so the second folder kept is step 2; the damaged one goes
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000002", "step-000004"]


def test_saving_a_step_again_replaces_it_and_leaves_nothing_else(tmp_path):
    save_step(tmp_path, train_state(1), step=1)
    save_step(tmp_path, train_state(2), step=2)
    save_step(tmp_path, train_state(20), step=2, meta={"again": True})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000001", "step-000002"]
    assert_same(load(resolve(tmp_path)), (train_state(20), {"again": True}))


def test_a_history_only_moves_forward(tmp_path):
    save_step(tmp_path, {"x": torch.ones(1)}, step=5)
    with pytest.raises(ValueError, match=r"already holds step-000005, newer than step 3.*load\(resolve\("):
        save_step(tmp_path, {"x": torch.zeros(1)}, step=3)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000005"]


def test_step_may_be_a_0d_integer_tensor(tmp_path):
    state = train_state(7)
    assert save_step(tmp_path, state, step=state.step).name == "step-000007"


@pytest.mark.parametrize("kwargs, match", [
    ({"step": -1}, "step must be a non-negative int, got -1"),
    ({"step": 1.5}, "step must be a non-negative int, got 1.5"),
    ({"step": True}, "step must be a non-negative int"),
    ({"step": "3"}, "step must be a non-negative int"),
    ({"step": torch.tensor(2.0)}, "step must be a non-negative int"),
    ({"step": 1, "keep_last": -1}, r"keep_last must be a positive int .* got -1"),
    ({"step": 1, "keep_last": 2.0}, "keep_last must be a positive int"),
    ({"step": 1, "keep_last": True}, "keep_last must be a positive int"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_step(tmp_path / "run", {"x": torch.ones(1)}, **kwargs)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- finding the newest complete step


@pytest.fixture
def five(tmp_path):
    """A run with steps 1..5 kept, each holding a tensor filled with its step number."""
    for s in range(1, 6):
        save_step(tmp_path, {"x": torch.full((64,), float(s))}, step=s, keep_last=None)
    return tmp_path / "checkpoints"


@pytest.mark.parametrize("damage, expected", [
    ("pointer deleted", 5),
    ("pointer names a deleted folder", 5),
    ("pointer older than the folders", 5),   # a crash between the rename and the pointer update
    ("pointer garbled", 5),
    ("newest truncated", 4),                  # the pointer names an incomplete folder
    ("newest deleted", 4),                    # the pointer is stale
    ("newest without state.json", 4),
    ("two newest damaged, pointer older", 3),
])
def test_latest_falls_back_to_the_newest_complete_step(five, damage, expected):
    pointer = five / "latest"
    if damage == "pointer deleted":
        pointer.unlink()
    elif damage == "pointer names a deleted folder":
        pointer.write_text("step-000099\n")
    elif damage == "pointer older than the folders":
        pointer.write_text("step-000002\n")
    elif damage == "pointer garbled":
        pointer.write_text("../../etc\n")
    elif damage == "newest truncated":
        truncate(five / "step-000005")
    elif damage == "newest deleted":
        shutil.rmtree(five / "step-000005")
    elif damage == "newest without state.json":
        (five / "step-000005" / ckpt.STATE_FILE).unlink()
    else:
        truncate(five / "step-000005")
        (five / "step-000004" / ckpt.TENSORS_FILE).unlink()
        pointer.write_text("step-000001\n")
    found = latest(five.parent)
    assert found == five / f"step-{expected:06d}" == resolve(five)
    assert torch.equal(load(found)[0]["x"], torch.full((64,), float(expected)))
    save_step(five.parent, {"x": torch.zeros(1)}, step=6, keep_last=None)  # and the run goes on
    assert latest(five.parent) == five / "step-000006"


def test_latest_of_a_damaged_checkpoint_folder_is_none_and_resolve_says_why(five):
    truncate(five / "step-000005")
    assert latest(five / "step-000005") is None
    with pytest.raises(CheckpointError, match=r"step-000005 is not a complete checkpoint: .*truncated"):
        resolve(five / "step-000005")


def test_resolve_names_what_it_looked_for(tmp_path):
    with pytest.raises(CheckpointError) as err:
        resolve(tmp_path)
    message = str(err.value)
    assert f"No complete checkpoint in {tmp_path}" in message
    assert f"{tmp_path / 'checkpoints'}/step-*/" in message and f"{tmp_path / 'checkpoint'}/" in message
    assert "train first, or pass the checkpoint folder" in message and "\n" not in message
    assert latest(tmp_path) is None and history(tmp_path) == []
    with pytest.raises(CheckpointError, match=r"No checkpoint at .*nothing: it does not exist. Train first"):
        resolve(tmp_path / "nothing")


def test_resolve_names_the_damaged_folders_it_found(tmp_path):
    save_step(tmp_path, {"x": torch.ones(8)}, step=1)
    truncate(tmp_path / "checkpoints" / "step-000001")
    with pytest.raises(CheckpointError, match="found only damaged or incomplete ones: step-000001"):
        resolve(tmp_path)


def test_load_points_a_run_folder_to_resolve(tmp_path):
    save_step(tmp_path, {"x": torch.ones(1)}, step=1)
    with pytest.raises(CheckpointError, match=r"is a run folder, not a checkpoint: load\(resolve\("):
        load(tmp_path)
    assert_same(load(resolve(tmp_path))[0], {"x": torch.ones(1)})


# --------------------------------------------------------------------------- crashes during save_step

OLD, NEW = train_state(2), train_state(30)
WATCHED = [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "unlink"), (shutil, "rmtree"),
           (safetensors.torch, "save_file"), (ckpt, "open")]


def watch(monkeypatch, on_call):
    """Route every file-system call save_step makes through ``on_call(name, real, args, kwargs)``."""
    for owner, name in WATCHED:
        real = getattr(owner, name, open)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            return on_call(_name, _real, args, kwargs)
        monkeypatch.setattr(owner, name, wrapper, raising=False)


def crash_at(k):
    """An ``on_call`` that crashes at the k-th call; a tensors write is left torn (half a file) first."""
    calls = []

    def on_call(name, real, args, kwargs):
        calls.append(name)
        if len(calls) != k:
            return real(*args, **kwargs)
        if name == "save_file":
            real(*args, **kwargs)
            with open(args[1], "r+b") as f:
                f.truncate(os.path.getsize(args[1]) // 2)
        raise Crash(f"simulated crash at call {k} ({name})")
    return on_call


def old_run(tmp_path) -> Path:
    run = tmp_path / "run"
    save_step(run, train_state(1), step=1)
    save_step(run, OLD, step=2)
    return run


@pytest.mark.parametrize("new_step", [3, 2], ids=["next step", "same step again"])
def test_a_crash_at_any_call_leaves_the_old_or_the_new_state(tmp_path, monkeypatch, new_step):
    crashes = 0
    for k in range(1, 200):
        run = old_run(tmp_path / str(k))
        with monkeypatch.context() as m:
            watch(m, crash_at(k))
            try:
                save_step(run, NEW, step=new_step, keep_last=1)
            except Crash:
                crashes += 1
            else:
                break  # k is past the last call: every call has been crashed at once
        found = latest(run)
        assert found is not None, f"crash at call {k}: no complete checkpoint"
        state, _ = load(found)
        assert (step_of(found), same(state, OLD), same(state, NEW)) in ((2, True, False), (new_step, False, True)), \
            f"crash at call {k}: {found.name} holds neither the old nor the new state"
        after = save_step(run, train_state(40), step=step_of(found) + 1, keep_last=1)
        assert sorted(os.listdir(run / "checkpoints")) == ["latest", after.name], f"crash at call {k}"
        assert_same(load(resolve(run))[0], train_state(40))
    assert crashes >= 15  # write, fsyncs, renames, pointer, prune: each was a crash point


@pytest.mark.parametrize("new_step, keep_last", [(3, 1), (2, 1), (3, None)],
                         ids=["next step", "same step again", "keep all"])
def test_at_every_instant_of_a_save_the_disk_holds_the_old_or_the_new_state(tmp_path, monkeypatch, new_step,
                                                                              keep_last):
    """A copy of the run taken before and after each file-system call is what a crash there would leave."""
    run = old_run(tmp_path)
    snapshots = []

    def on_call(name, real, args, kwargs):
        if on_call.busy:  # the copy's own calls
            return real(*args, **kwargs)
        on_call.busy = True
        try:
            snapshots.append(shutil.copytree(run, tmp_path / f"snap-{len(snapshots)}", symlinks=True))
            result = real(*args, **kwargs)
            snapshots.append(shutil.copytree(run, tmp_path / f"snap-{len(snapshots)}", symlinks=True))
        finally:
            on_call.busy = False
        return result
    on_call.busy = False

    with monkeypatch.context() as m:
        watch(m, on_call)
        save_step(run, NEW, step=new_step, keep_last=keep_last)
    assert len(snapshots) >= 20  # two per call: mkdir, writes, fsyncs, renames, pointer (and prunes)
    seen = set()
    for snap in snapshots:
        found = latest(snap)  # restores the folder a re-save moved aside: this process is no longer saving
        assert found is not None and found.parent == snap / "checkpoints", snap.name
        state, _ = load(found)
        seen.add("old" if same(state, OLD) and step_of(found) == 2 else
                 "new" if same(state, NEW) and step_of(found) == new_step else f"wrong: {found}")
    assert seen == {"old", "new"}


SERVER = textwrap.dedent("""
    import os, sys, traceback
    import torch
    torch.set_num_threads(1)
    from minillm_func.checkpoint import save_step

    run, size = sys.argv[1], int(sys.argv[2])
    while line := sys.stdin.readline():
        command, argument = line.split()
        if command == "start":  # a worker that saves steps argument, argument + 1, ... until it is killed
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    for step in range(int(argument), 10**6):
                        state = {"x": torch.full((size,), float(step)), "step": torch.tensor(step)}
                        save_step(run, state, step=step, meta={"step": step}, keep_last=2)
                        os.write(1, f"saved {step}\\n".encode())
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            print("worker", pid, flush=True)
        elif command == "reap":
            print("reaped", os.waitpid(int(argument), 0)[1], flush=True)
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and fork are POSIX")
def test_sigkill_at_random_moments_always_leaves_a_complete_checkpoint(tmp_path):
    """20 workers, each SIGKILLed at a random moment (seeded) while saving 2 MB steps in a loop.

    One ``python -c`` server imports torch once and forks each worker (a fresh
    interpreter per kill would cost ~2 s of imports each). A worker continues from
    the newest step + 1, or, every other time, from the newest step itself, so that
    re-saves of an existing step are killed too (those workers are killed sooner, to
    land in that first save). After every kill, :func:`resolve` must load a complete
    checkpoint whose contents match its step, and nothing may be lost: neither a step
    whose save_step returned, nor the step found after the previous kill.
    """
    run, size, rng = tmp_path / "run", 1 << 19, random.Random(0)
    errors = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(run), str(size)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=errors, text=True,
                              cwd=Path(ckpt.__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})

    def stderr():
        errors.seek(0)
        return errors.read()

    def read():
        line = server.stdout.readline()
        assert line, f"the server died: {stderr()}"
        kind, value = line.split()
        return kind, int(value)

    try:
        durable, interrupted = 0, 0  # durable: the newest step found complete, or whose save_step returned
        for kill in range(20):
            resave = kill % 2 == 1  # this worker starts by saving the newest step again
            server.stdin.write(f"start {durable if resave else durable + 1}\n")
            server.stdin.flush()
            saved, pid = [], None
            # a worker going forward is let save once first, so the run moves on however slow the machine is
            while pid is None or not (resave or saved):
                kind, value = read()
                if kind == "worker":
                    pid = value
                else:
                    saved.append(value)
            time.sleep(rng.uniform(0.0, 0.03 if resave else 0.12))
            os.kill(pid, signal.SIGKILL)
            server.stdin.write(f"reap {pid}\n")
            server.stdin.flush()
            while (line := read())[0] != "reaped":
                saved.append(line[1])
            status = line[1]
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                f"the worker was not killed while saving (status {status}): {stderr()}"
            durable = max([durable, *saved])
            folder = run / "checkpoints"
            interrupted += folder.is_dir() and bool(hidden(folder))
            found = latest(run)
            if found is None:  # killed before the first save completed
                assert durable == 0
                continue
            assert found == resolve(run) and found.parent == folder
            step = step_of(found)
            state, meta = load(found)
            assert meta == {"step": step} and int(state["step"]) == step
            assert torch.equal(state["x"], torch.full((size,), float(step)))
            assert step >= durable, f"step {durable} was complete, yet the newest checkpoint is step {step}"
            durable = step
    finally:
        server.stdin.close()
        server.kill()
        server.wait()
        errors.close()
    assert durable >= 10 and interrupted >= 1  # the run moved on, and kills landed in the middle of saves
    save_step(run, {"x": torch.zeros(1)}, step=durable + 1, keep_last=2)  # the run goes on, leftovers swept
    assert hidden(run / "checkpoints") == [] and len(history(run)) == 2


# --------------------------------------------------------------------------- recovering interrupted saves


def test_a_reader_puts_back_a_step_that_an_interrupted_re_save_moved_aside(tmp_path, monkeypatch):
    save_step(tmp_path, OLD, step=2)
    with monkeypatch.context() as m:  # crash at the second rename of the re-save: step-000002 is moved aside
        calls = {"rename": 0}
        real_rename = os.rename

        def rename(src, dst):
            calls["rename"] += 1
            if calls["rename"] == 2:
                raise Crash("between the two renames")
            return real_rename(src, dst)
        m.setattr(os, "rename", rename)
        with pytest.raises(Crash):
            save_step(tmp_path, NEW, step=2)
    folder = tmp_path / "checkpoints"
    assert "step-000002" not in os.listdir(folder)
    assert [n.split("-")[1] for n in hidden(folder)] == ["000002.old", "000002.tmp"]
    assert history(tmp_path) == [folder / "step-000002"]  # put back in place, no mv by hand
    assert_same(load(latest(tmp_path))[0], OLD)  # the interrupted re-save is undone
    save_step(tmp_path, NEW, step=2)
    assert hidden(folder) == []


def test_a_folder_moved_aside_by_a_running_writer_is_used_where_it_is(tmp_path):
    save_step(tmp_path, OLD, step=2)
    folder = tmp_path / "checkpoints"
    alive = os.getppid()  # a running process other than this one: its save may be between two renames
    aside = folder / f".step-000002.old-{alive}-0123abcd"
    os.rename(folder / "step-000002", aside)
    assert latest(tmp_path) == aside and not (folder / "step-000002").exists()
    assert_same(load(resolve(tmp_path))[0], OLD)
    save_step(tmp_path, NEW, step=3)  # the run's own writer puts it back, then prunes as usual
    assert sorted(os.listdir(folder)) == ["latest", "step-000002", "step-000003"]


def test_a_checkpoint_of_the_single_folder_layout_is_found(tmp_path):
    save(tmp_path / "checkpoint", OLD, meta={"step": 2})
    assert latest(tmp_path) == resolve(tmp_path) == tmp_path / "checkpoint"
    assert latest(tmp_path / "checkpoint") == tmp_path / "checkpoint"
    assert history(tmp_path) == []
    save_step(tmp_path, NEW, step=3)  # the history, once there, comes first
    assert latest(tmp_path) == tmp_path / "checkpoints" / "step-000003"


@pytest.mark.parametrize("keep", ["new", "old"])
@pytest.mark.parametrize("ask", ["run", "checkpoint"])
def test_an_interrupted_save_of_the_single_folder_layout_is_put_back(tmp_path, monkeypatch, keep, ask):
    path = tmp_path / "checkpoint"
    save(path, OLD, meta={"step": 2})
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise Crash("between the two renames")
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash):
        save(path, NEW, meta={"step": 3})
    monkeypatch.undo()
    (tmp,) = tmp_path.glob(".checkpoint.tmp-*")
    if keep == "old":  # the new one did not get complete: the previous one is put back
        truncate(tmp)
    with pytest.raises(CheckpointError, match="interrupted"):
        load(path)  # load itself still only names the folder to use
    assert latest(tmp_path if ask == "run" else path) == path
    assert_same(load(path), (NEW, {"step": 3}) if keep == "new" else (OLD, {"step": 2}))
    save(path, NEW, meta={"step": 4})  # and the next save sweeps the other sibling away
    assert os.listdir(tmp_path) == ["checkpoint"]
