"""Every DPO loss type against its published formula, written out here in float64.

The references below are built from the papers' formulas (and TRL 1.x's
definitions where the papers leave a choice), from ``exp``, ``log1p``, ``clamp``
and Python sorting only: no call into ``minillm_func``. Each test compares the
loss and its gradient w.r.t. the policy log-probs at 1e-12.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func.losses import DPO_LOSS_TYPES
from strategies import dpo_logps, splits

torch.set_num_threads(1)

# TRL 1.x DPOConfig.loss_type's choices, plus sigmoid_norm (TRL 1.7); simpo is our own (TRL's CPO trainer).
TRL_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SMOOTHED = {"sigmoid": 1.0, "simpo": 1.0, "aot": 1.0, "aot_unpaired": 1.0, "robust": 0.45, "exo_pair": 0.9}
SCORED = ("sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_down",
          "discopop", "sigmoid_norm")  # the types TRL feeds the f-divergence scores
ADDITIVE = tuple(t for t in DPO_LOSS_TYPES if t not in ("aot", "aot_unpaired"))
betas = st.floats(0.01, 5.0)
TOL = dict(rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the published formulas


def logsig(x):
    """log sigmoid(x) = min(x, 0) - log(1 + e^{-|x|}), never overflowing."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


def sig(x):
    return torch.exp(logsig(x))


def score(r, f, alpha):
    """f'(u) at u = e^r, its constant dropped (f-DPO, Wang et al. 2023; TRL 1.x's convention for alpha)."""
    if f == "forward_kl":  # f(u) = -log u: f'(u) = -1/u
        return -torch.exp(-r)
    if f == "js_divergence":  # f'(u) = log(2u / (1 + u))
        return torch.log(torch.exp(r) / (1 + torch.exp(r)))
    if f == "alpha_divergence":  # f'(u) = (u^(alpha-1) - 1) / (alpha - 1)
        return torch.exp(r) ** (alpha - 1) / (alpha - 1)
    return r  # reverse KL, f(u) = u log u: f'(u) = log u + 1


def sorted_by_value(x):
    """x reordered ascending by Python's sort (differentiable: it is only indexing)."""
    order = sorted(range(len(x)), key=lambda i: x[i].item())
    return x[torch.tensor(order, dtype=torch.long)]


def published(t, pc, pr, rc, rr, nc, nr, *, beta, eps=0.0, gamma=0.5, tau=0.05, delta=0.0,
              f="reverse_kl", alpha=0.5):
    """Per-pair losses [P] of loss type ``t`` from its paper's formula."""
    nll = lambda x: -logsig(x)  # noqa: E731
    cdpo = lambda x: (1 - eps) * nll(x) + eps * nll(-x)  # noqa: E731  conservative DPO (Mitchell 2023)
    nc, nr = nc.double(), nr.double()
    if t == "sft":  # RPO's NLL term, per token of the chosen reply
        return -pc / nc
    if t == "simpo":
        return cdpo(beta * (pc / nc - pr / nr) - gamma)
    r_w, r_l = pc - rc, pr - rr
    if t == "aot":  # sorted policy margins vs sorted reference margins
        return cdpo(beta * (sorted_by_value(pc - pr) - sorted_by_value(rc - rr)))
    if t == "aot_unpaired":
        return cdpo(beta * (sorted_by_value(r_w) - sorted_by_value(r_l)))
    if t == "apo_zero":  # APO eq. 7
        return (1 - sig(beta * r_w)) + sig(beta * r_l)
    u_w, u_l = score(r_w, f, alpha), score(r_l, f, alpha)
    z = beta * (u_w - u_l)
    return {
        "sigmoid": lambda: cdpo(z),
        "robust": lambda: ((1 - eps) * nll(z) - eps * nll(-z)) / (1 - 2 * eps),
        "ipo": lambda: (u_w / nc - u_l / nr - 1 / (2 * beta)) ** 2,
        "hinge": lambda: torch.clamp(1 - z, min=0.0),
        # EXO eq. 16: KL(q || p) with q = (sigma(z), sigma(-z)), p = (1 - eps, eps)
        "exo_pair": lambda: sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps)),
        "nca_pair": lambda: -logsig(beta * u_w) - 0.5 * logsig(-beta * u_w) - 0.5 * logsig(-beta * u_l),
        "bco_pair": lambda: -logsig(beta * u_w - delta) - logsig(-(beta * u_l - delta)),
        "sppo_hard": lambda: (u_w - 1 / (2 * beta)) ** 2 + (u_l + 1 / (2 * beta)) ** 2,
        "apo_down": lambda: sig(beta * r_w) + (1 - sig(z)),  # APO eq. 8
        # DiscoPOP eq. 5: a sigma(z / tau)-weighted blend of the logistic and the exponential loss
        "discopop": lambda: (1 - sig(z / tau)) * nll(z) + sig(z / tau) * torch.exp(-z),
        "sigmoid_norm": lambda: nll(beta * (u_w / nc - u_l / nr)),
    }[t]()


