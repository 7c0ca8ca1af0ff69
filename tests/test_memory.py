import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func.memory import split_batch
from test_trainers import CFG, dpo_batches, lm_batches


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


@pytest.mark.parametrize("kind", ["pretrain", "dpo"])
@settings(max_examples=10)
@given(limit=st.integers(1, 8), accumulation=st.sampled_from([1, 2]))
def test_a_split_batch_gives_the_unsplit_update(kind, limit, accumulation):
    model = mf.build_model(CFG)
    params = model.init(3, dtype=torch.float64)
    batches = {"pretrain": lm_batches, "dpo": dpo_batches}[kind](2, seed=1)
    batches = [{k: torch.cat([v, v.flip(0)]) for k, v in b.items()} for b in batches]  # 8 rows
    plain = mf.create_trainer(kind, model, accumulation_steps=accumulation)
    base = plain.loss_fn
    loss_fn, calls = oom_above(limit, base)
    split = mf.create_trainer(kind, model, accumulation_steps=accumulation, loss_fn=loss_fn,
                              memory=mf.MemoryConfig(dynamic_batch=True))
    s1, s2 = plain.init(params), split.init(params)
    for w in range(0, len(batches), accumulation):  # one update per window of `accumulation` batches
        window = batches[w:w + accumulation]
        s1, m1 = plain.window_step(s1, window)
        s2, m2 = split.run_window(s2, window)
        torch.testing.assert_close(m2["loss"], m1["loss"], rtol=1e-10, atol=1e-12)
        assert m2["tokens"].item() == m1["tokens"].item()
    for k in params:
        torch.testing.assert_close(s2.params[k], s1.params[k], rtol=1e-10, atol=1e-12)
    assert split._sizer.micro_batch == (None if limit >= 8 else max(s for s in (8, 4, 2, 1) if s <= limit))
    assert max(calls[-2:]) <= limit  # the remembered size is used straight away for the next batch


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
