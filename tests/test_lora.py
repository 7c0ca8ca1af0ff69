"""LoRA: the adapted forward against PEFT (a test-only dependency), merging, training only the adapters.

Every model is built from a tiny config with random weights; nothing is downloaded.
"""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import lora
from minillm_func.lora import LoraConfig

CFG = mf.ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def model_and_params(dtype=torch.float32, cfg=CFG):
    model = mf.build_model(cfg)
    return model, model.init(seed=0, dtype=dtype)


def random_adapters(params, config, seed=1):
    """Adapters with B non-zero too (at init B = 0 makes every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.3 for k, v in lora.init(params, config).items()}


def ids_batch(seed=0, B=3, T=16):
    ids = torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    labels = ids.roll(-1, 1)
    labels[:, -1] = mf.IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def pair_batch(seed=0):
    a, b = ids_batch(seed), ids_batch(seed + 1)
    return {"chosen_input_ids": a["input_ids"], "chosen_labels": a["labels"],
            "rejected_input_ids": b["input_ids"], "rejected_labels": b["labels"]}


# --------------------------------------------------------------------------- the adapted forward


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_adapted_model_at_init_equals_the_base_bitwise(init):
    model, params = model_and_params()
    config = LoraConfig(rank=4, alpha=8, init=init)
    adapters = lora.init(params, config, seed=3)
    assert all(torch.count_nonzero(v) == 0 for k, v in adapters.items() if k.endswith("lora_B"))
    assert all(torch.count_nonzero(v) > 0 for k, v in adapters.items() if k.endswith("lora_A"))
    ids = ids_batch()["input_ids"]
    adapted = lora.apply(model, config).apply(lora.combine(params, adapters, config), ids)
    assert torch.equal(adapted, model.apply(params, ids))


def test_init_draws_peft_distributions():
    # default: Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); gaussian: N(0, 1/rank)
    params = {"layers.0.mlp.w1.weight": torch.zeros(8, 4096)}
    a = lora.init(params, LoraConfig(rank=16, targets=("w1",)))["layers.0.mlp.w1.lora_A"]
    bound = 1 / 64
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    torch.testing.assert_close(a.std(), torch.tensor(bound / 3 ** 0.5), rtol=0.02, atol=0)
    g = lora.init(params, LoraConfig(rank=16, targets=("w1",), init="gaussian"))["layers.0.mlp.w1.lora_A"]
    torch.testing.assert_close(g.std(), torch.tensor(1 / 16), rtol=0.02, atol=0)


def test_a_target_that_matches_nothing_lists_the_linear_layers():
    _, params = model_and_params()
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no linear layer.*'w1'.*'wq'"):
        lora.init(params, LoraConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoraConfig(dropout=1.0)


def test_targets_match_by_suffix():
    _, params = model_and_params()
    assert lora.target_names(params, LoraConfig(targets=("wq", "layers.1.mlp.w2"))) == [
        "layers.0.attn.wq", "layers.1.attn.wq", "layers.1.mlp.w2"]


@given(rank=st.integers(1, 9), alpha=st.floats(0.5, 64), rslora=st.booleans(),
       targets=st.lists(st.sampled_from(ALL), min_size=1, max_size=7, unique=True), seed=st.integers(0, 2**16))
def test_adapted_forward_equals_the_merged_forward(rank, alpha, rslora, targets, seed):
    model, params = model_and_params(torch.float64)
    config = LoraConfig(rank=rank, alpha=alpha, rslora=rslora, targets=tuple(targets))
    adapters = random_adapters(params, config, seed)
    ids = ids_batch(seed % 7)["input_ids"]
    adapted = lora.apply(model, config).apply(lora.combine(params, adapters, config), ids)
    merged = model.apply(lora.merge(params, adapters, config), ids)
    torch.testing.assert_close(adapted, merged, rtol=1e-10, atol=1e-10)


def test_merge_against_the_closed_form_and_unmerge_round_trips():
    _, params = model_and_params(torch.float64)
    config = LoraConfig(rank=3, alpha=5, targets=("wv",))
    adapters = random_adapters(params, config)
    before = {k: v.clone() for k, v in params.items()}
    merged = lora.merge(params, adapters, config)
    for name in ("layers.0.attn.wv", "layers.1.attn.wv"):
        expected = params[name + ".weight"] + (5 / 3) * adapters[name + ".lora_B"] @ adapters[name + ".lora_A"]
        torch.testing.assert_close(merged[name + ".weight"], expected, rtol=0, atol=1e-14)
    assert all(torch.equal(merged[k], params[k]) for k in params if ".wv." not in k)
    back = lora.unmerge(merged, adapters, config)
    for k in params:
        torch.testing.assert_close(back[k], params[k], rtol=0, atol=1e-13)
    assert all(torch.equal(before[k], params[k]) for k in params)  # inputs untouched


def test_float32_merge_forward_within_1e_5():
    model, params = model_and_params()
    config = LoraConfig(rank=8, alpha=16)
    adapters = random_adapters(params, config)
    ids = ids_batch()["input_ids"]
    adapted = lora.apply(model, config).apply(lora.combine(params, adapters, config), ids)
    torch.testing.assert_close(model.apply(lora.merge(params, adapters, config), ids), adapted, rtol=0, atol=1e-5)
    module = lora.apply(model, config).to_module(lora.combine(params, adapters, config))
    with torch.no_grad():
        torch.testing.assert_close(module(ids), adapted, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- PEFT parity

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.2)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**HF_SIZES)).save_pretrained(folder)
    return folder


def peft_model(folder, config: LoraConfig):
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    spec = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, use_rslora=config.rslora,
                           target_modules=[lora.PEFT_NAMES[t] for t in config.targets])
    return peft.get_peft_model(base, spec).eval()


def copy_into_peft(pm, adapters):
    """Our A and B into PEFT's modules, so both compute with the same numbers."""
    by_name = dict(pm.named_parameters())
    for key, value in adapters.items():
        name, part = key.rsplit(".", 1)
        hf = mf.hf.hf_name(name + ".weight")[: -len(".weight")]
        with torch.no_grad():
            by_name[f"base_model.model.{hf}.{part}.default.weight"].copy_(value)


