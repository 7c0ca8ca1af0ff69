"""The ``minillm-func`` command.

    minillm-func demo [--out runs/demo]                   # pretrain -> SFT -> DPO on the built-in corpus
    minillm-func train {pretrain,sft,dpo,orpo,kto,grpo} --data FILE --out DIR [--init RUN | --model HF_DIR] [--resume]
    minillm-func generate (--ckpt RUN | --model HF_DIR) --prompt TEXT [--chat] [--max-new-tokens N] ...
    minillm-func eval (--ckpt RUN | --model HF_DIR) --data FILE [--kind pretrain|sft|dpo]
    minillm-func export --ckpt RUN --out HF_DIR [--peft]       # a Hugging Face folder transformers loads
    minillm-func prepare --data FILES_OR_FOLDERS... --tokenizer byte|bpe:VOCAB|PATH --out TOKENS_DIR

``prepare`` tokenises a corpus once into token shards (see :mod:`minillm_func.data.shards`);
``train pretrain --data TOKENS_DIR`` then trains on it without loading it, with the
tokenizer the shards were made with. An interrupted ``prepare`` continues when run again.

``train grpo --data prompts.jsonl --rewards exact_match`` trains on ``{"prompt", "answer"}``
records by sampling ``--num-generations`` completions per prompt and rewarding them.

``train ... --lora-rank R [--lora-alpha A] [--lora-targets wq,wv]`` trains LoRA
adapters over the frozen ``--init``/``--model`` (checkpoints hold the adapters;
``generate``, ``eval`` and ``export`` merge them into that base, ``export --peft``
writes them as a PEFT adapter folder).

Settings for ``train`` come from flags and/or a TOML or JSON file (``--config``;
flags win). They are all checked before any data is read, and the settings the
run really uses (defaults resolved: learning rate, schedule, ``T_max``, model
shape, tokenizer) are written to ``DIR/config.json``. ``--resume`` reads them
back: only what is safe to change mid-run (``--steps``, ``--epochs``, cadences,
``--keep-last``, ``--threads``...) may be given again with another value.

Checkpoints go to ``DIR/checkpoints/step-NNNNNN/`` (the newest ``--keep-last``
are kept); wherever a checkpoint is expected (``--init``, ``--ckpt``) a run
folder works and means its newest complete checkpoint.

Every expected error (bad settings, bad data, a bad checkpoint, a missing file,
a full disk, a failed peer) is one line on stderr, ``minillm-func: error: ...``,
with exit code 2 for usage errors and 1 for the rest; ``--debug`` (or
``MINILLM_DEBUG=1``) shows the traceback instead.

``train`` runs data-parallel when launched by ``torchrun`` (``WORLD_SIZE`` > 1):
``--batch-size`` is then the global micro-batch, split over the processes, so
the run takes the same updates as one process; rank 0 logs and writes. See
``docs/distributed.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

from .stages import KINDS, default_learning_rate

__all__ = ["main", "UsageError", "TRAIN_SETTINGS"]

PROG = "minillm-func"
DEFAULT_STEPS = 1000
DEFAULT_MAX_LENGTH = 256
DEFAULT_HF_MAX_LENGTH = 1024
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DEFAULT_SHAPE = {"dim": 256, "n_layers": 4, "n_heads": 4}


class UsageError(ValueError):
    """A flag, setting or config file that cannot be used as given (exit code 2)."""


# name -> (default, type, help). A default of None is resolved from the others (see _resolve).
TRAIN_SETTINGS = {
    "steps": (None, int, f"optimizer updates to train for (default: {DEFAULT_STEPS}, or as many as --epochs make)"),
    "epochs": (None, int, "passes over the training data, instead of --steps"),
    "batch_size": (16, int, "sequences (or pairs) per micro-batch"),
    "accumulation_steps": (1, int, "micro-batches per optimizer update"),
    "max_length": (None, int, f"tokens per sequence (default: {DEFAULT_MAX_LENGTH}; the --init model's limit; "
                              f"with --model, up to {DEFAULT_HF_MAX_LENGTH})"),
    "learning_rate": (None, float, "peak learning rate (default: 1e-4; 5e-5 for sft)"),
    "weight_decay": (0.01, float, "AdamW weight decay"),
    "max_grad_norm": (1.0, float, "global-norm clipping (0: none)"),
    "optimizer": ("adamw", str, "adamw; muon (Muon on the blocks' matrices, AdamW at --adam-learning-rate on "
                                "embeddings, head and norms; --learning-rate default 0.02); or schedule_free "
                                "(schedule-free AdamW: no decay schedule, evaluated at its average)"),
    "adam_learning_rate": (None, float, "with --optimizer muon: the AdamW part's learning rate (default: the "
                                        "stage's AdamW default)"),
    "schedule": (None, str, "'cosine' (torch's CosineAnnealingLR over T_max), 'warmup_cosine', 'wsd' (warm-up, "
                            "stable, linear cool-down over the last 20%%), 'linear' (decay to 0) or 'constant' "
                            "(schedule_free's only one); "
                            "(default: warmup_cosine when --warmup-steps > 0, else cosine)"),
    "T_max": (None, int, "cosine annealing period (default: the run's number of updates)"),
    "warmup_steps": (0, int, "linear warm-up updates; > 0 selects warmup_cosine"),
    "precision": ("fp32", str, "fp32 or bf16 (fp16 needs a CUDA GPU)"),
    "beta": (None, float, "DPO beta (default 0.1); GRPO: the weight of the KL term to the initial model "
                          "(default 0.0: none)"),
    "loss_type": (None, str, "DPO loss type (default sigmoid; ipo, simpo, ... every TRL type), or a comma-"
                             "separated list of them combined, e.g. sigmoid,sft (RPO); GRPO: grpo, bnpo, dr_grpo or "
                             "dapo (default)"),
    "loss_weights": (None, str, "DPO: comma-separated weights of the --loss-type list (default: all 1)"),
    "label_smoothing": (0.0, float, "DPO label smoothing"),
    "rewards": ("exact_match", str, "GRPO reward functions, comma-separated: exact_match (the record's 'answer'), "
                                    "format:REGEX (the whole completion matches)"),
    "num_generations": (8, int, "GRPO: completions sampled per prompt"),
    "max_completion_length": (32, int, "GRPO: most tokens per sampled completion"),
    "temperature": (1.0, float, "GRPO: sampling temperature"),
    "top_p": (None, float, "GRPO: nucleus sampling (default: off)"),
    "scale_rewards": ("group", str, "GRPO: divide advantages by the std of the group, the batch, or none"),
    "epsilon": (0.2, float, "GRPO: clipping range of the importance ratio"),
    "epsilon_high": (None, float, "GRPO: upper clipping range (default: --epsilon; DAPO uses 0.28)"),
    "importance_sampling_level": ("token", str, "GRPO: token, or sequence (GSPO)"),
    "precompute_reference": (False, bool, "DPO: compute reference log-probs once, keep no reference model"),
    "pack": (None, bool, "pretraining: join documents into full blocks (default: on); sft, dpo, orpo: padding-free "
                         "packing, several whole examples per row of --max-length tokens (2 x --max-length for "
                         "pairs), positions restarting at each, no attention across them; --batch-size then "
                         "counts rows (default: off)"),
    "eval_data": (None, str, "held-out file, evaluated at step 0 and every --eval-every updates"),
    "eval_every": (None, int, "evaluate every N updates (default with --eval-data: a tenth of the run)"),
    "checkpoint_every": (0, int, "checkpoint every N updates (0: only at the end)"),
    "keep_last": (3, int, "checkpoints kept in DIR/checkpoints"),
    "max_skipped": (100, int, "stop after this many consecutive non-finite updates"),
    "seed": (0, int, "seed for the model init and the data order"),
    "dim": (None, int, f"model width (new models; default {DEFAULT_SHAPE['dim']})"),
    "n_layers": (None, int, f"transformer blocks (new models; default {DEFAULT_SHAPE['n_layers']})"),
    "n_heads": (None, int, f"attention heads (new models; default {DEFAULT_SHAPE['n_heads']})"),
    "tokenizer": (None, str, "byte, bpe:VOCAB (trained on --data), PATH/tokenizer.json or a Hugging Face "
                             "folder's tokenizer (new models; default byte)"),
    "dtype": (None, str, "with --model: load the weights as fp32 or bf16 (default: as stored)"),
    "lora_rank": (0, int, "train LoRA adapters of this rank over the frozen --init/--model (0: full fine-tune)"),
    "lora_alpha": (None, float, "LoRA scale numerator: the update is alpha/rank * B A (default: 2 * rank)"),
    "lora_targets": ("wq,wk,wv,wo,w1,w2,w3", str, "comma-separated linear layers LoRA adapts (name suffixes)"),
    "lora_dropout": (0.0, float, "LoRA dropout on the adapters' input while training"),
    "compile": (False, bool, "wrap the train step in torch.compile"),
    "threads": (None, int, "CPU threads for torch (default: torch's choice; 1 is best on a busy machine)"),
    "dist_timeout": (60.0, float, "seconds a data-parallel peer may stay silent before the run stops"),
}

# config.json's settings_version: 2 from when `pack` also meant padding-free packing of SFT and DPO data.
SETTINGS_VERSION = 2
OPTIMIZERS = ("adamw", "muon", "schedule_free")
SCHEDULES = ("cosine", "warmup_cosine", "wsd", "linear", "constant")

# Settings that mean something for some stages only: given for another stage, they are refused.
STAGE_ONLY = {
    "loss_type": ("dpo", "grpo"), "loss_weights": ("dpo",), "label_smoothing": ("dpo",),
    "precompute_reference": ("dpo",), "beta": ("dpo", "orpo", "kto", "grpo"),
    "pack": ("pretrain", "sft", "dpo", "orpo"),
    **{name: ("grpo",) for name in ("rewards", "num_generations", "max_completion_length", "temperature", "top_p",
                                     "scale_rewards", "epsilon", "epsilon_high", "importance_sampling_level")},
}

# Settings a resumed run may change: they do not alter the model, the data order or the update rule.
RESUME_SAFE = {"steps", "epochs", "eval_data", "eval_every", "checkpoint_every", "keep_last", "max_skipped",
               "compile", "threads", "dist_timeout"}
_MODEL_SHAPE = ("dim", "n_layers", "n_heads")
# What config.json records as the tokenizer of a run that starts from a model.
_FROM_SOURCE = {"--init": "checkpoint", "--model": "model"}


# --------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``minillm-func: error: ... (see minillm-func train --help)``."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks (also: MINILLM_DEBUG=1)")
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], parents=[common])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", parents=[common],
                       help="pretrain -> SFT -> DPO a small model on the built-in corpus (~5 min on a CPU)")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a few steps per stage, to check the installation")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--threads", type=int, help="CPU threads for torch (1 is best on a busy machine)")

    t = sub.add_parser("train", parents=[common], help="train one stage on your own file")
    t.add_argument("kind", choices=KINDS)
    t.add_argument("--data", help="JSON Lines or .txt file, or a token folder made by `prepare` (pretraining) "
                                  "(with --resume: default, the run's own)")
    t.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, config.json")
    t.add_argument("--init", help="start from this run folder's newest checkpoint (or a checkpoint folder)")
    t.add_argument("--model", help="start from a Hugging Face model folder (config.json, safetensors weights, "
                                   "tokenizer files); nothing is downloaded")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--config", help="TOML or JSON file of the settings below")
    t.add_argument("--no-progress", action="store_true")
    for name, (default, kind, text) in TRAIN_SETTINGS.items():
        shown = "" if default is None else f" (default: {default})"
        flag = dict(nargs="?", const=True) if kind is bool else {}  # `--pack` alone means true
        t.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_bool if kind is bool else kind,
                       default=None, help=text + shown, **flag)

    g = sub.add_parser("generate", parents=[common], help="sample from a checkpoint or a Hugging Face folder")
    _model_source(g)
    g.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the tokenizer's chat template")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for a batch); \\n and \\t are read as newline and tab, \\\\ as \\")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint or a Hugging Face folder on a file")
    _model_source(e)
    e.add_argument("--data", required=True)
    e.add_argument("--kind", choices=KINDS,
                   help="score as this stage (default: the checkpoint's own; with --model, the data's)")
    e.add_argument("--ref", help="DPO reference checkpoint (default: the one the run was trained against)")
    e.add_argument("--batch-size", type=int, default=32)

    x = sub.add_parser("export", parents=[common], help="write a checkpoint as a Hugging Face folder")
    x.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    x.add_argument("--out", required=True, help="the folder to write (config.json, safetensors, tokenizer)")
    x.add_argument("--dtype", choices=sorted(DTYPES), help="convert the weights (default: as trained)")
    x.add_argument("--max-shard-size", default="5GB", help="split the weights above this size (default: 5GB)")
    x.add_argument("--merge", action="store_true",
                   help="a LoRA run: merge the adapters into the base model (what export does by default)")
    x.add_argument("--peft", action="store_true",
                   help="a LoRA run: write the adapters alone as a PEFT folder (adapter_config.json, "
                        "adapter_model.safetensors)")

    r = sub.add_parser("prepare", parents=[common],
                       help="tokenise a corpus once into token shards (train pretrain --data TOKENS_DIR reads them)")
    r.add_argument("--data", nargs="+", required=True,
                   help="files or folders (read recursively): .txt, .jsonl (also .gz), .parquet, .arrow, "
                        "datasets.save_to_disk folders")
    r.add_argument("--tokenizer", default="byte",
                   help="byte, bpe:VOCAB (trained on the first --bpe-sample-mb of the data), PATH/tokenizer.json "
                        "or a Hugging Face folder's tokenizer (default: byte)")
    r.add_argument("--out", required=True, help="the token folder to write (index.json, shard-*.bin)")
    r.add_argument("--shard-tokens", type=int, default=None,
                   help="tokens per shard, about (default: 67108864, 128 MB of uint16)")
    r.add_argument("--text-field", default="text", help="the field (JSON Lines) or column holding the text")
    r.add_argument("--bpe-sample-mb", type=float, default=None,
                   help="with --tokenizer bpe:VOCAB: MB of text the BPE is trained on (default: 100)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _model_source(p) -> None:
    """``--ckpt RUN`` or ``--model HF_DIR`` (exactly one), for the commands that only read a model."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="a run folder (its newest checkpoint) or a checkpoint folder")
    which.add_argument("--model", help="a Hugging Face model folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="with --model: load the weights as this dtype")


# --------------------------------------------------------------------------- settings


def _given_settings(args) -> tuple[dict, str]:
    """The settings the user gave (config file, then flags), and where they came from, for messages."""
    given, source = {}, "the flags"
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"no config file at {path}.")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".toml":
                import tomllib
                loaded = tomllib.loads(text)
            else:
                loaded = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: "
                             f"{_one_line(e)}.") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{path} must hold a table of settings, e.g. `steps = 100`.")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(TRAIN_SETTINGS))
        if unknown:
            raise UsageError(f"unknown settings in {path}: {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(TRAIN_SETTINGS))}.")
        for name, value in loaded.items():
            _check_type(name, value, f"in {path}")
        given.update(loaded)
        source = f"{path} and the flags"
    given.update({k: v for k, v in vars(args).items() if k in TRAIN_SETTINGS and v is not None})
    return given, source


