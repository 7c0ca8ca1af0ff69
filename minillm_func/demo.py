"""The end-to-end demo: pretrain -> SFT -> DPO, and GRPO, a small model on the built-in corpus, on a CPU.

``run_demo(out_dir)`` (what ``minillm-func demo`` runs) trains the stages in
turn -- pretrain, then SFT from it, then DPO from SFT, and GRPO from SFT too --
and measures each stage's held-out metric before and after it (the tasks and
metrics are described in ``minillm_func/data/demo_tasks.py``):

- pretrain: perplexity of held-out documents;
- SFT: exact-match accuracy of greedy answers to held-out questions;
- DPO: preference accuracy on held-out pairs, and the share of greedy answers
  in the preferred (bare) style. Before DPO the policy *is* the reference, so
  every pair's two rewards are equal: a tie, which preference accuracy (as in
  TRL) does not count as right. The share of tied pairs is reported beside it,
  so the "before" column reads as a measurement, not as a model that is wrong
  on every pair.
- GRPO: exact-match accuracy of greedy answers to the held-out questions, before
  (the SFT model) and after online RL with a right-answer reward; and the mean
  reward of the replies it sampled, over its first and last updates.

The run folder gets one sub-folder per stage (``metrics.jsonl``, a
checkpoint), ``summary.json`` with the before/after numbers and samples, and
``loss_curves.png`` (one panel per stage, titled with the loss it minimises)
when matplotlib is installed -- ``pip install 'minillm_func[plot]'``, which
``make demo`` does; without it the demo says so in one line.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from . import schedules
from .data import (Batches, ByteTokenizer, ConversationDataset, LanguageModelingDataset, PreferenceDataset,
                   PromptDataset)
from .data.demo_tasks import answer_reward, demo_corpus, extract_answer, is_preferred_style
from .generate import generate_text
from .model import ModelConfig, build_model
from .trainers import create_trainer

__all__ = ["DemoConfig", "run_demo", "format_summary"]

PLOT_HINT = "pip install 'minillm_func[plot]'"
STAGES = ("pretrain", "sft", "dpo", "grpo")
# How each DPO loss type is named in a plot title (see losses.dpo_loss for the formulas).
_DPO_LOSS_NAMES = {"sigmoid": "DPO (sigmoid) loss", "robust": "robust DPO loss", "ipo": "IPO loss",
                   "hinge": "hinge loss", "simpo": "SimPO loss"}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen so the whole demo fits in about five minutes on two CPU cores."""

    seed: int = 0
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 64
    pretrain_steps: int = 1200
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    sft_steps: int = 700
    sft_batch: int = 32
    sft_lr: float = 1e-3
    dpo_steps: int = 40
    dpo_batch: int = 16
    dpo_lr: float = 5e-5
    beta: float = 0.1
    # IPO rather than the sigmoid loss: both move every held-out pair the right way,
    # but at this size the sigmoid loss also drifts the answers themselves (exact
    # match 0.465 -> 0.25 in a measured run), while IPO's squared loss stops at its
    # target margin and keeps them (0.465 -> 0.465).
    dpo_loss_type: str = "ipo"
    # GRPO from the SFT model: 8 prompts per update, rewarded 1 for a right answer ...
    # (measured from one SFT model, held-out exact match 0.80 after: lr 5e-5 x 120 updates at
    # temperature 0.7 gave 0.825, 60 at 1.0 gave 0.82; 3e-4 fell to 0.705 and 1e-3 collapsed)
    grpo_steps: int = 120
    grpo_batch: int = 8
    grpo_lr: float = 5e-5
    # ... of the 8 replies sampled for each.
    grpo_generations: int = 8
    grpo_temperature: float = 0.7
    grpo_max_completion: int = 20
    n_eval: int = 200
    eval_every: int = 0

    def scaled(self, factor: float) -> "DemoConfig":
        """The same demo with every step count multiplied by ``factor`` (for a quick smoke run)."""
        steps = {k: max(1, int(getattr(self, k) * factor))
                 for k in ("pretrain_steps", "sft_steps", "dpo_steps", "grpo_steps")}
        return dataclasses.replace(self, **steps)