def published_rewards(t, d, beta, reference=True):
    pc, pr, rc, rr, nc, nr = (d[k] for k in ("pc", "pr", "rc", "rr", "nc", "nr"))
    if t == "simpo":
        return beta * pc / nc, beta * pr / nr
    if not reference:
        return beta * pc, beta * pr
    if t in ("ipo", "sigmoid_norm"):
        return beta * (pc - rc) / nc, beta * (pr - rr) / nr
    return beta * (pc - rc), beta * (pr - rr)


def ours(d, **kw):
    refs = (None, None) if kw.get("loss_type") == "simpo" else (d["rc"], d["rr"])
    return mf.dpo_loss(d["pc"], d["pr"], *refs, chosen_counts=d["nc"], rejected_counts=d["nr"], **kw)


def loss_and_grads(fn, d):
    """fn(d with leaf pc, pr) -> scalar; returns (loss, d loss / d pc, d loss / d pr)."""
    pc, pr = d["pc"].clone().requires_grad_(True), d["pr"].clone().requires_grad_(True)
    loss = fn(dict(d, pc=pc, pr=pr))
    return (loss.detach(), *torch.autograd.grad(loss, (pc, pr), allow_unused=True, materialize_grads=True))


def hyper(t, data, max_beta=5.0):
    """Drawn keyword arguments for type ``t``: beta, and smoothing / gamma / tau / delta where they apply."""
    kw = dict(beta=data.draw(st.floats(0.01, max_beta), label="beta"))
    if t in SMOOTHED:
        kw["eps"] = data.draw(st.floats(1e-3 if t == "exo_pair" else 0.0, SMOOTHED[t]), label="eps")
    if t == "simpo":
        kw["gamma"] = data.draw(st.floats(0.0, 2.0), label="gamma")
    if t == "discopop":
        kw["tau"] = data.draw(st.sampled_from([0.05, 0.5, 2.0]), label="tau")
    if t == "bco_pair":
        kw["delta"] = data.draw(st.floats(-1.0, 1.0), label="delta")
    return kw


def as_ours(t, kw):
    """The published() keywords under dpo_loss's names."""
    names = dict(eps="label_smoothing", tau="discopop_tau", delta="bco_delta", f="f_divergence_type",
                 alpha="f_alpha_divergence_coef")
    out = {names.get(k, k): v for k, v in kw.items()}
    if "bco_delta" in out:
        out["bco_delta"] = torch.tensor(out["bco_delta"], dtype=torch.float64)
    return dict(out, loss_type=t)


def check_against_published(t, d, kw):
    P = d["pc"].shape[0]
    want = loss_and_grads(lambda e: published(t, *(e[k] for k in ("pc", "pr", "rc", "rr", "nc", "nr")),
                                              **kw).sum() / P, d)
    got = loss_and_grads(lambda e: ours(e, **as_ours(t, kw))[0], d)
    for name, g, w in zip(("loss", "d/d chosen", "d/d rejected"), got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{t} {name}: {m}")


# --------------------------------------------------------------------------- each type == its formula


def test_every_trl_type_is_offered():
    assert set(TRL_TYPES) | {"simpo"} == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@given(d=dpo_logps(), data=st.data())
def test_loss_gradients_and_metrics_equal_the_published_formula(loss_type, d, data):
    kw = hyper(loss_type, data)
    check_against_published(loss_type, d, kw)
    _, metrics = ours(d, **as_ours(loss_type, kw))
    r_w, r_l = published_rewards(loss_type, d, kw["beta"])
    want = {"rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(), "rewards/margins": (r_w - r_l).mean(),
            "rewards/accuracies": (r_w > r_l).double().mean(), "rewards/ties": (r_w == r_l).double().mean(),
            "logps/chosen": d["pc"].mean(), "logps/rejected": d["pr"].mean()}
    assert metrics.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(metrics[k], v, **TOL, msg=lambda m: f"{loss_type} {k}: {m}")


@pytest.mark.parametrize("loss_type", SCORED)
@given(d=dpo_logps(), data=st.data(), f=st.sampled_from(["forward_kl", "js_divergence", "alpha_divergence"]),
       alpha=st.floats(-1.0, 3.0).filter(lambda a: abs(a - 1) >= 0.25))
def test_f_divergence_scores_equal_the_published_formula(loss_type, d, data, f, alpha):
    """Log-probs scaled into [-2, 0] and beta <= 1 keep beta * score within exp's range (|.| < 700)."""
    d = dict(d, **{k: d[k] / 10 for k in ("pc", "pr", "rc", "rr")})
    check_against_published(loss_type, d, dict(hyper(loss_type, data, max_beta=1.0), f=f, alpha=alpha))


@given(dpo_logps(), betas, st.sampled_from(SCORED))
def test_alpha_divergence_at_one_is_reverse_kl(d, beta, loss_type):
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=0.1 if loss_type == "exo_pair" else 0.0)
    assert torch.equal(ours(d, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0, **kw)[0],
                       ours(d, **kw)[0])


