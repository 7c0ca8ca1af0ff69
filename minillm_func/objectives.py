"""The stage losses: ``(params, batch, extras) -> (summed_loss, (count, metrics))``.

Each stage is one loss function over a batch dict; :func:`~minillm_func.trainers.create_trainer`
composes it with an optimizer into a train step, and a new stage is a new
function of this shape (see ``examples/new_stage_orpo.py``). The loss is the
micro-batch's *sum* and ``count`` what it sums over (counted tokens, or pairs
for DPO), so the step can divide by a whole window's count: exact accumulation
and data parallelism.

How a loss reaches the tokens is a :class:`Head`: through the full logits
(:func:`logits_head`, the pure losses of :mod:`minillm_func.losses`) or through
the last hidden state, chunk by chunk (:func:`chunked_head`).
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple, Sequence

import torch

from . import amp
from .chunked import chunked_cross_entropy, chunked_sequence_logps, chunked_token_logps
from .labels import IGNORE_INDEX
from .losses import (dpo_loss, dpo_needs_reference, grpo_count, grpo_loss, kto_loss, orpo_loss, pretrain_loss,
                     sequence_logps, sft_masked_loss, token_logps)
from .memory import MemoryConfig
from .model import Model, output_weight

__all__ = ["Head", "logits_head", "chunked_head", "make_head", "pretrain_objective", "sft_objective",
           "dpo_objective", "orpo_objective", "kto_objective", "kto_logps", "grpo_objective", "pair_logps",
           "packed_pair_logps", "packed_reference",
           "add_reference_logps"]


# Each returns the micro-batch's *summed* loss and the count it sums over. The
# attention mask is not passed to the model: collation pads on the right, and
# under causal attention no real position can see a padded one, so the mask
# would only cost the fast attention kernel and change nothing that is counted.


class Head(NamedTuple):
    """How a stage turns ``(params, ids, labels)`` into token losses.

    ``ce(params, ids, labels, loss_mask=None, position_ids=None)`` -> the summed
    cross-entropy over the counted labels (and, with ``loss_mask``, only where it is
    true); ``logps(params, ids, labels, position_ids=None)`` -> per-row ``(summed
    target log-probs, counts)``; ``token_logps(...)`` -> the ``[B, T]`` target
    log-probs (0 where not counted), which packed rows sum per sequence.
    ``position_ids`` marks rows that pack several sequences (see
    :mod:`minillm_func.data.packing`). :func:`logits_head` goes through the full
    logits; :func:`chunked_head` through the last hidden state, chunk by chunk.
    """

    ce: Callable
    logps: Callable
    token_logps: Callable | None = None


def _positioned(apply: Callable) -> Callable:
    """``apply(params, ids, position_ids=None)``: the keyword is passed on only for packed rows, so an
    ``apply`` that takes none still serves unpacked batches."""
    def run(p, ids, position_ids=None):
        return apply(p, ids) if position_ids is None else apply(p, ids, position_ids=position_ids)

    return run


def logits_head(apply: Callable) -> Head:
    """Token losses from ``apply(params, ids) -> logits`` (``apply(..., position_ids=)`` for packed rows)."""
    logits = _positioned(apply)

    def ce(p, ids, y, loss_mask=None, position_ids=None):
        if loss_mask is None:
            return pretrain_loss(logits(p, ids, position_ids), y, num_tokens=1)
        return sft_masked_loss(logits(p, ids, position_ids), y, loss_mask, num_tokens=1)

    return Head(ce=ce, logps=lambda p, ids, y, position_ids=None: sequence_logps(logits(p, ids, position_ids), y),
                token_logps=lambda p, ids, y, position_ids=None: token_logps(logits(p, ids, position_ids), y))


def chunked_head(apply_hidden: Callable, *, chunk_size: int = 1024) -> Head:
    """Token losses from the last hidden state and the output projection, ``chunk_size`` tokens at a time:
    the ``[tokens, vocab]`` float32 logits are never held at once (``MemoryConfig(chunked_loss=True)``)."""
    hidden = _positioned(apply_hidden)
    return Head(
        # recompute=False: inside a train step the gradient is always wanted, so it is
        # built while each chunk's logits are at hand (3 matmuls, as unchunked) instead
        # of recomputing them in the backward (4); see benchmarks/RESULTS.md.
        ce=lambda p, ids, y, loss_mask=None, position_ids=None: chunked_cross_entropy(
            hidden(p, ids, position_ids), output_weight(p), y if loss_mask is None else _masked(y, loss_mask),
            num_tokens=1, chunk_size=chunk_size, recompute=False),
        logps=lambda p, ids, y, position_ids=None: chunked_sequence_logps(
            hidden(p, ids, position_ids), output_weight(p), y, chunk_size=chunk_size),
        token_logps=lambda p, ids, y, position_ids=None: chunked_token_logps(
            hidden(p, ids, position_ids), output_weight(p), y, chunk_size=chunk_size))


def _as_head(head_or_apply) -> Head:
    return head_or_apply if isinstance(head_or_apply, Head) else logits_head(head_or_apply)


def pretrain_objective(head: Head | Callable) -> Callable:
    """Next-token loss over every counted label (``head``: a :class:`Head`, or ``apply``)."""
    head = _as_head(head)

    def loss_fn(params, batch, extras):
        labels = batch["labels"]
        return (head.ce(params, batch["input_ids"], labels, position_ids=batch.get("position_ids")),
                ((labels != IGNORE_INDEX).sum(), {}))

    return loss_fn


def sft_objective(head: Head | Callable) -> Callable:
    """Loss on the reply tokens (``sft_masked_loss``): ``loss_mask`` if the batch has one, else
    every counted label (the datasets already set the prompt's labels to ``IGNORE_INDEX``)."""
    head = _as_head(head)

    def loss_fn(params, batch, extras):
        labels = batch["labels"]
        mask = batch.get("loss_mask")
        mask = (labels != IGNORE_INDEX) if mask is None else (mask.bool() & (labels != IGNORE_INDEX))
        loss = head.ce(params, batch["input_ids"], labels, mask, position_ids=batch.get("position_ids"))
        return loss, (mask.sum(), {})

    return loss_fn


def _masked(labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``labels`` with ``IGNORE_INDEX`` wherever ``loss_mask`` is false."""
    return torch.where(loss_mask.bool(), labels, torch.full_like(labels, IGNORE_INDEX))


def pair_logps(head: Head | Callable, params, batch):
    """Summed log-probs and counts of chosen and rejected replies, in one ``[2B, T]`` forward
    (or one forward over packed rows: :func:`packed_pair_logps`)."""
    if "sequence_ids" in batch:
        return packed_pair_logps(head, params, batch)
    B = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logps, counts = _as_head(head).logps(params, ids, labels)
    return logps[:B], logps[B:], counts[:B], counts[B:]


def packed_pair_logps(head: Head | Callable, params, batch):
    """:func:`pair_logps` of packed rows (``input_ids``, ``labels``, ``position_ids``, ``sequence_ids``).

    Each token's target log-prob is added into its sequence's slot (``sequence_ids``:
    chosen of a row's pair ``k`` is ``2k``, rejected ``2k + 1``, padding ``-1``); pairs
    come out row by row, ``k`` ascending. The pairs present are those whose chosen
    slot holds a token. Precomputed ``ref_chosen_logps`` / ``ref_rejected_logps``
    (``[rows, pairs]``) are read with the same selection by :func:`packed_reference`.
    """
    head = _as_head(head)
    ids, labels, seq = batch["input_ids"], batch["labels"], batch["sequence_ids"]
    R, T = ids.shape
    W = T + T % 2  # sequence slots per row (a sequence holds >= 1 token): an even number, pairs side by side
    slot = seq.clamp(min=0)  # padding adds a 0 log-prob and a 0 count into slot 0, which it cannot change
    tok = head.token_logps(params, ids, labels, position_ids=batch["position_ids"])  # [R, T], 0 where not counted
    sums = tok.new_zeros(R, W).scatter_add(1, slot, tok).view(R, W // 2, 2)
    counts = torch.zeros(R, W, dtype=torch.long, device=ids.device).scatter_add(
        1, slot, (labels != IGNORE_INDEX).long()).view(R, W // 2, 2)
    present = _present_pairs(seq, W)
    return sums[..., 0][present], sums[..., 1][present], counts[..., 0][present], counts[..., 1][present]


def _present_pairs(seq: torch.Tensor, W: int) -> torch.Tensor:
    """``[R, W/2]`` bool: which pair slots of each packed row hold a pair (its chosen sequence has a token)."""
    R = seq.shape[0]
    tokens = torch.zeros(R, W, dtype=torch.long, device=seq.device).scatter_add(1, seq.clamp(min=0),
                                                                                (seq >= 0).long())
    return tokens.view(R, W // 2, 2)[..., 0] > 0


def packed_reference(batch):
    """The precomputed ``(ref_chosen_logps, ref_rejected_logps)`` of a packed batch, pairs in
    :func:`packed_pair_logps`'s order."""
    T = batch["input_ids"].shape[1]
    present = _present_pairs(batch["sequence_ids"], T + T % 2)
    K = present.shape[1]
    return tuple(_widen(batch[k], K)[present] for k in ("ref_chosen_logps", "ref_rejected_logps"))


def _widen(x: torch.Tensor, K: int) -> torch.Tensor:
    """``x`` ``[R, k]`` cut or zero-padded to ``[R, K]`` columns."""
    return x[:, :K] if x.shape[1] >= K else torch.nn.functional.pad(x, (0, K - x.shape[1]))


def dpo_objective(head: Head | Callable, *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
                  label_smoothing: float = 0.0, gamma: float = 0.5, **loss_options) -> Callable:
    """``dpo_loss`` summed over pairs. Reference log-probs come from the batch
    (``ref_chosen_logps`` / ``ref_rejected_logps``, see :func:`add_reference_logps`)
    or from the frozen ``extras["ref_params"]``, never differentiated; a reference-free
    ``loss_type`` (``"simpo"``, ``"sft"``) reads neither. ``loss_options``: the rest of
    :func:`~minillm_func.losses.dpo_loss`'s keywords (``loss_weights``, ``f_divergence_type``, ...).

    The loss is summed per micro-batch and divided by the window's pair count, so
    accumulation is exact for every type whose loss is a sum over pairs; the
    batch-level ``aot`` types sort within each micro-batch.
    """
    head = _as_head(head)
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, **loss_options)
    one = torch.ones(1)
    dpo_loss(one * -1, one * -2, one * -1, one * -2, chosen_counts=one, rejected_counts=one,
             **options)  # validate the hyper-parameters now, not at the first step
    reference = dpo_needs_reference(loss_type)

    def loss_fn(params, batch, extras):
        pc, pr, nc, nr = pair_logps(head, params, batch)
        if "ref_chosen_logps" in batch:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            if rc.dim() == 2:  # packed rows' precomputed values, [rows, pairs]: into pair order
                rc, rr = packed_reference(batch)
        elif not reference:
            rc = rr = None
        else:
            if "ref_params" not in extras:
                raise ValueError("dpo: no reference log-probs in the batch and no ref_params in the state; "
                                 "build the state with trainer.init(params), or add_reference_logps to the data.")
            with torch.no_grad():
                rc, rr, _, _ = pair_logps(head, extras["ref_params"], batch)
        loss, metrics = dpo_loss(pc, pr, rc, rr, chosen_counts=nc, rejected_counts=nr, num_pairs=1, **options)
        return loss, (torch.tensor(pc.shape[0]), metrics)

    return loss_fn


def orpo_objective(head: Head | Callable, *, beta: float = 0.1) -> Callable:
    """:func:`~minillm_func.losses.orpo_loss` summed over the pairs of a DPO batch; no reference model."""
    head = _as_head(head)
    orpo_loss(-torch.ones(1), -torch.ones(1), torch.ones(1), torch.ones(1), beta=beta)  # validate now

    def loss_fn(params, batch, extras):
        pc, pr, nc, nr = pair_logps(head, params, batch)
        loss, metrics = orpo_loss(pc, pr, nc, nr, beta=beta, num_pairs=1)
        return loss, (torch.tensor(pc.shape[0]), metrics)

    return loss_fn


def kto_logps(head: Head | Callable, params, batch):
    """Summed log-probs of each example's reply and of its mismatched KL pair, in one ``[2B, T]`` forward."""
    B = batch["input_ids"].shape[0]
    ids = torch.cat([batch["input_ids"], batch["kl_input_ids"]])
    labels = torch.cat([batch["labels"], batch["kl_labels"]])
    logps, _ = _as_head(head).logps(params, ids, labels)
    return logps[:B], logps[B:]


def kto_objective(head: Head | Callable, *, beta: float = 0.1, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0) -> Callable:
    """:func:`~minillm_func.losses.kto_loss` summed over a batch of an ``UnpairedPreferenceDataset``.

    The reference log-probs come from the batch (``ref_logps``, ``ref_kl_logps``) or from the
    frozen ``extras["ref_params"]``, never differentiated. The KL reference point is estimated
    per micro-batch (see ``kto_loss``).
    """
    head = _as_head(head)
    kto_loss(torch.zeros(1), torch.zeros(1), torch.ones(1, dtype=torch.bool), torch.zeros(1), torch.zeros(1),
             beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)  # validate now

    def loss_fn(params, batch, extras):
        policy, policy_kl = kto_logps(head, params, batch)
        if "ref_logps" in batch:
            ref, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        else:
            if "ref_params" not in extras:
                raise ValueError("kto: no reference log-probs in the batch and no ref_params in the state; "
                                 "build the state with trainer.init(params).")
            with torch.no_grad():
                ref, ref_kl = kto_logps(head, extras["ref_params"], batch)
        loss, metrics = kto_loss(policy, ref, batch["desirable"], policy_kl, ref_kl, beta=beta,
                                 desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                 num_examples=1)
        return loss, (torch.tensor(policy.shape[0]), metrics)

    return loss_fn


def grpo_objective(apply: Callable, *, loss_type: str = "dapo", epsilon: float = 0.2,
                   epsilon_high: float | None = None, beta: float = 0.0, importance_sampling_level: str = "token",
                   max_completion_length: int | None = None, temperature: float = 1.0) -> Callable:
    """``grpo_loss`` over a sampled batch (:func:`minillm_func.rl.make_sampler`): ``input_ids``, ``labels``
    on the completion tokens, ``advantages`` per completion.

    ``apply(params, ids) -> logits``, divided by ``temperature`` (the sampler's), so the log-probs
    are those of the policy that sampled. The sampling policy's log-probs are ``batch["old_logps"]`` when
    the batch carries them, else this forward's own, detached (one update per batch: the ratio is
    exactly 1 and the loss's gradient is the policy gradient). With ``beta > 0`` the reference's
    token log-probs come from ``batch["ref_logps"]`` or the frozen ``extras["ref_params"]``.
    ``count`` is :func:`~minillm_func.losses.grpo_count`: completions or completion tokens, so
    accumulation and data parallelism normalise by the whole update's.

    Metrics (per micro-batch, count-weighted over a window): the loss's (``clip_ratio``, ``kl``),
    ``entropy`` (mean over completion tokens), and the sampler's ``reward``, ``reward_std``,
    ``completion_length``, and per reward function ``rewards/<function>`` (mean) and
    ``rewards/<function>/std`` (the standard deviations are each micro-batch's).
    """
    grpo_loss(torch.zeros(1, 1), None, torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type=loss_type,
              epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, importance_sampling_level=importance_sampling_level,
              max_completion_length=max_completion_length)  # validate the hyper-parameters now

    if not temperature > 0:
        raise ValueError(f"grpo: temperature must be positive, got {temperature}.")

    def scaled(params, ids):
        logits = apply(params, ids)
        return logits if temperature == 1.0 else logits / temperature

    def loss_fn(params, batch, extras):
        ids, labels = batch["input_ids"], batch["labels"]
        logits = scaled(params, ids)
        logps = token_logps(logits, labels)
        mask = labels != IGNORE_INDEX
        ref = batch.get("ref_logps")
        if beta > 0 and ref is None:
            if "ref_params" not in extras:
                raise ValueError("grpo: beta > 0 needs a reference: build the state with trainer.init(params).")
            with torch.no_grad():
                ref = token_logps(scaled(extras["ref_params"], ids), labels)
        total, metrics = grpo_loss(logps, batch.get("old_logps"), ref, batch["advantages"], mask,
                                   loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
                                   importance_sampling_level=importance_sampling_level,
                                   max_completion_length=max_completion_length, num_items=1)
        with torch.no_grad():
            z = logits.detach().float()
            entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)  # [N, T]
            m = mask.to(entropy.dtype)
            metrics["entropy"] = (entropy * m).sum() / m.sum().clamp_min(1)
            rewards = batch["rewards"].float()
            metrics["reward"] = rewards.mean()
            metrics["reward_std"] = rewards.std(unbiased=False)
            metrics["completion_length"] = batch["completion_length"].float().mean()
            for k, v in list(batch.items()):
                if k.startswith("rewards/"):
                    metrics[k] = v.float().mean()
                    metrics[k + "/std"] = v.float().std(unbiased=False)
        return total, (grpo_count(loss_type, mask), metrics)

    return loss_fn


def add_reference_logps(model: Model, ref_params: dict, dataset, *, batch_size: int = 32):
    """The items of a preference dataset with ``ref_chosen_logps`` / ``ref_rejected_logps`` added.

    Computed once with the frozen reference params, so DPO training needs only
    the policy in memory (``create_trainer("dpo", ..., precomputed_reference=True)``).
    The result is a copy of ``dataset`` holding the extended items; batch it with ``Batches``.
    """
    from .data import PackedDataset, collate

    if isinstance(dataset, PackedDataset):  # the pairs' values, then the same rows again
        return PackedDataset(add_reference_logps(model, ref_params, dataset.source, batch_size=batch_size),
                             dataset.capacity)
    pad_id = dataset.tokenizer.pad_id
    out = []
    with torch.no_grad():
        for s in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
            rc, rr, _, _ = pair_logps(model.apply, ref_params, collate(items, pad_id=pad_id))
            out += [{**it, "ref_chosen_logps": c, "ref_rejected_logps": r} for it, c, r in zip(items, rc, rr)]
    with_ref = copy.copy(dataset)  # same tokenizer, drop counts and lengths; new items
    with_ref.items = out
    return with_ref


def make_head(model: Model, policy: amp.Policy, memory: MemoryConfig) -> Head:
    """The stage losses' way to the tokens, as the memory config and precision policy ask."""
    checkpoint = memory.activation_checkpointing
    if memory.chunked_loss:
        hidden = lambda p, ids, **kw: model.apply_hidden(p, ids, checkpoint=checkpoint, **kw)  # noqa: E731
        return chunked_head(policy.wrap(hidden) if policy.mixed else hidden)
    apply = (lambda p, ids, **kw: model.apply(p, ids, checkpoint=True, **kw)) if checkpoint else model.apply
    return logits_head(policy.wrap(apply) if policy.mixed else apply)
