import math

import pytest
import torch
import torch.nn.functional as F

import minillm_func as mf
from minillm_func import tree as T
from strategies import gen

IGN = mf.IGNORE_INDEX
CFG = mf.ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=True)


def lm_batches(n, seed=0, B=4, T=12):
    """Right-padded next-token batches with ragged lengths (so ignored labels matter)."""
    g = gen(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
        lengths = torch.randint(7, T + 1, (B,), generator=g)  # every row keeps some "reply" positions
        real = torch.arange(T)[None] < lengths[:, None]
        labels = torch.where(real[:, 1:], ids[:, 1:], IGN)
        labels = torch.cat([labels, torch.full((B, 1), IGN)], 1)
        out.append({"input_ids": torch.where(real, ids, 0), "labels": labels})
    return out


def sft_batches(n, seed=0):
    out = []
    for b in lm_batches(n, seed):
        mask = torch.zeros_like(b["labels"], dtype=torch.bool)
        mask[:, 5:] = True  # "reply" positions
        out.append({**b, "labels": torch.where(mask, b["labels"], IGN)})
    return out


def dpo_batches(n, seed=0):
    a, b = sft_batches(n, seed), sft_batches(n, seed + 100)
    return [{"chosen_input_ids": x["input_ids"], "chosen_labels": x["labels"],
             "rejected_input_ids": y["input_ids"], "rejected_labels": y["labels"]} for x, y in zip(a, b)]


def imperative_run(params, batches, loss_of, lr):
    """The original loop: forward -> loss -> backward -> clip_grad_norm_(1.0) -> AdamW.step() -> scheduler.step()."""
    model = mf.build_model(CFG)
    module = model.to_module(params)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    history = []
    for batch in batches:
        loss = loss_of(module, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append((loss.item(), {n: p.detach().clone() for n, p in module.named_parameters()}))
    return history


def ce_loss(module, batch):
    logits = module(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGN)


def imperative_dpo_loss(ref_module):
    def logps(module, ids, labels):
        logp = torch.log_softmax(module(ids), -1)
        tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (tok * (labels != IGN)).sum(-1)

    def loss(module, b):
        pc, pr = logps(module, b["chosen_input_ids"], b["chosen_labels"]), logps(module, b["rejected_input_ids"], b["rejected_labels"])
        with torch.no_grad():
            rc = logps(ref_module, b["chosen_input_ids"], b["chosen_labels"])
            rr = logps(ref_module, b["rejected_input_ids"], b["rejected_labels"])
        return -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()

    return loss


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_trainer_step_reproduces_the_imperative_loop_for_20_steps(kind):
    model = mf.build_model(CFG)
    params = model.init(seed=1)
    batches = {"pretrain": lm_batches, "sft": sft_batches, "dpo": dpo_batches}[kind](20)
    trainer = mf.create_trainer(kind, model)
    loss_of = imperative_dpo_loss(model.to_module(params)) if kind == "dpo" else ce_loss
    expected = imperative_run(params, batches, loss_of, lr=5e-5 if kind == "sft" else 1e-4)
    state = trainer.init(params)
    for batch, (want_loss, want_params) in zip(batches, expected):
        state, metrics = trainer.step(state, batch)
        assert math.isclose(metrics["loss"].item(), want_loss, rel_tol=1e-5, abs_tol=1e-6)
        for name, want in want_params.items():
            torch.testing.assert_close(state.params[name], want, rtol=1e-5, atol=2e-6)
    assert state.step.item() == 20


def test_step_is_pure():
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("dpo", model)
    state = trainer.init(model.init(0))
    batch = dpo_batches(1)[0]
    state, _ = trainer.step(state, batch)  # non-trivial optimizer state
    snapshot = T.tree_map(torch.clone, (state, batch))
    new_state, _ = trainer.step(state, batch)
    assert all(torch.equal(a, b) for a, b in zip(T.leaves((state, batch)), T.leaves(snapshot)))
    assert not torch.equal(new_state.params["tok_emb.weight"], state.params["tok_emb.weight"])
    assert all(torch.equal(new_state.extras["ref_params"][k], state.extras["ref_params"][k]) for k in state.params)


@pytest.mark.parametrize("kind", ["pretrain", "dpo"])
def test_accumulation_of_k_micro_batches_equals_one_big_batch(kind):
    model = mf.build_model(CFG)
    params = model.init(2, dtype=torch.float64)  # float64: Adam's first step amplifies fp32 rounding of tiny grads
    make = {"pretrain": lm_batches, "dpo": dpo_batches}[kind]
    micro = make(3, seed=5)
    big = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    one = mf.create_trainer(kind, model, learning_rate=1e-2, schedule=mf.schedules.constant(1e-2))
    acc = mf.create_trainer(kind, model, learning_rate=1e-2, schedule=mf.schedules.constant(1e-2),
                            accumulation_steps=3)
    s1, _ = one.step(one.init(params), big)
    s2 = acc.init(params)
    for i, b in enumerate(micro):
        s2, m = acc.step(s2, b)
        assert bool(m["updated"]) == (i == 2)
    assert s2.step.item() == 1 and s2.accum.micro_step.item() == 0
    for k in params:
        torch.testing.assert_close(s2.params[k], s1.params[k], rtol=1e-10, atol=1e-12)


def test_a_non_finite_loss_changes_nothing_and_backs_off_the_scale():
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, loss_scaling=True)
    state = trainer.init(model.init(0))
    state, _ = trainer.step(state, lm_batches(1)[0])
    poisoned = dict(state.params)
    bad = state._replace(params={**poisoned, "norm.weight": poisoned["norm.weight"] * float("inf")})
    after, metrics = trainer.step(bad, lm_batches(1, seed=3)[0])
    assert metrics["skipped"].item() and not metrics["updated"].item()
    for a, b in zip(T.leaves((after.params, after.opt_state, after.accum, after.step)),
                    T.leaves((bad.params, bad.opt_state, bad.accum, bad.step))):
        assert torch.equal(a, b)
    assert after.scaler.scale.item() == state.scaler.scale.item() / 2


def test_evaluate_is_token_weighted_and_reports_perplexity():
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model)
    state = trainer.init(model.init(0))
    batches = lm_batches(3)
    ev = trainer.evaluate(state, batches)
    big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    want = mf.pretrain_loss(model.apply(state.params, big["input_ids"]), big["labels"]).item()
    assert math.isclose(ev["loss"], want, rel_tol=1e-5)
    assert math.isclose(ev["perplexity"], math.exp(want), rel_tol=1e-5)


