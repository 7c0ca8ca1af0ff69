"""Peak memory and time of the loss and of a training step's forward+backward, with and
without chunked cross-entropy and activation checkpointing.

    python benchmarks/memory.py            # vocab 32000: the loss at 4096 tokens x dim 512; a transformer
                                           # of dim 256, 4 layers, batch 8 x seq 256
    python benchmarks/memory.py --tiny     # a smoke-test size (a few seconds)

Memory: every variant runs in its own process (this script, re-run with
``--variant``), so one variant's allocations never count towards another's peak.
In that process the inputs are built first, the variant runs once to warm up, and
then, for the next run:

- on CPU the resident-set high-water mark is reset (``/proc/self/clear_refs``) and
  freed heap memory returned to the system (``malloc_trim``), the current RSS is
  the baseline, and the peak is ``VmHWM`` after one more run minus that baseline
  (where the reset is not available: growth of ``ru_maxrss`` over the first run);
- on CUDA the peak is ``torch.cuda.max_memory_allocated()`` minus the memory
  allocated before the run.

So the peak counts what the forward+backward adds on top of its inputs and
parameters (activations, logits, gradients). Gradients are compared with those of
the group's baseline: the largest absolute difference divided by the largest
absolute baseline gradient.

Time: the median per call, measured back in the main process with the variants
alternated round by round (``common.round_robin``), so load from elsewhere on the
machine spreads over all of them instead of landing on one process.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, peak_rss_bytes, reset_peak_rss, round_robin, rss_bytes  # noqa: E402

import minillm_func as mf  # noqa: E402
from minillm_func.chunked import chunked_cross_entropy  # noqa: E402
from minillm_func.model import output_weight  # noqa: E402

FULL = dict(tokens=4096, dim=512, vocab=32000, chunk=1024, rounds=3,
            model=dict(dim=256, n_layers=4, n_heads=4, seq=256, batch=8))
TINY = dict(tokens=256, dim=32, vocab=1000, chunk=64, rounds=5,
            model=dict(dim=32, n_layers=2, n_heads=2, seq=32, batch=2))

LOSS_VARIANTS = {
    "loss: full logits": dict(chunked=False),
    "loss: chunked": dict(chunked=True, recompute=True),
    "loss: chunked, recompute=False": dict(chunked=True, recompute=False),
}
STEP_VARIANTS = {
    "step: plain": dict(checkpoint=False, chunked=False),
    "step: checkpointed blocks": dict(checkpoint=True, chunked=False),
    "step: chunked loss": dict(checkpoint=False, chunked=True, recompute=True),
    "step: checkpointed + chunked": dict(checkpoint=True, chunked=True, recompute=True),
    "step: checkpointed + chunked, recompute=False": dict(checkpoint=True, chunked=True, recompute=False),
}


# --------------------------------------------------------------------------- one variant (child process)


def _loss_fn(sizes, spec, device):
    g = torch.Generator().manual_seed(0)
    N, D, V = sizes["tokens"], sizes["dim"], sizes["vocab"]
    hidden = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) * 0.02).to(device).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[::7] = mf.IGNORE_INDEX  # some ignored positions, as padding would give

    def run():
        if spec["chunked"]:
            loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=sizes["chunk"],
                                         recompute=spec["recompute"])
        else:
            loss = mf.pretrain_loss(hidden @ weight.T, labels)
        return torch.autograd.grad(loss, (hidden, weight))

    return run, ["hidden", "weight"]


def _step_fn(sizes, spec, device):
    m = sizes["model"]
    cfg = mf.ModelConfig(vocab_size=sizes["vocab"], dim=m["dim"], n_layers=m["n_layers"], n_heads=m["n_heads"],
                         max_seq_len=m["seq"])
    model = mf.build_model(cfg)
    params = {k: v.requires_grad_(True) for k, v in model.init(0, device=device).items()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (m["batch"], m["seq"] + 1), generator=g).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def run():
        if spec["chunked"]:
            hidden = model.apply_hidden(params, inputs, checkpoint=spec["checkpoint"])
            loss = chunked_cross_entropy(hidden, output_weight(params), labels, chunk_size=sizes["chunk"],
                                         recompute=spec["recompute"])
        else:
            loss = mf.pretrain_loss(model.apply(params, inputs, checkpoint=spec["checkpoint"]), labels)
        return torch.autograd.grad(loss, list(params.values()))

    return run, list(params)


def _measure_peak(run, device) -> tuple[int, tuple]:
    """Bytes the call ``run()`` adds at its peak over what is allocated before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out
    if reset_peak_rss():
        base = rss_bytes()
        out = run()
        return peak_rss_bytes() - base, out
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    out = run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, out


