"""Losses: pure functions of logits (or sequence log-probs) and labels.

Labels are already aligned: ``labels[b, t]`` is the target for ``logits[b, t]``
(the datasets do the shift). Positions whose label is ``IGNORE_INDEX`` (-100)
count nowhere: not in the loss, not in the normaliser, and they get exactly
zero gradient.

Every token loss takes an explicit normaliser ``num_tokens`` (and ``dpo_loss``
a ``num_pairs``). With the default, the loss is the mean over this batch's
counted tokens. Passing the count of a whole accumulation window (or of all
data-parallel ranks) makes the sum of the micro-batch losses equal the
full-batch loss exactly -- the token-weighted mean, never a mean of means:

    L = (sum_i S_i) / (sum_i N_i),   S_i = summed token losses of micro-batch i,
                                     N_i = its counted tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX, require_integer_ids

__all__ = [
    "IGNORE_INDEX", "pretrain_loss", "sft_masked_loss", "sequence_logps", "dpo_loss", "DPO_LOSS_TYPES",
    "check_logits_labels", "normalise",
]

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are reduced in float32; float32/float64 are used as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_logits_labels(fn: str, logits: torch.Tensor, labels: torch.Tensor, *, name: str = "logits",
                         last: str = "V") -> None:
    """``labels [..., T]`` integer and aligned with ``logits`` (or hidden states: ``name``) ``[..., T, last]``."""
    if not isinstance(labels, torch.Tensor) or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"{fn}: {name} {tuple(logits.shape)} and labels {tuple(getattr(labels, 'shape', ()))} do not line up; "
            f"expected {name} [..., T, {last}] and labels [..., T] with labels already shifted "
            "(labels[t] is the target of position t).")
    require_integer_ids(labels, fn, "labels")


def normalise(total: torch.Tensor, count, fn: str) -> torch.Tensor:
    """``total / max(count, 1)``: an empty batch gives 0 with zero gradient, never 0/0 = NaN."""
    if isinstance(count, (int, float)) and count < 0:
        raise ValueError(f"{fn}: the normaliser must be a non-negative count, got {count}.")
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total / count.clamp_min(1)


def pretrain_loss(logits: torch.Tensor, labels: torch.Tensor, *, num_tokens=None) -> torch.Tensor:
    r"""Next-token cross-entropy, summed over counted positions and divided by ``num_tokens``.

    .. math::

        L = \frac{1}{N} \sum_{t:\, y_t \neq -100} -\log \operatorname{softmax}(z_t)_{y_t},
        \qquad N = \texttt{num\_tokens} \text{ (default: } |\{t : y_t \neq -100\}|)

    With the default ``N`` this equals
    ``F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)``.
    A batch with no counted position gives 0 and a zero gradient (``N`` is
    clamped to at least 1).

    Args:
        logits: ``[..., T, V]`` (half precision is reduced in float32).
        labels: ``[..., T]`` integer targets, ``IGNORE_INDEX`` where nothing is learned.
        num_tokens: int or 0-d tensor; pass the window's total count for exact
            gradient accumulation.
    """
    check_logits_labels("pretrain_loss", logits, labels)
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        _upcast(logits).reshape(-1, logits.shape[-1]), flat_labels,
        ignore_index=IGNORE_INDEX, reduction="sum")
    if num_tokens is None:
        num_tokens = (flat_labels != IGNORE_INDEX).sum()
    return normalise(total, num_tokens, "pretrain_loss")


def sft_masked_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, *,
                    num_tokens=None) -> torch.Tensor:
    r"""Cross-entropy over the positions where ``loss_mask`` is true (the reply tokens).

    .. math::

        L = \frac{1}{N} \sum_{t:\, m_t \wedge y_t \neq -100} -\log \operatorname{softmax}(z_t)_{y_t},
        \qquad N \text{ default } |\{t : m_t \wedge y_t \neq -100\}|

    ``sft_masked_loss(z, y, y != IGNORE_INDEX) == pretrain_loss(z, y)``.
    """
    if loss_mask.shape != labels.shape:
        raise ValueError(
            f"sft_masked_loss: loss_mask {tuple(loss_mask.shape)} must have the shape of labels "
            f"{tuple(labels.shape)}.")
    masked = torch.where(loss_mask.bool(), labels, torch.full_like(labels, IGNORE_INDEX))
    return pretrain_loss(logits, masked, num_tokens=num_tokens)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-sequence summed target log-probabilities and target counts.

    .. math::

        s_b = \sum_{t:\, y_{b,t} \neq -100} \big(z_{b,t,y_{b,t}} - \operatorname{logsumexp}_v z_{b,t,v}\big),
        \qquad n_b = |\{t : y_{b,t} \neq -100\}|

    Computed as "gathered logit minus log-sum-exp", so no ``[B, T, V]``
    log-softmax is built and kept for the backward pass (only the ``[B, T]``
    log-sum-exp is); half-precision logits are upcast to float32 first.

    Returns:
        ``(logps [B], counts [B])``; counts are int64.
    """
    check_logits_labels("sequence_logps", logits, labels)
    counted = labels != IGNORE_INDEX
    x = _upcast(logits)
    target = x.gather(-1, torch.where(counted, labels, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(counted, target - torch.logsumexp(x, dim=-1), 0.0)
    return token_logps.sum(-1), counted.sum(-1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             gamma: float = 0.5, chosen_counts: torch.Tensor | None = None,
             rejected_counts: torch.Tensor | None = None, num_pairs=None):
    r"""Direct preference optimisation and its family, from summed sequence log-probs.

    Write :math:`s_w, s_l` for the policy's summed log-probs of the chosen and
    rejected replies, :math:`s^{ref}_w, s^{ref}_l` for the frozen reference's,
    :math:`n_w, n_l` for their token counts, :math:`\sigma` for the logistic
    function and :math:`h = (s_w - s^{ref}_w) - (s_l - s^{ref}_l)`.

    - ``"sigmoid"`` -- DPO (Rafailov et al., 2023, arXiv:2305.18290); with label
      smoothing :math:`\varepsilon` it is conservative DPO (Mitchell, 2023,
      "A note on DPO with noisy preferences"):

      .. math:: \ell = -(1-\varepsilon)\log\sigma(\beta h) - \varepsilon \log\sigma(-\beta h)

    - ``"robust"`` -- robust DPO (Chowdhury et al., 2024, arXiv:2403.00409), an
      unbiased estimate under label flips with rate :math:`\varepsilon < 1/2`:

      .. math:: \ell = \frac{-(1-\varepsilon)\log\sigma(\beta h) + \varepsilon \log\sigma(-\beta h)}{1 - 2\varepsilon}

    - ``"ipo"`` -- IPO (Azar et al., 2023, arXiv:2310.12036), on length-normalised
      log-ratios :math:`\bar h = (s_w - s^{ref}_w)/n_w - (s_l - s^{ref}_l)/n_l`;
      its minimum is at :math:`\bar h = 1/(2\beta)`:

      .. math:: \ell = \left(\bar h - \frac{1}{2\beta}\right)^2

    - ``"hinge"`` -- the hinge loss of RSO / SLiC (Liu et al., 2023, arXiv:2309.06657):

      .. math:: \ell = \max(0,\ 1 - \beta h)

    - ``"simpo"`` -- SimPO (Meng et al., 2024, arXiv:2405.14734), reference-free
      (pass ``None`` for both reference log-probs), length-normalised, with a
      target margin :math:`\gamma`:

      .. math:: x = \beta\left(\frac{s_w}{n_w} - \frac{s_l}{n_l}\right) - \gamma, \quad
                \ell = -(1-\varepsilon)\log\sigma(x) - \varepsilon\log\sigma(-x)

    The loss is :math:`\frac{1}{P}\sum_{pairs} \ell` with :math:`P` = ``num_pairs``
    (default: the number of pairs given); pass the window's pair count for exact
    gradient accumulation. ``ipo`` and ``simpo`` need ``chosen_counts`` and
    ``rejected_counts`` (the second output of :func:`sequence_logps`).

    Returns ``(loss, metrics)``; metrics are detached means over the pairs given,
    named as in TRL: ``rewards/chosen`` = mean :math:`\beta (s_w - s^{ref}_w)`
    (for ``ipo`` the per-token log-ratio, for ``simpo`` :math:`\beta s_w/n_w`),
    ``rewards/rejected`` likewise, ``rewards/margins`` = their difference,
    ``rewards/accuracies`` = share of pairs with chosen reward strictly above
    rejected (ties count as wrong, as in TRL), ``rewards/ties`` = share of pairs
    whose two rewards are exactly equal (every pair while the policy is the
    reference; so accuracies + ties + share ranked the wrong way = 1),
    ``logps/chosen`` and ``logps/rejected`` = mean summed policy log-probs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type={loss_type!r}; choose one of {DPO_LOSS_TYPES}.")
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(
            f"dpo_loss: beta must be positive, got {beta}. With beta = 0 the sigmoid loss is stuck at "
            "log 2 = 0.6931 and nothing is learned; 0.1 is the usual value.")
    bound, ok = ("[0, 0.5)", 0.0 <= label_smoothing < 0.5) if loss_type == "robust" else (
        "[0, 1]", 0.0 <= label_smoothing <= 1.0)
    if not ok:
        raise ValueError(
            f"dpo_loss: label_smoothing must lie in {bound} for loss_type={loss_type!r}, got {label_smoothing}.")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(
            f"dpo_loss: label_smoothing applies to 'sigmoid', 'robust' and 'simpo', not {loss_type!r}; "
            "leave it at 0.0.")
    reference_free = loss_type == "simpo"
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(
            f"dpo_loss: loss_type={loss_type!r} needs the reference log-probs; only 'simpo' is "
            "reference-free.")
    needs_counts = loss_type in ("ipo", "simpo")
    if needs_counts and (chosen_counts is None or rejected_counts is None):
        raise ValueError(
            f"dpo_loss: loss_type={loss_type!r} normalises by length; pass chosen_counts= and "
            "rejected_counts= (the second output of sequence_logps).")
    shape = policy_chosen_logps.shape
    others = [policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_counts, rejected_counts]
    if policy_chosen_logps.dim() != 1 or any(t is not None and t.shape != shape for t in others):
        raise ValueError(
            "dpo_loss: all log-prob and count arguments must be 1-D tensors of the same length "
            f"(one entry per pair); got shapes {[tuple(t.shape) for t in [policy_chosen_logps, *others] if t is not None]}.")

    if reference_free:
        chosen = policy_chosen_logps / chosen_counts.clamp_min(1)
        rejected = policy_rejected_logps / rejected_counts.clamp_min(1)
    else:
        chosen = policy_chosen_logps - ref_chosen_logps
        rejected = policy_rejected_logps - ref_rejected_logps
        if loss_type == "ipo":
            chosen = chosen / chosen_counts.clamp_min(1)
            rejected = rejected / rejected_counts.clamp_min(1)
    h = chosen - rejected
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = (1 - eps) * F.softplus(-beta * h) + eps * F.softplus(beta * h)
    elif loss_type == "robust":
        losses = ((1 - eps) * F.softplus(-beta * h) - eps * F.softplus(beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # simpo
        x = beta * h - gamma
        losses = (1 - eps) * F.softplus(-x) + eps * F.softplus(x)

    loss = normalise(losses.sum(), shape[0] if num_pairs is None else num_pairs, "dpo_loss")
    with torch.no_grad():
        r_w, r_l = beta * chosen, beta * rejected
        metrics = {
            "rewards/chosen": r_w.mean(),
            "rewards/rejected": r_l.mean(),
            "rewards/accuracies": (r_w > r_l).to(r_w.dtype).mean(),
            "rewards/ties": (r_w == r_l).to(r_w.dtype).mean(),
            "rewards/margins": (r_w - r_l).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }
    return loss, metrics