def test_alpha_divergence_caps_the_exponent_at_80_as_trl():
    """(alpha - 1) r = 2 * 60 = 120 is capped at 80: the score is e^80 / 2, finite, with zero gradient."""
    pc = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-60.0], dtype=torch.float64)
    loss, _ = mf.dpo_loss(pc, ref, ref, ref, beta=1e-35, loss_type="sppo_hard",
                          f_divergence_type="alpha_divergence", f_alpha_divergence_coef=3.0)
    u_w, u_l = math.exp(80) / 2, 1 / 2
    assert math.isclose(loss.item(), (u_w - 0.5e35) ** 2 + (u_l + 0.5e35) ** 2, rel_tol=1e-12)
    assert torch.autograd.grad(loss, pc)[0].item() == 0.0


# --------------------------------------------------------------------------- properties by family

AT_REFERENCE = {  # per-pair loss while the policy equals the reference (every log-ratio 0)
    "sigmoid": lambda b, e: math.log(2), "robust": lambda b, e: math.log(2), "aot": lambda b, e: math.log(2),
    "aot_unpaired": lambda b, e: math.log(2), "sigmoid_norm": lambda b, e: math.log(2),
    "ipo": lambda b, e: 1 / (4 * b * b), "hinge": lambda b, e: 1.0, "sppo_hard": lambda b, e: 1 / (2 * b * b),
    "exo_pair": lambda b, e: math.log(0.5) - 0.5 * math.log((1 - e) * e),
    "nca_pair": lambda b, e: 2 * math.log(2), "bco_pair": lambda b, e: 2 * math.log(2),
    "apo_zero": lambda b, e: 1.0, "apo_down": lambda b, e: 1.0, "discopop": lambda b, e: (1 + math.log(2)) / 2,
}


