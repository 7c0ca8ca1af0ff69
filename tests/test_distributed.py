"""Data parallelism and sharding with real processes: 2 ranks on gloo over loopback.

The ranks are started the way ``torchrun`` starts them: this file run as a
script, with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set,
so ``init_from_env`` is exercised too. One group of two processes does every
multi-process training run at once (``_ranks_main``) and writes its results as
safetensors / JSON into a temporary folder; the tests compare them with
single-process runs computed here; it ends with the failure cases (rank 1 goes
silent on a short-timeout group, then crashes). A second group of two, started
by its own test, has rank 1 freeze (SIGSTOP) in the middle of a gradient sync.
Params are float64, so "equal"
means equal to float64 round-off: the ranks add their gradient sums in another
order than one process summing over the whole batch does.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minillm_func as mf  # noqa: E402
from minillm_func import checkpoint  # noqa: E402
from minillm_func import distributed as D  # noqa: E402
from minillm_func.data import Batches  # noqa: E402

tok = mf.ByteTokenizer()
CFG = mf.ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4, max_seq_len=32)
GLOBAL_BATCH, ACCUM, STEPS = 4, 2, 5  # 5 updates of 2 micro-batches of 4 sequences (2 per rank)
HALF, FULL = 3, 6  # checkpoint runs: stop after HALF updates, resume to FULL
TOL = dict(rtol=1e-10, atol=1e-12)
HANG_TIMEOUT, HANG_SLACK = 5, 2.0  # the SIGSTOP group's timeout_s, and what the test allows above it


# --------------------------------------------------------------------------- shared set-up (parent and ranks)


def pretrain_data():
    """Sentences of different lengths, unpacked: the ranks' micro-batches hold different token counts."""
    corpus = mf.demo_corpus(0, n_pretrain=12)
    sents = [s.strip() for d in corpus.pretrain for s in re.split(r"[.!?]", d) if s.strip()]
    return mf.LanguageModelingDataset(sents[:64], tok, 32)


def dpo_data():
    return mf.PreferenceDataset(mf.demo_corpus(0, n_pretrain=1).dpo[:48], tok, 32)


def make_trainer(kind, grad_sync=None):
    """``kind``: a stage, or "dpo_lora" (DPO training LoRA adapters over the frozen params)."""
    model = mf.build_model(CFG)
    lora = mf.lora.LoraConfig(rank=2, alpha=4, targets=("wq", "w2")) if kind == "dpo_lora" else None
    return mf.create_trainer(kind.removesuffix("_lora"), model, learning_rate=1e-2, accumulation_steps=ACCUM,
                             grad_sync=grad_sync, lora=lora)


def params0():
    return mf.build_model(CFG).init(0, dtype=torch.float64)


def data_for(kind):
    return pretrain_data() if kind == "pretrain" else dpo_data()  # dpo, dpo_lora


def fit(trainer, kind, state, steps, *, rank=0, world_size=1, position=(0, 0), out_dir=None):
    batches = Batches(data_for(kind), GLOBAL_BATCH, seed=1, position=position, rank=rank, world_size=world_size)
    return trainer.fit(state, batches, steps, out_dir=out_dir, progress=False)


def save_params(path, params):
    safetensors.torch.save_file({k: v.contiguous() for k, v in params.items()}, str(path))


def load_params(path):
    return safetensors.torch.load_file(str(path))


def assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or TOL), msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- the ranks


