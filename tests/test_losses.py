import math

import pytest
import torch
from hypothesis import assume, find, given, settings
from hypothesis import strategies as st

import minillm_func as mf
from strategies import dpo_logps, gen, logits_and_labels, ragged_batches, seeds, splits

IGN = mf.IGNORE_INDEX


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


# --------------------------------------------------------------------------- pretrain / sft


def closed_form_token_logps(logits, labels):
    """``log softmax(z)[y]`` written out in float64: ``z_y - m - log(sum(exp(z - m)))``, ``m = max z``;
    0 where the label is IGNORE_INDEX. No torch loss or log-softmax kernel is involved."""
    z = logits.detach().to(torch.float64)
    m = z.max(-1, keepdim=True).values
    log_norm = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))
    counted = labels != IGN
    target = z.gather(-1, torch.where(counted, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(counted, target - log_norm, torch.zeros((), dtype=torch.float64))


def closed_form_ce(logits, labels, counted):
    """Mean cross-entropy over ``counted`` positions, in float64 from the written-out log-softmax,
    and its gradient w.r.t. the logits, ``(softmax(z) - onehot(y)) / N`` at counted positions, 0 elsewhere."""
    labels = torch.where(counted, labels, IGN)
    n = max(int(counted.sum()), 1)
    loss = -closed_form_token_logps(logits, labels).sum() / n
    z = logits.detach().to(torch.float64)
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    onehot = torch.zeros_like(z).scatter_(-1, labels.clamp_min(0).unsqueeze(-1), 1.0)
    grad = torch.where(counted.unsqueeze(-1), (e / e.sum(-1, keepdim=True) - onehot) / n, 0.0)
    return loss, grad


@given(logits_and_labels())
def test_pretrain_loss_equals_closed_form_cross_entropy(ll):
    logits, labels = ll
    loss, g = grad_of(lambda z: mf.pretrain_loss(z, labels), logits)
    ref_loss, ref_grad = closed_form_ce(logits, labels, labels != IGN)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, ref_grad, rtol=1e-10, atol=1e-14)


@given(logits_and_labels(), st.integers(1, 5), seeds)
def test_appended_padding_changes_neither_loss_nor_gradient(ll, extra, seed):
    logits, labels = ll
    B, T, V = logits.shape
    pad_logits = torch.randn(B, extra, V, generator=gen(seed), dtype=logits.dtype) * 10
    pad_labels = torch.full((B, extra), IGN)
    loss, g = grad_of(lambda z: mf.pretrain_loss(z, labels), logits)
    loss2, g2 = grad_of(lambda z: mf.pretrain_loss(z, torch.cat([labels, pad_labels], 1)),
                        torch.cat([logits, pad_logits], 1))
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2[:, :T], g, rtol=1e-12, atol=1e-12)
    assert torch.all(g2[:, T:] == 0)


@given(logits_and_labels())
def test_ignored_positions_get_exactly_zero_gradient(ll):
    logits, labels = ll
    _, g = grad_of(lambda z: mf.pretrain_loss(z, labels), logits)
    ignored = labels == IGN
    assert torch.all(g[ignored] == 0)
    counted_rows = g[~ignored]
    if counted_rows.numel():  # softmax minus one-hot: every counted row sums to zero and is non-zero
        assert torch.all(counted_rows.abs().sum(-1) > 0)


@given(logits_and_labels(), seeds, st.sampled_from([0.0, 0.5, 1.0]))
def test_sft_masked_loss_equals_closed_form_over_mask_and_counted_labels(ll, seed, keep):
    """Counted: loss_mask true AND label != IGNORE_INDEX. The mask is drawn independently of the
    labels, so it is also true at ignored positions (which must stay uncounted)."""
    logits, labels = ll
    mask = torch.rand(labels.shape, generator=gen(seed)) < keep
    for m in (mask, mask.long()):  # a bool or an integer 0/1 mask
        loss, g = grad_of(lambda z: mf.sft_masked_loss(z, labels, m), logits)
        ref_loss, ref_grad = closed_form_ce(logits, labels, mask & (labels != IGN))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, ref_grad, rtol=1e-10, atol=1e-14)
    n = int((mask & (labels != IGN)).sum())
    torch.testing.assert_close(mf.sft_masked_loss(logits, labels, mask, num_tokens=7) * 7,
                               ref_loss * max(n, 1), rtol=1e-12, atol=1e-12)


