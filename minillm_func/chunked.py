r"""Cross-entropy and sequence log-probs straight from hidden states, one chunk of tokens at a time.

The output projection of a language model turns ``N`` hidden states ``h``
(``[N, D]``) into ``N x V`` logits ``z = h W^T``. At a 32k vocabulary and a few
thousand tokens those logits are the largest tensor of the whole step: 4096
tokens x 32000 columns x 4 bytes = 512 MiB in float32, and an unfused
``cross_entropy`` keeps the logits' log-softmax (another 512 MiB) for its backward and
builds their gradient (another 512 MiB) during it.

Here the logits are never materialised in full. The tokens are processed in
chunks of ``C`` rows; for each chunk the forward computes ``z_c = h_c W^T``,
keeps only its log-sum-exp and target log-prob (``C`` numbers each) and throws
``z_c`` away. The backward recomputes ``z_c`` chunk by chunk and turns it into
the gradient right there:

.. math::

    \ell_t = z_{t, y_t} - \operatorname{logsumexp}_v z_{t, v}, \qquad
    \frac{\partial \ell_t}{\partial z_{t, v}} = [v = y_t] - \operatorname{softmax}(z_t)_v

so, with ``g_t`` the incoming gradient of ``\ell_t`` and
``G_c = g_c \odot (\text{onehot}(y_c) - \operatorname{softmax}(z_c))`` (``[C, V]``),

.. math::

    \nabla_{h_c} = G_c W, \qquad \nabla_W = \sum_c G_c^T h_c .

Peak memory for the loss is then a few ``[C, V]`` float32 buffers plus the
``[V, D]`` weight gradient, independent of ``N``; the price is one extra
``C x D x V`` matmul per chunk (the recomputation), 4 matmuls instead of 3.
On a CPU, where those matmuls are most of the time, that is up to 4/3 of the
unchunked time. ``chunked_cross_entropy(..., recompute=False)`` avoids it for
the scalar loss: when a gradient will be needed, ``G_c`` is formed in the
forward pass itself and both gradients are kept until the backward, which only
multiplies them by the incoming scalar (3 matmuls; the ``[N, D]`` and
``[V, D]`` gradients are held a little earlier than autograd would hold them).

Both functions are exact: they return what :func:`~minillm_func.losses.pretrain_loss`
and :func:`~minillm_func.losses.sequence_logps` return on ``hidden @ weight.T``,
and their gradients with respect to ``hidden`` and ``weight`` are those of the
unchunked computation up to floating-point summation order. They work under
``torch.autograd.grad`` / ``.backward()`` and under ``torch.func.grad``,
``grad_and_value`` and ``vmap``.

Example::

    hidden = model.apply_hidden(params, input_ids)                        # [B, T, D]
    loss = chunked_cross_entropy(hidden, output_weight(params), labels)  # == pretrain_loss(model.apply(...), labels)
"""
from __future__ import annotations

import torch

from .losses import IGNORE_INDEX, check_logits_labels, normalise
from .tree import under_transform

__all__ = ["chunked_cross_entropy", "chunked_sequence_logps", "chunked_token_logps"]

