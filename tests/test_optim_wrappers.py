"""schedule_free_adamw, ema, ema_params, lookahead, skip_large_updates, apply_if_finite.

Each is pinned against an independent reference: optax (run through numpy in
float64), ``torch.optim.swa_utils.AveragedModel``, or a float64 closed form.
The optax side computes its own gradients at its own params, so a wrong
iterate (y for schedule-free, the fast weights for lookahead) shows up as a
diverging trajectory, not only as a wrong single update.
"""
import functools
import re

import numpy as np
import optree
import pytest
import torch

from minillm_func import checkpoint as ckpt
from minillm_func import optim
from minillm_func import tree as T

STEPS = 30
SHAPES = {"w": (4, 3), "b": (3,), "s": (), "block": {"k": (2, 2, 2)}}


@pytest.fixture(scope="module")
def ox():
    """optax, with jax in float64 (test-only reference)."""
    optax = pytest.importorskip("optax")
    import jax

    jax.config.update("jax_enable_x64", True)
    return optax


def is_shape(x):
    return isinstance(x, tuple)


class Problem:
    """A noisy quadratic: g_t(p) = a (p - c) + m_t n_t, leaf by leaf, in numpy float64.

    ``mags``: the noise scale at each step (large ones make updates "large");
    ``bad``: step -> "nan" | "inf", which puts a NaN or an inf into one element.
    """

    def __init__(self, seed, *, mags=(1.0,), bad=None, steps=STEPS):
        rng = np.random.default_rng(seed)
        draw = lambda f: optree.tree_map(f, SHAPES, is_leaf=is_shape)  # noqa: E731
        self.params = draw(lambda s: rng.standard_normal(s))
        self.curv = draw(lambda s: rng.uniform(0.5, 2.0, s))
        self.target = draw(lambda s: rng.standard_normal(s))
        self.noise = [draw(lambda s: rng.standard_normal(s) * mags[t % len(mags)]) for t in range(steps)]
        self.bad = bad or {}

    def grad(self, t, params):
        params = as_np(params)
        g = optree.tree_map(lambda p, a, c, n: a * (p - c) + n, params, self.curv, self.target, self.noise[t])
        if t in self.bad:
            g["block"]["k"] = g["block"]["k"].copy()
            g["block"]["k"][1, 0, 1] = np.nan if self.bad[t] == "nan" else np.inf
        return g

    def torch_params(self):
        return as_torch(self.params)

    def torch_grad(self, t, params):
        return as_torch(self.grad(t, params))


def as_np(tree):
    return optree.tree_map(lambda x: np.array(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64),
                           tree)


def as_torch(tree):
    return optree.tree_map(lambda x: torch.tensor(np.asarray(x)), tree)


def assert_trees_close(ours, theirs, rtol=1e-6, atol=1e-9, equal_nan=False):
    a, b = T.leaves(as_np(ours)), optree.tree_leaves(as_np(theirs))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, equal_nan=equal_nan)