@given(logits_and_labels(ignore_rate=1.0), st.booleans())
def test_no_counted_position_gives_zero_loss_and_zero_gradient(ll, sft):
    logits, labels = ll
    fn = (lambda z: mf.sft_masked_loss(z, labels, torch.ones_like(labels, dtype=torch.bool))) if sft else (
        lambda z: mf.pretrain_loss(z, labels))
    loss, g = grad_of(fn, logits)
    assert loss.item() == 0.0 and torch.all(g == 0)


@given(logits_and_labels(min_counted=1), st.integers(1, 50))
def test_explicit_num_tokens_rescales_the_summed_loss(ll, n):
    logits, labels = ll
    count = int((labels != IGN).sum())
    torch.testing.assert_close(mf.pretrain_loss(logits, labels, num_tokens=n) * n,
                               mf.pretrain_loss(logits, labels) * count, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(ll=logits_and_labels(max_len=6, max_vocab=40, min_counted=1, dtype=torch.float32), seed=seeds)
def test_half_precision_logits_are_reduced_in_float32(dtype, ll, seed):
    """Half-precision logits are exact in float64, so the float64 closed form on them is the
    reference; a float32 reduction is within ~1e-6 of it, a half-precision one ~1e-2 off."""
    logits, labels = ll
    half = (logits * 4).to(dtype)  # |z| up to ~80: large enough that a half-precision reduction shows
    mask = torch.rand(labels.shape, generator=gen(seed)) < 0.7
    for loss, counted in ((mf.pretrain_loss(half, labels), labels != IGN),
                          (mf.sft_masked_loss(half, labels, mask), mask & (labels != IGN))):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), closed_form_ce(half, labels, counted)[0], rtol=2e-6, atol=2e-6)
    logps, counts = mf.sequence_logps(half, labels)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), closed_form_token_logps(half, labels).sum(-1), rtol=2e-6, atol=2e-5)


def test_misaligned_shapes_raise_a_clear_error():
    with pytest.raises(ValueError, match="do not line up"):
        mf.pretrain_loss(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        mf.pretrain_loss(torch.randn(2, 5, 7), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="loss_mask"):
        mf.sft_masked_loss(torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-negative"):
        mf.pretrain_loss(torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), num_tokens=-1)


SFT_MODEL = mf.build_model(mf.ModelConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, max_seq_len=8))


@pytest.mark.parametrize("memory", [None, mf.MemoryConfig(chunked_loss=True)], ids=["logits", "chunked"])
@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 8), ignore_rate=st.sampled_from([0.0, 0.4, 1.0]),
       keep=st.sampled_from([0.0, 0.5, 1.0]), mask_dtype=st.sampled_from([torch.bool, torch.long]))
