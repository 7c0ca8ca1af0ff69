"""Online RL with verifiable rewards (GRPO): the sampler that turns prompts into a training batch.

A GRPO update is a loss (:func:`~minillm_func.losses.grpo_loss`, through
:func:`~minillm_func.objectives.grpo_objective`) plus this sampler. For each
prompt of a batch the current policy samples ``num_generations`` (G)
completions with the KV-cache sampler; plain Python reward functions score
them; each completion's advantage is its reward minus its group's mean (the G
completions of one prompt), divided by the group's standard deviation
(``scale_rewards="group"``), the batch's (``"batch"``) or nothing (``"none"``).

A reward function is any callable ``(prompts, completions, **columns) -> list[float]``:
``prompts`` and ``completions`` are lists of strings (one entry per completion),
``columns`` the other fields of the prompt records (``answer``, ...), repeated
for each completion. Two are built in: :func:`exact_match` and
:func:`format_reward`.

Sampling is the impure part of the stage and runs in the trainer's shell
(``Trainer.prepare``, called by ``fit`` and ``evaluate`` on each prompt batch);
the update itself is the usual pure step over the batch this returns. The seed
of a batch's sampling is a function of the update count and the micro-batch's
place in its window, so a resumed run samples what the uninterrupted one did.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Callable, Sequence

import torch

from .generate import generate
from .labels import IGNORE_INDEX
from .model import Model

__all__ = ["exact_match", "format_reward", "group_advantages", "make_sampler", "REWARDS", "reward_by_name",
           "required_columns"]

RewardFn = Callable[..., Sequence[float]]


def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1.0 where the completion, stripped of surrounding white space, equals the record's ``answer``."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def format_reward(pattern: str) -> RewardFn:
    """A reward of 1.0 where the whole completion (stripped) matches the regular expression ``pattern``."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts, completions, **_) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    reward.__name__ = f"format:{pattern}"
    return reward


REWARDS = {"exact_match": exact_match}


def reward_by_name(spec: str) -> RewardFn:
    """``"exact_match"`` or ``"format:REGEX"`` -> the reward function (what the command line accepts)."""
    if spec in REWARDS:
        return REWARDS[spec]
    if spec.startswith("format:"):
        try:
            return format_reward(spec[len("format:"):])
        except re.error as e:
            raise ValueError(f"reward {spec!r}: not a regular expression ({e}).") from None
    raise ValueError(f"unknown reward {spec!r}; use exact_match or format:REGEX.")


def required_columns(reward_fn: RewardFn) -> list[str]:
    """The record columns a reward function needs: its parameters after ``prompts`` and ``completions``
    that have no default (``exact_match`` needs ``answer``)."""
    try:
        params = list(inspect.signature(reward_fn).parameters.values())[2:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """``rewards [N * G]`` (G consecutive completions per prompt) -> advantages: the reward minus its
    group's mean, divided by ``std + 1e-4`` (the group's, the whole batch's, or none; "batch" is
    the rollout batch, one micro-batch of prompts, not the whole accumulated update); a group
    whose rewards are all equal gets advantage 0. Standard deviations are unbiased (``torch.std``), as TRL's.
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards do not split into groups of {num_generations}.")
    grouped = rewards.view(-1, num_generations)
    centred = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(-1, keepdim=True).expand_as(grouped).reshape(-1) if num_generations > 1 \
            else torch.zeros_like(rewards)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
    return centred / (std + 1e-4)


def make_sampler(model: Model, tokenizer, reward_fns: Sequence[RewardFn], *, num_generations: int = 8,
                 max_completion_length: int = 32, temperature: float = 1.0, top_p: float | None = None,
                 top_k: int | None = None, scale_rewards: str = "group",
                 reward_weights: Sequence[float] | None = None, seed: int = 0) -> Callable:
    """``sample(params, prompt_batch, key) -> batch``: G completions per prompt, scored, as a GRPO batch.

    ``prompt_batch``: a collated batch of a :class:`~minillm_func.data.PromptDataset` (``prompt_input_ids``,
    ``prompt_attention_mask``, the ``prompt`` strings and the other columns as lists). ``key``: an int
    that seeds the sampling with ``seed``. The batch returned holds ``input_ids`` and ``labels``
    ``[N*G, T]`` (labels only on completion tokens, the end-of-sequence token included when the
    completion stopped), ``advantages`` and ``rewards`` ``[N*G]``, per reward function
    ``rewards/<name>`` ``[N*G]``, and ``completion_length`` ``[N*G]``.
    """
    if not reward_fns:
        raise ValueError("GRPO needs at least one reward function, e.g. minillm_func.rl.exact_match.")
    if not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(f"num_generations must be an int >= 2 (advantages compare completions of one prompt), "
                         f"got {num_generations!r}.")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    if not temperature > 0:
        raise ValueError(f"GRPO samples: temperature must be positive (0 would give every completion of a "
                         f"group the same tokens and zero advantages), got {temperature}.")
    weights = [1.0] * len(reward_fns) if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != len(reward_fns):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(reward_fns)} reward functions.")
    names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(reward_fns)]
    eos = tokenizer.eos_id
    stops = tuple(getattr(tokenizer, "eos_ids", None) or (eos,))
    G = num_generations

    def sample(params: dict, batch: dict, key: int) -> dict:
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
        prompts = [row[m].tolist() for row, m in zip(ids, mask)]
        repeated = [p for p in prompts for _ in range(G)]
        with torch.no_grad():
            outs = generate(model, params, repeated, max_new_tokens=max_completion_length, eos_id=stops,
                            pad_id=tokenizer.pad_id, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed * 1_000_003 + int(key))
        texts = [tokenizer.decode(o) for o in outs]
        columns = {k: [v for v in batch[k] for _ in range(G)] for k in batch
                   if k not in ("prompt_input_ids", "prompt_attention_mask") and isinstance(batch[k], list)}
        prompt_texts = columns.pop("prompt", [""] * len(texts))
        scores = []
        for fn, name in zip(reward_fns, names):
            got = list(fn(prompt_texts, texts, **columns))
            if len(got) != len(texts) or not all(isinstance(r, (int, float)) and math.isfinite(r) for r in got):
                raise ValueError(f"reward {name}: expected {len(texts)} finite numbers, one per completion; got "
                                 f"{got[:4]}...")
            scores.append(torch.tensor(got, dtype=torch.float32))
        rewards = sum(w * s for w, s in zip(weights, scores))
        # Completions end with the end-of-sequence token when they stopped (the model learns to stop).
        completions = [o + [eos] if len(o) < max_completion_length else o for o in outs]
        T = max(len(p) + len(c) for p, c in zip(repeated, completions))
        input_ids = torch.full((len(repeated), T), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(repeated), T), IGNORE_INDEX, dtype=torch.long)
        for i, (p, c) in enumerate(zip(repeated, completions)):
            input_ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            if c:  # labels[t] is the target of position t: the completion starts after the prompt's last token
                labels[i, len(p) - 1:len(p) - 1 + len(c)] = torch.tensor(c)
        out = {"input_ids": input_ids, "labels": labels,
               "advantages": group_advantages(rewards, G, scale_rewards), "rewards": rewards,
               "completion_length": torch.tensor([len(c) for c in completions], dtype=torch.float32)}
        for name, s in zip(names, scores):
            out[f"rewards/{name}"] = s
        return out

    return sample
