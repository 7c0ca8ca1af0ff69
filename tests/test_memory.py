import json

import pytest
import torch

import minillm_func as mf
from minillm_func.memory import split_batch
from strategies import gen
from test_trainers import CFG, dpo_batches, lm_batches

IGN = mf.IGNORE_INDEX


def oom_above(limit, base):
    """A loss that raises the allocator's out-of-memory error for micro-batches of more than ``limit`` rows."""
    calls = []

    def loss_fn(params, batch, extras):
        rows = next(iter(batch.values())).shape[0]
        calls.append(rows)
        if rows > limit:
            raise torch.OutOfMemoryError(f"out of memory: {rows} rows (simulated)")
        return base(params, batch, extras)

    return loss_fn, calls


ROWS = 7  # odd: halving gives pieces of 3, 3 and 1 rows, so a plain mean of per-piece means is not the batch's
SMALL = mf.ModelConfig(vocab_size=CFG.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=16)


def seven_row_batches(kind, n, seed):
    """``n`` batches of ROWS rows for ``kind``: ragged LM rows; SFT adds a loss_mask drawn independently
    of the labels; DPO pairs two LM batches and ignores the first 5 positions (the prompt)."""
    lm = lm_batches(n, seed=seed, B=ROWS)
    if kind == "pretrain":
        return lm
    g = gen(seed)
    if kind == "sft":
        return [{**b, "loss_mask": torch.rand(b["labels"].shape, generator=g) < 0.6} for b in lm]
    prompt = torch.arange(lm[0]["labels"].shape[1]) < 5
    return [{"chosen_input_ids": a["input_ids"], "chosen_labels": a["labels"].masked_fill(prompt, IGN),
             "rejected_input_ids": b["input_ids"], "rejected_labels": b["labels"].masked_fill(prompt, IGN)}
            for a, b in zip(lm, lm_batches(n, seed=seed + 100, B=ROWS))]


def with_probe(base):
    """``base`` plus a metric ``probe``: the mean label value over the counted positions (LM kinds),
    a per-token mean the window must weight by token counts, as DPO's metrics by pair counts."""

    def loss_fn(params, batch, extras):
        loss, (count, metrics) = base(params, batch, extras)
        if "labels" in batch:
            counted = batch["labels"] != IGN
            if "loss_mask" in batch:
                counted = counted & batch["loss_mask"].bool()
            probe = torch.where(counted, batch["labels"], 0).sum().double() / count.clamp_min(1)
            metrics = {**metrics, "probe": probe}
        return loss, (count, metrics)

    return loss_fn


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("limit", [ROWS, 3, 1])
@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_a_split_batch_gives_the_unsplit_update_and_metrics(kind, limit, accumulation):
    """After an injected out-of-memory error the sizer runs each window's batches in pieces (3, 3, 1
    rows or single rows). Every metric equals the unsplit window step's, and the loss, count and
    metrics also equal the loss function's on the whole window concatenated into one batch (a
    direct float64 reference for the weighting: loss the token- (pair-) weighted mean, ``tokens``
    the summed count, metrics count-weighted means). Params after the run agree too."""
    model = mf.build_model(SMALL)
    params = model.init(3, dtype=torch.float64)
    batches = seven_row_batches(kind, 2 * accumulation, seed=1)
    probed = with_probe(mf.create_trainer(kind, model).loss_fn)
    oom_fn, calls = oom_above(limit, probed)
    plain = mf.create_trainer(kind, model, accumulation_steps=accumulation, loss_fn=probed)
    split = mf.create_trainer(kind, model, accumulation_steps=accumulation, loss_fn=oom_fn,
                              memory=mf.MemoryConfig(dynamic_batch=True))
    s1, s2 = plain.init(params), split.init(params)
    for w in range(0, len(batches), accumulation):  # one update per window of `accumulation` batches
        window = batches[w:w + accumulation]
        with torch.no_grad():
            whole = {k: torch.cat([b[k] for b in window]) for k in window[0]}
            loss_sum, (count, aux) = probed(s1.params, whole, s1.extras)
        s1, m1 = plain.window_step(s1, window)
        s2, m2 = split.run_window(s2, window)
        assert m2.keys() == m1.keys() >= {"loss", "tokens", *aux}
        for k in m1:
            assert m2[k].dtype == m1[k].dtype, k
            torch.testing.assert_close(m2[k], m1[k], rtol=1e-10, atol=1e-12, msg=lambda text, k=k: f"{k}: {text}")
        assert m2["tokens"].item() == count.item() > 0
        torch.testing.assert_close(m2["loss"], loss_sum / count, rtol=1e-10, atol=1e-12)
        for k, v in aux.items():
            torch.testing.assert_close(m2[k], v.to(m2[k].dtype), rtol=1e-10, atol=1e-12,
                                       msg=lambda text, k=k: f"{k}: {text}")
    for k in params:
        torch.testing.assert_close(s2.params[k], s1.params[k], rtol=1e-10, atol=1e-12)
    assert split._sizer.micro_batch == {ROWS: None, 3: 3, 1: 1}[limit]
    assert max(calls[-accumulation:]) <= limit  # the remembered size is used straight away for the next window