@pytest.mark.parametrize("config", [LoraConfig(rank=4, alpha=8, targets=("wq", "wv")),
                                    LoraConfig(rank=8, alpha=16),
                                    LoraConfig(rank=6, alpha=3, rslora=True, targets=("wo", "w2", "w3"))],
                         ids=["qv", "all", "rslora"])
def test_logits_and_adapter_gradients_equal_peft(hf_folder, config):
    model, params, _ = mf.hf.load_pretrained(hf_folder, tokenizer=False)
    adapters = random_adapters(params, config)
    pm = peft_model(hf_folder, config)
    copy_into_peft(pm, adapters)
    b = ids_batch()
    ours = lora.apply(model, config)
    logits = ours.apply(lora.combine(params, adapters, config), b["input_ids"])
    theirs = pm(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(logits[..., :61], theirs, rtol=0, atol=1e-5)

    def loss(a):
        return mf.pretrain_loss(ours.apply(lora.combine(params, a, config), b["input_ids"]), b["labels"])

    grads = torch.func.grad(loss)(adapters)
    ce = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), b["labels"].flatten(), ignore_index=mf.IGNORE_INDEX)
    ce.backward()
    by_name = dict(pm.named_parameters())
    for key, g in grads.items():
        name, part = key.rsplit(".", 1)
        hf = mf.hf.hf_name(name + ".weight")[: -len(".weight")]
        torch.testing.assert_close(g, by_name[f"base_model.model.{hf}.{part}.default.weight"].grad, rtol=0, atol=1e-5)
    assert len(grads) == sum(p.requires_grad for p in pm.parameters())  # PEFT trains exactly these too


