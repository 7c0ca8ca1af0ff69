"""A training loop written by hand from the pure pieces: no trainer, just make_train_step and a for loop.

    python examples/train_loop.py [--steps 200]
"""
import argparse

import torch

import minillm_func as mf
from minillm_func import optim, schedules

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

tok = mf.ByteTokenizer()
model = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, max_seq_len=64))
data = mf.LanguageModelingDataset(mf.demo_corpus(0, n_pretrain=500).pretrain, tok, 64, pack=True)


def loss_fn(params, batch, extras):
    """Summed next-token loss and the number of tokens it sums over (the step normalises)."""
    logits = model.apply(params, batch["input_ids"])
    labels = batch["labels"]
    return mf.pretrain_loss(logits, labels, num_tokens=1), ((labels != mf.IGNORE_INDEX).sum(), {})


lr = schedules.warmup_cosine(3e-3, warmup_steps=args.steps // 10, total_steps=args.steps)
optimizer = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr, weight_decay=0.1, mask=optim.decay_mask))
step = mf.make_train_step(loss_fn, optimizer, accumulation_steps=2, lr_schedule=lr)

state = mf.step.init_train_state(model.init(seed=0), optimizer)
for i, batch in zip(range(2 * args.steps), mf.Batches(data, batch_size=8, seed=0)):
    state, metrics = step(state, batch)  # pure: `state` is a new value each time
    if metrics["updated"] and int(state.step) % 20 == 0:
        print(f"update {int(state.step):4d}  loss {metrics['loss']:.3f}  lr {metrics['lr']:.2e}")

print(f"done: {int(state.step)} updates, final loss {float(metrics['loss']):.3f}")