def _ranks_main(out: Path):
    """Everything the 2-process group does, in order; the last step crashes rank 1 on purpose."""
    D.init_from_env(timeout_s=30)
    r, n = D.rank(), D.world_size()
    report = {"rank": r, "world_size": n}

    # 1. make_grad_sync on a mixed-dtype tree, with buckets small enough to need several per dtype.
    tree = {"a": torch.full((3, 5), 1.0 + r), "b": torch.arange(7, dtype=torch.float64) * (r + 1),
            "c": [torch.full((40,), 2.0 * r, dtype=torch.float32), torch.ones((), dtype=torch.float64)]}
    before = {k: v.clone() for k, v in {"a": tree["a"], "b": tree["b"]}.items()}
    count, loss_sum = torch.tensor(10 + r), torch.tensor(0.5 * (r + 1), dtype=torch.float32)
    g, c, l = D.make_grad_sync(bucket_bytes=64)(tree, count, loss_sum)
    report["sync"] = {
        "a": g["a"].tolist(), "b": g["b"].tolist(), "c0": g["c"][0].tolist(), "c1": g["c"][1].item(),
        "count": c.item(), "count_dtype": str(c.dtype), "loss_sum": l.item(), "loss_dtype": str(l.dtype),
        "dtypes": [str(g["a"].dtype), str(g["b"].dtype), str(g["c"][0].dtype), str(g["c"][1].dtype)],
        "inputs_untouched": all(torch.equal(before[k], tree[k]) for k in before),
    }
    x = torch.tensor([1.0 + r, 10.0 * r, 0.5], dtype=torch.float64)
    x_before = x.clone()
    y = D.all_reduce_sum(x)
    report["all_reduce_sum"] = {"sum": y.tolist(), "dtype": str(y.dtype), "input_untouched": torch.equal(x, x_before)}

    # 2. data-parallel pretrain, DPO and LoRA DPO through Trainer.fit, with accumulation.
    for kind in ("pretrain", "dpo", "dpo_lora"):
        trainer = make_trainer(kind, D.make_grad_sync(bucket_bytes=16 * 1024))
        state = fit(trainer, kind, trainer.init(params0()), STEPS, rank=r, world_size=n)
        save_params(out / f"dp_{kind}_rank{r}.safetensors", state.params)

    # 3. FSDP-style: params, AdamW moments and the accumulator sharded as DTensors.
    import torch.distributed._functional_collectives as funcol
    calls = {"reduce_scatter": 0, "all_gather": 0}
    for name, key in (("reduce_scatter_single", "reduce_scatter"), ("all_gather_single", "all_gather")):
        original = getattr(funcol, name)

        def counted(*a, _f=original, _k=key, **k):
            calls[_k] += 1
            return _f(*a, **k)

        setattr(funcol, name, counted)
    mesh = D.device_mesh()
    for kind in ("pretrain", "dpo"):
        trainer = make_trainer(kind)
        state = D.shard_state(trainer.init(params0()), mesh)
        step = D.make_sharded_step(trainer)
        batches = iter(Batches(data_for(kind), GLOBAL_BATCH, seed=1, rank=r, world_size=n))
        t0 = time.perf_counter()
        while int(state.step) < STEPS:
            state, metrics = step(state, next(batches))
        seconds = time.perf_counter() - t0
        p = state.params["tok_emb.weight"]
        report[f"fsdp_{kind}"] = {
            "param_type": type(p).__name__, "placements": str(p.placements),
            "local_rows": p.to_local().shape[0], "global_rows": p.shape[0],
            "mu_type": type(state.opt_state[-1].mu["tok_emb.weight"]).__name__,
            "accum_type": type(state.accum.grad_sum["tok_emb.weight"]).__name__,
            "step_type": type(state.step).__name__,
            "metric_types": sorted({type(v).__name__ for v in metrics.values()}),
            "seconds_per_micro_step": seconds / (STEPS * ACCUM),
        }
        if kind == "dpo":
            report["fsdp_dpo"]["ref_type"] = type(state.extras["ref_params"]["tok_emb.weight"]).__name__
        save_params(out / f"fsdp_{kind}_rank{r}.safetensors", D.unshard_state(state.params))
        if kind == "pretrain":
            D.save_checkpoint(out / "fsdp_ckpt", state, meta={"step": int(state.step)})
    report["collectives"] = calls
    report["n_params"] = len(params0())

    # 4. checkpoints: 2 processes write (rank 0 only), then resume with 2; resume a 1-process checkpoint with 2.
    trainer = make_trainer("pretrain", D.make_grad_sync())
    fit(trainer, "pretrain", trainer.init(params0()), HALF, rank=r, world_size=n, out_dir=out / "run2")
    D.barrier()  # rank 0 has written run2/checkpoints/step-...
    report["run2_files_by_rank0_only"] = sorted(x.name for x in (out / "run2").iterdir())
    for name, run in (("resumed2", out / "run2"), ("from1", out / "run1")):
        state, meta = checkpoint.load(checkpoint.resolve(run), like=trainer.init(params0()))
        state = fit(trainer, "pretrain", state, FULL, rank=r, world_size=n, position=tuple(meta["data_position"]))
        save_params(out / f"{name}_rank{r}.safetensors", state.params)
    state = fit(trainer, "pretrain", trainer.init(params0()), FULL, rank=r, world_size=n)
    save_params(out / f"straight2_rank{r}.safetensors", state.params)

    (out / f"report_rank{r}.json").write_text(json.dumps(report))

    # 5. a peer that stops answering: on a subgroup with a 2 s timeout, rank 1 sleeps through a step.
    import datetime
    import torch.distributed as dist
    quick = dist.new_group(ranks=[0, 1], timeout=datetime.timedelta(seconds=2))
    _failing_fit(out, "hang", r, group=quick)
    D.barrier()  # the default group is untouched: both ranks meet again
    # 6. a peer that crashes: rank 1 raises in a step and its process exits with the traceback.
    _failing_fit(out, "raise", r)
    D.shutdown()