def test_sft_trainer_loss_counts_only_loss_mask_and_counted_labels(memory, seed, B, T, ignore_rate, keep, mask_dtype):
    """``create_trainer("sft").loss_fn`` on a batch with ``loss_mask``: the summed loss and the count
    are the float64 closed form over positions where loss_mask AND labels != IGNORE_INDEX. The
    mask is drawn independently of the labels (true at some ignored positions, false at some
    counted ones), so ignoring either condition changes the result. Logits come from the
    imperative module, not the functional ``apply`` the loss uses; the chunked head (from the last
    hidden state, chunk by chunk) must give the same."""
    g = gen(seed)
    params = SFT_MODEL.init(seed % 1000, dtype=torch.float64)
    ids = torch.randint(0, 11, (B, T), generator=g)
    labels = torch.randint(0, 11, (B, T), generator=g).masked_fill(torch.rand(B, T, generator=g) < ignore_rate, IGN)
    mask = torch.rand(B, T, generator=g) < keep
    batch = {"input_ids": ids, "labels": labels, "loss_mask": mask.to(mask_dtype)}
    loss_sum, (count, _) = mf.create_trainer("sft", SFT_MODEL, memory=memory).loss_fn(params, batch, {})
    counted = mask & (labels != IGN)
    with torch.no_grad():
        logits = SFT_MODEL.to_module(params)(ids)
    want = -closed_form_token_logps(logits, torch.where(counted, labels, IGN)).sum()
    assert int(count) == int(counted.sum())
    torch.testing.assert_close(loss_sum.detach(), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- exact accumulation


def linear_logits(W, feats):
    return feats @ W


@given(ragged_batches(), st.data())
def test_accumulation_with_global_token_count_equals_full_batch(batch, data):
    feats, labels = batch
    cuts = data.draw(splits(feats.shape[0]))
    W = torch.randn(feats.shape[-1], 7, generator=gen(0), dtype=torch.float64)
    n = (labels != IGN).sum()
    full, g_full = grad_of(lambda w: mf.pretrain_loss(linear_logits(w, feats), labels), W)

    def accumulated(w):
        return sum(mf.pretrain_loss(linear_logits(w, feats[a:b]), labels[a:b], num_tokens=n)
                   for a, b in zip(cuts, cuts[1:]))

    acc, g_acc = grad_of(accumulated, W)
    torch.testing.assert_close(acc, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_acc, g_full, rtol=1e-12, atol=1e-12)


def mean_of_means_error(example):
    feats, labels, cuts = example
    W = torch.randn(feats.shape[-1], 7, generator=gen(0), dtype=torch.float64)
    full = mf.pretrain_loss(linear_logits(W, feats), labels)
    parts = [mf.pretrain_loss(linear_logits(W, feats[a:b]), labels[a:b]) for a, b in zip(cuts, cuts[1:])]
    return abs(float(sum(parts) / len(parts) - full))


def test_naive_mean_of_means_is_not_exact():
    """The bug the global normaliser fixes: Hypothesis finds a split where the mean of means is off."""
    examples = ragged_batches().flatmap(lambda b: splits(b[0].shape[0]).map(lambda c: (*b, c)))
    found = find(examples, lambda ex: mean_of_means_error(ex) > 1e-3,
                 settings=settings(max_examples=500, derandomize=True, database=None))
    assert mean_of_means_error(found) > 1e-3


# --------------------------------------------------------------------------- sequence_logps


@given(logits_and_labels())
def test_sequence_logps_sums_target_log_probs(ll):
    logits, labels = ll
    logps, counts = mf.sequence_logps(logits, labels)
    torch.testing.assert_close(logps, closed_form_token_logps(logits, labels).sum(-1), rtol=1e-12, atol=1e-12)
    assert torch.equal(counts, (labels != IGN).sum(-1))
    assert torch.all(logps <= 0)
    _, g = grad_of(lambda z: mf.sequence_logps(z, labels)[0].sum(), logits)
    assert torch.all(g[labels == IGN] == 0)


# --------------------------------------------------------------------------- DPO


def dpo(d, **kw):
    return mf.dpo_loss(d["pc"], d["pr"], d["rc"], d["rr"], chosen_counts=d["nc"], rejected_counts=d["nr"], **kw)


betas = st.floats(0.01, 5.0)


def softplus(x: float) -> float:
    """log(1 + e^x) in Python floats, written so that it never overflows."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def published_dpo(d, loss_type, beta, eps, gamma):
    """The DPO family's published formulas (REFERENCE.md; TRL's DPO/CPO trainers), pair by pair
    in Python floats: ``(mean loss, metrics)``. Rewards as the ``dpo_loss`` docstring names them."""
    losses, r_w, r_l = [], [], []
    for pc, pr, rc, rr, nc, nr in zip(*(d[k].tolist() for k in ("pc", "pr", "rc", "rr", "nc", "nr"))):
        c, r = {"simpo": (pc / nc, pr / nr), "ipo": ((pc - rc) / nc, (pr - rr) / nr)}.get(
            loss_type, (pc - rc, pr - rr))
        h = c - r
        if loss_type == "sigmoid":  # conservative DPO: (1-eps) softplus(-beta h) + eps softplus(beta h)
            loss = (1 - eps) * softplus(-beta * h) + eps * softplus(beta * h)
        elif loss_type == "robust":
            loss = ((1 - eps) * softplus(-beta * h) - eps * softplus(beta * h)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            loss = max(0.0, 1 - beta * h)
        else:  # simpo: x = beta (s_w/n_w - s_l/n_l) - gamma, smoothed like conservative DPO
            x = beta * h - gamma
            loss = (1 - eps) * softplus(-x) + eps * softplus(x)
        losses.append(loss)
        r_w.append(beta * c)
        r_l.append(beta * r)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(losses), {
        "rewards/chosen": mean(r_w), "rewards/rejected": mean(r_l),
        "rewards/margins": mean([a - b for a, b in zip(r_w, r_l)]),
        "rewards/accuracies": mean([float(a > b) for a, b in zip(r_w, r_l)]),
        "rewards/ties": mean([float(a == b) for a, b in zip(r_w, r_l)]),
        "logps/chosen": mean(d["pc"].tolist()), "logps/rejected": mean(d["pr"].tolist())}


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo"])
@given(d=dpo_logps(), beta=betas, smoothing=st.floats(0.05, 1.0), gamma=st.floats(0.0, 2.0))
def test_dpo_loss_and_metrics_equal_the_published_formulas(loss_type, d, beta, smoothing, gamma):
    """Label smoothing is drawn strictly positive where it applies (conservative DPO, robust DPO,
    SimPO), so the sign and weight of the smoothing term are pinned, not only the eps = 0 case."""
    eps = {"robust": 0.45 * smoothing, "ipo": 0.0, "hinge": 0.0}.get(loss_type, smoothing)
    refs = (None, None) if loss_type == "simpo" else (d["rc"], d["rr"])
    pc, pr = d["pc"].clone().requires_grad_(True), d["pr"].clone().requires_grad_(True)
    loss, metrics = mf.dpo_loss(pc, pr, *refs, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                gamma=gamma, chosen_counts=d["nc"], rejected_counts=d["nr"])
    assert loss.requires_grad and not any(v.requires_grad for v in metrics.values())  # metrics are detached
    want_loss, want_metrics = published_dpo(d, loss_type, beta, eps, gamma)
    # rel 1e-9: F.softplus returns x itself for x > 20 (its threshold), off by log1p(e^-x) < 2.1e-9
    # absolute, under 1e-10 relative; a wrong sign or weight of a term is off by O(eps * beta * h).
    assert math.isclose(loss.item(), want_loss, rel_tol=1e-9, abs_tol=1e-12)
    assert metrics.keys() == want_metrics.keys()
    for k, want in want_metrics.items():
        assert math.isclose(metrics[k].item(), want, rel_tol=1e-12, abs_tol=1e-12), k


@given(dpo_logps(), betas)
def test_sigmoid_at_policy_equal_reference_is_log2(d, beta):
    loss, m = mf.dpo_loss(d["pc"], d["pr"], d["pc"].clone(), d["pr"].clone(), beta=beta)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-12)
    assert m["rewards/accuracies"].item() == 0.0  # ties count as wrong
    assert m["rewards/ties"].item() == 1.0  # ... and are reported as ties


@given(dpo_logps(), betas, st.floats(0.1, 10.0))
def test_sigmoid_depends_only_on_beta_times_margin(d, beta, k):
    """Scaling the log-ratio margin by k and beta by 1/k leaves the loss unchanged."""
    scaled = dict(d, pc=d["pc"] * k, pr=d["pr"] * k, rc=d["rc"] * k, rr=d["rr"] * k)
    torch.testing.assert_close(dpo(scaled, beta=beta / k)[0], dpo(d, beta=beta)[0], rtol=1e-9, atol=1e-12)


@given(dpo_logps(), betas, st.sampled_from(["sigmoid", "robust", "ipo", "hinge", "simpo"]))
def test_swapping_chosen_and_rejected_flips_the_margin(d, beta, loss_type):
    swapped = dict(d, pc=d["pr"], pr=d["pc"], rc=d["rr"], rr=d["rc"], nc=d["nr"], nr=d["nc"])
    _, m = dpo(d, beta=beta, loss_type=loss_type)
    _, ms = dpo(swapped, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(ms["rewards/margins"], -m["rewards/margins"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ms["rewards/chosen"], m["rewards/rejected"], rtol=0, atol=0)


@given(dpo_logps(), betas)
def test_zero_smoothing_and_robust_zero_equal_sigmoid(d, beta):
    base = dpo(d, beta=beta)[0]
    assert torch.equal(dpo(d, beta=beta, label_smoothing=0.0)[0], base)
    torch.testing.assert_close(dpo(d, beta=beta, loss_type="robust")[0], base, rtol=1e-12, atol=0)


@given(dpo_logps(), betas, st.floats(0.0, 0.45))
def test_robust_loss_is_unbiased(d, beta, eps):
    """Under flips with rate eps, E[robust] = (1-eps) l(h) + eps l(-h) equals the clean sigmoid loss."""
    flipped = dict(d, pc=d["pr"], pr=d["pc"], rc=d["rr"], rr=d["rc"])
    kw = dict(beta=beta, loss_type="robust", label_smoothing=eps)
    expected = (1 - eps) * dpo(d, **kw)[0] + eps * dpo(flipped, **kw)[0]
    torch.testing.assert_close(expected, dpo(d, beta=beta)[0], rtol=1e-9, atol=1e-12)


@given(dpo_logps(), betas, st.floats(-2.0, 2.0).filter(lambda x: abs(x) > 1e-3))
def test_ipo_minimum_is_at_margin_one_over_two_beta(d, beta, delta):
    """Set the per-token margin exactly to 1/(2 beta): loss 0 there, and larger anywhere else."""
    n_c, n_r = d["nc"].double(), d["nr"].double()
    target = 1 / (2 * beta)
    at_min = dict(d, pc=d["rc"] + target * n_c, pr=d["rr"])
    loss_min, _ = dpo(at_min, beta=beta, loss_type="ipo")
    assert loss_min.item() < 1e-18
    off = dict(at_min, pc=at_min["pc"] + delta * n_c)
    loss_off, _ = dpo(off, beta=beta, loss_type="ipo")
    assert math.isclose(loss_off.item(), delta**2, rel_tol=1e-6)


@given(dpo_logps(), betas)
def test_hinge_is_zero_with_zero_gradient_beyond_the_margin(d, beta):
    h = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    pc = d["pc"].clone().requires_grad_(True)
    loss, _ = mf.dpo_loss(pc, d["pr"], d["rc"], d["rr"], beta=beta, loss_type="hinge")
    (g,) = torch.autograd.grad(loss, pc)
    beyond = beta * h >= 1
    assert torch.all(g[beyond] == 0)
    assert torch.all(g[beta * h < 1] < 0)  # below the margin it still pushes chosen up
    if beyond.all():
        assert loss.item() == 0.0


@given(dpo_logps(), betas, st.floats(0.0, 2.0), logits_and_labels(max_batch=2, min_counted=1), st.integers(2, 3))
def test_simpo_is_unchanged_when_per_token_logps_are_repeated(d, beta, gamma, ll, reps):
    logits, labels = ll
    s, n = mf.sequence_logps(logits, labels)
    s_rep, n_rep = mf.sequence_logps(logits.repeat(1, reps, 1), labels.repeat(1, reps))
    P = s.shape[0]
    kw = dict(beta=beta, gamma=gamma, loss_type="simpo")
    other, other_n = d["pr"][:1].expand(P), d["nr"][:1].expand(P)
    base = mf.dpo_loss(s, other, None, None, chosen_counts=n, rejected_counts=other_n, **kw)[0]
    rep = mf.dpo_loss(s_rep, other, None, None, chosen_counts=n_rep, rejected_counts=other_n, **kw)[0]
    torch.testing.assert_close(rep, base, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(s_rep, s) or torch.all(s == 0)  # the sums did change


def test_rewards_ties_on_constructed_pairs():
    """Closed form: pairs 0 and 2 tie exactly; pair 3 is ranked right, and so is pair 4, by
    2**-40 nats only (not a tie: ties are exact equality); pair 1 is ranked wrong."""
    pc = torch.tensor([-1.0, -2.0, -3.0, -0.5, -1.0], dtype=torch.float64)
    pr = torch.tensor([-1.0, -1.0, -3.0, -2.5, -1.0 - 2.0**-40], dtype=torch.float64)
    ref = torch.full((5,), -1.5, dtype=torch.float64)
    n = torch.tensor([2, 4, 2, 4, 2])
    for loss_type in ("sigmoid", "ipo", "simpo"):
        rc = rr = None if loss_type == "simpo" else ref
        _, m = mf.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, chosen_counts=n, rejected_counts=n)
        assert m["rewards/ties"].item() == 2 / 5, loss_type
        assert m["rewards/accuracies"].item() == 2 / 5, loss_type
        assert m["rewards/ties"].dtype == torch.float64 and not m["rewards/ties"].requires_grad


@given(st.lists(st.sampled_from(["tie", "right", "wrong"]), min_size=1, max_size=8), betas,
       st.sampled_from(["sigmoid", "robust", "ipo", "hinge", "simpo"]), seeds)
def test_rewards_ties_is_the_share_of_exactly_tied_pairs(kinds, beta, loss_type, seed):
    """Build each pair as a tie (same log-probs and counts on both sides) or as ranked
    right / wrong by a margin of at least one nat; compare with the share counted in Python."""
    P, g = len(kinds), gen(seed)
    pc = -torch.rand(P, generator=g, dtype=torch.float64) * 20
    rc = -torch.rand(P, generator=g, dtype=torch.float64) * 20
    nc = torch.randint(1, 9, (P,), generator=g)
    gap = 1 + torch.rand(P, generator=g, dtype=torch.float64)
    sign = torch.tensor([{"tie": 0.0, "right": -1.0, "wrong": 1.0}[k] for k in kinds], dtype=torch.float64)
    pr = pc + sign * gap  # rejected log-prob below chosen's when "right"
    ref = (None, None) if loss_type == "simpo" else (rc, rc.clone())
    _, m = mf.dpo_loss(pc, pr, *ref, beta=beta, loss_type=loss_type, chosen_counts=nc, rejected_counts=nc.clone())
    assert m["rewards/ties"].item() == kinds.count("tie") / P
    assert m["rewards/accuracies"].item() == kinds.count("right") / P


@given(dpo_logps(), betas, st.sampled_from(["sigmoid", "robust", "ipo", "hinge", "simpo"]), st.data())
def test_accuracies_ties_and_wrong_rankings_add_up_to_one(d, beta, loss_type, data):
    """Every pair is ranked right, tied or ranked wrong: the three shares sum to 1.
    Some pairs are made exact ties (policy == reference on both sides) so all three occur."""
    tied = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(d["pc"]), max_size=len(d["pc"]))))
    d = dict(d, pr=torch.where(tied, d["pc"], d["pr"]), rr=torch.where(tied, d["rc"], d["rr"]),
             nr=torch.where(tied, d["nc"], d["nr"]))
    _, m = dpo(d, beta=beta, loss_type=loss_type)
    c, r = (d["pc"], d["pr"]) if loss_type == "simpo" else (d["pc"] - d["rc"], d["pr"] - d["rr"])
    if loss_type in ("ipo", "simpo"):
        c, r = c / d["nc"], r / d["nr"]
    wrong = (beta * c < beta * r).double().mean()
    assert math.isclose(m["rewards/accuracies"].item() + m["rewards/ties"].item() + wrong.item(), 1.0,
                        rel_tol=0, abs_tol=1e-12)
    assert m["rewards/ties"].item() >= tied.double().mean().item()


@given(dpo_logps(), betas, st.data())
def test_dpo_accumulation_with_num_pairs_is_exact(d, beta, data):
    P = d["pc"].shape[0]
    cuts = data.draw(splits(P))
    full = dpo(d, beta=beta)[0]
    parts = sum(dpo({k: v[a:b] for k, v in d.items()}, beta=beta, num_pairs=P)[0] for a, b in zip(cuts, cuts[1:]))
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)


def test_dpo_bad_arguments_raise_clear_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown loss_type"):
        mf.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="stuck at"):
        mf.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        mf.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="reference"):
        mf.dpo_loss(x, x, None, None)
    with pytest.raises(ValueError, match="chosen_counts"):
        mf.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="same length"):
        mf.dpo_loss(x, torch.zeros(2), x, x)
    with pytest.raises(ValueError, match="applies to"):
        mf.dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
