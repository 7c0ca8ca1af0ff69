"""Sampling from a trained model, with a key-value cache.

``generate(model, params, prompts, max_new_tokens=..., eos_id=..., pad_id=...)``
continues a batch of token-id prompts of different lengths and returns the new
ids of each, without the prompt and without the end-of-sequence token.

How the batch is laid out. Prompts are left-padded to a common length ``L`` so
that every row's next token sits in the same column. Row ``b`` with ``n_b`` pad
tokens gives its tokens the rotary positions ``column - n_b`` (its first real
token is at position 0, exactly as when it runs alone) and a key-padding mask
hides its pad tokens from every real query. Batched rows therefore produce the
same logits, up to float rounding, as each prompt run alone.

Cost. With ``use_cache=True`` the prompt is read once and each new token is one
position through the model: ``L + max_new_tokens - 1`` positions per row in all.
``use_cache=False`` recomputes the whole sequence at every step (quadratic); it
exists to check the cache and to measure what it saves.

Choosing a token, in this order (as Hugging Face ``generate`` does)::

    logits   <- logits[:, :vocab_size] / temperature      # padded-vocab columns are never candidates
    top-k    : keep the k largest logits
    top-p    : keep the smallest set of most likely tokens whose probability sums to >= top_p
    sample   ~ softmax(logits)                             # a private torch.Generator seeded with `seed`

``temperature=0`` is greedy decoding (``argmax``) and ignores ``top_k``/``top_p``.

Example::

    tok = mf.ByteTokenizer()
    texts = generate_text(model, params, tok, ["Once upon", "The"], max_new_tokens=32,
                          temperature=0.8, top_p=0.95, seed=1)
"""
from __future__ import annotations

from typing import Sequence

import torch

from .model import Model

__all__ = ["generate", "generate_text"]


def _check_arguments(cfg, prompts, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p) -> list[list[int]]:
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise ValueError(
            "generate: prompts must be a list of token-id lists, e.g. generate(model, params, [[257, 72, 105]], ...); "
            f"got {type(prompts).__name__}. For text use generate_text(model, params, tokenizer, ['Hi'], ...).")
    if len(prompts) == 0:
        raise ValueError("generate: the prompt list is empty; pass at least one prompt, e.g. [[tokenizer.bos_id]].")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            raise ValueError(f"generate: prompt {i} is a string; encode it first or use generate_text.")
        row = [int(t) for t in prompt]
        if not row:
            raise ValueError(
                f"generate: prompt {i} is empty; a prompt needs at least one token "
                "(start it with the tokenizer's bos_id, as generate_text does).")
        bad = [t for t in row if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} holds ids {bad[:5]} outside [0, vocab_size={cfg.vocab_size}).")
        rows.append(row)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be a non-negative int, got {max_new_tokens!r}.")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"generate: the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} is "
            f"{longest + max_new_tokens}, more than the model's max_seq_len={cfg.max_seq_len}. Lower "
            f"max_new_tokens to at most {max(cfg.max_seq_len - longest, 0)}, shorten the prompts, or "
            "build the model with a larger ModelConfig.max_seq_len.")
    if not 0 <= pad_id < cfg.padded_vocab_size:
        raise ValueError(f"generate: pad_id={pad_id} is not a valid embedding row [0, {cfg.padded_vocab_size}).")
    for stop in _stop_ids(eos_id):
        if not isinstance(stop, int) or not 0 <= stop < cfg.vocab_size:
            raise ValueError(f"generate: eos_id={eos_id} holds {stop!r}, not an id in [0, vocab_size="
                             f"{cfg.vocab_size}); pass None to never stop early.")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be an int >= 1 or None, got {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}; e.g. top_p=0.9.")
    return rows


