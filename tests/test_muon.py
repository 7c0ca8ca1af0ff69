"""Muon, its parts, and partition: pinned against optax (float64) and numpy closed forms.

Layout: this library's weights are torch's ``(out, in)``, optax's are JAX's ``(in, out)``. Muon's
shape factor reads fan-out/fan-in from the layout, so each matrix goes to optax transposed and its
update comes back transposed; everything else about Muon is the same under a transpose.
"""
import functools

import numpy as np
import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import checkpoint as ckpt
from minillm_func import optim, schedules
from minillm_func import tree as T
from strategies import gen, seeds

try:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax
    from optax.contrib._muon import MuonDimensionNumbers, scale_by_shape as optax_scale_by_shape
except ImportError:  # optax is a test-only reference
    optax = None

needs_optax = pytest.mark.skipif(optax is None, reason="the reference tests need optax and jax")

STEPS = 30
RTOL = 1e-6
A, B, C = 3.4445, -4.7750, 2.0315  # Keller Jordan's quintic


# --------------------------------------------------------------------------- helpers


def random_params(shapes: dict, seed: int) -> dict:
    g = gen(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def grad_stream(params: dict, seed: int, steps: int = STEPS) -> list:
    """Random gradients of changing scale (the momentum and Adam's moments see big and tiny ones)."""
    g = gen(seed)
    out = []
    for _ in range(steps):
        mag = [1e-3, 1.0, 30.0][int(torch.randint(0, 3, (), generator=g))]
        out.append({k: torch.randn(p.shape, generator=g, dtype=p.dtype) * mag for k, p in params.items()})
    return out


def to_jax(tree: dict) -> dict:
    """Matrices transposed to JAX's (in, out) layout (as numpy arrays); other leaves as they are."""
    return {k: (v.mT if v.dim() == 2 else v).numpy() for k, v in tree.items()}


def from_jax(tree: dict) -> dict:
    return {k: torch.from_numpy(np.array(v.T if v.ndim == 2 else v)) for k, v in tree.items()}


def run_ours(opt, params, grads_list, via="update"):
    state, out = opt.init(params), []
    for grads in grads_list:
        if via == "update":
            updates, state = opt.update(grads, state, params)
            new = optim.apply_updates(params, updates)
        else:
            new, state = optim.step(opt, grads, state, params)
            updates = {k: new[k] - params[k] for k in params}
        params = new
        out.append((updates, params))
    return out, state


def run_optax(tx, params, grads_list):
    params = to_jax(params)
    state, out = tx.init(params), []
    update = jax.jit(tx.update)  # op by op, optax's muon takes a minute per run; compiled, ~1.5 s
    for grads in grads_list:
        updates, state = update(to_jax(grads), state, params)
        updates = {k: np.asarray(u) for k, u in updates.items()}
        params = {k: params[k] + updates[k] for k in params}  # optax.apply_updates, without a dispatch per leaf
        out.append((from_jax(updates), from_jax(params)))
    return out


def assert_runs_close(ours, ref, rtol=RTOL, atol=1e-12):
    for step, ((u, p), (ru, rp)) in enumerate(zip(ours, ref)):
        for k in ru:
            np.testing.assert_allclose(u[k].numpy(), ru[k].numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"update of {k!r} at step {step}")
            np.testing.assert_allclose(p[k].numpy(), rp[k].numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"param {k!r} at step {step}")


# Square, wide and tall matrices (Muon), a vector, a scalar and a 3-D leaf (optax's muon gives those to Adam).
MIXED = {"square": (6, 6), "wide": (4, 9), "tall": (9, 4), "bias": (5,), "gain": (), "conv": (2, 3, 2)}
ADAM_KW = dict(adam_b1=0.8, adam_b2=0.95, adam_eps_root=1e-10, adam_weight_decay=0.02, adam_learning_rate=3e-3)


# --------------------------------------------------------------------------- muon against optax


@needs_optax
@pytest.mark.parametrize("case", [
    dict(),
    dict(nesterov=False, schedule=True, weight_decay=0.1, mask=True, **ADAM_KW),
    dict(consistent_rms=0.2, adaptive=True, beta=0.9, eps=1e-6, ns_steps=3, weight_decay=0.05),
    dict(ns_coeffs="dion", preconditioning="spectral", nesterov=False),
    dict(preconditioning="aol"),
    dict(preconditioning="schatten"),
], ids=["defaults", "no-nesterov,schedule,masked-decay,adam-options", "rms,adaptive,beta,eps,3-steps,decay",
        "dion,spectral", "aol", "schatten"])
def test_muon_matches_optax(case):
    """30 updates of ``muon`` and ``optax.contrib.muon`` in float64: every update and param to 1e-6 (through
    ``update`` + ``apply_updates`` and through ``step``); matrices take Muon, the rest optax's (N)AdamW."""
    case = dict(case)
    schedule, mask = case.pop("schedule", False), case.pop("mask", False)
    params = random_params(MIXED, seed=1)
    grads = grad_stream(params, seed=2)
    lr = ((schedules.cosine_annealing(0.05, T_max=40), optax.cosine_decay_schedule(0.05, 40)) if schedule
          else (0.05, 0.05))
    mask_tree = {k: k != "square" for k in params} if mask else None
    ours = optim.muon(lr[0], weight_decay_mask=mask_tree, **case)
    expected = run_optax(optax.contrib.muon(lr[1], weight_decay_mask=mask_tree, **case), params, grads)
    got, state = run_ours(ours, params, grads)
    assert_runs_close(got, expected)
    assert_runs_close(run_ours(ours, params, grads, via="step")[0], expected)
    assert set(state.inner_states["muon"][0].mu) == {"square", "wide", "tall"}
    assert set(state.inner_states["adam"][0].mu) == {"bias", "gain", "conv"}


# --------------------------------------------------------------------------- partition against optax


def flat(tree) -> dict:
    return {".".join(map(str, k)): v for k, v in zip(optree.tree_paths(tree), T.leaves(tree))}


@functools.lru_cache(maxsize=None)
def partition_reference():
    """A nested tree, its gradients, and optax.partition's updates and params over them (computed once)."""
    g = gen(5)
    rand = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    params = {"blocks": {"q": rand(8, 8), "up": rand(12, 8), "down": rand(8, 12)}, "emb": rand(10, 8),
              "norm": rand(8)}
    grads = [T.tree_map(lambda p: rand(*p.shape) * 3, params) for _ in range(STEPS)]
    dims = lambda u: jax.tree.map(lambda _: MuonDimensionNumbers(), u)  # noqa: E731  optax's parts need them
    ref = optax.partition({"muon": optax.chain(optax.contrib.scale_by_muon(beta=0.9, weight_dimension_numbers=dims),
                                               optax_scale_by_shape(dims), optax.scale_by_learning_rate(0.02)),
                           "adam": optax.adam(1e-3)},
                          {k: "muon" if k.startswith("blocks.") else "adam" for k in flat(params)})
    return params, grads, run_optax(ref, flat(params), [flat(x) for x in grads])  # same leaves, flat names


@needs_optax
@pytest.mark.parametrize("labels_kind", ["prefix tree", "function"])
def test_partition_matches_optax(labels_kind):
    """Muon's parts on the block matrices, Adam on the rest, over a nested tree: as optax.partition, 30 updates
    in float64 to 1e-6; labels as a prefix tree (one label for the whole "blocks" subtree) or a function."""
    params, grads, expected = partition_reference()
    if labels_kind == "function":
        labels = lambda p: {"blocks": {k: "muon" for k in p["blocks"]}, "emb": "adam", "norm": "adam"}  # noqa: E731
    else:
        labels = {"blocks": "muon", "emb": "adam", "norm": "adam"}
    ours = optim.multi_transform({"muon": optim.chain(optim.scale_by_muon(beta=0.9), optim.scale_by_shape(),
                                                      optim.scale_by_learning_rate(0.02)),
                                  "adam": optim.chain(optim.scale_by_adam(), optim.scale_by_learning_rate(1e-3))},
                                 labels)
    state, p = ours.init(params), params
    for step_no, gr in enumerate(grads):
        updates, state = ours.update(gr, state, p)
        p = optim.apply_updates(p, updates)
        assert_runs_close([(flat(updates), flat(p))], [expected[step_no]])
    assert set(state.inner_states) == {"muon", "adam"}
    assert set(state.inner_states["muon"][0].mu) == {"blocks.q", "blocks.up", "blocks.down"}


# --------------------------------------------------------------------------- Newton-Schulz


def quintic(s: np.ndarray, steps: int = 5) -> np.ndarray:
    for _ in range(steps):
        s = A * s + B * s**3 + C * s**5
    return s


def test_band_of_the_quintic():
    """The closed form behind the band: 5 steps map every s in [3e-3, 1] into [0.68, 1.21]."""
    s = quintic(np.linspace(3e-3, 1, 200_001))
    assert 0.68 <= s.min() < 0.69 and 1.20 < s.max() <= 1.21


@given(m=st.integers(1, 24), n=st.integers(1, 24), seed=seeds)
def test_newton_schulz_maps_singular_values_by_the_quintic(m, n, seed):
    """NS keeps the singular vectors and sends each singular value s to quintic(s / (||x||_F + eps))."""
    x = torch.randn(m, n, generator=gen(seed), dtype=torch.float64)
    o = optim.orthogonalize_via_newton_schulz(x)
    sv = np.linalg.svd(x.numpy(), compute_uv=False)
    expected = quintic(sv / (np.linalg.norm(x.numpy()) + 1e-8))
    np.testing.assert_allclose(np.sort(np.linalg.svd(o.numpy(), compute_uv=False)), np.sort(expected), rtol=1e-9,
                               atol=1e-12)  # sorted: the quintic is not monotone
    u, _, vt = np.linalg.svd(x.numpy(), full_matrices=False)  # o = U diag(f(s)) V^T
    np.testing.assert_allclose(o.numpy(), (u * expected) @ vt, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orthogonalized_singular_values_lie_in_the_band(shape, dtype):
    """A matrix whose singular values are within a factor 20 of each other comes out with all of them in
    [0.68, 1.21]; exact orthogonalisation would give 1."""
    g = gen(7)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))
    s = torch.linspace(0.05, 1.0, k, dtype=torch.float64) * 7
    x = (u * s) @ v.mT
    sv = torch.linalg.svdvals(optim.orthogonalize_via_newton_schulz(x.to(dtype)).double())
    assert sv.min() >= 0.68 - 1e-4 and sv.max() <= 1.21, (sv.min(), sv.max())
    assert sv.max() > 0.95 and sv.min() < 0.9  # a band, not exactly 1


