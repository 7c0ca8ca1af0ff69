import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func.generate import generate, generate_text
from strategies import gen, model_configs, seeds, splits

# Greedy-equality properties run in float64: two computations that agree to float
# rounding pick the same argmax unless two logits tie to ~1e-7, which float64 makes
# vanishingly unlikely on random weights.
EXACT = torch.float64


def sharpen(params, factor=10.0):
    """Scale every weight but the norms. At init (std 0.02) attention is almost uniform and
    greedy decoding mostly echoes the last token, so a wrong rotary position or mask in
    the decoding loop would rarely change the output; with larger weights it does."""
    return {k: v if k.endswith("norm.weight") else v * factor for k, v in params.items()}


@st.composite
def setups(draw, *, max_batch=3, max_prompt=6, min_batch=1):
    """``(model, params, prompts, max_new_tokens)`` with prompts of random lengths that fit max_seq_len."""
    cfg = draw(model_configs())
    model = mf.build_model(cfg)
    params = sharpen(model.init(draw(seeds), dtype=EXACT))
    lengths = draw(st.lists(st.integers(1, max_prompt), min_size=min_batch, max_size=max_batch))
    g = gen(draw(seeds))
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    max_new = draw(st.integers(1, cfg.max_seq_len - max(lengths)))
    return model, params, prompts, max_new


def greedy(model, params, prompts, max_new, **kw):
    kw = {"eos_id": None, "pad_id": 0, **kw}
    return generate(model, params, prompts, max_new_tokens=max_new, **kw)


def counting(model):
    """The same model, recording the shape of every ``input_ids`` fed to ``apply_with_cache``."""
    shapes = []

    def apply_with_cache(params, input_ids, *args, **kw):
        shapes.append(tuple(input_ids.shape))
        return model.apply_with_cache(params, input_ids, *args, **kw)

    return model._replace(apply_with_cache=apply_with_cache), shapes


def steering(model, boost):
    """The same model with ``boost(call_index, logits)`` added to the last position's logits."""
    calls = []

    def apply_with_cache(params, input_ids, *args, **kw):
        logits, cache = model.apply_with_cache(params, input_ids, *args, **kw)
        logits = logits.clone()
        logits[:, -1] += boost(len(calls), logits[:, -1])
        calls.append(None)
        return logits, cache

    return model._replace(apply_with_cache=apply_with_cache)


# --------------------------------------------------------------------------- the cache


@given(model_configs(), seeds, st.data())
def test_incremental_logits_equal_one_full_apply(cfg, seed, data):
    """Feeding a sequence in arbitrary chunks through the cache gives model.apply's logits everywhere."""
    model = mf.build_model(cfg)
    params = sharpen(model.init(seed))
    T = data.draw(st.integers(1, cfg.max_seq_len))
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=gen(seed))
    cuts = data.draw(splits(T))
    cache, pieces = None, []
    for a, b in zip(cuts, cuts[1:]):
        logits, cache = model.apply_with_cache(params, ids[:, a:b], cache)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), model.apply(params, ids), rtol=0, atol=1e-5)
    assert all(k.shape == v.shape == (2, cfg.kv_heads, T, cfg.head_dim) for k, v in cache)


@given(model_configs(), seeds, st.data())
def test_left_padded_rows_with_offsets_equal_each_row_alone(cfg, seed, data):
    """Left padding + start_pos=-n_pad + key mask: real positions get the logits of the unpadded row."""
    model = mf.build_model(cfg)
    params = sharpen(model.init(seed))
    T = data.draw(st.integers(2, cfg.max_seq_len))
    n_pad = torch.tensor(data.draw(st.lists(st.integers(0, T - 1), min_size=2, max_size=3)))
    g = gen(seed)
    ids = torch.randint(0, cfg.vocab_size, (len(n_pad), T), generator=g)
    mask = torch.arange(T)[None, :] >= n_pad[:, None]
    cut = data.draw(st.integers(1, T))
    batched, cache = model.apply_with_cache(params, ids[:, :cut], None, -n_pad, mask[:, :cut])
    if cut < T:  # the rest of the rows, after the cached prefix
        rest, _ = model.apply_with_cache(params, ids[:, cut:], cache, cut - n_pad, mask)
        batched = torch.cat([batched, rest], dim=1)
    for b, p in enumerate(n_pad.tolist()):
        alone = model.apply(params, ids[b:b + 1, p:])
        torch.testing.assert_close(batched[b:b + 1, p:], alone, rtol=0, atol=1e-5)
    assert torch.isfinite(batched).all()  # padded queries see themselves: no NaN rows


