"""Peak memory of a training step with LoRA against full fine-tuning, SFT and DPO, in one process.

    python benchmarks/lora.py            # a ~100M-parameter model (dim 768, 12 layers, vocab 16384), fp32
    python benchmarks/lora.py --tiny     # a smoke-test size (seconds)

Every variant starts from the same base params (already resident) and runs
``trainer.init`` and two updates on the same token count: SFT on ``batch``
sequences, DPO on ``batch / 2`` pairs of the same length (chosen + rejected =
the same sequences per forward). LoRA: rank 8 on every linear layer of the
blocks (wq, wk, wv, wo, w1, w2, w3).

Peak = the process's resident-set high-water mark over that (``VmHWM``, reset
through ``/proc/self/clear_refs`` before each variant, freed heap returned with
``malloc_trim``) minus the resident memory just before it, plus the base params'
bytes, which every variant holds: what one run of that variant needs in all.
Also printed: the bytes of the tensors the state holds (params, optimizer
moments, frozen extras; the buffers the pure update recycles are not counted).
"""
from __future__ import annotations

import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, machine, parse, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

import minillm_func as mf  # noqa: E402
from minillm_func import tree as T  # noqa: E402
from minillm_func.lora import LoraConfig  # noqa: E402

FULL = dict(vocab=16384, dim=768, n_layers=12, n_heads=12, batch=4, seq=256)
TINY = dict(vocab=512, dim=64, n_layers=2, n_heads=4, batch=4, seq=32)


def _reset() -> int:
    """Free what can be freed, reset the high-water mark; the resident bytes now."""
    gc.collect()
    if not reset_peak_rss():
        raise OSError("this benchmark reads /proc/self (Linux) to reset and read the peak resident memory")
    return rss_bytes()


def _bytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in T.leaves(tree) if isinstance(x, torch.Tensor))


def main():
    parser = arguments(__doc__)
    args = parse(parser)
    size = TINY if args.tiny else FULL
    cfg = mf.ModelConfig(vocab_size=size["vocab"], dim=size["dim"], n_layers=size["n_layers"],
                         n_heads=size["n_heads"], max_seq_len=size["seq"], tie_embeddings=False)
    model = mf.build_model(cfg)
    base = model.init(seed=0)
    base_bytes = _bytes(base)
    g = torch.Generator().manual_seed(0)
    B, L = size["batch"], size["seq"]
    ids = torch.randint(0, size["vocab"], (B, L), generator=g)
    sft = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    half = B // 2
    dpo = {"chosen_input_ids": ids[:half], "chosen_labels": ids[:half].roll(-1, 1),
           "rejected_input_ids": ids[half:], "rejected_labels": ids[half:].roll(-1, 1)}
    rank8 = LoraConfig(rank=8, alpha=16)
    variants = {
        "SFT, full fine-tune": ("sft", None, sft),
        "SFT, LoRA rank 8": ("sft", rank8, sft),
        "DPO, full fine-tune (reference copy)": ("dpo", None, dpo),
        "DPO, LoRA rank 8 (base as reference)": ("dpo", rank8, dpo),
    }
    n_params = sum(v.numel() for v in base.values())
    print(f"{n_params / 1e6:.1f}M parameters (fp32, {base_bytes / 2**20:.0f} MiB), batch {B} x {L} tokens "
          f"({machine()})\n")
    # One-time costs (kernel set-up, thread pools, lazily loaded libraries) on a tiny model first,
    # so the first measured variant does not carry them.
    small = mf.build_model(mf.ModelConfig(vocab_size=size["vocab"], dim=32, n_layers=1, n_heads=2, max_seq_len=L))
    for kind, lora, batch in variants.values():
        t = mf.create_trainer(kind, small, lora=lora)
        t.step(t.init(small.init(0)), batch)
    rows = {}
    for name, (kind, lora, batch) in variants.items():
        before = _reset()
        start = time.perf_counter()
        trainer = mf.create_trainer(kind, model, lora=lora, learning_rate=1e-4)
        state = trainer.init(base)
        for _ in range(2):
            state, metrics = trainer.step(state, batch)
        seconds = (time.perf_counter() - start) / 2
        peak = peak_rss_bytes() - before + base_bytes
        held = _bytes((state.params, state.opt_state)) + _bytes(
            {k: v for k, v in state.extras.items() if k != "lora_base"})
        trainable = sum(v.numel() for v in state.params.values())
        rows[name] = (peak, held, trainable, seconds, float(metrics["loss"]))
        del trainer, state, metrics
    lines = ["| variant | peak MiB | ratio to full SFT | state tensors MiB | trained params | s/update |",
             "|---|---:|---:|---:|---:|---:|"]
    full = rows["SFT, full fine-tune"][0]
    for name, (peak, held, trainable, seconds, _) in rows.items():
        lines.append(f"| {name} | {peak / 2**20:.0f} | {peak / full:.3f} | {held / 2**20:.0f} | "
                     f"{trainable / 1e6:.2f}M | {seconds:.2f} |")
    print("\n".join(lines))
    lora_sft, lora_dpo = rows["SFT, LoRA rank 8"][0], rows["DPO, LoRA rank 8 (base as reference)"][0]
    print(f"\nLoRA SFT / full SFT: {lora_sft / full:.3f} (target <= 0.55); "
          f"LoRA DPO / LoRA SFT: {lora_dpo / lora_sft:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
