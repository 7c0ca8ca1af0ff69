"""LoRA: fine-tune a low-rank update of chosen linear weights, the rest frozen.

A targeted weight ``W [out, in]`` becomes, in the forward pass,

.. math::

    y = W x + b + s \\, B (A\\, \\mathrm{dropout}(x)), \\qquad A \\in \\mathbb{R}^{r \\times in},\\;
    B \\in \\mathbb{R}^{out \\times r},\\; s = \\alpha / r \\;(\\text{rsLoRA: } \\alpha / \\sqrt{r})

with ``A`` random and ``B`` zero at init, so the adapted model starts equal to the
base (PEFT's semantics and order of operations). ``W + s B A`` is never built in
the training forward: the two thin matmuls cost ``r (in + out)`` per token and
their gradient reaches only ``A`` and ``B``.

In this library LoRA is a partition of the params pytree. The *adapters* are a
flat dict ``{"layers.0.attn.wq.lora_A": A, "layers.0.attn.wq.lora_B": B, ...}``;
the *base* is the model's params, untouched. :func:`apply` gives a
:class:`~minillm_func.model.Model` whose functions read both from one dict,
``combine(base, adapters)``. A trainer built with ``create_trainer(kind, model,
lora=LoraConfig(...))`` trains the adapters only: ``state.params`` *is* the
adapters (so the optimizer keeps moments for them alone), the base is frozen in
``state.extras["lora_base"]`` and never differentiated, and DPO's reference is
the base itself, adapters off (no second copy of the model).

Example::

    cfg = LoraConfig(rank=8, alpha=16, targets=("wq", "wv"))
    adapters = init(params, cfg, seed=0)                 # B = 0: equal to the base
    lm = apply(model, cfg)
    logits = lm.apply(combine(params, adapters, cfg), ids)
    merged = merge(params, adapters, cfg)                # plain params: model.apply(merged, ids)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Model, build_model

__all__ = ["LoraConfig", "init", "apply", "combine", "merge", "unmerge", "target_names", "linear_names",
           "objective", "fingerprint", "save_peft", "load_peft", "PEFT_NAMES", "ADAPTER_KEYS"]

ADAPTER_KEYS = ("lora_A", "lora_B")
# Our linear names -> PEFT/transformers' module names (target_modules in adapter_config.json).
PEFT_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
              "w3": "up_proj", "w2": "down_proj"}
_KEY = "dropout_key"  # a LoraLinear buffer: (on, seed, step, micro) of the dropout mask


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    - ``rank`` (r): the inner size of ``B A``.
    - ``alpha``: the update is scaled by ``alpha / rank`` (``rslora=True``: ``alpha / sqrt(rank)``,
      which keeps the update's size stable as the rank grows).
    - ``dropout``: probability of zeroing an input of the adapter branch (not of ``W x``) while
      training, the surviving inputs scaled by ``1 / (1 - dropout)``. The mask is a pure function of
      a seed held in the state, the update count and the micro-batch's place in its window, so a
      step stays pure and a resumed run repeats the same masks. Off in evaluation and generation.
    - ``targets``: linear layers to adapt, matched by name suffix (``"wq"`` matches every
      ``layers.{i}.attn.wq``; ``"layers.0.attn.wq"`` only that one). A target matching nothing is an
      error that lists the linear layers there are.
    - ``init``: ``"default"`` draws ``A`` uniform in ``±1/sqrt(in)`` (PEFT's Kaiming-uniform with
      ``a=sqrt(5)``), ``"gaussian"`` normal with std ``1/rank``; ``B`` starts at zero in both.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    init: str = "default"
    rslora: bool = False

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t))
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig: rank must be a positive int, got {self.rank!r}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig: alpha must be a positive number, got {self.alpha!r}.")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoraConfig: targets must be non-empty names such as ('wq', 'wv'), got {self.targets!r}.")
        if self.init not in ("default", "gaussian"):
            raise ValueError(f"LoraConfig: init must be 'default' or 'gaussian', got {self.init!r}.")

    @property
    def scale(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``rslora``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# --------------------------------------------------------------------------- which weights


def linear_names(params: dict) -> list[str]:
    """The linear layers LoRA can adapt: every 2-D ``.weight`` inside the blocks (``layers.{i}.…``),
    named without the ``.weight`` suffix. Embeddings and the output projection are not among them."""
    return [k[: -len(".weight")] for k, v in params.items()
            if k.startswith("layers.") and k.endswith(".weight") and v.dim() == 2]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def target_names(params: dict, config: LoraConfig) -> list[str]:
    """The linear layers of ``params`` that ``config.targets`` select, in params order."""
    available = linear_names(params)
    unmatched = [t for t in config.targets if not any(_matches(n, t) for n in available)]
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in available})
        raise ValueError(f"LoraConfig.targets: {unmatched} match no linear layer; the linear layers are "
                         f"{kinds} in every block (or a full name such as {available[0]!r})." if available else
                         "LoraConfig.targets: these params have no linear layer inside blocks (layers.{i}.…).")
    return [n for n in available if any(_matches(n, t) for t in config.targets)]


def init(params: dict, config: LoraConfig, seed: int = 0) -> dict:
    """Fresh adapters for ``params``: ``A [rank, in]`` random, ``B [out, rank]`` zero, per target.

    float32 (float64 when the base is float64), whatever the base's dtype: a bfloat16 base keeps
    float32 adapters and moments, as PEFT's mixed-precision recipe does. A private generator:
    the global RNG is untouched and a seed gives the same adapters every time.
    """
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for name in target_names(params, config):
        w = params[name + ".weight"]
        rows, cols = w.shape
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        if config.init == "gaussian":
            a = torch.randn(config.rank, cols, generator=gen, dtype=dtype) / config.rank
        else:
            bound = 1.0 / math.sqrt(cols)
            a = (torch.rand(config.rank, cols, generator=gen, dtype=dtype) * 2 - 1) * bound
        out[f"{name}.lora_A"] = a.to(w.device)
        out[f"{name}.lora_B"] = torch.zeros(rows, config.rank, dtype=dtype, device=w.device)
    return out


def _check_adapters(base: dict, adapters: dict, config: LoraConfig, who: str) -> list[str]:
    names = target_names(base, config)
    expected = {f"{n}.{k}" for n in names for k in ADAPTER_KEYS}
    if set(adapters) != expected:
        extra, missing = sorted(set(adapters) - expected), sorted(expected - set(adapters))
        raise ValueError(f"{who}: the adapters do not fit the config's targets (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); make them with lora.init(params, config).")
    return names


# --------------------------------------------------------------------------- the adapted forward


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (in int64 arithmetic, every product below 2**59: no overflow)."""
    m = 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & m
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & m
    return h ^ (h >> 16)