@pytest.mark.parametrize("loss_type", sorted(AT_REFERENCE))
@given(d=dpo_logps(), beta=betas, eps=st.floats(0.001, 0.45))
def test_at_the_reference_each_loss_is_its_closed_form_constant(loss_type, d, beta, eps):
    eps = eps if loss_type in SMOOTHED else 0.0
    d = dict(d, pc=d["rc"].clone(), pr=d["rr"].clone())
    want = AT_REFERENCE[loss_type](beta, eps)
    if loss_type in ("sigmoid", "aot", "aot_unpaired"):
        want = math.log(2)  # the two smoothing terms are both log 2
    loss, m = ours(d, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert math.isclose(loss.item(), want, rel_tol=1e-12), (loss.item(), want)
    assert m["rewards/ties"].item() == 1.0


MONOTONE = ("sigmoid", "robust", "sigmoid_norm", "simpo", "bco_pair", "apo_zero", "hinge", "aot", "aot_unpaired")


@pytest.mark.parametrize("loss_type", MONOTONE)
@given(d=dpo_logps(), beta=betas, eps=st.floats(0.0, 0.45), shift=st.floats(0.01, 5.0))
def test_raising_chosen_or_lowering_rejected_never_raises_the_loss(loss_type, d, beta, eps, shift):
    """The Bradley-Terry family is monotone in the margin (conservative DPO only without smoothing:
    it is minimised at a finite margin, log((1-eps)/eps) / beta)."""
    eps = eps if loss_type == "robust" else 0.0
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
    base, g_w, g_l = loss_and_grads(lambda e: ours(e, **kw)[0], d)
    assert torch.all(g_w <= 0) and torch.all(g_l >= 0)
    assert ours(dict(d, pc=d["pc"] + shift), **kw)[0] <= base
    assert ours(dict(d, pr=d["pr"] - shift), **kw)[0] <= base


@given(dpo_logps(), betas, st.floats(-2.0, 2.0).filter(lambda x: abs(x) > 1e-3))
def test_sppo_hard_is_minimised_at_plus_minus_one_over_two_beta(d, beta, off):
    half = 1 / (2 * beta)
    at_min = dict(d, pc=d["rc"] + half, pr=d["rr"] - half)
    assert ours(at_min, beta=beta, loss_type="sppo_hard")[0].item() < 1e-20
    moved = ours(dict(at_min, pc=at_min["pc"] + off), beta=beta, loss_type="sppo_hard")[0].item()
    assert math.isclose(moved, off**2, rel_tol=1e-6)


@given(dpo_logps(), betas, st.floats(1e-3, 0.9))
def test_exo_is_a_kl_divergence_zero_at_the_smoothed_label(d, beta, eps):
    """KL(q || p) >= 0, and 0 where sigma(beta h) = 1 - eps, i.e. beta h = log((1-eps)/eps)."""
    kw = dict(beta=beta, loss_type="exo_pair", label_smoothing=eps)
    assert ours(d, **kw)[0].item() >= -1e-15
    h = math.log((1 - eps) / eps) / beta
    at_label = dict(d, pc=d["rc"] + (d["pr"] - d["rr"]) + h)
    assert abs(ours(at_label, **kw)[0].item()) < 1e-12


@given(dpo_logps(), betas, st.floats(0.05, 2.0))
def test_nca_chosen_term_is_minimised_at_log2_over_beta(d, beta, off):
    """d/du [-log s(bu) - 1/2 log s(-bu)] = b(3/2 s(bu) - 1) vanishes at s(bu) = 2/3, bu = log 2."""
    kw = dict(beta=beta, loss_type="nca_pair")
    at = dict(d, pc=d["rc"] + math.log(2) / beta)
    best = ours(at, **kw)[0]
    for sign in (1, -1):
        assert ours(dict(at, pc=at["pc"] + sign * off), **kw)[0] > best
    _, _, g_l = loss_and_grads(lambda e: ours(e, **kw)[0], d)
    assert torch.all(g_l > 0)  # the rejected reply is always pushed down


@given(dpo_logps(), betas, st.floats(-3.0, 3.0))
def test_bco_delta_shifts_both_rewards(d, beta, delta):
    shifted = dict(d, pc=d["pc"] + delta / beta, pr=d["pr"] + delta / beta)
    delta_t = torch.tensor(delta, dtype=torch.float64)
    torch.testing.assert_close(ours(shifted, beta=beta, loss_type="bco_pair", bco_delta=delta_t)[0],
                               ours(d, beta=beta, loss_type="bco_pair")[0], rtol=1e-10, atol=1e-12)


def test_bco_delta_is_a_constant():
    x = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    delta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss, _ = mf.dpo_loss(x, x - 1, x - 0.5, x - 0.2, loss_type="bco_pair", bco_delta=delta)
    assert not loss.requires_grad


@given(dpo_logps(), betas, st.floats(0.01, 5.0))
def test_apo_down_pushes_both_replies_down(d, beta, c):
    """Lowering chosen and rejected by the same amount keeps the margin and lowers sigma(beta r_w)."""
    kw = dict(beta=beta, loss_type="apo_down")
    assert ours(dict(d, pc=d["pc"] - c, pr=d["pr"] - c), **kw)[0] <= ours(d, **kw)[0]
    shift = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ours(dict(d, pc=d["pc"] + shift, pr=d["pr"] + shift), **kw)[0], shift)
    saturated = bool((beta * (d["pc"] - d["rc"])).min() > 30)  # sigma'(x) = sigma(x)(1 - sigma(x)) rounds to 0
    assert g > 0 or (saturated and g == 0)


@given(dpo_logps(), betas, st.sampled_from([0.05, 0.5, 2.0]))
def test_discopop_blends_the_logistic_and_the_exponential_loss(d, beta, tau):
    z = beta * ((d["pc"] - d["rc"]) - (d["pr"] - d["rr"]))
    logistic, exponential = -logsig(z), torch.exp(-z)
    P = z.shape[0]
    loss = ours(d, beta=beta, loss_type="discopop", discopop_tau=tau)[0]
    assert torch.minimum(logistic, exponential).sum() / P * (1 - 1e-12) <= loss
    assert loss <= torch.maximum(logistic, exponential).sum() / P * (1 + 1e-12)


