import pytest
import torch
from hypothesis import given
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
