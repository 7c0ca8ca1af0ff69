"""A small modern decoder-only transformer, as a pair of pure functions.

``build_model(cfg)`` returns ``Model(init, apply, module, config)``:

- ``init(seed) -> params``: a flat ``dict[str, Tensor]``, deterministic for a seed;
- ``apply(params, input_ids, attention_mask=None) -> logits``: a pure function
  (``torch.func.functional_call``), so the same params always give the same logits;
- ``module``: the ``nn.Module`` that defines the computation. It lives on the
  ``meta`` device and holds no weights of its own: it only names the params
  (``module.named_parameters()`` keys equal the params keys; tied weights appear once).
- ``to_module(params)``: a real ``nn.Module`` carrying a copy of ``params``, for
  running the same weights imperatively (baselines, parity tests, export).

The architecture follows current small LLMs: RMSNorm before each sub-layer,
rotary position embeddings, grouped-query causal attention through
``scaled_dot_product_attention``, a SwiGLU MLP, no biases, and optionally the
input embedding tied to the output projection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

__all__ = ["ModelConfig", "Model", "build_model", "Transformer"]


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the transformer.

    ``vocab_size`` is the tokenizer's size; the embedding and output layers are
    padded up to a multiple of ``vocab_multiple`` (64: faster matmuls), so logits
    have ``padded_vocab_size`` columns. The padding ids never occur in the data;
    the loss pushes their logits down and generation never samples them.
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

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
        if self.dim % self.n_heads:
            raise ValueError(
                f"ModelConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                f"choose for example dim={self.n_heads * max(2, self.dim // self.n_heads)}.")
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig: the head size dim/n_heads = {self.head_dim} must be even for rotary "
                "positions; change dim or n_heads.")
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        return 32 * math.ceil(self.mlp_ratio * self.dim / 32)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return m * math.ceil(self.vocab_size / m)


# --------------------------------------------------------------------------- module


def rotary_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, ``[seq_len, head_dim/2]`` in float32.

    Recomputed at each call rather than stored as buffers: it costs ``T * head_dim/2``
    multiplications and keeps the module free of state.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head vector of ``x`` ``[B, H, T, hd]`` by position."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.n_heads:  # grouped-query attention: share each k/v head
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        # Without a padding mask the causal flag lets torch pick its fastest kernel.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

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

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, T, padded_vocab_size]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states ``[B, T, dim]`` (before the output projection)."""
        T = input_ids.shape[1]
        cos, sin = rotary_tables(T, self.cfg.head_dim, self.cfg.rope_theta, input_ids.device)
        mask = None
        if attention_mask is not None:
            # Causal and key-padding, and every position may always see itself: a
            # padded query with no visible key would otherwise produce NaN rows.
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]
            mask = mask | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        x = self.tok_emb(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids, attention_mask))


# --------------------------------------------------------------------------- pure pair


class Model(NamedTuple):
    """A model as pure functions; see the module docstring."""

    init: Callable[..., dict]
    apply: Callable[..., torch.Tensor]
    module: Transformer
    config: ModelConfig
    to_module: Callable[[dict], Transformer]


def _check_ids(input_ids: torch.Tensor, cfg: ModelConfig, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            "model.apply expects input_ids as a 2-D integer tensor [batch, seq_len]; "
            f"got {type(input_ids).__name__} with shape {tuple(getattr(input_ids, 'shape', ()))}. "
            "For one sequence use input_ids[None].")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"model.apply expects integer token ids, got dtype {input_ids.dtype}.")
    if input_ids.shape[1] > cfg.max_seq_len:
        raise ValueError(
            f"model.apply: sequence length {input_ids.shape[1]} exceeds max_seq_len={cfg.max_seq_len}; "
            "truncate the batch or build the model with a larger max_seq_len.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"model.apply: attention_mask shape {tuple(attention_mask.shape)} differs from "
            f"input_ids shape {tuple(input_ids.shape)}.")


def build_model(cfg: ModelConfig) -> Model:
    """Build the pure ``Model(init, apply, module, config, to_module)`` for ``cfg``.

    Example::

        model = build_model(ModelConfig(vocab_size=259, dim=64, n_layers=2, n_heads=4, max_seq_len=32))
        params = model.init(seed=0)
        logits = model.apply(params, torch.zeros(1, 8, dtype=torch.long))   # [1, 8, 320]
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
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
                value = torch.randn(p.shape, generator=gen) * std
            params[name] = value.to(device=device, dtype=dtype)
        return params

    def apply(params: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, padded_vocab_size]``; pure in ``params`` and the inputs.

        With ``attention_mask`` (1 = real token, 0 = padding), logits at real
        positions do not depend on what stands at padded positions.
        """
        _check_ids(input_ids, cfg, attention_mask)
        return functional_call(module, params, (input_ids,), {"attention_mask": attention_mask})

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

    return Model(init=init, apply=apply, module=module, config=cfg, to_module=to_module)
