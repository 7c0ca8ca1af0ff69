"""Hugging Face folders in and out, against transformers itself (a test-only dependency).

Every model here is built from a tiny config with random weights; nothing is downloaded.
"""
import json
import warnings

import pytest
import torch

import minillm_func as mf
from minillm_func import hf
from minillm_func.generate import generate

transformers = pytest.importorskip("transformers")

VOCAB = 97
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def family_configs():
    """(name, transformers config) for each family and the options that change the computation."""
    T = transformers
    return [
        ("llama", T.LlamaConfig(**SIZES)),
        ("llama_tied_bias_llama3", T.LlamaConfig(**SIZES, tie_word_embeddings=True, attention_bias=True,
                                                 rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0)),
        ("mistral", T.MistralConfig(**SIZES, sliding_window=None)),
        ("qwen2", T.Qwen2Config(**SIZES)),
        ("qwen3", T.Qwen3Config(**{**SIZES, "head_dim": 16}, tie_word_embeddings=True)),
    ]


FAMILIES = family_configs()
IDS = [name for name, _ in FAMILIES]


def hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family saved by transformers: {name: (folder, transformers model)}."""
    out = {}
    for name, cfg in FAMILIES:
        folder = tmp_path_factory.mktemp(name)
        model = hf_model(cfg)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


def batch(seed=0, B=3, T=12, pad_from=(12, 7, 3)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(pad_from)[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("name", IDS)
def test_loaded_logits_equal_transformers(saved, name):
    folder, ref = saved[name]
    model, params, tok = hf.load_pretrained(folder, tokenizer=False)
    assert tok is None and model.config.vocab_size == VOCAB and model.config.padded_vocab_size == VOCAB
    ids, mask = batch()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = model.apply(params, ids)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        # right padding: the real positions are unchanged
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = model.apply(params, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", IDS)
def test_greedy_generation_equals_transformers_generate(saved, name):
    folder, ref = saved[name]
    model, params, _ = hf.load_pretrained(folder, tokenizer=False)
    prompt = [5, 17, 42, 8, 3]
    config = transformers.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                                           bos_token_id=None)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
    got = generate(model, params, [prompt], max_new_tokens=16, eos_id=None, pad_id=0)[0]
    assert len(expected) == 16 and got == expected


@pytest.mark.parametrize("name", IDS)
def test_our_folder_loads_in_transformers_with_equal_logits(saved, tmp_path, name):
    folder, _ = saved[name]
    model, params, _ = hf.load_pretrained(folder, tokenizer=False)
    hf_type = json.loads((folder / "config.json").read_text())["model_type"]
    hf.save_pretrained(tmp_path, model, params, model_type=hf_type)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == hf.SUPPORTED[hf_type]
    ids, _ = batch(1)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model.apply(params, ids), rtol=0, atol=1e-4)
    again, params2, _ = hf.load_pretrained(tmp_path, tokenizer=False)
    assert again.config == model.config and all(torch.equal(params[k], params2[k]) for k in params)


def test_our_own_model_exports_as_llama_with_equal_logits(tmp_path):
    model = mf.build_model(mf.ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, max_seq_len=32))
    params = {k: v * 5 if v.dim() == 2 else v for k, v in model.init(3).items()}
    hf.save_pretrained(tmp_path, model, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model.apply(params, ids), rtol=0, atol=1e-4)


def test_sharded_checkpoints_load_both_ways(saved, tmp_path):
    folder, ref = saved["qwen2"]
    ref.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    assert (tmp_path / "theirs" / hf.INDEX_FILE).is_file()
    model, params, _ = hf.load_pretrained(tmp_path / "theirs", tokenizer=False)
    _, expected, _ = hf.load_pretrained(folder, tokenizer=False)
    assert all(torch.equal(params[k], expected[k]) for k in expected)
    hf.save_pretrained(tmp_path / "ours", model, params, model_type="qwen2", max_shard_size="20KB")
    index = json.loads((tmp_path / "ours" / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, _ = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_bf16_checkpoints_load_as_bf16_unless_asked(tmp_path):
    ref = hf_model(transformers.LlamaConfig(**SIZES)).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    _, params, _ = hf.load_pretrained(tmp_path, tokenizer=False)
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    _, params32, _ = hf.load_pretrained(tmp_path, tokenizer=False, dtype=torch.float32)
    assert {p.dtype for p in params32.values()} == {torch.float32}
    assert all(torch.equal(params32[k], params[k].float()) for k in params)


def test_legacy_config_keys_load(saved, tmp_path):
    """Older checkpoints keep rope_theta and rope_scaling (with "type") at the top level."""
    folder, ref = saved["llama_tied_bias_llama3"]
    cfg = json.loads((folder / "config.json").read_text())
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 500000.0
    legacy["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in LLAMA3_ROPE.items()}
    legacy.pop("tie_word_embeddings")  # left to the class default: the weights say it is tied
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    model, params, _ = hf.load_pretrained(tmp_path, tokenizer=False)
    assert model.config.tie_embeddings and model.config.rope_scaling["rope_type"] == "llama3"
    ids, _ = batch(3)
    with torch.no_grad():
        torch.testing.assert_close(model.apply(params, ids), ref(input_ids=ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("change,field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type"),
])
def test_what_the_decoder_does_not_compute_is_refused_naming_the_field(saved, tmp_path, change, field):
    folder, _ = saved["qwen2"]
    cfg = {**json.loads((folder / "config.json").read_text()), **change}
    with pytest.raises(hf.HFError, match=field):
        hf.config_from_hf(cfg)


def test_a_sliding_window_narrower_than_the_positions_caps_the_length(saved):
    folder, _ = saved["mistral"]
    cfg = {**json.loads((folder / "config.json").read_text()), "sliding_window": 32}
    with pytest.warns(UserWarning, match="sliding_window = 32"):
        assert hf.config_from_hf(cfg).max_seq_len == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf.config_from_hf({**cfg, "sliding_window": 4096}).max_seq_len == 64  # wider: nothing to say


def test_missing_files_are_named(tmp_path, saved):
    with pytest.raises(hf.HFError, match="config.json is missing"):
        hf.load_pretrained(tmp_path)
    folder, _ = saved["llama"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(hf.HFError, match="no model.safetensors"):
        hf.load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(hf.HFError, match="no tokenizer.json"):
        hf.load_pretrained(tmp_path)


def test_sft_steps_on_a_loaded_model_export_to_equal_transformers_logits(saved, tmp_path):
    folder, _ = saved["qwen3"]
    model, params, _ = hf.load_pretrained(folder, tokenizer=False)
    trainer = mf.create_trainer("sft", model, learning_rate=1e-3)
    state = trainer.init(params)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, VOCAB, (4, 16), generator=g)
        labels = ids.roll(-1, 1).masked_fill(torch.arange(16) < 6, mf.IGNORE_INDEX)
        state, _ = trainer.step(state, {"input_ids": ids, "labels": labels})
    assert not torch.equal(state.params["tok_emb.weight"], params["tok_emb.weight"])
    hf.save_pretrained(tmp_path, model, state.params, model_type="qwen3")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, _ = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model.apply(state.params, ids), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- the command line


def test_cli_sft_from_a_folder_then_export_round_trips_through_transformers(tmp_path, tiny_hf_folder, monkeypatch,
                                                                             capsys):
    from minillm_func import checkpoint, cli

    monkeypatch.chdir(tmp_path)  # the folder is "tiny" from here
    corpus = mf.demo_corpus(2, n_sft=24, n_dpo=16)
    chats = [{"messages": [{"role": "user", "content": x["prompt"]}, {"role": "assistant", "content": x["completion"]}]}
             for x in corpus.sft]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    pairs = [{"prompt": [{"role": "user", "content": x["prompt"]}], "chosen": x["chosen"], "rejected": x["rejected"]}
             for x in corpus.dpo]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))

    def run(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    run("train", "sft", "--model", "tiny", "--data", "chat.jsonl", "--out", "sft", "--steps", "3",
        "--batch-size", "4", "--learning-rate", "1e-2", "--no-progress")
    cfg = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert cfg["model"] == str((tmp_path / "tiny").resolve()) and cfg["max_length"] == 256 and cfg["dim"] == 64
    run("train", "sft", "--out", "sft", "--resume", "--steps", "4")  # settings and tokenizer from the run
    state, meta = checkpoint.load(checkpoint.resolve(tmp_path / "sft"))
    assert meta["step"] == 4 and meta["hf_model_type"] == "llama" and meta["tokenizer"]["type"] == "hf"
    assert "exported" not in run("export", "--ckpt", "sft", "--out", "sft-hf")

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sft-hf").eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "sft-hf")
    model, params, tok = hf.load_pretrained(tmp_path / "sft-hf")
    assert all(torch.equal(params[k], state.params[k]) for k in params)
    messages = [{"role": "user", "content": "Q: reverse abc\nA: "}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == their_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(back(input_ids=x).logits, model.apply(params, x), rtol=0, atol=1e-4)

    out = run("generate", "--model", "sft-hf", "--chat", "--prompt", "Q: reverse abc\\nA: ", "--max-new-tokens", "4")
    assert json.loads(out)["prompt"] == "Q: reverse abc\nA: "
    assert json.loads(run("eval", "--model", "tiny", "--data", "chat.jsonl"))["kind"] == "sft"

    # DPO from the folder with precomputed reference log-probs: eval scores against the folder's weights.
    run("train", "dpo", "--model", "tiny", "--data", "pairs.jsonl", "--out", "dpo", "--steps", "2", "--batch-size",
        "4", "--precompute-reference", "true", "--learning-rate", "1e-2", "--no-progress")
    got = json.loads(run("eval", "--ckpt", "dpo", "--data", "pairs.jsonl"))
    policy, _ = checkpoint.load(checkpoint.resolve(tmp_path / "dpo"))
    _, reference, _ = hf.load_pretrained(tmp_path / "tiny")
    trainer = mf.create_trainer("dpo", model)
    data = mf.load_dataset(tmp_path / "pairs.jsonl", tok, 256, kind="dpo")
    expected = trainer.evaluate(trainer.init(policy.params)._replace(extras={"ref_params": reference}),
                                mf.Batches(data, 32, shuffle=False, epochs=1))
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_cli_model_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from minillm_func import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}))
    (tmp_path / "empty").mkdir()
    for argv, text in [(["train", "sft", "--model", "nowhere", "--data", "d.jsonl", "--out", "r"], "no such folder"),
                       (["train", "sft", "--model", "empty", "--data", "d.jsonl", "--out", "r"], "config.json is missing"),
                       (["train", "sft", "--model", "empty", "--init", "x", "--data", "d.jsonl", "--out", "r"],
                        "give one"),
                       (["generate", "--model", "empty", "--prompt", "x"], "config.json is missing")]:
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code in (1, 2) and err.count("\n") == 1 and text in err, err


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak resident memory of a fresh process over the load grows by about the weights' size, not twice it."""
    import subprocess
    import sys

    model = mf.build_model(mf.ModelConfig(vocab_size=32000, dim=256, n_layers=4, n_heads=4, max_seq_len=64,
                                          vocab_multiple=1))
    hf.save_pretrained(tmp_path, model, model.init(0))
    code = """
import sys
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
from minillm_func import hf, build_model, ModelConfig
build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4))  # warm the imports and the meta module
before = peak()
model, params, _ = hf.load_pretrained(sys.argv[1], tokenizer=False)
print(peak() - before, sum(p.numel() * p.element_size() for p in params.values()))
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    growth, weights = map(int, r.stdout.split())
    assert weights > 40e6 and growth < 1.3 * weights, (growth, weights)
