import json
import math
from dataclasses import asdict, fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm_func as mf
from strategies import gen, model_configs, seeds


def random_ids(cfg, seed, batch=2, length=None):
    g = gen(seed)
    length = length or cfg.max_seq_len
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


@given(model_configs(), seeds)
def test_init_is_deterministic_per_seed(cfg, seed):
    model = mf.build_model(cfg)
    a, b = model.init(seed), model.init(seed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = model.init(seed + 1)
    assert any(not torch.equal(a[k], c[k]) for k in a if not k.endswith("norm.weight"))


@given(model_configs())
def test_params_keys_equal_module_named_parameters(cfg):
    model = mf.build_model(cfg)
    params = model.init(0)
    assert list(params) == [n for n, _ in model.module.named_parameters()]
    assert ("lm_head.weight" in params) != cfg.tie_embeddings  # tied weights appear once
    assert params["tok_emb.weight"].shape == (cfg.padded_vocab_size, cfg.dim)
    assert cfg.padded_vocab_size % 64 == 0 and cfg.padded_vocab_size >= cfg.vocab_size
    assert all(p.device.type == "meta" for p in model.module.parameters())  # the module holds no weights


@given(model_configs(), seeds)
def test_apply_is_pure(cfg, seed):
    model = mf.build_model(cfg)
    params = model.init(seed)
    ids = random_ids(cfg, seed)
    mask = (torch.rand(ids.shape, generator=gen(seed)) < 0.8).long()
    before = ({k: v.clone() for k, v in params.items()}, ids.clone(), mask.clone())
    out1 = model.apply(params, ids, mask)
    out2 = model.apply(params, ids, mask)
    assert torch.equal(out1, out2)
    assert all(torch.equal(params[k], before[0][k]) for k in params)
    assert torch.equal(ids, before[1]) and torch.equal(mask, before[2])


@given(model_configs(), seeds)
def test_logits_at_real_positions_ignore_padded_content(cfg, seed):
    """Any padding pattern (left, right or holes): changing padded tokens leaves real logits unchanged."""
    model = mf.build_model(cfg)
    params = model.init(seed)
    g = gen(seed)
    ids = random_ids(cfg, seed)
    mask = torch.rand(ids.shape, generator=g) < 0.6
    mask[:, 0] = True
    other = torch.where(mask, ids, torch.randint(0, cfg.vocab_size, ids.shape, generator=g))
    a = model.apply(params, ids, mask.long())
    b = model.apply(params, other, mask.long())
    assert torch.equal(a[mask], b[mask])
    assert torch.isfinite(a).all() and torch.isfinite(b).all()  # no NaN rows at padded queries


@given(model_configs(), seeds)
def test_all_ones_mask_equals_no_mask(cfg, seed):
    model = mf.build_model(cfg)
    params = model.init(seed)
    ids = random_ids(cfg, seed)
    torch.testing.assert_close(model.apply(params, ids, torch.ones_like(ids)), model.apply(params, ids),
                               rtol=1e-5, atol=1e-5)


@given(model_configs(), seeds)
def test_logits_are_causal(cfg, seed):
    model = mf.build_model(cfg)
    params = model.init(seed)
    ids = random_ids(cfg, seed, batch=1)
    cut = cfg.max_seq_len // 2
    changed = ids.clone()
    changed[:, cut:] = (changed[:, cut:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model.apply(params, ids)[:, :cut], model.apply(params, changed)[:, :cut],
                               rtol=1e-5, atol=1e-6)


@given(model_configs(), seeds, st.sampled_from([torch.float32, torch.float64]))
def test_apply_equals_the_module_with_the_same_weights(cfg, seed, dtype):
    model = mf.build_model(cfg)
    params = model.init(seed, dtype=dtype)
    ids = random_ids(cfg, seed)
    module = model.to_module(params)
    assert module.tok_emb.weight.dtype == dtype
    with torch.no_grad():
        assert torch.equal(module(ids), model.apply(params, ids))
    assert all(torch.equal(p, params[n]) for n, p in module.named_parameters())


def test_gradients_flow_to_every_parameter_under_torch_func():
    cfg = mf.ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=8,
                         tie_embeddings=False)
    model = mf.build_model(cfg)
    params = model.init(0)
    ids = random_ids(cfg, 0)
    labels = ids.roll(-1, 1)

    def loss(p):
        return mf.pretrain_loss(model.apply(p, ids), labels)

    grads = torch.func.grad(loss)(params)
    assert grads.keys() == params.keys()
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=30, n_heads=4), "not divisible"),
    (dict(dim=12, n_heads=4), "even"),
    (dict(dim=32, n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(dropout=0.1), "dropout"),
    (dict(n_layers=0), "positive int"),
])
def test_bad_config_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mf.ModelConfig(vocab_size=10, **{"dim": 32, "n_heads": 4, **kwargs})


