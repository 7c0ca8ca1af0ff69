"""One training step: the imperative baseline against this library, same model and weights, one process.

    python benchmarks/train_step.py            # tiny and small sizes on the CPU
    python benchmarks/train_step.py --tiny     # a few rounds at the tiny size only (smoke test)
    python benchmarks/train_step.py --gpu      # with CUDA: GPT-2-small shapes in bf16

Variants, alternated round-robin (median of the rounds, after warm-up):
  A  imperative: module forward -> cross-entropy -> backward -> clip_grad_norm_ -> AdamW(foreach=True)
  B  the same with AdamW(fused=True)
  C  this library, eager: trainer.step (pure; autograd gradient path)
  C' this library, eager, gradients through torch.func.grad_and_value
  D  this library, trainer.step compiled with torch.compile (compile time excluded)

Also tokens/s and model FLOP utilisation: FLOPs per token = 6 N + c * L * H * Q * T
(N parameters, L layers, H heads, Q head size, T sequence length), with c = 12
(PaLM / nanoGPT convention) and c = 6 (causal half, llm.c / torchtitan), against
the measured peak of one large matmul on this machine.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, machine, parse, round_robin, table  # noqa: E402

import minillm_func as mf  # noqa: E402

SIZES = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, seq=64, batch=8),
    "small": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, seq=128, batch=8),
    "gpt2-small": dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, seq=1024, batch=8),
}


def matmul_peak(device, dtype, n=2048, reps=10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_size(name, size, device, dtype, rounds, compile_it):
    cfg = mf.ModelConfig(vocab_size=size["vocab_size"], dim=size["dim"], n_layers=size["n_layers"],
                         n_heads=size["n_heads"], max_seq_len=size["seq"], tie_embeddings=True)
    model = mf.build_model(cfg)
    params = model.init(0, device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (size["batch"], size["seq"]), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    precision = "bf16" if dtype == torch.bfloat16 else None

    def imperative(**adamw_kw):
        module = model.to_module(params)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.01, **adamw_kw)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = module(ids)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            sync(device)
        return step

    def ours(**kw):
        trainer = mf.create_trainer("pretrain", model, precision=precision, **kw)
        box = [trainer.init(params)]

        def step():
            box[0], _ = trainer.step(box[0], batch)
            sync(device)
        return step

    variants = {"A imperative foreach": imperative(foreach=True), "B imperative fused": imperative(fused=True),
                "C ours eager": ours(), "C' ours eager, torch.func grad": ours(grad_path="func")}
    if compile_it:
        variants["D ours compiled"] = ours(compile=True)
        t = time.perf_counter()
        variants["D ours compiled"]()  # compile outside the timed rounds
        print(f"[{name}] compile took {time.perf_counter() - t:.0f} s", flush=True)
    medians = round_robin(variants, rounds=rounds)
    n_params = sum(p.numel() for p in params.values())
    tokens = size["batch"] * size["seq"]
    attn = size["n_layers"] * size["n_heads"] * cfg.head_dim * size["seq"]
    peak = matmul_peak(device, dtype)
    lines = [table(medians, "A imperative foreach",
                   f"### {name}: {n_params / 1e6:.2f}M parameters, batch {size['batch']} x {size['seq']} tokens, "
                   f"{str(dtype).replace('torch.', '')}, {device.type} ({machine()})"),
             "", f"| variant | tokens/s | MFU (6N + 12LHQT) | MFU (6N + 6LHQT) |", "|---|---:|---:|---:|"]
    for v, t in medians.items():
        lines.append(f"| {v} | {tokens / t:,.0f} | {(6 * n_params + 12 * attn) * tokens / t / peak:.1%} | "
                     f"{(6 * n_params + 6 * attn) * tokens / t / peak:.1%} |")
    lines.append(f"\nmeasured matmul peak: {peak / 1e9:.1f} GFLOP/s (2048^3, {str(dtype).replace('torch.', '')})")
    if device.type == "cuda":
        lines.append(f"max_memory_allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return "\n".join(lines)


def main():
    parser = arguments(__doc__, tiny='smoke test: tiny size, 3 rounds, no compile')
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, GPT-2-small shapes")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true")
    args = parse(parser)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA; none is available here.")
        print(run_size("gpt2-small", SIZES["gpt2-small"], torch.device("cuda"), torch.bfloat16, args.rounds,
                       not args.no_compile))
        return
    names = ["tiny"] if args.tiny else ["tiny", "small"]
    for name in names:
        print(run_size(name, SIZES[name], torch.device("cpu"), torch.float32, 3 if args.tiny else args.rounds,
                       not (args.tiny or args.no_compile)))
        print()


if __name__ == "__main__":
    main()