def _failing_fit(out: Path, how: str, r: int, group=None):
    """Rank 1 raises (``how == "raise"``) or goes silent for 4 s (``"hang"``) in its third micro-step;
    each rank that sees a DistributedError writes ``fail_{how}_rank{r}.json``."""
    base = make_trainer("pretrain")
    calls = []

    def loss_fn(params, batch, extras):
        calls.append(1)
        if r == 1 and len(calls) == 3:
            if how == "raise":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(4)  # alive but silent, longer than the group's timeout
        return base.loss_fn(params, batch, extras)

    trainer = mf.create_trainer("pretrain", base.model, learning_rate=1e-2, loss_fn=loss_fn,
                                grad_sync=D.make_grad_sync(group=group))
    batches = Batches(pretrain_data(), GLOBAL_BATCH, seed=1, rank=r, world_size=2)
    t0 = time.perf_counter()
    try:
        trainer.fit(trainer.init(params0()), batches, 10, progress=False)
    except D.DistributedError as e:
        (out / f"fail_{how}_rank{r}.json").write_text(json.dumps(
            {"type": type(e).__name__, "error": str(e), "seconds": time.perf_counter() - t0}))


def _sigstop_main(out: Path):
    """Rank 1 freezes (SIGSTOP to itself) inside its third gradient sync, right after launching the
    first bucket's all_reduce: alive, sockets open, silent -- a hung peer. Rank 0 must raise a
    DistributedError within the ``HANG_TIMEOUT`` s of ``init_from_env``; it records when, and exits."""
    D.init_from_env(timeout_s=HANG_TIMEOUT)
    r = D.rank()
    inner = D.make_grad_sync(bucket_bytes=16 * 1024)  # several buckets: some are in flight when rank 1 stops
    real_all_reduce = torch.distributed.all_reduce
    calls = []

    def all_reduce_then_stop(*args, **kwargs):
        work = real_all_reduce(*args, **kwargs)  # the first bucket is on its way...
        (out / "stopped_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGSTOP)  # ...and this process freezes until the test kills it
        return work

    def sync(grads, count, loss_sum):
        calls.append(1)
        if r == 1 and len(calls) == 3:
            torch.distributed.all_reduce = all_reduce_then_stop
        return inner(grads, count, loss_sum)

    trainer = make_trainer("pretrain", sync)
    batches = Batches(pretrain_data(), GLOBAL_BATCH, seed=1, rank=r, world_size=2)
    try:
        trainer.fit(trainer.init(params0()), batches, 10, progress=False)
    except Exception as e:  # noqa: BLE001 -- whatever it is, the test wants to see it
        (out / f"fail_sigstop_rank{r}.json").write_text(json.dumps(
            {"type": type(e).__name__, "error": str(e), "failed_at": time.time()}))


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, n: int = 2, mode: str = "all") -> list[subprocess.Popen]:
    """``n`` ranks of this file as a script, with the environment torchrun would give them.

    ``mode`` "all": :func:`_ranks_main`; "sigstop": :func:`_sigstop_main`."""
    port = free_port()
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        with open(out / f"rank{r}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, str(out), mode], env=env, cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT))
    return procs


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("rank*.log")))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One group of 2 processes runs every multi-process training case; its results land in ``out``."""
    out = tmp_path_factory.mktemp("dist")
    trainer = make_trainer("pretrain")  # the 1-process checkpoint that the 2 processes resume
    fit(trainer, "pretrain", trainer.init(params0()), HALF, out_dir=out / "run1")
    procs = launch(out)
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 1], logs(out)  # rank 1 ends with the crash injected last (see _ranks_main)
    reports = [json.loads((out / f"report_rank{r}.json").read_text()) for r in range(2)]
    return out, reports


@pytest.fixture(scope="module")
def single():
    """Single-process runs on the same global batches (computed once, shared by the tests)."""
    runs = {}
    for kind in ("pretrain", "dpo", "dpo_lora"):
        trainer = make_trainer(kind)
        runs[kind] = fit(trainer, kind, trainer.init(params0()), STEPS).params
    trainer = make_trainer("pretrain")
    runs["straight"] = fit(trainer, "pretrain", trainer.init(params0()), FULL).params
    return runs


# --------------------------------------------------------------------------- tests: no process group


def test_rank_slices_partition_each_global_batch():
    ds = pretrain_data()
    for B, N, drop in ((4, 2, False), (7, 3, True), (5, 2, True), (8, 4, False)):
        one = Batches(ds, B, seed=3, drop_last=drop, epochs=1)
        ranks = [Batches(ds, B, seed=3, drop_last=drop, epochs=1, rank=r, world_size=N) for r in range(N)]
        for b in one.epoch_order(0):
            parts = [x.rank_slice(b) for x in ranks]
            assert sum(parts, []) == b  # contiguous, disjoint, in order: together the global batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
        if not drop:
            for whole, *shards in zip(one, *ranks):
                assert torch.equal(whole["labels"][: len(shards[0]["labels"]), : shards[0]["labels"].shape[1]],
                                   shards[0]["labels"])
        assert [x.position for x in ranks] == [one.position] * N and len(ranks[0]) == len(one)


def test_batches_refuse_a_global_batch_smaller_than_the_world():
    ds = pretrain_data()  # 64 items
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        Batches(ds, 2, rank=0, world_size=4)
    with pytest.raises(ValueError, match="last batch of each epoch holds 1"):
        Batches(ds, 9, rank=1, world_size=2)  # 64 = 7 * 9 + 1
    Batches(ds, 9, rank=1, world_size=2, drop_last=True)
    with pytest.raises(ValueError, match="rank"):
        Batches(ds, 4, rank=2, world_size=2)


def test_bucket_plan_groups_by_dtype_and_size():
    leaves = [torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(20), torch.zeros(100),
              torch.zeros(3, dtype=torch.float64), torch.zeros(5)]
    plan = D._bucket_plan(leaves, bucket_bytes=120)
    assert sorted(i for b in plan for i in b) == list(range(len(leaves)))
    for b in plan:
        assert len({leaves[i].dtype for i in b}) == 1 and b == sorted(b)
        assert len(b) == 1 or sum(leaves[i].numel() * leaves[i].element_size() for i in b) <= 120
    assert len(D._bucket_plan(leaves, bucket_bytes=2**20)) == 2  # one bucket per dtype


def test_without_a_process_group_things_are_single_process_or_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env() is False and (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    for bad in (0, -5, float("nan"), "60"):
        with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
            D.init_from_env(timeout_s=bad)
    D.barrier()
    D.shutdown()
    with pytest.raises(D.DistributedError, match="not initialised"):
        D.make_grad_sync()({"w": torch.ones(2)}, torch.tensor(1), torch.tensor(0.0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(D.DistributedError, match="torchrun"):
        D.init_from_env()


def test_demo_under_torchrun_says_to_run_it_in_one_process(monkeypatch, capsys):
    from minillm_func import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minillm-func: error (rank ? of 2): demo runs in one process")


# --------------------------------------------------------------------------- tests: 2 processes


def test_grad_sync_sums_buckets_counts_and_losses_without_touching_inputs(two_ranks):
    _, reports = two_ranks
    s0, s1 = reports[0]["sync"], reports[1]["sync"]
    assert s0 == s1
    assert s0["a"] == [[3.0] * 5] * 3 and s0["b"] == [3.0 * i for i in range(7)]
    assert s0["c0"] == [2.0] * 40 and s0["c1"] == 2.0
    assert s0["count"] == 21 and s0["count_dtype"] == "torch.int64"
    assert s0["loss_sum"] == 1.5 and s0["loss_dtype"] == "torch.float32"
    assert s0["dtypes"] == ["torch.float32", "torch.float64", "torch.float32", "torch.float64"]
    assert s0["inputs_untouched"]


@pytest.mark.parametrize("kind", ["pretrain", "dpo", "dpo_lora"])
def test_two_processes_take_the_single_process_update(two_ranks, single, kind):
    out, _ = two_ranks
    rank0, rank1 = (load_params(out / f"dp_{kind}_rank{r}.safetensors") for r in range(2))
    for k in rank0:  # replicas stay in lockstep: the same summed gradient, the same update
        assert torch.equal(rank0[k], rank1[k]), k
    assert_close(rank0, single[kind])
    start = params0() if kind != "dpo_lora" else make_trainer(kind).init(params0()).params  # the adapters
    moved = max((rank0[k] - start[k]).abs().max().item() for k in rank0)
    assert moved > 1e-3  # 5 updates at lr 1e-2 really moved the params


@pytest.mark.parametrize("kind", ["pretrain", "dpo"])
def test_sharded_update_equals_the_data_parallel_one(two_ranks, kind):
    out, reports = two_ranks
    dp = load_params(out / f"dp_{kind}_rank0.safetensors")
    for r in range(2):
        assert_close(load_params(out / f"fsdp_{kind}_rank{r}.safetensors"), dp)
        info = reports[r][f"fsdp_{kind}"]
        assert info["param_type"] == info["mu_type"] == info["accum_type"] == "DTensor"
        assert info["placements"] == "(Shard(dim=0),)" and info["local_rows"] * 2 == info["global_rows"]
        assert info["step_type"] == "Tensor" and info["metric_types"] == ["Tensor"]
        if kind == "dpo":
            assert info["ref_type"] == "DTensor"
    # every micro-step: one reduce-scatter of each param's gradient, one all-gather of each param
    # (and, for DPO, of each reference param)
    calls, n = reports[0]["collectives"], reports[0]["n_params"]
    assert calls["reduce_scatter"] == 2 * STEPS * ACCUM * n  # gradients: reduce-scattered, never all-reduced
    assert calls["all_gather"] >= 2 * STEPS * ACCUM * n


def test_sharded_checkpoint_holds_full_tensors(two_ranks):
    out, _ = two_ranks
    state, meta = checkpoint.load(out / "fsdp_ckpt")
    assert meta["step"] == STEPS
    assert_close(state.params, load_params(out / "fsdp_pretrain_rank0.safetensors"), rtol=0, atol=0)
    assert state.opt_state[-1].mu["tok_emb.weight"].shape == params0()["tok_emb.weight"].shape


def test_checkpoints_cross_process_counts(two_ranks, single):
    out, _ = two_ranks
    assert {"checkpoints", "metrics.jsonl"} <= set(two_ranks[1][0]["run2_files_by_rank0_only"])
    # 2 processes stop and resume with 2: bit-identical to 2 processes that never stopped
    straight2 = load_params(out / "straight2_rank0.safetensors")
    assert_close(load_params(out / "resumed2_rank0.safetensors"), straight2, rtol=0, atol=0)
    # written by 2 processes, resumed by 1
    trainer = make_trainer("pretrain")
    state, meta = checkpoint.load(checkpoint.resolve(out / "run2"), like=trainer.init(params0()))
    assert meta["step"] == HALF
    resumed1 = fit(trainer, "pretrain", state, FULL, position=tuple(meta["data_position"])).params
    assert_close(resumed1, single["straight"])
    assert_close(resumed1, straight2)
    # written by 1 process, resumed by 2
    assert_close(load_params(out / "from1_rank0.safetensors"), single["straight"])


def test_all_reduce_sum_returns_a_new_summed_tensor(two_ranks):
    _, reports = two_ranks
    for r in range(2):
        info = reports[r]["all_reduce_sum"]
        assert info == {"sum": [3.0, 10.0, 1.0], "dtype": "torch.float64", "input_untouched": True}


def test_all_reduce_sum_is_a_copy_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    x = torch.arange(6.0).reshape(2, 3).t()  # not contiguous
    y = D.all_reduce_sum(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr() and y.is_contiguous()
    y += 1
    assert torch.equal(x, torch.arange(6.0).reshape(2, 3).t())


def test_gloo_timeout_texts_become_a_distributed_error():
    """What gloo says when a peer stops answering, verbatim: the operation whose receive timed out
    says "Timed out waiting ...", every other one of the group "Application timeout caused pair
    closure" -- a text that names neither gloo nor a timeout (it escaped as a raw RuntimeError)."""
    for text in ("Application timeout caused pair closure",
                 "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                 "Timed out waiting 5000ms for recv operation to complete"):
        def collective(text=text):
            raise RuntimeError(text)

        with pytest.raises(D.DistributedError, match="a peer stopped answering for .* --dist-timeout") as info:
            D._guard(collective, "barrier")
        assert str(info.value).startswith("barrier failed on rank 0 of 1") and text in str(info.value)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):  # not a communication error: untouched
        D._guard(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")), "barrier")


@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failing_peer_makes_the_other_rank_fail_clearly_and_soon(two_ranks, how):
    out, _ = two_ranks
    report = json.loads((out / f"fail_{how}_rank0.json").read_text())
    assert report["type"] == "DistributedError"
    assert "make_grad_sync: all_reduce of the gradients failed on rank 0 of 2 after" in report["error"]
    assert "Check the other ranks' output for the first error" in report["error"]
    if how == "raise":  # the peer's process died, its sockets closed: rank 0 knows at once
        assert "injected failure on rank 1" in (out / "rank1.log").read_text()
        assert "a peer process closed its connection" in report["error"]
        assert report["seconds"] < 10
    else:  # the peer is alive but silent: rank 0 gives up after the group's 2 s timeout
        assert "a peer stopped answering for 2 s" in report["error"] and "--dist-timeout" in report["error"]
        assert 2 <= report["seconds"] < 2 + HANG_SLACK + 3  # + the step's own compute before the sync


def _process_state(pid: int) -> str:
    """R, S, T (stopped), Z... from /proc (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_stopped_peer_makes_the_other_rank_fail_within_the_timeout(tmp_path):
    """A real hang: rank 1 SIGSTOPs itself mid-way through a gradient sync (see ``_sigstop_main``).
    Rank 0 raises DistributedError within init_from_env's timeout_s + HANG_SLACK, naming itself,
    the collective and the timeout, and exits cleanly (gloo's worker thread is not left running).
    Before the fix this was gloo's raw "Application timeout caused pair closure" (or an unhelpful
    DistributedError, depending on which bucket's operation timed out first)."""
    procs = launch(tmp_path, mode="sigstop")
    try:
        code0 = procs[0].wait(timeout=120)
        state1 = _process_state(procs[1].pid) if procs[1].poll() is None else f"exited {procs[1].returncode}"
    finally:
        for p in procs:  # rank 1 never wakes up: SIGKILL, so nothing is left running
            if p.poll() is None:
                p.kill()
            p.wait()
    assert state1 == "T", logs(tmp_path)  # rank 1 really was frozen, not dead, while rank 0 failed
    assert code0 == 0, logs(tmp_path)  # 0: rank 0 caught the error and exited normally (no SIGABRT)
    report = json.loads((tmp_path / "fail_sigstop_rank0.json").read_text())
    assert report["type"] == "DistributedError", report
    error = report["error"]
    assert "make_grad_sync: all_reduce of the gradients failed on rank 0 of 2 after" in error
    assert f"a peer stopped answering for {HANG_TIMEOUT} s" in error and "--dist-timeout" in error
    waited = float(re.search(r"after (\d+\.\d) s", error).group(1))
    assert waited >= HANG_TIMEOUT - 0.1  # rank 0 waited out the whole timeout in the sync...
    seconds = report["failed_at"] - float((tmp_path / "stopped_at").read_text())
    assert HANG_TIMEOUT - 1 <= seconds <= HANG_TIMEOUT + HANG_SLACK, seconds  # ...and no longer


def test_torchrun_cli_trains_like_one_process(tmp_path):
    corpus = mf.demo_corpus(1, n_pretrain=12)
    (tmp_path / "pre.txt").write_text("\n\n".join(corpus.pretrain))
    common = ["train", "pretrain", "--data", "pre.txt", "--steps", "3", "--batch-size", "4", "--dim", "32",
              "--n-layers", "1", "--max-length", "32", "--no-progress", "--learning-rate", "1e-2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([*torchrun, "-m", "minillm_func.cli", *common, "--out", "two"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("checkpoints in two/checkpoints") == 1  # rank 0 alone speaks
    from minillm_func import cli

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cli.main([*common, "--out", "one"])
    finally:
        os.chdir(cwd)
    two, meta2 = checkpoint.load(checkpoint.resolve(tmp_path / "two"))
    one, meta1 = checkpoint.load(checkpoint.resolve(tmp_path / "one"))
    assert meta2["step"] == meta1["step"] == 3 and meta2["data_position"] == meta1["data_position"]
    # float32 params: AdamW normalises each gradient element, so the round-off of a
    # near-zero gradient (the never-seen padded-vocabulary rows) can move a weight by
    # a visible fraction of lr; 1.8e-6 was seen once. Exactness is checked in float64 above.
    assert_close(two.params, one.params, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


if __name__ == "__main__":  # a rank, started by `launch`
    torch.set_num_threads(1)
    (_sigstop_main if sys.argv[2] == "sigstop" else _ranks_main)(Path(sys.argv[1]))
