"""ORPO and KTO: the losses against float64 transcriptions of their papers, the data, the stages."""
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func.losses import kto_loss, orpo_loss


def orpo_reference(sw, sl, nw, nl, beta):
    """Hong et al. 2024, eq. 6-7, per pair, in plain float64 arithmetic."""
    total = 0.0
    for a, b, m, n in zip(sw.tolist(), sl.tolist(), nw.tolist(), nl.tolist()):
        pw, pl = math.exp(a / m), math.exp(b / n)
        log_or = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        total += -(a / m) - beta * math.log(1 / (1 + math.exp(-log_or)))
    return total


@given(seed=st.integers(0, 10_000), beta=st.floats(0.01, 2.0))
def test_orpo_loss_equals_the_paper(seed, beta):
    g = torch.Generator().manual_seed(seed)
    n_w, n_l = torch.randint(1, 20, (5,), generator=g).double(), torch.randint(1, 20, (5,), generator=g).double()
    s_w = -torch.rand(5, generator=g, dtype=torch.float64) * 3 * n_w - 1e-3
    s_l = -torch.rand(5, generator=g, dtype=torch.float64) * 3 * n_l - 1e-3
    loss, metrics = orpo_loss(s_w, s_l, n_w, n_l, beta=beta, num_pairs=1)
    assert loss.item() == pytest.approx(orpo_reference(s_w, s_l, n_w, n_l, beta), rel=1e-10, abs=1e-12)
    assert metrics["nll_loss"].item() == pytest.approx((-(s_w / n_w)).mean().item(), rel=1e-12)


def test_orpo_prefers_raising_the_chosen_odds():
    sw = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    sl = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    loss, _ = orpo_loss(sw, sl, torch.tensor([5.0]), torch.tensor([5.0]))
    gw, gl = torch.autograd.grad(loss, (sw, sl))
    assert gw.item() < 0 < gl.item()  # descent raises the chosen, lowers the rejected


def kto_reference(pol, ref, good, pol_kl, ref_kl, beta, wd, wu):
    z0 = max(0.0, sum(a - b for a, b in zip(pol_kl, ref_kl)) / len(pol_kl))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    return sum(wd * (1 - sig(beta * ((p - r) - z0))) if y else wu * (1 - sig(beta * (z0 - (p - r))))
               for p, r, y in zip(pol, ref, good)) / len(pol)


