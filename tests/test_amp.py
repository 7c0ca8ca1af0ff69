import hypothesis
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import amp, optim
from minillm_func import tree as T
from minillm_func.step import init_train_state, make_train_step, make_window_step
from strategies import expected_growths, gen, param_trees, scaler_events, seeds


@given(st.sampled_from([1.0, 2.0**4, 2.0**16, 3.7]), st.sampled_from([2.0, 1.5, 1.1, 3.0]),
       st.sampled_from([0.5, 0.25, 0.9, 0.3]), st.integers(1, 3).flatmap(
           lambda n: st.tuples(st.just(n), scaler_events(growth_interval=n))))
def test_scaler_equals_torch_grad_scaler(init_scale, growth, backoff, interval_and_events):
    interval, events = interval_and_events
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=growth,
                                  backoff_factor=backoff, growth_interval=interval)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.0)
    scaler.scale(torch.ones(()))  # GradScaler creates its state lazily
    ours = mf.amp.scaler_init(init_scale=init_scale, growth_factor=growth, backoff_factor=backoff,
                              growth_interval=interval)
    growths = backoffs = 0
    for e in events:
        value = {"ok": 1.0, "inf": float("inf"), "nan": float("nan")}[e]
        p.grad = torch.tensor([value, 1.0])
        scaler.step(opt)
        scaler.update()
        _, found_inf = amp.unscale(ours, {"g": p.grad})
        before = ours.scale.item()
        ours = mf.amp.scaler_update(ours, found_inf)
        growths += ours.scale.item() > before
        backoffs += ours.scale.item() < before
        assert ours.scale.item() == scaler.get_scale()
        assert ours.scale.dtype == torch.float32 and ours.growth_tracker.dim() == 0
        assert ours.growth_tracker.item() == scaler.state_dict()["_growth_tracker"]
    assert growths == expected_growths(events, interval)  # growth is exercised, and counted right
    assert backoffs == sum(e != "ok" for e in events)
    hypothesis.event(f"growth events: {min(growths, 3)}{'+' if growths >= 3 else ''}")


def test_min_scale_is_a_floor():
    s = amp.scaler_init(init_scale=4.0, min_scale=1.0)
    for _ in range(5):
        s = amp.scaler_update(s, torch.tensor(True))
    assert s.scale.item() == 1.0


def test_growth_never_overflows_to_inf():
    s = amp.scaler_init(init_scale=3e38, growth_interval=1)
    s = amp.scaler_update(s, torch.tensor(False))
    assert s.scale.item() == pytest.approx(3e38) and s.growth_tracker.item() == 0


@given(param_trees(dtype=torch.float32), seeds)
def test_unscale_divides_and_detects_without_mutating(grads, seed):
    s = amp.scaler_init(init_scale=2.0**10)
    before = T.tree_map(torch.clone, grads)
    out, found = amp.unscale(s, grads)
    assert not found.item()
    assert all(torch.equal(a, b / 1024) for a, b in zip(T.leaves(out), T.leaves(before)))
    assert all(torch.equal(a, b) for a, b in zip(T.leaves(grads), T.leaves(before)))
    bad = T.tree_map(lambda x: x.clone(), grads)
    T.leaves(bad)[-1].view(-1)[0] = float("nan")
    assert amp.unscale(s, bad)[1].item()


def squared_distance_loss(params, batch, extras):
    """A loss for the real steps: summed squared distance of every leaf to its target, times
    ``batch["poison"]`` (1, or inf / nan to make the gradient non-finite); ``batch["count"]`` "tokens"."""
    total = sum(((p - t) ** 2).sum() for p, t in zip(T.leaves(params), T.leaves(batch["target"])))
    return total * batch["poison"], (batch["count"], {})


POISON = {"ok": 1.0, "inf": float("inf"), "nan": float("nan")}