def build(name: str, sizes: dict, device: str):
    """``(run, gradient names)`` for the variant ``name``; ``run()`` returns the gradients."""
    if name in LOSS_VARIANTS:
        return _loss_fn(sizes, LOSS_VARIANTS[name], device)
    return _step_fn(sizes, STEP_VARIANTS[name], device)


def child(args) -> None:
    """Peak memory of one variant, in a process of its own; its gradients go to ``args.dump``."""
    torch.set_num_threads(args.threads)
    run, names = build(args.variant, TINY if args.tiny else FULL, args.device)
    if args.device == "cpu" and not reset_peak_rss():
        peak, grads = _measure_peak(run, args.device)  # ru_maxrss fallback: measure the very first run
    else:
        run()  # warm up: one-time allocations (thread pools, kernels) do not count
        peak, grads = _measure_peak(run, args.device)
    torch.save({n: g.detach().cpu() for n, g in zip(names, grads)}, args.dump)
    print(json.dumps({"peak": peak}))


# --------------------------------------------------------------------------- the table (parent process)


def run_variant(name: str, args, dump: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, "--dump", dump,
           "--threads", str(args.threads), "--device", args.device] + (["--tiny"] if args.tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"variant {name!r} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_rel_diff(a: dict, b: dict) -> float:
    diff = max((a[k] - b[k]).abs().max().item() for k in b)
    scale = max(b[k].abs().max().item() for k in b)
    return diff / scale if scale else diff


def group(variants: dict, args, tmp: str) -> list[tuple[str, dict]]:
    sizes = TINY if args.tiny else FULL
    rows, ref = [], None
    for i, name in enumerate(variants):  # memory: one process per variant
        dump = os.path.join(tmp, f"{i}.pt")
        result = run_variant(name, args, dump)
        grads = torch.load(dump, weights_only=True)
        ref = ref or grads
        result["grad_diff"] = max_rel_diff(grads, ref)
        rows.append((name, result))
        os.remove(dump)
        del grads
    ref = None
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(run):
        def call():
            run()
            sync()
        return call

    calls = {name: timed(build(name, sizes, args.device)[0]) for name in variants}
    medians = round_robin(calls, warmup=1, rounds=sizes["rounds"])  # time: alternated in this process
    for name, result in rows:
        result["median"] = medians[name]
    return rows


def table(rows: list[tuple[str, dict]], title: str) -> str:
    base_name, base = rows[0]
    lines = [title, "",
             f"| variant | peak MiB | memory ratio to {base_name} | median ms | time ratio to {base_name} "
             "| max grad diff (rel.) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['peak'] / 2**20:.1f} | {r['peak'] / max(base['peak'], 1):.3f} | "
                     f"{r['median'] * 1e3:.1f} | {r['median'] / base['median']:.3f} | {r['grad_diff']:.1e} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small sizes, few repetitions (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:  # tiny ops on contended threads measure the scheduler, not the op
        args.threads = 1 if args.tiny else 2
    if args.variant:
        return child(args)
    torch.set_num_threads(args.threads)
    s = TINY if args.tiny else FULL
    m = s["model"]
    where = machine() if args.device == "cpu" else f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    with tempfile.TemporaryDirectory() as tmp:
        loss_rows = group(LOSS_VARIANTS, args, tmp)
        step_rows = group(STEP_VARIANTS, args, tmp)
    print(table(loss_rows,
                f"Cross-entropy forward+backward, {s['tokens']} tokens x dim {s['dim']} -> vocab {s['vocab']}, "
                f"chunks of {s['chunk']} tokens, float32 ({where})"))
    print()
    print(table(step_rows,
                f"Transformer forward+backward (torch.autograd.grad on params): dim {m['dim']}, {m['n_layers']} "
                f"layers, batch {m['batch']} x seq {m['seq']}, vocab {s['vocab']}, float32 ({where})"))


if __name__ == "__main__":
    main()