def test_our_peft_folder_loads_in_peft_with_equal_logits(hf_folder, tmp_path):
    model, params, _ = mf.hf.load_pretrained(hf_folder, tokenizer=False)
    config = LoraConfig(rank=4, alpha=8, targets=("wq", "wk", "w1"))
    adapters = random_adapters(params, config)
    lora.save_peft(tmp_path / "adapter", adapters, config)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = ids_batch()["input_ids"]
    ours = lora.apply(model, config).apply(lora.combine(params, adapters, config), ids)
    with torch.no_grad():
        torch.testing.assert_close(ours[..., :61], loaded(input_ids=ids).logits, rtol=0, atol=1e-5)
    back, back_config = lora.load_peft(tmp_path / "adapter")
    assert back_config == dataclasses.replace(config, targets=back_config.targets)
    assert lora.target_names(params, back_config) == lora.target_names(params, config)
    assert set(back) == set(adapters) and all(torch.equal(back[k], adapters[k]) for k in adapters)


def test_a_peft_written_folder_loads_here(hf_folder, tmp_path):
    config = LoraConfig(rank=4, alpha=8, targets=("wq", "wv"))
    pm = peft_model(hf_folder, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_()
    pm.save_pretrained(tmp_path / "theirs")
    adapters, loaded = lora.load_peft(tmp_path / "theirs")
    model, params, _ = mf.hf.load_pretrained(hf_folder, tokenizer=False)
    ids = ids_batch()["input_ids"]
    ours = lora.apply(model, loaded).apply(lora.combine(params, adapters, loaded), ids)
    with torch.no_grad():
        torch.testing.assert_close(ours[..., :61], pm(input_ids=ids).logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- training the adapters


def test_only_the_adapters_train_and_the_base_stays_bit_identical():
    model, params = model_and_params()
    before = {k: v.clone() for k, v in params.items()}
    config = LoraConfig(rank=4, alpha=8)
    trainer = mf.create_trainer("sft", model, lora=config, learning_rate=1e-2)
    state = trainer.init(params)
    assert set(state.params) == set(lora.init(params, config))
    moments = state.opt_state[-1]
    assert set(moments.mu) == set(state.params) and set(moments.nu) == set(state.params)
    first = {k: v.clone() for k, v in state.params.items()}
    for i in range(20):
        state, metrics = trainer.step(state, ids_batch(i % 3))
    assert all(torch.equal(state.extras["lora_base"][k], before[k]) for k in before)
    assert all(torch.equal(params[k], before[k]) for k in before)
    assert all(not torch.equal(state.params[k], first[k]) for k in first)
    # the loss went down on the batches it saw
    assert float(trainer.evaluate(state, [ids_batch(0)])["loss"]) < float(
        trainer.evaluate(trainer.init(params), [ids_batch(0)])["loss"])


def test_one_lora_step_is_torch_adamw_on_the_adapters_alone():
    # reference: torch.optim.AdamW over the adapter tensors, fed the gradient of the mean loss
    # (the gradient itself is pinned against PEFT above)
    model, params = model_and_params(torch.float64)
    config = LoraConfig(rank=4, alpha=8, targets=("wq", "w2"))
    # eps 1e-3: with the default 1e-8 Adam's first step, lr * g / (|g| + eps), turns the float64
    # rounding of a near-zero gradient into a visible difference; this compares the optimizer wiring
    trainer = mf.create_trainer("pretrain", model, lora=config, learning_rate=1e-2, max_grad_norm=None, eps=1e-3)
    state = trainer.init(params, seed=2)
    state = state._replace(params={k: v + 0.1 if k.endswith("lora_B") else v for k, v in state.params.items()})
    b = ids_batch()
    new, _ = trainer.step(state, b)

    def mean_loss(adapters):
        total, (count, _) = trainer.loss_fn(adapters, b, state.extras)
        return total / count

    ref = {k: v.clone().requires_grad_(True) for k, v in state.params.items()}
    mean_loss(ref).backward()
    torch.optim.AdamW(list(ref.values()), lr=1e-2, weight_decay=0.01, eps=1e-3).step()
    for k, v in ref.items():
        torch.testing.assert_close(new.params[k], v.detach(), rtol=0, atol=1e-14)


def test_dpo_with_lora_uses_the_base_as_reference_and_holds_no_copy():
    model, params = model_and_params()
    config = LoraConfig(rank=4, alpha=8)
    trainer = mf.create_trainer("dpo", model, lora=config, learning_rate=1e-2)
    state = trainer.init(params)
    assert "ref_params" not in state.extras
    assert all(state.extras["lora_base"][k] is params[k] for k in params)  # held, not copied
    for i in range(3):
        state, _ = trainer.step(state, pair_batch(i))
    batch = pair_batch(7)
    with torch.no_grad():
        rc, rr = (mf.sequence_logps(model.apply(params, batch[f"{s}_input_ids"]), batch[f"{s}_labels"])[0]
                  for s in ("chosen", "rejected"))
    implicit, (_, m1) = trainer.loss_fn(state.params, batch, state.extras)
    explicit, (_, m2) = trainer.loss_fn(state.params, {**batch, "ref_chosen_logps": rc, "ref_rejected_logps": rr},
                                        state.extras)
    # the reference pass is chunked (no full logits): equal to float32 rounding
    torch.testing.assert_close(implicit, explicit, rtol=1e-6, atol=1e-6)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6)
    assert float(m1["rewards/margins"]) != 0.0  # the adapters moved the policy off the reference


def test_lora_accumulation_equals_the_full_batch():
    model, params = model_and_params(torch.float64)
    config = LoraConfig(rank=2, alpha=4)
    whole = mf.create_trainer("sft", model, lora=config, learning_rate=1e-2)
    state = whole.init(params)
    b = ids_batch(B=4)
    full, _ = whole.window_step(state, [b])
    halves = [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    split, _ = whole.window_step(state, halves)
    for k in full.params:
        torch.testing.assert_close(split.params[k], full.params[k], rtol=1e-12, atol=1e-14)


def test_bf16_base_with_float32_adapters_trains():
    model, params = model_and_params(torch.bfloat16)
    trainer = mf.create_trainer("sft", model, lora=LoraConfig(rank=4), precision="bf16", learning_rate=1e-2)
    state = trainer.init(params)
    assert all(v.dtype == torch.float32 for v in state.params.values())
    state, metrics = trainer.step(state, ids_batch())
    assert torch.isfinite(metrics["loss"]) and bool(metrics["updated"])


def test_generation_with_adapters_applied_equals_generation_merged():
    model, params = model_and_params()
    config = LoraConfig(rank=4, alpha=8)
    adapters = random_adapters(params, config)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    applied = mf.generate(lora.apply(model, config), lora.combine(params, adapters, config), prompts,
                          max_new_tokens=6, eos_id=None, pad_id=0)
    merged = mf.generate(model, lora.merge(params, adapters, config), prompts, max_new_tokens=6, eos_id=None,
                         pad_id=0)
    assert applied == merged
    logits = lora.apply(model, config).apply_with_cache(lora.combine(params, adapters, config),
                                                        torch.tensor(prompts[:1]))[0]
    torch.testing.assert_close(logits, model.apply(lora.merge(params, adapters, config), torch.tensor(prompts[:1])),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("memory", [mf.MemoryConfig(chunked_loss=True), mf.MemoryConfig(activation_checkpointing=True)],
                         ids=["chunked", "checkpointed"])
def test_memory_strategies_give_the_same_lora_step(memory):
    model, params = model_and_params(torch.float64)
    config = LoraConfig(rank=4, alpha=8)
    plain = mf.create_trainer("sft", model, lora=config, learning_rate=1e-2)
    other = mf.create_trainer("sft", model, lora=config, learning_rate=1e-2, memory=memory)
    a, _ = plain.step(plain.init(params), ids_batch())
    b, _ = other.step(other.init(params), ids_batch())
    for k in a.params:
        torch.testing.assert_close(b.params[k], a.params[k], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- dropout


def test_dropout_is_pure_repeatable_and_off_in_evaluation():
    model, params = model_and_params()
    config = LoraConfig(rank=4, alpha=8, dropout=0.5)
    trainer = mf.create_trainer("sft", model, lora=config, learning_rate=1e-2)
    plain = mf.create_trainer("sft", model, lora=dataclasses.replace(config, dropout=0.0), learning_rate=1e-2)

    def run(t, seed):
        s = t.init(params, seed=seed)
        for i in range(4):
            s, _ = t.step(s, ids_batch(i))
        return s

    a, b, c, d = run(trainer, 0), run(trainer, 0), run(trainer, 1), run(plain, 0)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)  # same seed: same masks
    assert any(not torch.equal(a.params[k], c.params[k]) for k in a.params)  # another seed: other masks
    assert any(not torch.equal(a.params[k], d.params[k]) for k in a.params)  # dropout changes training
    # evaluation (no rng in extras): dropout off, equal to the model without dropout on the same adapters
    e1 = trainer.loss_fn(a.params, ids_batch(), a.extras)[0]
    e2 = plain.loss_fn(a.params, ids_batch(), {**a.extras})[0]
    assert torch.equal(e1, e2)


def test_dropout_keeps_the_right_fraction_with_inverted_scaling():
    model, params = model_and_params()
    config = LoraConfig(rank=4, targets=("wq",), dropout=0.3)
    lm = lora.apply(model, config)
    layer = lm.module.get_submodule("layers.0.attn.wq")
    key = torch.tensor([1, 7, 3, 0])
    keep = lora._dropout_keep((200, 1000), key, layer.salt, 0.3, "cpu")
    values = keep.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7)
    assert abs(float((keep > 0).float().mean()) - 0.7) < 0.005
    again = lora._dropout_keep((200, 1000), key, layer.salt, 0.3, "cpu")
    other = lora._dropout_keep((200, 1000), torch.tensor([1, 7, 4, 0]), layer.salt, 0.3, "cpu")
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    off = lora._dropout_keep((200, 1000), torch.tensor([0, 7, 3, 0]), layer.salt, 0.3, "cpu")
    assert torch.equal(off, torch.ones_like(off))


# --------------------------------------------------------------------------- the command line


def test_cli_lora_sft_resume_eval_export_merged_and_peft(tmp_path, tiny_hf_folder, monkeypatch, capsys):
    import json

    from minillm_func import checkpoint, cli

    monkeypatch.chdir(tmp_path)  # the folder is "tiny" from here
    corpus = mf.demo_corpus(2, n_sft=24, n_dpo=16)
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(x) for x in corpus.sft))
    (tmp_path / "dpo.jsonl").write_text("\n".join(json.dumps(x) for x in corpus.dpo))

    def run(*argv, code=0):
        got = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert got == code, err
        return out if code == 0 else err

    common = ["--data", "sft.jsonl", "--batch-size", "4", "--learning-rate", "1e-2", "--no-progress",
              "--T-max", "4", "--lora-rank", "4", "--lora-targets", "wq,wv,w2"]
    run("train", "sft", "--model", "tiny", "--out", "a", "--steps", "4", *common)
    run("train", "sft", "--model", "tiny", "--out", "b", "--steps", "2", *common)
    run("train", "sft", "--out", "b", "--resume", "--steps", "4")
    sa, meta = checkpoint.load(checkpoint.resolve(tmp_path / "a"))
    sb, _ = checkpoint.load(checkpoint.resolve(tmp_path / "b"))
    # the checkpoint holds the adapters, not the base; resuming repeats the straight run bit for bit
    assert set(sa.params) == {f"layers.{i}.{m}.{p}" for i in range(2) for m in ("attn.wq", "attn.wv", "mlp.w2")
                              for p in ("lora_A", "lora_B")}
    assert "lora_base" not in sa.extras and meta["trainer_config"]["lora"]["rank"] == 4
    assert all(torch.equal(sa.params[k], sb.params[k]) for k in sa.params)

    model, base, _ = mf.hf.load_pretrained(tmp_path / "tiny")
    config = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w2"))
    merged = lora.merge(base, sa.params, config)
    run("export", "--ckpt", "a", "--out", "merged")
    _, exported, _ = mf.hf.load_pretrained(tmp_path / "merged")
    assert all(torch.equal(exported[k], merged[k]) for k in merged)
    run("export", "--ckpt", "a", "--out", "adapter", "--peft")
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    loaded = peft.PeftModel.from_pretrained(base_hf, tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.apply(merged, ids)[..., :loaded.config.vocab_size],
                                   rtol=0, atol=1e-4)
    assert "perplexity" in run("eval", "--ckpt", "a", "--data", "sft.jsonl")
    assert json.loads(run("generate", "--ckpt", "a", "--prompt", "Q: ", "--max-new-tokens", "2"))["prompt"] == "Q: "

    # DPO with LoRA; no reference copy, the base is the reference
    run("train", "dpo", "--model", "tiny", "--out", "d", "--steps", "2", "--data", "dpo.jsonl", "--batch-size", "4",
        "--no-progress", "--lora-rank", "2")
    # the mistakes are one line
    assert "give --init RUN or --model" in run("train", "sft", "--out", "c", *common, code=2)
    assert "match no linear layer" in run("train", "sft", "--model", "tiny", "--out", "e", *common[:-1], "q_proj",
                                          code=2)
    assert "rank 2" in run("export", "--ckpt", "d", "--out", "d-adapter", "--peft")
    run("train", "sft", "--model", "tiny", "--out", "full", "--steps", "1", *common[:-4])
    assert "full-parameter checkpoint" in run("export", "--ckpt", "full", "--out", "x", "--peft", code=2)
    changed = dict(base, **{"norm.weight": base["norm.weight"] + 1})
    mf.hf.save_pretrained(tmp_path / "tiny", model, changed)
    assert "not the one these LoRA adapters were trained on" in run("eval", "--ckpt", "a", "--data", "sft.jsonl",
                                                                    code=1)
    (tmp_path / "tiny" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    assert "base model cannot be read" in run("generate", "--ckpt", "a", "--prompt", "Q: ", code=1)
    (tmp_path / "tiny").rename(tmp_path / "gone")
    assert "is not at hand" in run("export", "--ckpt", "a", "--out", "y", code=2)


def test_a_peft_folder_of_some_layers_adapts_only_those_both_ways(hf_folder, tmp_path):
    model, params, _ = mf.hf.load_pretrained(hf_folder, tokenizer=False)
    config = LoraConfig(rank=2, alpha=4, targets=("layers.0.attn.wq",))
    adapters = random_adapters(params, config)
    lora.save_peft(tmp_path / "one", adapters, config)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "one").eval()
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 1  # layer 0's q_proj only
    ids = ids_batch()["input_ids"]
    ours = lora.apply(model, config).apply(lora.combine(params, adapters, config), ids)
    with torch.no_grad():
        torch.testing.assert_close(ours[..., :61], loaded(input_ids=ids).logits, rtol=0, atol=1e-5)
    back, back_config = lora.load_peft(tmp_path / "one")
    merged = lora.merge(params, back, back_config)
    torch.testing.assert_close(model.apply(merged, ids), ours, rtol=0, atol=1e-5)
