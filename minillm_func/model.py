"""A small modern decoder-only transformer, as a pair of pure functions.

``build_model(cfg)`` returns ``Model(init, apply, module, config, to_module, apply_with_cache,
apply_hidden)``:

- ``init(seed) -> params``: a flat ``dict[str, Tensor]``, deterministic for a seed;
- ``apply(params, input_ids, attention_mask=None, *, checkpoint=False, position_ids=None) -> logits``: a pure
  function (``torch.func.functional_call``), so the same params always give the same logits;
  ``checkpoint=True`` recomputes each block's activations in the backward pass instead
  of keeping them (plain eager autograd only: not under ``torch.func`` transforms or
  ``torch.compile``);
- ``apply_hidden(params, input_ids, attention_mask=None, *, checkpoint=False) -> hidden``:
  the final normalised hidden states ``[B, T, dim]``, before the output projection.
  ``apply == apply_hidden @ output_weight(params).T``; feed it to
  :func:`minillm_func.chunked.chunked_cross_entropy` to never build the full logits;
- ``apply_with_cache(params, input_ids, cache=None, start_pos=None, attention_mask=None)
  -> (logits, new_cache)``: the same computation for incremental decoding. ``cache``
  holds the keys and values of the positions seen so far and is a plain value: it
  is never modified, a new one is returned (see :func:`empty_cache`);
- ``module``: the :class:`Transformer` that defines the computation. It lives on the
  ``meta`` device and holds no weights of its own: it only names the params
  (``module.named_parameters()`` keys equal the params keys; tied weights appear once).
  Its two paths share the blocks: ``forward`` / ``hidden`` (training: ``apply``,
  ``apply_hidden``) and ``decode`` (the cache: ``apply_with_cache``);
- ``to_module(params)``: a real ``nn.Module`` carrying a copy of ``params``, for
  running the same weights imperatively (baselines, parity tests, export).

The architecture follows current small LLMs: RMSNorm before each sub-layer,
rotary position embeddings, grouped-query causal attention through
``scaled_dot_product_attention``, a SwiGLU MLP, no biases, and optionally the
input embedding tied to the output projection.

The options that published checkpoints need are config fields, off by default
(so a default config builds exactly the params it always did):

- ``head_size`` / ``intermediate_size``: explicit head and MLP sizes (Llama 3, Mistral,
  Qwen3, whose head size is not ``dim / n_heads``);
- ``qkv_bias`` (Qwen2) and ``out_bias`` (with ``qkv_bias``: Llama's ``attention_bias``);
- ``qk_norm`` (Qwen3): an RMSNorm over each query and key head, before the rotation;
- ``rope_scaling``: Llama 3.1's ``"llama3"`` frequency rescaling or ``"linear"`` position
  interpolation.

Parameter names map one to one onto transformers' Llama/Mistral/Qwen2/Qwen3 names
(``tok_emb`` = ``model.embed_tokens``, ``layers.{i}.attn.wq`` = ``model.layers.{i}.self_attn.q_proj``,
``attn.q_norm`` = ``self_attn.q_norm``, ``attn_norm`` = ``input_layernorm``, ``mlp_norm`` =
``post_attention_layernorm``, ``mlp.w1/w3/w2`` = ``mlp.gate/up/down_proj``, ``norm`` =
``model.norm``); rotary embeddings rotate split halves, as transformers' ``rotate_half``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.checkpoint import checkpoint as _checkpoint

from .labels import require_integer_ids
from .tree import under_transform

__all__ = ["ModelConfig", "Model", "build_model", "Transformer", "KVCache", "empty_cache", "output_weight",
           "packed_causal_mask", "rotary_inv_freq"]

# One ``(keys, values)`` pair per layer, each ``[batch, kv_heads, cached_len, head_dim]``:
# rotary positions already applied to the keys, stored before grouped-query
# repetition (so GQA models cache ``n_heads / kv_heads`` times less).
KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


# The rope_scaling types we implement, each with the keys its dict must hold besides "rope_type".
_ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the transformer.

    ``vocab_size`` is the tokenizer's size; the embedding and output layers are
    padded up to a multiple of ``vocab_multiple`` (64: faster matmuls), so logits
    have ``padded_vocab_size`` columns. The padding ids never occur in the data;
    the loss pushes their logits down and generation never samples them.
    ``vocab_multiple=1`` means no padding (what a loaded checkpoint uses, so its
    embedding shapes stay those of the file).

    The fields after ``init_std`` describe published architectures; their defaults
    build today's model, parameter for parameter:

    - ``head_size``: the size of one attention head. ``None``: ``dim // n_heads``
      (and ``dim`` must be divisible by ``n_heads``). Set explicitly, ``n_heads * head_size``
      need not equal ``dim`` (Qwen3-0.6B: dim 1024, 16 heads of 128): ``wq`` maps
      ``dim -> n_heads * head_size`` and ``wo`` maps it back to ``dim``.
    - ``intermediate_size``: the SwiGLU hidden size. ``None``: ``mlp_ratio * dim``
      rounded up to a multiple of 32.
    - ``qkv_bias``: biases on the query, key and value projections (Qwen2).
    - ``out_bias``: a bias on the attention output projection (Llama's
      ``attention_bias: true`` sets both). Biases start at zero.
    - ``qk_norm``: an RMSNorm of size ``head_dim`` (eps ``norm_eps``, weights ``attn.q_norm``
      and ``attn.k_norm``, shared by all heads) applied to each query and key head after
      the projection and before the rotation (Qwen3).
    - ``rope_scaling``: how rotary frequencies are adapted to long contexts, a
      JSON-ready dict with a ``"rope_type"`` key (transformers' names):

      * ``None`` or ``{"rope_type": "default"}``: ``inv_freq_i = rope_theta ** (-2i / head_dim)``;
      * ``{"rope_type": "linear", "factor": f}``: positions divided by ``f``
        (position interpolation);
      * ``{"rope_type": "llama3", "factor": f, "low_freq_factor": l, "high_freq_factor": h,
        "original_max_position_embeddings": L}`` (Llama 3.1 / 3.2): with wavelength
        ``w = 2 pi / inv_freq``, frequencies with ``w < L / h`` are kept, those with
        ``w > L / l`` are divided by ``f``, and in between they are blended:
        ``s = (L / w - l) / (h - l)``, ``inv_freq * ((1 - s) / f + s)``.

      See :func:`rotary_inv_freq`. Treat the dict as read-only: the config keeps a copy.
    """

    vocab_size: int
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    max_seq_len: int = 256
    mlp_ratio: float = 8 / 3  # SwiGLU hidden size = mlp_ratio * dim, rounded up to a multiple of 32
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10000.0
    vocab_multiple: int = 64
    init_std: float = 0.02
    head_size: int | None = None  # None: dim // n_heads
    intermediate_size: int | None = None  # None: the mlp_ratio rule
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None  # None: plain rotary frequencies

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
        for name in ("head_size", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"ModelConfig.{name} must be a positive int or None (derive it), got {value!r}.")
        for name in ("qkv_bias", "out_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.head_size is None and self.dim % self.n_heads:
            raise ValueError(
                f"ModelConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                f"choose for example dim={self.n_heads * max(2, self.dim // self.n_heads)}, "
                "or give the head size explicitly with head_size=...")
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig: the head size {self.head_dim} "
                f"({'head_size' if self.head_size is not None else 'dim / n_heads'}) must be even for "
                "rotary positions; change dim, n_heads or head_size.")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads} "
                "(each key/value head serves a whole group of query heads).")
        if self.dropout != 0.0:
            raise ValueError(
                "ModelConfig: dropout must be 0.0. `apply` is a pure function and takes no random "
                "state, so it cannot draw dropout masks; small models trained for a few epochs "
                "rarely need it.")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("ModelConfig: mlp_ratio, norm_eps and init_std must be positive.")
        if self.rope_scaling is not None:
            # A private copy: the caller's dict may change later, the config must not.
            object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))

    def __hash__(self):  # a frozen config stays hashable although rope_scaling is a dict
        def hashable(value):
            return tuple(sorted(value.items())) if isinstance(value, dict) else value
        return hash(tuple(hashable(getattr(self, f.name)) for f in fields(self)))

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 32 * math.ceil(self.mlp_ratio * self.dim / 32)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return m * math.ceil(self.vocab_size / m)