def test_discopop_stays_finite_where_the_exponential_overflows():
    """z = -1000: sigma(z/tau) e^{-z} is 0 * inf written naively; the loss is the logistic term, 1000."""
    x = torch.zeros(1, dtype=torch.float64)
    loss, _ = mf.dpo_loss(x - 1000, x, x, x, beta=1.0, loss_type="discopop")
    assert math.isclose(loss.item(), 1000.0, rel_tol=1e-12)


@given(dpo_logps(), betas, st.permutations(range(6)), st.permutations(range(6)))
def test_aot_depends_on_the_batch_only_through_sorted_margins(d, beta, perm_a, perm_b):
    """aot: any reordering of the pairs; aot_unpaired: the chosen and the rejected sides reordered apart."""
    P = d["pc"].shape[0]
    a = torch.tensor([i for i in perm_a if i < P])
    b = torch.tensor([i for i in perm_b if i < P])
    for t, moved in (("aot", {k: v[a] for k, v in d.items()}),
                     ("aot_unpaired", dict(d, pc=d["pc"][a], rc=d["rc"][a], pr=d["pr"][b], rr=d["rr"][b]))):
        torch.testing.assert_close(ours(moved, beta=beta, loss_type=t)[0], ours(d, beta=beta, loss_type=t)[0],
                                   **TOL)


@given(dpo_logps(max_pairs=1), betas, st.floats(0.0, 1.0))
def test_aot_of_one_pair_is_conservative_dpo(d, beta, eps):
    for t in ("aot", "aot_unpaired"):
        torch.testing.assert_close(ours(d, beta=beta, loss_type=t, label_smoothing=eps)[0],
                                   ours(d, beta=beta, label_smoothing=eps)[0], **TOL)


def test_aot_is_batch_level_not_additive():
    """Two pairs whose policy and reference margins sort in opposite orders: the sorted pairing
    differs from the per-pair one, so summing one-pair calls (num_pairs=2) is not the batch loss."""
    z = torch.zeros(2, dtype=torch.float64)
    pc, rc = torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.tensor([-3.0, -1.0], dtype=torch.float64)
    full = mf.dpo_loss(pc, z, rc, z, loss_type="aot")[0]
    split = sum(mf.dpo_loss(pc[i:i + 1], z[:1], rc[i:i + 1], z[:1], loss_type="aot", num_pairs=2)[0]
                for i in range(2))
    assert abs(full.item() - split.item()) > 1e-3


@given(dpo_logps(), betas, st.integers(1, 4))
def test_sigmoid_norm_is_dpo_on_per_token_log_ratios(d, beta, k):
    """Counts of 1 give plain DPO; repeating a reply k times (k x log-probs, k x tokens) changes nothing."""
    ones = dict(d, nc=torch.ones_like(d["nc"]), nr=torch.ones_like(d["nr"]))
    torch.testing.assert_close(ours(ones, beta=beta, loss_type="sigmoid_norm")[0], ours(ones, beta=beta)[0], **TOL)
    longer = dict(d, pc=d["pc"] * k, rc=d["rc"] * k, nc=d["nc"] * k)
    torch.testing.assert_close(ours(longer, beta=beta, loss_type="sigmoid_norm")[0],
                               ours(d, beta=beta, loss_type="sigmoid_norm")[0], rtol=1e-12, atol=1e-13)


@given(dpo_logps(), betas)
def test_sft_reads_only_the_chosen_reply(d, beta):
    loss, g_w, g_l = loss_and_grads(
        lambda e: mf.dpo_loss(e["pc"], e["pr"], None, None, beta=beta, loss_type="sft", chosen_counts=e["nc"])[0], d)
    P = d["pc"].shape[0]
    torch.testing.assert_close(loss, (-d["pc"] / d["nc"]).mean(), **TOL)
    torch.testing.assert_close(g_w, -1 / (P * d["nc"].double()), **TOL)
    assert torch.all(g_l == 0)
    _, m = mf.dpo_loss(d["pc"], d["pr"], None, None, beta=beta, loss_type="sft", chosen_counts=d["nc"])
    torch.testing.assert_close(m["rewards/chosen"], beta * d["pc"].mean(), **TOL)  # no reference: beta * s


