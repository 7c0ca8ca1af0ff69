"""Hugging Face folders in and out: ``config.json``, safetensors weights, the tokenizer.

    model, params, tok = load_pretrained("path/to/SmolLM2-135M")      # no network, no transformers
    ...train...
    save_pretrained("out/folder", model, params, tok)                  # AutoModelForCausalLM loads it

Families read: ``LlamaForCausalLM`` (Llama 2/3, including Llama 3's ``llama3``
rope scaling; SmolLM2 is one), ``MistralForCausalLM``, ``Qwen2ForCausalLM``
(biases on q/k/v) and ``Qwen3ForCausalLM`` (an RMSNorm on each query and key
head, an explicit ``head_dim``). They are all the same decoder as
:mod:`minillm_func.model` -- pre-norm RMSNorm, rotary positions in the
rotate-half convention, grouped-query attention, a SwiGLU MLP -- so loading is
a renaming of tensors plus a mapping of configuration fields
(:func:`config_from_hf`). Anything the decoder does not compute (another
``model_type``, mixture-of-experts layers, a sliding window narrower than the
sequences, another activation, MLP biases) is refused with a message naming
the field, never approximated. ``config.json`` is read in both the layout of
transformers 5 (``rope_parameters``) and the older one (``rope_theta`` and
``rope_scaling``, whose key may be ``type``).

Weights: ``model.safetensors``, or the shards that ``model.safetensors.index.json``
lists. Each tensor is read from the memory-mapped file and renamed on its own,
so loading holds one copy of the weights (plus one tensor while ``dtype``
converts it). Tensors keep their stored dtype (a bf16 checkpoint loads as bf16)
unless ``dtype`` says otherwise.

Writing (:func:`save_pretrained`) produces what transformers writes:
``config.json`` (with the older rope keys, which every transformers version
reads), ``generation_config.json``, safetensors weights sharded above
``max_shard_size`` with an index, and the tokenizer's files. Our own models
(the library's default config) are exported as ``LlamaForCausalLM``: the same
computation, with the embedding rows padded to a multiple of 64 kept as vocabulary
rows that no token id reaches.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from .model import Model, ModelConfig, build_model

__all__ = ["load_pretrained", "save_pretrained", "config_from_hf", "config_to_hf", "load_tokenizer",
           "HFError", "SUPPORTED"]

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM"}
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"

# Our param names <-> Hugging Face's, per block and outside the blocks.
_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
          "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
          "attn.wo": "self_attn.o_proj", "attn.q_norm.weight": "self_attn.q_norm.weight",
          "attn.k_norm.weight": "self_attn.k_norm.weight", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
          "mlp.w2": "mlp.down_proj"}
_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
# Buffers some checkpoints carry that the decoder recomputes (rotary frequencies).
_IGNORED = re.compile(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")


class HFError(ValueError):
    """A Hugging Face folder that cannot be read (or written) as asked; the message says what to do."""


# --------------------------------------------------------------------------- names


def _rename(name: str, top: dict, block: dict, prefix: str, new_prefix: str) -> str | None:
    """``name`` through the tables: ``top`` for names outside the blocks, ``block`` for a block's
    param after ``prefix<i>.`` (and its ``.weight``/``.bias`` suffix); None when no entry matches."""
    if name in top:
        return top[name]
    m = re.fullmatch(re.escape(prefix) + r"(\d+)\.(.+)", name)
    if m:
        for a, b in block.items():
            if m[2] == a or m[2].startswith(a + "."):
                return f"{new_prefix}{m[1]}.{b}{m[2][len(a):]}"
    return None


def hf_name(ours: str) -> str:
    """``layers.3.attn.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (and so on)."""
    name = _rename(ours, _TOP, _BLOCK, "layers.", "model.layers.")
    if name is None:
        raise HFError(f"no Hugging Face name for the param {ours!r}.")
    return name


def our_name(hf: str) -> str | None:
    """The inverse of :func:`hf_name`; None for a name the decoder has no param for."""
    return _rename(hf, {b: a for a, b in _TOP.items()}, {b: a for a, b in _BLOCK.items()}, "model.layers.", "layers.")


# --------------------------------------------------------------------------- config


def _refuse(field: str, value, why: str, path) -> HFError:
    return HFError(f"{path}: {field} = {json.dumps(value)} is not supported: {why}.")


def _rope(hf: dict, path) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from either config layout, scaling normalised to ``rope_type``."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        scaling = dict(hf.get("rope_scaling") or {})
        theta = float(hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
        scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return theta, None
    if kind not in ("llama3", "linear"):
        raise _refuse("rope_type", kind, "the decoder computes the default, llama3 and linear rotary "
                      "frequencies only", path)
    return theta, scaling


def config_from_hf(hf: dict, *, path="config.json", max_seq_len: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` dict, or an :class:`HFError` naming the field.

    ``max_seq_len`` caps the positions the model accepts (default:
    ``max_position_embeddings``, or a Mistral sliding window narrower than it: within
    the window, sliding-window attention is full attention).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise _refuse("model_type", model_type, f"the families read are {', '.join(SUPPORTED)} "
                      f"({', '.join(SUPPORTED.values())})", path)
    for field in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(field):
            raise _refuse(field, hf[field], "mixture-of-experts layers are not part of the decoder", path)
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU (silu)", path)
    if hf.get("mlp_bias"):
        raise _refuse("mlp_bias", True, "the MLP has no biases", path)
    if hf.get("pretraining_tp", 1) not in (1, None):
        warnings.warn(f"{path}: pretraining_tp = {hf['pretraining_tp']} is ignored (it only changes how "
                      "transformers splits the matmuls, not the result).")
    positions = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if hf.get("use_sliding_window"):
            raise _refuse("use_sliding_window", True, "sliding-window attention on some layers is not part of "
                          "the decoder (Qwen checkpoints ship it switched off)", path)
    elif window is not None and int(window) < positions:
        warnings.warn(f"{path}: sliding_window = {window} is narrower than max_position_embeddings = {positions}; "
                      f"sequences are limited to {window} tokens, where sliding-window attention is full attention.")
        positions = int(window)
    theta, scaling = _rope(hf, path)
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    bias = bool(hf.get("attention_bias", False))
    tie = hf.get("tie_word_embeddings")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        max_seq_len=min(positions, max_seq_len) if max_seq_len else positions,
        intermediate_size=int(hf["intermediate_size"]),
        head_size=int(head_dim) if head_dim and int(head_dim) != dim // heads else None,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(tie) if tie is not None else True,
        qkv_bias=bias or model_type == "qwen2", out_bias=bias and model_type != "qwen2",
        qk_norm=model_type == "qwen3", vocab_multiple=1)


def model_type_of(cfg: ModelConfig) -> str:
    """The family a config is written as: qwen3 (q/k norm), qwen2 (q/k/v biases only), else llama."""
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    return "llama"


def config_to_hf(cfg: ModelConfig, *, model_type: str | None = None, dtype: torch.dtype = torch.float32,
                 tokenizer=None) -> dict:
    """The ``config.json`` dict transformers reads back as ``cfg`` (``model_type``: default from the config)."""
    model_type = model_type or model_type_of(cfg)
    if model_type not in SUPPORTED:
        raise HFError(f"config_to_hf: model_type must be one of {', '.join(SUPPORTED)}, got {model_type!r}.")
    if model_type == "qwen2" and (cfg.out_bias or not cfg.qkv_bias or cfg.qk_norm):
        raise HFError("config_to_hf: qwen2 has biases on q/k/v only and no q/k norm; choose another model_type.")
    if model_type != "qwen3" and cfg.qk_norm:
        raise HFError("config_to_hf: a model with q/k norm is written as qwen3.")
    if model_type in ("llama", "mistral") and cfg.qkv_bias != cfg.out_bias:
        raise HFError(f"config_to_hf: {model_type}'s attention_bias covers q, k, v and o together; this model has "
                      "biases on some only (write it as qwen2).")
    out = {
        "architectures": [SUPPORTED[model_type]], "model_type": model_type,
        "vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if model_type in ("llama", "mistral", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if model_type == "mistral":
        out["sliding_window"] = None
    if tokenizer is not None:
        out.update(bos_token_id=getattr(tokenizer, "bos_id", None), eos_token_id=getattr(tokenizer, "eos_id", None),
                   pad_token_id=getattr(tokenizer, "pad_id", None))
    return out


# --------------------------------------------------------------------------- load


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise HFError(f"{file} is missing: a Hugging Face model folder holds {CONFIG_FILE}, {WEIGHTS_FILE} (or "
                      f"{INDEX_FILE} and its shards) and the tokenizer's files.")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise HFError(f"{file} is not valid JSON ({e}).") from None
    if not isinstance(value, dict):
        raise HFError(f"{file} should hold a JSON object.")
    return value


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing or not names:
            raise HFError(f"{index} lists shards that are missing: {', '.join(missing[:3]) or 'none listed'}; "
                          "copy the whole folder.")
        return [folder / n for n in names]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise HFError(f"{folder} holds PyTorch pickle weights (*.bin) only; they are not read (pickle runs code). "
                      "Convert them to safetensors first, e.g. with transformers: "
                      "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder).")
    raise HFError(f"{folder} has no {WEIGHTS_FILE} and no {INDEX_FILE}: no weights to load.")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """``({name: {"dtype", "shape", "data_offsets"}}, start of the data)`` of a safetensors file."""
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= 100 * 2**20:
            raise HFError(f"{file} is not a safetensors file (its header length is unreadable); is it damaged?")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise HFError(f"{file} has a damaged safetensors header.") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(f, file: Path, name: str, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor read straight into its own buffer (no memory map: the file's pages are not held)."""
    if entry.get("dtype") not in _DTYPES:
        raise HFError(f"{file}: {name} has the dtype {entry.get('dtype')!r}, which is not read.")
    start, end = entry["data_offsets"]
    buffer = bytearray(end - start)
    f.seek(data_start + start)
    if f.readinto(buffer) != len(buffer):
        raise HFError(f"{file} is truncated: {name} ends past the end of the file. Copy the file again.")
    dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def load_pretrained(path, *, dtype: torch.dtype | None = None, max_seq_len: int | None = None,
                    tokenizer: bool = True):
    """``(model, params, tokenizer)`` from a local Hugging Face folder; never touches the network.

    ``dtype``: convert the weights to it (default: as stored). ``max_seq_len``: cap
    the positions (default: the config's). ``tokenizer=False`` skips the tokenizer
    (returns None for it). Example::

        model, params, tok = load_pretrained("SmolLM2-135M-Instruct")
        ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        logits = model.apply(params, torch.tensor([ids]))
    """
    folder = Path(path)
    if not folder.is_dir():
        raise HFError(f"{folder}: no such model folder (a Hugging Face folder with {CONFIG_FILE} and weights).")
    hf = _read_json(folder / CONFIG_FILE)
    headers = {file: _safetensors_header(file) for file in _weight_files(folder)}
    if hf.get("tie_word_embeddings") is None:  # older configs leave it to the class default: ask the weights
        hf = {**hf, "tie_word_embeddings": not any("lm_head.weight" in h for h, _ in headers.values())}
    cfg = config_from_hf(hf, path=folder / CONFIG_FILE, max_seq_len=max_seq_len)
    model = build_model(cfg)
    expected = {name: tuple(p.shape) for name, p in model.module.named_parameters()}
    params, unknown = {}, []
    for file, (header, data_start) in headers.items():
        with open(file, "rb") as f:
            for name, entry in header.items():
                ours = our_name(name)
                if ours is None or ours not in expected:
                    if not _IGNORED.fullmatch(name) and not (name == "lm_head.weight" and cfg.tie_embeddings):
                        unknown.append(name)
                    continue
                if tuple(entry.get("shape", ())) != expected[ours]:
                    raise HFError(f"{file}: {name} has shape {tuple(entry.get('shape', ()))}, but {CONFIG_FILE} "
                                  f"implies {expected[ours]}; the weights do not belong to this config.")
                t = _read_tensor(f, file, name, entry, data_start)
                params[ours] = t if dtype is None or t.dtype == dtype else t.to(dtype)
    if unknown:
        raise HFError(f"{folder}: tensors the decoder has no place for: {', '.join(unknown[:4])}"
                      f"{' ...' if len(unknown) > 4 else ''}; the checkpoint is not a plain {cfg_name(cfg)}.")
    missing = [n for n in expected if n not in params]
    if missing:
        raise HFError(f"{folder}: the weights lack {', '.join(hf_name(n) for n in missing[:4])}"
                      f"{' ...' if len(missing) > 4 else ''}; is a shard missing?")
    params = {name: params[name] for name in expected}  # the module's order
    tok = load_tokenizer(folder) if tokenizer else None
    return model, params, tok


