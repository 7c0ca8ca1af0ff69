import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import accumulate as acc
from minillm_func import optim
from minillm_func import tree as T
from strategies import gen, ragged_batches, splits


def loss_fn(params, feats, labels, num_tokens=None):
    return mf.pretrain_loss(feats @ params["W"], labels, num_tokens=num_tokens)


@given(ragged_batches(), st.data())
def test_k_micro_batches_give_the_full_batch_update(batch, data):
    feats, labels = batch
    cuts = data.draw(splits(feats.shape[0]))
    params = {"W": torch.randn(feats.shape[-1], 7, generator=gen(1), dtype=torch.float64)}
    full_grads = torch.func.grad(loss_fn)(params, feats, labels)

    state = acc.accum_init(params)
    for a, b in zip(cuts, cuts[1:]):
        # the micro-batch's *summed* loss (num_tokens=1) and its own count
        g = torch.func.grad(loss_fn)(params, feats[a:b], labels[a:b], 1)
        state = acc.accum_add(state, g, (labels[a:b] != mf.IGNORE_INDEX).sum())
    k = len(cuts) - 1
    assert acc.accum_ready(state, k).item() and not acc.accum_ready(state, k + 1).item()
    torch.testing.assert_close(acc.accum_result(state)["W"], full_grads["W"], rtol=1e-12, atol=1e-14)

    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, impl="reference"))
    s0 = opt.init(params)
    p_full, _ = optim.step(opt, full_grads, s0, params)
    p_acc, _ = optim.step(opt, acc.accum_result(state), s0, params)
    torch.testing.assert_close(p_acc["W"], p_full["W"], rtol=1e-12, atol=1e-14)

    reset = acc.accum_reset(state)
    assert reset.micro_step.item() == 0 and reset.token_sum.item() == 0
    assert all(torch.all(x == 0) for x in T.leaves(reset.grad_sum))


def test_an_empty_window_gives_zero_gradient_not_nan():
    state = acc.accum_init({"w": torch.zeros(3)})
    state = acc.accum_add(state, {"w": torch.zeros(3)}, 0)
    assert torch.equal(acc.accum_result(state)["w"], torch.zeros(3))