def test_newton_schulz_batches_and_transposes():
    x = torch.randn(3, 2, 10, 4, generator=gen(8), dtype=torch.float64)
    o = optim.orthogonalize_via_newton_schulz(x)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(o[i, j], optim.orthogonalize_via_newton_schulz(x[i, j].mT.contiguous()).mT)
    assert optim.orthogonalize_via_newton_schulz(torch.zeros(4, 6)).eq(0).all()  # no NaN from a zero matrix


@needs_optax
def test_newton_schulz_matches_optax_function():
    x = torch.randn(9, 14, generator=gen(9), dtype=torch.float64)
    ref = optax.contrib._muon.orthogonalize_via_newton_schulz(jnp.asarray(x.numpy()), jnp.asarray((A, B, C)), 5)
    np.testing.assert_allclose(optim.orthogonalize_via_newton_schulz(x).numpy(), np.asarray(ref), rtol=1e-9)


# --------------------------------------------------------------------------- routing


def tiny_model(**kw):
    cfg = mf.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, **kw)
    return mf.build_model(cfg).init(0)


def tagging(tag: float) -> optim.Transform:
    """A transform that replaces each update it sees by ``tag`` and counts its calls: who got which leaf."""
    return optim.Transform(lambda p: torch.zeros((), dtype=torch.int64),
                           lambda g, s, p=None: (T.tree_map(lambda x: torch.full_like(x, tag), g), s + 1))


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, qkv_bias=True, out_bias=True, qk_norm=True)],
                         ids=["default", "untied+biases+qk_norm"])
