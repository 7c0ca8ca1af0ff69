"""The impure shell: fit, checkpoints, resume, Ctrl-C, the CLI and the examples."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minillm_func as mf
from minillm_func import checkpoint

ROOT = Path(__file__).resolve().parents[1]
tok = mf.ByteTokenizer()
CFG = mf.ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4, max_seq_len=32)


def data():
    return mf.LanguageModelingDataset(mf.demo_corpus(0, n_pretrain=40).pretrain, tok, 32, pack=True)


def interrupted_at(index: int):
    """Batches of ``data()`` until Ctrl-C arrives while batch ``index`` is being fetched."""
    for i, batch in enumerate(mf.Batches(data(), 4, seed=0)):
        if i == index:
            raise KeyboardInterrupt
        yield batch


def test_resume_gives_bit_identical_params(tmp_path):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, learning_rate=1e-3, accumulation_steps=2)
    params = model.init(0)
    straight = trainer.fit(trainer.init(params), mf.Batches(data(), 4, seed=3), 8, progress=False)

    first = mf.Batches(data(), 4, seed=3)
    trainer.fit(trainer.init(params), first, 5, out_dir=tmp_path, progress=False)
    state, meta = checkpoint.load(checkpoint.resolve(tmp_path), like=trainer.init(params))
    assert meta["step"] == 5 and state.step.item() == 5
    resumed_batches = mf.Batches(data(), 4, seed=3, position=tuple(meta["data_position"]))
    resumed = trainer.fit(state, resumed_batches, 8, out_dir=tmp_path, progress=False)
    for k in params:
        assert torch.equal(resumed.params[k], straight.params[k]), k
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, 9))


def test_ctrl_c_stops_cleanly_and_writes_a_final_checkpoint(tmp_path):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model)
    state = trainer.fit(trainer.init(model.init(0)), interrupted_at(3), 100, out_dir=tmp_path, progress=False)
    assert state.step.item() == 3
    saved, meta = checkpoint.load(checkpoint.resolve(tmp_path))
    assert meta["step"] == 3 and torch.equal(saved.params["tok_emb.weight"], state.params["tok_emb.weight"])


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model)
    trainer.fit(trainer.init(model.init(0)), mf.Batches(data(), 4), 1, out_dir=tmp_path, progress=False)
    other = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=4, max_seq_len=32))
    other_trainer = mf.create_trainer("pretrain", other)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(checkpoint.resolve(tmp_path), like=other_trainer.init(other.init(0)))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "minillm_func.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_trains_resumes_generates_and_evaluates(tmp_path):
    corpus = mf.demo_corpus(1, n_pretrain=30, n_sft=40)
    (tmp_path / "pre.txt").write_text("\n\n".join(corpus.pretrain))
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in corpus.sft))
    (tmp_path / "cfg.toml").write_text('dim = 32\nn_layers = 1\nmax_length = 48\nbatch_size = 4\n')
    common = ["--config", "cfg.toml", "--no-progress"]
    r = run_cli("train", "pretrain", "--data", "pre.txt", "--out", "pre", "--steps", "3", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["dim"] == 32
    r = run_cli("train", "pretrain", "--data", "pre.txt", "--out", "pre", "--steps", "5", "--resume", *common,
                cwd=tmp_path)
    assert r.returncode == 0 and "resuming pretrain at update 3" in r.stdout, r.stderr
    r = run_cli("train", "sft", "--data", "sft.jsonl", "--out", "sft", "--init", "pre", "--steps", "2",
                *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "--ckpt", "sft", "--prompt", "Q: reverse abc\nA: ", "--max-new-tokens", "5",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["prompt"] == "Q: reverse abc\nA: "
    r = run_cli("eval", "--ckpt", "sft", "--data", "sft.jsonl", cwd=tmp_path)
    assert r.returncode == 0 and "loss" in json.loads(r.stdout), r.stderr
    r = run_cli("train", "dpo", "--data", "sft.jsonl", "--out", "x", *common, cwd=tmp_path)
    assert r.returncode != 0 and "dpo training needs" in r.stderr


def test_demo_quick_runs_end_to_end(tmp_path):
    r = run_cli("demo", "--quick", "--out", "run", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["stages"]) == {"pretrain", "sft", "dpo", "grpo"}
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        assert (tmp_path / "run" / stage / "metrics.jsonl").exists()
        checkpoint.load(checkpoint.resolve(tmp_path / "run" / stage))
    assert "held-out exact match" in r.stdout and "mean reward of sampled replies" in r.stdout


def test_ctrl_c_inside_an_accumulation_window_saves_the_last_update_boundary(tmp_path):
    """The checkpoint holds the state after the last whole update and the position of the first
    micro-batch that state has not seen; resuming from it replays the cut window exactly."""
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, learning_rate=1e-3, accumulation_steps=2)
    params = model.init(0)
    straight = trainer.fit(trainer.init(params), mf.Batches(data(), 4, seed=3), 4, progress=False)

    window_step, calls = trainer.window_step, []

    def interrupted(state, micro_batches):  # Ctrl-C arrives inside the 3rd window (its 2 batches already drawn)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return window_step(state, micro_batches)

    cut = dataclasses.replace(trainer, window_step=interrupted)
    returned = cut.fit(cut.init(params), mf.Batches(data(), 4, seed=3), 4, out_dir=tmp_path, progress=False)
    saved, meta = checkpoint.load(checkpoint.resolve(tmp_path), like=trainer.init(params))
    assert meta["step"] == 2 and meta["data_position"] == [0, 4]
    assert int(returned.step) == 2 and int(saved.accum.micro_step) == 0
    resumed = trainer.fit(saved, mf.Batches(data(), 4, seed=3, position=tuple(meta["data_position"])), 4,
                          out_dir=tmp_path, progress=False)
    for k in params:
        assert torch.equal(resumed.params[k], straight.params[k]), k


@pytest.mark.parametrize("lr", [float("nan"), 1e38])
def test_fit_stops_after_max_skipped_non_finite_steps_and_saves_nothing_non_finite(tmp_path, lr):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, learning_rate=lr)
    with pytest.raises(mf.trainers.NonFiniteError, match="5 consecutive windows had non-finite") as e:
        trainer.fit(trainer.init(model.init(0)), mf.Batches(data(), 4), 10_000, out_dir=tmp_path,
                    checkpoint_every=1, max_skipped=5, progress=False)
    assert "last finite loss was" in str(e.value) and "learning rate" in str(e.value)
    for folder in checkpoint.history(tmp_path):
        state, _ = checkpoint.load(folder)
        assert all(torch.isfinite(v).all() for v in state.params.values())


def test_resuming_cuts_the_metrics_log_back_to_the_state_step(tmp_path):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model)
    state = trainer.fit(trainer.init(model.init(0)), mf.Batches(data(), 4), 3, out_dir=tmp_path, progress=False)
    log = tmp_path / "metrics.jsonl"
    # a run killed after its checkpoint at 3 logged steps 4 and 5, and was cut mid-line
    log.write_text(log.read_text() + json.dumps({"split": "train", "step": 4}) + "\n"
                   + json.dumps({"split": "eval", "step": 5}) + "\n" + '{"split": "tr')
    trainer.fit(state, mf.Batches(data(), 4, position=(0, 3)), 5, out_dir=tmp_path, progress=False)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all("loss" in r for r in rows)


def test_a_second_ctrl_c_during_the_final_save_waits_for_the_checkpoint(tmp_path, monkeypatch):
    import os
    import signal

    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model)
    real_save_step = checkpoint.save_step

    def save_step_hit_by_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while the checkpoint is written
        return real_save_step(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_step", save_step_hit_by_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(trainer.init(model.init(0)), interrupted_at(3), 100, out_dir=tmp_path, progress=False)
    saved, meta = checkpoint.load(checkpoint.resolve(tmp_path))
    assert meta["step"] == 3 and int(saved.step) == 3


def test_fit_without_a_step_count_runs_once_through_any_iterable_with_a_progress_total(tmp_path, capsys):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, learning_rate=1e-3, accumulation_steps=2)
    batches = list(mf.Batches(data(), 4, seed=0, epochs=1))
    state = trainer.fit(trainer.init(model.init(0)), batches, out_dir=tmp_path, progress=True)
    assert int(state.step) == len(batches) // 2
    bar = capsys.readouterr().err
    assert f"{len(batches) // 2}/{len(batches) // 2}" in bar  # the bar knew its total from len()
    gen = (b for b in batches[:4])  # no len(): counts without a total
    assert int(trainer.fit(trainer.init(model.init(0)), gen, progress=False).step) == 2


def test_fit_logs_epochs_done_from_the_batch_position(tmp_path):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, learning_rate=1e-3)
    batches = mf.Batches(data(), 4, seed=0)
    trainer.fit(trainer.init(model.init(0)), batches, len(batches) + 2, out_dir=tmp_path, progress=False)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if r["split"] == "train"]
    assert epochs[len(batches) - 1] == pytest.approx(1.0)
    assert epochs[-1] == pytest.approx(1 + 2 / len(batches))
