import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import accumulate as acc
from minillm_func import amp, optim
from minillm_func import tree as T
from strategies import gen, param_trees, seeds


@given(st.sampled_from([1.0, 2.0**4, 2.0**16, 3.7]), st.sampled_from([2.0, 1.5, 1.1, 3.0]),
       st.sampled_from([0.5, 0.25, 0.9, 0.3]), st.integers(1, 4),
       st.lists(st.sampled_from(["ok", "inf", "nan"]), max_size=40))
def test_scaler_equals_torch_grad_scaler(init_scale, growth, backoff, interval, events):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=growth,
                                  backoff_factor=backoff, growth_interval=interval)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.0)
    scaler.scale(torch.ones(()))  # GradScaler creates its state lazily
    ours = mf.amp.scaler_init(init_scale=init_scale, growth_factor=growth, backoff_factor=backoff,
                              growth_interval=interval)
    for event in events:
        value = {"ok": 1.0, "inf": float("inf"), "nan": float("nan")}[event]
        p.grad = torch.tensor([value, 1.0])
        scaler.step(opt)
        scaler.update()
        _, found_inf = amp.unscale(ours, {"g": p.grad})
        ours = mf.amp.scaler_update(ours, found_inf)
        assert ours.scale.item() == scaler.get_scale()
        assert ours.scale.dtype == torch.float32 and ours.growth_tracker.dim() == 0
        assert ours.growth_tracker.item() == scaler._growth_tracker.item()


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


def guarded_update(opt, state, scaled_grads, count):
    """A pure window update: unscale, accumulate, step; on a non-finite gradient keep everything."""
    params, opt_state, scaler, accum = state
    grads, found_inf = amp.unscale(scaler, scaled_grads)
    new_accum = acc.accum_add(accum, grads, count)
    new_params, new_opt = optim.step(opt, acc.accum_result(new_accum), opt_state, params)
    kept = T.select(found_inf, (params, opt_state, accum), (new_params, new_opt, acc.accum_reset(new_accum)))
    return (*kept[:2], amp.scaler_update(scaler, found_inf), kept[2])


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
@given(params=param_trees(dtype=torch.float32), seed=seeds, bad=st.sampled_from([float("inf"), float("nan")]))
def test_a_non_finite_step_leaves_the_train_state_bit_identical(impl, params, seed, bad):
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(mf.schedules.cosine_annealing(1e-2, 5), impl=impl))
    state = (params, opt.init(params), amp.scaler_init(), acc.accum_init(params))
    g = gen(seed)
    good = T.tree_map(lambda p: torch.randn(p.shape, generator=g), params)
    state = guarded_update(opt, state, good, 3)  # non-trivial moments and count
    assert state[1][1].count.item() == 1
    poisoned = T.tree_map(torch.clone, good)
    T.leaves(poisoned)[0].view(-1)[0] = bad
    snapshot = T.tree_map(torch.clone, state)
    after = guarded_update(opt, state, poisoned, 3)
    for a, b in zip(T.leaves(after[:2] + after[3:]), T.leaves(snapshot[:2] + snapshot[3:])):
        assert torch.equal(a, b)
    assert after[2].scale.item() == snapshot[2].scale.item() / 2


def test_policy_runs_apply_in_bf16_and_losses_in_float32():
    cfg = mf.ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, max_seq_len=8)
    model = mf.build_model(cfg)
    params = model.init(0)
    ids = torch.randint(0, 40, (2, 8), generator=gen(0))
    policy = amp.Policy(compute_dtype=torch.bfloat16)
    logits = policy.wrap(model.apply)(params, ids)
    assert logits.dtype == torch.bfloat16
    full = model.apply(params, ids)
    torch.testing.assert_close(logits.float(), full, rtol=0.05, atol=0.05)
    loss = mf.pretrain_loss(logits, ids)
    assert loss.dtype == torch.float32
    assert amp.Policy().wrap(model.apply)(params, ids).dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16"):
        amp.Policy(compute_dtype=torch.float16).autocast("cpu")
    with pytest.raises(ValueError, match="growth_factor"):
        amp.scaler_init(growth_factor=0.5)
