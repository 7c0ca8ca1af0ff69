"""Pytree helpers against element-by-element references."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm_func import tree as T

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]


@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=5, max_size=5),
       bad=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 39), st.sampled_from([math.nan, math.inf, -math.inf])),
                    max_size=3),
       seed=st.integers(0, 1000))
def test_all_finite_is_every_element_finite(sizes, dtypes, bad, seed):
    g = torch.Generator().manual_seed(seed)
    leaves = [(torch.randn(n, generator=g) * 1e3).to(dtypes[i]) for i, n in enumerate(sizes)]
    for i, j, value in bad:
        if i < len(leaves) and j < leaves[i].numel() and leaves[i].is_floating_point():
            leaves[i][j] = value
    tree = {"a": leaves[:2], "b": tuple(leaves[2:])}
    expected = all(bool(torch.isfinite(x).all()) for x in leaves)
    got = T.all_finite(tree)
    assert got.shape == () and got.dtype == torch.bool and bool(got) == expected
    # the same answer inside a transform (the per-leaf path), member by member under vmap
    stacked = [torch.stack([x, torch.zeros_like(x)]) for x in leaves]
    per_member = torch.func.vmap(T.all_finite)(stacked)
    assert per_member.tolist() == [expected, True]
