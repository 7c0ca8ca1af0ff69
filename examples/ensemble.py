"""Train K models at once: vmap the pure train step over K stacked states (here K seeds).

    python examples/ensemble.py [--k 4] [--steps 30]
"""
import argparse

import torch

import minillm_func as mf
from minillm_func import ensemble

parser = argparse.ArgumentParser()
parser.add_argument("--k", type=int, default=4)
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()

tok = mf.ByteTokenizer()
model = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, max_seq_len=64))
data = mf.LanguageModelingDataset(mf.demo_corpus(0, n_pretrain=300).pretrain, tok, 64, pack=True)
trainer = mf.create_trainer("pretrain", model, learning_rate=3e-3)

members = [trainer.init(model.init(seed)) for seed in range(args.k)]  # K different initialisations
states = ensemble.stack(members)                                      # one state, leaves [K, ...]
step = ensemble.vmap_step(trainer.step)                               # every member sees the same batch

for i, batch in zip(range(args.steps), mf.Batches(data, batch_size=8, seed=0)):
    states, metrics = step(states, batch)
    if (i + 1) % 10 == 0:
        print(f"update {i + 1:3d}  losses " + " ".join(f"{x:.3f}" for x in metrics["loss"].tolist()))

# Member 0 trained alone on the same batches ends where it ended inside the ensemble.
alone = members[0]
for _, batch in zip(range(args.steps), mf.Batches(data, batch_size=8, seed=0)):
    alone, _ = trainer.step(alone, batch)
gap = max((a - b).abs().max().item() for a, b in zip(alone.params.values(),
                                                      ensemble.unstack(states)[0].params.values()))
print(f"member 0 vs trained alone: max |param difference| = {gap:.2e}")