# --------------------------------------------------------------------------- combinations and accumulation


def eps_for(types):
    """A smoothing every type in ``types`` accepts: 0.1 if any takes it (exo_pair needs > 0), else 0."""
    return 0.1 if any(t in SMOOTHED for t in types) else 0.0


@given(dpo_logps(), betas, st.lists(st.sampled_from(DPO_LOSS_TYPES), min_size=1, max_size=3),
       st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3))
def test_loss_weights_combine_linearly(d, beta, types, weights):
    """loss([a, b, ...], [w_a, w_b, ...]) = sum_k w_k loss(k); metrics are those of the first non-sft type."""
    weights = weights[:len(types)]
    eps = eps_for(types)
    each = [ours(dict(d), beta=beta, loss_type=t, label_smoothing=eps if t in SMOOTHED else 0.0)
            for t in types]
    loss, metrics = mf.dpo_loss(d["pc"], d["pr"], d["rc"], d["rr"], beta=beta, loss_type=types, loss_weights=weights,
                                label_smoothing=eps, chosen_counts=d["nc"], rejected_counts=d["nr"])
    want = sum(w * l for w, (l, _) in zip(weights, each))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12 * sum(abs(l.item()) + 1 for l, _ in each))
    first = next((i for i, t in enumerate(types) if t != "sft"), 0)
    for k, v in each[first][1].items():
        torch.testing.assert_close(metrics[k], v, **TOL)


@given(dpo_logps(), betas)
def test_rpo_is_dpo_plus_the_per_token_nll(d, beta):
    loss, _ = ours(d, beta=beta, loss_type=["sigmoid", "sft"])
    torch.testing.assert_close(loss, ours(d, beta=beta)[0] + (-d["pc"] / d["nc"]).mean(), **TOL)


@pytest.mark.parametrize("loss_type", ADDITIVE)
@given(d=dpo_logps(), beta=betas, data=st.data())
def test_sum_over_num_pairs_accumulates_exactly(loss_type, d, beta, data):
    """Every type but aot / aot_unpaired: splitting the pairs and passing num_pairs=P gives the full loss."""
    P = d["pc"].shape[0]
    cuts = data.draw(splits(P))
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps_for([loss_type]))
    full = ours(d, **kw)[0]
    parts = sum(ours({k: v[a:b] for k, v in d.items()}, num_pairs=P, **kw)[0] for a, b in zip(cuts, cuts[1:]))
    torch.testing.assert_close(parts, full, **TOL)


# --------------------------------------------------------------------------- errors


def test_bad_arguments_raise_one_line_errors_saying_what_to_pass():
    x, n = torch.zeros(3), torch.ones(3)
    cases = [
        (dict(loss_type="dpo_norm"), "unknown loss_type='dpo_norm'"),
        (dict(loss_type=["sigmoid", "kto"]), "unknown loss_type='kto'"),
        (dict(loss_type=[]), "non-empty list"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "one weight per type"),
        (dict(loss_type="sigmoid", loss_weights=[1.0, 2.0]), "one weight per type"),
        (dict(loss_type="exo_pair"), r"\(0, 1\) for loss_type='exo_pair' \(the EXO paper uses 1e-3\)"),
        (dict(loss_type="nca_pair", label_smoothing=0.1), "label_smoothing applies to"),
        (dict(loss_type=["hinge", "sft"], label_smoothing=0.1), "leave it at 0.0"),
        (dict(f_divergence_type="kl"), "unknown f_divergence_type"),
        (dict(loss_type=["aot", "sft"], f_divergence_type="js_divergence"), "does not use"),
        (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan")), "finite"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be a positive"),
        (dict(bco_delta=torch.tensor(0.1)), "bco_pair"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            mf.dpo_loss(x, x, x, x, chosen_counts=n, rejected_counts=n, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="chosen_counts= and rejected_counts="):
        mf.dpo_loss(x, x, x, x, loss_type="sigmoid_norm")
    with pytest.raises(ValueError, match="pass chosen_counts="):
        mf.dpo_loss(x, x, None, None, loss_type="sft")
    with pytest.raises(ValueError, match="'nca_pair' needs the reference log-probs"):
        mf.dpo_loss(x, x, None, None, loss_type=["sft", "nca_pair"], chosen_counts=n)
    # the reference-free pair needs no reference
    assert torch.isfinite(mf.dpo_loss(x, x, None, None, loss_type=["simpo", "sft"], chosen_counts=n,
                                      rejected_counts=n)[0])