def windows_of(params, events, size, seed):
    """One window of ``size`` micro-batches per event (counts 1 to 5); a non-finite event
    poisons one micro-batch of its window, at a drawn place."""
    g = gen(seed)
    out = []
    for e in events:
        window = [{"target": T.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params),
                   "count": torch.randint(1, 6, (), generator=g), "poison": torch.tensor(1.0)} for _ in range(size)]
        window[int(torch.randint(0, size, (), generator=g))]["poison"] = torch.tensor(POISON[e])
        out.append(window)
    return out


def grad_scaler_after(scaler: amp.ScalerState, found_inf: bool) -> tuple[float, int]:
    """What ``torch.amp.GradScaler`` in ``scaler``'s state does after one ``step`` + ``update``
    with a finite or non-finite gradient: the new scale and growth tracker."""
    gs = torch.amp.GradScaler("cpu")
    gs.load_state_dict({"scale": scaler.scale.item(), "growth_factor": scaler.growth_factor.item(),
                        "backoff_factor": scaler.backoff_factor.item(),
                        "growth_interval": int(scaler.growth_interval), "_growth_tracker": int(scaler.growth_tracker)})
    gs.scale(torch.ones(()))  # GradScaler creates its state lazily, from the loaded values
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([float("inf") if found_inf else 1.0])
    gs.step(torch.optim.SGD([p], lr=0.0))
    gs.update()
    return gs.get_scale(), gs.state_dict()["_growth_tracker"]


def unchanged_part(state):
    """Everything but the loss scaler: step counter, params, optimizer state, accumulator."""
    return (state.step, state.params, state.opt_state, state.accum, state.extras)


# (step builder, micro-batches per call, accumulation_steps): the micro-step alone, the micro-step
# accumulating 3 calls, and the window step taking 3 micro-batches at once.
STEPS = {"micro-step": (make_train_step, 1, 1), "micro-step, k=3": (make_train_step, 1, 3),
         "window of 3": (make_window_step, 3, None)}


def build_step(kind, opt):
    build, size, k = STEPS[kind]
    step = build(squared_distance_loss, opt, loss_scaling=True, **({} if k is None else {"accumulation_steps": k}))
    return (step if build is make_window_step else lambda state, window: step(state, window[0])), size, k


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
@pytest.mark.parametrize("kind", list(STEPS))
@given(params=param_trees(dtype=torch.float32), seed=seeds,
       events=st.lists(st.sampled_from(["ok", "ok", "inf", "nan"]), min_size=2, max_size=8))
def test_a_non_finite_step_of_the_real_step_leaves_the_state_bit_identical(impl, kind, params, seed, events):
    """The real steps with ``loss_scaling=True``: a call whose gradient is not finite returns the step
    counter, params, optimizer state and accumulator bit-identical (for the micro-step with k=3 also
    mid-window, with a non-empty accumulator) and reports ``skipped``; at every call the scaler
    moves as ``GradScaler`` in the same state moves after one ``step`` + ``update``."""
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.adamw(mf.schedules.cosine_annealing(1e-2, 5), impl=impl))
    step, size, k = build_step(kind, opt)
    state = init_train_state(params, opt, scaler=amp.scaler_init(init_scale=2.0**4, growth_interval=2))
    events = ["ok"] * (k or 1) + events  # begin with an update: non-zero moments and counters
    for e, window in zip(events, windows_of(params, events, size, seed)):
        snapshot = T.tree_map(torch.clone, unchanged_part(state))
        want_scale, want_tracker = grad_scaler_after(state.scaler, e != "ok")
        if e != "ok" and int(state.accum.micro_step):
            hypothesis.event("non-finite micro-step inside a non-empty accumulation window")
        state, metrics = step(state, window)
        assert metrics["skipped"].item() == (e != "ok")
        assert state.scaler.scale.item() == want_scale and state.scaler.growth_tracker.item() == want_tracker
        if e != "ok":
            assert not metrics["updated"].item()
            for a, b in zip(T.leaves(unchanged_part(state)), T.leaves(snapshot), strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b)
    assert int(state.step) == events.count("ok") // (k or 1)  # a skipped micro-batch does not count