def _check_rope_scaling(rope_scaling) -> dict:
    """A validated plain-dict copy of ``rope_scaling``; a ValueError that says what to write otherwise."""
    example = ('rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, '
               '"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}')
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"ModelConfig.rope_scaling must be None or a dict, got {type(rope_scaling).__name__}; "
                         f"for example {example}.")
    rope_type = rope_scaling.get("rope_type")
    if rope_type is None:
        hint = (f' (older configs call it "type": write "rope_type": {rope_scaling["type"]!r})'
                if "type" in rope_scaling else "")
        raise ValueError(f"ModelConfig.rope_scaling={rope_scaling!r} has no \"rope_type\" key{hint}; "
                         f"supported types: {sorted(_ROPE_SCALING_KEYS)}.")
    if rope_type not in _ROPE_SCALING_KEYS:
        raise ValueError(f"ModelConfig.rope_scaling: rope_type {rope_type!r} is not supported; "
                         f"supported types: {sorted(_ROPE_SCALING_KEYS)}.")
    required = _ROPE_SCALING_KEYS[rope_type]
    missing = [k for k in required if k not in rope_scaling]
    unknown = sorted(set(rope_scaling) - set(required) - {"rope_type"})
    if missing or unknown:
        why = []
        if missing:
            why.append(f"lacks {missing}")
        if unknown:
            why.append(f"has keys it does not use, {unknown}"
                       + (" (rope_theta is ModelConfig.rope_theta)" if "rope_theta" in unknown else ""))
        raise ValueError(f"ModelConfig.rope_scaling for rope_type {rope_type!r} {' and '.join(why)}; "
                         f"it takes exactly {['rope_type', *required]}.")
    for key in required:
        value = rope_scaling[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be a positive number, got {value!r}.")
    if rope_type == "llama3" and rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
        raise ValueError(
            f"ModelConfig.rope_scaling: high_freq_factor={rope_scaling['high_freq_factor']} must exceed "
            f"low_freq_factor={rope_scaling['low_freq_factor']} (Llama 3.1 uses 4.0 and 1.0).")
    return dict(rope_scaling)


# --------------------------------------------------------------------------- module


def rotary_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None, *,
                    dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The rotary inverse frequencies ``[head_dim/2]``, computed in ``dtype``.

    Plain: ``inv_freq_i = theta ** (-2i / head_dim)``. ``rope_scaling`` (see
    :class:`ModelConfig`) rescales them: ``"linear"`` divides every frequency by
    ``factor`` (the same angles as dividing the positions by it); ``"llama3"`` keeps
    the high frequencies (wavelength ``2 pi / inv_freq`` below
    ``original_max_position_embeddings / high_freq_factor``), divides the low ones
    (wavelength above ``original_max_position_embeddings / low_freq_factor``) by
    ``factor``, and blends linearly in ``1 / wavelength`` in between, so the result is
    continuous at both edges.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    rope_type = "default" if rope_scaling is None else rope_scaling["rope_type"]
    if rope_type == "default":
        return inv_freq
    factor = rope_scaling["factor"]
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_len = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # smooth: 1 at the high-frequency edge (wavelen = old_len / high), 0 at the
        # low-frequency edge (wavelen = old_len / low); clamped outside.
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        return inv_freq * ((1 - smooth) / factor + smooth)
    raise ValueError(f"rotary_inv_freq: rope_type {rope_type!r} is not supported; "
                     f"supported types: {sorted(_ROPE_SCALING_KEYS)}.")


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float,
                  rope_scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles at integer ``positions`` (any shape ``[...]``),
    ``[..., head_dim/2]`` in float32.

    Recomputed at each call rather than stored as buffers: it costs ``T * head_dim/2``
    multiplications and keeps the module free of state.
    """
    inv_freq = rotary_inv_freq(head_dim, theta, rope_scaling, device=positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def rotary_tables(seq_len: int, head_dim: int, theta: float, device,
                  rope_scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles at positions ``0 .. seq_len-1``, ``[seq_len, head_dim/2]``."""
    return rotary_angles(torch.arange(seq_len, device=device), head_dim, theta, rope_scaling)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head vector of ``x`` ``[B, H, T, hd]`` by position.

    ``cos``, ``sin``: ``[T, hd/2]`` (every row at the same positions) or ``[B, 1, T, hd/2]``.
    """
    # [B, H, T, hd/2] each, in float32 at least: half precision is raised, float64 kept (a plain
    # .float() would round a float64 model's queries and keys to float32 here).
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def causal_mask(past: int, T: int, attention_mask: torch.Tensor | None = None, *, device=None) -> torch.Tensor:
    """The boolean attention mask of ``T`` queries following ``past`` earlier positions.

    Query ``t`` (absolute position ``past + t``) sees the keys ``0 .. past + t`` that are
    not padding, and always itself: a padded query with no visible key would otherwise
    produce a row of NaNs. ``[T, past + T]``, or ``[B, 1, T, past + T]`` (broadcast over
    the heads) with an ``attention_mask`` ``[B, past + T]`` (1 = real token).
    """
    query = past + torch.arange(T, device=device)[:, None]  # [T, 1]
    key = torch.arange(past + T, device=device)[None, :]    # [1, P + T]
    mask = key <= query                                      # [T, P + T]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # [B, 1, T, P + T]
    return mask | (key == query)


def packed_causal_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The block-diagonal causal mask ``[B, 1, T, T]`` of rows that pack several sequences.

    A sequence starts wherever ``position_ids`` ``[B, T]`` is 0 (positions restart at each
    packed example, as TRL's and Hugging Face's padding-free batches have them); query ``t``
    sees the keys ``s <= t`` of its own sequence only, so no attention crosses an example
    boundary. Padding packed as position 0 is a sequence of one token that sees itself.
    With an ``attention_mask`` ``[B, T]`` padded keys are hidden too (each query still sees itself).
    """
    segment = torch.cumsum(position_ids == 0, dim=1)                          # [B, T]: which sequence
    T = position_ids.shape[1]
    idx = torch.arange(T, device=position_ids.device)
    causal = idx[None, :] <= idx[:, None]                                     # [T, T]
    mask = causal & (segment[:, :, None] == segment[:, None, :])              # [B, T, T]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    return (mask | torch.eye(T, dtype=torch.bool, device=position_ids.device))[:, None]  # [B, 1, T, T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        if cfg.qk_norm:  # one norm over head_dim, shared by the heads (Qwen3)
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, past_kv=None):
        """``x`` ``[B, T, dim]`` -> ``(output [B, T, dim], (keys, values))``.

        The keys and values, ``[B, KV, P + T, hd]``, are the ``P`` past ones (``past_kv``,
        when decoding) followed by those of ``x``: the layer's entry of the new cache.
        ``mask``: ``None`` (plain causal), ``[T, P + T]`` or ``[B, 1, T, P + T]`` (true = attend).
        Shapes below: ``H`` query heads, ``KV`` key/value heads, ``hd`` the head size.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)                   # [B, T, H, hd]
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim)                  # [B, T, KV, hd]
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        if self.q_norm is not None:  # before the rotation, as Qwen3 does
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                 # [B, H, T, hd], [B, KV, T, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_kv is not None:
            # The cache grows by concatenation: a new tensor each step, so the cache
            # passed in is never written to (a preallocated buffer updated in place
            # would have to be copied first to stay pure, which costs the same copy).
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)  # [B, KV, P + T, hd]
        kv = (k, v)  # cached before the repetition below: GQA caches H / KV times less
        if self.kv_heads != self.n_heads:  # grouped-query attention: share each k/v head
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)  # [B, H, P + T, hd]
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        # Without a mask (no padding, no cache) the causal flag lets torch pick its fastest kernel.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, H, T, hd]
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), kv     # [B, T, H * hd] -> [B, T, dim]


class MLP(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, ``[B, T, dim] -> [B, T, hidden_dim] -> [B, T, dim]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_kv=None):
        """Returns ``(output, (keys, values))``, as :meth:`Attention.forward`."""
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, past_kv)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class Transformer(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, T, padded_vocab_size]``, by two paths through the same blocks.

    - Training (and scoring) sees whole sequences from position 0: :meth:`forward` gives
      the logits, :meth:`hidden` the final normalised hidden states before the output
      projection; ``checkpoint=True`` recomputes each block in the backward pass.
    - Decoding continues sequences: :meth:`decode` takes the :data:`KVCache` of the
      ``P`` positions seen before and returns ``(logits, new_cache)``, the new cache
      covering ``P + T`` positions.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # ---- training: whole sequences

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                checkpoint: bool = False, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, padded_vocab_size]``: :meth:`hidden`, then the output projection."""
        return self.lm_head(self.hidden(input_ids, attention_mask, checkpoint=checkpoint, position_ids=position_ids))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               checkpoint: bool = False, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states ``[B, T, dim]`` of ``input_ids`` ``[B, T]`` at positions ``0 .. T-1``.

        ``attention_mask`` ``[B, T]`` (1 = real token) hides padding from every query.
        ``position_ids`` ``[B, T]``: rows that pack several sequences, positions restarting
        at 0 at each one; each token is rotated by its own position and attends within its
        own sequence only (:func:`packed_causal_mask`), so a packed sequence gets the hidden
        states it would get alone.
        ``checkpoint=True`` runs each block under activation checkpointing
        (:func:`_checkpointed_block`) when a backward pass can follow.
        """
        cfg, T = self.cfg, input_ids.shape[1]
        if position_ids is None:
            cos, sin = rotary_tables(T, cfg.head_dim, cfg.rope_theta, input_ids.device, cfg.rope_scaling)  # [T, hd/2]
            # No padding: no mask, and attention runs with the causal flag (torch's fastest kernel).
            mask = None if attention_mask is None else causal_mask(0, T, attention_mask, device=input_ids.device)
        else:
            cos, sin = rotary_angles(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # [B, T, hd/2]
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd/2]: broadcast over the heads
            mask = packed_causal_mask(position_ids, attention_mask)  # [B, 1, T, T]
        x = self.tok_emb(input_ids)  # [B, T, dim]
        if checkpoint and torch.is_grad_enabled():  # without a backward pass there is nothing to save
            for layer in self.layers:
                x = _checkpointed_block(layer, x, cos, sin, mask)
        else:
            for layer in self.layers:
                x, _ = layer(x, cos, sin, mask)
        return self.norm(x)

    # ---- decoding: continue from a cache

    def decode(self, input_ids: torch.Tensor, cache: KVCache, start_pos: int | torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """``(logits [B, T, padded_vocab_size], new_cache)`` for ``input_ids`` ``[B, T]`` after ``P`` cached positions.

        Token ``t`` sits at rotary position ``start_pos + t``: ``start_pos`` is an int or
        a per-row ``LongTensor[B]`` (``-n_pad`` for a row with ``n_pad`` left pads) and
        defaults to ``P``; negative positions (left padding, which no real token attends
        to) are clamped to 0. ``attention_mask`` ``[B, P + T]`` covers cached and new
        positions. ``cache`` is read, never written: the new one is built by concatenation.
        """
        cfg, T, device = self.cfg, input_ids.shape[1], input_ids.device
        past = cache[0][0].shape[2]
        start = torch.as_tensor(past if start_pos is None else start_pos, device=device)  # [] or [B]
        positions = (start[..., None] + torch.arange(T, device=device)).clamp(min=0)  # [T] or [B, T]
        cos, sin = rotary_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # [(B,) T, hd/2]
        if positions.dim() == 2:  # per-row positions: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd/2]
        mask = None  # an empty cache and no padding: the causal flag, as in training
        if attention_mask is not None or past:
            mask = causal_mask(past, T, attention_mask, device=device)
        x = self.tok_emb(input_ids)  # [B, T, dim]
        new_cache = []
        for layer, past_kv in zip(self.layers, cache, strict=True):
            x, kv = layer(x, cos, sin, mask, past_kv)
            new_cache.append(kv)
        return self.lm_head(self.norm(x)), tuple(new_cache)


def _checkpointed_block(layer: Block, x, cos, sin, mask):
    """``layer(x, ...)[0]`` under non-reentrant activation checkpointing.

    The forward keeps only the block's input; the backward runs the block again to
    rebuild its activations (about one extra forward of the block, roughly +33% of
    the step's FLOPs), so a block's attention scores and MLP intermediates never sit
    in memory for more than one block at a time.

    The recomputation happens during the backward pass, after the enclosing
    ``functional_call`` has put the module's (meta) parameters back. So the block's
    parameters as they are now -- the tensors ``functional_call`` swapped in -- are
    captured here and swapped in again for the recomputation.
    """
    params = dict(layer.named_parameters())

    def run(x, cos, sin, mask):
        return functional_call(layer, params, (x, cos, sin, mask))[0]

    return _checkpoint(run, x, cos, sin, mask, use_reentrant=False)


def output_weight(params: dict) -> torch.Tensor:
    """The output projection ``[padded_vocab_size, dim]`` of ``params``: ``logits = hidden @ W.T``.

    ``params["lm_head.weight"]``, or ``params["tok_emb.weight"]`` when the embeddings are
    tied (tied weights appear once in params, under the embedding's name).
    """
    if "lm_head.weight" in params:
        return params["lm_head.weight"]
    if "tok_emb.weight" in params:
        return params["tok_emb.weight"]
    raise KeyError("output_weight: params hold neither 'lm_head.weight' nor 'tok_emb.weight'; "
                   "build them with model.init.")


def empty_cache(cfg: ModelConfig, batch_size: int, *, dtype: torch.dtype = torch.float32,
                device="cpu") -> KVCache:
    """A cache of zero positions for ``batch_size`` sequences: the start of incremental decoding."""
    shape = (batch_size, cfg.kv_heads, 0, cfg.head_dim)
    return tuple((torch.zeros(shape, dtype=dtype, device=device),
                  torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.n_layers))


# --------------------------------------------------------------------------- pure pair


class Model(NamedTuple):
    """A model as pure functions; see the module docstring."""

    init: Callable[..., dict]
    apply: Callable[..., torch.Tensor]
    module: Transformer
    config: ModelConfig
    to_module: Callable[[dict], Transformer]
    # (params, input_ids, cache=None, start_pos=None, attention_mask=None) -> (logits, new_cache)
    apply_with_cache: Callable[..., tuple[torch.Tensor, KVCache]] | None = None
    # (params, input_ids, attention_mask=None, *, checkpoint=False) -> hidden [B, T, dim]
    apply_hidden: Callable[..., torch.Tensor] | None = None


def _check_ids(input_ids: torch.Tensor, cfg: ModelConfig, attention_mask, who: str = "model.apply",
               position_ids=None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"{who} expects input_ids as a 2-D integer tensor [batch, seq_len]; "
            f"got {type(input_ids).__name__} with shape {tuple(getattr(input_ids, 'shape', ()))}. "
            "For one sequence use input_ids[None].")
    require_integer_ids(input_ids, who, "input_ids")
    # Packed rows (position_ids given) may be longer than max_seq_len: what the limit bounds is a
    # sequence's positions, and each packed sequence restarts at 0 (PackedDataset keeps them below
    # its max_length); checking the positions' values here would be a host sync in every step.
    if input_ids.shape[1] > cfg.max_seq_len and position_ids is None:
        raise ValueError(
            f"{who}: sequence length {input_ids.shape[1]} exceeds max_seq_len={cfg.max_seq_len}; "
            "truncate the batch or build the model with a larger max_seq_len.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"{who}: attention_mask shape {tuple(attention_mask.shape)} differs from "
            f"input_ids shape {tuple(input_ids.shape)}.")
    if position_ids is not None and (not isinstance(position_ids, torch.Tensor)
                                     or position_ids.shape != input_ids.shape):
        raise ValueError(
            f"{who}: position_ids shape {tuple(getattr(position_ids, 'shape', ()))} differs from "
            f"input_ids shape {tuple(input_ids.shape)}; give one position per token (0 where a packed "
            "sequence starts).")


def _check_checkpoint(params: dict, input_ids: torch.Tensor, who: str) -> None:
    """``torch.utils.checkpoint`` does not work under ``torch.func`` transforms: fail clearly up front.

    Under ``torch.compile`` too, by :func:`~minillm_func.tree.under_transform`'s rule: the
    tracer cannot tell a compiled ``torch.func.grad`` (where checkpointing fails with
    "don't yet support saved tensor hooks") from compiled plain autograd. The library's
    compiled step differentiates with ``torch.func.grad``, so there it is the former.
    """
    if under_transform(params, input_ids):
        raise RuntimeError(
            f"{who}(..., checkpoint=True) was called inside a torch.func transform (grad, vmap, ...) "
            "or under torch.compile, where torch.utils.checkpoint does not work. Differentiate with "
            "plain autograd, not compiled, instead: "
            "make_train_step(..., grad_path=\"autograd\") or value_and_grad(loss_fn, \"autograd\") "
            "(or torch.autograd.grad(loss, params)); or pass checkpoint=False.")


def _call(method, params: dict, *args, **kwargs):
    """``method(*args, **kwargs)``, a method of the (meta) module, with ``params`` swapped in.

    ``torch.func.functional_call(module, params, args)`` is this same context manager
    around ``module(*args)``, which always means ``forward``; calling :meth:`Transformer.hidden`
    or :meth:`Transformer.decode` needs it spelled out. ``tie_weights=True`` as in
    ``functional_call``: ``lm_head.weight`` follows ``tok_emb.weight`` when they are tied.
    ``torch.compile`` traces this context manager as it traces ``functional_call``.
    """
    with _reparametrize_module(method.__self__, params, tie_weights=True):
        return method(*args, **kwargs)


def build_model(cfg: ModelConfig) -> Model:
    """Build the pure ``Model(init, apply, module, config, to_module, apply_with_cache, apply_hidden)``.

    What each :class:`ModelConfig` field does:

    - ``vocab_size``: the tokenizer's size; ids ``>= vocab_size`` are never generated.
    - ``dim``: the width of the residual stream (embeddings, norms, projections' input).
    - ``n_layers``: the number of transformer blocks.
    - ``n_heads``: query heads per attention layer.
    - ``n_kv_heads``: key/value heads (grouped-query attention); ``None``: ``n_heads``.
    - ``max_seq_len``: the longest sequence ``apply`` accepts (cached + new positions for decoding).
    - ``mlp_ratio``: SwiGLU hidden size ``mlp_ratio * dim`` rounded up to a multiple of 32,
      unless ``intermediate_size`` is given.
    - ``norm_eps``: the epsilon of every RMSNorm (including ``qk_norm``'s).
    - ``tie_embeddings``: the output projection is the input embedding (one param, ``tok_emb.weight``).
    - ``dropout``: must be 0.0 (a pure ``apply`` draws no random masks).
    - ``rope_theta``: the rotary base; ``inv_freq_i = rope_theta ** (-2i / head_dim)``.
    - ``vocab_multiple``: embeddings and logits padded to a multiple of it (1: no padding).
    - ``init_std``: the std of the normal init; residual output projections get
      ``init_std / sqrt(2 * n_layers)``; norms start at one, biases at zero.
    - ``head_size``: the per-head size; ``None``: ``dim // n_heads``.
    - ``intermediate_size``: the SwiGLU hidden size; ``None``: the ``mlp_ratio`` rule.
    - ``qkv_bias``: biases on ``wq``, ``wk``, ``wv`` (Qwen2).
    - ``out_bias``: a bias on ``wo`` (Llama ``attention_bias``, with ``qkv_bias``).
    - ``qk_norm``: RMSNorm over each query/key head before the rotation (Qwen3),
      params ``layers.{i}.attn.q_norm.weight`` / ``k_norm.weight`` of shape ``[head_dim]``.
    - ``rope_scaling``: ``None`` or ``{"rope_type": "default" | "linear" | "llama3", ...}``
      (see :class:`ModelConfig` and :func:`rotary_inv_freq`).

    Example::

        model = build_model(ModelConfig(vocab_size=259, dim=64, n_layers=2, n_heads=4, max_seq_len=32))
        params = model.init(seed=0)
        logits = model.apply(params, torch.zeros(1, 8, dtype=torch.long))   # [1, 8, 320]

    A Qwen3-shaped model (explicit head size, query/key norms, no vocabulary padding)::

        cfg = ModelConfig(vocab_size=1000, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_size=16,
                          intermediate_size=96, qk_norm=True, vocab_multiple=1, rope_theta=1e6)
    """
    with torch.device("meta"):
        module = Transformer(cfg)
    names = [name for name, _ in module.named_parameters()]  # tied weights appear once
    # Residual-branch output projections are scaled down by depth (GPT-2), so the
    # residual stream's variance does not grow with the number of layers.
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

    def init(seed: int = 0, *, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
        """Fresh parameters, identical for identical ``seed`` (a private generator; global RNG untouched)."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        params = {}
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(p.shape)
            elif name.endswith(".bias"):  # draws nothing: the weights' values do not depend on the biases
                value = torch.zeros(p.shape)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
                value = torch.randn(p.shape, generator=gen) * std
            params[name] = value.to(device=device, dtype=dtype)
        return params

    def apply(params: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              checkpoint: bool = False, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, padded_vocab_size]``; pure in ``params`` and the inputs.

        With ``attention_mask`` (1 = real token, 0 = padding), logits at real
        positions do not depend on what stands at padded positions.

        ``position_ids`` ``[B, T]`` (padding-free packing): each row holds several
        sequences, the positions restarting at 0 at each; a sequence's logits equal
        those of the sequence run alone, and no attention crosses from one to another.
        A packed row may be longer than ``max_seq_len``; its positions should stay below it.

        ``checkpoint=True`` applies activation checkpointing to every transformer
        block (``torch.utils.checkpoint``, non-reentrant): the forward keeps only
        each block's input and the backward recomputes the block, trading about
        one extra forward pass for the activation memory of all but one block.
        Same values and gradients. It needs the plain-autograd gradient path
        (``torch.autograd.grad`` / ``grad_path="autograd"``), not compiled; under
        ``torch.func`` transforms and ``torch.compile`` it raises.
        """
        _check_ids(input_ids, cfg, attention_mask, position_ids=position_ids)
        if checkpoint:
            _check_checkpoint(params, input_ids, "model.apply")
        return functional_call(module, params, (input_ids, attention_mask),
                               {"checkpoint": checkpoint, "position_ids": position_ids})

    def apply_hidden(params: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     checkpoint: bool = False, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states ``[B, T, dim]``, before the output projection.

        ``apply(params, ids, mask) == apply_hidden(params, ids, mask) @ output_weight(params).T``.
        Pair it with :func:`minillm_func.chunked.chunked_cross_entropy` (or
        ``chunked_sequence_logps``) so the ``[B, T, V]`` logits are never built.
        ``checkpoint`` and ``position_ids`` as in ``apply``.
        """
        _check_ids(input_ids, cfg, attention_mask, who="model.apply_hidden", position_ids=position_ids)
        if checkpoint:
            _check_checkpoint(params, input_ids, "model.apply_hidden")
        return _call(module.hidden, params, input_ids, attention_mask, checkpoint=checkpoint,
                     position_ids=position_ids)

    def apply_with_cache(params: dict, input_ids: torch.Tensor, cache: KVCache | None = None,
                         start_pos: int | torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """``(logits [B, T, padded_vocab_size], new_cache)`` for ``input_ids`` following the cached positions.

        ``cache=None`` starts from :func:`empty_cache`. Token ``t`` sits at rotary
        position ``start_pos + t`` (default: the cached length; a ``LongTensor[B]``
        gives each row its own offset, e.g. ``-n_pad`` for left-padded rows). The
        ``attention_mask`` (1 = real token) covers cached and new positions,
        ``[B, cached_len + T]``. Feeding a sequence in pieces gives the logits of one
        ``apply`` over the whole sequence. Nothing passed in is modified.
        """
        _check_ids(input_ids, cfg, None, who="model.apply_with_cache")
        B, T = input_ids.shape
        if cache is None:
            first = params[names[0]]
            cache = empty_cache(cfg, B, dtype=first.dtype, device=first.device)
        if len(cache) != cfg.n_layers or cache[0][0].shape[0] != B:
            raise ValueError(
                f"model.apply_with_cache: the cache holds {len(cache)} layers for batch "
                f"{cache[0][0].shape[0] if len(cache) else '?'}, expected {cfg.n_layers} layers for batch {B}; "
                "start with cache=None (or empty_cache(cfg, batch_size)) and pass back the returned cache.")
        total = cache[0][0].shape[2] + T
        if total > cfg.max_seq_len:
            raise ValueError(
                f"model.apply_with_cache: {total} positions (cached + new) exceed max_seq_len={cfg.max_seq_len}; "
                "build the model with a larger max_seq_len.")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, total):
            raise ValueError(
                f"model.apply_with_cache: attention_mask shape {tuple(attention_mask.shape)} should be "
                f"{(B, total)}: one column per cached and new position.")
        if isinstance(start_pos, torch.Tensor) and start_pos.shape not in ((), (B,)):
            raise ValueError(
                f"model.apply_with_cache: start_pos should be an int or a tensor of shape ({B},), "
                f"got shape {tuple(start_pos.shape)}.")
        return _call(module.decode, params, input_ids, cache, start_pos, attention_mask)

    def to_module(params: dict) -> Transformer:
        """A real ``nn.Module`` holding a copy of ``params`` (for imperative use)."""
        missing = set(names) - set(params)
        if missing:
            raise KeyError(f"to_module: params lack {sorted(missing)}; build them with model.init.")
        first = params[names[0]]
        real = Transformer(cfg).to(device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for name, p in real.named_parameters():
                p.copy_(params[name])
        return real

    return Model(init=init, apply=apply, module=module, config=cfg, to_module=to_module,
                 apply_with_cache=apply_with_cache, apply_hidden=apply_hidden)