def test_precomputed_reference_logps_give_the_same_dpo_step():
    model = mf.build_model(CFG)
    params = model.init(4)
    tok = mf.ByteTokenizer()
    cfg = mf.ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4, max_seq_len=32)
    model = mf.build_model(cfg)
    params = model.init(4)
    ds = mf.PreferenceDataset(mf.demo_corpus(0, n_dpo=8).dpo, tok, 32)
    with_ref = mf.objectives.add_reference_logps(model, params, ds, batch_size=3)
    live = mf.create_trainer("dpo", model)
    pre = mf.create_trainer("dpo", model, precomputed_reference=True)
    b_live = next(iter(mf.Batches(ds, 8, shuffle=False)))
    b_pre = next(iter(mf.Batches(with_ref, 8, shuffle=False)))
    s_live, m_live = live.step(live.init(params), b_live)
    s_pre, m_pre = pre.step(pre.init(params), b_pre)
    assert "ref_params" not in s_pre.extras
    torch.testing.assert_close(m_pre["loss"], m_live["loss"], rtol=1e-5, atol=1e-6)
    for k in params:
        torch.testing.assert_close(s_pre.params[k], s_live.params[k], rtol=1e-5, atol=1e-6)


def test_bad_trainer_arguments_raise_clear_errors():
    model = mf.build_model(CFG)
    with pytest.raises(ValueError, match="kind must be one of"):
        mf.create_trainer("rlhf", model)
    with pytest.raises(ValueError, match="precision"):
        mf.create_trainer("sft", model, precision="fp8")
    with pytest.raises(ValueError, match="beta must be positive"):
        mf.create_trainer("dpo", model, beta=0.0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        mf.create_trainer("sft", model, accumulation_steps=0)


def test_a_weighted_list_of_dpo_losses_trains_on_their_weighted_sum():
    # RPO = sigmoid + w * sft: the trainer's loss equals the weighted sum of the two single-type trainers'
    model = mf.build_model(mf.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16))
    params = model.init(0, dtype=torch.float64)
    batch = next(iter(dpo_batches(1)))
    rpo = mf.create_trainer("dpo", model, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    parts = [mf.create_trainer("dpo", model, loss_type=t) for t in ("sigmoid", "sft")]
    state = rpo.init(params)
    total = rpo.loss_fn(state.params, batch, state.extras)[0]
    each = [t.loss_fn(params, batch, t.init(params).extras)[0] for t in parts]
    torch.testing.assert_close(total, each[0] + 0.5 * each[1], rtol=1e-12, atol=0)
    # a reference-free type keeps no reference copy
    assert "ref_params" not in parts[1].init(params).extras and "ref_params" in state.extras
    assert rpo.config["loss_type"] == ["sigmoid", "sft"] and rpo.config["loss_weights"] == [1.0, 0.5]


# --------------------------------------------------------------------------- optimizer=


def manual_steps(params, batches, transform):
    """The same update written by hand: loss -> autograd grads -> clip (torch's formula) -> transform."""
    model = mf.build_model(CFG)
    opt_state = transform.init(params)
    for b in batches:
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        logits = model.apply(p, b["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGN)
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        grads = {k: g * torch.clamp(1.0 / (norm + 1e-6), max=1.0) for k, g in grads.items()}
        updates, opt_state = transform.update(grads, opt_state, params)
        params = mf.optim.apply_updates(params, updates)
    return params, opt_state


@pytest.mark.parametrize("which", ["muon", "schedule_free"])
def test_create_trainer_takes_any_transform_after_clipping(which):
    model = mf.build_model(CFG)
    params = {k: v.double() for k, v in model.init(0).items()}
    batches = lm_batches(5, seed=3)
    schedule = mf.schedules.warmup_cosine(0.02, 2, 5)
    if which == "muon":
        factory = lambda lr: mf.optim.muon_with_adamw(lr, adam_learning_rate=3e-3)  # noqa: E731
        trainer = mf.create_trainer("pretrain", model, learning_rate=0.02, schedule=schedule, optimizer=factory)
        reference = factory(schedule)
    else:
        reference = mf.optim.schedule_free_adamw(3e-3, warmup_steps=2)
        trainer = mf.create_trainer("pretrain", model, learning_rate=3e-3, optimizer=reference)
    state = trainer.init(params)
    for b in batches:
        state, metrics = trainer.step(state, b)
    expected = schedule(4) if which == "muon" else torch.tensor(3e-3, dtype=torch.float64)
    assert float(metrics["lr"]) == pytest.approx(float(expected))  # the rate it was given, reported
    want, want_opt = manual_steps(params, batches, reference)
    for k in params:
        torch.testing.assert_close(state.params[k], want[k], rtol=1e-10, atol=1e-12)
    if which == "schedule_free":  # evaluated at the average x, not at the iterate y it trains
        x = mf.optim.schedule_free_eval_params(want_opt, want)
        held = lm_batches(2, seed=9)
        ev = trainer.evaluate(state, held)
        loss_fn = trainer.loss_fn
        total = sum(float(loss_fn(x, b, {})[0]) for b in held)
        count = sum(int((b["labels"] != IGN).sum()) for b in held)
        assert ev["loss"] == pytest.approx(total / count, rel=1e-10)
        total_y = sum(float(loss_fn(state.params, b, {})[0]) for b in held)
        assert ev["loss"] != pytest.approx(total_y / count, rel=1e-6)


def test_create_trainer_refuses_an_optimizer_that_is_not_a_transform():
    model = mf.build_model(CFG)
    with pytest.raises(TypeError, match="not a Transform"):
        mf.create_trainer("pretrain", model, optimizer=lambda lr: "adam")
    with pytest.raises(TypeError, match="must be a Transform"):
        mf.create_trainer("pretrain", model, optimizer=3)