def test_bad_inputs_to_apply_raise_clear_errors():
    cfg = mf.ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, max_seq_len=4)
    model = mf.build_model(cfg)
    params = model.init(0)
    with pytest.raises(ValueError, match="2-D"):
        model.apply(params, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.apply(params, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.apply(params, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model.apply(params, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 2))


# --------------------------------------------------------------------------- published architectures
#
# Head size, MLP size, attention biases, query/key norms and rotary scaling, checked
# against transformers' own Llama / Mistral / Qwen2 / Qwen3 (an independent
# implementation; a test-only dependency) with the weights copied across by name.

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # a short original context: with head_dim 16 and
# rope_theta 1e4 the wavelengths 6.3, 20, 63, ... fall in all three bands (kept, blended, divided)
LINEAR = {"rope_type": "linear", "factor": 4.0}


HF_MODULES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
              "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
              "self_attn.o_proj": "attn.wo", "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
              "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2"}


def hf_name_to_ours(name: str) -> str:
    """transformers' parameter name -> ours (the mapping a checkpoint loader uses)."""
    top = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    model, layers, i, rest = name.split(".", 3)
    assert (model, layers) == ("model", "layers"), name
    module, leaf = rest.rsplit(".", 1)  # leaf: weight or bias
    return f"layers.{i}.{HF_MODULES[module]}.{leaf}"


def hf_pair(family, *, hidden=32, n_heads=4, n_kv=2, head_dim=None, inter=48, layers=2, tie=False,
            bias=False, rope=None, theta=10000.0, vocab=97, seed=0):
    """A randomly initialised transformers model and the ModelConfig of the same architecture.

    Every weight is drawn again (norm weights around 1, biases non-zero): transformers
    starts biases at zero and norms at one, which would hide a missing bias or norm.
    """
    transformers = pytest.importorskip("transformers", reason="the parity tests compare against transformers")
    head_dim = head_dim or hidden // n_heads
    rope_parameters = {"rope_type": "default", **(rope or {}), "rope_theta": theta}
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, rope_parameters=rope_parameters)
    ours = dict(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=n_heads, n_kv_heads=n_kv, max_seq_len=64,
                norm_eps=1e-6, tie_embeddings=tie, rope_theta=theta, vocab_multiple=1, intermediate_size=inter,
                rope_scaling=rope, head_size=head_dim if head_dim != hidden // n_heads else None)
    if family == "llama":
        hf_cfg = transformers.LlamaConfig(head_dim=head_dim, attention_bias=bias, **common)
        ours.update(qkv_bias=bias, out_bias=bias)
    elif family == "mistral":
        assert not bias
        hf_cfg = transformers.MistralConfig(head_dim=head_dim, sliding_window=None, **common)
    elif family == "qwen2":  # biases on q, k, v always; not on o
        assert head_dim == hidden // n_heads
        hf_cfg = transformers.Qwen2Config(**common)
        ours.update(qkv_bias=True)
    elif family == "qwen3":  # query/key norms always; attention_bias on all four projections
        hf_cfg = transformers.Qwen3Config(head_dim=head_dim, attention_bias=bias, **common)
        ours.update(qk_norm=True, qkv_bias=bias, out_bias=bias)
    else:
        raise AssertionError(family)
    hf_cfg._attn_implementation = "eager"  # the plain softmax(QK^T)V reference, not our SDPA path
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    g = gen(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:  # large enough that attention is far from uniform, so positions matter
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return hf, mf.ModelConfig(**ours)


def params_from_hf(hf, cfg):
    params = {hf_name_to_ours(k): v.detach().clone() for k, v in hf.state_dict().items()
              if not (cfg.tie_embeddings and k == "lm_head.weight")}
    expected = {n: p.shape for n, p in mf.build_model(cfg).module.named_parameters()}
    assert {k: v.shape for k, v in params.items()} == expected  # same names, same shapes, nothing left over
    return params


def right_padded(vocab, lengths, T, seed):
    ids = torch.randint(0, vocab, (len(lengths), T), generator=gen(seed))
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def assert_matches_transformers(hf, cfg, *, T=32, seed=0, atol=1e-4):
    """Our logits equal transformers' within ``atol``, without a mask and with right padding
    (compared at real positions only). Returns the largest difference seen."""
    model = mf.build_model(cfg)
    params = params_from_hf(hf, cfg)
    ids, mask = right_padded(cfg.vocab_size, [T, T // 2, 3], T, seed)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ref_masked = hf(input_ids=ids, attention_mask=mask).logits
    ours, ours_masked = model.apply(params, ids), model.apply(params, ids, mask)
    assert ours.shape == ref.shape  # vocab_multiple=1: no padded columns
    real = mask.bool()
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    torch.testing.assert_close(ours_masked[real], ref_masked[real], rtol=0, atol=atol)
    assert ref.abs().max() > 1.0  # the logits are not all near zero (a vacuous comparison)
    return max(float((ours - ref).abs().max()), float((ours_masked - ref_masked)[real].abs().max()))


@pytest.mark.parametrize("family, kwargs", [
    ("llama", dict()),                                                   # the plain architecture
    ("llama", dict(rope=LLAMA3, tie=True, n_heads=2, n_kv=1)),           # Llama 3.1 / 3.2 rotary scaling
    ("llama", dict(rope=LINEAR)),                                        # position interpolation
    ("llama", dict(bias=True, n_kv=1)),                                  # attention_bias: q, k, v and o
    ("llama", dict(head_dim=16, inter=40)),                              # head size != hidden / heads
    ("mistral", dict(n_heads=4, n_kv=1, head_dim=16)),                   # grouped-query attention
    ("qwen2", dict(tie=True, theta=1e6)),                                # q/k/v biases, not o
    ("qwen3", dict(hidden=20, n_heads=3, n_kv=1, head_dim=8)),           # qk norm; hidden % heads != 0
    ("qwen3", dict(head_dim=16, bias=True, rope=LLAMA3, tie=True)),      # qk norm + biases + llama3 rope
], ids=["llama", "llama3-rope", "linear-rope", "llama-bias", "llama-head-dim", "mistral", "qwen2", "qwen3",
        "qwen3-bias-llama3"])
def test_logits_match_transformers(family, kwargs):
    hf, cfg = hf_pair(family, **kwargs)
    assert_matches_transformers(hf, cfg)


@settings(max_examples=10)
@given(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]), st.data(), seeds)
def test_logits_match_transformers_for_random_configs(family, data, seed):
    n_heads = data.draw(st.sampled_from([1, 2, 4]), label="n_heads")
    n_kv = data.draw(st.sampled_from([h for h in (1, 2, 4) if n_heads % h == 0]), label="n_kv")
    head_dim = data.draw(st.sampled_from([4, 8, 16]), label="head_dim")
    hidden = n_heads * data.draw(st.sampled_from([4, 8, 16]), label="hidden per head")
    if family in ("qwen2",):
        head_dim = hidden // n_heads
    kwargs = dict(hidden=hidden, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
                  inter=data.draw(st.integers(8, 64), label="inter"), layers=data.draw(st.integers(1, 2)),
                  tie=data.draw(st.booleans(), label="tie"),
                  bias=family in ("llama", "qwen3") and data.draw(st.booleans(), label="bias"),
                  rope=data.draw(st.sampled_from([None, LLAMA3, LINEAR]), label="rope"),
                  theta=data.draw(st.sampled_from([100.0, 10000.0]), label="theta"), seed=seed)
    hf, cfg = hf_pair(family, **kwargs)
    assert_matches_transformers(hf, cfg, T=16, seed=seed)


@pytest.mark.parametrize("rope", [LLAMA3, LINEAR])
def test_the_transformers_comparison_sees_the_rotary_scaling(rope):
    """The same weights without our rope_scaling disagree with transformers: the parity tests above
    would fail if the scaling were ignored."""
    hf, cfg = hf_pair("llama", rope=rope, n_heads=2, n_kv=1)
    plain = mf.ModelConfig(**{**asdict(cfg), "rope_scaling": None})
    params = params_from_hf(hf, cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=gen(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (mf.build_model(plain).apply(params, ids) - ref).abs().max() > 1e-2
    torch.testing.assert_close(mf.build_model(cfg).apply(params, ids), ref, rtol=0, atol=1e-4)


def llama3_inv_freq_reference(head_dim, theta, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Llama 3.1's published rescaling (Meta's ``apply_scaling``), written out per frequency in float64."""
    out, bands = [], set()
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
            bands.add("high")
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
            bands.add("low")
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
            bands.add("medium")
    return torch.tensor(out, dtype=torch.float64), bands


@pytest.mark.parametrize("head_dim, theta, factor, low, high, old", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),      # Llama 3.1 8B
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),      # Llama 3.2 1B
    (16, 10000.0, 8.0, 1.0, 4.0, 32),          # the tiny setting of the parity tests
    (32, 10000.0, 2.0, 2.0, 3.0, 100),
])
def test_llama3_inv_freq_equals_the_published_formula(head_dim, theta, factor, low, high, old):
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": old}
    expected, bands = llama3_inv_freq_reference(head_dim, theta, factor, low, high, old)
    assert bands == {"high", "medium", "low"}  # every branch of the formula is exercised
    got = mf.model.rotary_inv_freq(head_dim, theta, scaling, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    plain = mf.model.rotary_inv_freq(head_dim, theta, None, dtype=torch.float64)
    torch.testing.assert_close(mf.model.rotary_inv_freq(head_dim, theta, {"rope_type": "linear", "factor": factor},
                                                        dtype=torch.float64), plain / factor, rtol=1e-15, atol=0)
    torch.testing.assert_close(mf.model.rotary_inv_freq(head_dim, theta, {"rope_type": "default"},
                                                        dtype=torch.float64), plain, rtol=0, atol=0)
    # The float32 tables the model uses agree with the float64 values.
    torch.testing.assert_close(mf.model.rotary_inv_freq(head_dim, theta, scaling).double(), expected,
                               rtol=1e-6, atol=0)


def test_linear_rope_scaling_divides_the_positions():
    pos = torch.arange(0, 40, 4)
    cos, sin = mf.model.rotary_angles(pos, 8, 10000.0, LINEAR)
    cos_ref, sin_ref = mf.model.rotary_angles(pos.double() / LINEAR["factor"], 8, 10000.0)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the new options in every path


FEATURES = dict(vocab_size=61, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, head_size=8, intermediate_size=40,
                qkv_bias=True, out_bias=True, qk_norm=True, rope_scaling=LLAMA3, vocab_multiple=1,
                max_seq_len=32, tie_embeddings=False)


def feature_params(cfg, seed=0, dtype=torch.float32):
    """init's params with the biases and norm weights drawn too (init makes them 0 and 1)."""
    params = mf.build_model(cfg).init(seed, dtype=dtype)
    g = gen(seed + 1)
    for k, v in params.items():
        if k.endswith(".bias"):
            params[k] = (0.3 * torch.randn(v.shape, generator=g)).to(dtype)
        elif k.endswith("norm.weight"):
            params[k] = (1 + 0.3 * torch.randn(v.shape, generator=g)).to(dtype)
    return params


def test_new_options_shape_the_params():
    cfg = mf.ModelConfig(**FEATURES)
    params = mf.build_model(cfg).init(0)
    shapes = {k: tuple(v.shape) for k, v in params.items() if k.startswith("layers.0.attn.")}
    assert shapes == {"layers.0.attn.wq.weight": (32, 24), "layers.0.attn.wq.bias": (32,),
                      "layers.0.attn.wk.weight": (16, 24), "layers.0.attn.wk.bias": (16,),
                      "layers.0.attn.wv.weight": (16, 24), "layers.0.attn.wv.bias": (16,),
                      "layers.0.attn.wo.weight": (24, 32), "layers.0.attn.wo.bias": (24,),
                      "layers.0.attn.q_norm.weight": (8,), "layers.0.attn.k_norm.weight": (8,)}
    assert params["layers.1.mlp.w1.weight"].shape == (40, 24) and cfg.hidden_dim == 40 and cfg.head_dim == 8
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in params.items() if k.endswith(".bias"))
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in params.items() if k.endswith("norm.weight"))
    assert params["tok_emb.weight"].shape == (61, 24)  # vocab_multiple=1: no padding rows
    only_bias = mf.build_model(mf.ModelConfig(**{**FEATURES, "qkv_bias": False, "qk_norm": False}))
    assert [k for k in only_bias.init(0) if k.startswith("layers.0.attn.")] == [
        "layers.0.attn.wq.weight", "layers.0.attn.wk.weight", "layers.0.attn.wv.weight",
        "layers.0.attn.wo.weight", "layers.0.attn.wo.bias"]


def test_biases_do_not_change_the_weights_drawn_for_a_seed():
    """Biases start at zero without drawing, so switching them on keeps every weight's init."""
    plain = mf.build_model(mf.ModelConfig(**{**FEATURES, "qkv_bias": False, "out_bias": False})).init(5)
    biased = mf.build_model(mf.ModelConfig(**FEATURES)).init(5)
    assert all(torch.equal(v, biased[k]) for k, v in plain.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_new_options_in_apply_hidden_to_module_and_masks(dtype):
    cfg = mf.ModelConfig(**FEATURES)
    model = mf.build_model(cfg)
    params = feature_params(cfg, dtype=dtype)
    ids, mask = right_padded(cfg.vocab_size, [20, 7], 20, 3)
    logits = model.apply(params, ids, mask)
    hidden = model.apply_hidden(params, ids, mask)
    torch.testing.assert_close(hidden @ mf.model.output_weight(params).T, logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model.to_module(params)(ids, mask), logits)
    other = torch.where(mask.bool(), ids, (ids + 1) % cfg.vocab_size)  # padded content does not matter
    assert torch.equal(model.apply(params, other, mask)[mask.bool()], logits[mask.bool()])
    torch.testing.assert_close(model.apply(params, ids[:1, :20])[0], logits[0], rtol=1e-5, atol=1e-5)


def test_new_options_with_the_cache_equal_one_full_apply():
    cfg = mf.ModelConfig(**FEATURES)
    model = mf.build_model(cfg)
    params = feature_params(cfg, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=gen(4))
    cache, pieces = None, []
    for a, b in [(0, 7), (7, 8), (8, 19), (19, 30)]:
        logits, cache = model.apply_with_cache(params, ids[:, a:b], cache)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), model.apply(params, ids), rtol=0, atol=1e-10)
    assert cache[0][0].shape == (2, cfg.kv_heads, 30, cfg.head_dim)


def test_new_options_checkpointing_and_torch_func_give_the_same_gradients():
    cfg = mf.ModelConfig(**FEATURES)
    model = mf.build_model(cfg)
    params = feature_params(cfg, dtype=torch.float64)
    ids, mask = right_padded(cfg.vocab_size, [16, 9], 16, 5)
    labels = ids.roll(-1, 1).masked_fill(mask == 0, mf.IGNORE_INDEX)

    def loss(p, checkpoint=False):
        return mf.pretrain_loss(model.apply(p, ids, mask, checkpoint=checkpoint), labels)

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    plain = dict(zip(leaves, torch.autograd.grad(loss(leaves), list(leaves.values()))))
    ckpt = dict(zip(leaves, torch.autograd.grad(loss(leaves, checkpoint=True), list(leaves.values()))))
    func = torch.func.grad(loss)(params)
    for name in params:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(func[name], plain[name], rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in func.values())  # biases and q/k norms get gradients too


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # SDPA's CPU kernel has no vmap rule
def test_new_options_under_vmap():
    cfg = mf.ModelConfig(**FEATURES)
    model = mf.build_model(cfg)
    params = feature_params(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=gen(6))
    one_row = torch.func.vmap(lambda row: model.apply(params, row[None])[0])(ids)
    torch.testing.assert_close(one_row, model.apply(params, ids), rtol=1e-5, atol=1e-5)
    stacked = {k: torch.stack([v, v * 1.1]) for k, v in params.items()}  # an ensemble of two
    both = torch.func.vmap(lambda p: model.apply(p, ids))(stacked)
    torch.testing.assert_close(both[1], model.apply({k: v[1] for k, v in stacked.items()}, ids),
                               rtol=1e-5, atol=1e-5)


def test_new_options_in_bfloat16():
    cfg = mf.ModelConfig(**FEATURES)
    model = mf.build_model(cfg)
    params = feature_params(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen(7))
    low = model.apply({k: v.bfloat16() for k, v in params.items()}, ids)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    ref = model.apply(params, ids)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
    _, cache = model.apply_with_cache({k: v.bfloat16() for k, v in params.items()}, ids[:, :4])
    assert cache[0][0].dtype == torch.bfloat16


# --------------------------------------------------------------------------- configs


def test_default_config_keeps_its_param_names_and_shapes():
    cfg = mf.ModelConfig(vocab_size=70, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8,
                         tie_embeddings=False)
    params = mf.build_model(cfg).init(0)
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "tok_emb.weight": (128, 16), "layers.0.attn_norm.weight": (16,),
        "layers.0.attn.wq.weight": (16, 16), "layers.0.attn.wk.weight": (8, 16),
        "layers.0.attn.wv.weight": (8, 16), "layers.0.attn.wo.weight": (16, 16),
        "layers.0.mlp_norm.weight": (16,), "layers.0.mlp.w1.weight": (64, 16),
        "layers.0.mlp.w3.weight": (64, 16), "layers.0.mlp.w2.weight": (16, 64),
        "norm.weight": (16,), "lm_head.weight": (128, 16)}
    assert cfg.head_dim == 8 and cfg.hidden_dim == 64 and cfg.padded_vocab_size == 128
    # Values recorded from the model before head_size, biases, qk_norm and rope_scaling existed
    # (same seed, same draw order): adding options must not move the default init.
    for name, total, first in [("tok_emb.weight", 0.5426717898599236, -0.022516796365380287),
                               ("layers.0.attn.wo.weight", -0.257148607110139, 0.002545970492064953),
                               ("lm_head.weight", 0.6730156923604227, 0.006040816195309162)]:
        assert params[name].double().sum().item() == pytest.approx(total, rel=1e-6)
        assert params[name].flatten()[0].item() == pytest.approx(first, rel=1e-6)
    explicit = mf.ModelConfig(**{**asdict(cfg), "head_size": 8, "intermediate_size": 64,
                                 "rope_scaling": {"rope_type": "default"}})
    again = mf.build_model(explicit).init(0)  # spelling out the defaults changes nothing
    assert params.keys() == again.keys() and all(torch.equal(params[k], again[k]) for k in params)
    ids = torch.randint(0, 70, (2, 8), generator=gen(0))
    assert torch.equal(mf.build_model(cfg).apply(params, ids), mf.build_model(explicit).apply(params, ids))