def test_muon_labels_on_a_real_model(kw):
    params = tiny_model(**kw)
    labels = optim.muon_labels(params)
    assert set(labels) == set(params)
    hidden = {k for k, v in params.items()
              if k.startswith("layers.") and k.endswith(".weight") and v.dim() == 2}
    assert hidden == {k for k in params if any(f".{w}.weight" in k for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))}
    assert {k for k, l in labels.items() if l == "muon"} == hidden
    assert labels["tok_emb.weight"] == "adamw" and labels["norm.weight"] == "adamw"
    if not kw.get("tie_embeddings", True):
        assert labels["lm_head.weight"] == "adamw"
    opt = optim.partition({"muon": tagging(1.0), "adamw": tagging(2.0)}, optim.muon_labels)
    updates, state = opt.update(params, opt.init(params), params)
    for k, u in updates.items():
        assert u.eq(1.0 if k in hidden else 2.0).all(), k
    assert int(state.inner_states["muon"]) == int(state.inner_states["adamw"]) == 1


def test_muon_labels_other_names():
    x = torch.zeros(4, 4)
    params = {"transformer": {"wte": {"weight": x}, "h": [{"attn": {"c_attn": x, "bias": torch.zeros(4)}}]},
              "model.embed_tokens.weight": x, "model.layers.0.self_attn.q_proj.weight": x, "lm_head.weight": x,
              "model.layers.0.per_layer_emb.weight": x}
    labels = optim.muon_labels(params)
    assert labels["transformer"]["h"][0]["attn"] == {"c_attn": "muon", "bias": "adamw"}
    assert labels["transformer"]["wte"]["weight"] == "adamw"
    assert [labels[k] for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                "lm_head.weight", "model.layers.0.per_layer_emb.weight")] == \
        ["adamw", "muon", "adamw", "adamw"]