def _check_type(name: str, value, where: str) -> None:
    kind = TRAIN_SETTINGS[name][1]
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, str))
    if value is not None and not ok:
        want = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}[kind]
        raise UsageError(f"{name} must be {want}, got {value!r} ({where}).")


def _reward_specs(text: str) -> list[str]:
    """``--rewards``: names separated by commas; a comma inside a ``format:`` regex stays in it."""
    return [r.strip() for r in re.split(r",(?=\s*(?:exact_match\b|format:))", str(text)) if r.strip()]


def _loss_types(text: str) -> str | list[str]:
    """``--loss-type``: one name, or a comma-separated list of them."""
    types = [t.strip() for t in str(text).split(",") if t.strip()]
    return types[0] if len(types) == 1 else types


def _loss_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--loss-weights must be comma-separated numbers, e.g. 1,0.5; got {text!r}.") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _validate(s: dict, kind: str) -> None:
    """Refuse settings that cannot mean what they say; run before any data is read."""
    import torch

    from .losses import DPO_LOSS_TYPES, dpo_loss

    def need(cond, message):
        if not cond:
            raise UsageError(message)

    for name in ("steps", "epochs", "batch_size", "accumulation_steps", "T_max", "keep_last", "max_skipped",
                 "eval_every", "threads"):
        v = s.get(name)
        need(v is None or v >= 1, f"{_flag(name)} must be a whole number >= 1, got {v}.")
    for name in ("warmup_steps", "checkpoint_every", "seed"):
        need(s[name] >= 0, f"{_flag(name)} must be >= 0, got {s[name]}.")
    need(s["max_length"] >= 2, f"--max-length must be at least 2 (an input and its target), got {s['max_length']}.")
    lr = s["learning_rate"]
    need(math.isfinite(lr) and lr > 0,
         f"--learning-rate must be a positive, finite number, got {lr} (a negative rate would ascend the loss).")
    for name in ("weight_decay", "max_grad_norm"):
        need(math.isfinite(s[name]) and s[name] >= 0, f"{_flag(name)} must be a finite number >= 0, got {s[name]}.")
    need(math.isfinite(s["dist_timeout"]) and s["dist_timeout"] > 0,
         f"--dist-timeout must be a positive number of seconds, got {s['dist_timeout']}.")
    need(s["optimizer"] in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {s['optimizer']!r}.")
    need(s["schedule"] in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {s['schedule']!r}.")
    need(s["optimizer"] != "schedule_free" or s["schedule"] == "constant",
         f"--optimizer schedule_free replaces the decay schedule (its warm-up is --warmup-steps); drop "
         f"--schedule {s['schedule']}.")
    need(s["adam_learning_rate"] is None or s["optimizer"] == "muon",
         "--adam-learning-rate sets the AdamW part of --optimizer muon; add --optimizer muon or drop it.")
    need(s["adam_learning_rate"] is None or (math.isfinite(s["adam_learning_rate"]) and s["adam_learning_rate"] > 0),
         f"--adam-learning-rate must be a positive, finite number, got {s['adam_learning_rate']}.")
    need(not (s["schedule"] in ("cosine", "linear") and s["warmup_steps"] > 0),
         f"--warmup-steps {s['warmup_steps']} needs a schedule with a warm-up (warmup_cosine, wsd, constant), but "
         f"--schedule {s['schedule']} was given; drop --schedule (warm-up selects warmup_cosine) or --warmup-steps.")
    need(s["schedule"] == "cosine" or s["warmup_steps"] < s["steps"],
         f"--warmup-steps ({s['warmup_steps']}) must be smaller than the run's {s['steps']} updates.")
    need(s["precision"] in ("fp32", "bf16", "fp16"),
         f"--precision must be fp32, bf16 or fp16, got {s['precision']!r}.")
    need(s["precision"] != "fp16",
         "--precision fp16 needs a CUDA GPU (loss-scaled float16), and this command trains on the CPU; "
         "use --precision bf16 (or fp32).")
    if kind == "dpo":
        types = _loss_types(s["loss_type"])
        types = [types] if isinstance(types, str) else types
        unknown = [t for t in types if t not in DPO_LOSS_TYPES]
        need(not unknown, f"--loss-type must be one (or a comma-separated list) of {', '.join(DPO_LOSS_TYPES)}, "
                          f"got {unknown[0] if unknown else ''!r}.")
        weights = _loss_weights(s["loss_weights"])
        need(weights is None or len(weights) == len(types),
             f"--loss-weights gives {len(weights or ())} weights for the {len(types)} loss types of --loss-type.")
        try:  # the loss's own checks (a hyper-parameter out of its range for this type, ...)
            one = torch.ones(1)
            dpo_loss(-one, -2 * one, -one, -2 * one, chosen_counts=one, rejected_counts=one, beta=s["beta"],
                     loss_type=types, loss_weights=weights, label_smoothing=s["label_smoothing"])
        except ValueError as e:
            need(False, f"--loss-type {s['loss_type']}: {_one_line(e)}")
        need(math.isfinite(s["beta"]) and s["beta"] > 0, f"--beta must be a positive number, got {s['beta']}.")
        need(0 <= s["label_smoothing"] < 0.5, f"--label-smoothing must lie in [0, 0.5), got {s['label_smoothing']}.")
    if kind in ("orpo", "kto"):
        need(math.isfinite(s["beta"]) and s["beta"] > 0, f"--beta must be a positive number, got {s['beta']}.")
    if kind == "grpo":
        from .losses import GRPO_LOSS_TYPES
        from .rl import reward_by_name

        need(s["loss_type"] in GRPO_LOSS_TYPES,
             f"--loss-type for grpo must be one of {', '.join(GRPO_LOSS_TYPES)}, got {s['loss_type']!r}.")
        need(math.isfinite(s["beta"]) and s["beta"] >= 0, f"--beta (the KL weight) must be >= 0, got {s['beta']}.")
        need(s["num_generations"] >= 2, f"--num-generations must be >= 2 (advantages compare the completions "
                                        f"of one prompt), got {s['num_generations']}.")
        need(1 <= s["max_completion_length"] < s["max_length"],
             f"--max-completion-length must lie in [1, --max-length) so a prompt fits beside it, got "
             f"{s['max_completion_length']} with --max-length {s['max_length']}.")
        need(math.isfinite(s["temperature"]) and s["temperature"] > 0,
             f"--temperature must be positive (GRPO samples), got {s['temperature']}.")
        need(s["top_p"] is None or 0 < s["top_p"] <= 1, f"--top-p must lie in (0, 1], got {s['top_p']}.")
        need(s["scale_rewards"] in ("group", "batch", "none"),
             f"--scale-rewards must be group, batch or none, got {s['scale_rewards']!r}.")
        need(0 <= s["epsilon"] < 1, f"--epsilon must lie in [0, 1), got {s['epsilon']}.")
        need(s["epsilon_high"] is None or s["epsilon_high"] >= 0, f"--epsilon-high must be >= 0, got {s['epsilon_high']}.")
        need(s["importance_sampling_level"] in ("token", "sequence"),
             f"--importance-sampling-level must be token or sequence, got {s['importance_sampling_level']!r}.")
        for spec in _reward_specs(s["rewards"]):
            try:
                reward_by_name(spec)
            except ValueError as e:
                need(False, f"--rewards: {_one_line(e)}")
    need(s["lora_rank"] >= 0, f"--lora-rank must be >= 0 (0: no LoRA), got {s['lora_rank']}.")
    if s["lora_rank"]:
        alpha = s["lora_alpha"]
        need(alpha is None or (math.isfinite(alpha) and alpha > 0), f"--lora-alpha must be positive, got {alpha}.")
        need(0 <= s["lora_dropout"] < 1, f"--lora-dropout must lie in [0, 1), got {s['lora_dropout']}.")
        need(bool([t for t in s["lora_targets"].split(",") if t.strip()]),
             "--lora-targets must name at least one linear layer, e.g. wq,wv.")
    if s["eval_data"] is None:
        need(s.get("eval_every") is None, "--eval-every needs --eval-data FILE (what to evaluate on).")
    for name in ("dim", "n_layers", "n_heads"):
        need(s[name] >= 1, f"{_flag(name)} must be a whole number >= 1, got {s[name]}.")
    need(s["dim"] % s["n_heads"] == 0 and (s["dim"] // s["n_heads"]) % 2 == 0,
         f"--dim {s['dim']} must be a multiple of 2 x --n-heads ({2 * s['n_heads']}): each head needs an even "
         "size for rotary positions.")


def _max_length_limit(dim: int, n_layers: int, vocab: int, batch_size: int) -> int:
    """The longest sequence whose training step fits in half of this machine's memory (a rough estimate).

    Per token, kept for the backward pass in float32: about 24 * dim activations per block,
    and 3 * vocab for the logits, their log-softmax and gradient.
    """
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 * 2**30
    per_token = 4 * (24 * dim * n_layers + 3 * vocab)
    return max(2, memory // 2 // (per_token * batch_size))


def _tokenizer_spec(spec: str):
    """``byte`` | ``bpe:VOCAB`` | a folder | a tokenizer.json path -> (kind, argument), or a usage error."""
    from .data import parse_tokenizer_spec

    try:
        return parse_tokenizer_spec(spec)
    except ValueError as e:
        raise UsageError(f"--tokenizer {e}") from None


# --------------------------------------------------------------------------- checkpoints


def _resolve_checkpoint(path: str | Path, what: str) -> Path:
    from . import checkpoint

    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {path}: no such run or checkpoint folder.")
    return checkpoint.resolve(path)


def _load_checkpoint(path: str | Path, what: str = "--ckpt"):
    """(state, meta, model, tokenizer, folder) of the newest complete checkpoint under ``path``."""
    from . import checkpoint
    from .data import load_tokenizer
    from .model import ModelConfig, build_model

    folder = _resolve_checkpoint(path, what)
    state, meta = checkpoint.load(folder)
    if "model_config" not in meta:
        raise ValueError(f"{folder} holds no model configuration: it was not written by `minillm-func train`.")
    model = build_model(ModelConfig(**meta["model_config"]))
    tok = load_tokenizer(meta.get("tokenizer", {"type": "byte"}))
    if _lora_of(meta) is not None:  # adapters only: the model is the base with them merged in
        state = _Params(_merge_lora(state.params, meta, folder))
    elif hasattr(state, "opt_state"):  # a schedule-free run's model is its average, not the training iterate
        from .optim import evaluation_params
        params = evaluation_params(state.opt_state, state.params)
        if params is not state.params:
            state = _Params(params)
    return state, meta, model, tok, folder


def _lora_of(meta: dict):
    """The LoraConfig a checkpoint's meta records, or None for a full-parameter checkpoint."""
    from .lora import LoraConfig

    spec = (meta.get("trainer_config") or {}).get("lora")
    return LoraConfig(**{**spec, "targets": tuple(spec["targets"])}) if spec else None


def _lora_base(meta: dict, folder) -> dict:
    """The frozen base of a LoRA checkpoint, read from where its run started (checked by fingerprint)."""
    init, hf_model = meta.get("init"), meta.get("hf_model")
    try:
        if init and Path(init).exists():
            base = _load_checkpoint(init, "the run's --init")[0].params
        elif hf_model and Path(hf_model).is_dir():
            base = _load_hf(hf_model, meta.get("hf_dtype"))[1]
        else:
            base = None
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder} holds LoRA adapters and their base model cannot be read: {_one_line(e)}") from None
    if base is None:
        raise UsageError(f"{folder} holds LoRA adapters; their base model ({init or hf_model or 'unknown'}) "
                         "is needed and is not at hand: restore it at that path.")
    _check_base(meta, base, init or hf_model)
    return base


def _merge_lora(adapters: dict, meta: dict, folder) -> dict:
    from .lora import merge

    return merge(_lora_base(meta, folder), adapters, _lora_of(meta))


class _Params(NamedTuple):
    """The one field of a state the start of a run reads: ``params`` (of a Hugging Face folder)."""

    params: dict


def _load_hf(path, dtype: str | None):
    """(model, params, tokenizer, meta) of a Hugging Face folder; meta says where it came from."""
    import torch

    from . import hf

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder (a Hugging Face model folder: config.json, "
                                "model.safetensors, tokenizer.json).")
    model, params, tok = hf.load_pretrained(folder, dtype=getattr(torch, DTYPES[dtype]) if dtype else None)
    model_type = json.loads((folder / hf.CONFIG_FILE).read_text())["model_type"]
    return model, params, tok, {"hf_model": str(folder.resolve()), "hf_model_type": model_type, "hf_dtype": dtype}


# --------------------------------------------------------------------------- train


def _resolve(s: dict, kind: str, init_meta: dict | None, what: str = "--init") -> dict:
    """Fill the settings left to defaults; the result is what config.json records.

    ``init_meta``: the meta of the model the run starts from (``what``: --init or --model), whose
    shape and tokenizer the run takes.
    """
    s = dict(s)
    if s["dtype"] is not None and s["dtype"] not in DTYPES:
        raise UsageError(f"--dtype must be {' or '.join(DTYPES)}, got {s['dtype']!r}.")
    if s["dtype"] is not None and what != "--model":
        raise UsageError("--dtype applies to --model (the dtype a Hugging Face folder is loaded as); drop it.")
    if init_meta is not None:
        shape = init_meta["model_config"]
        for name in _MODEL_SHAPE:
            if s[name] is not None and s[name] != shape[name]:
                raise UsageError(f"{_flag(name)} {s[name]} conflicts with the {what} model, which has "
                                 f"{name} = {shape[name]}; the shape comes from {what}: drop {_flag(name)}.")
            s[name] = shape[name]
        if s["tokenizer"] not in (None, *_FROM_SOURCE.values()):  # the resolved value of a resumed run passes
            raise UsageError(f"--tokenizer conflicts with {what}: the tokenizer comes from {what}; "
                             "drop --tokenizer.")
        if s["max_length"] is None:
            limit = shape["max_seq_len"]
            s["max_length"] = min(limit, DEFAULT_HF_MAX_LENGTH) if what == "--model" else limit
    for name, value in DEFAULT_SHAPE.items():
        s[name] = value if s[name] is None else s[name]
    s["max_length"] = DEFAULT_MAX_LENGTH if s["max_length"] is None else s["max_length"]
    s["tokenizer"] = _FROM_SOURCE[what] if init_meta is not None else (s["tokenizer"] or "byte")
    if s["learning_rate"] is None:
        s["learning_rate"] = 0.02 if s["optimizer"] == "muon" else default_learning_rate(kind)
    if s["optimizer"] == "muon" and s["adam_learning_rate"] is None:
        s["adam_learning_rate"] = default_learning_rate(kind)
    if s["beta"] is None:
        s["beta"] = 0.0 if kind == "grpo" else 0.1
    if s["loss_type"] is None:
        s["loss_type"] = "dapo" if kind == "grpo" else "sigmoid"
    if s["schedule"] is None:
        s["schedule"] = ("constant" if s["optimizer"] == "schedule_free"
                         else "warmup_cosine" if s["warmup_steps"] > 0 else "cosine")
    if s["steps"] is not None and s["epochs"] is not None:
        raise UsageError(f"give --steps ({s['steps']}) or --epochs ({s['epochs']}), not both.")
    return s


def _read_run_config(out: Path) -> dict:
    path = out / "config.json"
    if not path.is_file():
        raise UsageError(f"--resume: {out} holds no run to resume ({path} is missing); start it without --resume.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is corrupted ({_one_line(e)}); start a new run with --init {out}.") from None


def _merge_resumed(saved: dict, given: dict, source: str) -> dict:
    """The run's own settings, with the safe ones that ``given`` changes; any other change is refused."""
    s = {name: saved.get(name, TRAIN_SETTINGS[name][0]) for name in TRAIN_SETTINGS}
    if saved.get("settings_version", 1) < 2 and saved.get("kind") != "pretrain":
        s["pack"] = None  # before version 2, `pack` meant pretraining blocks only: other stages were never packed
    for name, value in given.items():
        if name in RESUME_SAFE:
            s[name] = value
        elif value != s[name]:
            raise UsageError(
                f"{_flag(name)} {value} (from {source}) differs from the run's {s[name]!r} in config.json; a "
                f"resumed run keeps its settings (only {', '.join(_flag(n) for n in sorted(RESUME_SAFE))} may "
                "change). Start a new run from it with --init instead.")
    # config.json holds the resolved number of updates; --epochs or --steps given now replaces it.
    if "epochs" in given and "steps" not in given:
        s["steps"] = None
    else:
        s["epochs"] = None
    return s


def _train(args) -> None:
    import torch

    from . import checkpoint, distributed, schedules
    from .data import Batches, BPETokenizer, is_token_folder, named_tokenizer, read_records
    from .model import ModelConfig, build_model
    from .objectives import add_reference_logps
    from .trainers import create_trainer

    out = Path(args.out)
    given, source = _given_settings(args)
    for name in sorted(given):
        if name in STAGE_ONLY and args.kind not in STAGE_ONLY[name]:
            raise UsageError(f"{_flag(name)} applies to {' and '.join(STAGE_ONLY[name])} training, not "
                             f"{args.kind}; drop it.")
    if given.get("lora_rank") in (None, 0):
        extra = sorted(n for n in given if n.startswith("lora_") and n != "lora_rank")
        if extra:
            raise UsageError(f"{_flag(extra[0])} sets up LoRA, which --lora-rank R (> 0) turns on; add it or drop "
                             f"{_flag(extra[0])}.")
    if args.resume:
        if args.init:
            raise UsageError("--resume continues the run in --out from its own checkpoint; drop --init.")
        saved = _read_run_config(out)
        if saved.get("kind") != args.kind:
            raise UsageError(f"{out} holds a {saved.get('kind')} run; resume it with `train {saved.get('kind')}`.")
        s = _merge_resumed(saved, given, source)
        data_path = args.data or saved.get("data")
        init_path, model_path = saved.get("init"), saved.get("model")
    else:
        if (out / "config.json").exists() and checkpoint.latest(out) is not None:
            raise UsageError(f"{out} already holds a run; add --resume to continue it, or choose another --out.")
        s = {name: given.get(name, default) for name, (default, _, _) in TRAIN_SETTINGS.items()}
        data_path, init_path, model_path = args.data, args.init, args.model
    if not data_path:
        raise UsageError("--data FILE is required (the training data).")
    if init_path and model_path:
        raise UsageError("--init and --model both name the model to start from; give one.")
    if args.resume and args.model:
        raise UsageError("--resume continues the run in --out from its own checkpoint; drop --model.")

    init_state = init_meta = None
    what, hf_meta = ("--model" if model_path else "--init"), {}
    if init_path:
        init_state, init_meta, model, tok, init_folder = _load_checkpoint(init_path, "--init")
        init_path = str(Path(init_folder).resolve())  # absolute: read again from any directory
    elif model_path:
        model, hf_params, tok, hf_meta = _load_hf(model_path, s.get("dtype"))
        init_state, init_meta = _Params(hf_params), {"model_config": dataclasses.asdict(model.config)}
        model_path = hf_meta["hf_model"]
    s = _resolve(s, args.kind, init_meta, what)
    steps_known = s["steps"] if s["steps"] is not None else DEFAULT_STEPS
    _validate({**s, "steps": steps_known, "T_max": s["T_max"]}, args.kind)
    if s["lora_rank"] and init_meta is None:
        raise UsageError("--lora-rank adapts a trained model: give --init RUN or --model HF_DIR.")
    # A resumed run's tokenizer (trained BPE included) comes from its checkpoint: never rebuilt.
    kind_tok, tok_arg = (("checkpoint", None) if init_meta is not None or args.resume
                         else _tokenizer_spec(s["tokenizer"]))
    if is_token_folder(data_path):  # token shards: trained with the tokenizer they were made with
        kind_tok, tok_arg = _token_folder_tokenizer(data_path, args.kind, given, kind_tok, tok_arg)
        if kind_tok == "tokens":
            s["tokenizer"] = "data"  # what config.json records: the tokenizer came with --data
    if init_meta is not None:
        limit, why = model.config.max_seq_len, f"the {what} model's max_seq_len"
    else:
        # a tokenizer file's size is not known yet: a typical one
        vocab = tok_arg if kind_tok == "bpe" else tok_arg.vocab_size if kind_tok == "tokens" else 512
        limit = _max_length_limit(s["dim"], s["n_layers"], vocab, s["batch_size"])
        why = (f"about the most one batch of {s['batch_size']} sequences fits in half of this machine's memory "
               "at this model size (lower --batch-size for longer ones)")
    if s["max_length"] > limit:
        raise UsageError(f"--max-length {s['max_length']} is too long: the limit is {limit} ({why}).")

    if s["threads"]:
        torch.set_num_threads(s["threads"])
    distributed.init_from_env(timeout_s=s["dist_timeout"])  # under torchrun: join the group; else no-op
    world, main = distributed.world_size(), distributed.is_main()

    resume_from = checkpoint.resolve(out) if args.resume else None
    resume_meta = checkpoint.read_meta(resume_from) if resume_from is not None else None
    if init_meta is None:
        if resume_meta is not None and "tokenizer" in resume_meta:
            from .data import load_tokenizer
            tok = load_tokenizer(resume_meta["tokenizer"])
        elif kind_tok == "tokens":
            tok = tok_arg
        elif kind_tok == "bpe":
            _, records = read_records(data_path)
            tok = BPETokenizer.train(_texts_of(records), vocab_size=tok_arg)
        else:
            tok = named_tokenizer(kind_tok, tok_arg)
        model = build_model(ModelConfig(vocab_size=tok.vocab_size, dim=s["dim"], n_layers=s["n_layers"],
                                        n_heads=s["n_heads"], max_seq_len=s["max_length"]))
        params = model.init(s["seed"])
    else:
        params = init_state.params
    lora_cfg = _lora_config(s, params)

    # GRPO's records are prompts: each keeps room for its completion within --max-length.
    item_length = s["max_length"] - s["max_completion_length"] if args.kind == "grpo" else s["max_length"]
    data = _load_data(data_path, tok, item_length, args.kind, s["pack"])
    if args.kind == "grpo":
        _check_reward_columns(data, s, data_path)
    batches_per_epoch = math.ceil(len(data) / s["batch_size"])
    if s["steps"] is None:
        s["steps"] = max(1, (s["epochs"] or 0) * batches_per_epoch // s["accumulation_steps"]) \
            if s["epochs"] else DEFAULT_STEPS
    s["T_max"] = s["T_max"] or s["steps"]
    if s["eval_data"] and s["eval_every"] is None:
        s["eval_every"] = max(1, s["steps"] // 10)
    _validate(s, args.kind)

    schedule, optimizer = _schedule(s), _optimizer(s)
    precompute = args.kind == "dpo" and s["precompute_reference"]
    trainer = create_trainer(args.kind, model, learning_rate=s["learning_rate"], weight_decay=s["weight_decay"],
                             max_grad_norm=s["max_grad_norm"] or None, T_max=s["T_max"], schedule=schedule,
                             accumulation_steps=s["accumulation_steps"], precision=s["precision"],
                             beta=s["beta"], loss_type=_loss_types(s["loss_type"]),
                             loss_weights=_loss_weights(s["loss_weights"]), label_smoothing=s["label_smoothing"],
                             precomputed_reference=precompute, compile=s["compile"], optimizer=optimizer,
                             grad_sync=distributed.make_grad_sync() if world > 1 else None, lora=lora_cfg,
                             **(_grpo_options(s, tok) if args.kind == "grpo" else {}))
    if precompute:
        data = add_reference_logps(model, params, data)
    state = trainer.init(params, seed=s["seed"])
    position = (0, 0)
    if resume_from is not None:
        saved, meta = checkpoint.load(resume_from, like=trainer.saved_state(state))
        if lora_cfg is not None:
            _check_base(meta, params, f"{init_path or model_path}")
        state = trainer.with_base(saved, params)
        written = meta.get("model_config") or {}
        same_model = _config_or_none(written) == model.config  # fields added since it was written: defaults
        checkpoint.check_meta(meta, {"kind": args.kind,
                                     **({} if same_model else {"model_config": dataclasses.asdict(model.config)})})
        position = tuple(meta.get("data_position") or (0, 0))
        if main:
            print(f"resuming {args.kind} at update {meta['step']} from {resume_from}, data position {position}")
        if meta["step"] >= s["steps"] and main:
            print(f"note: the run is already at update {meta['step']} of {s['steps']}; raise --steps to train on.")
    if main and s["steps"] > s["T_max"] and s["schedule"] == "cosine":
        print(f"note: {s['steps']} updates exceed T_max {s['T_max']}: the cosine learning rate rises again "
              "after update T_max (CosineAnnealingLR is periodic).")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        record = {"kind": args.kind, "data": str(data_path), "init": init_path, "model": model_path,
                  "world_size": world, "settings_version": SETTINGS_VERSION, **s}
        _write_json(out / "config.json", record)
        if hasattr(tok, "save") and not (out / "tokenizer.json").exists():
            tok.save(out / "tokenizer.json")
    # A last batch with fewer items than processes cannot be split: drop it (and say so).
    drop_last = world > 1 and 0 < len(data) % s["batch_size"] < world
    if drop_last and main:
        print(f"note: the last batch of each epoch holds {len(data) % s['batch_size']} item(s), fewer than the "
              f"{world} processes; it is dropped.")
    batches = Batches(data, s["batch_size"], seed=s["seed"], position=position, drop_last=drop_last,
                      rank=distributed.rank(), world_size=world)
    eval_batches = None
    if s["eval_data"]:
        held = _load_data(s["eval_data"], tok, item_length, args.kind, s["pack"])
        if precompute:
            held = add_reference_logps(model, params, held)
        eval_batches = lambda: Batches(held, s["batch_size"], shuffle=False, epochs=1,  # noqa: E731
                                       drop_last=world > 1 and 0 < len(held) % s["batch_size"] < world,
                                       rank=distributed.rank(), world_size=world)
    state = trainer.fit(state, batches, s["steps"], eval_batches=eval_batches, eval_every=s["eval_every"] or 0,
                        out_dir=out, checkpoint_every=s["checkpoint_every"], keep_last=s["keep_last"],
                        max_skipped=s["max_skipped"], progress=not args.no_progress, reraise_interrupt=True,
                        meta={"tokenizer": tok.to_json(), "init": init_path, **hf_meta})
    if main:
        epoch, batch = batches.position
        print(f"{args.kind}: {int(state.step)} updates, {epoch + batch / len(batches):.2f} epochs of the data; "
              f"checkpoints in {out / 'checkpoints'}, metrics in {out / 'metrics.jsonl'}")
    distributed.shutdown()


def _token_folder_tokenizer(data_path, kind: str, given: dict, kind_tok: str, tok_arg):
    """``(kind_tok, tok_arg)`` for a token folder as ``--data``: ("tokens", the tokenizer it was made with).

    A ``--tokenizer`` given as well must be that same tokenizer. A run that starts
    from a model (or resumes) keeps the model's; the shards are checked against it
    when they are opened.
    """
    from .data import load_tokenizer, named_tokenizer, read_index
    from .data.datasets import RECORD_FIELDS

    if kind != "pretrain":
        records = RECORD_FIELDS["dpo" if kind == "orpo" else kind]
        raise UsageError(f"--data {data_path} is a token folder (made by `prepare`), which is for pretraining; "
                         f"{kind} training reads a JSON Lines file of {records}.")
    if given.get("pack") is False:
        raise UsageError(f"--pack false: a token folder ({data_path}) is one packed stream; drop --pack.")
    if kind_tok == "checkpoint":
        return kind_tok, tok_arg
    made = load_tokenizer(read_index(data_path)["tokenizer"])
    if given.get("tokenizer") is not None:
        same = kind_tok != "bpe"  # a BPE to train now cannot be the one the shards were made with
        if same:
            other = named_tokenizer(kind_tok, tok_arg)
            same = json.dumps(other.to_json(), sort_keys=True) == json.dumps(made.to_json(), sort_keys=True)
        if not same:
            raise UsageError(f"--tokenizer {given['tokenizer']} conflicts with --data {data_path}, whose tokens were "
                             f"made by {made!r}; the tokenizer comes with the token folder: drop --tokenizer.")
    return "tokens", made


def _load_data(path, tok, length: int, kind: str, pack):
    """``load_dataset``, or :class:`~minillm_func.data.TokenShards` over a token folder (checksums verified)."""
    from .data import TokenShards, is_token_folder, load_dataset

    if is_token_folder(path):
        if kind != "pretrain":
            raise UsageError(f"{path} is a token folder (made by `prepare`), which is for pretraining, not {kind}.")
        return TokenShards(path, length, tokenizer=tok)
    return load_dataset(path, tok, length, kind=kind, pack=pack)


def _schedule(s: dict):
    """The learning-rate schedule ``--schedule`` names (None: the trainer's cosine over ``T_max``)."""
    from . import schedules

    lr, steps, warm = s["learning_rate"], s["steps"], s["warmup_steps"]
    if s["schedule"] == "warmup_cosine":
        return schedules.warmup_cosine(lr, warm, steps, lr / 10)
    if s["schedule"] == "wsd":
        return schedules.wsd(lr, steps, warmup_steps=warm)
    if s["schedule"] == "linear":
        return schedules.linear_decay(lr, steps)
    if s["schedule"] == "constant":
        return schedules.constant(lr)
    return None


def _optimizer(s: dict):
    """What ``--optimizer`` names, as ``create_trainer(optimizer=)`` takes it (None: AdamW)."""
    from . import optim

    if s["optimizer"] == "muon":
        ratio = s["adam_learning_rate"] / s["learning_rate"]  # the AdamW part follows the same schedule, scaled
        return lambda lr: optim.muon_with_adamw(lr, lambda step: ratio * lr(step), weight_decay=s["weight_decay"],
                                                adam_weight_decay=s["weight_decay"])
    if s["optimizer"] == "schedule_free":
        return lambda lr: optim.schedule_free_adamw(s["learning_rate"], warmup_steps=s["warmup_steps"],
                                                    weight_decay=s["weight_decay"])
    return None


def _check_reward_columns(data, s: dict, where) -> None:
    """Every record has the columns the rewards read (``exact_match``: ``answer``), before any sampling."""
    from .rl import required_columns, reward_by_name

    for spec in _reward_specs(s["rewards"]):
        needed = required_columns(reward_by_name(spec))
        for i, item in enumerate(data):
            missing = [c for c in needed if c not in item]
            if missing:
                raise UsageError(f"{where}: record {i} has no {missing[0]!r} column, which the reward {spec} "
                                 f"reads; add it to every record or choose another --rewards.")


def _grpo_options(s: dict, tok) -> dict:
    """create_trainer's GRPO keywords from the run's settings."""
    from .rl import reward_by_name

    return dict(tokenizer=tok, reward_fns=[reward_by_name(r) for r in _reward_specs(s["rewards"])],
                num_generations=s["num_generations"], max_completion_length=s["max_completion_length"],
                temperature=s["temperature"], top_p=s["top_p"], scale_rewards=s["scale_rewards"],
                epsilon=s["epsilon"], epsilon_high=s["epsilon_high"],
                importance_sampling_level=s["importance_sampling_level"], sampling_seed=s["seed"])


def _lora_config(s: dict, params: dict):
    """The run's LoraConfig, or None without --lora-rank; a target that matches nothing is a usage error."""
    from .lora import LoraConfig, target_names

    if not s["lora_rank"]:
        return None
    alpha = s["lora_alpha"] if s["lora_alpha"] is not None else 2.0 * s["lora_rank"]
    try:
        cfg = LoraConfig(rank=s["lora_rank"], alpha=alpha, dropout=s["lora_dropout"],
                         targets=tuple(t.strip() for t in s["lora_targets"].split(",") if t.strip()))
        target_names(params, cfg)
    except ValueError as e:
        raise UsageError(f"--lora-targets: {_one_line(e)}") from None
    return cfg


def _check_base(meta: dict, base: dict, where: str) -> None:
    """A LoRA checkpoint's adapters belong to the base it was trained on: refuse another one."""
    from .lora import fingerprint

    expected = meta.get("lora_base_fingerprint")
    if expected is not None and fingerprint(base) != expected:
        raise ValueError(f"the base model at {where} is not the one these LoRA adapters were trained on "
                         "(its weights changed); restore that model, or start a new run from it.")


def _config_or_none(fields: dict):
    """The ModelConfig a checkpoint's meta describes, or None when it describes none."""
    from .model import ModelConfig

    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError):
        return None


def _texts_of(records) -> list[str]:
    """Every string in the records (text, prompts, replies, message contents): what a BPE is trained on."""
    texts = []

    def walk(x):
        if isinstance(x, str):
            texts.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(records)
    return texts


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- generate, eval


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""``\n``, ``\t`` and ``\\`` typed in a shell argument -> newline, tab and a backslash; the rest as is."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def _load_source(args):
    """(params, meta, model, tokenizer, label) of ``--ckpt RUN`` or ``--model HF_DIR``."""
    if args.ckpt:
        if args.dtype:
            raise UsageError("--dtype applies to --model (a Hugging Face folder); drop it.")
        state, meta, model, tok, folder = _load_checkpoint(args.ckpt)
        return state, meta, model, tok, str(folder)
    model, params, tok, meta = _load_hf(args.model, args.dtype)
    return _Params(params), meta, model, tok, meta["hf_model"]


def _generate(args) -> None:
    from .generate import generate, generate_text

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    state, meta, model, tok, _ = _load_source(args)
    prompts = [unescape(p) for p in args.prompt]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if args.chat:
        if getattr(tok, "chat_template", None) is None:
            raise UsageError(f"--chat needs a chat template, and the tokenizer of {args.ckpt or args.model} has "
                             "none; drop --chat to continue the prompt as plain text.")
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in prompts]
        rows = generate(model, state.params, ids, eos_id=tuple(getattr(tok, "eos_ids", None) or (tok.eos_id,)),
                        pad_id=tok.pad_id, **sampling)
        texts = [tok.decode(row) for row in rows]
    else:
        texts = generate_text(model, state.params, tok, prompts, **sampling)
    for prompt, text in zip(prompts, texts):
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))


def _eval(args) -> None:
    from .data import Batches, is_token_folder, read_records
    from .trainers import create_trainer

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    state, meta, model, tok, label = _load_source(args)
    trained_as = meta.get("kind")
    kind = args.kind or trained_as
    if kind is None:  # a Hugging Face folder: score the data as the stage its records are for
        kind = "pretrain" if is_token_folder(args.data) else read_records(args.data)[0]
    settings = {}
    if kind == trained_as and kind in ("orpo", "kto"):  # score with the run's own hyper-parameters
        tc = meta.get("trainer_config", {})
        settings = {k: tc[k] for k in ("beta", "desirable_weight", "undesirable_weight") if k in tc}
    if kind == trained_as == "dpo":  # score with the loss the checkpoint was trained with
        tc = meta.get("trainer_config", {})
        settings = {k: tc[k] for k in ("beta", "loss_type", "label_smoothing", "gamma", "loss_weights",
                                       "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau") if k in tc}
    length = min(model.config.max_seq_len, 4096)
    if kind == "grpo":  # score sampled completions with the run's own rewards and sampling settings
        from .rl import reward_by_name

        tc = meta.get("trainer_config", {}) if trained_as == "grpo" else {}
        settings = {k: tc[k] for k in ("num_generations", "max_completion_length", "temperature", "top_p",
                                       "scale_rewards", "loss_type", "epsilon", "epsilon_high", "beta",
                                       "importance_sampling_level", "sampling_seed") if tc.get(k) is not None}
        settings.update(tokenizer=tok, reward_fns=[reward_by_name(r) for r in tc.get("rewards", ["exact_match"])])
        length -= settings.get("max_completion_length", 32)
    data = _load_data(args.data, tok, length, kind, None)
    trainer = create_trainer(kind, model, **settings)
    if kind in ("dpo", "kto"):
        ref = _reference_params(args, meta, state, trained_as, label)
        state = trainer.init(state.params)._replace(extras={"ref_params": ref} if ref is not None else {})
    else:
        state = trainer.init(state.params)
    result = trainer.evaluate(state, Batches(data, args.batch_size, shuffle=False, epochs=1))
    print(json.dumps({"kind": kind, "checkpoint": label, **result}))


def _reference_params(args, meta, state, trained_as, label):
    """The DPO reference: --ref, else the checkpoint's own frozen one, else the model the run started from."""
    from .losses import dpo_needs_reference

    if args.ref:
        return _load_checkpoint(args.ref, "--ref")[0].params
    if "ref_params" in getattr(state, "extras", {}):
        return state.extras["ref_params"]
    if trained_as == "dpo" and not dpo_needs_reference(meta.get("trainer_config", {}).get("loss_type", "sigmoid")):
        return None
    if trained_as in ("dpo", "kto"):
        init, hf_model = meta.get("init"), meta.get("hf_model")
        if init and Path(init).exists():
            return _load_checkpoint(init, "the run's --init")[0].params
        if hf_model and Path(hf_model).is_dir():
            return _load_hf(hf_model, meta.get("hf_dtype"))[1]
        raise UsageError(f"{label} was trained against precomputed reference log-probs and the model it started "
                         f"from ({init or hf_model or 'unknown'}) is not at hand; pass it with --ref CKPT.")
    return state.params  # another stage's checkpoint: scored against itself (policy = reference, all ties)


def _export(args) -> None:
    import torch

    from . import hf

    if args.peft and args.merge:
        raise UsageError("--peft writes the adapters alone and --merge merges them into the model; give one.")
    if args.peft:
        return _export_peft(args)
    state, meta, model, tok, folder = _load_checkpoint(args.ckpt)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    out = hf.save_pretrained(args.out, model, state.params, tok, model_type=meta.get("hf_model_type"),
                             max_shard_size=args.max_shard_size, dtype=dtype)
    print(f"export: {folder} (update {meta.get('step')}) -> {out} "
          f"({hf.SUPPORTED[meta.get('hf_model_type') or hf.model_type_of(model.config)]})")


def _export_peft(args) -> None:
    import torch

    from . import checkpoint
    from .lora import save_peft

    folder = _resolve_checkpoint(args.ckpt, "--ckpt")
    state, meta = checkpoint.load(folder)
    cfg = _lora_of(meta)
    if cfg is None:
        raise UsageError(f"--peft exports LoRA adapters, and {folder} holds a full-parameter checkpoint; "
                         "drop --peft to export the model.")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    out = save_peft(args.out, state.params, cfg, base_model_name_or_path=meta.get("hf_model"), dtype=dtype)
    print(f"export: {folder} (update {meta.get('step')}) -> {out} (PEFT LoRA adapter, rank {cfg.rank})")


# --------------------------------------------------------------------------- prepare


def _prepare(args) -> None:
    """``prepare``: the flags checked in one line each before any data is read, then ``mf.data.prepare``."""
    from .data import prepare, read_index

    if args.shard_tokens is not None and args.shard_tokens < 1:
        raise UsageError(f"--shard-tokens must be a whole number >= 1, got {args.shard_tokens}.")
    kind, _ = _tokenizer_spec(args.tokenizer)
    options = {}
    if args.bpe_sample_mb is not None:
        if kind != "bpe":
            raise UsageError("--bpe-sample-mb sizes the sample a BPE is trained on; it needs --tokenizer bpe:VOCAB.")
        if not (math.isfinite(args.bpe_sample_mb) and args.bpe_sample_mb > 0):
            raise UsageError(f"--bpe-sample-mb must be a positive number, got {args.bpe_sample_mb}.")
        options["bpe_sample_bytes"] = max(1, int(args.bpe_sample_mb * 2**20))
    if args.shard_tokens is not None:
        options["shard_tokens"] = args.shard_tokens
    for path in args.data:
        if not Path(path).exists():
            raise UsageError(f"--data {path}: no such file or folder.")
    out = prepare(args.data, args.tokenizer, args.out, text_field=args.text_field, progress=not args.no_progress,
                  **options)
    index = read_index(out)
    empty = f", {index['skipped_empty']:,} empty record(s) skipped" if index["skipped_empty"] else ""
    print(f"prepare: {index['num_documents']:,} documents, {index['num_tokens']:,} tokens ({index['dtype']}) in "
          f"{len(index['shards'])} shard(s){empty} -> {out}; train on it with "
          f"`{PROG} train pretrain --data {out} --out RUN`")


# --------------------------------------------------------------------------- main


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _run(args) -> None:
    if args.command == "demo":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(
                "demo runs in one process, but it was started as one of "
                f"{os.environ['WORLD_SIZE']} processes (torchrun). Run `minillm-func demo` without torchrun; "
                "for data-parallel training use `torchrun --nproc_per_node=N -m minillm_func.cli train ...`.")
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1, got {args.threads}.")
            import torch
            torch.set_num_threads(args.threads)
        from .demo import DemoConfig, run_demo
        config = DemoConfig(seed=args.seed)
        if args.quick:  # a couple of percent of the steps and a small held-out set: an installation check
            config = dataclasses.replace(config.scaled(0.02), n_eval=20, pretrain_batch=8, sft_batch=8)
        run_demo(args.out, config, progress=not args.no_progress)
    elif args.command == "train":
        _train(args)
    elif args.command == "generate":
        _generate(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "prepare":
        _prepare(args)
    else:
        _eval(args)


def main(argv=None) -> int:
    """Run the command; every expected error becomes one line on stderr and exit code 2 (usage) or 1."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("MINILLM_DEBUG", "") not in ("", "0")
    try:
        _run(args)
    except KeyboardInterrupt:
        resume = (f"; continue with `{PROG} train {args.kind} --out {args.out} --resume`"
                  if args.command == "train" else
                  "; run the same command again to continue after the last complete shard"
                  if args.command == "prepare" else "")
        print(f"{PROG}: interrupted{resume}.", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        code = 2 if isinstance(e, UsageError) else 1
        expected = isinstance(e, (ValueError, OSError, RuntimeError, ImportError, MemoryError, KeyError))
        hint = "" if expected else f" ({type(e).__name__}; run again with --debug for the traceback)"
        world = os.environ.get("WORLD_SIZE", "1")
        who = f" (rank {os.environ.get('RANK', '?')} of {world})" if world not in ("", "1") else ""
        print(f"{PROG}: error{who}: {_one_line(e)}{hint}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
