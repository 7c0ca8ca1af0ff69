"""One GRPO step in its two halves: the rollout (sampling G completions per prompt with the KV cache,
scoring them) and the update (the pure train step on the sampled batch), one process.

    python benchmarks/grpo_step.py            # the demo's model (dim 128, 4 layers), 8 prompts x 8 completions
    python benchmarks/grpo_step.py --tiny     # a smoke-test size

Printed: the median time of each half over the rounds (alternated), the generated
tokens per second of the rollout and the tokens per second the update processes
(prompt + completion positions).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, machine, parse, round_robin  # noqa: E402

import minillm_func as mf  # noqa: E402
from minillm_func.data.demo_tasks import answer_reward, demo_corpus  # noqa: E402

SIZES = {"demo": dict(dim=128, n_layers=4, n_heads=4, prompts=8, G=8, completion=20, rounds=9),
         "tiny": dict(dim=32, n_layers=1, n_heads=2, prompts=2, G=2, completion=4, rounds=2)}


def main():
    parser = arguments(__doc__)
    args = parse(parser)
    size = SIZES["tiny" if args.tiny else "demo"]
    tok = mf.ByteTokenizer()
    model = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=size["dim"], n_layers=size["n_layers"],
                                          n_heads=size["n_heads"], max_seq_len=64))
    trainer = mf.create_trainer("grpo", model, tokenizer=tok, reward_fns=[answer_reward],
                                num_generations=size["G"], max_completion_length=size["completion"],
                                learning_rate=1e-5)
    data = mf.data.PromptDataset(demo_corpus(0, n_grpo=64).grpo, tok, 64 - size["completion"])
    prompts = next(iter(mf.Batches(data, size["prompts"], seed=0)))
    state = trainer.init(model.init(0))
    box = {"batch": trainer.prepare(state, prompts, 0)}

    def rollout():
        box["batch"] = trainer.prepare(state, prompts, 0)

    def update():
        trainer.step(state, box["batch"])

    medians = round_robin({"rollout": rollout, "update": update}, warmup=1, rounds=size["rounds"])
    batch = box["batch"]
    generated = float(batch["completion_length"].sum())
    processed = float(batch["input_ids"].numel())
    n = sum(p.numel() for p in state.params.values())
    print(f"GRPO step, {n / 1e6:.2f}M parameters, {size['prompts']} prompts x {size['G']} completions of up to "
          f"{size['completion']} tokens ({machine()})\n")
    total = medians["rollout"] + medians["update"]
    print("| variant | median ms | ratio to the whole step | tokens/s |\n|---|---:|---:|---:|")
    print(f"| rollout (sample + reward) | {medians['rollout'] * 1e3:.1f} | {medians['rollout'] / total:.3f} | "
          f"{generated / medians['rollout']:,.0f} generated |")
    print(f"| update (train step) | {medians['update'] * 1e3:.1f} | {medians['update'] / total:.3f} | "
          f"{processed / medians['update']:,.0f} processed |")
    print(f"| whole step | {total * 1e3:.1f} | 1.000 | |")


if __name__ == "__main__":
    main()
