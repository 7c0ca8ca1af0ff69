import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import native, optim, schedules
from minillm_func import checkpoint as ckpt
from minillm_func import tree as T
from strategies import adamw_hyper, gen, param_trees, seeds

STEPS = 30
FAST = ["foreach", "fused", "native"]  # the fast ``apply`` kernels; "reference" is update + apply_updates

needs_native = pytest.mark.skipif(not native.available(), reason=f"no native kernel: {native.unavailable_reason()}")
needs_fused = pytest.mark.skipif(not optim.fused_adamw_available(), reason="torch has no _fused_adamw_")


def impl_marks(impl):
    return pytest.param(impl, marks={"native": [needs_native], "fused": [needs_fused]}.get(impl, []))


FAST_IMPLS = [impl_marks(i) for i in FAST]


def ours(h, impl="reference", mask=None):
    return optim.chain(
        optim.clip_by_global_norm(h["max_norm"]),
        optim.adamw(schedules.cosine_annealing(h["lr"], T_max=h["T_max"], eta_min=h["eta_min"]),
                    b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["wd"], mask=mask, impl=impl))


def grad_stream(params, seed, steps=STEPS):
    """Random gradients, some large enough to be clipped, some tiny."""
    g = gen(seed)
    for _ in range(steps):
        mag = float(torch.tensor([1e-3, 1.0, 30.0])[torch.randint(0, 3, (), generator=g)])
        yield T.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype) * mag, params)


def draw_mask(data, params):
    """None (decay everything, torch's default) or one drawn bool per leaf."""
    if data.draw(st.booleans(), label="use a mask"):
        return T.tree_map(lambda _: data.draw(st.booleans(), label="decay this leaf"), params)
    return None


