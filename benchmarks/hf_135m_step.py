"""One SFT step at bf16 on a 135M-parameter Llama-shaped model loaded from a Hugging Face folder.

The folder is built here from SmolLM2-135M's published config.json with random weights
(nothing is downloaded), written by ``minillm_func.hf.save_pretrained`` in bf16. The
measurement then runs in a fresh process, so its peak resident memory is the load plus
the step and nothing else:

    python benchmarks/hf_135m_step.py [--batch 4] [--seq 256] [--threads 2]

Printed: the weights' size, resident memory after import, after loading and the peak
over the step (``VmHWM``), and the step's time.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), as published.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "bos_token_id": 0,
    "eos_token_id": 0, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": False, "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 49152,
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that one over
    from the parent across fork and exec, so it would report the folder-building parent's peak."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def build(folder: Path) -> None:
    from minillm_func import build_model, hf

    cfg = hf.config_from_hf(SMOLLM2_135M)
    model = build_model(cfg)
    params = {k: v.to(torch.bfloat16) for k, v in model.init(0).items()}
    hf.save_pretrained(folder, model, params)


def measure(folder: Path, batch: int, seq: int) -> dict:
    import minillm_func as mf
    from minillm_func import hf

    after_import = rss_mb()
    t0 = time.perf_counter()
    model, params, _ = hf.load_pretrained(folder, tokenizer=False)
    load_s = time.perf_counter() - t0
    after_load, peak_after_load = rss_mb(), peak_mb()
    n_params = sum(p.numel() for p in params.values())
    weights_mb = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    trainer = mf.create_trainer("sft", model, learning_rate=1e-5)
    state = trainer.init(params)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    labels = ids.roll(-1, 1).masked_fill(torch.arange(seq) < seq // 4, mf.IGNORE_INDEX)  # a prompt quarter
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, {"input_ids": ids, "labels": labels})
    step_s = time.perf_counter() - t0
    return {"params": n_params, "dtype": str(next(iter(params.values())).dtype), "weights_mb": weights_mb,
            "rss_after_import_mb": after_import, "rss_after_load_mb": after_load,
            "peak_after_load_mb": peak_after_load, "peak_mb": peak_mb(), "load_s": load_s, "step_s": step_s,
            "loss": float(metrics["loss"]), "batch": batch, "seq": seq, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.batch, args.seq)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2-135m-random"
        build(folder)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        out = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--batch", str(args.batch),
                              "--seq", str(args.seq), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"SmolLM2-135M-shaped model, random weights, {r['params'] / 1e6:.1f}M params, {r['dtype']}, "
          f"folder {size:.0f} MB")
    print(f"one SFT step, batch {r['batch']} x {r['seq']} tokens, {r['threads']} threads, AdamW:")
    rows = [("weights", r["weights_mb"]), ("RSS after import", r["rss_after_import_mb"]),
            ("RSS after load", r["rss_after_load_mb"]), ("peak RSS through the load", r["peak_after_load_mb"]),
            ("peak RSS through load + step", r["peak_mb"])]
    for name, mb in rows:
        print(f"  {name:<30} {mb:8.0f} MB")
    print(f"  load {r['load_s']:.2f} s, step {r['step_s']:.2f} s, loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