@functools.lru_cache(maxsize=None)
def biased_model_params():
    return T.tree_map(lambda p: p.double(), tiny_model(qkv_bias=True))


@given(data=st.data())
def test_partition_routes_every_leaf_to_exactly_one_transform(data):
    params = biased_model_params()
    names = sorted(params)
    n_labels = data.draw(st.integers(1, 4), label="labels")
    assignment = {k: data.draw(st.integers(0, n_labels - 1), label=k) for k in names}
    used = sorted(set(assignment.values()))
    opt = optim.partition({f"l{i}": tagging(float(i)) for i in used}, {k: f"l{i}" for k, i in assignment.items()})
    state = opt.init(params)
    for via in ("update", "step"):
        if via == "update":
            updates, new = opt.update(params, state, params)
        else:
            new_params, new = optim.step(opt, params, state, params)
            updates = {k: new_params[k] - params[k] for k in params}
        for k in names:
            torch.testing.assert_close(updates[k], torch.full_like(updates[k], assignment[k]), msg=f"{via} {k}")
        assert set(new.inner_states) == {f"l{i}" for i in used}
        assert all(int(s) == 1 for s in new.inner_states.values())
    seen = {}
    spy = lambda i: optim.Transform(lambda p: seen.setdefault(i, sorted(p)) and torch.zeros(()),  # noqa: E731
                                    lambda g, s, p=None: (g, s))
    optim.partition({f"l{i}": spy(i) for i in used}, {k: f"l{i}" for k, i in assignment.items()}).init(params)
    assert sorted(sum(seen.values(), [])) == names  # each name in exactly one group
    for i, group in seen.items():
        assert group == sorted(k for k in names if assignment[k] == i)


def test_partition_errors_name_the_problem():
    params = {"a": torch.zeros(3, 3), "b": torch.zeros(3), "c": torch.zeros(3)}
    adam = optim.adamw(1e-3)
    with pytest.raises(ValueError, match=r"label 'sgd' \(of 'b', 'c'\) has no transform.*'adam'"):
        optim.partition({"adam": adam}, {"a": "adam", "b": "sgd", "c": "sgd"}).init(params)
    with pytest.raises(ValueError, match=r"no leaf has the label 'unused'.*allow_unused=True"):
        optim.partition({"adam": adam, "unused": adam}, lambda p: T.tree_map(lambda _: "adam", p)).init(params)
    opt = optim.partition({"adam": adam, "unused": adam}, lambda p: T.tree_map(lambda _: "adam", p), allow_unused=True)
    new, _ = optim.step(opt, params, opt.init(params), params)
    assert set(new) == set(params)
    with pytest.raises(ValueError, match="shaped like the params"):
        optim.partition({"adam": adam}, {"a": "adam"}).init(params)
    with pytest.raises(ValueError, match="needs the PartitionState"):
        optim.partition({"adam": adam}, {k: "adam" for k in params}).update(params, adam.init(params), params)
    with pytest.raises(TypeError, match=r"transforms\['x'\] is a function"):
        optim.partition({"x": lambda g: g}, {k: "x" for k in params})
    assert optim.multi_transform is optim.partition and optim.MultiTransformState is optim.PartitionState