_HALF = (torch.float16, torch.bfloat16)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h @ weight.T`` in the inputs' dtype, upcast to float32 when that is half precision
    (as ``pretrain_loss`` does with half-precision logits). Always a fresh tensor."""
    z = h @ weight.T
    return z.float() if z.dtype in _HALF else z


def _exp_shifted_(z: torch.Tensor):
    """In place on fresh logits ``z`` ``[C, V]``: ``z <- exp(z - max_v z)``. Returns ``(z, row sums
    [C, 1], logsumexp [C])`` -- the max-shifted log-sum-exp that ``torch.logsumexp`` computes,
    without its ``[C, V]`` temporary. (In place is safe under ``vmap`` too: every operand
    derives from ``z``; not while ``torch.compile`` traces ``torch.func.grad``.)"""
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row of infinities: no inf - inf = NaN here
    e = torch.exp(z - m) if torch.compiler.is_compiling() else z.sub_(m).exp_()
    total = e.sum(-1, keepdim=True)
    return e, total, (total.log() + m).squeeze(-1)


def _grad_from_softmax(p, g, y, inplace: bool) -> torch.Tensor:
    """``G = g * (onehot(y) - p)`` for one chunk: ``p`` ``[C, V]`` the softmax (overwritten when
    ``inplace``), ``g`` ``[C, 1]`` the gradient of each token's log-prob, ``y`` ``[C, 1]`` the
    (valid) targets."""
    if inplace:
        return p.mul_(-g).scatter_add_(1, y, g)
    return p.mul(-g).scatter_add(1, y, g)


def _project_back(G, h_c, weight, grad_h: list, grad_w, need_h: bool, need_w: bool, inplace: bool):
    """Append ``G @ W`` to ``grad_h`` and return ``grad_w + G^T h_c`` (accumulated in ``grad_w``'s dtype)."""
    G = G.to(h_c.dtype)  # as autograd casts the float32 gradient of upcast logits back
    if need_h:
        grad_h.append(G @ weight)
    if need_w:
        if inplace and G.dtype == grad_w.dtype:
            grad_w.addmm_(G.T, h_c)
        else:
            grad_w = grad_w + (G.T @ h_c).to(grad_w.dtype)
    return grad_w


def _needs_grad(ctx, wanted) -> tuple[bool, bool]:
    """Which of (hidden, weight) to differentiate: ``ctx.needs_input_grad``, and ``wanted``.

    While ``torch.compile`` traces ``torch.func.grad`` (torch 2.13), ``needs_input_grad`` can
    read False for an input that is differentiated, and a gradient skipped on that basis
    would silently come back as zeros; there both are computed (unused ones are dropped)."""
    if torch.compiler.is_compiling():
        return wanted[0], wanted[1]
    return ctx.needs_input_grad[0] and wanted[0], ctx.needs_input_grad[1] and wanted[1]


def _finish(hidden, weight, grad_h: list, grad_w, need_h: bool, need_w: bool):
    dh = (torch.cat(grad_h) if grad_h else torch.zeros_like(hidden)) if need_h else None
    dw = grad_w.to(weight.dtype) if need_w else None
    return dh, dw


class _TargetLogProbs(torch.autograd.Function):
    """``(hidden [N, D], weight [V, D], labels [N], chunk) -> (logp [N], lse [N])``.

    ``logp[t] = z[t, y_t] - logsumexp(z[t])`` for counted ``t`` and 0 for ignored
    ones; ``lse`` is returned (non-differentiable) only so the backward can reuse it.
    The backward recomputes each chunk's logits.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, labels, chunk):
        counted = labels != IGNORE_INDEX
        target = torch.where(counted, labels, 0)
        logps, lses = [], []
        for s in range(0, hidden.shape[0], chunk):
            z = _chunk_logits(hidden[s:s + chunk], weight)
            picked = z.gather(-1, target[s:s + chunk, None]).squeeze(-1)
            _, _, lse = _exp_shifted_(z)
            del z  # free the chunk's logits before the next one is built
            logps.append(picked - lse)
            lses.append(lse)
        if not logps:  # no tokens at all
            empty = hidden.new_zeros((0,), dtype=_acc_dtype(hidden))
            return empty, empty.clone()
        logp = torch.where(counted, torch.cat(logps), 0.0)
        return logp, torch.cat(lses)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, labels, chunk = inputs
        _, lse = output
        ctx.chunk = chunk
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(hidden, weight, labels, lse)

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = _needs_grad(ctx, (True, True))
        if not (need_h or need_w):
            return None, None, None, None
        chunk = ctx.chunk
        counted = labels != IGNORE_INDEX
        target = torch.where(counted, labels, 0)
        g = torch.where(counted, grad_logp, 0.0).to(lse.dtype)  # ignored tokens: exactly zero gradient
        # Out of place under transforms: under a generated vmap rule an in-place op on an
        # unbatched buffer with a batched operand is an error.
        inplace = not under_transform(hidden, weight, lse, g)
        # Half-precision weights: the per-chunk weight gradients are summed in float32.
        grad_w = weight.new_zeros(weight.shape, dtype=lse.dtype) if need_w else None
        grad_h = []
        for s in range(0, hidden.shape[0], chunk):
            h_c = hidden[s:s + chunk]
            z = _chunk_logits(h_c, weight)  # the recomputation
            lse_c = lse[s:s + chunk, None]
            p = z.sub_(lse_c).exp_() if inplace else torch.exp(z - lse_c)
            G = _grad_from_softmax(p, g[s:s + chunk, None], target[s:s + chunk, None], inplace)
            del z, p  # G may be z, overwritten in place: one [C, V] buffer per chunk ...
            grad_w = _project_back(G, h_c, weight, grad_h, grad_w, need_h, need_w, inplace)
            del G  # ... freed before the next chunk's logits are built
        dh, dw = _finish(hidden, weight, grad_h, grad_w, need_h, need_w)
        return dh, dw, None, None


class _SummedNLL(torch.autograd.Function):
    """``(hidden [N, D], weight [V, D], labels [N], chunk, need_h, need_w) -> (S, dS/dhidden, dS/dweight)``
    with ``S = -sum_t logp[t]``: the gradients are computed in the forward pass, while each
    chunk's logits are at hand, and only scaled by the incoming gradient in the backward.
    A gradient that is not needed comes back as an empty placeholder."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, labels, chunk, need_h, need_w):
        acc = _acc_dtype(hidden)
        counted = labels != IGNORE_INDEX
        target = torch.where(counted, labels, 0)
        g = -counted.to(acc)  # d S / d logp
        inplace = not under_transform(hidden, weight)  # as in _TargetLogProbs.backward
        grad_w = weight.new_zeros(weight.shape, dtype=acc) if need_w else None
        grad_h, nll = [], []
        for s in range(0, hidden.shape[0], chunk):
            h_c, y_c = hidden[s:s + chunk], target[s:s + chunk, None]
            z = _chunk_logits(h_c, weight)
            picked = z.gather(-1, y_c).squeeze(-1)
            e, row_sum, lse = _exp_shifted_(z)
            nll.append(lse - picked)
            G = _grad_from_softmax(e.div_(row_sum), g[s:s + chunk, None], y_c, inplace)
            del z, e  # G is z, overwritten in place: one [C, V] buffer per chunk ...
            grad_w = _project_back(G, h_c, weight, grad_h, grad_w, need_h, need_w, inplace)
            del G  # ... freed before the next chunk's logits are built
        total = torch.where(counted, torch.cat(nll), 0.0).sum() if nll else hidden.new_zeros((), dtype=acc)
        dh, dw = _finish(hidden, weight, grad_h, grad_w, need_h, need_w)
        empty = hidden.new_zeros((0,))
        return total, empty if dh is None else dh, empty if dw is None else dw

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, dh, dw = output
        ctx.need = inputs[4], inputs[5]
        ctx.mark_non_differentiable(dh, dw)
        ctx.save_for_backward(dh, dw)

    @staticmethod
    def backward(ctx, grad_total, _gh, _gw):
        dh, dw = ctx.saved_tensors
        need_h, need_w = _needs_grad(ctx, ctx.need)
        return ((grad_total * dh).to(dh.dtype) if need_h else None,
                (grad_total * dw).to(dw.dtype) if need_w else None, None, None, None, None)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


def _check(fn: str, hidden, weight, labels, chunk_size) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or not hidden.dtype.is_floating_point:
        raise ValueError(
            f"{fn}: hidden must be a floating-point tensor [..., T, D] (the final normalised hidden "
            f"states); got shape {tuple(getattr(hidden, 'shape', ()))}. Get it with model.apply_hidden(params, ids).")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{fn}: weight must be the output projection [V, D] with D = hidden.shape[-1] = "
            f"{hidden.shape[-1]}; got shape {tuple(getattr(weight, 'shape', ()))}. "
            "Pass output_weight(params) (lm_head.weight, or tok_emb.weight when tied), not its transpose.")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{fn}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast them to one dtype "
            "(e.g. the compute dtype of your precision policy).")
    check_logits_labels(fn, hidden, labels, name="hidden", last="D")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{fn}: chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}.")


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                        chunk_size: int = 1024) -> torch.Tensor:
    r"""Per-token target log-probs ``[..., T]`` of the logits ``hidden @ weight.T``, chunk by chunk.

    ``out[..., t] = z_{t, y_t} - \operatorname{logsumexp}_v z_{t, v}`` where
    ``y_t != IGNORE_INDEX`` and exactly 0 (with zero gradient) elsewhere; float32
    for half-precision inputs. The building block of the two functions below.
    """
    _check("chunked_token_logps", hidden, weight, labels, chunk_size)
    D = hidden.shape[-1]
    logp, _ = _TargetLogProbs.apply(hidden.reshape(-1, D), weight, labels.reshape(-1), chunk_size)
    return logp.reshape(labels.shape)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          chunk_size: int = 1024, num_tokens=None, recompute: bool = True) -> torch.Tensor:
    r"""``pretrain_loss(hidden @ weight.T, labels, num_tokens=num_tokens)`` without the full logits.

    .. math::

        L = \frac{1}{N} \sum_{t:\, y_t \neq -100}
            \Big(\operatorname{logsumexp}_v (h_t \cdot w_v) - h_t \cdot w_{y_t}\Big),
        \qquad N = \texttt{num\_tokens} \text{ (default: } |\{t : y_t \neq -100\}|)

    Same semantics as :func:`~minillm_func.losses.pretrain_loss`: ``num_tokens=1``
    gives the summed loss, a batch with no counted token gives 0 and a zero
    gradient. Tokens are processed ``chunk_size`` at a time in the forward and
    again (recomputing their logits) in the backward, so the memory the loss
    needs is ``O(chunk_size x V)`` instead of ``O(tokens x V)`` -- see the module
    docstring for the arithmetic. Half-precision inputs are multiplied in their
    dtype and reduced in float32; the loss is float32.

    Args:
        hidden: ``[..., T, D]`` final normalised hidden states (``model.apply_hidden``).
        weight: ``[V, D]`` output projection (``output_weight(params)``); ``V`` may be
            the padded vocabulary, as in the model's logits.
        labels: ``[..., T]`` aligned targets, ``IGNORE_INDEX`` where nothing is learned.
        chunk_size: tokens per chunk; 1024 keeps a 32k-vocab chunk at 125 MiB of float32.
        num_tokens: int or 0-d tensor normaliser; pass the window's total count for
            exact gradient accumulation.
        recompute: ``True`` (default): the backward recomputes each chunk's logits,
            4 matmuls of ``tokens x D x V`` per step where the unchunked loss does 3, and
            nothing is kept between forward and backward but the inputs and one
            number per token. ``False``:
            when autograd will need the gradient (grad mode on and ``hidden`` or
            ``weight`` requiring grad, as under ``torch.func.grad``), it is computed
            in the forward pass while each chunk's logits are at hand -- 3 matmuls, the
            unchunked cost -- and the ``[tokens, D]`` and ``[V, D]`` gradients are held
            from the forward until the backward, which only scales them (into new
            tensors: a saved gradient is never overwritten). Same values and gradients
            either way; the benchmark in ``benchmarks/memory.py`` compares both.
    """
    _check("chunked_cross_entropy", hidden, weight, labels, chunk_size)
    if num_tokens is None:
        num_tokens = (labels != IGNORE_INDEX).sum()
    need_h, need_w = hidden.requires_grad, weight.requires_grad
    if not recompute and torch.is_grad_enabled() and (need_h or need_w):
        D = hidden.shape[-1]
        total, _, _ = _SummedNLL.apply(hidden.reshape(-1, D), weight, labels.reshape(-1), chunk_size,
                                       need_h, need_w)
    else:
        total = -chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size).sum()
    return normalise(total, num_tokens, "chunked_cross_entropy")


def chunked_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``sequence_logps(hidden @ weight.T, labels)`` without the full logits.

    .. math::

        s_b = \sum_{t:\, y_{b,t} \neq -100} \big(z_{b,t,y_{b,t}} - \operatorname{logsumexp}_v z_{b,t,v}\big),
        \qquad n_b = |\{t : y_{b,t} \neq -100\}|, \qquad z = h W^T

    Returns ``(logps [...], counts [...])`` -- ``[B]`` for ``hidden [B, T, D]``; counts
    are int64. Memory and precision as in :func:`chunked_cross_entropy`; this is what
    DPO needs for the policy's (and the reference's) chosen and rejected replies.
    """
    _check("chunked_sequence_logps", hidden, weight, labels, chunk_size)
    logp = chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size)
    return logp.sum(-1), (labels != IGNORE_INDEX).sum(-1)
