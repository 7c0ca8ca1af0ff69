import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm_func import schedules


@given(st.sampled_from([1e-4, 3e-3, 1.0]), st.integers(1, 60), st.sampled_from([0.0, 1e-6, 1e-5]))
def test_cosine_annealing_equals_torch_for_every_step_up_to_three_periods(base, T_max, eta_min):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T_max, eta_min=eta_min)
    ours = schedules.cosine_annealing(base, T_max=T_max, eta_min=eta_min)
    for step in range(3 * T_max + 1):
        want = opt.param_groups[0]["lr"]
        got = ours(step)
        assert got.dtype == torch.float64 and got.dim() == 0
        assert math.isclose(got.item(), want, rel_tol=1e-10, abs_tol=1e-13 * base)
        opt.step()
        sched.step()


def test_cosine_annealing_is_periodic_past_t_max():
    f = schedules.cosine_annealing(1.0, T_max=10)
    assert f(10).item() == pytest.approx(0.0, abs=1e-15)
    assert f(20).item() == pytest.approx(1.0)
    assert f(15).item() == pytest.approx(f(5).item())


@given(st.floats(1e-5, 1.0), st.integers(0, 20), st.integers(1, 100), st.floats(0.0, 1.0))
def test_warmup_cosine_warms_up_decays_and_holds(peak, warmup, extra, end_frac):
    total = warmup + extra
    end = peak * end_frac
    f = schedules.warmup_cosine(peak, warmup, total, end)
    lrs = f(torch.arange(total + 10)).tolist()
    assert all(0 < x <= peak * (1 + 1e-12) for x in lrs[:warmup])
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # strictly rising warm-up
    assert lrs[warmup] == pytest.approx(peak)
    assert all(a >= b - 1e-15 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then never rising
    assert all(x == pytest.approx(end, abs=1e-15) for x in lrs[total:])  # held, no restart
    assert f(3).item() == pytest.approx(lrs[3])  # scalar and batched agree


def warmup_cosine_closed_form(step, peak, warmup, total, end):
    """The documented formula, in Python floats: (s+1)/w of the peak while s < w, then a half
    cosine from the peak at s = w to ``end`` at s = total, then ``end``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return end + (peak - end) * (1 + math.cos(math.pi * progress)) / 2


def torch_warmup_then_cosine(peak, warmup, total, end):
    """The same shape from torch's own schedulers, one optimizer per phase: ``LinearLR`` from
    peak/w to the peak over the warm-up, ``CosineAnnealingLR(T_max=total - w, eta_min=end)`` after."""
    lrs = []
    if warmup:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                                  total_iters=max(warmup - 1, 1))
        for _ in range(warmup):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=end)
    for _ in range(total - warmup + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@given(st.floats(1e-5, 1.0), st.integers(0, 20), st.integers(1, 100), st.floats(0.0, 1.0))
def test_warmup_cosine_equals_the_closed_form_and_torch_at_every_step(peak, warmup, extra, end_frac):
    """Every step, not only the end points: the linear ramp, the half cosine in between, the hold."""
    total = warmup + extra
    end = peak * end_frac
    f = schedules.warmup_cosine(peak, warmup, total, end)
    got = f(torch.arange(total + 10))
    assert got.dtype == torch.float64
    for step, lr in enumerate(got.tolist()):
        assert math.isclose(lr, warmup_cosine_closed_form(step, peak, warmup, total, end),
                            rel_tol=1e-12, abs_tol=1e-15 * peak), step
    for step, want in enumerate(torch_warmup_then_cosine(peak, warmup, total, end)):
        # torch's schedulers are recursive: agreement to their rounding only
        assert math.isclose(got[step].item(), want, rel_tol=1e-10, abs_tol=1e-13 * peak), step


def test_schedules_vmap_and_reject_bad_arguments():
    f = schedules.cosine_annealing(0.1, T_max=4)
    steps = torch.arange(6)
    assert torch.equal(torch.func.vmap(f)(steps), f(steps))
    assert torch.equal(schedules.constant(0.5)(steps), torch.full((6,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="T_max"):
        schedules.cosine_annealing(0.1, T_max=0)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        schedules.warmup_cosine(0.1, 10, 10)


# --------------------------------------------------------------------------- linear_schedule, wsd


@pytest.mark.parametrize("init, end, steps, begin", [(1e-3, 0.0, 10, 0), (0.0, 0.5, 7, 3), (2.0, 0.1, 1, 5),
                                                      (0.3, 0.3, 4, 0), (1e-3, 1e-5, 0, 2), (1.0, 0.0, -3, 0)])
def test_linear_schedule_equals_optax(init, end, steps, begin):
    optax = pytest.importorskip("optax")
    import jax

    jax.config.update("jax_enable_x64", True)
    ours = schedules.linear_schedule(init, end, steps, begin)
    theirs = optax.linear_schedule(init, end, steps, begin)
    got = ours(torch.arange(steps + begin + 5))
    assert got.dtype == torch.float64
    for s, lr in enumerate(got.tolist()):
        assert math.isclose(lr, float(theirs(s)), rel_tol=1e-12, abs_tol=1e-15), s
        assert math.isclose(ours(s).item(), lr, rel_tol=1e-15), s  # scalar and batched agree


def test_linear_decay_is_linear_schedule_from_the_peak():
    f = schedules.linear_decay(0.1, 10, end_value=0.01)
    want = [0.1 - 0.009 * s for s in range(11)] + [0.01] * 3
    for s, lr in enumerate(f(torch.arange(14)).tolist()):
        assert math.isclose(lr, want[s], rel_tol=1e-12), s


def wsd_closed_form(s, peak, total, warmup, decay, end, shape):
    """The trapezoid, in Python floats, written from the paper's description: ramp (s+1)/w, hold the
    peak, cool down over the last `decay` steps (1 - p or 1 - sqrt(p), p from 0 at the start of the
    cool-down to 1 at `total`), then hold `end`."""
    if s < warmup:
        return peak * (s + 1) / warmup
    if s < total - decay:
        return peak
    if s >= total:
        return end
    p = (s - (total - decay)) / decay
    return end + (peak - end) * ((1 - p) if shape == "linear" else (1 - math.sqrt(p)))


@given(st.floats(1e-5, 1.0), st.integers(0, 20), st.integers(0, 30), st.integers(1, 30), st.floats(0.0, 1.0),
       st.sampled_from(["linear", "1-sqrt"]))
def test_wsd_equals_its_closed_form_at_every_step(peak, warmup, stable, decay, end_frac, shape):
    total = warmup + stable + decay
    end = peak * end_frac
    f = schedules.wsd(peak, total, warmup, decay, end_value=end, decay_shape=shape)
    got = f(torch.arange(total + 5))
    assert got.dtype == torch.float64
    for s, lr in enumerate(got.tolist()):
        assert math.isclose(lr, wsd_closed_form(s, peak, total, warmup, decay, end, shape),
                            rel_tol=1e-12, abs_tol=1e-15 * peak), s
    assert got[warmup:total - decay].eq(peak).all()  # the stable phase is exactly the peak
    assert torch.equal(torch.func.vmap(f)(torch.arange(total + 5)), got)


def test_wsd_one_minus_sqrt_cool_down_points_and_the_decay_fraction():
    f = schedules.wsd(1.0, 100, warmup_steps=10, decay_shape="1-sqrt")  # default: the last 20% cool down
    assert f(80).item() == 1.0 and f(79).item() == 1.0
    assert math.isclose(f(85).item(), 1 - math.sqrt(0.25), rel_tol=1e-14)
    assert math.isclose(f(99).item(), 1 - math.sqrt(0.95), rel_tol=1e-14)
    assert f(100).item() == 0.0 and f(500).item() == 0.0
    assert math.isclose(f(0).item(), 0.1) and f(9).item() == 1.0
    g = schedules.wsd(1.0, 30, decay_fraction=0.29)  # 8.7 steps: rounded to 9, the cool-down starts at 21
    assert g(21).item() == 1.0 and g(22).item() < 1.0
    steps = torch.arange(120)
    assert torch.equal(schedules.wsd(1.0, 100, decay_steps=20)(steps), schedules.wsd(1.0, 100)(steps))


def test_new_schedules_reject_bad_arguments():
    with pytest.raises(ValueError, match="decay_shape must be one of 'linear', '1-sqrt'"):
        schedules.wsd(1.0, 100, decay_shape="cosine")
    with pytest.raises(ValueError, match="warmup_steps \\+ decay_steps <= total_steps"):
        schedules.wsd(1.0, 100, warmup_steps=90, decay_steps=20)
    with pytest.raises(ValueError, match="not both"):
        schedules.wsd(1.0, 100, decay_steps=10, decay_fraction=0.1)
    with pytest.raises(ValueError, match="decay_fraction must lie in"):
        schedules.wsd(1.0, 100, decay_fraction=1.5)
    with pytest.raises(ValueError, match="transition_begin must be >= 0"):
        schedules.linear_schedule(1.0, 0.0, 10, transition_begin=-1)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.linear_decay(1.0, 0)