@pytest.mark.parametrize("kwargs", [
    dict(),
    FEATURES,
    dict(rope_scaling=LINEAR, head_size=6, dim=20, n_heads=4),
    dict(rope_scaling={"rope_type": "default"}, qkv_bias=True),
])
def test_config_survives_a_json_round_trip(kwargs):
    cfg = mf.ModelConfig(**{"vocab_size": 50, "dim": 16, "n_heads": 2, **kwargs})
    back = mf.ModelConfig(**json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and hash(back) == hash(cfg)
    assert {cfg: 1}[back] == 1  # still usable as a key


def test_config_keeps_its_own_copy_of_rope_scaling():
    scaling = dict(LLAMA3)
    cfg = mf.ModelConfig(vocab_size=10, dim=16, n_heads=2, rope_scaling=scaling)
    scaling["factor"] = 2.0
    assert cfg.rope_scaling["factor"] == 8.0


def test_head_size_lifts_the_divisibility_rule():
    cfg = mf.ModelConfig(vocab_size=10, dim=20, n_heads=3, head_size=8)  # Qwen3's shape of rule
    assert cfg.head_dim == 8
    assert mf.build_model(cfg).init(0)["layers.0.attn.wo.weight"].shape == (20, 24)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=30, n_heads=4), "head_size"),                       # the error points at the new way out
    (dict(head_size=7), "must be even"),
    (dict(head_size=0), "head_size must be a positive int"),
    (dict(intermediate_size=-3), "intermediate_size must be a positive int"),
    (dict(qk_norm=1), "qk_norm must be True or False"),
    (dict(qkv_bias="yes"), "qkv_bias must be True or False"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"'yarn' is not supported.*'linear', 'llama3'"),
    (dict(rope_scaling={"type": "linear", "factor": 4.0}), r"\"rope_type\".*older configs"),
    (dict(rope_scaling={"rope_type": "linear"}), r"lacks \['factor'\]"),
    (dict(rope_scaling={**LLAMA3, "rope_theta": 5e5}), r"rope_theta.*ModelConfig.rope_theta"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.0}), r"\['factor'\] must be a positive number"),
    (dict(rope_scaling={**LLAMA3, "high_freq_factor": 1.0}), "must exceed low_freq_factor"),
    (dict(rope_scaling=[("rope_type", "linear")]), "must be None or a dict"),
])
def test_bad_new_options_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mf.ModelConfig(vocab_size=10, **{"dim": 32, "n_heads": 4, **kwargs})


