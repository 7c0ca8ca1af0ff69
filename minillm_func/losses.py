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

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX, require_integer_ids

__all__ = [
    "IGNORE_INDEX", "pretrain_loss", "sft_masked_loss", "sequence_logps", "dpo_loss", "DPO_LOSS_TYPES",
    "check_logits_labels", "normalise", "dpo_needs_reference", "token_logps", "grpo_loss", "grpo_count",
    "GRPO_LOSS_TYPES", "orpo_loss", "kto_loss",
]

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
_F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The DPO types that take label_smoothing, and the interval it must lie in for each.
_SMOOTHING_BOUNDS = {"sigmoid": (0.0, 1.0, "[0, 1]"), "simpo": (0.0, 1.0, "[0, 1]"), "aot": (0.0, 1.0, "[0, 1]"),
                     "aot_unpaired": (0.0, 1.0, "[0, 1]"), "robust": (0.0, 0.5, "[0, 0.5)"),
                     "exo_pair": (0.0, 1.0, "(0, 1)")}
_REFERENCE_FREE = ("simpo", "sft")  # the types that read no reference log-probs
_LENGTH_NORMALISED = ("ipo", "simpo", "sigmoid_norm")  # need chosen_counts and rejected_counts
_NO_SCORE = ("simpo", "sft", "aot", "aot_unpaired", "apo_zero")  # types the f-divergence does not reach


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
    return _token_logps(logits, labels).sum(-1), (labels != IGNORE_INDEX).sum(-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Per-position target log-probabilities ``[..., T]``: :math:`z_{t,y_t} - \operatorname{logsumexp}_v z_{t,v}`
    where ``labels != IGNORE_INDEX``, 0 elsewhere (float32 for half-precision logits).

    Gathered logit minus log-sum-exp: no ``[..., T, V]`` log-softmax is built.
    """
    check_logits_labels("token_logps", logits, labels)
    return _token_logps(logits, labels)


def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    counted = labels != IGNORE_INDEX
    x = _upcast(logits)
    target = x.gather(-1, torch.where(counted, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(counted, target - torch.logsumexp(x, dim=-1), 0.0)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
             beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid", label_smoothing: float = 0.0,
             gamma: float = 0.5, chosen_counts: torch.Tensor | None = None,
             rejected_counts: torch.Tensor | None = None, num_pairs=None,
             loss_weights: Sequence[float] | None = None, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
             bco_delta: torch.Tensor | float | None = None):
    r"""Direct preference optimisation and its family, from summed sequence log-probs.

    Write :math:`s_w, s_l` for the policy's summed log-probs of the chosen and
    rejected replies, :math:`s^{ref}_w, s^{ref}_l` for the frozen reference's,
    :math:`n_w, n_l` for their token counts, :math:`\sigma` for the logistic
    function, :math:`\varepsilon` for ``label_smoothing``, the log-ratios
    :math:`r_w = s_w - s^{ref}_w`, :math:`r_l = s_l - s^{ref}_l` and their
    *scores* :math:`u_w = g(r_w)`, :math:`u_l = g(r_l)` under the f-divergence
    below (:math:`g(r) = r` by default), and :math:`h = u_w - u_l`.

    - ``"sigmoid"`` -- DPO (Rafailov et al., 2023, arXiv:2305.18290); with label
      smoothing it is conservative DPO (Mitchell, 2023, "A note on DPO with noisy
      preferences"). *TRL 1.x's DPO trainer ignores* ``label_smoothing`` *for
      this type; here it is applied (it is 0 by default, which is plain DPO)*:

      .. math:: \ell = -(1-\varepsilon)\log\sigma(\beta h) - \varepsilon \log\sigma(-\beta h)

    - ``"robust"`` -- robust DPO (Chowdhury et al., 2024, arXiv:2403.00409), an
      unbiased estimate under label flips with rate :math:`\varepsilon < 1/2`:

      .. math:: \ell = \frac{-(1-\varepsilon)\log\sigma(\beta h) + \varepsilon \log\sigma(-\beta h)}{1 - 2\varepsilon}

    - ``"ipo"`` -- IPO (Azar et al., 2023, arXiv:2310.12036, eq. 17), on
      length-normalised scores :math:`\bar h = u_w/n_w - u_l/n_l`; its minimum is
      at :math:`\bar h = 1/(2\beta)`:

      .. math:: \ell = \left(\bar h - \frac{1}{2\beta}\right)^2

    - ``"hinge"`` -- the hinge loss of SLiC / RSO (Zhao et al., 2023,
      arXiv:2305.10425; Liu et al., 2023, arXiv:2309.06657); zero beyond
      :math:`h = 1/\beta`:

      .. math:: \ell = \max(0,\ 1 - \beta h)

    - ``"simpo"`` -- SimPO (Meng et al., 2024, arXiv:2405.14734), reference-free
      (pass ``None`` for both reference log-probs), length-normalised, with a
      target margin :math:`\gamma` = ``gamma`` (not a TRL DPO type: TRL has it in
      its CPO trainer):

      .. math:: x = \beta\left(\frac{s_w}{n_w} - \frac{s_l}{n_l}\right) - \gamma, \quad
                \ell = -(1-\varepsilon)\log\sigma(x) - \varepsilon\log\sigma(-x)

    - ``"exo_pair"`` -- pairwise EXO (Ji et al., 2024, arXiv:2402.00856, eq. 16):
      the KL from the policy's two-way preference :math:`q = \sigma(\pm\beta h)`
      to the smoothed label :math:`(1-\varepsilon, \varepsilon)`; needs
      :math:`0 < \varepsilon < 1` (the paper uses :math:`10^{-3}`):

      .. math:: \ell = \sigma(\beta h)\big(\log\sigma(\beta h) - \log(1-\varepsilon)\big)
                + \sigma(-\beta h)\big(\log\sigma(-\beta h) - \log\varepsilon\big)

    - ``"nca_pair"`` -- pairwise NCA (Chen et al., 2024, arXiv:2402.05369):

      .. math:: \ell = -\log\sigma(\beta u_w) - \tfrac12\log\sigma(-\beta u_w) - \tfrac12\log\sigma(-\beta u_l)

    - ``"bco_pair"`` -- pairwise BCO (Jung et al., 2024, arXiv:2404.04656), a
      binary classifier of rewards around a shift :math:`\delta` = ``bco_delta``:

      .. math:: \ell = -\log\sigma(\beta u_w - \delta) - \log\sigma(-(\beta u_l - \delta))

      The paper's :math:`\delta` is a running mean of the rewards, which TRL kept
      inside the trainer (0.x) and has since dropped (1.x: :math:`\delta = 0`).
      Here it is an input, so the function stays pure: the default ``None`` means
      :math:`\delta = 0` (TRL 1.x); to follow the paper, keep a running mean of
      ``(metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2`` (the mean
      of :math:`\beta r` over both replies) in your state and pass it as a 0-d
      tensor. It is treated as a constant (no gradient flows into it).

    - ``"sppo_hard"`` -- SPPO with hard labels (Wu et al., 2024, arXiv:2405.00675,
      eq. 4.7 with :math:`P = 1` for the winner, 0 for the loser):

      .. math:: \ell = \left(u_w - \frac{1}{2\beta}\right)^2 + \left(u_l + \frac{1}{2\beta}\right)^2

    - ``"aot"`` / ``"aot_unpaired"`` -- alignment via optimal transport (Melnyk et
      al., 2024, arXiv:2406.05882): the smoothed sigmoid loss on the *sorted*
      batch, :math:`\ell_i = -(1-\varepsilon)\log\sigma(\beta d_i) - \varepsilon\log\sigma(-\beta d_i)`,
      with, for ``aot``, :math:`d = \operatorname{sort}(s_w - s_l) - \operatorname{sort}(s^{ref}_w - s^{ref}_l)`
      and, for ``aot_unpaired``, :math:`d = \operatorname{sort}(r_w) - \operatorname{sort}(r_l)`
      (raw log-ratios, as in TRL: the f-divergence does not apply). **These two
      are batch-level**: the :math:`i`-th term pairs the :math:`i`-th smallest
      values of the pairs *given in this call*, so the loss is not additive over
      micro-batches, and ``num_pairs`` accumulation does not reproduce the
      full-batch loss; call them on the whole batch you want sorted together.

    - ``"apo_zero"`` / ``"apo_down"`` -- anchored preference optimisation
      (D'Oosterlinck et al., 2024, arXiv:2408.06266, eqs. 7 and 8): ``apo_zero``
      pushes the chosen reply up and the rejected down (chosen better than the
      model's own output), ``apo_down`` pushes both down, the rejected more:

      .. math:: \ell_{zero} = 1 - \sigma(\beta r_w) + \sigma(\beta r_l), \qquad
                \ell_{down} = \sigma(\beta r_w) + 1 - \sigma(\beta h)

      (raw log-ratios :math:`r`, as in TRL; only ``apo_down``'s :math:`h` takes the f-divergence.)

    - ``"discopop"`` -- DiscoPOP, the log-ratio modulated loss (Lu et al., 2024,
      arXiv:2406.08414, eq. 5), with :math:`x = \beta h` and :math:`\tau` =
      ``discopop_tau`` (default 0.05, the paper's):

      .. math:: \ell = \big(1 - \sigma(x/\tau)\big)\big(-\log\sigma(x)\big) + \sigma(x/\tau)\, e^{-x}

      (computed as :math:`\exp(\log\sigma(x/\tau) - x)`, which stays finite where
      :math:`\sigma(x/\tau)` underflows and :math:`e^{-x}` overflows.)

    - ``"sft"`` -- the negative log-likelihood of the chosen reply per token, the
      NLL term of RPO (Pang et al., 2024, arXiv:2404.19733); needs only
      ``chosen_counts`` and no reference:

      .. math:: \ell = -\frac{s_w}{n_w}

      TRL 1.x takes the token-weighted mean over the batch
      (:math:`-\sum s_w / \sum n_w`); here it is per pair, so it adds up over
      micro-batches like every other term.

    - ``"sigmoid_norm"`` -- length-normalised DPO (Tülu 3, Lambert et al., 2024,
      arXiv:2411.15124; the normalisation of SimPO, with a reference):

      .. math:: \ell = -\log\sigma\!\left(\beta\left(\frac{u_w}{n_w} - \frac{u_l}{n_l}\right)\right)

    **Combinations.** ``loss_type`` may be a list or tuple of types, with
    ``loss_weights`` :math:`w` of the same length (default all 1.0):
    :math:`\ell = \sum_k w_k \ell_k` (TRL's MPO-style combination; Wang et al.,
    2024, arXiv:2411.10442). ``["sigmoid", "sft"]`` is RPO.

    **f-divergences** (Wang et al., 2023, arXiv:2309.16240; TRL 1.x's
    ``f_divergence_type``): the score of a log-ratio is :math:`g(r) = f'(e^r)`
    without its constant, ``"reverse_kl"`` :math:`g(r) = r` (DPO, the default),
    ``"forward_kl"`` :math:`g(r) = -e^{-r}`, ``"js_divergence"``
    :math:`g(r) = \log\sigma(r)`, ``"alpha_divergence"``
    :math:`g(r) = e^{(\alpha-1) r}/(\alpha-1)` with :math:`\alpha` =
    ``f_alpha_divergence_coef`` (default 0.5, TRL's), reverse KL when
    :math:`|\alpha - 1| < 10^{-6}`; the exponent is clamped at 80 (11 for float16)
    as in TRL (float64 is clamped at 80 too, so both precisions agree). In this
    convention :math:`\alpha = 1` is reverse KL and :math:`\alpha = 0` forward KL
    (the paper's :math:`\alpha` is :math:`1 - \alpha` here). The scores enter
    every type above written with :math:`u` or :math:`h`; ``aot``,
    ``aot_unpaired``, ``apo_zero``'s terms, ``simpo`` and ``sft`` use no score.

    The loss is :math:`\frac{1}{P}\sum_{pairs} \ell` with :math:`P` = ``num_pairs``
    (default: the number of pairs given); pass the window's pair count for exact
    gradient accumulation (every type but ``aot`` / ``aot_unpaired``).
    ``ipo``, ``simpo`` and ``sigmoid_norm`` need ``chosen_counts`` and
    ``rejected_counts`` (the second output of :func:`sequence_logps`), ``sft``
    needs ``chosen_counts``; every type but ``simpo`` and ``sft`` needs the
    reference log-probs. ``label_smoothing`` applies to ``sigmoid``, ``robust``,
    ``simpo``, ``exo_pair``, ``aot`` and ``aot_unpaired`` only.

    Returns ``(loss, metrics)``; metrics are detached means over the pairs given,
    named as in TRL: ``rewards/chosen`` = mean :math:`\beta r_w` (TRL's reward;
    for ``ipo`` and ``sigmoid_norm`` the per-token :math:`\beta r_w / n_w`, for
    ``simpo`` :math:`\beta s_w/n_w`, for ``sft`` alone without a reference
    :math:`\beta s_w`; a list takes the rewards of its first type other than
    ``sft``), ``rewards/rejected`` likewise, ``rewards/margins`` = their
    difference, ``rewards/accuracies`` = share of pairs with chosen reward
    strictly above rejected (ties count as wrong, as in TRL), ``rewards/ties`` =
    share of pairs whose two rewards are exactly equal (every pair while the
    policy is the reference; so accuracies + ties + share ranked the wrong way =
    1), ``logps/chosen`` and ``logps/rejected`` = mean summed policy log-probs.
    The rewards never take the f-divergence (TRL's neither).
    """
    types, weights = _dpo_loss_types(loss_type, loss_weights)
    _check_dpo_hyper(types, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau,
                     bco_delta)
    needs_ref = [t for t in types if t not in _REFERENCE_FREE]
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(
            f"dpo_loss: loss_type={needs_ref[0]!r} needs the reference log-probs (ref_chosen_logps, "
            "ref_rejected_logps); only 'simpo' and 'sft' are reference-free.")
    needs_counts = [t for t in types if t in _LENGTH_NORMALISED]
    if needs_counts and (chosen_counts is None or rejected_counts is None):
        raise ValueError(
            f"dpo_loss: loss_type={needs_counts[0]!r} normalises by length; pass chosen_counts= and "
            "rejected_counts= (the second output of sequence_logps).")
    if "sft" in types and chosen_counts is None:
        raise ValueError("dpo_loss: loss_type='sft' is the per-token NLL of the chosen reply; pass "
                         "chosen_counts= (the second output of sequence_logps).")
    shape = policy_chosen_logps.shape
    others = [policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_counts, rejected_counts]
    if policy_chosen_logps.dim() != 1 or any(t is not None and t.shape != shape for t in others):
        raise ValueError(
            "dpo_loss: all log-prob and count arguments must be 1-D tensors of the same length "
            f"(one entry per pair); got shapes {[tuple(t.shape) for t in [policy_chosen_logps, *others] if t is not None]}.")

    x = _PairInputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_counts, rejected_counts, beta, label_smoothing, gamma, f_divergence_type,
                    f_alpha_divergence_coef, discopop_tau, bco_delta)
    losses = sum(w * _pair_losses(t, x) for t, w in zip(types, weights))
    loss = normalise(losses.sum(), shape[0] if num_pairs is None else num_pairs, "dpo_loss")
    with torch.no_grad():
        r_w, r_l = _pair_rewards(types, x)
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


def dpo_needs_reference(loss_type: str | Sequence[str]) -> bool:
    """Whether :func:`dpo_loss` with this ``loss_type`` (a name or a list) reads reference log-probs."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    return any(t not in _REFERENCE_FREE for t in types)


class _PairInputs(NamedTuple):
    """Everything one DPO loss term reads (``dpo_loss``'s arguments, validated)."""
    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor | None
    rr: torch.Tensor | None
    nc: torch.Tensor | None
    nr: torch.Tensor | None
    beta: float
    eps: float
    gamma: float
    f_type: str
    f_alpha: float
    tau: float
    bco_delta: torch.Tensor | float | None


def _dpo_loss_types(loss_type, loss_weights) -> tuple[tuple, tuple]:
    """``loss_type`` (a name or a list of names) and ``loss_weights`` as two tuples of one length."""
    if not isinstance(loss_type, (str, list, tuple)) or not loss_type:
        raise ValueError(f"dpo_loss: loss_type must be a name or a non-empty list of names from {DPO_LOSS_TYPES}, "
                         f"got {loss_type!r}.")
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    unknown = [t for t in types if t not in DPO_LOSS_TYPES]
    if unknown:
        raise ValueError(f"dpo_loss: unknown loss_type={unknown[0]!r}; choose one of {DPO_LOSS_TYPES} "
                         "(or a list of them, with loss_weights).")
    if loss_weights is None:
        return types, (1.0,) * len(types)
    weights = tuple(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"dpo_loss: loss_weights has {len(weights)} entries for the {len(types)} loss types "
                         f"{list(types)}; pass one weight per type, or loss_weights=None for all 1.0.")
    return types, weights


def _check_dpo_hyper(types, beta, label_smoothing, f_divergence_type, f_alpha, tau, bco_delta) -> None:
    """One-line ``ValueError`` for hyper-parameters that cannot mean what they say for ``types``."""
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(
            f"dpo_loss: beta must be positive, got {beta}. With beta = 0 the sigmoid loss is stuck at "
            "log 2 = 0.6931 and nothing is learned; 0.1 is the usual value.")
    smoothed = [t for t in types if t in _SMOOTHING_BOUNDS]
    for t in smoothed:
        lo, hi, bound = _SMOOTHING_BOUNDS[t]
        ok = lo < label_smoothing < hi if t == "exo_pair" else lo <= label_smoothing < hi if t == "robust" else (
            lo <= label_smoothing <= hi)
        if not ok:
            hint = " (the EXO paper uses 1e-3)" if t == "exo_pair" else ""
            raise ValueError(f"dpo_loss: label_smoothing must lie in {bound} for loss_type={t!r}{hint}, "
                             f"got {label_smoothing}.")
    if label_smoothing and not smoothed:
        raise ValueError(
            f"dpo_loss: label_smoothing applies to {', '.join(map(repr, _SMOOTHING_BOUNDS))}, not "
            f"{types[0] if len(types) == 1 else list(types)!r}; leave it at 0.0.")
    if f_divergence_type not in _F_DIVERGENCE_TYPES:
        raise ValueError(f"dpo_loss: unknown f_divergence_type={f_divergence_type!r}; choose one of "
                         f"{_F_DIVERGENCE_TYPES}.")
    if f_divergence_type != "reverse_kl" and all(t in _NO_SCORE for t in types):
        raise ValueError(f"dpo_loss: f_divergence_type={f_divergence_type!r} changes the log-ratio scores, which "
                         f"loss_type={list(types)} does not use; leave it at 'reverse_kl'.")
    if not (isinstance(f_alpha, (int, float)) and math.isfinite(f_alpha)):
        raise ValueError(f"dpo_loss: f_alpha_divergence_coef must be a finite number, got {f_alpha!r}.")
    if "discopop" in types and not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"dpo_loss: discopop_tau must be a positive number, got {tau!r}; the paper uses 0.05.")
    if bco_delta is not None and "bco_pair" not in types:
        raise ValueError("dpo_loss: bco_delta is the reward shift of loss_type='bco_pair' only; leave it at None.")


def _neg_logsigmoid(x: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid(x) = softplus(-x)``, exact everywhere (``F.softplus`` returns its input past 20)."""
    return -F.logsigmoid(x)


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)``: the conservative-DPO loss of a logit."""
    return (1 - eps) * _neg_logsigmoid(z) + eps * _neg_logsigmoid(-z)


def _f_score(r: torch.Tensor, f_type: str, alpha: float) -> torch.Tensor:
    """``f'(exp(r))`` without its constant: the score of log-ratio ``r`` under TRL 1.x's f-divergences."""
    if f_type == "reverse_kl" or (f_type == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return r
    if f_type == "forward_kl":
        return -torch.exp(-r)
    if f_type == "js_divergence":
        return F.logsigmoid(r)
    # alpha: exp((alpha-1) r) / (alpha-1); the exponent is capped (as TRL does) so exp stays finite
    cap = 11.0 if r.dtype == torch.float16 else 80.0
    return torch.exp(_upcast((alpha - 1.0) * r).clamp(max=cap)).to(r.dtype) / (alpha - 1.0)


def _pair_losses(loss_type: str, x: _PairInputs) -> torch.Tensor:
    """The per-pair loss ``[P]`` of one DPO type (formulas in ``dpo_loss``'s docstring)."""
    beta, eps = x.beta, x.eps
    if loss_type == "sft":
        return -x.pc / x.nc.clamp_min(1)
    if loss_type == "simpo":
        return _smoothed_sigmoid(beta * (x.pc / x.nc.clamp_min(1) - x.pr / x.nr.clamp_min(1)) - x.gamma, eps)
    r_w, r_l = x.pc - x.rc, x.pr - x.rr
    if loss_type == "aot":  # batch-level: sorted policy margins against sorted reference margins
        return _smoothed_sigmoid(beta * (torch.sort(x.pc - x.pr).values - torch.sort(x.rc - x.rr).values), eps)
    if loss_type == "aot_unpaired":
        return _smoothed_sigmoid(beta * (torch.sort(r_w).values - torch.sort(r_l).values), eps)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l)
    u_w, u_l = _f_score(r_w, x.f_type, x.f_alpha), _f_score(r_l, x.f_type, x.f_alpha)
    z = beta * (u_w - u_l)
    if loss_type in ("ipo", "sigmoid_norm"):
        per_token = u_w / x.nc.clamp_min(1) - u_l / x.nr.clamp_min(1)
        return (per_token - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else _neg_logsigmoid(beta * per_token)
    if loss_type == "sigmoid":
        return _smoothed_sigmoid(z, eps)
    if loss_type == "robust":
        return ((1 - eps) * _neg_logsigmoid(z) - eps * _neg_logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "exo_pair":
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    if loss_type == "nca_pair":
        return _neg_logsigmoid(beta * u_w) + 0.5 * _neg_logsigmoid(-beta * u_w) + 0.5 * _neg_logsigmoid(-beta * u_l)
    if loss_type == "bco_pair":
        delta = 0.0 if x.bco_delta is None else torch.as_tensor(x.bco_delta, dtype=z.dtype, device=z.device).detach()
        return _neg_logsigmoid(beta * u_w - delta) + _neg_logsigmoid(-(beta * u_l - delta))
    if loss_type == "sppo_hard":
        return (u_w - 1 / (2 * beta)) ** 2 + (u_l + 1 / (2 * beta)) ** 2
    if loss_type == "apo_down":
        return torch.sigmoid(beta * r_w) + 1 - torch.sigmoid(z)
    # discopop: sigma(z/tau) e^{-z} as exp(log sigma(z/tau) - z), finite where e^{-z} alone overflows
    return torch.sigmoid(-z / x.tau) * _neg_logsigmoid(z) + torch.exp(F.logsigmoid(z / x.tau) - z)


def _pair_rewards(types: tuple, x: _PairInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and rejected rewards the metrics report (see ``dpo_loss``'s docstring)."""
    kind = next((t for t in types if t != "sft"), "sft")
    if kind == "simpo":
        return x.beta * x.pc / x.nc.clamp_min(1), x.beta * x.pr / x.nr.clamp_min(1)
    if x.rc is None or x.rr is None:  # "sft" alone without a reference
        return x.beta * x.pc, x.beta * x.pr
    r_w, r_l = x.pc - x.rc, x.pr - x.rr
    if kind in ("ipo", "sigmoid_norm"):
        r_w, r_l = r_w / x.nc.clamp_min(1), r_l / x.nr.clamp_min(1)
    return x.beta * r_w, x.beta * r_l


# --------------------------------------------------------------------------- GRPO

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_count(loss_type: str, completion_mask: torch.Tensor) -> torch.Tensor:
    """What ``grpo_loss`` of this ``loss_type`` divides by: the number of completions (grpo, dr_grpo)
    or of completion tokens (bnpo, dapo). Summed over micro-batches (and processes) it is the
    whole update's normaliser, so accumulation is exact."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type={loss_type!r}; choose one of {GRPO_LOSS_TYPES}.")
    if loss_type in ("grpo", "dr_grpo"):
        return torch.tensor(completion_mask.shape[0], device=completion_mask.device)
    return completion_mask.sum()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, *, loss_type: str = "dapo",
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              importance_sampling_level: str = "token", max_completion_length: int | None = None,
              num_items=None):
    r"""The clipped policy-gradient loss of GRPO (Shao et al., 2024, arXiv:2402.03300) and its variants.

    Inputs per completion ``i`` and token ``t``: the policy's log-probs :math:`\ell_{i,t}` (``logps``,
    ``[N, T]``), those of the policy that sampled them :math:`\ell^{old}_{i,t}` (``old_logps``;
    None: ``logps`` detached, the ratio is exactly 1), the reference's (``ref_logps``, needed
    when ``beta > 0``), the advantage :math:`A_i` (``[N]``) and the mask :math:`m_{i,t}` of
    completion tokens. With :math:`\varepsilon_l` = ``epsilon``, :math:`\varepsilon_h` =
    ``epsilon_high`` (default ``epsilon``):

    .. math::

        w_{i,t} = \exp(\ell_{i,t} - \ell^{old}_{i,t}) \;\text{(token level)}, \quad
        w_{i} = \exp\Big(\frac{\sum_t m_{i,t}(\ell_{i,t} - \ell^{old}_{i,t})}{\sum_t m_{i,t}}\Big)
        \;\text{(sequence level, GSPO, arXiv:2507.18071)}

        l_{i,t} = -\min\big(w A_i,\ \operatorname{clip}(w, 1-\varepsilon_l, 1+\varepsilon_h) A_i\big)
                  + \beta\,\big(e^{\ell^{ref} - \ell} - (\ell^{ref} - \ell) - 1\big)

    (the last term is the k3 estimator of KL(policy || reference), Schulman 2020). The token
    losses are reduced as TRL's ``loss_type`` says:

    - ``"grpo"``: :math:`\frac1N \sum_i \frac{\sum_t m_{i,t} l_{i,t}}{\sum_t m_{i,t}}` (per-completion
      means, then their mean: long completions weigh less per token);
    - ``"bnpo"`` and ``"dapo"`` (DAPO, arXiv:2503.14476): :math:`\frac{\sum_{i,t} m_{i,t} l_{i,t}}{\sum_{i,t} m_{i,t}}`
      over every completion token of the update. (TRL's ``bnpo`` divides by each micro-batch's
      tokens, a mean of means under accumulation; here the normaliser is always the update's,
      so the two coincide.)
    - ``"dr_grpo"`` (Dr. GRPO, arXiv:2503.20783): :math:`\frac{\sum_{i,t} m_{i,t} l_{i,t}}{N \cdot L}`
      with :math:`L` = ``max_completion_length``: no length bias.

    The result is the sum over completions divided by ``num_items`` (default: what
    :func:`grpo_count` gives for these inputs): pass ``num_items=1`` for the sum, and the
    window's count, summed, to divide by, as the train step does.

    Returns ``(loss, metrics)``: ``clip_ratio`` (share of completion tokens whose ratio was
    clipped where it mattered: below :math:`1-\varepsilon_l` with :math:`A<0`, or above
    :math:`1+\varepsilon_h` with :math:`A>0`), ``kl`` (mean k3 estimate per token, when
    ``beta > 0``), ``advantage_std``; means over this call's tokens.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type={loss_type!r}; choose one of {GRPO_LOSS_TYPES}.")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError("grpo_loss: importance_sampling_level must be 'token' or 'sequence' (GSPO), "
                         f"got {importance_sampling_level!r}.")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"grpo_loss: epsilon must lie in [0, 1) and epsilon_high be >= 0, got {epsilon}, "
                         f"{epsilon_high}.")
    if beta < 0:
        raise ValueError(f"grpo_loss: beta (the KL weight) must be >= 0, got {beta}.")
    if beta > 0 and ref_logps is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logps (the reference's token log-probs); pass them, "
                         "or beta=0.0 for no KL term.")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("grpo_loss: loss_type='dr_grpo' divides by max_completion_length; pass it.")
    if logps.dim() != 2 or completion_mask.shape != logps.shape or advantages.shape != logps.shape[:1]:
        raise ValueError(f"grpo_loss: expected logps and completion_mask [N, T] and advantages [N]; got "
                         f"{tuple(logps.shape)}, {tuple(completion_mask.shape)}, {tuple(advantages.shape)}.")
    mask = completion_mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp_min(1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if beta > 0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if loss_type == "grpo":
        total = (per_token.sum(-1) / mask.sum(-1).clamp_min(1)).sum()
    elif loss_type == "dr_grpo":
        total = per_token.sum() / max_completion_length
    else:
        total = per_token.sum()
    loss = normalise(total, grpo_count(loss_type, completion_mask) if num_items is None else num_items, "grpo_loss")
    with torch.no_grad():
        tokens = mask.sum().clamp_min(1)
        ratio_t = ratio.expand_as(mask)
        region = ((ratio_t < 1 - eps_low) & (adv < 0)) | ((ratio_t > 1 + eps_high) & (adv > 0))
        metrics = {"clip_ratio": (region.to(mask.dtype) * mask).sum() / tokens,
                   "advantage_std": advantages.detach().float().std(unbiased=False)
                   if advantages.numel() > 1 else torch.zeros(())}
        if kl is not None:
            metrics["kl"] = (kl * mask).sum() / tokens
    return loss, metrics


# --------------------------------------------------------------------------- ORPO, KTO


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_counts: torch.Tensor,
              rejected_counts: torch.Tensor, *, beta: float = 0.1, num_pairs=None):
    r"""ORPO (Hong et al., 2024, arXiv:2403.07691): supervised fine-tuning plus an odds-ratio preference
    term, with no reference model.

    With :math:`\bar s = s / n` the per-token mean log-prob of a reply and
    :math:`\log\mathrm{odds}(\bar s) = \bar s - \log(1 - e^{\bar s})`:

    .. math::

        \ell = -\bar s_w \;-\; \beta \log\sigma\big(\log\mathrm{odds}(\bar s_w) - \log\mathrm{odds}(\bar s_l)\big)

    (``beta`` is the paper's :math:`\lambda`, TRL's ``beta``, default 0.1). The NLL term is each
    pair's per-token mean (TRL averages the chosen tokens of the whole batch), so the loss is a
    sum over pairs and accumulation is exact: the result is that sum over ``num_pairs`` (default:
    the pairs given). Metrics as TRL's: ``rewards/chosen`` = mean :math:`\beta \bar s_w`,
    ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``log_odds_ratio``,
    ``log_odds_chosen``, ``nll_loss``.
    """
    if not beta > 0:
        raise ValueError(f"orpo_loss: beta (the odds-ratio weight) must be positive, got {beta}.")
    mean_w = chosen_logps / chosen_counts.clamp_min(1)
    mean_l = rejected_logps / rejected_counts.clamp_min(1)
    def log_one_minus(x):
        # log(1 - e^x) for x < 0, stably: expm1 near 0, log1p far from it. x is kept below -1e-7
        # (a reply of probability 1 would make it -inf) and each branch sees only inputs valid for
        # it, so the branch torch.where discards has no NaN gradient to leak.
        x = x.clamp(max=-1e-7)
        near = x > -0.693
        return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                           torch.log1p(-torch.exp(torch.where(near, -1.0, x))))
    log_odds = (mean_w - mean_l) - (log_one_minus(mean_w) - log_one_minus(mean_l))
    ratio = F.logsigmoid(log_odds)
    losses = -mean_w - beta * ratio
    loss = normalise(losses.sum(), chosen_logps.shape[0] if num_pairs is None else num_pairs, "orpo_loss")
    with torch.no_grad():
        r_w, r_l = beta * mean_w, beta * mean_l
        metrics = {"rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
                   "rewards/accuracies": (r_w > r_l).to(r_w.dtype).mean(), "rewards/margins": (r_w - r_l).mean(),
                   "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean(), "nll_loss": (-mean_w).mean()}
    return loss, metrics


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, num_examples=None):
    r"""KTO (Ethayarajh et al., 2024, arXiv:2402.01306) on unpaired examples labelled desirable or not.

    With :math:`r = \log\pi(y|x) - \log\pi_{ref}(y|x)` (summed log-probs) and the reference
    point :math:`z_0 = \max\big(0, \operatorname{mean}(\log\pi(y'|x) - \log\pi_{ref}(y'|x))\big)`,
    a detached estimate of KL(policy || reference) from mismatched pairs :math:`(x, y')` (a
    prompt with another example's completion: ``policy_kl_logps``, ``ref_kl_logps``):

    .. math::

        \ell = \lambda_D \big(1 - \sigma(\beta (r - z_0))\big) \text{ if desirable}, \qquad
        \ell = \lambda_U \big(1 - \sigma(\beta (z_0 - r))\big) \text{ otherwise}

    (TRL's ``loss_type="kto"``). The result is the sum over examples divided by ``num_examples``
    (default: the examples given). :math:`z_0` is estimated from the examples given: a
    batch-level quantity, so under accumulation each micro-batch uses its own (as TRL's does).
    Metrics: ``kl`` (:math:`z_0`), ``rewards/chosen`` and ``rewards/rejected`` (mean :math:`\beta r`
    over the desirable and the undesirable examples; 0 when there are none), ``logps/chosen`` and
    ``logps/rejected`` likewise.
    """
    if not beta > 0:
        raise ValueError(f"kto_loss: beta must be positive, got {beta}.")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("kto_loss: desirable_weight and undesirable_weight must be >= 0.")
    z0 = (policy_kl_logps - ref_kl_logps).mean().clamp_min(0).detach()
    r = policy_logps - ref_logps
    good = desirable.bool()
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    loss = normalise(losses.sum(), policy_logps.shape[0] if num_examples is None else num_examples, "kto_loss")
    with torch.no_grad():
        g, b = good.to(r.dtype), (~good).to(r.dtype)
        mean = lambda x, w: (x * w).sum() / w.sum().clamp_min(1)  # noqa: E731
        metrics = {"kl": z0, "rewards/chosen": mean(beta * r.detach(), g),
                   "rewards/rejected": mean(beta * r.detach(), b),
                   "logps/chosen": mean(policy_logps.detach(), g), "logps/rejected": mean(policy_logps.detach(), b)}
    return loss, metrics