def same(a, b):
    """Bit for bit (a NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.view(ints), b.view(ints)
    return torch.equal(a, b)


def run(opt, params, grad, *, via="update", steps=STEPS):
    """(params, state) after each update, through ``update`` + ``apply_updates`` or ``step`` (the fast apply)."""
    state = opt.init(params)
    out = []
    for t in range(steps):
        g = grad(t, params)
        if via == "update":
            updates, state = opt.update(g, state, params)
            params = optim.apply_updates(params, updates)
        else:
            params, state = optim.step(opt, g, state, params)
        out.append((params, state))
    return out


def run_optax(ox, opt, params, grad, *, steps=STEPS):
    import jax

    update = jax.jit(opt.update)
    state = opt.init(params)
    out = []
    for t in range(steps):
        updates, state = update(grad(t, params), state, params)
        params = ox.apply_updates(params, updates)
        out.append((params, state))
    return out


# --------------------------------------------------------------------------- schedule-free


@pytest.mark.parametrize("b1, weight_decay, weight_lr_power, lr", [
    (0.9, 0.0, 2.0, 0.05), (0.5, 0.1, 1.0, 0.02), (1.0, 0.01, 0.0, 0.1)])
def test_schedule_free_adamw_equals_optax_without_warmup(ox, b1, weight_decay, weight_lr_power, lr):
    """y (the train params), x (the eval params), z and the averaging weights, at every step."""
    prob = Problem(0)
    kw = dict(b1=b1, b2=0.99, eps=1e-8, weight_decay=weight_decay, weight_lr_power=weight_lr_power)
    ours = run(optim.schedule_free_adamw(lr, warmup_steps=0, **kw), prob.torch_params(), prob.torch_grad)
    theirs = run_optax(ox, ox.contrib.schedule_free_adamw(lr, warmup_steps=None, **kw), prob.params, prob.grad)
    for (p, s), (q, r) in zip(ours, theirs, strict=True):
        assert_trees_close(p, q)
        assert_trees_close(optim.schedule_free_eval_params(s, p), ox.contrib.schedule_free_eval_params(r, q))
        assert_trees_close(s.z, r.z)
        assert_trees_close((s.weight_sum, s.max_lr, s.b1), (r.weight_sum, r.max_lr, r.b1), rtol=1e-12)
        assert s.count.item() + 1 == int(r.step_count) and s.count.dtype == torch.int64


@pytest.mark.parametrize("warmup", [12])
def test_schedule_free_adamw_warmup_uses_one_learning_rate_for_the_z_step_and_the_weight(ox, warmup):
    """The mapping to optax: its generic ``schedule_free`` wrapper around the same momentum-free AdamW, both
    given γ_k = lr min(1, (k+1)/w) (optax calls the wrapper's schedule with k+1, the base's with k).
    optax's own ``schedule_free_adamw(warmup_steps=w)`` gives its base γ_{k-1} instead: its first update
    is zero, ours is not (the documented difference)."""
    import jax.numpy as jnp

    prob = Problem(1)
    lr, b2, eps, wd = 0.05, 0.99, 1e-8, 0.05
    ours = run(optim.schedule_free_adamw(lr, warmup_steps=warmup, b2=b2, eps=eps, weight_decay=wd),
               prob.torch_params(), prob.torch_grad)
    # the lr of 0-based update k, in float64 (jax divides optax's int32 counts in float32)
    gamma = lambda k: lr * jnp.minimum(1.0, (jnp.asarray(k, jnp.float64) + 1) / warmup)  # noqa: E731
    base = ox.chain(ox.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
                    ox.add_decayed_weights(wd), ox.scale_by_learning_rate(gamma))
    twin = ox.contrib.schedule_free(base, learning_rate=lambda step_count: gamma(step_count - 1), b1=0.9)
    theirs = run_optax(ox, twin, prob.params, prob.grad)
    for (p, s), (q, r) in zip(ours, theirs, strict=True):
        assert_trees_close(p, q)
        assert_trees_close(optim.schedule_free_eval_params(s, p), ox.contrib.schedule_free_eval_params(r, q))
        assert_trees_close((s.weight_sum, s.max_lr), (r.weight_sum, r.max_lr), rtol=1e-12)
    optax_own = run_optax(ox, ox.contrib.schedule_free_adamw(lr, warmup_steps=warmup, b2=b2, eps=eps,
                                                             weight_decay=wd), prob.params, prob.grad, steps=1)
    assert_trees_close(optax_own[0][0], prob.params, rtol=0, atol=0)  # optax: lr 0 at the first update
    assert not np.allclose(T.leaves(as_np(ours[0][0]))[0], T.leaves(prob.params)[0])


def test_schedule_free_wrapper_equals_optax_schedule_free_sgd(ox):
    prob = Problem(2)
    ours = run(optim.schedule_free(optim.scale_by_learning_rate(0.1), 0.1, b1=0.8), prob.torch_params(),
               prob.torch_grad)
    theirs = run_optax(ox, ox.contrib.schedule_free_sgd(0.1, b1=0.8), prob.params, prob.grad)
    for (p, s), (q, r) in zip(ours, theirs, strict=True):
        assert_trees_close(p, q)
        assert_trees_close(optim.schedule_free_eval_params(s, p), ox.contrib.schedule_free_eval_params(r, q))


def test_schedule_free_eval_params_is_the_running_average_of_z_in_closed_form():
    """Without reference to optax: x_t = sum_i c_i z_i with the weights lr_max^p / sum, z from the iterates,
    for a constant lr (all weights equal: x is the plain mean of z_1..z_t, with x_0 = z_0 weighing 0)."""
    prob = Problem(3)
    params = prob.torch_params()
    opt = optim.schedule_free(optim.scale_by_learning_rate(0.1), 0.1, b1=0.7)
    state = opt.init(params)
    zs = []
    for t in range(8):
        g = prob.torch_grad(t, params)
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
        zs.append(state.z)
        mean_z = T.tree_map(lambda *z: sum(z) / len(z), *zs)
        assert_trees_close(optim.schedule_free_eval_params(state, params), mean_z, rtol=1e-12)
        assert_trees_close(params, T.tree_map(lambda x, z: 0.7 * x + 0.3 * z, mean_z, state.z), rtol=1e-12)


# --------------------------------------------------------------------------- moving averages


@pytest.mark.parametrize("decay, debias", [(0.9, True), (0.9, False), (0.5, True), (0.0, True)])
def test_ema_equals_optax_ema(ox, decay, debias):
    prob = Problem(4, mags=(1e-3, 1.0, 30.0))
    ours = optim.ema(decay, debias=debias)
    theirs = ox.ema(decay, debias=debias)
    s, r = ours.init(prob.torch_params()), theirs.init(prob.params)
    for t in range(STEPS):
        g = prob.grad(t, prob.params)
        u, s = ours.update(as_torch(g), s)
        v, r = theirs.update(g, r)
        assert_trees_close(u, v)
        assert_trees_close(s.ema, r.ema)
        assert s.count.item() == int(r.count) == t + 1


def test_ema_keeps_its_accumulator_in_the_given_dtype():
    params = {"w": torch.randn(3, dtype=torch.bfloat16)}
    opt = optim.ema(0.9, accumulator_dtype=torch.float32)
    u, s = opt.update({"w": torch.ones(3, dtype=torch.bfloat16)}, opt.init(params))
    assert s.ema["w"].dtype == torch.float32
    torch.testing.assert_close(u["w"], torch.ones(3))  # debiased: the first output is the gradient itself


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.0])
@pytest.mark.parametrize("via", ["update", "step"])
def test_ema_params_is_the_float64_closed_form_of_the_new_params(decay, via):
    """avg_t = d^t p_0 + (1-d) sum_{i=1..t} d^(t-i) p_i, with p_i the params *after* update i; the updates
    pass through (the params equal adamw's alone, bit for bit)."""
    prob = Problem(5)
    inner = optim.adamw(0.05, weight_decay=0.1)
    got = run(optim.chain(inner, optim.ema_params(decay)), prob.torch_params(), prob.torch_grad, via=via)
    alone = run(inner, prob.torch_params(), prob.torch_grad)  # chain's fast apply runs only the last part's
    trajectory = [prob.torch_params()] + [p for p, _ in alone]
    for t, ((p, s), (q, _)) in enumerate(zip(got, alone, strict=True), start=1):
        assert all(torch.equal(a, b) for a, b in zip(T.leaves(p), T.leaves(q)))
        want = T.tree_map(lambda *ps: decay**t * ps[0] + sum((1 - decay) * decay ** (t - i) * ps[i]
                                                               for i in range(1, t + 1)), *trajectory[:t + 1])
        assert_trees_close(optim.averaged_params(s), want, rtol=1e-12, atol=1e-14)
        assert s[1].count.item() == t


def test_ema_params_equals_torch_averaged_model():
    """torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn, fed the initial and each new params."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    prob = Problem(6)
    params = prob.torch_params()
    module = torch.nn.Module()
    for name, p in (("w", params["w"]), ("b", params["b"]), ("s", params["s"]), ("k", params["block"]["k"])):
        module.register_parameter(name, torch.nn.Parameter(p.clone()))
    averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    averaged.update_parameters(module)  # the first call copies: the average starts at p_0
    opt = optim.chain(optim.adamw(0.05), optim.ema_params(0.8))
    state = opt.init(params)
    for t in range(STEPS):
        params, state = optim.step(opt, prob.torch_grad(t, params), state, params)
        with torch.no_grad():
            for name, leaf in (("w", params["w"]), ("b", params["b"]), ("s", params["s"]),
                               ("k", params["block"]["k"])):
                getattr(module, name).copy_(leaf)
        averaged.update_parameters(module)
    avg = optim.averaged_params(state)
    for name, leaf in (("w", avg["w"]), ("b", avg["b"]), ("s", avg["s"]), ("k", avg["block"]["k"])):
        torch.testing.assert_close(leaf, getattr(averaged.module, name).detach(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- lookahead


@pytest.mark.parametrize("sync_period, alpha, reset", [(1, 0.5, False), (3, 0.0, False), (5, 0.8, True)])
def test_lookahead_equals_optax_with_slow_weights_in_the_state(ox, sync_period, alpha, reset):
    """optax's params are LookaheadParams(fast, slow); ours are the fast ones, the slow ones are state.slow.
    Gradients are taken at the fast weights on both sides."""
    prob = Problem(7)
    opt = optim.lookahead(optim.adamw(0.05, weight_decay=0.1), sync_period, alpha, reset_state=reset)
    ours = run(opt, prob.torch_params(), prob.torch_grad)
    twin = ox.lookahead(ox.adamw(0.05, weight_decay=0.1), sync_period, alpha, reset_state=reset)
    import jax

    update = jax.jit(twin.update)
    params = ox.LookaheadParams.init_synced(prob.params)
    state = twin.init(params)
    for t, (p, s) in enumerate(ours):
        updates, state = update(prob.grad(t, params.fast), state, params)
        params = ox.apply_updates(params, updates)
        assert_trees_close(p, params.fast)
        assert_trees_close(optim.lookahead_slow_params(s), params.slow)
        assert s.steps_since_sync.item() == int(state.steps_since_sync) == (t + 1) % sync_period
        assert_trees_close((s.fast_state.mu, s.fast_state.nu), (state.fast_state[0].mu, state.fast_state[0].nu))


# --------------------------------------------------------------------------- skipping


MAGS = (1e-3, 1.0, 30.0, 1.0, 3.0)  # noise scales cycling over the steps: some updates are "large"


@pytest.mark.parametrize("max_squared_norm", [1.0, 500.0, 1e6])
def test_skip_large_updates_equals_optax_multisteps_with_its_skip_predicate(ox, max_squared_norm):
    """Through update + apply_updates and through step (the inner fast kernels, told to skip)."""
    prob = Problem(8, mags=MAGS, bad={11: "nan", 20: "inf"})
    twin = ox.MultiSteps(ox.adamw(0.05, weight_decay=0.1), 1,
                         should_skip_update_fn=functools.partial(ox.skip_large_updates,
                                                                 max_squared_norm=max_squared_norm),
                         accumulator_dtype=np.float64)
    theirs = run_optax(ox, twin, prob.params, prob.grad)
    for via in ("update", "step"):
        ours = run(optim.skip_large_updates(optim.adamw(0.05, weight_decay=0.1), max_squared_norm),
                   prob.torch_params(), prob.torch_grad, via=via)
        skipped = 0
        for (p, s), (q, r) in zip(ours, theirs, strict=True):
            assert_trees_close(p, q)
            assert bool(s.should_skip) == bool(r.skip_state["should_skip"])
            skipped += bool(s.should_skip)
            np.testing.assert_allclose(s.norm_squared.item(), float(r.skip_state["norm_squared"]), rtol=1e-10)
            assert s.total_skipped.item() == skipped
            assert_trees_close(s.inner_state, r.inner_opt_state[0])
        assert (skipped == STEPS) if max_squared_norm == 1.0 else (2 <= skipped < STEPS)


def test_skip_large_updates_by_norm_equals_by_squared_norm():
    prob = Problem(9, mags=MAGS)
    inner = optim.adamw(0.05)
    a = run(optim.skip_large_updates(inner, 500.0), prob.torch_params(), prob.torch_grad)
    b = run(optim.skip_large_updates(inner, max_norm=500.0**0.5), prob.torch_params(), prob.torch_grad)
    assert any(bool(s.should_skip) for _, s in a) and not all(bool(s.should_skip) for _, s in a)
    for x, y in zip(T.leaves(a), T.leaves(b), strict=True):
        assert torch.equal(x, y)


BAD = {2: "nan", 5: "inf", 6: "nan", 10: "inf", 11: "inf", 12: "nan", 26: "nan", 27: "inf", 28: "nan",
       29: "nan"}


@pytest.mark.parametrize("max_consecutive_errors", [0, 2, 4])
def test_apply_if_finite_equals_optax_including_its_counters(ox, max_consecutive_errors):
    """NaN and inf gradients, alone and in runs of 2, 3 and 4: skipped until a run exceeds the limit, then
    applied (and the poisoned element turns NaN, on both sides)."""
    prob = Problem(10, bad=BAD)
    twin = ox.apply_if_finite(ox.adamw(0.05, weight_decay=0.1), max_consecutive_errors)
    theirs = run_optax(ox, twin, prob.params, prob.grad)
    for via in ("update", "step"):
        ours = run(optim.apply_if_finite(optim.adamw(0.05, weight_decay=0.1), max_consecutive_errors),
                   prob.torch_params(), prob.torch_grad, via=via)
        for t, ((p, s), (q, r)) in enumerate(zip(ours, theirs, strict=True)):
            assert_trees_close(p, q, equal_nan=True)
            assert_trees_close(s.inner_state, r.inner_state[0], equal_nan=True)
            assert (s.notfinite_count.item(), bool(s.last_finite), s.total_notfinite.item()) == \
                   (int(r.notfinite_count), bool(r.last_finite), int(r.total_notfinite)), t
        final, state = ours[-1]
        assert bool(torch.isnan(final["block"]["k"]).any()) == (max_consecutive_errors < 4)
        if max_consecutive_errors == 4:  # never gave up: only the finite gradients reached the inner optimizer
            assert state.inner_state.count.item() == STEPS - len(BAD)


# --------------------------------------------------------------------------- purity, vmap, compile


def builders():
    adamw = lambda: optim.adamw(0.05, weight_decay=0.1)  # noqa: E731
    return {
        "schedule_free_adamw": lambda: optim.schedule_free_adamw(0.05, warmup_steps=3, weight_decay=0.1),
        "ema": lambda: optim.chain(optim.ema(0.9), optim.scale_by_learning_rate(0.05)),
        "ema_params": lambda: optim.chain(adamw(), optim.ema_params(0.9)),
        "lookahead": lambda: optim.lookahead(adamw(), 2, 0.5, reset_state=True),
        "skip_large_updates": lambda: optim.skip_large_updates(adamw(), 500.0),
        "apply_if_finite": lambda: optim.apply_if_finite(adamw(), 1),
    }


@pytest.mark.parametrize("name", list(builders()))
@pytest.mark.parametrize("via", ["update", "step"])
def test_updates_never_modify_their_inputs(name, via):
    prob = Problem(11, mags=MAGS, bad={1: "nan"})
    opt = builders()[name]()
    params = prob.torch_params()
    state = opt.init(params)
    # a state never aliases the params it was built from: donating params must not change it
    ptrs = {x.untyped_storage().data_ptr() for x in T.leaves(params) if x.numel()}
    assert not ptrs & {x.untyped_storage().data_ptr() for x in T.leaves(state) if x.numel()}
    for t in range(4):
        grads = prob.torch_grad(t, params)
        held = (grads, state, params)
        snapshot = T.tree_map(torch.clone, held)
        if via == "update":
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        else:
            params, state = optim.step(opt, grads, state, params)
        for a, b in zip(T.leaves(held), T.leaves(snapshot), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", list(builders()))
def test_vmap_over_a_batch_of_states_equals_a_loop(name):
    """Three members, one of which gets a NaN gradient and another a huge one at some steps: every value-
    dependent choice (skip or not, sync or not, warm-up) is made per member, with no Python branch."""
    opt = builders()[name]()
    probs = [Problem(20), Problem(21, bad={1: "nan", 2: "inf"}), Problem(22, mags=(1.0, 100.0))]
    members = [p.torch_params() for p in probs]
    states = [opt.init(m) for m in members]
    stack = lambda trees: T.tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    bp, bs = stack(members), stack(states)
    batched = torch.func.vmap(lambda g, s, p: optim.step(opt, g, s, p))
    for t in range(5):
        grads = [pr.torch_grad(t, m) for pr, m in zip(probs, members)]
        bp, bs = batched(stack(grads), bs, bp)
        for i in range(3):
            members[i], states[i] = optim.step(opt, grads[i], states[i], members[i])
    for i in range(3):
        for a, b in zip(T.leaves((members[i], states[i])), T.leaves(T.tree_map(lambda x: x[i], (bp, bs))),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_wrappers_compile_in_one_graph_and_match_eager():
    """fullgraph=True fails on any graph break: a .item(), a Python branch on a tensor value."""
    prob = Problem(12, mags=MAGS, bad={2: "nan"})
    opt = optim.apply_if_finite(
        optim.skip_large_updates(optim.lookahead(optim.chain(optim.adamw(0.05), optim.ema_params(0.9)), 2, 0.5),
                                 1e4), 1)
    compiled = torch.compile(lambda g, s, p: optim.step(opt, g, s, p), backend="eager", fullgraph=True)
    sf = optim.schedule_free_adamw(0.05, warmup_steps=2)
    compiled_sf = torch.compile(lambda g, s, p: sf.update(g, s, p), backend="eager", fullgraph=True)
    p = e = q = r = prob.torch_params()
    s, se, sq, sr = opt.init(p), opt.init(p), sf.init(p), sf.init(p)
    for t in range(4):
        p, s = compiled(prob.torch_grad(t, p), s, p)
        e, se = optim.step(opt, prob.torch_grad(t, e), se, e)
        u, sq = compiled_sf(prob.torch_grad(t, q), sq, q)
        q = optim.apply_updates(q, u)
        v, sr = sf.update(prob.torch_grad(t, r), sr, r)
        r = optim.apply_updates(r, v)
        for a, b in zip(T.leaves((p, s, q, sq)), T.leaves((e, se, r, sr)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, equal_nan=True)
    assert s.total_notfinite.item() == 1


@pytest.mark.parametrize("donate", [False, True])
def test_the_fast_apply_skips_through_the_inner_kernels_bit_for_bit(donate):
    """step() on the wrappers hands the decision to the inner apply as ``skip``: a skipped update leaves
    params and inner state bit-identical, also in float32 on the fused kernels and when donated; an outer
    ``skip`` (an accumulation window not yet complete) freezes the counters too."""
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(300, 7, generator=g), "b": torch.randn(11, generator=g)}
    grads = T.tree_map(lambda p: torch.randn(p.shape, generator=g), params)
    for opt in (optim.apply_if_finite(optim.adamw(1e-2), 3), optim.skip_large_updates(optim.adamw(1e-2), 1.0)):
        state = opt.init(params)
        params1, state1 = optim.step(opt, T.tree_map(lambda x: x * 1e-3, grads), state, params)
        before = T.tree_map(torch.clone, (params1, state1.inner_state))
        bad = T.tree_map(lambda x: torch.full_like(x, float("nan")), grads)
        held = T.tree_map(torch.clone, (params1, state1)) if donate else (params1, state1)
        new, new_state = optim.step(opt, bad, held[1], held[0], donate=donate)
        for x, y in zip(T.leaves((new, new_state.inner_state)), T.leaves(before), strict=True):
            assert torch.equal(x, y)
        frozen, frozen_state = optim.step(opt, bad, new_state, new, skip=torch.tensor(True))
        assert all(same(x, y) for x, y in zip(T.leaves((frozen, frozen_state)), T.leaves((new, new_state))))


# --------------------------------------------------------------------------- states, errors, docs


def test_states_round_trip_through_a_checkpoint_bit_identically(tmp_path):
    prob = Problem(13, mags=MAGS, bad={1: "nan"})
    states = []
    for name, build in builders().items():
        opt = build()
        params = prob.torch_params()
        state = opt.init(params)
        for t in range(3):
            params, state = optim.step(opt, prob.torch_grad(t, params), state, params)
        states.append(state)
    ckpt.save(tmp_path / "c", states)
    for like in (states, None):
        loaded, _ = ckpt.load(tmp_path / "c", like=like)
        assert optree.tree_structure(loaded) == optree.tree_structure(states)
        for a, b in zip(T.leaves(loaded), T.leaves(states), strict=True):
            assert same(a, b)


def test_bad_arguments_raise_errors_that_say_what_to_do():
    inner = optim.adamw()
    with pytest.raises(ValueError, match=r"b1 must lie in \(0, 1\]"):
        optim.schedule_free_adamw(b1=0.0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        optim.schedule_free_adamw(warmup_steps=-1)
    with pytest.raises(ValueError, match="b2"):
        optim.schedule_free_adamw(b2=1.0)
    with pytest.raises(TypeError, match="must be a Transform"):
        optim.schedule_free("sgd", 0.1)
    with pytest.raises(ValueError, match="decay"):
        optim.ema(1.0)
    with pytest.raises(ValueError, match="sync_period must be an int >= 1"):
        optim.lookahead(inner, 0, 0.5)
    with pytest.raises(ValueError, match=r"slow_step_size must lie in \[0, 1\]"):
        optim.lookahead(inner, 5, 1.5)
    with pytest.raises(ValueError, match="exactly one bound"):
        optim.skip_large_updates(inner, 1.0, max_norm=1.0)
    with pytest.raises(ValueError, match="exactly one bound"):
        optim.skip_large_updates(inner)
    with pytest.raises(ValueError, match="max_norm must be positive"):
        optim.skip_large_updates(inner, max_norm=0.0)
    with pytest.raises(ValueError, match="max_consecutive_errors must be an int >= 0"):
        optim.apply_if_finite(inner, -1)
    params = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="holds no ScheduleFreeState.*schedule_free_adamw"):
        optim.schedule_free_eval_params(inner.init(params), params)
    with pytest.raises(ValueError, match="holds no EmaParamsState.*ema_params"):
        optim.averaged_params(inner.init(params))
    with pytest.raises(ValueError, match="holds 2 LookaheadStates"):
        opt = optim.lookahead(inner, 2, 0.5)
        optim.lookahead_slow_params((opt.init(params), opt.init(params)))
    with pytest.raises(ValueError, match="needs the params"):
        optim.ema_params(0.9).update(params, optim.ema_params(0.9).init(params))


NAMES = ["schedule_free", "schedule_free_adamw", "schedule_free_eval_params", "ema", "ema_params",
         "averaged_params", "lookahead", "lookahead_slow_params", "apply_if_finite", "skip_large_updates"]


def test_the_new_names_are_public():
    assert set(NAMES) <= set(optim.__all__)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_examples_run(name):
    doc = getattr(optim, name).__doc__
    blocks = []
    for match in re.finditer(r"Example::\n\n((?:[ \t]+\S.*\n|[ \t]*\n)+)", doc):
        lines = match.group(1).rstrip().splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        blocks.append("\n".join(line[indent:] for line in lines))
    assert blocks, f"{name} has no runnable example"
    for block in blocks:
        namespace = {"torch": torch, "optim": optim, **{n: getattr(optim, n) for n in optim.__all__
                                                        if hasattr(optim, n)},
                     "params": {"w": torch.randn(3, 3), "b": torch.zeros(3)},
                     "grads": {"w": torch.randn(3, 3), "b": torch.randn(3)}}
        exec(compile(block, f"<{name} example>", "exec"), namespace)