def cfg_name(cfg: ModelConfig) -> str:
    return SUPPORTED[model_type_of(cfg)]


def load_tokenizer(path):
    """The :class:`~minillm_func.data.HFTokenizer` of a folder (``tokenizer.json`` + ``tokenizer_config.json``)."""
    from .data import HFTokenizer

    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise HFError(f"{folder} has no tokenizer.json; pass tokenizer=False to load the weights alone, or copy "
                      "the tokenizer's files (tokenizer.json, tokenizer_config.json) into the folder.")
    return HFTokenizer.from_folder(folder)


# --------------------------------------------------------------------------- save


def _shard_bytes(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B\s*", str(size).upper())
    if not m:
        raise HFError(f"save_pretrained: max_shard_size must be bytes or like '5GB', '500MB', got {size!r}.")
    return int(float(m[1]) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m[2]])


def save_pretrained(path, model: Model, params: dict, tokenizer=None, *, model_type: str | None = None,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """Write ``params`` as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads offline.

    ``model_type``: the family to write (default: llama, or qwen2/qwen3 when the
    config has their features; a model loaded as mistral may be written as mistral).
    ``tokenizer``: written too when it can (``save_pretrained(folder)``).
    Weights above ``max_shard_size`` are split into ``model-0000i-of-0000n.safetensors``
    shards with an index, as transformers does. ``dtype``: convert on the way out
    (default: as they are). Returns the folder.
    """
    from safetensors.torch import save_file

    cfg = model.config
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    expected = [name for name, _ in model.module.named_parameters()]
    missing = [n for n in expected if n not in params]
    if missing:
        raise HFError(f"save_pretrained: params lack {', '.join(missing[:4])}; pass the full params of the model "
                      "(for LoRA, merge the adapters first).")
    tensors = {hf_name(n): (params[n] if dtype is None else params[n].to(dtype)).detach().to("cpu").contiguous()
               for n in expected}
    out_dtype = next(iter(tensors.values())).dtype
    hf = config_to_hf(cfg, model_type=model_type, dtype=out_dtype, tokenizer=tokenizer)
    limit = _shard_bytes(max_shard_size)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    for old in list(folder.glob("model*.safetensors")) + [folder / INDEX_FILE]:
        if old.exists():
            old.unlink()  # an earlier export's shards would confuse the index
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    (folder / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    eos_ids = list(getattr(tokenizer, "eos_ids", ()) or ())
    if len(eos_ids) > 1:
        gen["eos_token_id"] = eos_ids
    (folder / GENERATION_FILE).write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise HFError(f"save_pretrained: the tokenizer {tokenizer!r} cannot write Hugging Face files.")
        tokenizer.save_pretrained(folder)
    return folder

