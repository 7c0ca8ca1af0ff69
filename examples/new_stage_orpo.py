"""A new training stage by writing only its loss: ORPO (Hong et al., 2024, arXiv:2403.07691).

ORPO needs no reference model. With p_w, p_l the length-normalised sequence
probabilities of the chosen and rejected replies, odds(p) = p / (1 - p):

    L = NLL(chosen) + lam * -log sigmoid(log odds(p_w) - log odds(p_l))

    python examples/new_stage_orpo.py [--steps 30]
"""
import argparse

import torch
import torch.nn.functional as F

import minillm_func as mf

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--lam", type=float, default=0.1)
args = parser.parse_args()

tok = mf.ByteTokenizer()
model = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, max_seq_len=64))
pairs = mf.PreferenceDataset(mf.demo_corpus(0, n_dpo=200).dpo, tok, 64)


def orpo_loss(params, batch, extras):
    """Summed ORPO loss over the pairs of the micro-batch, and the pair count."""
    B = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    logps, counts = mf.sequence_logps(model.apply(params, ids), torch.cat([batch["chosen_labels"],
                                                                           batch["rejected_labels"]]))
    mean_logp = logps / counts.clamp_min(1)  # log p, per token
    log_odds = mean_logp - torch.log1p(-torch.exp(mean_logp).clamp(max=1 - 1e-6))
    ratio = F.logsigmoid(log_odds[:B] - log_odds[B:])
    nll = -mean_logp[:B]
    return (nll - args.lam * ratio).sum(), (torch.tensor(B), {"orpo/log_odds_ratio": ratio.mean().detach()})


trainer = mf.create_trainer("dpo", model, loss_fn=orpo_loss, learning_rate=1e-3, precomputed_reference=True)
state = trainer.init(model.init(seed=0))
before = trainer.evaluate(state, mf.Batches(pairs, 50, shuffle=False, epochs=1))
state = trainer.fit(state, mf.Batches(pairs, 16, seed=0), args.steps, progress=False)
after = trainer.evaluate(state, mf.Batches(pairs, 50, shuffle=False, epochs=1))
print(f"ORPO loss {before['loss']:.3f} -> {after['loss']:.3f}, "
      f"log-odds ratio {before['orpo/log_odds_ratio']:.3f} -> {after['orpo/log_odds_ratio']:.3f}")
