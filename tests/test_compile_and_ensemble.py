import pytest
import torch

import minillm_func as mf
from minillm_func import ensemble, optim
from minillm_func import tree as T
from strategies import gen

CFG = mf.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=64)


def batch_of(T_len, seed):
    ids = torch.randint(0, 64, (4, T_len), generator=gen(seed))
    labels = ids.roll(-1, 1)
    labels[:, -1] = mf.IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def test_compiled_step_does_not_recompile_across_steps_and_matches_eager():
    """20 steps, the learning rate changing every step and three padded lengths:
    one static graph, one dynamic-shape recompile at the second length, then none."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    model = mf.build_model(CFG)
    compiled = mf.create_trainer("pretrain", model, learning_rate=1e-3, compile=counting_backend)
    eager = mf.create_trainer("pretrain", model, learning_rate=1e-3)
    params = model.init(0)
    sc, se = compiled.init(params), eager.init(params)
    lrs = set()
    for i in range(20):
        b = batch_of([16, 32, 48][i % 3], i)
        sc, mc = compiled.step(sc, b)
        se, me = eager.step(se, b)
        lrs.add(round(mc["lr"].item(), 12))
        if i >= 2:
            assert len(graphs) == 2, f"recompiled at step {i}: {len(graphs)} graphs"
        torch.testing.assert_close(mc["loss"], me["loss"], rtol=1e-5, atol=1e-6)
    assert len(lrs) == 20  # the learning rate really changed at every step
    for k in params:
        torch.testing.assert_close(sc.params[k], se.params[k], rtol=1e-4, atol=1e-5)


def test_vmapped_step_trains_each_member_as_if_alone():
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, learning_rate=1e-2)
    members = [trainer.init(model.init(seed, dtype=torch.float64)) for seed in range(3)]
    stacked = ensemble.stack(members)
    vstep = ensemble.vmap_step(trainer.step)
    for i in range(3):
        b = batch_of(16, i)
        stacked, metrics = vstep(stacked, b)
        assert metrics["loss"].shape == (3,)
        members = [trainer.step(m, b)[0] for m in members]
    for alone, together in zip(members, ensemble.unstack(stacked)):
        for a, b in zip(T.leaves(alone), T.leaves(together)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_an_ensemble_of_learning_rates_held_in_the_state():
    model = mf.build_model(CFG)

    def loss_fn(params, batch, extras):
        labels = batch["labels"]
        return mf.pretrain_loss(model.apply(params, batch["input_ids"]), labels, num_tokens=1), (
            (labels != mf.IGNORE_INDEX).sum(), {})

    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.inject_hyperparams(optim.adamw)(learning_rate=0.0))
    step = mf.make_train_step(loss_fn, opt)
    params = model.init(0, dtype=torch.float64)
    lrs = [1e-3, 1e-2, 3e-2]

    def with_lr(lr):
        s = mf.step.init_train_state(params, opt)
        inj = s.opt_state[1]
        hp = {**inj.hyperparams, "learning_rate": torch.tensor(lr, dtype=torch.float64)}
        return s._replace(opt_state=(s.opt_state[0], inj._replace(hyperparams=hp)))

    alone = [with_lr(lr) for lr in lrs]
    stacked = ensemble.stack(alone)
    for i in range(2):
        b = batch_of(16, i)
        stacked, _ = ensemble.vmap_step(step)(stacked, b)
        alone = [step(s, b)[0] for s in alone]
    together = ensemble.unstack(stacked)
    for a, t in zip(alone, together):
        for k in params:
            torch.testing.assert_close(t.params[k], a.params[k], rtol=1e-9, atol=1e-12)
    moved = [float((t.params["tok_emb.weight"] - params["tok_emb.weight"]).abs().max()) for t in together]
    assert moved[0] < moved[1] < moved[2]  # each member used its own learning rate


def test_stack_rejects_nothing_to_stack():
    with pytest.raises(ValueError, match="no trees"):
        ensemble.stack([])


def test_under_transform_is_true_inside_grad_vmap_and_compile_and_false_outside():
    x, constant = torch.ones(3), torch.ones(3)
    seen = {}

    def record(name, tree):
        seen[name] = T.under_transform(tree)
        return sum(t.sum() for t in T.leaves(tree) if isinstance(t, torch.Tensor))

    record("eager", {"w": x, "n": 3})  # a pytree; non-tensor leaves are ignored
    torch.func.grad(lambda p: record("grad", p))({"w": x})
    torch.func.vmap(lambda row: record("vmap", row))(x[:, None])
    torch.func.grad(lambda v: v.sum() + 0 * record("constant under grad", constant))(x)
    assert seen == {"eager": False, "grad": True, "vmap": True, "constant under grad": False}
    # While torch.compile traces, the answer is True whatever the tensors (the bool is baked into the graph).
    compiled = torch.compile(lambda v: v + T.under_transform(v), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x + 1)
    assert not T.under_transform(x, [constant], None)