def _greedy_answers(model, params, tok, prompts, max_new_tokens=32, batch=100):
    out = []
    for s in range(0, len(prompts), batch):
        out += generate_text(model, params, tok, prompts[s:s + batch], max_new_tokens=max_new_tokens)
    return out


def _sft_accuracy(model, params, tok, evals) -> tuple[float, float, list[str]]:
    replies = _greedy_answers(model, params, tok, [e["prompt"] for e in evals])
    exact = sum(extract_answer(r) == e["answer"] for r, e in zip(replies, evals)) / len(evals)
    bare = sum(is_preferred_style(r) for r in replies) / len(evals)
    return exact, bare, replies


def _warmup_cosine(lr, steps):
    return schedules.warmup_cosine(lr, max(1, steps // 10), max(2, steps), lr / 10)


def run_demo(out_dir="runs/demo", config: DemoConfig = DemoConfig(), *, progress: bool = True,
             echo=print) -> dict:
    """Run the stages; return (and write to ``out_dir/summary.json``) the before/after metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:  # a demo run starts afresh: an earlier run's stage folders are replaced
        shutil.rmtree(out / stage, ignore_errors=True)
    c = config
    torch.manual_seed(c.seed)
    started = time.perf_counter()
    corpus = demo_corpus(c.seed, n_eval=c.n_eval)
    tok = ByteTokenizer()
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, dim=c.dim, n_layers=c.n_layers,
                                    n_heads=c.n_heads, max_seq_len=c.seq_len))
    params = model.init(c.seed)
    summary = {"config": dataclasses.asdict(c), "model_config": dataclasses.asdict(model.config), "stages": {}}
    echo(f"demo: {sum(p.numel() for p in params.values()) / 1e6:.2f}M-parameter model, run folder {out}")

    # ---- pretraining: held-out perplexity
    train = LanguageModelingDataset(corpus.pretrain, tok, c.seq_len, pack=True)
    held = LanguageModelingDataset(corpus.pretrain_eval, tok, c.seq_len, pack=True)
    evals = lambda: Batches(held, 32, shuffle=False, epochs=1)  # noqa: E731
    trainer = create_trainer("pretrain", model, learning_rate=c.pretrain_lr,
                             schedule=_warmup_cosine(c.pretrain_lr, c.pretrain_steps))
    state = trainer.init(params)
    before = trainer.evaluate(state, evals())["perplexity"]
    state = trainer.fit(state, Batches(train, c.pretrain_batch, seed=c.seed), c.pretrain_steps,
                        eval_batches=evals, eval_every=c.eval_every, out_dir=out / "pretrain",
                        progress=progress, desc="pretrain")
    after = trainer.evaluate(state, evals())["perplexity"]
    summary["stages"]["pretrain"] = {"metric": "held-out perplexity (lower is better)", "before": before,
                                     "after": after, "steps": c.pretrain_steps}
    params = state.params

    # ---- SFT: exact match of greedy answers on held-out questions
    train = ConversationDataset(corpus.sft, tok, c.seq_len)
    trainer = create_trainer("sft", model, learning_rate=c.sft_lr, schedule=_warmup_cosine(c.sft_lr, c.sft_steps))
    exact_before, _, _ = _sft_accuracy(model, params, tok, corpus.sft_eval)
    state = trainer.fit(trainer.init(params), Batches(train, c.sft_batch, seed=c.seed), c.sft_steps,
                        out_dir=out / "sft", progress=progress, desc="sft")
    params = state.params
    exact_after, bare_before, replies_sft = _sft_accuracy(model, params, tok, corpus.sft_eval)
    summary["stages"]["sft"] = {"metric": "held-out exact-match accuracy of greedy answers",
                                "before": exact_before, "after": exact_after, "steps": c.sft_steps}

    # ---- DPO: preference accuracy on held-out pairs, and the preferred style's share
    train = PreferenceDataset(corpus.dpo, tok, c.seq_len)
    held = PreferenceDataset(corpus.dpo_eval, tok, c.seq_len)
    evals = lambda: Batches(held, 50, shuffle=False, epochs=1)  # noqa: E731
    trainer = create_trainer("dpo", model, learning_rate=c.dpo_lr, beta=c.beta, loss_type=c.dpo_loss_type,
                             schedule=_warmup_cosine(c.dpo_lr, c.dpo_steps))
    state = trainer.init(params)
    dpo_before = trainer.evaluate(state, evals())  # policy == reference: every pair is a tie
    state = trainer.fit(state, Batches(train, c.dpo_batch, seed=c.seed), c.dpo_steps, out_dir=out / "dpo",
                        progress=progress, desc="dpo")
    dpo_eval = trainer.evaluate(state, evals())
    exact_dpo, bare_after, replies_dpo = _sft_accuracy(model, state.params, tok, corpus.sft_eval)
    summary["stages"]["dpo"] = {"metric": "held-out preference accuracy (ties count as wrong)",
                                "before": dpo_before["rewards/accuracies"],
                                "after": dpo_eval["rewards/accuracies"], "steps": c.dpo_steps,
                                "ties": {"before": dpo_before["rewards/ties"], "after": dpo_eval["rewards/ties"]},
                                "preferred_style_share": {"before": bare_before, "after": bare_after},
                                "exact_match_after_dpo": exact_dpo}

    # ---- GRPO from the SFT model: online RL with a right-answer reward; held-out exact match
    prompts = PromptDataset(corpus.grpo, tok, c.seq_len - c.grpo_max_completion)
    trainer = create_trainer("grpo", model, tokenizer=tok, reward_fns=[answer_reward],
                             num_generations=c.grpo_generations, max_completion_length=c.grpo_max_completion,
                             temperature=c.grpo_temperature, learning_rate=c.grpo_lr,
                             schedule=_warmup_cosine(c.grpo_lr, c.grpo_steps), sampling_seed=c.seed)
    state = trainer.fit(trainer.init(params), Batches(prompts, c.grpo_batch, seed=c.seed), c.grpo_steps,
                        out_dir=out / "grpo", progress=progress, desc="grpo")
    exact_grpo, _, replies_grpo = _sft_accuracy(model, state.params, tok, corpus.sft_eval)
    rewards = [r["reward"] for r in _train_records(out / "grpo")]
    k = max(1, min(10, len(rewards) // 3))
    summary["stages"]["grpo"] = {"metric": "held-out exact-match accuracy of greedy answers",
                                 "before": exact_after, "after": exact_grpo, "steps": c.grpo_steps,
                                 "sampled_reward": {"first": sum(rewards[:k]) / k, "last": sum(rewards[-k:]) / k,
                                                    "updates_averaged": k}}
    summary["samples"] = [{"prompt": e["prompt"], "after_sft": a, "after_dpo": b, "after_grpo": g}
                          for e, a, b, g in list(zip(corpus.sft_eval, replies_sft, replies_dpo, replies_grpo))[:6]]
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    echo(format_summary(summary))
    _plot(out, c, echo=echo)
    return summary


def format_summary(summary: dict) -> str:
    """The before/after table and sample generations, as printed at the end of the demo.

    A pure function of ``summary`` (the dict ``run_demo`` returns and writes to
    ``summary.json``). Preference accuracy counts a tied pair (equal rewards) as
    not right, so the DPO rows show the tied share beside it.
    """
    s = summary["stages"]
    dpo = s["dpo"]
    rows = [("pretrain", "held-out perplexity", s["pretrain"]["before"], s["pretrain"]["after"]),
            ("sft", "held-out exact match", s["sft"]["before"], s["sft"]["after"]),
            ("dpo", "held-out preference accuracy", dpo["before"], dpo["after"]),
            ("dpo", "held-out pairs tied (equal rewards)", dpo["ties"]["before"], dpo["ties"]["after"]),
            ("dpo", "greedy answers in preferred style", dpo["preferred_style_share"]["before"],
             dpo["preferred_style_share"]["after"]),
            ("dpo", "held-out exact match (kept?)", s["sft"]["after"], dpo["exact_match_after_dpo"])]
    grpo = s.get("grpo")
    if grpo is not None:
        rows += [("grpo", "held-out exact match", grpo["before"], grpo["after"]),
                 ("grpo", "mean reward of sampled replies", grpo["sampled_reward"]["first"],
                  grpo["sampled_reward"]["last"])]
    lines = ["", f"{'stage':<9} {'metric':<36} {'before':>9} {'after':>9}", "-" * 66]
    lines += [f"{a:<9} {b:<36} {c:>9.3f} {d:>9.3f}" for a, b, c, d in rows]
    if dpo["ties"]["before"] or dpo["ties"]["after"]:
        lines.append("(preference accuracy counts a tied pair as wrong; before DPO the policy is the "
                     "reference, so its pairs tie)")
    if grpo is not None:
        k = grpo["sampled_reward"]["updates_averaged"]
        lines.append(f"(GRPO starts from the SFT model; its sampled reward is the mean over its first and last {k} "
                     "updates)")
    lines += ["", "samples (held-out questions):"]
    for x in summary["samples"]:
        text = f"  {x['prompt'].strip()!r:<28} after SFT: {x['after_sft']!r:<24} after DPO: {x['after_dpo']!r:<18}"
        if "after_grpo" in x:
            text += f" after GRPO: {x['after_grpo']!r}"
        lines.append(text.rstrip())
    lines.append(f"\ntotal time {summary['seconds']:.0f} s")
    return "\n".join(lines)


def loss_titles(config: DemoConfig) -> dict[str, str]:
    """The loss each stage minimises, as titled in ``loss_curves.png``; DPO's from ``config``."""
    dpo_name = _DPO_LOSS_NAMES.get(config.dpo_loss_type, f"{config.dpo_loss_type} loss")
    return {"pretrain": "pretrain: cross-entropy (next token)",
            "sft": "sft: cross-entropy on reply tokens",
            "dpo": f"dpo: {dpo_name} (beta={config.beta:g})",
            "grpo": f"grpo: mean reward of {config.grpo_generations} sampled replies"}


# What each panel of loss_curves.png draws: GRPO's loss is a policy-gradient surrogate whose value
# says little (it is ~0 at every update), so its panel shows the reward it is raising.
_PLOTTED = {"pretrain": ("loss", "training loss"), "sft": ("loss", "training loss"),
            "dpo": ("loss", "training loss"), "grpo": ("reward", "mean sampled reward")}


def _train_records(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r.get("split") == "train"]


def _plot(out: Path, config: DemoConfig, *, echo=print) -> Path | None:
    """Write ``out/loss_curves.png`` from the stages' metrics.jsonl; return its path.

    Without matplotlib, say so in one line (and how to get it) and return None.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        echo(f"loss_curves.png skipped: matplotlib is not installed ({PLOT_HINT}, or run `make demo`)")
        return None
    titles = loss_titles(config)
    stages = [st for st in STAGES if st != "grpo" or (out / "grpo" / "metrics.jsonl").exists()]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.7 * len(stages), 3.8))
    for ax, stage in zip(axes, stages):
        rows = _train_records(out / stage)
        key, label = _PLOTTED[stage]
        # markers when there are few points, so a one-update run (--quick) still shows its loss
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=0.8, marker="o" if len(rows) < 30 else None,
                ms=3)
        ax.set_title(titles[stage], fontsize=10)
        ax.set_xlabel("update")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out / "loss_curves.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    echo(f"loss curves: {png}")
    return png