def test_apply_with_cache_is_pure_and_checks_its_inputs():
    cfg = mf.ModelConfig(vocab_size=30, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=8)
    model = mf.build_model(cfg)
    params = model.init(0)
    ids = torch.randint(0, 30, (2, 5), generator=gen(0))
    _, cache = model.apply_with_cache(params, ids[:, :3])
    before = copy.deepcopy((params, ids, cache))
    out1, new1 = model.apply_with_cache(params, ids[:, 3:], cache)
    out2, new2 = model.apply_with_cache(params, ids[:, 3:], cache)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(new1[0], new2[0]))
    assert all(torch.equal(params[k], before[0][k]) for k in params) and torch.equal(ids, before[1])
    assert all(torch.equal(x, y) for kv, kv0 in zip(cache, before[2]) for x, y in zip(kv, kv0))
    assert cache[0][0].shape[2] == 3 and new1[0][0].shape[2] == 5  # a new cache, the old one untouched
    with pytest.raises(ValueError, match="max_seq_len"):
        model.apply_with_cache(params, torch.zeros(2, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="attention_mask"):
        model.apply_with_cache(params, ids[:, 3:], cache, attention_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="batch"):
        model.apply_with_cache(params, ids[:1, 3:], cache)


def test_model_can_still_be_built_from_its_five_original_fields():
    model = mf.build_model(mf.ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, max_seq_len=4))
    rebuilt = mf.Model(init=model.init, apply=model.apply, module=model.module, config=model.config,
                       to_module=model.to_module)
    assert rebuilt.apply_with_cache is None and model.apply_with_cache is not None


# --------------------------------------------------------------------------- greedy decoding


@given(setups())
def test_cached_and_uncached_greedy_agree(setup):
    model, params, prompts, max_new = setup
    cached = greedy(model, params, prompts, max_new, use_cache=True)
    uncached = greedy(model, params, prompts, max_new, use_cache=False)
    assert cached == uncached
    assert [len(row) for row in cached] == [max_new] * len(prompts)  # eos_id=None: never stops early


@given(setups(min_batch=2), st.data())
def test_batched_prompts_give_each_prompt_alone(setup, data):
    model, params, prompts, max_new = setup
    pad_id = data.draw(st.integers(0, model.config.padded_vocab_size - 1))  # its value must not matter
    alone = [greedy(model, params, [p], max_new)[0] for p in prompts]
    assert greedy(model, params, prompts, max_new, pad_id=pad_id) == alone
    # Rows that finish at different times: make some token of the first row the EOS.
    eos = alone[0][data.draw(st.integers(0, len(alone[0]) - 1))]
    alone_eos = [greedy(model, params, [p], max_new, eos_id=eos)[0] for p in prompts]
    assert greedy(model, params, prompts, max_new, eos_id=eos, pad_id=pad_id) == alone_eos
    assert len(alone_eos[0]) < max_new and eos not in sum(alone_eos, [])
    assert all(row == full[:len(row)] for row, full in zip(alone_eos, alone))


def test_greedy_is_the_argmax_of_model_apply():
    """An independent reference: extend the sequence by the argmax of a full model.apply, one token at a time."""
    cfg = mf.ModelConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, max_seq_len=16, tie_embeddings=False)
    model = mf.build_model(cfg)
    params = model.init(3, dtype=EXACT)
    seq = [5, 1, 7]
    for _ in range(10):
        seq.append(int(model.apply(params, torch.tensor([seq]))[0, -1, :cfg.vocab_size].argmax()))
    assert greedy(model, params, [[5, 1, 7]], 10) == [seq[3:]]