def test_build_model_documents_every_config_field():
    documented = mf.build_model.__doc__
    missing = [f.name for f in fields(mf.ModelConfig) if f"``{f.name}``:" not in documented]
    assert not missing, f"build_model's docstring does not describe {missing}"


# --------------------------------------------------------------------------- pinned numbers

PINNED_CFG = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def pinned_setup():
    model = mf.build_model(mf.ModelConfig(**PINNED_CFG))
    params = model.init(0, dtype=torch.float64)
    params = {k: v if k.endswith("norm.weight") else v * 10 for k, v in params.items()}
    ids = torch.arange(12).reshape(2, 6) * 7 % 50
    return model, params, ids


def test_pinned_values_for_a_fixed_seed():
    """Numbers recorded from the model before a refactoring (float64, so BLAS summation order
    does not show): a change of computation order, not just of structure, makes this fail.
    Re-recorded once, when the rotary embedding stopped rounding a float64 model's queries and
    keys to float32 (the values moved by ~5e-8, the size of that rounding)."""
    model, params, ids = pinned_setup()

    def check(actual, recorded):
        torch.testing.assert_close(actual, torch.tensor(recorded, dtype=torch.float64), rtol=1e-12, atol=1e-12)

    logits = model.apply(params, ids)
    check(logits[0, -1, :4], [0.5186428623769742, 0.16589183311756375, 2.409750885729036, -1.145346446146953])
    check(logits[1, 2, 10:13], [0.615073521439755, -0.758602922761266, 0.1050866639368408])
    left_padded = model.apply(params, ids, torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    check(left_padded[1, -1, :3], [-0.6036720965623846, -0.7778048972831516, 0.23579097427093826])
    grads = torch.func.grad(lambda p: mf.pretrain_loss(model.apply(p, ids), ids.roll(-1, 1)))(params)
    check(grads["layers.1.attn.wk.weight"][0, :3],
          [-0.014226835752017523, 0.0012747218167788693, -0.018889194721411248])
    _, cache = model.apply_with_cache(params, ids[:, :4])
    step, _ = model.apply_with_cache(params, ids[:, 4:5], cache)
    check(step[0, 0, :3], [-0.0211936833461287, 2.8233595783482746, 0.9734962932635413])


def test_the_modules_training_and_decoding_paths_agree():
    """Transformer.forward / hidden (whole sequences) and Transformer.decode (from a cache) share the blocks."""
    model, params, ids = pinned_setup()
    module = model.to_module(params)
    cfg = model.config
    with torch.no_grad():
        logits = module(ids)
        torch.testing.assert_close(module.hidden(ids) @ module.lm_head.weight.T, logits, rtol=0, atol=1e-12)
        first, cache = module.decode(ids[:, :4], mf.model.empty_cache(cfg, 2, dtype=torch.float64))
        rest, cache = module.decode(ids[:, 4:], cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), logits, rtol=0, atol=1e-12)
    assert cache[0][0].shape == (2, cfg.kv_heads, 6, cfg.head_dim)
    with pytest.raises(TypeError):  # a cache is for decode; checkpointing is for training
        module(ids, cache=cache)


def test_rotary_keeps_float64_precision_and_raises_half_precision():
    # the rotation of split halves as a complex product, in float64: (x1 + i x2) * (cos + i sin)
    from minillm_func.model import apply_rotary

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    angles = torch.rand(5, 4, generator=g, dtype=torch.float64) * 6
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones_like(angles), angles)
    out = apply_rotary(x, angles.cos(), angles.sin())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], -1), rtol=0, atol=1e-15)
    half = apply_rotary(x.to(torch.bfloat16), angles.cos().float(), angles.sin().float())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), torch.cat([z.real, z.imag], -1), rtol=0.02, atol=0.03)
