"""K tiny models trained at once: one vmapped step against a loop of K steps, in one process.

    python benchmarks/ensemble.py [--k 8] [--tiny]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, machine, parse, round_robin, table  # noqa: E402

import minillm_func as mf  # noqa: E402
from minillm_func import ensemble  # noqa: E402


def main():
    parser = arguments(__doc__, tiny='a smoke-test size')
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    args = parse(parser)
    k, rounds = (2, 3) if args.tiny else (args.k, args.rounds)
    cfg = mf.ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    model = mf.build_model(cfg)
    trainer = mf.create_trainer("pretrain", model, learning_rate=1e-3)
    members = [trainer.init(model.init(seed)) for seed in range(k)]
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    vstep = ensemble.vmap_step(trainer.step)
    box = {"loop": list(members), "vmap": ensemble.stack(members)}

    def loop():
        box["loop"] = [trainer.step(m, batch)[0] for m in box["loop"]]

    def vmapped():
        box["vmap"] = vstep(box["vmap"], batch)[0]

    medians = round_robin({f"loop of {k} steps": loop, f"vmap over {k} members": vmapped}, rounds=rounds)
    print(table(medians, f"loop of {k} steps",
                f"K={k} tiny models (2 layers, dim 64, batch 8x64), one update each ({machine()})"))


if __name__ == "__main__":
    main()