# --------------------------------------------------------------------------- sampling


def sampling_model():
    cfg = mf.ModelConfig(vocab_size=60, dim=16, n_layers=1, n_heads=2, max_seq_len=32)
    model = mf.build_model(cfg)
    return model, model.init(0)


def test_sampling_is_deterministic_per_seed_and_varies_across_seeds():
    model, params = sampling_model()
    prompts = [[1, 2, 3], [4]]
    kw = dict(max_new_tokens=20, eos_id=None, pad_id=0, temperature=5.0)
    rng = torch.get_rng_state()
    a = generate(model, params, prompts, seed=7, **kw)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is neither used nor advanced
    assert generate(model, params, prompts, seed=7, **kw) == a
    assert generate(model, params, prompts, seed=7, use_cache=False, **kw) == a
    others = [generate(model, params, prompts, seed=s, **kw) for s in range(8, 12)]
    assert any(o != a for o in others)
    assert all(0 <= t < model.config.vocab_size for out in [a, *others] for row in out for t in row)


@given(setups(), seeds, st.sampled_from([0.5, 1.0, 3.0]))
def test_top_k_one_and_tiny_top_p_are_greedy(setup, seed, temperature):
    model, params, prompts, max_new = setup
    expected = greedy(model, params, prompts, max_new)
    kw = dict(temperature=temperature, seed=seed)
    assert greedy(model, params, prompts, max_new, top_k=1, **kw) == expected
    assert greedy(model, params, prompts, max_new, top_p=1e-6, **kw) == expected


@given(seeds, st.integers(1, 5), st.sampled_from([0.05, 0.3, 0.7]))
def test_samples_stay_inside_the_top_k_and_the_nucleus(seed, k, p):
    model, params = sampling_model()
    prompt = [[3, 1, 4, 1, 5]]
    logits = model.apply(params, torch.tensor(prompt))[0, -1, :model.config.vocab_size] / 2.0
    allowed_k = set(logits.topk(k).indices.tolist())
    probs, order = logits.softmax(-1).sort(descending=True)
    nucleus = set(order[:int((probs.cumsum(-1) < p).sum()) + 1].tolist())  # smallest set reaching p
    kw = dict(max_new_tokens=1, eos_id=None, pad_id=0, temperature=2.0)
    from_k = {generate(model, params, prompt, top_k=k, seed=seed + i, **kw)[0][0] for i in range(30)}
    from_p = {generate(model, params, prompt, top_p=p, seed=seed + i, **kw)[0][0] for i in range(30)}
    assert from_k <= allowed_k and from_p <= nucleus
    # The filters do not collapse to greedy: with near-uniform logits, 30 draws from
    # two or more allowed tokens all landing on one token has probability < 2**-29.
    assert len(from_k) >= min(k, 2) and len(from_p) >= min(len(nucleus), 2)


