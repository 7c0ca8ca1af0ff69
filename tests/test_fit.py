"""The impure shell: fit, checkpoints, resume, Ctrl-C, the CLI and the examples."""
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


def test_resume_gives_bit_identical_params(tmp_path):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, learning_rate=1e-3, accumulation_steps=2)
    params = model.init(0)
    straight = trainer.fit(trainer.init(params), mf.Batches(data(), 4, seed=3), 8, progress=False)

    first = mf.Batches(data(), 4, seed=3)
    trainer.fit(trainer.init(params), first, 5, out_dir=tmp_path, progress=False)
    state, meta = checkpoint.load(tmp_path / "checkpoint", like=trainer.init(params))
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
    batches = iter(mf.Batches(data(), 4, seed=0))

    def interrupted():
        for i, b in enumerate(batches):
            if i == 3:
                raise KeyboardInterrupt
            yield b

    state = trainer.fit(trainer.init(model.init(0)), interrupted(), 100, out_dir=tmp_path, progress=False)
    assert state.step.item() == 3
    saved, meta = checkpoint.load(tmp_path / "checkpoint")
    assert meta["step"] == 3 and torch.equal(saved.params["tok_emb.weight"], state.params["tok_emb.weight"])


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model)
    trainer.fit(trainer.init(model.init(0)), mf.Batches(data(), 4), 1, out_dir=tmp_path, progress=False)
    other = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=4, max_seq_len=32))
    other_trainer = mf.create_trainer("pretrain", other)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path / "checkpoint", like=other_trainer.init(other.init(0)))


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
    r = run_cli("train", "sft", "--data", "sft.jsonl", "--out", "sft", "--init", "pre/checkpoint", "--steps", "2",
                *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "--ckpt", "sft/checkpoint", "--prompt", "Q: reverse abc\nA: ", "--max-new-tokens", "5",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["prompt"] == "Q: reverse abc\nA: "
    r = run_cli("eval", "--ckpt", "sft/checkpoint", "--data", "sft.jsonl", cwd=tmp_path)
    assert r.returncode == 0 and "loss" in json.loads(r.stdout), r.stderr
    r = run_cli("train", "dpo", "--data", "sft.jsonl", "--out", "x", *common, cwd=tmp_path)
    assert r.returncode != 0 and "dpo training needs" in r.stderr


def test_demo_quick_runs_end_to_end(tmp_path):
    r = run_cli("demo", "--quick", "--out", "run", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["stages"]) == {"pretrain", "sft", "dpo"}
    for stage in ("pretrain", "sft", "dpo"):
        assert (tmp_path / "run" / stage / "metrics.jsonl").exists()
        checkpoint.load(tmp_path / "run" / stage / "checkpoint")
    assert "held-out exact match" in r.stdout
