"""AdamW update time: this library's paths against torch.optim.AdamW, in one process.

    python benchmarks/optimizer.py            # GPT-2-small shapes (124M parameters, 148 tensors)
    python benchmarks/optimizer.py --tiny     # a smoke-test size

Each variant performs one full AdamW update of every parameter from the same
gradients; variants are alternated round-robin and the median is reported as a
ratio to torch's fused AdamW.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, round_robin, table  # noqa: E402

from minillm_func import optim  # noqa: E402


def gpt2_small_shapes(vocab=50304, dim=768, layers=12, ctx=1024):
    shapes = [(vocab, dim), (ctx, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="small shapes, few rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = gpt2_small_shapes(vocab=512, dim=64, layers=2, ctx=64) if args.tiny else gpt2_small_shapes()
    rounds = 3 if args.tiny else args.rounds
    gen = torch.Generator().manual_seed(0)
    params = {f"p{i}": torch.randn(s, generator=gen) * 0.02 for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()}
    n = sum(p.numel() for p in params.values())

    def torch_variant(**kw):
        ps = [torch.nn.Parameter(p.clone()) for p in params.values()]
        for p, g in zip(ps, grads.values()):
            p.grad = g
        return torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, **kw).step

    def ours(impl, donate):
        opt = optim.adamw(1e-4, weight_decay=0.01, impl=impl)
        box = [{k: v.clone() for k, v in params.items()}]
        box.append(opt.init(box[0]))

        def run():
            box[0], box[1] = optim.step(opt, grads, box[1], box[0], donate=donate)
        return run

    variants = {
        "torch AdamW(fused=True)": torch_variant(fused=True),
        "torch AdamW(foreach=True)": torch_variant(foreach=True),
        "ours fused, donated state": ours("fused", True),
        "ours fused, pure (copies state)": ours("fused", False),
        "ours foreach, pure": ours("foreach", False),
    }
    medians = round_robin(variants, rounds=rounds)
    print(table(medians, "torch AdamW(fused=True)",
                f"AdamW update, {n / 1e6:.1f}M parameters in {len(shapes)} tensors ({machine()})"))


if __name__ == "__main__":
    main()
