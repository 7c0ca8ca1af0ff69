"""Padding-free packing: best-fit decreasing, no attention across examples, and packed == padded
for the SFT loss and every DPO loss type, in loss and gradients."""
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import cli
from minillm_func.data import Batches, ConversationDataset, PackedDataset, PreferenceDataset, best_fit_decreasing, collate
from minillm_func.losses import DPO_LOSS_TYPES
from minillm_func.objectives import add_reference_logps, chunked_head, dpo_objective, logits_head, sft_objective

from strategies import seeds

TOK = mf.ByteTokenizer()
CFG = mf.ModelConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
MODEL = mf.build_model(CFG)
PARAMS = MODEL.init(0)


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefgh ,.") for _ in range(n))


def sft_records(seed: int, n: int, longest: int = 40):
    rng = random.Random(seed)
    return [{"prompt": text(rng, rng.randint(1, longest // 2)), "completion": text(rng, rng.randint(1, longest))}
            for _ in range(n)]


def dpo_records(seed: int, n: int, longest: int = 30):
    rng = random.Random(seed)
    return [{"prompt": text(rng, rng.randint(1, longest // 2)), "chosen": text(rng, rng.randint(1, longest)),
             "rejected": text(rng, rng.randint(1, longest))} for _ in range(n)]


def whole(dataset) -> dict:
    return collate([dataset[i] for i in range(len(dataset))], pad_id=TOK.pad_id)


def loss_and_grads(loss_fn, params, batch, extras=None):
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    total, (count, metrics) = loss_fn(params, batch, extras or {})
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return total.detach(), count, metrics, grads


def assert_same(a, b, *, rtol=1e-5, atol=1e-6):
    """Equal counts; loss and metrics within ``rtol``; each gradient within ``rtol`` of its own largest
    entry (float32: the packed forward adds the same terms in another order, and a loss in the
    hundreds, as sppo_hard's, leaves round-off far above 1e-5 of its smallest entries)."""
    (la, na, ma, ga), (lb, nb, mb, gb) = a, b
    assert int(na) == int(nb)
    torch.testing.assert_close(lb, la, rtol=rtol, atol=atol)
    for x, y in zip(ga, gb):
        if x is None:
            assert y is None or y.abs().max() == 0
        else:
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol + rtol * float(x.abs().max()))
    for k in ma:
        torch.testing.assert_close(torch.as_tensor(mb[k]), torch.as_tensor(ma[k]), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- bin packing


def reference_bfd(lengths, capacity):
    """Best-fit decreasing written the slow, obvious way: scan every open bin for the tightest fit."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@settings(max_examples=200)
@given(st.lists(st.integers(1, 64), max_size=60), st.integers(64, 200))
def test_best_fit_decreasing_places_each_item_once_within_capacity_as_the_reference(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Ties between bins of equal room may go either way; the multiset of bin fillings may not.
    ref = reference_bfd(lengths, capacity)
    assert len(bins) == len(ref)
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == sorted(sorted(lengths[i] for i in b) for b in ref)


def test_best_fit_decreasing_refuses_an_item_longer_than_a_row():
    with pytest.raises(ValueError, match="item 1 has length 9 > capacity 8"):
        best_fit_decreasing([3, 9], 8)


def test_packing_fills_rows_far_better_than_padding():
    data = ConversationDataset(sft_records(0, 200, longest=60), TOK, 96)
    packed = PackedDataset(data)
    assert packed.fill > 0.9 and packed.examples_per_row > 1.5
    assert sum(packed.lengths()) == sum(int(data[i]["input_ids"].shape[0]) for i in range(len(data)))


# --------------------------------------------------------------------------- the model


def test_packed_rows_give_each_example_the_logits_it_gets_alone_and_nothing_crosses():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 5]
    seqs = [torch.randint(0, TOK.vocab_size, (n,), generator=g) for n in lengths]
    row = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    logits = MODEL.apply(PARAMS, row, position_ids=pos)
    starts = [0, 7, 8, 20]
    for s, n, seq in zip(starts, lengths, seqs):  # the reference: the example run alone, plain causal attention
        torch.testing.assert_close(logits[0, s:s + n], MODEL.apply(PARAMS, seq[None])[0], rtol=1e-5, atol=1e-5)
    changed = row.clone()
    changed[0, 8:20] = (changed[0, 8:20] + 1) % TOK.vocab_size  # perturb the third example only
    other = MODEL.apply(PARAMS, changed, position_ids=pos)
    keep = torch.ones(row.shape[1], dtype=torch.bool)
    keep[8:20] = False
    assert torch.equal(other[0, keep], logits[0, keep])
    assert not torch.allclose(other[0, 8:20], logits[0, 8:20])


def test_position_ids_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="position_ids shape"):
        MODEL.apply(PARAMS, torch.zeros(1, 4, dtype=torch.long), position_ids=torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------- SFT and DPO: packed == padded


@settings(max_examples=12, deadline=None)
@given(seeds, st.integers(2, 14), st.sampled_from(["logits", "chunked"]))
def test_packed_sft_equals_padded_sft_in_loss_and_gradients(seed, n, head_kind):
    data = ConversationDataset(sft_records(seed, n), TOK, 48)
    packed = PackedDataset(data)
    head = logits_head(MODEL.apply) if head_kind == "logits" else chunked_head(MODEL.apply_hidden, chunk_size=16)
    loss_fn = sft_objective(head)
    assert_same(loss_and_grads(loss_fn, PARAMS, whole(data)), loss_and_grads(loss_fn, PARAMS, whole(packed)))


@settings(max_examples=6, deadline=None)
@given(seeds, st.integers(2, 10))
def test_packed_sft_with_a_loss_mask_equals_padded(seed, n):
    data = ConversationDataset(sft_records(seed, n), TOK, 48)
    g = torch.Generator().manual_seed(seed)
    items = [dict(data[i], loss_mask=torch.rand(data[i]["input_ids"].shape, generator=g) < 0.6)
             for i in range(len(data))]
    masked = ConversationDataset(sft_records(seed, n), TOK, 48)
    masked.items = items
    loss_fn = sft_objective(MODEL.apply)
    assert_same(loss_and_grads(loss_fn, PARAMS, whole(masked)),
                loss_and_grads(loss_fn, PARAMS, whole(PackedDataset(masked))))


def dpo_kwargs(loss_type):
    return {"bco_pair": {"bco_delta": 0.05}, "exo_pair": {"label_smoothing": 1e-3}}.get(loss_type, {})


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_packed_dpo_equals_padded_dpo_for_every_loss_type(loss_type):
    """In float64, to 1e-10: the packed forward adds the same terms in another order, nothing else.
    (In float32 some types amplify that round-off: discopop's gate divides the margin by tau = 0.05,
    and its gradients then differ by ~2e-5 of their norm; the float32 tests below keep to 1e-5.)"""
    data = PreferenceDataset(dpo_records(1, 9), TOK, 40)
    packed = PackedDataset(data)
    assert len(packed) < len(data)  # several pairs per row
    params = {k: v.double() for k, v in PARAMS.items()}
    ref = {k: v + 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=v.dtype)
           for k, v in params.items()}
    loss_fn = dpo_objective(MODEL.apply, loss_type=loss_type, **dpo_kwargs(loss_type))
    extras = {"ref_params": ref}
    assert_same(loss_and_grads(loss_fn, params, whole(data), extras),
                loss_and_grads(loss_fn, params, whole(packed), extras), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sppo_hard", "simpo"])
def test_packed_dpo_equals_padded_in_float32_to_1e_5(loss_type):
    data = PreferenceDataset(dpo_records(1, 9), TOK, 40)
    ref = {k: v + 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in PARAMS.items()}
    loss_fn = dpo_objective(MODEL.apply, loss_type=loss_type, **dpo_kwargs(loss_type))
    assert_same(loss_and_grads(loss_fn, PARAMS, whole(data), {"ref_params": ref}),
                loss_and_grads(loss_fn, PARAMS, whole(PackedDataset(data)), {"ref_params": ref}), atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(seeds, st.integers(1, 10), st.sampled_from(["sigmoid", ["sigmoid", "sft"], "ipo", "aot"]))
def test_packed_dpo_equals_padded_over_random_lengths_and_batches(seed, n, loss_type):
    data = PreferenceDataset(dpo_records(seed, n), TOK, 40)
    packed = PackedDataset(data, capacity=int(random.Random(seed).choice([80, 120, 200])))
    ref = {k: v * 1.01 for k, v in PARAMS.items()}
    loss_fn = dpo_objective(chunked_head(MODEL.apply_hidden, chunk_size=16), loss_type=loss_type)
    assert_same(loss_and_grads(loss_fn, PARAMS, whole(data), {"ref_params": ref}),
                loss_and_grads(loss_fn, PARAMS, whole(packed), {"ref_params": ref}), atol=1e-5)


def test_packed_dpo_with_precomputed_reference_equals_padded():
    data = PreferenceDataset(dpo_records(2, 11), TOK, 40)
    ref = {k: v * 0.99 for k, v in PARAMS.items()}
    with_ref = add_reference_logps(MODEL, ref, data)
    packed = add_reference_logps(MODEL, ref, PackedDataset(data))
    assert isinstance(packed, PackedDataset) and len(packed) < len(data)
    loss_fn = dpo_objective(MODEL.apply)
    assert_same(loss_and_grads(loss_fn, PARAMS, whole(with_ref)), loss_and_grads(loss_fn, PARAMS, whole(packed)),
                atol=1e-5)


def test_a_trainer_step_and_evaluate_on_packed_batches_equal_the_padded_ones():
    data = ConversationDataset(sft_records(3, 16), TOK, 48)
    packed = PackedDataset(data)
    trainer = mf.create_trainer("sft", MODEL, learning_rate=1e-3)
    state = trainer.init(PARAMS)
    a, ma = trainer.step(state, whole(data))
    b, mb = trainer.step(state, whole(packed))
    torch.testing.assert_close(mb["loss"], ma["loss"], rtol=1e-5, atol=1e-6)
    for k in PARAMS:
        torch.testing.assert_close(b.params[k], a.params[k], rtol=1e-5, atol=1e-6)
    ev_padded = trainer.evaluate(state, Batches(data, 5, shuffle=False, epochs=1))
    ev_packed = trainer.evaluate(state, Batches(packed, 2, shuffle=False, epochs=1))
    assert ev_packed["loss"] == pytest.approx(ev_padded["loss"], rel=1e-5)


def test_load_dataset_packs_sft_and_dpo_and_refuses_the_rest(tmp_path):
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft_records(0, 6)))
    (tmp_path / "dpo.jsonl").write_text("\n".join(json.dumps(r) for r in dpo_records(0, 6)))
    (tmp_path / "kto.jsonl").write_text("\n".join(json.dumps({**r, "label": True}) for r in sft_records(0, 6)))
    sft = mf.load_dataset(tmp_path / "sft.jsonl", TOK, 48, kind="sft", pack=True)
    dpo = mf.load_dataset(tmp_path / "dpo.jsonl", TOK, 40, kind="dpo", pack=True)
    assert isinstance(sft, PackedDataset) and sft.capacity == 48
    assert isinstance(dpo, PackedDataset) and dpo.capacity == 80 and "sequence_ids" in dpo[0]
    assert not isinstance(mf.load_dataset(tmp_path / "sft.jsonl", TOK, 48, kind="sft"), PackedDataset)
    with pytest.raises(ValueError, match="not packed"):
        mf.load_dataset(tmp_path / "kto.jsonl", TOK, 48, kind="kto", pack=True)


def test_cli_trains_sft_and_dpo_packed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = mf.demo_corpus(1, n_pretrain=20, n_sft=24, n_dpo=16)
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in corpus.sft))
    (tmp_path / "dpo.jsonl").write_text("\n".join(json.dumps(r) for r in corpus.dpo))
    tiny = ["--dim", "32", "--n-layers", "1", "--n-heads", "4", "--batch-size", "2", "--no-progress"]
    assert cli.main(["train", "sft", "--data", "sft.jsonl", "--out", "s", "--steps", "2", "--pack",
                     "--max-length", "64", *tiny]) == 0
    out = capsys.readouterr().out
    assert "epochs of the data" in out
    records = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert all("epoch" in r for r in records if r.get("split") == "train")
    assert cli.main(["train", "dpo", "--data", "dpo.jsonl", "--out", "d", "--init", "s", "--steps", "2",
                     "--pack", "--batch-size", "2", "--no-progress"]) == 0
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["pack"] is True and config["max_length"] == 64  # the model's limit; rows of pairs hold 128
    _, meta = mf.checkpoint.load(mf.checkpoint.resolve(tmp_path / "d"))
    assert meta["model_config"]["max_seq_len"] == 64
    code = cli.main(["train", "kto", "--data", "sft.jsonl", "--out", "k", "--pack", "--steps", "1", *tiny])
    assert code == 2 and "--pack applies to" in capsys.readouterr().err


@pytest.mark.parametrize("setup", ["lora dpo", "checkpointed chunked sft"])
def test_trainer_compositions_give_the_padded_update_on_packed_batches(setup):
    """LoRA (its reference is the base, run through the packed path too) and activation
    checkpointing with the chunked loss see packed rows through the same heads."""
    if setup == "lora dpo":
        data = PreferenceDataset(dpo_records(4, 8), TOK, 40)
        trainer = mf.create_trainer("dpo", MODEL, learning_rate=1e-2,
                                    lora=mf.lora.LoraConfig(rank=4, alpha=8, targets=("wq", "wv")))
    else:
        data = ConversationDataset(sft_records(4, 12), TOK, 48)
        trainer = mf.create_trainer("sft", MODEL, learning_rate=1e-3,
                                    memory=mf.MemoryConfig(chunked_loss=True, activation_checkpointing=True))
    # float64: Adam's first step moves each param by about lr * sign(gradient), so in float32 an
    # entry whose gradient is at round-off level could move either way.
    state = trainer.init({k: v.double() for k, v in PARAMS.items()})
    a, ma = trainer.step(state, whole(data))
    b, mb = trainer.step(state, whole(PackedDataset(data)))
    torch.testing.assert_close(mb["loss"], ma["loss"], rtol=1e-10, atol=1e-12)
    for k in a.params:
        torch.testing.assert_close(b.params[k], a.params[k], rtol=1e-10, atol=1e-12)


def test_a_run_configured_before_padding_free_packing_resumes_unpacked(tmp_path, monkeypatch, capsys):
    """config.json of earlier versions holds "pack": true for every stage (it meant pretraining blocks)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft_records(5, 24)))
    tiny = ["--dim", "32", "--n-layers", "1", "--n-heads", "4", "--batch-size", "4", "--max-length", "48",
            "--T-max", "10", "--no-progress"]
    assert cli.main(["train", "sft", "--data", "sft.jsonl", "--out", "old", "--steps", "2", *tiny]) == 0
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["pack"] = True
    del config["settings_version"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert cli.main(["train", "sft", "--out", "old", "--resume", "--steps", "4", "--no-progress"]) == 0
    assert cli.main(["train", "sft", "--data", "sft.jsonl", "--out", "straight", "--steps", "4", *tiny]) == 0
    a = mf.checkpoint.load(mf.checkpoint.resolve(tmp_path / "old"))[0].params
    b = mf.checkpoint.load(mf.checkpoint.resolve(tmp_path / "straight"))[0].params
    assert all(torch.equal(a[k], b[k]) for k in a)
