"""A DPO step (policy + frozen reference) against an imperative DPO loop, at the same batch.

    python benchmarks/dpo_step.py [--tiny]

Time: variants alternated round-robin in one process (median). Memory: each
variant again in its own subprocess: after one warm-up step, the peak memory one
more step adds over what the process holds before it (params, optimizer state,
reference and data), measured as benchmarks/memory.py does. Variants:
  imperative      policy module + reference module (no grad) -> sigmoid DPO -> backward -> clip -> AdamW(fused)
  ours, live ref  trainer.step with the reference params held in the state
  ours, precomputed ref  trainer.step on batches that carry reference log-probs (no reference forward)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, machine, parse, round_robin, table  # noqa: E402
from memory import _measure_peak as measure_peak  # noqa: E402  (benchmarks/memory.py)

import minillm_func as mf  # noqa: E402

VARIANTS = ("imperative", "ours, live ref", "ours, precomputed ref")


def setup(tiny: bool):
    dim, layers, vocab, seq, batch = (64, 2, 512, 32, 4) if tiny else (256, 4, 4096, 128, 8)
    cfg = mf.ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=4, max_seq_len=seq)
    model = mf.build_model(cfg)
    params = model.init(0)
    g = torch.Generator().manual_seed(0)

    def side():
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, : seq // 2] = mf.IGNORE_INDEX  # the prompt half is not supervised
        return ids, labels

    (ci, cl), (ri, rl) = side(), side()
    batch = {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl}
    return model, params, batch


def make_variant(name, model, params, batch):
    if name == "imperative":
        policy, ref = model.to_module(params), model.to_module(params).requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

        def logps(module, ids, labels):
            logp = torch.log_softmax(module(ids).float(), -1)
            tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            return (tok * (labels != mf.IGNORE_INDEX)).sum(-1)

        def step():
            ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
            labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
            B = batch["chosen_input_ids"].shape[0]
            lp = logps(policy, ids, labels)
            with torch.no_grad():
                lr_ = logps(ref, ids, labels)
            loss = -F.logsigmoid(0.1 * ((lp[:B] - lr_[:B]) - (lp[B:] - lr_[B:]))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
        return step
    precomputed = name == "ours, precomputed ref"
    trainer = mf.create_trainer("dpo", model, precomputed_reference=precomputed)
    if precomputed:
        with torch.no_grad():
            rc, rr, _, _ = mf.objectives.pair_logps(model.apply, params, batch)
        batch = {**batch, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    box = [trainer.init(params)]

    def step():
        box[0], _ = trainer.step(box[0], batch)
    return step


def peak_growth_mib(name: str, tiny: bool) -> float:
    """Run in a subprocess: the peak memory one step adds over what is held before it
    (after one warm-up step, so optimizer state exists), as benchmarks/memory.py measures it."""
    model, params, batch = setup(tiny)
    step = make_variant(name, model, params, batch)
    step()
    grown, _ = measure_peak(step, "cpu")
    return grown / 2**20


def main():
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parse(parser)
    if args.memory_of:
        print(json.dumps({"mib": peak_growth_mib(args.memory_of, args.tiny)}))
        return
    model, params, batch = setup(args.tiny)
    variants = {name: make_variant(name, model, params, batch) for name in VARIANTS}
    medians = round_robin(variants, rounds=3 if args.tiny else args.rounds)
    print(table(medians, "imperative", f"DPO step, batch {batch['chosen_input_ids'].shape[0]} pairs x "
                                       f"{batch['chosen_input_ids'].shape[1]} tokens ({machine()})"))
    print("\n| variant | peak memory added by one step, MiB |\n|---|---:|")
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-of", name, "--threads", str(args.threads)] + (
            ["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(f"| {name} | {json.loads(out.splitlines()[-1])['mib']:.1f} |")


if __name__ == "__main__":
    main()