@given(seed=st.integers(0, 10_000), beta=st.floats(0.01, 2.0), wd=st.floats(0.1, 3.0), wu=st.floats(0.1, 3.0))
def test_kto_loss_equals_the_paper(seed, beta, wd, wu):
    g = torch.Generator().manual_seed(seed)
    pol, ref, pol_kl, ref_kl = (-torch.rand(6, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    good = torch.rand(6, generator=g) < 0.5
    loss, metrics = kto_loss(pol, ref, good, pol_kl, ref_kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    expected = kto_reference(pol.tolist(), ref.tolist(), good.tolist(), pol_kl.tolist(), ref_kl.tolist(), beta, wd, wu)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert metrics["kl"].item() == pytest.approx(max(0.0, (pol_kl - ref_kl).mean().item()), abs=1e-12)


def test_kto_reference_point_takes_no_gradient():
    pol = torch.tensor([-1.0, -3.0], dtype=torch.float64, requires_grad=True)
    pol_kl = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    loss, _ = kto_loss(pol, torch.tensor([-2.0, -2.0]).double(), torch.tensor([True, False]), pol_kl,
                       torch.tensor([-3.0, -3.0]).double())
    g_pol, g_kl = torch.autograd.grad(loss, (pol, pol_kl), allow_unused=True)
    assert g_kl is None and bool((g_pol != 0).all())


# --------------------------------------------------------------------------- data and stages

TOK = mf.ByteTokenizer()


def kto_records():
    c = mf.demo_corpus(0, n_dpo=16)
    return [{"prompt": x["prompt"], "completion": x["chosen"] if i % 2 else x["rejected"], "label": bool(i % 2)}
            for i, x in enumerate(c.dpo)]


def test_unpaired_items_pair_each_prompt_with_the_previous_completion_for_the_kl_term():
    records = kto_records()
    ds = mf.load_dataset(records, TOK, 64, kind="kto")
    assert isinstance(ds, mf.data.UnpairedPreferenceDataset) and len(ds) == len(records)
    sft = mf.ConversationDataset([{"prompt": r["prompt"], "completion": r["completion"]} for r in records], TOK, 64)
    for i, item in enumerate(ds):
        assert torch.equal(item["input_ids"], sft[i]["input_ids"]) and torch.equal(item["labels"], sft[i]["labels"])
        mismatched = mf.ConversationDataset([{"prompt": records[i]["prompt"],
                                              "completion": records[i - 1]["completion"]}], TOK, 64)[0]
        assert torch.equal(item["kl_input_ids"], mismatched["input_ids"])
        assert bool(item["desirable"]) == records[i]["label"]
    with pytest.raises(ValueError, match="'label' must be true"):
        mf.load_dataset([{**records[0], "label": "yes"}], TOK, 64, kind="kto")


@pytest.mark.parametrize("kind", ["orpo", "kto"])
def test_orpo_and_kto_trainers_lower_their_loss(kind):
    model = mf.build_model(mf.ModelConfig(vocab_size=TOK.vocab_size, dim=48, n_layers=2, n_heads=4, max_seq_len=64))
    params = model.init(0)
    data = mf.load_dataset(mf.demo_corpus(0, n_dpo=32).dpo if kind == "orpo" else kto_records(), TOK, 64, kind=kind)
    trainer = mf.create_trainer(kind, model, learning_rate=3e-3)
    state = trainer.init(params)
    assert ("ref_params" in state.extras) == (kind == "kto")
    evals = lambda: mf.Batches(data, 32, shuffle=False, epochs=1)  # noqa: E731
    before = trainer.evaluate(state, evals())["loss"]
    state = trainer.fit(state, mf.Batches(data, 8, seed=0), 15, progress=False)
    assert trainer.evaluate(state, evals())["loss"] < before


def test_lora_kto_takes_its_reference_from_the_base():
    model = mf.build_model(mf.ModelConfig(vocab_size=TOK.vocab_size, dim=48, n_layers=2, n_heads=4, max_seq_len=64))
    params = model.init(0)
    data = mf.load_dataset(kto_records(), TOK, 64, kind="kto")
    batch = mf.collate([data[i] for i in range(4)], pad_id=TOK.pad_id)
    trainer = mf.create_trainer("kto", model, lora=mf.lora.LoraConfig(rank=2), learning_rate=1e-2)
    state = trainer.init(params)
    assert "ref_params" not in state.extras
    _, (_, metrics) = trainer.loss_fn(state.params, batch, state.extras)
    assert metrics["rewards/chosen"].item() == 0.0 and metrics["kl"].item() == 0.0  # adapters at init: policy = base


def test_cli_trains_orpo_and_kto(tmp_path, monkeypatch, capsys):
    from minillm_func import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in mf.demo_corpus(0, n_dpo=16).dpo))
    (tmp_path / "kto.jsonl").write_text("\n".join(json.dumps(x) for x in kto_records()))
    common = ["--steps", "2", "--batch-size", "4", "--dim", "32", "--n-layers", "1", "--n-heads", "2",
              "--max-length", "64", "--no-progress"]
    assert cli.main(["train", "orpo", "--data", "pairs.jsonl", "--out", "o", *common]) == 0
    assert cli.main(["train", "kto", "--data", "kto.jsonl", "--out", "k", *common]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--ckpt", "k", "--data", "kto.jsonl"]) == 0
    assert "kl" in json.loads(capsys.readouterr().out)
    assert cli.main(["train", "kto", "--data", "pairs.jsonl", "--out", "x", *common]) == 1
    assert "kto training needs" in capsys.readouterr().err


def test_an_sft_record_with_a_label_column_of_another_kind_stays_sft():
    records = [{"prompt": "Q: a\nA: ", "completion": "b", "label": "arithmetic"}]
    assert isinstance(mf.load_dataset(records, TOK, 32, kind="sft"), mf.ConversationDataset)
    assert mf.data.detect_kind({"prompt": "p", "completion": "c", "label": False}, "x") == "kto"


def test_orpo_gradient_stays_finite_for_a_certain_reply():
    for mean in (-1e-8, -0.0, -1e-4):
        sw = torch.tensor([mean * 4], dtype=torch.float64, requires_grad=True)
        loss, _ = orpo_loss(sw, torch.tensor([-8.0], dtype=torch.float64), torch.tensor([4.0]), torch.tensor([4.0]))
        (g,) = torch.autograd.grad(loss, sw)
        assert torch.isfinite(loss) and torch.isfinite(g)


def test_cli_eval_scores_kto_with_the_runs_beta_and_refuses_other_stages_flags(tmp_path, monkeypatch, capsys):
    from minillm_func import checkpoint, cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "kto.jsonl").write_text("\n".join(json.dumps(x) for x in kto_records()))
    common = ["--steps", "2", "--batch-size", "4", "--dim", "32", "--n-layers", "1", "--n-heads", "2",
              "--max-length", "64", "--no-progress"]
    assert cli.main(["train", "kto", "--data", "kto.jsonl", "--out", "k", "--beta", "0.5", *common]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--ckpt", "k", "--data", "kto.jsonl"]) == 0
    got = json.loads(capsys.readouterr().out)
    state, meta = checkpoint.load(checkpoint.resolve(tmp_path / "k"))
    model = mf.build_model(mf.ModelConfig(**meta["model_config"]))
    trainer = mf.create_trainer("kto", model, beta=0.5)
    data = mf.load_dataset(tmp_path / "kto.jsonl", TOK, 64, kind="kto")
    want = trainer.evaluate(state, mf.Batches(data, 32, shuffle=False, epochs=1))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    for argv, text in [(["train", "orpo", "--num-generations", "5"], "--num-generations applies to grpo"),
                       (["train", "sft", "--loss-type", "ipo"], "--loss-type applies to dpo and grpo"),
                       (["train", "sft", "--lora-alpha", "3"], "--lora-rank R (> 0) turns on")]:
        assert cli.main([*argv, "--data", "kto.jsonl", "--out", "z", *common]) == 2
        assert text in capsys.readouterr().err