def torch_run(params, h, seed, dtype, mask=None):
    """The imperative original: clip_grad_norm_ -> AdamW(foreach=False).step() -> CosineAnnealingLR.step().
    Leaves the mask excludes go to a second param group with weight_decay=0."""
    ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in T.leaves(params)]
    flags = T.leaves(mask) if mask is not None else [True] * len(ps)
    groups = [{"params": [p for p, f in zip(ps, flags) if f], "weight_decay": h["wd"]},
              {"params": [p for p, f in zip(ps, flags) if not f], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=h["lr"], betas=(h["b1"], h["b2"]),
                            eps=h["eps"], foreach=False, fused=False)
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


def run(opt, params, grads_list, *, via="step", donate=False):
    """Params and state after each update, through ``step`` (the fast apply) or ``update`` + ``apply_updates``."""
    state = opt.init(params)
    if donate:
        params = T.tree_map(torch.clone, params)
    out = []
    for grads in grads_list:
        if via == "update":
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        else:
            params, state = optim.step(opt, grads, state, params, donate=donate)
        # donated buffers are overwritten by the next update: keep a copy
        out.append(T.tree_map(torch.clone, (params, state)) if donate else (params, state))
    return out


# --------------------------------------------------------------------------- the reference path against torch


@given(param_trees(), adamw_hyper(), seeds, st.sampled_from(["update", "step"]), st.data())
def test_reference_path_equals_torch_adamw_in_float64_for_every_mask(params, h, seed, via, data):
    """clip -> AdamW -> cosine, 30 updates: params equal torch.optim.AdamW(foreach=False, fused=False)
    to 1e-10 relative and the recorded pre-clip norm equals clip_grad_norm_'s, with or without a mask."""
    mask = draw_mask(data, params)
    expected = torch_run(params, h, seed, torch.float64, mask)
    got = run(ours(h, "reference", mask), params, list(grad_stream(params, seed)), via=via)
    for (new, state), (ref_params, ref_norm) in zip(got, expected, strict=True):
        for a, b in zip(T.leaves(new), ref_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state[0].norm, ref_norm, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@given(params=param_trees(dtype=torch.float32), h=adamw_hyper(), seed=seeds)
def test_fast_paths_equal_torch_to_float32_tolerance(impl, params, h, seed):
    expected = torch_run(params, h, seed, torch.float32)
    got = run(ours(h, impl), params, list(grad_stream(params, seed)))
    for (new, _), (ref_params, _) in zip(got, expected, strict=True):
        for a, b in zip(T.leaves(new), ref_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- every fast path against the reference


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("impl", FAST_IMPLS)
@given(params=param_trees(), seed=seeds, data=st.data())
def test_fast_paths_equal_the_reference_path_in_float64_for_every_mask(impl, donate, params, seed, data):
    """foreach, fused (and native, which falls back to fused on float64): 1e-10 relative after 30 updates.
    A large lr * wd makes any decay of a masked leaf visible."""
    mask = draw_mask(data, params)
    h = dict(lr=3e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.5, max_norm=1.0, T_max=7, eta_min=0.0)
    grads = list(grad_stream(params, seed))
    want = run(ours(h, "reference", mask), params, grads, via="update")
    got = run(ours(h, impl, mask), params, grads, donate=donate)
    for (a, sa), (b, sb) in zip(got, want, strict=True):
        for x, y in zip(T.leaves((a, sa)), T.leaves((b, sb)), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("impl", FAST_IMPLS)
@given(params=param_trees(dtype=torch.float32), seed=seeds, data=st.data())
def test_fast_paths_equal_the_reference_path_in_float32_for_every_mask(impl, donate, params, seed, data):
    """The native kernel's own numbers (float32 only), and the others' in float32."""
    mask = draw_mask(data, params)
    h = dict(lr=3e-2, b1=data.draw(st.sampled_from([0.0, 0.3, 0.9])), b2=0.999, eps=1e-8, wd=0.5,
             max_norm=1.0, T_max=7, eta_min=0.0)
    grads = list(grad_stream(params, seed, steps=10))
    want = run(ours(h, "reference", mask), params, grads, via="update")
    got = run(ours(h, impl, mask), params, grads, donate=donate)
    for (a, sa), (b, sb) in zip(got, want, strict=True):
        for x, y in zip(T.leaves((a, sa)), T.leaves((b, sb)), strict=True):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@given(params=param_trees(), data=st.data())
def test_only_the_leaves_the_mask_selects_are_decayed_on_every_path(impl, donate, dtype, params, data):
    """Zero gradients: only the decay moves a parameter. Selected leaves become p(1 - lr wd); the
    others stay bit-identical, whatever the kernel (the bug 'foreach decays masked leaves' fails here)."""
    params = T.cast(params, dtype)
    flags = T.tree_map(lambda _: data.draw(st.booleans()), params)
    lr, wd = 0.1, 0.5
    mask = data.draw(st.sampled_from([flags, lambda p: flags]), label="mask as a tree or a function")
    opt = optim.adamw(lr, weight_decay=wd, mask=mask, impl=impl)
    zeros = T.zeros_like(params)
    given_params = T.tree_map(torch.clone, params) if donate else params
    new, _ = optim.step(opt, zeros, opt.init(params), given_params, donate=donate)
    for p, n, f in zip(T.leaves(params), T.leaves(new), T.leaves(flags), strict=True):
        if f:
            torch.testing.assert_close(n, p * (1 - lr * wd), rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
        else:
            assert torch.equal(n, p)


@pytest.mark.parametrize("impl", ["auto", *FAST_IMPLS])
@given(params=param_trees(dtype=torch.float32), seed=seeds)
def test_donated_update_equals_the_pure_one(impl, params, seed):
    """Bit for bit with one kernel; "auto" donates to torch's fused kernel and runs the native one
    when pure, whose vector loop matches it bit for bit and scalar tail to rounding."""
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, impl=impl))
    grads = list(grad_stream(params, seed, steps=5))
    pure = run(opt, params, grads)[-1]
    donated = run(opt, params, grads, donate=True)[-1]
    for a, b in zip(T.leaves(pure), T.leaves(donated), strict=True):
        if impl == "auto":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- purity and buffer reuse


def big_params():
    """Leaves above and below the size the buffer pool recycles (256 KiB), one unaligned."""
    g = gen(0)
    backing = torch.randn(70_001, generator=g)
    return {"big": torch.randn(300, 300, generator=g), "mat": torch.randn(33, 65, generator=g),
            "vec": torch.randn(7, generator=g), "offset": backing[1:]}


PURE_IMPLS = ["reference", "auto", *FAST_IMPLS]


@pytest.mark.parametrize("reuse", [True, False], ids=["recycled", "fresh"])
@pytest.mark.parametrize("impl", PURE_IMPLS)
def test_a_pure_update_never_writes_any_tensor_the_caller_holds(impl, reuse):
    """Every generation of params and state is kept, cloned when made, and compared at the end."""
    params = big_params()
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, impl=impl, reuse_buffers=reuse))
    state = opt.init(params)
    kept = []
    for grads in grad_stream(params, 1, steps=6):
        kept.append(((params, state, grads), T.tree_map(torch.clone, (params, state, grads))))
        params, state = optim.step(opt, grads, state, params)
    for held, snapshot in kept:
        for a, b in zip(T.leaves(held), T.leaves(snapshot), strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(params["big"], kept[-1][0][0]["big"])


HOLDERS = {
    "view": lambda t: t[3:5],
    "storage": lambda t: t.untyped_storage(),
    "numpy": lambda t: t.numpy(),
    "detached": lambda t: t.detach(),
    "graph": lambda t: (t.detach().requires_grad_() * 2).sum(),
}


@pytest.mark.parametrize("holder", list(HOLDERS))
@pytest.mark.parametrize("impl", [impl_marks("native"), impl_marks("fused")])
def test_recycled_memory_is_never_memory_something_still_refers_to(impl, holder):
    """Only a view (or a storage, a numpy array, an autograd graph) of an old update's output is kept:
    that memory must keep its values while the loop runs on, rebinding params and state."""
    params = big_params()
    opt = optim.adamw(1e-2, impl=impl)
    state = opt.init(params)
    grads = list(grad_stream(params, 2, steps=6))
    params, state = optim.step(opt, grads[0], state, params)
    held = [HOLDERS[holder](x) for x in (params["big"], state.mu["big"], state.nu["big"])]
    expected = [x.detach().clone() for x in (params["big"], state.mu["big"], state.nu["big"])]
    pointers = [x.data_ptr() for x in (params["big"], state.mu["big"], state.nu["big"])]
    for g in grads[1:]:
        params, state = optim.step(opt, g, state, params)
        assert not {x.data_ptr() for x in (params["big"], state.mu["big"], state.nu["big"])} & set(pointers)
    if holder in ("view", "detached", "numpy"):
        for h, e in zip(held, expected):
            now = torch.as_tensor(h) if holder == "numpy" else h
            assert torch.equal(now, e[3:5] if holder == "view" else e)


@pytest.mark.parametrize("impl", [impl_marks("native"), impl_marks("fused")])
def test_a_rebinding_loop_writes_into_the_buffers_of_the_update_before_last(impl):
    """The speed mechanism is on: no fresh allocation for large leaves in the steady state."""
    params = big_params()
    opt = optim.adamw(1e-2, impl=impl)
    state = opt.init(params)
    pointers = []
    for grads in grad_stream(params, 3, steps=6):
        params, state = optim.step(opt, grads, state, params)
        pointers.append({params["big"].data_ptr(), state.mu["big"].data_ptr(), state.nu["big"].data_ptr()})
    for k in range(3, 6):
        assert pointers[k] == pointers[k - 2]
        assert not pointers[k] & pointers[k - 1]


@pytest.mark.parametrize("impl", [impl_marks("native"), impl_marks("fused")])
def test_a_caller_that_drops_each_result_gets_the_same_buffers_back(impl):
    """As a step that selects between old and new state, or a benchmark, does: one set of buffers serves."""
    params = big_params()
    opt = optim.adamw(1e-2, impl=impl)
    state = opt.init(params)
    pointers = []
    for grads in grad_stream(params, 3, steps=4):
        new_params, new_state = optim.step(opt, grads, state, params)
        pointers.append(frozenset(x["big"].data_ptr() for x in (new_params, new_state.mu, new_state.nu)))
        del new_params, new_state
    assert len(set(pointers)) == 1


# --------------------------------------------------------------------------- the native kernel


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b1", [0.9, 0.0])
def test_native_kernel_equals_torch_fused_on_large_unaligned_tensors(threads, b1):
    """The vector loop (streaming stores), its scalar head and tail, the split over threads, leaves
    that start mid-cache-line; torch's fused kernel, which it mirrors operation for operation."""
    g = gen(4)
    backing = torch.randn(100_003, generator=g)
    shapes = [(257, 129), (1000,), (3,), (), (0,), (65_537,)]
    params = {f"w{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    params["unaligned"] = backing[3:]
    flags = {k: i % 2 == 0 for i, k in enumerate(params)}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    groups = [{"params": [ref[k] for k in params if flags[k]], "weight_decay": 0.1},
              {"params": [ref[k] for k in params if not flags[k]], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(b1, 0.999), fused=True)
    opt = optim.adamw(1e-2, b1=b1, weight_decay=0.1, mask=flags, impl="native")
    state, p = opt.init(params), params
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(4):
            grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
            for k in params:
                ref[k].grad = grads[k].clone()
            torch_opt.step()
            p, state = optim.step(opt, grads, state, p)
    finally:
        torch.set_num_threads(before)
    for k in params:
        torch.testing.assert_close(p[k], ref[k].detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state.nu[k], torch_opt.state[ref[k]]["exp_avg_sq"], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("impl", ["auto", *FAST_IMPLS])
def test_fast_paths_handle_what_their_kernels_do_not(impl, donate):
    """float64, bfloat16, strided leaves and gradients (torch's fused kernel reads a strided gradient as
    if it were contiguous), mixed dtypes: each path runs a kernel that handles them, same numbers."""
    g = gen(6)
    cases = [{"w": torch.randn(4, 5, generator=g, dtype=torch.float64)},
             {"w": torch.randn(5, 4, generator=g).t()},
             {"w": torch.randn(4, 5, generator=g).bfloat16()},
             {"w": torch.randn(4, 5, generator=g), "v": torch.randn(3, generator=g, dtype=torch.float64)}]
    ref = optim.adamw(1e-2, weight_decay=0.1, impl="reference")
    for params in cases:
        opt = optim.adamw(1e-2, weight_decay=0.1, impl=impl)
        grads = T.tree_map(lambda p: torch.randn(p.shape[::-1], generator=g).to(p.dtype).transpose(0, -1)
                           if p.dim() == 2 else torch.randn(p.shape, generator=g).to(p.dtype), params)
        state = opt.init(params)
        upd, ref_state = ref.update(grads, ref.init(params), params)
        want = optim.apply_updates(params, upd)
        given_params = T.tree_map(torch.clone, params) if donate else params
        new, new_state = optim.step(opt, grads, state, given_params, donate=donate)
        tol = dict(rtol=2e-2, atol=1e-2) if params["w"].dtype == torch.bfloat16 else {}
        torch.testing.assert_close(new, want, **tol)
        torch.testing.assert_close(new_state.nu, ref_state.nu, **tol)


# --------------------------------------------------------------------------- the parts, alone, against closed forms


@given(param_trees(), seeds, st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.9, 0.999]),
       st.sampled_from([1e-8, 1e-3]))
def test_scale_by_adam_equals_its_closed_form(params, seed, b1, b2, eps):
    """m_t = sum_i (1-b1) b1^(t-i) g_i, v_t likewise with g_i^2; u = m_t/(1-b1^t) / (sqrt(v_t)/sqrt(1-b2^t) + eps)."""
    opt = optim.scale_by_adam(b1, b2, eps)
    state = opt.init(params)
    history = []
    for t, grads in enumerate(grad_stream(params, seed, steps=6), start=1):
        history.append(grads)
        u, state = opt.update(grads, state)
        assert state.count.item() == t and state.count.dtype == torch.int64
        for k, (ui, mi, vi) in enumerate(zip(T.leaves(u), T.leaves(state.mu), T.leaves(state.nu))):
            gs = [T.leaves(g)[k] for g in history]
            m = sum((1 - b1) * b1 ** (t - i) * g for i, g in enumerate(gs, start=1))
            v = sum((1 - b2) * b2 ** (t - i) * g * g for i, g in enumerate(gs, start=1))
            want = (m / (1 - b1**t)) / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)
            torch.testing.assert_close(mi, m, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(vi, v, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(ui, want, rtol=1e-12, atol=1e-14)


@given(param_trees(), seeds, st.sampled_from([0.0, 0.01, 0.5]), st.data())
def test_add_decayed_weights_equals_its_closed_form(params, seed, wd, data):
    mask = draw_mask(data, params)
    opt = optim.add_decayed_weights(wd, mask=mask)
    grads = next(grad_stream(params, seed))
    u, state = opt.update(grads, opt.init(params), params)
    assert state == optim.EmptyState()
    flags = T.leaves(mask) if mask is not None else [True] * len(T.leaves(params))
    for ui, g, p, f in zip(T.leaves(u), T.leaves(grads), T.leaves(params), flags, strict=True):
        assert torch.equal(ui, g + wd * p if f else g)
    with pytest.raises(ValueError, match="needs the params"):
        opt.update(grads, opt.init(params))


@given(param_trees(), seeds, st.booleans(), st.booleans())
def test_scale_by_learning_rate_equals_its_closed_form(params, seed, scheduled, flip):
    lrs = [3e-2, 1e-3, 0.5, 0.0, 2e-4]
    lr = (lambda count: torch.tensor(lrs, dtype=torch.float64)[count]) if scheduled else 3e-2
    opt = optim.scale_by_learning_rate(lr, flip_sign=flip)
    state = opt.init(params)
    for k, grads in enumerate(grad_stream(params, seed, steps=len(lrs))):
        u, state = opt.update(grads, state)
        factor = (lrs[k] if scheduled else 3e-2) * (-1 if flip else 1)
        for ui, g in zip(T.leaves(u), T.leaves(grads)):
            torch.testing.assert_close(ui, g * factor, rtol=1e-15, atol=0)
        assert state.count.item() == k + 1


@given(param_trees(), adamw_hyper(), seeds, st.data())
def test_adamw_update_is_the_chain_of_its_parts(params, h, seed, data):
    mask = draw_mask(data, params)
    lr = schedules.cosine_annealing(h["lr"], T_max=h["T_max"])
    whole = optim.adamw(lr, b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["wd"], mask=mask)
    parts = optim.chain(optim.scale_by_adam(h["b1"], h["b2"], h["eps"]),
                        optim.add_decayed_weights(h["wd"], mask), optim.scale_by_learning_rate(lr))
    sw, sp = whole.init(params), parts.init(params)
    for grads in grad_stream(params, seed, steps=5):
        uw, sw = whole.update(grads, sw, params)
        up, sp = parts.update(grads, sp, params)
        assert all(torch.equal(a, b) for a, b in zip(T.leaves(uw), T.leaves(up)))
        adam, _, sched = sp
        assert type(sw) is optim.AdamWState and sched.count.item() == adam.count.item() == sw.count.item()
        assert all(torch.equal(a, b) for a, b in zip(T.leaves((sw.mu, sw.nu)), T.leaves((adam.mu, adam.nu))))


# --------------------------------------------------------------------------- chain, masked, inject_hyperparams


def test_chain_checks_its_state_has_one_entry_per_transform():
    params = {"w": torch.ones(2)}
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    state = opt.init(params)
    for bad in (state[:1], (*state, state[0]), state[1]):
        with pytest.raises(ValueError, match=r"chain of 2 transforms .* opt.init\(params\)"):
            opt.update(params, bad, params)
        with pytest.raises(ValueError, match="chain of 2 transforms"):
            optim.step(opt, params, bad, params)
    with pytest.raises(TypeError, match="not a Transform"):
        optim.chain(optim.adamw(), "adamw")


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


def spy(calls):
    """A transform that adds its gradients (like SGD with lr -1) and records which path ran."""
    def init(params):
        return optim.EmptyState()

    def update(grads, state, params):
        calls.append("update")
        return grads, state

    def apply(grads, state, params, *, donate=False):
        calls.append(("apply", donate))
        return optim.apply_updates(params, grads), state
    return optim.Transform(init, update, apply)


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


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@given(params=param_trees(dtype=torch.float32), seed=seeds, data=st.data(), donate=st.booleans())
def test_masked_keeps_the_inner_fast_apply(impl, params, seed, data, donate):
    flags = T.tree_map(lambda _: data.draw(st.booleans()), params)
    calls = []
    optim.step(optim.masked(spy(calls), flags), params, optim.masked(spy(calls), flags).init(params), params,
               donate=donate)
    assert calls == [("apply", donate)]
    opt = optim.masked(optim.adamw(1e-2, weight_decay=0.5, impl=impl), flags)
    grads = list(grad_stream(params, seed, steps=4))
    fast, slow = run(opt, params, grads, donate=donate)[-1], run(opt, params, grads, via="update")[-1]
    for a, b in zip(T.leaves(fast), T.leaves(slow), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@given(params=param_trees(dtype=torch.float32), seed=seeds)
def test_inject_hyperparams_updates_like_the_plain_optimizer(impl, params, seed):
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
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert si.count.item() == len(lrs)


def test_inject_hyperparams_builds_the_inner_transform_once():
    built = []

    def factory(**kwargs):
        built.append(kwargs)
        return optim.adamw(**kwargs)

    opt = optim.inject_hyperparams(factory)(learning_rate=1e-2, b1=0.8, weight_decay=0.1)
    after_construction = len(built)
    params = big_params()
    state = opt.init(params)
    for grads in grad_stream(params, 5, steps=4):
        updates, _ = opt.update(grads, state, params)
        params, state = optim.step(opt, grads, state, params)
    assert len(built) == after_construction <= 2
    state = state._replace(hyperparams={**state.hyperparams, "b1": torch.tensor(0.0, dtype=torch.float64)})
    plain = optim.adamw(1e-2, b1=0.0, weight_decay=0.1, impl="reference")
    new, _ = optim.step(opt, grads, state, params)
    upd, _ = plain.update(grads, state.inner, params)
    torch.testing.assert_close(new, optim.apply_updates(params, upd), rtol=1e-6, atol=1e-7)


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
        stacked_p, stacked_s = torch.func.vmap(lambda g, s, p: optim.step(opt, g, s, p))(grads, stacked_s, stacked_p)
        for i in range(k):
            gi = T.tree_map(lambda x: x[i], grads)
            u, states[i] = opt.update(gi, states[i], members[i])
            members[i] = optim.apply_updates(members[i], u)
    for i in range(k):
        for a, b in zip(T.leaves(members[i]), T.leaves(T.tree_map(lambda x: x[i], stacked_p))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("injected", [False, True], ids=["plain", "injected"])
@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_the_update_torch_compile_traces_equals_the_eager_one(b1, injected):
    """Under torch.compile the bias corrections are exp(t log b), not b**t (see optim._power): equal
    to float64 rounding, also for b1 = 0 (log 0 = -inf) and for an injected (tensor) b1."""
    g = gen(7)
    params = {"w": torch.randn(5, 3, generator=g, dtype=torch.float64),
              "b": torch.randn(3, generator=g, dtype=torch.float64)}
    lr = schedules.cosine_annealing(1e-2, T_max=4)
    inner = (optim.inject_hyperparams(optim.adamw)(learning_rate=lr, b1=b1, weight_decay=0.1) if injected
             else optim.adamw(lr, b1=b1, weight_decay=0.1))
    opt = optim.chain(optim.clip_by_global_norm(1.0), inner)
    compiled = torch.compile(lambda g, s, p: optim.step(opt, g, s, p), backend="eager", fullgraph=True)
    ps, ss = params, opt.init(params)
    pe, se = params, opt.init(params)
    for grads in grad_stream(params, 8, steps=5):
        ps, ss = compiled(grads, ss, ps)
        pe, se = optim.step(opt, grads, se, pe)
        for a, b in zip(T.leaves((ps, ss)), T.leaves((pe, se)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- states


@given(param_trees(), seeds)
def test_state_structure_dtypes_and_shapes_are_stable(params, seed):
    opt = ours(dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.01, max_norm=1.0, T_max=5, eta_min=0.0), "auto")
    state = opt.init(params)
    spec = T.tree_map(lambda x: (x.shape, x.dtype), state)
    for grads in grad_stream(params, seed, steps=4):
        params, state = optim.step(opt, grads, state, params)
        assert T.tree_map(lambda x: (x.shape, x.dtype), state) == spec
    assert type(state[1]) is optim.AdamWState
    assert state[1].count.dtype == torch.int64 and state[1].count.item() == 4


@given(param_trees(dtype=torch.float32), seeds)
def test_states_round_trip_through_a_checkpoint(tmp_path_factory, params, seed):
    """AdamWState, the parts' states (EmptyState included) and the injected state save and load."""
    lr = schedules.cosine_annealing(1e-2, T_max=5)
    opts = [optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr)),
            optim.chain(optim.scale_by_adam(), optim.add_decayed_weights(0.1), optim.scale_by_learning_rate(lr)),
            optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2),
            optim.masked(optim.adamw(lr), optim.decay_mask)]
    states = []
    for opt in opts:
        s, p = opt.init(params), params
        for grads in grad_stream(params, seed, steps=2):
            p, s = optim.step(opt, grads, s, p)
        states.append(s)
    path = tmp_path_factory.mktemp("opt") / "ckpt"
    ckpt.save(path, states)
    for like in (states, None):
        loaded, _ = ckpt.load(path, like=like)
        assert [type(s) for s in loaded] == [type(s) for s in states]
        assert type(loaded[0][1]) is optim.AdamWState and type(loaded[1][1]) is optim.EmptyState
        for a, b in zip(T.leaves(loaded), T.leaves(states), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        new, _ = optim.step(opts[0], grads, loaded[0], params)  # a loaded state updates
        assert T.leaves(new)[0].shape == T.leaves(params)[0].shape


# --------------------------------------------------------------------------- errors, contract, docs


def test_decay_mask_excludes_vectors():
    params = {"emb": torch.zeros(3, 2), "norm": torch.zeros(2)}
    assert optim.decay_mask(params) == {"emb": True, "norm": False}
    with pytest.raises(ValueError, match="one bool per parameter"):
        optim.step(optim.adamw(mask={"emb": True}), params, optim.adamw().init(params), params)


@pytest.mark.parametrize("impl", ["auto", *FAST_IMPLS])
def test_mismatched_shapes_raise_before_any_kernel_runs(impl):
    params = {"a": torch.zeros(4), "b": torch.zeros(2, 3)}
    opt = optim.adamw(impl=impl)
    with pytest.raises(ValueError, match=r"leaf 1 has param shape \(2, 3\) but gradient \(3, 2\)"):
        optim.step(opt, {"a": torch.zeros(4), "b": torch.zeros(3, 2)}, opt.init(params), params)


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
    with pytest.raises(ValueError, match="weight_decay"):
        optim.add_decayed_weights(-0.1)
    with pytest.raises(TypeError, match=r"only learning_rate takes a schedule.*inject_hyperparams"):
        optim.adamw(weight_decay=lambda count: 0.1)
    with pytest.raises(ValueError, match="eps"):
        optim.scale_by_adam(eps=-1.0)


def test_top_level_contract_example():
    params = {"w": torch.randn(3, 3)}
    grads = {"w": torch.randn(3, 3)}
    opt = mf.optim.chain(mf.optim.clip_by_global_norm(1.0),
                         mf.optim.adamw(learning_rate=1e-4, weight_decay=0.01))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    new = mf.optim.apply_updates(params, updates)
    assert new["w"].shape == (3, 3) and not torch.equal(new["w"], params["w"])


def examples(doc: str) -> list[str]:
    """The indented blocks after ``Example::`` in a docstring, dedented."""
    blocks = []
    for match in re.finditer(r"Example::\n\n((?:[ \t]+\S.*\n|[ \t]*\n)+)", doc):
        lines = match.group(1).rstrip().splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        blocks.append("\n".join(line[indent:] for line in lines))
    return blocks


@pytest.mark.parametrize("name", ["__module__", *optim.__all__])
def test_docstring_examples_run(name):
    doc = optim.__doc__ if name == "__module__" else getattr(optim, name).__doc__
    blocks = examples(doc or "")
    if name in ("__module__", "chain", "step", "adamw", "scale_by_adam", "add_decayed_weights",
                "scale_by_learning_rate", "clip_by_global_norm", "masked", "inject_hyperparams"):
        assert blocks, f"{name} has no runnable example"
    for block in blocks:
        namespace = {"torch": torch, "np": np, "schedules": schedules, "optim": optim,
                     **{n: getattr(optim, n) for n in optim.__all__},
                     "params": {"w": torch.randn(3, 3), "b": torch.zeros(3)},
                     "grads": {"w": torch.randn(3, 3), "b": torch.randn(3)}}
        exec(compile(block, f"<{name} example>", "exec"), namespace)


def test_clipped_norm_reads_the_pre_clip_norm_through_every_wrapper():
    # the norm recorded is the float64 closed form sqrt(sum g^2), found inside chain / masked states;
    # an optimizer with no clipping reports NaN
    torch.manual_seed(0)
    params = {"a": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    grads = {k: torch.randn_like(v) * 10 for k, v in params.items()}
    ref = torch.cat([g.flatten() for g in grads.values()]).square().sum().sqrt()
    clipping = (optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3)),
                optim.masked(optim.chain(optim.clip_by_global_norm(1.0)), {"a": True, "b": True}))
    for opt in clipping:
        _, state = opt.update(grads, opt.init(params), params)
        torch.testing.assert_close(optim.clipped_norm(state), ref, rtol=1e-12, atol=0)
    plain = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3)
    _, state = plain.update(grads, plain.init(params), params)
    assert torch.isnan(optim.clipped_norm(state))


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_skipped_update_leaves_params_and_state_bit_identical(impl, donate, dtype):
    """``step(..., skip=True)`` with non-finite gradients gives back the old values exactly (through
    each kernel's own skip), and ``skip=False`` the same update as no ``skip`` at all."""
    g = gen(3)
    params = {"a": torch.randn(300, 7, generator=g, dtype=dtype), "b": torch.randn(11, generator=g, dtype=dtype)}
    grads = T.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=dtype), params)
    h = dict(lr=3e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.5, max_norm=1.0, T_max=7, eta_min=0.0)
    for opt in (ours(h, impl), optim.masked(ours(h, impl), {"a": True, "b": False}),
                optim.inject_hyperparams(optim.adamw)(learning_rate=3e-2, impl=impl)):
        state = opt.init(params)
        params1, state1 = optim.step(opt, grads, state, T.tree_map(torch.clone, params))  # one real update first
        before = T.tree_map(torch.clone, (params1, state1))
        bad = T.tree_map(lambda x: torch.full_like(x, float("nan")), grads)
        held = T.tree_map(torch.clone, (params1, state1)) if donate else (params1, state1)
        got = optim.step(opt, bad, held[1], held[0], donate=donate, skip=torch.tensor(True))
        for x, y in zip(T.leaves(got), T.leaves(before), strict=True):
            assert torch.equal(x, y)
        if not donate:  # pure: the caller's tensors are untouched
            assert all(torch.equal(x, y) for x, y in zip(T.leaves((params1, state1)), T.leaves(before)))
        plain = optim.step(opt, grads, state1, params1)
        flagged = optim.step(opt, grads, state1, params1, skip=torch.tensor(False))
        for x, y in zip(T.leaves(flagged), T.leaves(plain), strict=True):
            assert torch.equal(x, y)