@pytest.mark.parametrize("kind", ["micro-step", "window of 3"])
@given(params=param_trees(max_leaves=3), seed=seeds, max_norm=st.sampled_from([0.1, 100.0]),
       growth_and_events=st.integers(1, 3).flatmap(lambda n: st.tuples(st.just(n), scaler_events(growth_interval=n))))
def test_loss_scaled_steps_equal_grad_scaler_driving_torch_adamw(kind, params, seed, max_norm, growth_and_events):
    """End to end against torch, float64: ``GradScaler("cpu")`` scales each micro-batch's loss
    (divided by the window's token count) and accumulates ``.grad``; then ``unscale_``,
    ``clip_grad_norm_``, ``step`` (skipped on inf/nan) and ``update`` around a real
    ``torch.optim.AdamW``. Params, scale, growth tracker and step counts agree at every update."""
    interval, events = growth_and_events
    lr, wd = 1e-2, 0.1
    opt = optim.chain(optim.clip_by_global_norm(max_norm), optim.adamw(lr, weight_decay=wd))
    step, size, _ = build_step(kind, opt)
    state = init_train_state(params, opt, scaler=amp.scaler_init(init_scale=2.0**10, growth_interval=interval))

    torch_params = [torch.nn.Parameter(p.clone()) for p in T.leaves(params)]
    torch_opt = torch.optim.AdamW(torch_params, lr=lr, weight_decay=wd, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=interval)
    live = T.unflatten_like(params, list(torch_params))
    for window in windows_of(params, events, size, seed):
        state, metrics = step(state, window)
        window_count = sum(b["count"] for b in window)
        for b in window:
            loss_sum, _ = squared_distance_loss(live, b, {})
            scaler.scale(loss_sum / window_count).backward()
        scaler.unscale_(torch_opt)
        torch.nn.utils.clip_grad_norm_(torch_params, max_norm)
        scaler.step(torch_opt)
        scaler.update()
        torch_opt.zero_grad(set_to_none=True)
        assert state.scaler.scale.item() == scaler.get_scale()
        assert state.scaler.growth_tracker.item() == scaler.state_dict()["_growth_tracker"]
        for ours, theirs in zip(T.leaves(state.params), torch_params, strict=True):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)
    taken = events.count("ok")
    assert int(state.step) == taken
    assert all(torch_opt.state[p]["step"].item() == taken for p in torch_params if p in torch_opt.state)
    hypothesis.event(f"growth events: {expected_growths(events, interval) > 0}")


def test_policy_runs_apply_in_bf16_and_losses_in_float32():
    cfg = mf.ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, max_seq_len=8)
    model = mf.build_model(cfg)
    params = model.init(0)
    ids = torch.randint(0, 40, (2, 8), generator=gen(0))
    policy = amp.Policy(compute_dtype=torch.bfloat16)
    logits = policy.wrap(model.apply)(params, ids)
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():  # the fp32 reference, computed independently: the imperative module, no autocast
        ref = model.to_module(params)(ids).double()
    # bf16 keeps 8 significant bits: unit round-off u = 2**-8. Rounding the logits themselves costs
    # u |z|; rounding the inputs of each matmul (autocast; accumulation stays fp32) a few u of the
    # logits' scale. Measured worst over 40 models: 1.27 u max|z|; a bound of 3 u max|z| in all
    # (the old 5% + 5% was ~12x looser than this).
    u = 2.0**-8
    err = (logits.double() - ref).abs()
    assert err.max() <= 3 * u * ref.abs().max()
    assert err.max() > 1e-7 * ref.abs().max()  # it did run in bf16: fp32 agrees to ~1e-7
    loss = mf.pretrain_loss(logits, ids)
    assert loss.dtype == torch.float32
    assert amp.Policy().wrap(model.apply)(params, ids).dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16"):
        amp.Policy(compute_dtype=torch.float16).autocast("cpu")
    with pytest.raises(ValueError, match="growth_factor"):
        amp.scaler_init(growth_factor=0.5)
