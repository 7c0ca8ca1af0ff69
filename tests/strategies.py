"""Shared Hypothesis strategies. Bounds are keyword-only and small by default.

Tensor contents come from a drawn seed (a private generator), so examples are
cheap and reproducible; shapes and counts are drawn directly so they shrink.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

import minillm_func as mf

seeds = st.integers(0, 2**31 - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def logits_and_labels(draw, *, max_batch=3, max_len=8, max_vocab=12, dtype=torch.float64,
                      ignore_rate=None, min_counted=0):
    """``(logits [B,T,V], labels [B,T])`` with some labels set to IGNORE_INDEX."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, max_len))
    V = draw(st.integers(2, max_vocab))
    g = gen(draw(seeds))
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    labels = torch.randint(0, V, (B, T), generator=g)
    rate = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])) if ignore_rate is None else ignore_rate
    ignored = torch.rand(B, T, generator=g) < rate
    labels = labels.masked_fill(ignored, mf.IGNORE_INDEX)
    if min_counted and (labels != mf.IGNORE_INDEX).sum() < min_counted:
        labels[0, :min_counted] = torch.randint(0, V, (min(min_counted, T),), generator=g)
    return logits, labels


@st.composite
def ragged_batches(draw, *, max_batch=6, max_len=7, vocab=7, dim=3):
    """A batch of sequences with random lengths (right-padded with IGNORE_INDEX labels).

    Returns ``(features [B,T,dim], labels [B,T])`` for a linear model ``logits = features @ W``.
    """
    B = draw(st.integers(2, max_batch))
    T = draw(st.integers(1, max_len))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    g = gen(draw(seeds))
    feats = torch.randn(B, T, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    pos = torch.arange(T)[None, :]
    labels = torch.where(pos < torch.tensor(lengths)[:, None], labels, mf.IGNORE_INDEX)
    return feats, labels


@st.composite
def splits(draw, n: int):
    """A partition of ``range(n)`` into consecutive non-empty chunks, as cut points."""
    cuts = draw(st.lists(st.integers(1, n - 1), unique=True, max_size=n - 1)) if n > 1 else []
    return [0, *sorted(cuts), n]


@st.composite
def model_configs(draw, *, vocab_size=None, max_layers=2):
    """Tiny transformer configurations, with or without tying and grouped-query attention."""
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_kv = draw(st.sampled_from([h for h in (1, 2, 4) if n_heads % h == 0]))
    head_dim = draw(st.sampled_from([4, 8]))
    return mf.ModelConfig(
        vocab_size=vocab_size or draw(st.integers(5, 70)),
        dim=n_heads * head_dim,
        n_layers=draw(st.integers(1, max_layers)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        max_seq_len=16,
        tie_embeddings=draw(st.booleans()),
    )


@st.composite
def dpo_logps(draw, *, max_pairs=6):
    """Policy and reference summed log-probs (negative) and token counts for a batch of pairs."""
    P = draw(st.integers(1, max_pairs))
    g = gen(draw(seeds))

    def logps():
        return -torch.rand(P, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 20.0]))

    counts = lambda: torch.randint(1, 9, (P,), generator=g)  # noqa: E731
    return {"pc": logps(), "pr": logps(), "rc": logps(), "rr": logps(), "nc": counts(), "nr": counts()}


@st.composite
def param_trees(draw, *, max_leaves=5, max_rank=3, max_side=4, dtype=torch.float64):
    """A dict pytree (one level of nesting allowed) of random tensors of random shapes."""
    n = draw(st.integers(1, max_leaves))
    g = gen(draw(seeds))
    shapes = draw(st.lists(st.lists(st.integers(1, max_side), max_size=max_rank), min_size=n, max_size=n))
    tensors = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    if n > 1 and draw(st.booleans()):
        return {"w0": tensors[0], "block": {f"w{i}": t for i, t in enumerate(tensors[1:], 1)}}
    return {f"w{i}": t for i, t in enumerate(tensors)}


@st.composite
def adamw_hyper(draw):
    """Hyper-parameters for AdamW + clipping + cosine annealing, across realistic ranges."""
    return dict(
        lr=draw(st.sampled_from([1e-4, 1e-3, 3e-2])),
        b1=draw(st.sampled_from([0.0, 0.8, 0.9])),
        b2=draw(st.sampled_from([0.95, 0.999])),
        eps=draw(st.sampled_from([1e-8, 1e-6])),
        wd=draw(st.sampled_from([0.0, 0.01, 0.1])),
        max_norm=draw(st.sampled_from([0.1, 1.0, 100.0])),
        T_max=draw(st.integers(1, 20)),
        eta_min=draw(st.sampled_from([0.0, 1e-5])),
    )


@st.composite
def scaler_events(draw, *, growth_interval: int, max_runs=5):
    """A sequence of loss-scaler events ("ok", "inf", "nan") built as runs of finite steps.

    Each run holds ``growth_interval - 1`` (one short of growing: the count must
    restart after the non-finite step) to ``2 * growth_interval + 1`` finite
    steps and, unless drawn otherwise, ends in one non-finite step. Most runs are
    long enough for a growth event, so nearly every example exercises growth as
    well as back-off (a flat list of random events rarely held
    ``growth_interval`` finite steps in a row).
    """
    events = []
    for _ in range(draw(st.integers(1, max_runs))):
        events += ["ok"] * draw(st.integers(growth_interval - 1, 2 * growth_interval + 1))
        bad = draw(st.sampled_from(["inf", "nan", None]))
        if bad is not None:
            events.append(bad)
    return events


def expected_growths(events, growth_interval: int) -> int:
    """Growth events GradScaler's rules give (scale never near float32's max): one per
    ``growth_interval`` consecutive finite steps, the count restarting after each non-finite step."""
    growths = run = 0
    for event in events:
        run = run + 1 if event == "ok" else 0
        if run == growth_interval:
            growths, run = growths + 1, 0
    return growths