# --------------------------------------------------------------------------- stopping and the vocabulary


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_row_stops_at_its_eos_which_is_not_returned(use_cache):
    cfg = mf.ModelConfig(vocab_size=20, dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    model = mf.build_model(cfg)
    params = model.init(1)
    prompts = [[1, 2], [3, 4, 5], [6]]
    eos, stop_at = 7, [2, 0, None]  # row b emits EOS as its token number stop_at[b]
    free = greedy(model, params, prompts, 8, use_cache=use_cache)

    def boost(call, last):
        bonus = torch.zeros_like(last)
        for b, s in enumerate(stop_at):
            if s is not None and call == s:
                bonus[b, eos] = 1e4
        bonus[:, eos] -= 1e4 * torch.tensor([s is None or call < s for s in stop_at])  # no EOS elsewhere
        return bonus

    out = greedy(steering(model, boost), params, prompts, 8, eos_id=eos, use_cache=use_cache)
    assert [len(r) for r in out] == [2, 0, 8]
    assert out[0] == free[0][:2] and out[1] == []
    assert eos not in sum(out, [])


def test_all_rows_finished_stops_feeding_the_model():
    cfg = mf.ModelConfig(vocab_size=20, dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    model = mf.build_model(cfg)
    counted, shapes = counting(steering(model, lambda call, last: 1e4 * (torch.arange(last.shape[-1]) == 9)))
    assert greedy(counted, model.init(0), [[1, 2], [3]], 10, eos_id=9) == [[], []]
    assert shapes == [(2, 2)]  # only the prompt went through the model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_padded_vocabulary_columns_are_never_produced(temperature):
    cfg = mf.ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    model = mf.build_model(cfg)
    assert cfg.padded_vocab_size > cfg.vocab_size
    loud = steering(model, lambda call, last: 1e4 * (torch.arange(last.shape[-1]) >= cfg.vocab_size))
    out = greedy(loud, model.init(0), [[1], [2, 3]], 12, temperature=temperature, pad_id=cfg.vocab_size + 5)
    assert all(len(r) == 12 and all(0 <= t < cfg.vocab_size for t in r) for r in out)


# --------------------------------------------------------------------------- cost


@given(setups(max_batch=2))
def test_cached_generation_feeds_each_position_once(setup):
    model, params, prompts, max_new = setup
    L = max(len(p) for p in prompts)
    cached, fed_cached = counting(model)
    uncached, fed_uncached = counting(model)
    greedy(cached, params, prompts, max_new, use_cache=True)
    greedy(uncached, params, prompts, max_new, use_cache=False)
    assert sum(t for _, t in fed_cached) == L + max_new - 1  # linear
    assert [t for _, t in fed_cached] == [L] + [1] * (max_new - 1)
    assert sum(t for _, t in fed_uncached) == sum(L + i for i in range(max_new))  # quadratic
    assert all(b == len(prompts) for b, _ in fed_cached + fed_uncached)


# --------------------------------------------------------------------------- purity, text, errors


@pytest.mark.parametrize("use_cache", [True, False])
def test_inputs_are_not_mutated(use_cache):
    model, params = sampling_model()
    prompts = [[1, 2, 3], [4], [5, 6]]
    before = copy.deepcopy((params, prompts))
    generate(model, params, prompts, max_new_tokens=6, eos_id=2, pad_id=0, temperature=1.0, top_k=10,
             top_p=0.9, use_cache=use_cache)
    assert prompts == before[1]
    assert all(torch.equal(params[k], before[0][k]) for k in params)


def test_generate_text_prepends_bos_and_decodes():
    tok = mf.ByteTokenizer()
    cfg = mf.ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=24)
    model = mf.build_model(cfg)
    params = model.init(0)
    counted, shapes = counting(model)
    texts = generate_text(counted, params, tok, ["hi", "hello"], max_new_tokens=6, temperature=1.0, seed=3)
    ids = generate(model, params, [[tok.bos_id, *b"hi"], [tok.bos_id, *b"hello"]], max_new_tokens=6,
                   eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=1.0, seed=3)
    assert texts == [tok.decode(r) for r in ids] and all(isinstance(t, str) for t in texts)
    assert shapes[0] == (2, 6)  # bos + "hello"


def test_max_new_tokens_zero_and_the_max_seq_len_boundary():
    cfg = mf.ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, max_seq_len=8)
    model = mf.build_model(cfg)
    params = model.init(0)
    assert greedy(model, params, [[1], [2, 3]], 0) == [[], []]
    assert len(greedy(model, params, [[1] * 3], 5)[0]) == 5  # 3 + 5 == max_seq_len: fits
    with pytest.raises(ValueError, match="max_seq_len=8"):
        greedy(model, params, [[1] * 3], 6)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "empty"),
    ([[1], []], {}, "prompt 1 is empty"),
    ("hello", {}, "list of token-id lists"),
    ([[1, 99]], {}, "outside"),
    ([[1]], dict(top_p=0.0), "top_p"),
    ([[1]], dict(top_p=1.5), "top_p"),
    ([[1]], dict(top_k=0), "top_k"),
    ([[1]], dict(temperature=-0.1), "temperature"),
    ([[1]], dict(temperature=float("nan")), "temperature"),
    ([[1]], dict(max_new_tokens=-1), "max_new_tokens"),
    ([[1]], dict(eos_id=50), "eos_id"),
    ([[1]], dict(pad_id=-1), "pad_id"),
])
def test_bad_arguments_raise_clear_errors(prompts, kwargs, message):
    model = mf.build_model(mf.ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, max_seq_len=8))
    kw = {"max_new_tokens": 2, "eos_id": None, "pad_id": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, model.init(0), prompts, **kw)