def _choose(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator) -> torch.Tensor:
    """One token id per row of ``logits`` ``[B, V]`` (already cut to the real vocabulary)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the
        # most likely token has nothing above it, so at least one always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(model: Model, params: dict, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_id: int | None, pad_id: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new ids per prompt.

    Args:
        model, params: from :func:`~minillm_func.build_model` and ``model.init`` (or training).
        prompts: a non-empty list of non-empty token-id lists, of any lengths.
        max_new_tokens: most tokens added to each prompt; ``longest prompt + max_new_tokens``
            must not exceed ``model.config.max_seq_len``.
        eos_id: a row stops when it produces this id, or any id of a tuple/list of them
            (chat models often have several end tokens); it is not included in the
            output. ``None`` never stops early.
        pad_id: the id fed at padding positions (left padding, finished rows); it is
            masked out, so its value only needs to be a valid embedding row.
        temperature: 0 (default) is greedy; otherwise logits are divided by it before sampling.
        top_k, top_p: keep the ``top_k`` most likely tokens, then the nucleus of
            probability ``top_p`` (``0 < top_p <= 1``); ``None`` keeps all.
        seed: seeds a private ``torch.Generator``; the global RNG is untouched, and the
            same seed and inputs give the same outputs.
        use_cache: reuse keys/values between steps (linear cost). ``False`` recomputes
            the whole sequence each step; the output is the same.

    Only ids below ``config.vocab_size`` are ever produced. Nothing passed in is modified.
    """
    cfg = model.config
    rows = _check_arguments(cfg, prompts, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return [[] for _ in rows]
    if model.apply_with_cache is None:
        raise ValueError("generate: this Model has no apply_with_cache; build it with minillm_func.build_model.")
    device = params["tok_emb.weight"].device
    B, L = len(rows), max(len(r) for r in rows)
    n_pad = torch.tensor([L - len(r) for r in rows], device=device)
    ids = torch.tensor([[pad_id] * (L - len(r)) + r for r in rows], device=device)
    mask = torch.arange(L, device=device)[None, :] >= n_pad[:, None]
    generator = torch.Generator(device=device).manual_seed(int(seed))

    # Rows start at rotary position 0 on their first real token: offset -n_pad.
    logits, cache = model.apply_with_cache(params, ids, None, -n_pad, mask)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = torch.tensor(_stop_ids(eos_id), dtype=torch.long, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = _choose(logits[:, -1, :cfg.vocab_size], temperature, top_k, top_p, generator)
        token = token.masked_fill(done, pad_id)  # finished rows keep running on padding, ignored
        new_tokens.append(token)
        if stops.numel():
            done = done | torch.isin(token, stops)
        # A host sync per token: the only way to stop as soon as every row has finished.
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        if use_cache:
            logits, cache = model.apply_with_cache(params, token[:, None], cache, L + step - n_pad, mask)
        else:
            logits, _ = model.apply_with_cache(params, ids, None, -n_pad, mask)

    out = []
    stop_set = set(_stop_ids(eos_id))
    for row in torch.stack(new_tokens, dim=1).tolist():
        ends = [i for i, t in enumerate(row) if t in stop_set]
        out.append(row[:ends[0]] if ends else row)
    return out


def _stop_ids(eos_id) -> tuple:
    """``eos_id`` as a tuple of ids: () for None, (id,) for one id."""
    if eos_id is None:
        return ()
    return tuple(eos_id) if isinstance(eos_id, (tuple, list)) else (eos_id,)


def generate_text(model: Model, params: dict, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """Continue each text prompt; returns the generated text (without the prompt).

    Each prompt is encoded with ``tokenizer`` and prefixed with ``tokenizer.bos_id``
    when the tokenizer adds one to a text (``data.start_ids``: Qwen's and SmolLM2's do not); ``eos_id`` defaults to the
    tokenizer's end ids (``eos_ids`` when it has several) and ``pad_id`` to its pad.
    Other keyword arguments (``max_new_tokens`` is required) go to :func:`generate`.

    Example::

        generate_text(model, params, mf.ByteTokenizer(), ["Hello"], max_new_tokens=20, temperature=0.7)
    """
    if isinstance(prompts, str):
        raise ValueError(f"generate_text: prompts must be a list of strings; wrap the one prompt: [{prompts!r}].")
    kwargs.setdefault("eos_id", tuple(getattr(tokenizer, "eos_ids", None) or (tokenizer.eos_id,)))
    kwargs.setdefault("pad_id", tokenizer.pad_id)
    from .data import start_ids

    first = start_ids(tokenizer)  # BOS when the tokenizer puts one before a text (Qwen's has none)
    ids = [[*first, *tokenizer.encode(text)] for text in prompts]
    return [tokenizer.decode(row) for row in generate(model, params, ids, **kwargs)]
