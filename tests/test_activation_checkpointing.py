"""Activation checkpointing per block and the hidden-state entry point: same values, same gradients."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func.chunked import chunked_cross_entropy, chunked_sequence_logps
from minillm_func.model import output_weight
from minillm_func.step import value_and_grad
from strategies import gen, model_configs, seeds

IGN = mf.IGNORE_INDEX
EXACT = dict(rtol=1e-10, atol=1e-12)


@st.composite
def setups(draw, *, max_layers=3):
    """``(model, float64 params, input_ids, attention_mask or None, labels)`` for a tiny random config."""
    cfg = draw(model_configs(max_layers=max_layers))
    model = mf.build_model(cfg)
    seed = draw(seeds)
    # Weights scaled up from the 0.02 init so attention is far from uniform and every
    # block's contribution shows in the gradients.
    params = {k: v if k.endswith("norm.weight") else v * 10
              for k, v in model.init(seed, dtype=torch.float64).items()}
    g = gen(seed)
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, cfg.max_seq_len))
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = None
    if draw(st.booleans()):
        mask = (torch.rand(B, T, generator=g) < 0.7).long()
        mask[:, 0] = 1
    labels = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = labels.masked_fill(torch.rand(B, T, generator=g) < 0.3, IGN)
    labels[0, 0] = 0  # at least one counted target, so every weight gets a gradient
    return model, params, ids, mask, labels


def autograd_grads(loss_fn, params):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, **EXACT)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], **EXACT, msg=lambda m: f"{k}: {m}")


@given(setups())
def test_checkpointed_loss_and_gradients_equal_the_plain_ones(setup):
    model, params, ids, mask, labels = setup

    def loss(checkpoint):
        return lambda p: mf.pretrain_loss(model.apply(p, ids, mask, checkpoint=checkpoint), labels)

    plain = autograd_grads(loss(False), params)
    assert_same(autograd_grads(loss(True), params), plain)
    assert any(g.abs().sum() > 0 for k, g in plain[1].items() if k.startswith("layers."))


@given(setups(), st.booleans())
def test_apply_hidden_times_the_output_weight_is_apply(setup, checkpoint):
    model, params, ids, mask, _ = setup
    hidden = model.apply_hidden(params, ids, mask, checkpoint=checkpoint)
    cfg = model.config
    assert hidden.shape == (*ids.shape, cfg.dim)
    weight = output_weight(params)
    assert weight.shape == (cfg.padded_vocab_size, cfg.dim)
    assert weight is params["tok_emb.weight" if cfg.tie_embeddings else "lm_head.weight"]
    torch.testing.assert_close(hidden @ weight.T, model.apply(params, ids, mask), **EXACT)


@given(setups(), st.integers(1, 20))
def test_chunked_loss_on_checkpointed_hidden_states_has_the_plain_gradients(setup, chunk):
    model, params, ids, mask, labels = setup
    plain = autograd_grads(lambda p: mf.pretrain_loss(model.apply(p, ids, mask), labels), params)
    ours = autograd_grads(lambda p: chunked_cross_entropy(
        model.apply_hidden(p, ids, mask, checkpoint=True), output_weight(p), labels, chunk_size=chunk), params)
    assert_same(ours, plain)


@given(setups(), st.integers(1, 20))
def test_chunked_sequence_logps_on_hidden_states_under_torch_func(setup, chunk):
    model, params, ids, mask, labels = setup

    def ours(p):
        return chunked_sequence_logps(model.apply_hidden(p, ids, mask), output_weight(p), labels,
                                      chunk_size=chunk)[0].sum()

    def ref(p):
        return mf.sequence_logps(model.apply(p, ids, mask), labels)[0].sum()

    g_ours, v_ours = torch.func.grad_and_value(ours)(params)
    g_ref, v_ref = torch.func.grad_and_value(ref)(params)
    assert_same((v_ours, g_ours), (v_ref, g_ref))


@given(setups(), st.sampled_from(["autograd", "auto"]))
def test_checkpointing_through_value_and_grad_matches_the_func_path(setup, path):
    model, params, ids, mask, labels = setup

    def loss_fn(checkpoint):
        def fn(p, batch):
            return mf.pretrain_loss(model.apply(p, batch["ids"], mask, checkpoint=checkpoint),
                                    batch["labels"]), {}
        return fn

    batch = {"ids": ids, "labels": labels}
    (loss_a, _), grads_a = value_and_grad(loss_fn(True), path)(params, batch)
    (loss_b, _), grads_b = value_and_grad(loss_fn(False), "func")(params, batch)
    assert_same((loss_a, grads_a), (loss_b, grads_b))


@given(setups(max_layers=3))
def test_checkpointing_recomputes_each_block_in_the_backward(setup):
    """Each block runs twice per step with checkpointing (forward + recomputation), once without."""
    model, params, ids, mask, labels = setup
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, layer in enumerate(model.module.layers)]
    try:
        for checkpoint, per_layer in ((False, 1), (True, 2)):
            calls.clear()
            autograd_grads(lambda p: mf.pretrain_loss(model.apply(p, ids, mask, checkpoint=checkpoint), labels),
                           params)
            assert sorted(calls) == sorted(list(range(model.config.n_layers)) * per_layer)
        calls.clear()
        with torch.no_grad():  # nothing to recompute without a backward pass
            model.apply(params, ids, mask, checkpoint=True)
        assert sorted(calls) == list(range(model.config.n_layers))
    finally:
        for h in hooks:
            h.remove()


@given(setups())
def test_checkpointing_keeps_fewer_activations_for_the_backward(setup):
    model, params, ids, mask, labels = setup
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def saved_elements(checkpoint):
        total = [0]

        def pack(t):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mf.pretrain_loss(model.apply(leaves, ids, mask, checkpoint=checkpoint), labels)
        return total[0]

    assert saved_elements(True) < saved_elements(False)


def test_checkpoint_under_torch_func_raises_a_clear_error():
    cfg = mf.ModelConfig(vocab_size=20, dim=8, n_layers=2, n_heads=2, max_seq_len=8)
    model = mf.build_model(cfg)
    params = model.init(0)
    ids = torch.randint(0, 20, (2, 8), generator=gen(0))
    for apply in (model.apply, model.apply_hidden):
        with pytest.raises(RuntimeError, match='grad_path="autograd"'):
            torch.func.grad(lambda p: apply(p, ids, checkpoint=True).sum())(params)
        with pytest.raises(RuntimeError, match="torch.func transform"):
            torch.func.grad_and_value(lambda p: apply(p, ids, checkpoint=True).sum())(params)
    # the same losses without checkpointing, and with it under plain autograd, are fine
    torch.func.grad(lambda p: model.apply(p, ids).sum())(params)
    autograd_grads(lambda p: model.apply(p, ids, checkpoint=True).sum(), params)


def test_checkpoint_under_torch_compile_raises_the_same_clear_error():
    """By tree.under_transform's rule: the tracer cannot tell a compiled torch.func.grad from autograd."""
    cfg = mf.ModelConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, max_seq_len=8)
    model = mf.build_model(cfg)
    params = model.init(0)
    ids = torch.zeros(1, 3, dtype=torch.long)
    for apply in (model.apply, model.apply_hidden):
        with pytest.raises(RuntimeError, match="torch.compile"):
            torch.compile(lambda p: apply(p, ids, checkpoint=True).sum(), backend="eager")(params)


def test_model_keeps_its_positional_construction_and_new_field_defaults_to_none():
    model = mf.build_model(mf.ModelConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, max_seq_len=8))
    bare = mf.Model(init=model.init, apply=model.apply, module=model.module, config=model.config,
                    to_module=model.to_module, apply_with_cache=model.apply_with_cache)
    assert bare.apply_hidden is None
    assert mf.Model._fields[-1] == "apply_hidden"


def test_output_weight_needs_a_projection():
    with pytest.raises(KeyError, match="output_weight"):
        output_weight({"norm.weight": torch.ones(3)})
