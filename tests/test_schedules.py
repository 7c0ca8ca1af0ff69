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
