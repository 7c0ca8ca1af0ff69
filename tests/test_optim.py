import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import optim, schedules
from minillm_func import tree as T
from strategies import adamw_hyper, gen, param_trees, seeds

STEPS = 30


def ours(h, impl="reference", **kw):
    return optim.chain(
        optim.clip_by_global_norm(h["max_norm"]),
        optim.adamw(schedules.cosine_annealing(h["lr"], T_max=h["T_max"], eta_min=h["eta_min"]),
                    b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["wd"], impl=impl, **kw))


def grad_stream(params, seed, steps=STEPS):
    """Random gradients, some large enough to be clipped, some tiny."""
    g = gen(seed)
    for _ in range(steps):
        mag = float(torch.tensor([1e-3, 1.0, 30.0])[torch.randint(0, 3, (), generator=g)])
        yield T.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype) * mag, params)


def torch_run(params, h, seed, dtype):
    """The imperative original: clip_grad_norm_ -> AdamW(foreach=False).step() -> CosineAnnealingLR.step()."""
    ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in T.leaves(params)]
    opt = torch.optim.AdamW(ps, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], weight_decay=h["wd"],
                            foreach=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=h["T_max"], eta_min=h["eta_min"])
    history = []
    for grads in grad_stream(params, seed):
        for p, g in zip(ps, T.leaves(grads)):
            p.grad = g.clone().to(dtype)
        norm = torch.nn.utils.clip_grad_norm_(ps, h["max_norm"])
        opt.step()
        sched.step()
        history.append(([p.detach().clone() for p in ps], norm))
    return history


def check_against_torch(params, h, seed, impl, dtype, rtol, atol, via_update=False):
    params = T.cast(params, dtype)
    opt = ours(h, impl)
    state = opt.init(params)
    expected = torch_run(params, h, seed, dtype)
    for grads, (ref_params, ref_norm) in zip(grad_stream(params, seed), expected):
        if via_update:
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        else:
            params, state = optim.step(opt, grads, state, params)
        for got, want in zip(T.leaves(params), ref_params):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        torch.testing.assert_close(state[0].norm, ref_norm.to(state[0].norm.dtype), rtol=rtol, atol=atol)


@given(param_trees(), adamw_hyper(), seeds, st.booleans())
def test_clip_adamw_cosine_equals_torch_in_float64(params, h, seed, via_update):
    check_against_torch(params, h, seed, "reference", torch.float64, 1e-10, 1e-12, via_update)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@given(params=param_trees(dtype=torch.float32), h=adamw_hyper(), seed=seeds)
def test_fast_paths_equal_torch_to_float32_tolerance(impl, params, h, seed):
    check_against_torch(params, h, seed, impl, torch.float32, 1e-4, 1e-5)


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
@given(params=param_trees(dtype=torch.float32), seed=seeds)
def test_apply_never_modifies_the_callers_tensors(impl, params, seed):
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, impl=impl))
    state = opt.init(params)
    grads = next(grad_stream(params, seed))
    params, state = optim.step(opt, grads, state, params)  # non-zero moments
    snapshot = T.tree_map(torch.clone, (params, state, grads))
    new_params, new_state = optim.step(opt, grads, state, params)
    for a, b in zip(T.leaves((params, state, grads)), T.leaves(snapshot)):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(T.leaves(new_params), T.leaves(params)))


@given(param_trees(dtype=torch.float32), seeds)
def test_donated_fused_update_equals_the_pure_one(params, seed):
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, impl="fused"))
    pure_p, pure_s = params, opt.init(params)
    don_p, don_s = T.tree_map(torch.clone, params), opt.init(params)
    for grads in grad_stream(params, seed, steps=5):
        pure_p, pure_s = optim.step(opt, grads, pure_s, pure_p)
        don_p, don_s = optim.step(opt, grads, don_s, don_p, donate=True)
    for a, b in zip(T.leaves((pure_p, pure_s)), T.leaves((don_p, don_s))):
        assert torch.equal(a, b)


