"""The command a user touches: one-line errors, settings that mean what they say, exact resume.

Most commands run in this process (``cli.main``); the ones that need signals run
as real subprocesses.
"""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minillm_func as mf
from minillm_func import checkpoint, cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--n-layers", "1", "--n-heads", "4", "--max-length", "32", "--batch-size", "4",
        "--no-progress"]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working folder with pretraining text, SFT and DPO files from the demo corpus."""
    monkeypatch.chdir(tmp_path)
    corpus = mf.demo_corpus(1, n_pretrain=40, n_sft=40, n_dpo=24)
    (tmp_path / "pre.txt").write_text("\n\n".join(corpus.pretrain))
    (tmp_path / "held.txt").write_text("\n\n".join(corpus.pretrain_eval[:8]))
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in corpus.sft))
    (tmp_path / "dpo.jsonl").write_text("\n".join(json.dumps(r) for r in corpus.dpo))
    return tmp_path


def run(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``minillm-func ARGV`` run in this process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *, expect_code=None, contains=()):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2) and (expect_code is None or code == expect_code), (code, err)
    assert len(lines) == 1 and lines[0].startswith("minillm-func: error: "), err
    assert "Traceback" not in err
    for text in contains:
        assert text in lines[0], lines[0]


def params_of(run_dir):
    state, _ = checkpoint.load(checkpoint.resolve(run_dir))
    return state.params


def train_records(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


# --------------------------------------------------------------------------- bad settings, before any data


BAD_SETTINGS = [
    (["--steps", "0"], "--steps must be a whole number >= 1"),
    (["--steps", "-5"], "--steps must be a whole number >= 1"),
    (["--learning-rate", "-1"], "--learning-rate must be a positive, finite number"),
    (["--learning-rate", "nan"], "--learning-rate must be a positive, finite number"),
    (["--learning-rate", "inf"], "--learning-rate must be a positive, finite number"),
    (["--max-length", "1000000000"], "--max-length 1000000000 is too long: the limit is"),
    (["--precision", "fp16"], "use --precision bf16"),
    (["--precision", "fp8"], "--precision must be fp32, bf16 or fp16"),
    (["--loss-type", "bogus"], "--loss-type must be one"),
    (["--loss-type", "sigmoid,bogus"], "got 'bogus'"),
    (["--loss-type", "sigmoid,sft", "--loss-weights", "1"], "gives 1 weights for the 2 loss types"),
    (["--loss-type", "sigmoid,sft", "--loss-weights", "1,x"], "--loss-weights must be comma-separated numbers"),
    (["--loss-type", "exo_pair"], "exo_pair"),
    (["--lora-rank", "4"], "--lora-rank adapts a trained model"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--eval-every", "5"], "--eval-every needs --eval-data"),
    (["--schedule", "cosine", "--warmup-steps", "20"], "needs a schedule with a warm-up"),
    (["--warmup-steps", "2000"], "--warmup-steps (2000) must be smaller"),
    (["--schedule", "exponential"], "--schedule must be"),
    (["--steps", "5", "--epochs", "2"], "not both"),
    (["--dim", "30"], "--dim 30 must be a multiple"),
    (["--tokenizer", "bpe:10"], "at least 259"),
    (["--tokenizer", "nowhere/tokenizer.json"], "no such file"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--keep-last", "0"], "--keep-last must be a whole number >= 1"),
    (["--label-smoothing", "0.7"], "--label-smoothing must lie in"),
]


@pytest.mark.parametrize("flags,message", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_in_one_line_before_the_data_is_read(files, capsys, flags, message):
    # The data file does not exist: a settings error must come first, so it was checked before reading.
    code, _, err = run(capsys, "train", "dpo", "--data", "missing.jsonl", "--out", "r", *flags)
    assert_one_line_error(code, err, expect_code=2, contains=[message])
    assert not (files / "r").exists()


@pytest.mark.parametrize("text,message", [
    ("steps = 2.5\n", "steps must be a whole number, got 2.5"),
    ("learning_rate = 'fast'\n", "learning_rate must be a number"),
    ("stepz = 3\n", "unknown settings in"),
    ("steps = \n", "is not valid TOML"),
    ("pack = 1\n", "pack must be true or false"),
])
def test_bad_config_files_are_refused_naming_the_file(files, capsys, text, message):
    (files / "cfg.toml").write_text(text)
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--config", "cfg.toml")
    assert_one_line_error(code, err, expect_code=2, contains=[message])
    if "unknown" in message or "TOML" in message:
        assert "cfg.toml" in err


def test_max_length_refusal_is_immediate_and_says_the_limit(files, capsys):
    t0 = time.perf_counter()
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--max-length", "1000000000")
    assert_one_line_error(code, err, expect_code=2, contains=["lower --batch-size"])
    limit = int(err.split("the limit is ")[1].split(" ")[0])
    assert 1000 < limit < 10**7
    assert time.perf_counter() - t0 < 5


def test_usage_errors_from_argparse_are_one_line(files, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "pretrain", "--out", "r", "--steps", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minillm-func: error: argument --steps")


# --------------------------------------------------------------------------- bad inputs through the CLI


BAD_FILES = {
    "empty.jsonl": b"",
    "latin1.txt": "caf\xe9 au lait".encode("latin-1"),
    "broken.jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n',
    "unknown_fields.jsonl": b'{"question": "a", "answer": "b"}\n',
    "not_strings.jsonl": b'{"prompt": 1, "completion": "b"}\n',
    "mixed.jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
    "list.jsonl": b'[1, 2, 3]\n',
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bad_data_files_give_one_line_naming_the_file(files, capsys, name, kind):
    (files / name).write_bytes(BAD_FILES[name])
    code, _, err = run(capsys, "train", kind, "--data", name, "--out", "r", "--steps", "1", *TINY)
    assert_one_line_error(code, err, contains=[name])


@pytest.mark.parametrize("argv,message", [
    (["train", "pretrain", "--data", "nothing.txt", "--out", "r"], "nothing.txt"),
    (["train", "sft", "--data", "sft.jsonl", "--out", "r", "--init", "no_run"], "no_run"),
    (["train", "sft", "--data", "sft.jsonl", "--out", "r", "--init", "."], "No complete checkpoint"),
    (["train", "pretrain", "--data", "pre.txt", "--out", "r", "--resume"], "holds no run to resume"),
    (["train", "pretrain", "--data", "pre.txt", "--out", "r", "--config", "none.toml"], "no config file"),
    (["train", "dpo", "--data", "sft.jsonl", "--out", "r", "--steps", "1"], "dpo training needs"),
    (["generate", "--ckpt", "no_run", "--prompt", "x"], "no_run"),
    (["eval", "--ckpt", "no_run", "--data", "sft.jsonl"], "no_run"),
])
def test_user_errors_print_one_line_and_no_traceback(files, capsys, argv, message):
    code, _, err = run(capsys, *argv, *(TINY[-1:] if argv[0] == "train" else []))
    assert_one_line_error(code, err, contains=[message])


def test_debug_shows_the_traceback(files, capsys):
    with pytest.raises(FileNotFoundError):
        cli.main(["train", "pretrain", "--data", "nothing.txt", "--out", "r", "--debug"])


def test_a_damaged_checkpoint_is_one_line_naming_it(files, capsys):
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "pre", "--steps", "2", *TINY)[0] == 0
    folder = checkpoint.resolve(files / "pre")
    with open(folder / checkpoint.TENSORS_FILE, "r+b") as f:
        f.truncate(100)
    code, _, err = run(capsys, "generate", "--ckpt", folder, "--prompt", "x")
    assert_one_line_error(code, err, expect_code=1, contains=[str(folder)])


# --------------------------------------------------------------------------- settings that mean what they say


def test_resolved_settings_are_written_and_t_max_follows_the_run(files, capsys):
    code, out, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "7", *TINY)
    assert code == 0, err
    cfg = json.loads((files / "r" / "config.json").read_text())
    assert cfg["T_max"] == 7 and cfg["steps"] == 7 and cfg["schedule"] == "cosine"
    assert cfg["learning_rate"] == 1e-4 and cfg["dim"] == 32 and cfg["tokenizer"] == "byte"
    # The learning rate of the last update is the cosine's value one step before its minimum,
    # not the peak it climbs back to after T_max (torch's CosineAnnealingLR, T_max = 7).
    lrs = [r["lr"] for r in train_records(files / "r")]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    expected = []
    for _ in range(7):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_warmup_steps_select_warmup_cosine(files, capsys):
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "6",
                       "--warmup-steps", "3", "--learning-rate", "1e-3", *TINY)
    assert code == 0, err
    assert json.loads((files / "r" / "config.json").read_text())["schedule"] == "warmup_cosine"
    lrs = [r["lr"] for r in train_records(files / "r")]
    assert lrs[0] < lrs[1] < lrs[2] and max(lrs) == pytest.approx(1e-3)


def test_eval_data_alone_evaluates_at_step_0_and_a_tenth_of_the_run(files, capsys):
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "20",
                       "--eval-data", "held.txt", *TINY)
    assert code == 0, err
    rows = [json.loads(x) for x in (files / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


def test_init_takes_the_shape_from_the_checkpoint_and_refuses_a_conflict(files, capsys):
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "pre", "--steps", "2", *TINY)[0] == 0
    code, _, err = run(capsys, "train", "sft", "--data", "sft.jsonl", "--out", "sft", "--init", "pre",
                       "--dim", "64", "--steps", "1", "--no-progress")
    assert_one_line_error(code, err, expect_code=2, contains=["--dim 64 conflicts", "dim = 32"])
    code, _, err = run(capsys, "train", "sft", "--data", "sft.jsonl", "--out", "sft", "--init", "pre",
                       "--steps", "2", "--batch-size", "4", "--no-progress")
    assert code == 0, err
    cfg = json.loads((files / "sft" / "config.json").read_text())
    assert cfg["dim"] == 32 and cfg["max_length"] == 32 and cfg["learning_rate"] == 5e-5
    assert cfg["init"] == str(checkpoint.resolve(files / "pre"))


def test_epochs_count_updates_over_the_data(files, capsys):
    code, _, err = run(capsys, "train", "sft", "--data", "sft.jsonl", "--out", "r", "--epochs", "2",
                       "--accumulation-steps", "2", *TINY)
    assert code == 0, err
    n = len(mf.load_dataset(files / "sft.jsonl", mf.ByteTokenizer(), 32, kind="sft"))
    expected = 2 * math.ceil(n / 4) // 2
    assert json.loads((files / "r" / "config.json").read_text())["steps"] == expected
    assert [r["step"] for r in train_records(files / "r")] == list(range(1, expected + 1))


def test_a_fresh_run_into_a_used_folder_is_refused(files, capsys):
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "1", *TINY)[0] == 0
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "1", *TINY)
    assert_one_line_error(code, err, expect_code=2, contains=["--resume"])


def test_resume_reads_the_runs_own_settings(files, capsys):
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "3",
               "--checkpoint-every", "1", "--T-max", "10", *TINY)[0] == 0
    code, out, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--resume", "--steps", "5")
    assert code == 0 and "resuming pretrain at update 3" in out, err
    straight = files / "straight"
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", straight, "--steps", "5",
               "--T-max", "10", *TINY)[0] == 0
    a, b = params_of(files / "r"), params_of(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--resume", "--dim", "64")
    assert_one_line_error(code, err, expect_code=2, contains=["--dim 64", "--init"])
    assert run(capsys, "train", "pretrain", "--out", "r", "--resume", "--steps", "6")[0] == 0  # data from config.json


def test_eval_scores_with_the_loss_the_checkpoint_was_trained_with(files, capsys):
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "pre", "--steps", "2", *TINY)[0] == 0
    code, _, err = run(capsys, "train", "dpo", "--data", "dpo.jsonl", "--out", "ipo", "--init", "pre", "--steps", "3",
                       "--loss-type", "ipo", "--learning-rate", "1e-2", "--batch-size", "4", "--no-progress")
    assert code == 0, err
    code, out, err = run(capsys, "eval", "--ckpt", "ipo", "--data", "dpo.jsonl")
    assert code == 0, err
    got = json.loads(out)
    state, meta = checkpoint.load(checkpoint.resolve(files / "ipo"))
    model = mf.build_model(mf.ModelConfig(**meta["model_config"]))
    data = mf.load_dataset(files / "dpo.jsonl", mf.ByteTokenizer(), 32, kind="dpo")
    for loss_type in ("ipo", "sigmoid"):
        trainer = mf.create_trainer("dpo", model, loss_type=loss_type)
        ev = trainer.evaluate(state, mf.Batches(data, 32, shuffle=False, epochs=1))
        if loss_type == "ipo":
            assert got["loss"] == pytest.approx(ev["loss"], rel=1e-6)
        else:
            assert got["loss"] != pytest.approx(ev["loss"], rel=1e-3)


def test_eval_of_a_precomputed_reference_run_uses_its_init_as_reference(files, capsys):
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "pre", "--steps", "2", *TINY)[0] == 0
    code, _, err = run(capsys, "train", "dpo", "--data", "dpo.jsonl", "--out", "d", "--init", "pre", "--steps", "3",
                       "--precompute-reference", "true", "--learning-rate", "1e-2", "--batch-size", "4",
                       "--no-progress")
    assert code == 0, err
    code, out, err = run(capsys, "eval", "--ckpt", "d", "--data", "dpo.jsonl")
    assert code == 0, err
    got = json.loads(out)
    policy, meta = checkpoint.load(checkpoint.resolve(files / "d"))
    reference = params_of(files / "pre")
    model = mf.build_model(mf.ModelConfig(**meta["model_config"]))
    trainer = mf.create_trainer("dpo", model)
    state = trainer.init(policy.params)._replace(extras={"ref_params": reference})
    data = mf.load_dataset(files / "dpo.jsonl", mf.ByteTokenizer(), 32, kind="dpo")
    ev = trainer.evaluate(state, mf.Batches(data, 32, shuffle=False, epochs=1))
    assert got["loss"] == pytest.approx(ev["loss"], rel=1e-6) and got["loss"] != pytest.approx(math.log(2))


def test_eval_kind_scores_a_checkpoint_on_another_stages_data(files, capsys):
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "pre", "--steps", "2", *TINY)[0] == 0
    code, out, err = run(capsys, "eval", "--ckpt", "pre", "--data", "sft.jsonl", "--kind", "sft")
    assert code == 0, err
    got = json.loads(out)
    state, meta = checkpoint.load(checkpoint.resolve(files / "pre"))
    model = mf.build_model(mf.ModelConfig(**meta["model_config"]))
    data = mf.load_dataset(files / "sft.jsonl", mf.ByteTokenizer(), 32, kind="sft")
    ev = mf.create_trainer("sft", model).evaluate(state, mf.Batches(data, 32, shuffle=False, epochs=1))
    assert got["kind"] == "sft" and got["loss"] == pytest.approx(ev["loss"], rel=1e-6)
    code, out, err = run(capsys, "eval", "--ckpt", "pre", "--data", "dpo.jsonl", "--kind", "dpo")
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(math.log(2), rel=1e-6), err  # policy = reference


def test_generate_reads_backslash_n_as_a_newline(files, capsys):
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "pre", "--steps", "1", *TINY)[0] == 0
    code, out, err = run(capsys, "generate", "--ckpt", "pre", "--prompt", "Q: reverse abc\\nA: ",
                         "--max-new-tokens", "3")
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["prompt"] == "Q: reverse abc\nA: "
    assert cli.unescape(r"a\\nb\tc\x") == "a\\nb\tc\\x"


def test_bpe_tokenizer_is_trained_saved_and_used(files, capsys):
    pytest.importorskip("tokenizers")
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "2",
                       "--tokenizer", "bpe:300", *TINY)
    assert code == 0, err
    tok = mf.BPETokenizer.load(files / "r" / "tokenizer.json")
    _, meta = checkpoint.load(checkpoint.resolve(files / "r"))
    assert tok.vocab_size == 300 and meta["model_config"]["vocab_size"] == 300
    assert run(capsys, "generate", "--ckpt", "r", "--prompt", "The", "--max-new-tokens", "2")[0] == 0
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r2", "--steps", "1",
               "--tokenizer", files / "r" / "tokenizer.json", *TINY)[0] == 0
    assert run(capsys, "train", "pretrain", "--out", "r", "--resume", "--steps", "3")[0] == 0


def test_metrics_name_what_they_count(files, capsys):
    code, _, err = run(capsys, "train", "dpo", "--data", "dpo.jsonl", "--out", "d", "--steps", "2",
                       "--accumulation-steps", "2", *TINY)
    assert code == 0, err
    rows = train_records(files / "d")
    data = mf.load_dataset(files / "dpo.jsonl", mf.ByteTokenizer(), 32, kind="dpo")
    batches = iter(mf.Batches(data, 4, seed=0))
    first_update = [next(batches) for _ in range(2)]
    tokens = sum(float(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum()) for b in first_update)
    assert rows[0]["pairs"] == 8 and rows[0]["tokens"] == tokens
    assert rows[0]["tokens_per_s"] > rows[0]["pairs_per_s"] > 0
    code, _, err = run(capsys, "train", "sft", "--data", "sft.jsonl", "--out", "s", "--steps", "1",
                       "--accumulation-steps", "3", *TINY)
    assert code == 0, err
    sdata = mf.load_dataset(files / "sft.jsonl", mf.ByteTokenizer(), 32, kind="sft")
    micro = [b for _, b in zip(range(3), mf.Batches(sdata, 4, seed=0))]
    row = train_records(files / "s")[0]
    assert row["loss_tokens"] == sum(float((b["labels"] != mf.IGNORE_INDEX).sum()) for b in micro)


# --------------------------------------------------------------------------- signals: real processes


def spawn(*argv, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "minillm_func.cli", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_updates(run_dir: Path, n: int, proc, timeout=120):
    deadline = time.time() + timeout
    log = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if log.exists() and sum('"train"' in line for line in log.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("the run made no progress")


def test_ctrl_c_then_resume_is_bit_identical_to_an_uninterrupted_run(files):
    flags = ["--steps", "40", "--accumulation-steps", "2", "--threads", "1", *TINY]
    straight = spawn("train", "pretrain", "--data", "pre.txt", "--out", "straight", *flags, cwd=files)
    assert straight.wait(timeout=300) == 0, straight.communicate()
    stop_at = random.Random(0).randint(3, 20)
    proc = spawn("train", "pretrain", "--data", "pre.txt", "--out", "r", *flags, cwd=files)
    wait_for_updates(files / "r", stop_at, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted after update" in out, (out, err)
    assert err.strip() == "minillm-func: interrupted; continue with `minillm-func train pretrain --out r --resume`."
    _, meta = checkpoint.load(checkpoint.resolve(files / "r"))
    assert stop_at <= meta["step"] < 40
    resumed = spawn("train", "pretrain", "--data", "pre.txt", "--out", "r", "--resume", cwd=files)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = params_of(files / "r"), params_of(files / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in train_records(files / "r")] == list(range(1, 41))


def test_a_diverging_run_stops_with_one_line_within_a_minute(files):
    t0 = time.perf_counter()
    proc = spawn("train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "100000",
                 "--learning-rate", "1e38", "--max-skipped", "50", *TINY, cwd=files)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "non-finite gradients" in lines[0] and "learning rate" in lines[0], err
    assert time.perf_counter() - t0 < 60
    found = checkpoint.latest(files / "r")
    if found is not None:  # whatever was saved is finite
        state, _ = checkpoint.load(found)
        assert all(torch.isfinite(v).all() for v in state.params.values())


@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_resumable_checkpoint(files):
    flags = ["--T-max", "50", "--checkpoint-every", "1", "--threads", "1", *TINY]
    first = spawn("train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "100000", *flags, cwd=files)
    wait_for_updates(files / "r", 2, first)
    first.kill()
    first.wait()
    rng = random.Random(1)
    for _ in range(20):
        proc = spawn("train", "pretrain", "--data", "pre.txt", "--out", "r", "--resume", cwd=files)
        lines = []
        while not (lines and lines[-1].startswith("resuming")):  # the process is past its start-up
            lines.append(proc.stdout.readline())
            assert lines[-1], (lines, proc.communicate())  # it ended without resuming: say why
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        state, meta = checkpoint.load(checkpoint.resolve(files / "r"))  # complete, with no manual step
        assert meta["step"] == int(state.step)
    final = meta["step"] + 3
    proc = spawn("train", "pretrain", "--data", "pre.txt", "--out", "r", "--resume", "--steps", final, cwd=files)
    assert proc.wait(timeout=300) == 0, proc.communicate()
    straight = spawn("train", "pretrain", "--data", "pre.txt", "--out", "s", "--steps", final, *flags, cwd=files)
    assert straight.wait(timeout=300) == 0, straight.communicate()
    a, b = params_of(files / "r"), params_of(files / "s")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in train_records(files / "r")] == list(range(1, final + 1))
    assert len(checkpoint.history(files / "r")) == 3


def test_a_tokenizer_file_without_our_special_tokens_is_one_line(files, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    other = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    other.add_special_tokens(["[UNK]", "<pad>"])
    other.save(str(files / "other.json"))
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "1",
                       "--tokenizer", "other.json", *TINY)
    assert_one_line_error(code, err, expect_code=1, contains=["no <bos>, <eos> token"])


@pytest.mark.parametrize("optimizer", [["--optimizer", "muon", "--schedule", "cosine", "--T-max", "10"],
                                       ["--optimizer", "schedule_free", "--warmup-steps", "2"],
                                       ["--schedule", "wsd", "--warmup-steps", "1", "--T-max", "10"]])
def test_other_optimizers_and_schedules_resume_bit_identically(files, capsys, optimizer):
    steps = ["--steps", "6", "--keep-last", "9"] if "wsd" in optimizer else ["--steps", "3"]  # wsd: shaped by the length
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", *steps, "--checkpoint-every",
                       "1", *optimizer, *TINY)
    assert code == 0, err
    if "wsd" in optimizer:  # cut the run back to update 3 by hand: the newest checkpoints go
        for name in ("step-000004", "step-000005", "step-000006"):
            shutil.rmtree(files / "r" / "checkpoints" / name, ignore_errors=True)
        (files / "r" / "checkpoints" / "latest").unlink(missing_ok=True)
    code, out, err = run(capsys, "train", "pretrain", "--out", "r", "--resume", "--steps", "6")
    assert code == 0 and "resuming pretrain at update 3" in out, out + err
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "straight", "--steps", "6", *optimizer,
               *TINY)[0] == 0
    a, b = params_of(files / "r"), params_of(files / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((files / "r" / "config.json").read_text())
    assert config["optimizer"] == (optimizer[1] if optimizer[0] == "--optimizer" else "adamw")


@pytest.mark.parametrize("argv, contains", [
    (["--optimizer", "lion"], "--optimizer must be one of adamw, muon, schedule_free"),
    (["--optimizer", "schedule_free", "--schedule", "cosine"], "drop --schedule cosine"),
    (["--adam-learning-rate", "1e-3"], "add --optimizer muon"),
    (["--schedule", "step"], "--schedule must be one of"),
    (["--schedule", "linear", "--warmup-steps", "2"], "needs a schedule with a warm-up"),
])
def test_optimizer_and_schedule_flags_refuse_what_cannot_work(files, capsys, argv, contains):
    code, _, err = run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "r", "--steps", "3", *argv, *TINY)
    assert_one_line_error(code, err, expect_code=2, contains=[contains])