def _dropout_keep(shape, key: torch.Tensor, salt: int, p: float, device) -> torch.Tensor:
    """The kept-input scale ``1/(1-p)`` or 0 per element, a pure function of ``key = (on, seed, step, micro)``
    and ``salt`` (the layer): counter-based, so no generator state exists to carry or to restore.
    With ``on == 0`` every element is 1 exactly (evaluation)."""
    m = 0xFFFFFFFF
    k = _mix((key[1] & m) ^ salt)
    k = _mix((key[2] & m) ^ k)
    k = _mix((key[3] & m) ^ k)
    n = math.prod(shape)
    idx = torch.arange(n, device=device, dtype=torch.int64).view(shape)
    u = (_mix(((idx & m) * 0x2C1B3C6D) & m ^ k) >> 8).to(torch.float32) * (1.0 / (1 << 24))  # [0, 1)
    on = key[0].to(torch.float32)
    keep = (u >= p * on).to(torch.float32)
    return keep / (1.0 - p * on)


class LoraLinear(nn.Module):
    """``W x + b + scale * B (A dropout(x))``; ``weight`` and ``bias`` are the wrapped layer's own
    parameters (so tied weights stay tied), ``lora_A``/``lora_B`` the adapter's."""

    def __init__(self, linear: nn.Linear, config: LoraConfig, salt: int):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        rows, cols = linear.weight.shape
        self.lora_A = nn.Parameter(torch.empty(config.rank, cols, device=linear.weight.device))
        self.lora_B = nn.Parameter(torch.empty(rows, config.rank, device=linear.weight.device))
        self.scale, self.p, self.salt = config.scale, config.dropout, salt
        if self.p:
            self.register_buffer(_KEY, torch.zeros(4, dtype=torch.int64, device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = x
        if self.p:
            h = x * _dropout_keep(x.shape, getattr(self, _KEY), self.salt, self.p, x.device).to(x.dtype)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.dtype)  # a bfloat16 base with float32 adapters: the branch in float32
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale
        return (y + delta).to(y.dtype)


def apply(model: Model, config: LoraConfig) -> Model:
    """``model`` with LoRA on ``config.targets``: a :class:`Model` whose ``apply``, ``apply_hidden``
    and ``apply_with_cache`` take ``combine(base, adapters, config)``.

    Its ``init(seed)`` gives base params and fresh adapters together; ``to_module(params)`` a plain
    module with the adapters merged in. The base ``model`` is not changed.
    """
    adapted = build_model(model.config)  # a fresh meta module of our own to rewire
    module = adapted.module
    names = target_names({k: p for k, p in module.named_parameters()}, config)
    for salt, name in enumerate(names):
        parent, child = name.rsplit(".", 1)
        setattr(module.get_submodule(parent), child, LoraLinear(module.get_submodule(name), config, salt + 1))

    def fresh(seed: int = 0, **kwargs) -> dict:
        base = model.init(seed, **kwargs)
        return combine(base, init(base, config, seed), config)

    def to_module(params: dict) -> nn.Module:
        base = {k: v for k, v in params.items() if not _is_adapter_key(k)}
        return model.to_module(merge(base, {k: v for k, v in params.items() if k.endswith(ADAPTER_KEYS)}, config))

    return adapted._replace(init=fresh, to_module=to_module)


def _is_adapter_key(name: str) -> bool:
    return name.endswith(ADAPTER_KEYS) or name.endswith("." + _KEY)


def combine(base: dict, adapters: dict, config: LoraConfig, key: torch.Tensor | None = None) -> dict:
    """The one dict an :func:`apply` model reads: base params, adapters and (with dropout) the mask key.

    ``key``: ``(seed, step, micro)`` int64 to draw a training mask; None: dropout off. Nothing is
    copied: the dict holds the caller's tensors.
    """
    params = {**base, **adapters}
    if config.dropout:
        full = (torch.zeros(4, dtype=torch.int64) if key is None
                else torch.cat([torch.ones(1, dtype=torch.int64), key.reshape(3).to(torch.int64)]))
        for name in {k.rsplit(".", 1)[0] for k in adapters}:  # the adapted layers
            params[f"{name}.{_KEY}"] = full
    return params


# --------------------------------------------------------------------------- merging


def _delta(adapters: dict, name: str, config: LoraConfig, like: torch.Tensor) -> torch.Tensor:
    a, b = adapters[f"{name}.lora_A"], adapters[f"{name}.lora_B"]
    compute = torch.float64 if like.dtype == torch.float64 or a.dtype == torch.float64 else torch.float32
    return (b.to(compute) @ a.to(compute)) * config.scale


def merge(base: dict, adapters: dict, config: LoraConfig) -> dict:
    """Plain params with ``W + scale * B A`` in every target (computed in float32 or wider, then cast
    to ``W``'s dtype): ``model.apply(merge(...), ids)`` equals the adapted forward. A new dict; the
    inputs are not modified."""
    out = dict(base)
    for name in _check_adapters(base, adapters, config, "lora.merge"):
        w = base[name + ".weight"]
        d = _delta(adapters, name, config, w)
        out[name + ".weight"] = (w.to(d.dtype) + d).to(w.dtype)
    return out


def unmerge(merged: dict, adapters: dict, config: LoraConfig) -> dict:
    """The base back from :func:`merge`'s result: ``W - scale * B A`` per target (exact up to
    the rounding of the merged weight's dtype)."""
    out = dict(merged)
    for name in _check_adapters(merged, adapters, config, "lora.unmerge"):
        w = merged[name + ".weight"]
        d = _delta(adapters, name, config, w)
        out[name + ".weight"] = (w.to(d.dtype) - d).to(w.dtype)
    return out


# --------------------------------------------------------------------------- training


def objective(loss_fn: Callable, config: LoraConfig, *, reference: Callable | None = None,
              reference_keys: tuple = ("ref_chosen_logps", "ref_rejected_logps")) -> Callable:
    """A stage loss over adapters: ``(adapters, batch, extras) -> loss_fn(combine(base, adapters), batch, rest)``.

    ``extras["lora_base"]`` is the frozen base (never differentiated: the gradient is taken with
    respect to the first argument only). With dropout, the mask key is
    ``(extras["lora_seed"], extras["rng"])`` where the step supplies ``rng``; without ``rng``
    (evaluation) dropout is off. ``reference(base, batch) -> dict`` of the batch entries the stage
    reads as its reference (``reference_keys``: DPO's ``ref_chosen_logps`` and ``ref_rejected_logps``,
    GRPO's ``ref_logps``): the reference is the base with the adapters off, computed under
    ``no_grad`` unless the batch already carries them.
    """
    def loss(adapters, batch, extras):
        base = extras["lora_base"]
        rest = {k: v for k, v in extras.items() if k not in ("lora_base", "lora_seed")}
        key = None
        if config.dropout and "rng" in extras:
            key = torch.cat([extras["lora_seed"].reshape(1), extras["rng"].reshape(2)]).to(torch.int64)
        if reference is not None and not all(k in batch for k in reference_keys):
            with torch.no_grad():
                batch = {**batch, **reference(base, batch)}
        return loss_fn(combine(base, adapters, config, key), batch, rest)

    return loss


def fingerprint(params: dict) -> str:
    """SHA-256 over every param's name, dtype, shape and bytes: checks that a LoRA checkpoint is
    resumed or exported over the base it was trained on."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- PEFT folders

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _peft_key(name: str, part: str) -> str:
    from .hf import hf_name

    return "base_model.model." + hf_name(f"{name}.weight")[: -len(".weight")] + f".{part}.weight"


def save_peft(path, adapters: dict, config: LoraConfig, *, base_model_name_or_path: str | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained(hf_model, path)`` loads over the base exported with
    :func:`minillm_func.hf.save_pretrained`. Returns the folder."""
    from safetensors.torch import save_file

    if not adapters:
        raise ValueError("lora.save_peft: no adapters given; pass state.params of a LoRA trainer.")
    names = sorted({k.rsplit(".", 1)[0] for k in adapters})
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    unknown = [k for k in kinds if k not in PEFT_NAMES]
    if unknown:
        raise ValueError(f"lora.save_peft: no Hugging Face name for the layers {unknown}.")
    tensors = {}
    for name in names:
        for part in ADAPTER_KEYS:
            t = adapters[f"{name}.{part}"].detach().to("cpu")
            tensors[_peft_key(name, part)] = (t if dtype is None else t.to(dtype)).contiguous()
    layers = sorted({int(n.split(".")[1]) for n in names})
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
            "lora_dropout": config.dropout, "use_rslora": config.rslora, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "target_modules": sorted(PEFT_NAMES[k] for k in kinds),
            "layers_to_transform": layers,  # explicit: PEFT adapts every layer when this is None
            "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None, "revision": None}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(spec, indent=2))
    return folder


def load_peft(path) -> tuple[dict, LoraConfig]:
    """``(adapters, config)`` from a PEFT LoRA folder written by :func:`save_peft` (or by PEFT for a
    Llama/Mistral/Qwen model with the same target names)."""
    from safetensors.torch import load_file

    from .hf import our_name

    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"lora.load_peft: {folder} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.")
    spec = json.loads((folder / ADAPTER_CONFIG).read_text())
    if spec.get("peft_type") != "LORA":
        raise ValueError(f"lora.load_peft: {folder} holds a {spec.get('peft_type')!r} adapter, not LORA.")
    ours = {v: k for k, v in PEFT_NAMES.items()}
    targets = spec["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    missing = [t for t in targets if t not in ours]
    if missing:
        raise ValueError(f"lora.load_peft: target modules {missing} have no counterpart here ({sorted(ours)}).")
    adapters = {}
    for key, t in load_file(str(folder / ADAPTER_WEIGHTS)).items():
        body = key.removeprefix("base_model.model.")
        module, part = body.rsplit(".", 2)[0], body.rsplit(".", 2)[1]
        name = our_name(module + ".weight")
        if name is None or part not in ADAPTER_KEYS:
            raise ValueError(f"lora.load_peft: unexpected tensor {key!r} in {folder / ADAPTER_WEIGHTS}.")
        adapters[f"{name[: -len('.weight')]}.{part}"] = t
    # With layers_to_transform (some layers only) the targets are the full names of what was loaded,
    # so that merge and apply adapt exactly those layers.
    chosen = (tuple(sorted({k.rsplit(".", 1)[0] for k in adapters})) if spec.get("layers_to_transform") is not None
              else tuple(ours[t] for t in targets))
    config = LoraConfig(rank=int(spec["r"]), alpha=float(spec["lora_alpha"]),
                        dropout=float(spec.get("lora_dropout") or 0.0), targets=chosen,
                        rslora=bool(spec.get("use_rslora", False)))
    return adapters, config
