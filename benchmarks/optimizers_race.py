"""The optimizer race on the demo's pretraining: AdamW (warm-up + cosine) against Muon(+AdamW) and
schedule-free AdamW, same model, same batches, same number of updates.

    python benchmarks/optimizers_race.py             # the demo's 1200 updates, a 3-point lr grid each (~30 min)
    python benchmarks/optimizers_race.py --tiny      # a smoke-test size (seconds)

Each optimizer's learning rate is tuned on a small grid that this script runs; the
best of each grid (lowest final held-out loss) is compared:

- AdamW, the demo's schedule (linear warm-up over 10%, cosine to lr/10): lr in
  {1e-3, 3e-3, 1e-2} (the demo uses 3e-3);
- Muon(+AdamW) (``optim.muon_with_adamw``: Muon on the blocks' matrices, AdamW at
  3e-3 on embeddings, head and norms), the same schedule: Muon lr in {0.01, 0.02, 0.05};
- schedule-free AdamW, no schedule (warm-up over 10%), evaluated at its average:
  lr in {1e-3, 3e-3, 1e-2}.

Reported: each run's final held-out loss; the updates the best Muon run needs to
reach the best AdamW run's final held-out loss, as a fraction of the budget
(evaluated every ``--eval-every`` updates); schedule-free's final loss against
AdamW's; the per-update time of a train step (and of the optimizer update alone)
with Muon against AdamW, alternated in one process; and ``optimizers_race.png``,
the held-out curves of the three best runs. Runs go two at a time, one torch
thread each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, round_robin  # noqa: E402

import minillm_func as mf  # noqa: E402
from minillm_func import optim, schedules  # noqa: E402
from minillm_func.demo import DemoConfig  # noqa: E402

GRIDS = {"adamw": [1e-3, 3e-3, 1e-2], "muon": [0.01, 0.02, 0.05], "schedule_free": [1e-3, 3e-3, 1e-2]}
ADAM_PART_LR = 3e-3


def setup(config: DemoConfig):
    corpus = mf.demo_corpus(config.seed, n_eval=config.n_eval)
    tok = mf.ByteTokenizer()
    train = mf.LanguageModelingDataset(corpus.pretrain, tok, config.seq_len, pack=True)
    held = mf.LanguageModelingDataset(corpus.pretrain_eval, tok, config.seq_len, pack=True)
    model = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=config.dim, n_layers=config.n_layers,
                                          n_heads=config.n_heads, max_seq_len=config.seq_len))
    return train, held, model


def trainer_for(name: str, lr: float, model, steps: int, adam_part_lr: float = ADAM_PART_LR):
    warmup = max(1, steps // 10)
    cosine = schedules.warmup_cosine(lr, warmup, max(2, steps), lr / 10)  # the demo's schedule
    if name == "adamw":
        return mf.create_trainer("pretrain", model, learning_rate=lr, schedule=cosine)
    if name == "muon":
        ratio = adam_part_lr / lr
        return mf.create_trainer("pretrain", model, learning_rate=lr, schedule=cosine,
                                 optimizer=lambda s: optim.muon_with_adamw(s, lambda k: ratio * s(k)))
    return mf.create_trainer("pretrain", model, learning_rate=lr,
                             optimizer=optim.schedule_free_adamw(lr, warmup_steps=warmup))


def one_run(args) -> dict:
    name, lr, steps, eval_every, config, adam_part_lr = args
    torch.set_num_threads(1)
    train, held, model = setup(config)
    trainer = trainer_for(name, lr, model, steps, adam_part_lr)
    state = trainer.init(model.init(config.seed))
    batches = mf.Batches(train, config.pretrain_batch, seed=config.seed)
    curve = [(0, trainer.evaluate(state, mf.Batches(held, 64, shuffle=False, epochs=1))["loss"])]
    start = time.perf_counter()
    while int(state.step) < steps:
        state = trainer.fit(state, batches, min(steps, int(state.step) + eval_every), progress=False, log_every=0)
        curve.append((int(state.step), trainer.evaluate(state, mf.Batches(held, 64, shuffle=False, epochs=1))["loss"]))
    return {"optimizer": name, "lr": lr, "curve": curve, "final": curve[-1][1], "seconds": time.perf_counter() - start}


def updates_to_reach(curve, target: float) -> int | None:
    """The first evaluated update at which the held-out loss is <= ``target`` (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def step_times(config: DemoConfig, rounds: int, args_adam_part_lr: float = ADAM_PART_LR) -> dict:
    """Median seconds of a train step and of the optimizer update alone, AdamW vs Muon(+AdamW), alternated."""
    torch.set_num_threads(1)
    train, _, model = setup(config)
    batch = next(iter(mf.Batches(train, config.pretrain_batch, seed=0)))
    params = model.init(0)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    calls = {}
    for name in ("adamw", "muon"):
        trainer = trainer_for(name, GRIDS[name][1], model, config.pretrain_steps, args_adam_part_lr)
        box = [trainer.init(params)]

        def train_step(trainer=trainer, box=box):
            box[0], _ = trainer.step(box[0], batch)

        opt = trainer.optimizer
        obox = [params, opt.init(params)]

        def update_only(opt=opt, obox=obox):
            obox[0], obox[1] = optim.step(opt, grads, obox[1], obox[0])

        calls[f"{name} step"], calls[f"{name} update"] = train_step, update_only
    medians = round_robin(calls, warmup=2, rounds=rounds)
    return {"step": medians["muon step"] / medians["adamw step"], "update": medians["muon update"] /
            medians["adamw update"], "medians": medians}


def plot(best: dict, path: Path, steps: int) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in best.items():
        xs, ys = zip(*run["curve"][1:])
        ax.plot(xs, ys, label=f"{name} (lr {run['lr']:g}): final {run['final']:.4f}")
    ax.axhline(best["adamw"]["final"], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("optimizer updates")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"demo pretraining, {steps} updates, best lr of each grid")
    ax.set_ylim(top=min(3.0, max(max(y for _, y in r["curve"][1:]) for r in best.values())))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/optimizers_race.png")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=LR,LR",
                        help="replace an optimizer's grid, e.g. muon=0.05,0.1 (given: only the named ones run)")
    parser.add_argument("--adam-part-lr", type=float, default=ADAM_PART_LR,
                        help=f"Muon's AdamW part's learning rate (default {ADAM_PART_LR})")
    args = parser.parse_args()
    grids = dict(GRIDS)
    if args.grid:
        grids = {name: [float(v) for v in values.split(",")]
                 for name, values in (g.split("=", 1) for g in args.grid)}
    config = DemoConfig()
    if args.tiny:
        config = DemoConfig(dim=32, n_layers=1, seq_len=32, pretrain_batch=4, n_eval=4, pretrain_steps=6)
        args.eval_every = 3
    steps = config.pretrain_steps
    print(f"# {machine()}; demo model dim {config.dim}, {config.n_layers} layers, batch {config.pretrain_batch} x "
          f"{config.seq_len}, {steps} updates\n")
    jobs = [(name, lr, steps, args.eval_every, config, args.adam_part_lr) for name, grid in grids.items()
            for lr in grid]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(one_run, jobs))
    best = {name: min((r for r in runs if r["optimizer"] == name), key=lambda r: r["final"]) for name in grids}
    lines = ["| variant | lr | final held-out loss | best of grid | s per run |", "|---|---:|---:|:-:|---:|"]
    for r in runs:
        mark = "yes" if best[r["optimizer"]] is r else ""
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['final']:.4f} | {mark} | {r['seconds']:.0f} |")
    print("\n".join(lines) + "\n")
    if set(grids) != set(GRIDS):  # a partial race: the runs' table, and their curves in the JSON
        Path(args.out).with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=1, default=str))
        return
    target = best["adamw"]["final"]
    reach = updates_to_reach(best["muon"]["curve"], target)
    ratio = reach / steps if reach is not None else float("nan")
    sf_gap = best["schedule_free"]["final"] / target - 1
    times = step_times(config, rounds=3 if args.tiny else 15)
    table = [f"| check | measured | bound |", "|---|---:|---:|",
             f"| ratio to AdamW: Muon updates to reach AdamW's final held-out loss ({target:.4f}) | "
             f"{ratio:.3f} ({reach} of {steps}) | <= 0.70 |",
             f"| schedule-free final loss vs cosine AdamW's | {sf_gap:+.2%} | within 2% |",
             f"| ratio to AdamW: Muon train-step time | {times['step']:.3f} | <= 1.5 |",
             f"| ratio to AdamW: Muon optimizer-update time alone | {times['update']:.3f} | (for reference) |"]
    print("\n".join(table) + "\n")
    if plot(best, Path(args.out), steps):
        print(f"curves: {args.out}")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"runs": runs, "ratio": ratio, "schedule_free_gap": sf_gap, "times": times}, indent=1, default=str))


if __name__ == "__main__":
    main()