def test_generate_text_rejects_a_bare_string():
    tok = mf.ByteTokenizer()
    model = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=8, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(ValueError, match=r"\['hi'\]"):
        generate_text(model, model.init(0), tok, "hi", max_new_tokens=2)


@pytest.mark.parametrize("seed", range(4))
def test_several_end_ids_stop_a_row_at_the_first_of_any(seed):
    """Chat models end a turn with one of several ids: eos_id may be a tuple of them."""
    model, params = sampling_model()
    prompts = [[1, 2, 3], [4], [5, 6]]
    free = generate(model, params, prompts, max_new_tokens=12, eos_id=None, pad_id=0, temperature=1.5, seed=seed)
    stops = tuple({t for row in free for t in row[2:4]})  # ids that occur in the free-running rows
    got = generate(model, params, prompts, max_new_tokens=12, eos_id=stops, pad_id=0, temperature=1.5, seed=seed)
    for row, out in zip(free, got):
        first = next((i for i, t in enumerate(row) if t in stops), len(row))
        assert out == row[:first]


# --------------------------------------------------------------------------- published architectures' options


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.mark.parametrize("kwargs", [
    # Qwen3-like: query/key norms, biases, a head size that is not dim / n_heads, no vocabulary padding
    dict(dim=20, n_heads=3, n_kv_heads=1, head_size=8, qk_norm=True, qkv_bias=True, out_bias=True,
         vocab_multiple=1, tie_embeddings=False),
    # Llama 3.1-like: grouped-query attention, rotary scaling, explicit MLP size
    dict(dim=24, n_heads=4, n_kv_heads=2, head_size=8, intermediate_size=40, qk_norm=True, qkv_bias=True,
         rope_scaling=LLAMA3, tie_embeddings=False, vocab_multiple=1),
])
def test_cached_and_uncached_greedy_agree_with_the_new_options(kwargs):
    cfg = mf.ModelConfig(vocab_size=53, n_layers=2, max_seq_len=32, **kwargs)
    model = mf.build_model(cfg)
    params = sharpen(model.init(0, dtype=EXACT))
    g = gen(1)
    for k, v in params.items():  # init makes biases 0 and norms 1: draw them so they matter
        if k.endswith(".bias"):
            params[k] = 0.1 * torch.randn(v.shape, generator=g, dtype=EXACT)
        elif k.endswith("norm.weight"):
            # q/k norms fix the size of queries and keys; larger weights keep attention from being uniform
            scale = 3.0 if k.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
            params[k] = scale * (1 + 0.5 * torch.randn(v.shape, generator=g, dtype=EXACT))
    prompts = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8]]
    cached = greedy(model, params, prompts, 20, use_cache=True)
    assert cached == greedy(model, params, prompts, 20, use_cache=False)
    assert cached == [greedy(model, params, [p], 20)[0] for p in prompts]  # left padding changes nothing
    assert len({t for row in cached for t in row}) > 3  # not a degenerate echo of one token
    # An independent reference: the argmax of a full model.apply, one token at a time.
    seq = list(prompts[0])
    for _ in range(20):
        seq.append(int(model.apply(params, torch.tensor([seq]))[0, -1, :cfg.vocab_size].argmax()))
    assert cached[0] == seq[len(prompts[0]):]
