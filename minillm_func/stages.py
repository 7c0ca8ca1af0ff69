"""The training stages by name, and the defaults each starts from.

One table, read by :func:`~minillm_func.trainers.create_trainer`, the command
line and the file loaders. The defaults are the original imperative design's:
AdamW with learning rate 1e-4 (5e-5 for SFT), DPO's beta 0.1; GRPO takes TRL's
(learning rate 1e-6, no KL term).
"""

__all__ = ["KINDS", "DEFAULTS", "default_learning_rate"]

KINDS = ("pretrain", "sft", "dpo", "orpo", "kto", "grpo")

DEFAULTS = {
    "pretrain": {"learning_rate": 1e-4},
    "sft": {"learning_rate": 5e-5},
    "dpo": {"learning_rate": 1e-4, "beta": 0.1},
    "orpo": {"learning_rate": 1e-4, "beta": 0.1},  # beta: the odds-ratio term's weight (TRL's ORPOConfig)
    "kto": {"learning_rate": 1e-4, "beta": 0.1},
    "grpo": {"learning_rate": 1e-6, "beta": 0.0},  # TRL's GRPOConfig defaults
}


def default_learning_rate(kind: str) -> float:
    """The stage's default peak learning rate."""
    if kind not in DEFAULTS:
        raise ValueError(f"unknown stage {kind!r}; the stages are {', '.join(KINDS)}.")
    return DEFAULTS[kind]["learning_rate"]
