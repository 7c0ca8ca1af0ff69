"""GRPO: the loss against a float64 transcription of its definitions, the advantages, the sampler, a toy run."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import rl
from minillm_func.losses import GRPO_LOSS_TYPES, grpo_count, grpo_loss


def inputs(seed=0, N=6, T=7, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(N, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    old = logps.detach() + torch.randn(N, T, generator=g, dtype=torch.float64) * spread
    ref = logps.detach() + torch.randn(N, T, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    return logps, old, ref, adv, mask


def reference(logps, old, ref, adv, mask, *, loss_type, eps_low, eps_high, beta, level, L):
    """The definitions, written out completion by completion and token by token (float64)."""
    N, T = logps.shape
    per_seq, total_tokens = [], 0
    for i in range(N):
        toks = [t for t in range(T) if mask[i, t]]
        total_tokens += len(toks)
        seq_ratio = torch.exp(sum(logps[i, t] - old[i, t] for t in toks) / len(toks))
        losses = []
        for t in toks:
            w = torch.exp(logps[i, t] - old[i, t]) if level == "token" else seq_ratio
            l = -torch.min(w * adv[i], torch.clamp(w, 1 - eps_low, 1 + eps_high) * adv[i])
            if beta:
                d = ref[i, t] - logps[i, t]
                l = l + beta * (torch.exp(d) - d - 1)
            losses.append(l)
        per_seq.append(losses)
    if loss_type == "grpo":
        return sum(sum(ls) / len(ls) for ls in per_seq) / N
    if loss_type == "dr_grpo":
        return sum(sum(ls) for ls in per_seq) / (N * L)
    return sum(sum(ls) for ls in per_seq) / total_tokens  # bnpo, dapo


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradient_equal_the_definition(loss_type, level, beta):
    logps, old, ref, adv, mask = inputs()
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=beta, importance_sampling_level=level,
              max_completion_length=7)
    ours, metrics = grpo_loss(logps, old, ref, adv, mask, **kw)
    expected = reference(logps, old, ref, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=0.28, beta=beta,
                         level=level, L=7)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    g_ours, = torch.autograd.grad(ours, logps)
    g_ref, = torch.autograd.grad(expected, logps)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    if level == "token":
        assert 0 < float(metrics["clip_ratio"]) < 1  # the spread of old vs new reaches the clip range
    assert ("kl" in metrics) == (beta > 0)


@given(seed=st.integers(0, 10_000), loss_type=st.sampled_from(GRPO_LOSS_TYPES))
def test_with_old_equal_to_new_the_ratio_is_one_and_clipping_changes_nothing(seed, loss_type):
    logps, _, _, adv, mask = inputs(seed)
    kw = dict(loss_type=loss_type, max_completion_length=7)
    clipped, m = grpo_loss(logps, None, None, adv, mask, epsilon=0.2, **kw)
    unclipped, _ = grpo_loss(logps, logps.detach(), None, adv, mask, epsilon=0.999, epsilon_high=1e9, **kw)
    torch.testing.assert_close(clipped, unclipped, rtol=0, atol=0)
    assert float(m["clip_ratio"]) == 0
    # the loss value is then -(normalised sum of advantages over counted tokens)
    g, = torch.autograd.grad(clipped, logps)
    # d loss / d logp[i, t] = -A_i / normaliser_i (ratio 1): the policy gradient
    counts = mask.sum(-1, keepdim=True).double()
    scale = {"grpo": counts * mask.shape[0], "dr_grpo": torch.full_like(counts, 7.0 * mask.shape[0]),
             "bnpo": mask.sum().double(), "dapo": mask.sum().double()}[loss_type]
    torch.testing.assert_close(g, (-adv[:, None] / scale) * mask, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_split_micro_batches_give_the_full_batch_loss(loss_type):
    logps, old, ref, adv, mask = inputs(3, N=8)
    kw = dict(loss_type=loss_type, beta=0.1, max_completion_length=7)
    full, _ = grpo_loss(logps, old, ref, adv, mask, **kw)
    total_count = grpo_count(loss_type, mask)
    parts = sum(grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], num_items=1, **kw)[0]
                for s in (slice(0, 3), slice(3, 8)))
    torch.testing.assert_close(parts / total_count, full, rtol=1e-13, atol=0)


def test_grpo_loss_errors_say_what_to_pass():
    logps, old, ref, adv, mask = inputs()
    for kw, text in [(dict(loss_type="ppo"), "unknown loss_type"), (dict(beta=0.1), "needs ref_logps"),
                     (dict(loss_type="dr_grpo"), "max_completion_length"),
                     (dict(importance_sampling_level="seq"), "'token' or 'sequence'"),
                     (dict(epsilon=1.5), "epsilon must lie in")]:
        with pytest.raises(ValueError, match=text):
            grpo_loss(logps, old, None, adv, mask, **kw)


# --------------------------------------------------------------------------- advantages and rewards


def test_group_advantages_against_the_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = rl.group_advantages(rewards, 4)
    first = rewards[:4]
    torch.testing.assert_close(adv[:4], (first - first.mean()) / (first.std() + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group of equal rewards teaches nothing
    torch.testing.assert_close(rl.group_advantages(rewards, 4, "none")[:4], first - first.mean())
    torch.testing.assert_close(rl.group_advantages(rewards, 4, "batch")[:4], (first - first.mean()) / (rewards.std() + 1e-4))
    with pytest.raises(ValueError, match="groups of 3"):
        rl.group_advantages(rewards, 3)


def test_builtin_rewards():
    assert rl.exact_match(["q"] * 3, [" cba ", "cba.", "abc"], answer=["cba"] * 3) == [1.0, 0.0, 0.0]
    fmt = rl.reward_by_name("format:[A-Z]+")
    assert fmt(["q"] * 3, ["ABC", "AbC", " XY\n"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="unknown reward"):
        rl.reward_by_name("bleu")


# --------------------------------------------------------------------------- the sampler and a run


TOK = mf.ByteTokenizer()
CFG = mf.ModelConfig(vocab_size=TOK.vocab_size, dim=64, n_layers=2, n_heads=4, max_seq_len=48)


def prompts(n=16):
    return [{"prompt": f"Q: say {c}\nA: ", "answer": "a"} for c in "bcdefghijklmnopqrstuvwxyz"[:n]]


def test_the_sampled_batch_supervises_exactly_the_completions():
    model = mf.build_model(CFG)
    data = mf.data.PromptDataset(prompts(3), TOK, 40)
    batch = mf.collate([data[i] for i in range(3)], pad_id=TOK.pad_id)
    assert batch["answer"] == ["a"] * 3 and batch["prompt"][0] == "Q: say b\nA: "
    sample = rl.make_sampler(model, TOK, [rl.exact_match], num_generations=4, max_completion_length=5)
    out = sample(model.init(0), batch, key=7)
    again = sample(model.init(0), batch, key=7)
    assert all(torch.equal(out[k], again[k]) for k in out)  # a key gives the same samples
    assert out["input_ids"].shape[0] == 12 and out["advantages"].shape == (12,)
    for i in range(12):
        p = data[i // 4]["prompt_input_ids"].tolist()
        ids, labels = out["input_ids"][i].tolist(), out["labels"][i].tolist()
        n = int(out["completion_length"][i])
        assert ids[:len(p)] == p
        completion = ids[len(p):len(p) + n]
        assert labels[len(p) - 1:len(p) - 1 + n] == completion  # labels[t] is the target of t
        assert all(y == mf.IGNORE_INDEX for j, y in enumerate(labels) if not len(p) - 1 <= j < len(p) - 1 + n)
        assert TOK.eos_id not in completion[:-1]  # the end token only ever closes a completion
        if n < 5:  # it stopped before the limit: its end token is part of what is learned
            assert completion[-1] == TOK.eos_id


def test_a_reward_function_returning_the_wrong_count_is_named():
    model = mf.build_model(CFG)
    data = mf.data.PromptDataset(prompts(2), TOK, 40)
    batch = mf.collate([data[0], data[1]], pad_id=TOK.pad_id)

    def broken(prompts, completions, **_):
        return [1.0]

    sample = rl.make_sampler(model, TOK, [broken], num_generations=2, max_completion_length=2)
    with pytest.raises(ValueError, match="reward broken: expected 4 finite numbers"):
        sample(model.init(0), batch, key=0)


def test_grpo_raises_the_reward_on_a_toy_task():
    # "answer with the letter a": the reward is 1 for a completion that starts with "a"
    model = mf.build_model(CFG)

    def starts_with_a(prompts, completions, **_):
        return [float(c.startswith("a")) for c in completions]

    trainer = mf.create_trainer("grpo", model, tokenizer=TOK, reward_fns=[starts_with_a], num_generations=8,
                                max_completion_length=3, learning_rate=3e-3)
    data = mf.data.PromptDataset(prompts(), TOK, 40)
    rewards = []

    class Record(mf.hooks.Hook):
        every = 1

        def on_update(self, run):
            rewards.append(float(run.metrics["reward"]))

    trainer.fit(trainer.init(model.init(0)), mf.Batches(data, 4, seed=0), 40, progress=False, hooks=[Record()])
    assert len(rewards) == 40
    assert sum(rewards[:5]) / 5 < 0.2 and sum(rewards[-5:]) / 5 > 0.6, rewards


def test_lora_grpo_with_a_kl_term_uses_the_base_as_reference():
    model = mf.build_model(CFG)
    params = model.init(0)
    cfg = mf.lora.LoraConfig(rank=2, alpha=4)
    def varied(prompts, completions, **_):  # rewards that differ within a group: a non-zero gradient
        return [float(sum(map(ord, c)) % 7) for c in completions]

    trainer = mf.create_trainer("grpo", model, tokenizer=TOK, reward_fns=[varied], num_generations=4,
                                max_completion_length=2, beta=0.1, lora=cfg, learning_rate=1e-2)
    state = trainer.init(params)
    assert "ref_params" not in state.extras
    data = mf.data.PromptDataset(prompts(2), TOK, 40)
    batch = trainer.prepare(state, mf.collate([data[0], data[1]], pad_id=TOK.pad_id), 0)
    state, metrics = trainer.step(state, batch)
    assert float(metrics["kl"]) == 0.0  # adapters at init: the policy is the base
    rewards = batch["rewards/varied"]
    assert float(metrics["rewards/varied"]) == pytest.approx(float(rewards.mean()))
    assert float(metrics["rewards/varied/std"]) == pytest.approx(float(rewards.std(unbiased=False)))
    state, metrics = trainer.step(state, batch)
    assert float(metrics["kl"]) > 0.0


def test_cli_grpo_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    from minillm_func import checkpoint, cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in prompts()))
    common = ["--data", "p.jsonl", "--batch-size", "4", "--num-generations", "4", "--max-completion-length", "4",
              "--learning-rate", "1e-3", "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--max-length", "32",
              "--T-max", "4", "--no-progress"]
    assert cli.main(["train", "grpo", "--out", "a", "--steps", "4", *common]) == 0
    assert cli.main(["train", "grpo", "--out", "b", "--steps", "2", *common]) == 0
    assert cli.main(["train", "grpo", "--out", "b", "--resume", "--steps", "4"]) == 0
    a, _ = checkpoint.load(checkpoint.resolve(tmp_path / "a"))
    b, _ = checkpoint.load(checkpoint.resolve(tmp_path / "b"))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    capsys.readouterr()
    assert cli.main(["eval", "--ckpt", "a", "--data", "p.jsonl"]) == 0
    assert "rewards/exact_match" in json.loads(capsys.readouterr().out)
    for flags, text in [(["--loss-type", "sigmoid"], "--loss-type for grpo"), (["--num-generations", "1"], ">= 2"),
                        (["--rewards", "bleu"], "unknown reward"), (["--max-completion-length", "40"], "lie in")]:
        assert cli.main(["train", "grpo", "--out", "c", "--steps", "1", *common, *flags]) == 2
        assert text in capsys.readouterr().err


def test_completions_that_stop_end_with_the_end_token_and_truncated_ones_do_not(monkeypatch):
    model = mf.build_model(CFG)
    data = mf.data.PromptDataset(prompts(2), TOK, 40)
    batch = mf.collate([data[0], data[1]], pad_id=TOK.pad_id)
    canned = [[], [65], [65, 66, 67], [65, 66, 67]]  # stopped at once, after 1, truncated at 3, truncated

    monkeypatch.setattr(rl, "generate", lambda *a, **k: canned)
    out = rl.make_sampler(model, TOK, [rl.exact_match], num_generations=2, max_completion_length=3)(
        model.init(0), batch, key=0)
    expected = [[TOK.eos_id], [65, TOK.eos_id], [65, 66, 67], [65, 66, 67]]
    assert out["completion_length"].tolist() == [1.0, 2.0, 3.0, 3.0]
    for i, completion in enumerate(expected):
        p = data[i // 2]["prompt_input_ids"].tolist()
        assert out["input_ids"][i, len(p):len(p) + len(completion)].tolist() == completion
        assert out["labels"][i, len(p) - 1:len(p) - 1 + len(completion)].tolist() == completion
        assert (out["labels"][i] != mf.IGNORE_INDEX).sum() == len(completion)
    # exact match reads the decoded text without the end token: "A" is not "a"
    assert out["rewards"].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_the_loss_scores_completions_at_the_sampling_temperature():
    # the log-probs of the policy that sampled: logits / T, in the loss and in the KL's reference
    model = mf.build_model(CFG)
    params = model.init(0)
    from minillm_func.objectives import grpo_objective

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TOK.vocab_size, (4, 12), generator=g)
    labels = torch.full_like(ids, mf.IGNORE_INDEX)
    labels[:, 5:11] = ids[:, 6:12]
    batch = {"input_ids": ids, "labels": labels, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
             "old_logps": torch.zeros(4, 12) - 5.0, "rewards": torch.zeros(4), "completion_length": torch.ones(4)}
    ours = grpo_objective(model.apply, temperature=0.5, beta=0.1, epsilon=0.9, epsilon_high=1e9)
    by_hand = grpo_objective(lambda p, x: model.apply(p, x) / 0.5, temperature=1.0, beta=0.1, epsilon=0.9,
                             epsilon_high=1e9)
    extras = {"ref_params": {k: v * 0.9 for k, v in params.items()}}
    a = torch.func.grad(lambda p: ours(p, batch, extras)[0])(params)
    b = torch.func.grad(lambda p: by_hand(p, batch, extras)[0])(params)
    plain = torch.func.grad(lambda p: grpo_objective(model.apply, beta=0.1, epsilon=0.9, epsilon_high=1e9)(
        p, batch, extras)[0])(params)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], plain[k]) for k in a)


def test_cli_checks_the_reward_columns_and_keeps_commas_inside_a_regex(tmp_path, monkeypatch, capsys):
    from minillm_func import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": r["prompt"]}) for r in prompts(4)))
    common = ["--data", "p.jsonl", "--batch-size", "2", "--num-generations", "2", "--max-completion-length", "2",
              "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--max-length", "32", "--no-progress", "--steps", "1"]
    assert cli.main(["train", "grpo", "--out", "a", *common]) == 2
    assert "has no 'answer' column, which the reward exact_match reads" in capsys.readouterr().err
    assert not (tmp_path / "a" / "checkpoints").exists()
    assert cli.main(["train", "grpo", "--out", "b", "--rewards", r"format:[a-z]{1,3}", *common]) == 0
    assert cli._reward_specs(r"exact_match,format:\d{1,3},format:x") == ["exact_match", r"format:\d{1,3}", "format:x"]


def test_prompt_records_must_share_their_columns():
    with pytest.raises(ValueError, match=r"example 1 has the columns \['prompt'\], example 0 has \['answer', 'prompt'\]"):
        mf.data.PromptDataset([{"prompt": "a", "answer": "b"}, {"prompt": "c"}], TOK, 16)