def test_below_the_minimum_it_raises_and_names_the_sizes_tried():
    model = mf.build_model(CFG)
    base = mf.create_trainer("pretrain", model).loss_fn
    loss_fn, _ = oom_above(0, base)
    trainer = mf.create_trainer("pretrain", model, loss_fn=loss_fn,
                                memory=mf.MemoryConfig(dynamic_batch=True, min_micro_batch=2))
    with pytest.raises(RuntimeError, match=r"sizes tried: \[4, 2\], min_micro_batch=2"):
        trainer.run_step(trainer.init(model.init(0)), lm_batches(1)[0])


def test_other_errors_are_not_swallowed():
    model = mf.build_model(CFG)

    def broken(params, batch, extras):
        raise ValueError("a real bug")

    trainer = mf.create_trainer("pretrain", model, loss_fn=broken, memory=mf.MemoryConfig(dynamic_batch=True))
    with pytest.raises(ValueError, match="a real bug"):
        trainer.run_step(trainer.init(model.init(0)), lm_batches(1)[0])
    assert not mf.memory.is_out_of_memory(ValueError("out of memory"))
    assert mf.memory.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))


def test_split_batch_keeps_every_row_once():
    batch = {"a": torch.arange(7), "b": torch.arange(14).view(7, 2)}
    pieces = split_batch(batch, 3)
    assert [len(p["a"]) for p in pieces] == [3, 3, 1]
    assert torch.equal(torch.cat([p["b"] for p in pieces]), batch["b"])


def test_monitor_reads_cpu_memory_and_fit_logs_it(tmp_path):
    readings = mf.MemoryMonitor("cpu").read()
    assert readings["mem/rss"] > 1 and readings["mem/peak_rss"] >= readings["mem/rss"] * 0.5
    assert mf.MemoryMonitor("cpu", empty_cache_every=2).maybe_empty_cache(4)
    assert not mf.MemoryMonitor("cpu").maybe_empty_cache(4)
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("pretrain", model, memory=mf.MemoryConfig(monitor=True, monitor_every=2))
    trainer.fit(trainer.init(model.init(0)), iter(lm_batches(4)), 4, out_dir=tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["mem/rss" in r for r in rows] == [False, True, False, True]


def test_memory_config_is_read_by_the_trainer_and_validated():
    model = mf.build_model(CFG)
    trainer = mf.create_trainer("sft", model, memory=mf.MemoryConfig(enable_amp=True, gradient_accumulation_steps=3))
    assert trainer.config["precision"] == "torch.bfloat16" and trainer.config["accumulation_steps"] == 3
    state = trainer.init(model.init(0))
    for i, b in enumerate(lm_batches(3)):
        state, m = trainer.step(state, b)
        assert m["updated"].item() == (i == 2)
    with pytest.raises(ValueError, match="amp_dtype"):
        mf.MemoryConfig(amp_dtype="fp8")
    with pytest.raises(ValueError, match="min_micro_batch"):
        mf.MemoryConfig(min_micro_batch=0)


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
@pytest.mark.parametrize("memory", [mf.MemoryConfig(chunked_loss=True), mf.MemoryConfig(activation_checkpointing=True),
                                    mf.MemoryConfig(chunked_loss=True, activation_checkpointing=True)])
def test_chunked_loss_and_activation_checkpointing_give_the_same_steps(kind, memory):
    from test_trainers import sft_batches

    model = mf.build_model(CFG)
    params = model.init(5, dtype=torch.float64)
    batches = {"pretrain": lm_batches, "sft": sft_batches, "dpo": dpo_batches}[kind](3, seed=2)
    plain = mf.create_trainer(kind, model, learning_rate=1e-3)
    saving = mf.create_trainer(kind, model, learning_rate=1e-3, memory=memory)
    s1, s2 = plain.init(params), saving.init(params)
    for b in batches:
        s1, m1 = plain.step(s1, b)
        s2, m2 = saving.step(s2, b)
        torch.testing.assert_close(m2["loss"], m1["loss"], rtol=1e-10, atol=1e-12)
    for k in params:
        torch.testing.assert_close(s2.params[k], s1.params[k], rtol=1e-9, atol=1e-12)


def test_activation_checkpointing_refuses_the_func_gradient_path():
    model = mf.build_model(CFG)
    with pytest.raises(ValueError, match="autograd gradient path"):
        mf.create_trainer("pretrain", model, grad_path="func", memory=mf.MemoryConfig(activation_checkpointing=True))


def test_chunked_loss_runs_under_mixed_precision():
    model = mf.build_model(CFG)
    params = model.init(0)
    batch = lm_batches(1)[0]
    full = mf.create_trainer("pretrain", model)
    mixed = mf.create_trainer("pretrain", model, memory=mf.MemoryConfig(chunked_loss=True, enable_amp=True))
    _, m_full = full.step(full.init(params), batch)
    _, m_mixed = mixed.step(mixed.init(params), batch)
    assert m_mixed["loss"].dtype == torch.float32 and m_mixed["updated"].item()
    torch.testing.assert_close(m_mixed["loss"], m_full["loss"], rtol=0.02, atol=0.02)
