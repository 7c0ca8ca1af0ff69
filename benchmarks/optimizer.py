"""AdamW update time: this library's paths against torch.optim.AdamW, in one process.

    python benchmarks/optimizer.py                 # GPT-2-small shapes (124M parameters, 148 tensors)
    python benchmarks/optimizer.py --threads 1     # one thread (steadier on a shared machine)
    python benchmarks/optimizer.py --compile       # also the reference update under torch.compile (minutes)
    python benchmarks/optimizer.py --tiny          # a smoke-test size

Each variant performs one full AdamW update (lr 1e-4, wd 0.01) of every
parameter from the same gradients; variants are alternated round-robin and the
median is reported as a ratio to torch's fused AdamW (in place, the target).

The variants of this library (``optim.step(opt, grads, state, params)``):

- donated: ``donate=True``, torch's fused kernel on the donated buffers, in place;
- pure (the caller's tensors untouched), with the kernel and the output memory named:
  native = the one-pass kernel with streaming stores (``minillm_func.native``),
  fused + copy = copy params and moments, then torch's fused kernel in place on the copies,
  foreach = ``torch._foreach_*`` out of place, compiled = the reference update
  under ``torch.compile`` (inductor's out-of-place kernels; "recycled" there is
  a measurement only: the compiled update copying into preallocated buffers);
  recycled = outputs written into the buffers of an earlier update
  (``reuse_buffers=True``, the default), fresh = newly allocated outputs.

The pure variants all read the same old params and moments, never modified
(that is what pure means), and drop each result, as a loop that rebinds
``params, state = step(...)`` does; this also keeps the memory of the run
down (about 12 GB at full size). A second table counts the page faults of one
more update of each variant: they are what fresh outputs cost.
"""
from __future__ import annotations

import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, machine, parse, round_robin, table  # noqa: E402

from minillm_func import optim  # noqa: E402
from minillm_func import tree as T  # noqa: E402

BASELINE = "torch AdamW(fused=True), in place"


def gpt2_small_shapes(vocab=50304, dim=768, layers=12, ctx=1024):
    shapes = [(vocab, dim), (ctx, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def main():
    parser = arguments(__doc__, tiny='small shapes, few rounds (smoke test)')
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="add the reference update under torch.compile")
    parser.add_argument("--no-torch-foreach", action="store_true", help="skip torch's foreach AdamW (saves 1.5 GB)")
    args = parse(parser)
    shapes = gpt2_small_shapes(vocab=512, dim=64, layers=2, ctx=64) if args.tiny else gpt2_small_shapes()
    rounds = 3 if args.tiny else args.rounds
    gen = torch.Generator().manual_seed(0)
    params = {f"p{i:03d}": torch.randn(s, generator=gen) * 0.02 for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()}
    n = sum(p.numel() for p in params.values())

    def torch_variant(**kw):
        ps = [torch.nn.Parameter(p.clone()) for p in params.values()]
        for p, g in zip(ps, grads.values()):
            p.grad = g
        return torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, **kw).step

    def opt_of(impl, reuse=True):
        return optim.adamw(1e-4, weight_decay=0.01, impl=impl, reuse_buffers=reuse)

    # One update first, so that the moments the pure variants read are not zeros.
    start = opt_of("reference")
    shared_p, shared_s = optim.step(start, grads, start.init(params), params)

    def donated():
        opt = opt_of("auto")
        box = [T.tree_map(torch.clone, shared_p), T.tree_map(torch.clone, shared_s)]

        def run():
            box[0], box[1] = optim.step(opt, grads, box[1], box[0], donate=True)
        return run

    def pure(opt):
        def run():
            optim.step(opt, grads, shared_s, shared_p)  # the result is dropped, as a rebinding loop does
        return run

    variants = {BASELINE: torch_variant(fused=True)}
    if not args.no_torch_foreach:
        variants["torch AdamW(foreach=True), in place"] = torch_variant(foreach=True)
    variants["ours, donated (fused, in place)"] = donated()
    variants["ours, pure: native, recycled (default)"] = pure(opt_of("auto"))
    variants["ours, pure: native, fresh"] = pure(opt_of("native", reuse=False))
    variants["ours, pure: fused + copy, recycled"] = pure(opt_of("fused"))
    variants["ours, pure: fused + copy, fresh"] = pure(opt_of("fused", reuse=False))
    variants["ours, pure: foreach, fresh"] = pure(opt_of("foreach"))
    if args.compile:
        ref = opt_of("reference")
        compiled = torch.compile(lambda g, s, p: optim.step(ref, g, s, p))
        began = time.perf_counter()
        compiled(grads, shared_s, shared_p)
        print(f"compiled the reference update in {time.perf_counter() - began:.0f} s", flush=True)
        variants["ours, pure: compiled reference, fresh"] = lambda: compiled(grads, shared_s, shared_p)
        # The same kernels writing into preallocated buffers (copy_ fuses into them): what a compiled
        # out-of-place update costs without page faults. Not a library path; a measurement.
        outs = T.tree_map(torch.empty_like, (shared_p, shared_s.mu, shared_s.nu))

        def into(g, s, p, outs):
            new_p, new_s = optim.step(ref, g, s, p)
            for o, x in zip(T.leaves(outs), T.leaves((new_p, new_s.mu, new_s.nu))):
                o.copy_(x)
        compiled_into = torch.compile(into)
        compiled_into(grads, shared_s, shared_p, outs)
        variants["ours, pure: compiled reference, recycled"] = lambda: compiled_into(grads, shared_s, shared_p, outs)

    medians = round_robin(variants, rounds=rounds)
    print(table(medians, BASELINE,
                f"AdamW update, {n / 1e6:.1f}M parameters in {len(shapes)} tensors ({machine()}, "
                f"median of {rounds} rounds)"))
    # Why fresh outputs cost so much: the first write to each new 4 KiB page is a page fault
    # (and the kernel zeroes the page). One more call of each variant, counting them.
    print("\n| variant | minor page faults in one update |\n|---|---:|")
    for name, fn in variants.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        print(f"| {name} | {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before} |")
    try:
        print(f"\nload average (1, 5, 15 min) at the end: {os.getloadavg()}")
    except OSError:
        pass


if __name__ == "__main__":
    main()