def test_muon_errors_teach():
    with pytest.raises(ValueError, match=r"leaf 'b' has shape \(3,\).*muon_labels"):
        optim.scale_by_muon().init({"a": torch.zeros(2, 2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="preconditioning must be one of"):
        optim.muon(0.02, preconditioning="newton")
    with pytest.raises(ValueError, match="ns_coeffs must be one triple"):
        optim.muon(0.02, ns_coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown ns_coeffs preset 'fast'"):
        optim.scale_by_muon(ns_coeffs="fast")
    with pytest.raises(ValueError, match=r"beta must lie in \[0.0, 1.0\)"):
        optim.muon(0.02, beta=1.0)
    with pytest.raises(TypeError, match="cannot be injected"):
        optim.inject_hyperparams(optim.muon)(learning_rate=0.02, ns_steps=3)


# --------------------------------------------------------------------------- the convenience, end to end


@needs_optax
def test_muon_with_adamw_matches_optax_muon_and_torch_adamw():
    """The hidden matrices follow optax's muon (on those matrices alone), the rest torch.optim.AdamW."""
    params = T.tree_map(lambda p: p.double(), tiny_model(tie_embeddings=False))
    grads = grad_stream(params, seed=11, steps=10)
    opt = optim.muon_with_adamw(0.02, 3e-3, weight_decay=0.1, adam_b2=0.95, adam_weight_decay=0.01)
    ours, state = run_ours(opt, params, grads, via="step")
    labels = optim.muon_labels(params)
    hidden = sorted(k for k, l in labels.items() if l == "muon")
    ref = run_optax(optax.contrib.muon(0.02, weight_decay=0.1), {k: params[k] for k in hidden},
                    [{k: g[k] for k in hidden} for g in grads])
    assert_runs_close([({k: u[k] for k in hidden}, {k: p[k] for k in hidden}) for u, p in ours], ref)
    rest = [k for k in params if labels[k] == "adamw"]
    ps = [torch.nn.Parameter(params[k].clone()) for k in rest]
    torch_opt = torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, foreach=False)
    for (_, p), g in zip(ours, grads):
        for q, k in zip(ps, rest):
            q.grad = g[k].clone()
        torch_opt.step()
        for q, k in zip(ps, rest):
            torch.testing.assert_close(p[k], q.detach(), rtol=1e-10, atol=1e-12)
    assert isinstance(state.inner_states["adamw"], optim.AdamWState)


# --------------------------------------------------------------------------- state: checkpoints, vmap


@pytest.mark.parametrize("make", [lambda: optim.muon(0.02, weight_decay=0.1),
                                  lambda: optim.chain(optim.clip_by_global_norm(1.0),
                                                      optim.muon_with_adamw(0.02, 3e-3, mu_dtype=torch.bfloat16))],
                         ids=["muon", "clip+muon_with_adamw"])
def test_state_is_a_tree_of_tensors_and_checkpoints_bit_exactly(make, tmp_path):
    params = tiny_model(qkv_bias=True)
    opt = make()
    g = gen(12)
    grads = [T.tree_map(lambda p: torch.randn(p.shape, generator=g), params) for _ in range(3)]
    _, state = run_ours(opt, params, grads, via="step")
    leaves = T.leaves(state)
    assert leaves and all(isinstance(x, torch.Tensor) for x in leaves)
    counts = [x for x in leaves if x.dtype == torch.int64]
    assert counts and all(x.dim() == 0 and int(x) == 3 for x in counts)
    ckpt.save(tmp_path / "opt", state)
    loaded, _ = ckpt.load(tmp_path / "opt", like=opt.init(params))
    assert T.tree_map(lambda _: 0, loaded) == T.tree_map(lambda _: 0, state)  # same structure, same classes
    bits = lambda x: x.reshape(-1).view(torch.uint8)  # noqa: E731
    for a, b in zip(T.leaves(loaded), T.leaves(state)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def test_update_vmaps_over_a_stack_of_runs():
    """torch.func.vmap over independent (grads, state) pairs gives each run's own update."""
    params = {"w": torch.randn(6, 10, generator=gen(13)), "u": torch.randn(10, 6, generator=gen(14)),
              "b": torch.randn(6, generator=gen(15))}
    opt = optim.muon(0.02, weight_decay=0.01)
    grads = [T.tree_map(lambda p: torch.randn(p.shape, generator=gen(16 + i)), params) for i in range(3)]
    singles = []
    for g in grads:
        state = opt.init(params)
        _, state = opt.update(g, state, params)
        singles.append(opt.update(g, state, params))
    state0 = opt.init(params)
    stacked_states = T.tree_map(lambda *xs: torch.stack(xs), *[opt.update(g, state0, params)[1] for g in grads])
    stacked_grads = T.tree_map(lambda *xs: torch.stack(xs), *grads)
    u, s = torch.func.vmap(lambda g, st: opt.update(g, st, params))(stacked_grads, stacked_states)
    for i, (su, ss) in enumerate(singles):
        for a, b in zip(T.leaves((u, s)), T.leaves((su, ss))):
            torch.testing.assert_close(a[i], b, rtol=1e-5, atol=1e-6)


def test_skip_leaves_params_and_state_unchanged():
    params = tiny_model()
    opt = optim.muon_with_adamw(0.02, 3e-3)
    state = opt.init(params)
    grads = T.tree_map(torch.randn_like, params)
    new, new_state = optim.step(opt, grads, state, params, skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(T.leaves((new, new_state)), T.leaves((params, state))))
    new, _ = optim.step(opt, grads, state, params, skip=torch.tensor(False))
    assert all(not torch.equal(new[k], params[k]) for k in params)


def test_compiles_to_one_graph_without_recompiling():
    """torch.compile traces the whole update (Muon, AdamW, partition, a schedule) as one graph, once: the
    counters are tensors and the labels, shapes and coefficients are static."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    params = mf.build_model(mf.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16)).init(0)
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.muon_with_adamw(schedules.cosine_annealing(0.02, T_max=10), 3e-3, weight_decay=0.01))
    compiled = torch.compile(lambda g, s, p: optim.step(opt, g, s, p), backend=counting_backend, fullgraph=True)
    g = gen(17)
    pc, sc = params, opt.init(params)
    pe, se = params, sc
    for _ in range(3):
        grads = T.tree_map(lambda p: torch.randn(p.shape, generator=g), params)
        pc, sc = compiled(grads, sc, pc)
        pe, se = optim.step(opt, grads, se, pe)
    assert len(graphs) == 1
    for a, b in zip(T.leaves((pc, sc)), T.leaves((pe, se))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_holds_muons_numbers_in_the_state():
    params = {"w": torch.randn(4, 6, generator=gen(18)), "b": torch.randn(4, generator=gen(19))}
    grads = {"w": torch.randn(4, 6, generator=gen(20)), "b": torch.randn(4, generator=gen(21))}
    opt = optim.inject_hyperparams(optim.muon)(learning_rate=0.02, beta=0.9, weight_decay=0.1)
    ref = optim.muon(0.02, beta=0.9, weight_decay=0.1)
    s, r = opt.init(params), ref.init(params)
    for _ in range(2):
        u, s = opt.update(grads, s, params)
        v, r = ref.update(grads, r, params)
        for k in params:
            torch.testing.assert_close(u[k], v[k])
    s = s._replace(hyperparams={**s.hyperparams, "learning_rate": torch.tensor(0.0, dtype=torch.float64)})
    u, _ = opt.update(grads, s, params)
    assert u["w"].eq(0).all() and u["b"].eq(0).all()  # adam_learning_rate not given: it is learning_rate
