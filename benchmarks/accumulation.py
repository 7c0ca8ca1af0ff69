"""Gradient accumulation: one window of k micro-batches against its parts timed alone.

    python benchmarks/accumulation.py [--k 8] [--size small] [--rounds 9] [--threads 2]

Variants, alternated round-robin in one process (median of the rounds, after warm-up):
  W   trainer.window_step(state, k micro-batches): k forward+backward passes summed, one update
  M   the micro-step API, trainer.step called k times (accumulator in the state; the
      optimizer is computed on every call and kept on the k-th by a select)
  F   one forward+backward pass alone (the window step's gradient of one micro-batch)
  O   one optimizer update alone (clip + AdamW + schedule on a gradient pytree)

Printed: W / (k F + O), the window's overhead over its parts (target <= 1.05), and M / W.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, round_robin  # noqa: E402

import minillm_func as mf  # noqa: E402
from minillm_func import optim  # noqa: E402
from minillm_func.step import value_and_grad  # noqa: E402

SIZES = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, seq=64, batch=8),
    "small": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, seq=128, batch=8),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a smoke-test run: --size tiny --k 2 --rounds 2")
    args = p.parse_args()
    if args.tiny:
        args.size, args.k, args.rounds = "tiny", 2, 2
    torch.set_num_threads(args.threads)
    size, k = SIZES[args.size], args.k
    model = mf.build_model(mf.ModelConfig(vocab_size=size["vocab_size"], dim=size["dim"], n_layers=size["n_layers"],
                                          n_heads=size["n_heads"], max_seq_len=size["seq"]))
    params = model.init(0)
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(k):
        ids = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g)
        micro.append({"input_ids": ids, "labels": ids.roll(-1, 1)})
    trainer = mf.create_trainer("pretrain", model, accumulation_steps=k)
    box = {"w": trainer.init(params), "m": trainer.init(params)}
    grad_fn = value_and_grad(trainer.loss_fn)
    grads = grad_fn(params, micro[0], {})[1]
    opt_state = [trainer.optimizer.init(params)]

    def window():
        box["w"], _ = trainer.window_step(box["w"], micro)

    def micro_steps():
        for b in micro:
            box["m"], _ = trainer.step(box["m"], b)

    def forward_backward():
        grad_fn(params, micro[0], {})

    def optimizer_update():
        _, opt_state[0] = optim.step(trainer.optimizer, grads, opt_state[0], params)

    medians = round_robin({"W": window, "M": micro_steps, "F": forward_backward, "O": optimizer_update},
                          rounds=args.rounds)
    parts = k * medians["F"] + medians["O"]
    n = sum(p.numel() for p in params.values())
    print(f"### accumulation, k = {k}, {args.size}: {n / 1e6:.2f}M parameters, micro-batch {size['batch']} x "
          f"{size['seq']} tokens ({machine()})\n")
    print("| variant | median ms | ratio to k F + O |\n|---|---:|---:|")
    for name, label in (("W", "W window step (k micro-batches, 1 update)"), ("M", "M micro-step API, k calls"),
                        ("F", "F one forward+backward"), ("O", "O one optimizer update")):
        print(f"| {label} | {medians[name] * 1e3:.2f} | {medians[name] / parts:.3f} |")
    print(f"\nW / (k F + O) = {medians['W'] / parts:.3f} (target <= 1.05); M / W = {medians['M'] / medians['W']:.3f}")


if __name__ == "__main__":
    main()