@given(param_trees(), seeds, st.data())
def test_mask_leaves_masked_leaves_undecayed(params, seed, data):
    flags = T.tree_map(lambda _: data.draw(st.booleans()), params)
    lr, wd = 0.1, 0.5
    opt = optim.adamw(lr, weight_decay=wd, mask=flags, impl="reference")
    zeros = T.zeros_like(params)  # zero gradients: only the decay moves a parameter
    new, _ = optim.step(opt, zeros, opt.init(params), params)
    for p, n, f in zip(T.leaves(params), T.leaves(new), T.leaves(flags)):
        assert torch.equal(n, p * (1 - lr * wd) if f else p)
    with_fn = optim.adamw(lr, weight_decay=wd, mask=lambda p: flags, impl="fused")
    new_fn, _ = optim.step(with_fn, zeros, with_fn.init(params), params)
    for a, b in zip(T.leaves(new), T.leaves(new_fn)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_decay_mask_excludes_vectors():
    params = {"emb": torch.zeros(3, 2), "norm": torch.zeros(2)}
    assert optim.decay_mask(params) == {"emb": True, "norm": False}
    with pytest.raises(ValueError, match="one bool per parameter"):
        optim.adamw(mask={"emb": True}).init(params) and optim.step(
            optim.adamw(mask={"emb": True}), params, optim.adamw().init(params), params)


@given(param_trees(), adamw_hyper(), seeds)
def test_chain_of_one_equals_the_transform(params, h, seed):
    single = optim.adamw(h["lr"], b1=h["b1"], weight_decay=h["wd"], impl="reference")
    chained = optim.chain(single)
    s1, s2 = single.init(params), chained.init(params)
    p1 = p2 = params
    for grads in grad_stream(params, seed, steps=5):
        u1, s1 = single.update(grads, s1, p1)
        u2, s2 = chained.update(grads, s2, p2)
        p1, p2 = optim.apply_updates(p1, u1), optim.apply_updates(p2, u2)
    assert all(torch.equal(a, b) for a, b in zip(T.leaves((p1, s1)), T.leaves((p2, s2[0]))))


@given(param_trees(), seeds)
def test_state_structure_dtypes_and_shapes_are_stable(params, seed):
    opt = ours(dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.01, max_norm=1.0, T_max=5, eta_min=0.0), "auto")
    state = opt.init(params)
    spec = T.tree_map(lambda x: (x.shape, x.dtype), state)
    for grads in grad_stream(params, seed, steps=4):
        params, state = optim.step(opt, grads, state, params)
        assert T.tree_map(lambda x: (x.shape, x.dtype), state) == spec
    assert state[1].count.dtype == torch.int64 and state[1].count.item() == 4


@given(st.integers(2, 4), param_trees(max_leaves=3), seeds)
def test_vmap_of_update_equals_a_loop(k, params, seed):
    """K independent optimizer states (K learning rates) updated at once."""
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(schedules.cosine_annealing(1e-2, T_max=3)))
    stacked_p = T.tree_map(lambda p: torch.stack([p * (i + 1) for i in range(k)]), params)
    grads = T.tree_map(lambda p: torch.randn((k, *p.shape), generator=gen(seed), dtype=p.dtype), params)
    members = [T.tree_map(lambda x: x[i], stacked_p) for i in range(k)]
    states = [opt.init(m) for m in members]
    stacked_s = T.tree_map(lambda *xs: torch.stack(xs), *states)
    for _ in range(2):
        upd, stacked_s = torch.func.vmap(opt.update)(grads, stacked_s, stacked_p)
        stacked_p = optim.apply_updates(stacked_p, upd)
        for i in range(k):
            gi = T.tree_map(lambda x: x[i], grads)
            u, states[i] = opt.update(gi, states[i], members[i])
            members[i] = optim.apply_updates(members[i], u)
    for i in range(k):
        for a, b in zip(T.leaves(members[i]), T.leaves(T.tree_map(lambda x: x[i], stacked_p))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@given(param_trees(), seeds, st.sampled_from(["reference", "fused"]))
def test_inject_hyperparams_updates_like_the_plain_optimizer(params, seed, impl):
    """Changing the injected lr between steps == a schedule with the same values."""
    lrs = [1e-2, 3e-3, 5e-2, 1e-3]
    sched = lambda count: torch.tensor(lrs, dtype=torch.float64)[count]  # noqa: E731
    plain = optim.adamw(sched, weight_decay=0.1, impl=impl)
    injected = optim.inject_hyperparams(optim.adamw)(learning_rate=lrs[0], weight_decay=0.1, impl=impl)
    ps, pi = params, params
    ss, si = plain.init(params), injected.init(params)
    for i, grads in enumerate(grad_stream(params, seed, steps=len(lrs))):
        si = si._replace(hyperparams={**si.hyperparams, "learning_rate": torch.tensor(lrs[i], dtype=torch.float64)})
        ps, ss = optim.step(plain, grads, ss, ps)
        pi, si = optim.step(injected, grads, si, pi)
        for a, b in zip(T.leaves(ps), T.leaves(pi)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert si.count.item() == len(lrs)


@given(param_trees(), seeds, st.data())
def test_masked_transform_passes_other_updates_through(params, seed, data):
    flags = T.tree_map(lambda _: data.draw(st.booleans()), params)
    inner = optim.adamw(1e-2, impl="reference")
    opt = optim.masked(inner, flags)
    grads = next(grad_stream(params, seed))
    updates, _ = opt.update(grads, opt.init(params), params)
    for u, g, p, f in zip(T.leaves(updates), T.leaves(grads), T.leaves(params), T.leaves(flags)):
        if f:
            (inner_u,), _ = inner.update([g], inner.init([p]), [p])
            assert torch.equal(u, inner_u)
        else:
            assert torch.equal(u, g)


def test_bad_hyperparameters_raise_clear_errors():
    with pytest.raises(ValueError, match="b1"):
        optim.adamw(b1=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        optim.adamw(-1.0)
    with pytest.raises(ValueError, match="impl"):
        optim.adamw(impl="apex")
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_by_global_norm(0.0)
    with pytest.raises(ValueError, match="at least one"):
        optim.chain()


def test_top_level_contract_example():
    params = {"w": torch.randn(3, 3)}
    grads = {"w": torch.randn(3, 3)}
    opt = mf.optim.chain(mf.optim.clip_by_global_norm(1.0),
                         mf.optim.adamw(learning_rate=1e-4, weight_decay=0.01))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    new = mf.optim.apply_updates(params, updates)
    assert new["w"].shape == (3, 3) and not torch.equal(new["w"], params["w"])
