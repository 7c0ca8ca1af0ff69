"""Chunked cross-entropy / sequence log-probs equal the unchunked losses on ``hidden @ weight.T``,
in value and in gradient (hidden and weight), under torch.autograd and torch.func."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import minillm_func as mf
from minillm_func.chunked import chunked_cross_entropy, chunked_sequence_logps, chunked_token_logps
from strategies import gen, seeds

IGN = mf.IGNORE_INDEX
EXACT = dict(rtol=1e-10, atol=1e-12)


@st.composite
def problems(draw, *, dtype=torch.float64, max_batch=3, max_len=9, max_dim=6, max_vocab=20):
    """``(hidden [B,T,D], weight [V,D], labels [B,T], chunk_size)``.

    Labels are ragged: a random share is IGNORE_INDEX and some rows may be ignored
    entirely. The chunk size is drawn around the number of tokens N = B*T: 1, smaller
    than a row, equal to a row, between, equal to N, larger than N.
    """
    B, T = draw(st.integers(1, max_batch)), draw(st.integers(1, max_len))
    D, V = draw(st.integers(1, max_dim)), draw(st.integers(2, max_vocab))
    g = gen(draw(seeds))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    hidden = (torch.randn(B, T, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    rate = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    labels = labels.masked_fill(torch.rand(B, T, generator=g) < rate, IGN)
    dead_rows = draw(st.lists(st.integers(0, B - 1), max_size=B))
    labels[dead_rows] = IGN
    N = B * T
    chunk = draw(st.sampled_from(sorted({1, max(1, T - 1), T, T + 1, max(1, N // 2), N, N + 3})))
    return hidden, weight, labels, chunk


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_half_grads_close(ours, ref, hidden, weight, labels, chunk):
    """Half-precision gradients agree within the rounding error their sums allow.

    Both gradients are sums of products -- ``G W`` and ``G^T h`` with ``G`` the gradient of
    the logits -- rounded at different places (per chunk or once), and they may cancel. A
    sum's rounding error is bounded by the unit roundoff times the number of roundings
    along it (one per chunk for the weight's) times the sum of the terms' magnitudes
    (``|G| |W|``, ``|G|^T |h|``, from float64), and ``G`` itself inherits the
    rounding of the logits, relative to their size ``max |z|``. Two absolute errors come on
    top of that for each entry of ``G``: float32's ``p - 1`` near ``p = 1`` (a few float32
    ulps of 1, times the per-token gradient scale ``1/count``) and, in float16, the flush of
    tiny entries (and results) to its subnormal grid.
    """
    h, w = hidden.double(), weight.double()
    z = (h @ w.T).requires_grad_(True)
    (G,) = torch.autograd.grad(mf.pretrain_loss(z, labels), z)
    finfo = torch.finfo(hidden.dtype)
    n_chunks = -(-labels.numel() // chunk)
    tol = UNIT_ROUNDOFF[hidden.dtype] * (8 * (1 + z.detach().abs().max()) + 2 * n_chunks)
    floor = 2.0**-20 / (labels != IGN).sum().clamp_min(1) + finfo.tiny * finfo.eps
    G = tol * G.abs() + floor
    out_floor = 2 * finfo.tiny * finfo.eps  # the results themselves may land on the subnormal grid
    bounds = (G @ w.abs() + out_floor, G.flatten(0, -2).T @ h.abs().flatten(0, -2) + out_floor)
    for a, b, bound in zip(ours, ref, bounds):
        err = (a.double() - b.double()).abs()
        assert (err <= bound).all(), f"max error / bound = {(err / bound).max():.3g}"


def reference_loss(hidden, weight, labels, **kw):
    return mf.pretrain_loss(hidden @ weight.T, labels, **kw)


def autograd_value_and_grads(fn, hidden, weight):
    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    out = fn(h, w)
    gh, gw = torch.autograd.grad(out, (h, w))
    return out.detach(), gh, gw


def func_value_and_grads(fn, hidden, weight):
    (gh, gw), out = torch.func.grad_and_value(fn, argnums=(0, 1))(hidden, weight)
    return out, gh, gw


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("path", [autograd_value_and_grads, func_value_and_grads], ids=["autograd", "func"])
@given(problems())
def test_loss_and_gradients_equal_the_unchunked_loss(path, problem):
    hidden, weight, labels, chunk = problem
    ours = path(lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=chunk), hidden, weight)
    ref = path(lambda h, w: reference_loss(h, w, labels), hidden, weight)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **EXACT)


@given(problems(), st.sampled_from([1, 2, 7]), st.booleans())
def test_num_tokens_normalises_like_pretrain_loss(problem, n, as_tensor):
    hidden, weight, labels, chunk = problem
    num = torch.tensor(n) if as_tensor else n
    ours = autograd_value_and_grads(
        lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=chunk, num_tokens=num), hidden, weight)
    ref = autograd_value_and_grads(lambda h, w: reference_loss(h, w, labels, num_tokens=num), hidden, weight)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **EXACT)
    summed = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk, num_tokens=1)
    counted = (labels != IGN).sum()
    mean = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    torch.testing.assert_close(summed, mean * counted.clamp_min(1), **EXACT)


@given(problems())
def test_micro_batches_with_the_global_count_sum_to_the_full_loss(problem):
    hidden, weight, labels, chunk = problem
    total = (labels != IGN).sum()
    parts = sum(chunked_cross_entropy(hidden[i:i + 1], weight, labels[i:i + 1], chunk_size=chunk, num_tokens=total)
                for i in range(hidden.shape[0]))
    torch.testing.assert_close(parts, chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk), **EXACT)


@pytest.mark.parametrize("path", [autograd_value_and_grads, func_value_and_grads], ids=["autograd", "func"])
@given(problems())
def test_no_counted_token_gives_zero_loss_and_zero_gradient(path, problem):
    hidden, weight, labels, chunk = problem
    labels = torch.full_like(labels, IGN)
    loss, gh, gw = path(lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=chunk), hidden, weight)
    assert loss.item() == 0.0 and torch.all(gh == 0) and torch.all(gw == 0)


@given(problems())
def test_ignored_positions_get_exactly_zero_hidden_gradient(problem):
    hidden, weight, labels, chunk = problem
    _, gh, _ = autograd_value_and_grads(
        lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=chunk), hidden, weight)
    assert torch.all(gh[labels == IGN] == 0)


@given(problems(dtype=torch.float32))
def test_float32_gradients_match_to_1e6(problem):
    hidden, weight, labels, chunk = problem
    ours = autograd_value_and_grads(
        lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=chunk), hidden, weight)
    ref = autograd_value_and_grads(lambda h, w: reference_loss(h, w, labels), hidden, weight)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(problems(dtype=torch.float64))
def test_half_precision_inputs_give_a_float32_loss_close_to_the_reference(dtype, problem):
    hidden, weight, labels, chunk = problem
    h, w = hidden.to(dtype), weight.to(dtype)
    ours = autograd_value_and_grads(lambda a, b: chunked_cross_entropy(a, b, labels, chunk_size=chunk), h, w)
    ref = autograd_value_and_grads(lambda a, b: reference_loss(a, b, labels), h, w)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-3, atol=1e-3)
    assert_half_grads_close(ours[1:], ref[1:], h, w, labels, chunk)
    # and the loss is what float64 gives on the same half-precision values, to float32-ish accuracy
    exact = reference_loss(h.double(), w.double(), labels).float()
    torch.testing.assert_close(ours[0], exact, rtol=1e-2, atol=1e-2)


@given(problems(), st.integers(1, 3))
def test_vmap_over_a_leading_axis_equals_a_loop(problem, n):
    hidden, weight, labels, chunk = problem
    stack = torch.stack([hidden * (i + 1) for i in range(n)])

    def loss(h, w):
        return chunked_cross_entropy(h, w, labels, chunk_size=chunk)

    batched = torch.func.vmap(torch.func.grad_and_value(loss), in_dims=(0, None))(stack, weight)
    for i in range(n):
        g, v = torch.func.grad_and_value(loss)(stack[i], weight)
        torch.testing.assert_close(batched[0][i], g, **EXACT)
        torch.testing.assert_close(batched[1][i], v, **EXACT)


# --------------------------------------------------------------------------- sequence log-probs


@given(problems(), seeds)
def test_sequence_logps_and_their_vjp_equal_the_unchunked_ones(problem, seed):
    hidden, weight, labels, chunk = problem
    cot = torch.randn(labels.shape[0], generator=gen(seed), dtype=hidden.dtype)

    def ours(h, w):
        return chunked_sequence_logps(h, w, labels, chunk_size=chunk)[0]

    def ref(h, w):
        return mf.sequence_logps(h @ w.T, labels)[0]

    a, n_a = chunked_sequence_logps(hidden, weight, labels, chunk_size=chunk)
    b, n_b = mf.sequence_logps(hidden @ weight.T, labels)
    torch.testing.assert_close(a, b, **EXACT)
    assert torch.equal(n_a, n_b) and n_a.dtype == torch.int64
    # autograd, with a random cotangent per sequence
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    g_ours = torch.autograd.grad(ours(h, w), (h, w), cot)
    g_ref = torch.autograd.grad(ref(h, w), (h, w), cot)
    # torch.func.vjp
    _, vjp = torch.func.vjp(ours, hidden, weight)
    for x, y, z in zip(g_ours, g_ref, vjp(cot)):
        torch.testing.assert_close(x, y, **EXACT)
        torch.testing.assert_close(z, y, **EXACT)


@given(problems())
def test_token_logps_are_zero_at_ignored_positions_and_sum_to_minus_the_summed_loss(problem):
    hidden, weight, labels, chunk = problem
    logp = chunked_token_logps(hidden, weight, labels, chunk_size=chunk)
    assert logp.shape == labels.shape
    assert torch.all(logp[labels == IGN] == 0) and torch.all(logp <= 0)
    torch.testing.assert_close(-logp.sum(), reference_loss(hidden, weight, labels, num_tokens=1), **EXACT)


# --------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@given(st.integers(2, 4), st.integers(1, 3), seeds, st.booleans())
def test_forward_and_backward_never_build_the_full_logits(chunks, extra, seed, recompute):
    N, D, V = 24, 3, 40 * extra  # V*D and N*D stay below a chunk's logits C*V (C = 24 / chunks >= 6)
    g = gen(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    C = N // chunks
    with _LargestTensor() as ours:
        torch.autograd.grad(chunked_cross_entropy(hidden, weight, labels, chunk_size=C, recompute=recompute),
                            (hidden, weight))
    with _LargestTensor() as ref:
        torch.autograd.grad(reference_loss(hidden, weight, labels), (hidden, weight))
    assert ref.largest == N * V
    assert ours.largest == C * V


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    h, w, y = torch.randn(2, 3, 4), torch.randn(10, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="do not line up"):
        chunked_cross_entropy(h, w, y[:, :2])
    with pytest.raises(ValueError, match="output projection"):
        chunked_cross_entropy(h, w.T, y)
    with pytest.raises(ValueError, match="output projection"):
        chunked_cross_entropy(h, w[None], y)
    with pytest.raises(ValueError, match=r"\[\.\.\., T, D\]"):
        chunked_cross_entropy(torch.randn(4), w, y)
    with pytest.raises(ValueError, match="floating-point"):
        chunked_cross_entropy(h.long(), w, y)
    with pytest.raises(ValueError, match="one dtype"):
        chunked_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match="integer token ids"):
        chunked_sequence_logps(h, w, y.float())
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            chunked_cross_entropy(h, w, y, chunk_size=bad)
    with pytest.raises(ValueError, match="non-negative"):
        chunked_cross_entropy(h, w, y, num_tokens=-1)


# --------------------------------------------------------------------------- gradients computed in the forward


@pytest.mark.parametrize("path", [autograd_value_and_grads, func_value_and_grads], ids=["autograd", "func"])
@given(problems(), st.sampled_from([None, 1, 5]))
def test_recompute_false_gives_the_same_loss_and_gradients(path, problem, num):
    hidden, weight, labels, chunk = problem

    def loss(recompute):
        return lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=chunk, num_tokens=num,
                                                  recompute=recompute)

    ref = path(lambda h, w: reference_loss(h, w, labels, num_tokens=num), hidden, weight)
    for a, b, c in zip(path(loss(False), hidden, weight), path(loss(True), hidden, weight), ref):
        torch.testing.assert_close(a, c, **EXACT)
        torch.testing.assert_close(b, c, **EXACT)


@given(problems(), st.sampled_from(["hidden", "weight"]))
def test_recompute_false_with_one_frozen_input(problem, frozen):
    hidden, weight, labels, chunk = problem
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    live = w if frozen == "hidden" else h
    (ours,) = torch.autograd.grad(chunked_cross_entropy(h, w, labels, chunk_size=chunk, recompute=False), live)
    (ref,) = torch.autograd.grad(reference_loss(h, w, labels), live)
    torch.testing.assert_close(ours, ref, **EXACT)
    with torch.no_grad():  # no gradient wanted: plain forward, same value
        torch.testing.assert_close(chunked_cross_entropy(h, w, labels, chunk_size=chunk, recompute=False),
                                   reference_loss(h, w, labels), **EXACT)


@given(problems(), st.integers(1, 3))
def test_recompute_false_under_vmap_of_grad_equals_a_loop(problem, n):
    hidden, weight, labels, chunk = problem
    stack = torch.stack([hidden * (i + 1) for i in range(n)])

    def loss(h, w):
        return chunked_cross_entropy(h, w, labels, chunk_size=chunk, recompute=False)

    batched = torch.func.vmap(torch.func.grad_and_value(loss, argnums=(0, 1)), in_dims=(0, None))(stack, weight)
    for i in range(n):
        (gh, gw), v = torch.func.grad_and_value(lambda h, w: reference_loss(h, w, labels), argnums=(0, 1))(
            stack[i], weight)
        torch.testing.assert_close(batched[0][0][i], gh, **EXACT)
        torch.testing.assert_close(batched[0][1][i], gw, **EXACT)
        torch.testing.assert_close(batched[1][i], v, **EXACT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(problems())
def test_recompute_false_in_half_precision_matches_recompute(dtype, problem):
    hidden, weight, labels, chunk = problem
    h, w = hidden.to(dtype), weight.to(dtype)
    a = autograd_value_and_grads(lambda x, y: chunked_cross_entropy(x, y, labels, chunk_size=chunk), h, w)
    b = autograd_value_and_grads(
        lambda x, y: chunked_cross_entropy(x, y, labels, chunk_size=chunk, recompute=False), h, w)
    assert all(x.dtype == y.dtype for x, y in zip(a, b))
    torch.testing.assert_close(a[0], b[0], rtol=1e-3, atol=1e-3)
    assert_half_grads_close(a[1:], b[1:], h, w, labels, chunk)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("recompute", [True, False])
def test_compiled_grad_and_value_gives_both_gradients(recompute):
    """Under ``torch.compile(torch.func.grad_and_value(...))`` ``ctx.needs_input_grad`` may read False
    for a differentiated input (torch 2.13); the weight's gradient must not come back as zeros."""
    g = gen(0)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(70, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 70, (2, 5), generator=g)
    labels[1, 3:] = IGN

    def loss(h, w):
        return chunked_cross_entropy(h, w, labels, chunk_size=3, recompute=recompute)

    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad_and_value(loss, argnums=(0, 1)), backend="eager", fullgraph=True)
    (gh, gw), value = compiled(hidden, weight)
    reference = torch.func.grad_and_value(lambda h, w: reference_loss(h, w, labels), argnums=(0, 1))
    (rh, rw), ref = reference(hidden, weight)
    torch.testing.assert_close(value, ref, **EXACT)
    torch.testing.assert_close(gh, rh, **EXACT)
    torch.testing.assert_close(gw, rw, **EXACT)
