"""The ``minillm-func`` command.

    minillm-func demo [--out runs/demo]                   # pretrain -> SFT -> DPO on the built-in corpus
    minillm-func train {pretrain,sft,dpo} --data FILE --out DIR [--init CKPT] [--resume] [--config FILE]
    minillm-func generate --ckpt DIR --prompt TEXT [--max-new-tokens N] [--temperature T] ...
    minillm-func eval --ckpt DIR --data FILE

Settings for ``train`` come from flags and/or a TOML or JSON file (``--config``;
flags win); the settings used are written to ``DIR/config.json``.

``train`` runs data-parallel when launched by ``torchrun`` (``WORLD_SIZE`` > 1):
``--batch-size`` is then the global micro-batch, split over the processes, so
the run takes the same updates as one process; rank 0 logs and writes. See
``docs/distributed.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

__all__ = ["main"]

# train settings: name -> (default, type, help)
TRAIN_SETTINGS = {
    "steps": (1000, int, "optimizer updates to train for"),
    "batch_size": (16, int, "sequences (or pairs) per micro-batch"),
    "accumulation_steps": (1, int, "micro-batches per optimizer update"),
    "max_length": (256, int, "tokens per sequence"),
    "learning_rate": (None, float, "peak learning rate (default: 1e-4; 5e-5 for sft)"),
    "weight_decay": (0.01, float, "AdamW weight decay"),
    "max_grad_norm": (1.0, float, "global-norm clipping (0: none)"),
    "schedule": ("cosine", str, "'cosine' (torch's CosineAnnealingLR, T_max) or 'warmup_cosine'"),
    "T_max": (1000, int, "cosine annealing period"),
    "warmup_steps": (0, int, "warm-up updates for warmup_cosine"),
    "precision": ("fp32", str, "fp32, bf16 or fp16"),
    "beta": (0.1, float, "DPO beta"),
    "loss_type": ("sigmoid", str, "DPO loss: sigmoid, robust, ipo, hinge, simpo"),
    "label_smoothing": (0.0, float, "DPO label smoothing"),
    "precompute_reference": (False, bool, "DPO: compute reference log-probs once, keep no reference model"),
    "pack": (True, bool, "pretraining: pack documents into full blocks"),
    "eval_data": (None, str, "held-out file evaluated every --eval-every updates"),
    "eval_every": (0, int, "evaluate every N updates (0: never)"),
    "checkpoint_every": (0, int, "checkpoint every N updates (0: only at the end)"),
    "seed": (0, int, "seed for the model init and the data order"),
    "dim": (256, int, "model width (new models only)"),
    "n_layers": (4, int, "transformer blocks (new models only)"),
    "n_heads": (4, int, "attention heads (new models only)"),
    "compile": (False, bool, "wrap the train step in torch.compile"),
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-func", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="pretrain -> SFT -> DPO a small model on the built-in corpus (~5 min on a CPU)")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a few steps per stage, to check the installation")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    t = sub.add_parser("train", help="train one stage on your own file")
    t.add_argument("kind", choices=["pretrain", "sft", "dpo"])
    t.add_argument("--data", required=True, help="JSON Lines or .txt file")
    t.add_argument("--out", required=True, help="run folder: checkpoint, metrics.jsonl, config.json")
    t.add_argument("--init", help="start from the params of this checkpoint folder (e.g. the previous stage's)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--config", help="TOML or JSON file of the settings below")
    t.add_argument("--no-progress", action="store_true")
    for name, (default, kind, text) in TRAIN_SETTINGS.items():
        t.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_bool if kind is bool else kind,
                       default=None, help=f"{text} (default: {default})")

    g = sub.add_parser("generate", help="sample from a checkpoint")
    g.add_argument("--ckpt", required=True, help="checkpoint folder (DIR/checkpoint of a run)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a file")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--batch-size", type=int, default=32)
    return p


def _settings(args) -> dict:
    """Defaults, overridden by the config file, overridden by flags."""
    settings = {name: default for name, (default, _, _) in TRAIN_SETTINGS.items()}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"minillm-func: no config file at {path}.")
        if path.suffix == ".toml":
            import tomllib
            loaded = tomllib.loads(path.read_text())
        else:
            loaded = json.loads(path.read_text())
        unknown = set(loaded) - set(settings)
        if unknown:
            raise SystemExit(f"minillm-func: unknown settings in {path}: {sorted(unknown)}; "
                             f"known: {sorted(settings)}.")
        settings.update(loaded)
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    return settings


def _load_checkpoint(path):
    from . import checkpoint
    from .data import load_tokenizer
    from .model import ModelConfig, build_model

    state, meta = checkpoint.load(path)
    model = build_model(ModelConfig(**meta["model_config"]))
    tok = load_tokenizer(meta.get("tokenizer", {"type": "byte"}))
    return state, meta, model, tok


def _train(args) -> None:
    from . import checkpoint, distributed, schedules
    from .data import Batches, ByteTokenizer, load_dataset
    from .model import ModelConfig, build_model
    from .trainers import add_reference_logps, create_trainer

    s = _settings(args)
    out = Path(args.out)
    distributed.init_from_env()  # under torchrun: join the group; a single process: no-op
    world, main = distributed.world_size(), distributed.is_main()
    tok = ByteTokenizer()
    if args.init:
        init_state, init_meta, model, tok = _load_checkpoint(args.init)
        params = init_state.params
    else:
        model = build_model(ModelConfig(vocab_size=tok.vocab_size, dim=s["dim"], n_layers=s["n_layers"],
                                        n_heads=s["n_heads"], max_seq_len=s["max_length"]))
        params = model.init(s["seed"])
    if s["max_length"] > model.config.max_seq_len:
        raise SystemExit(f"minillm-func: --max-length {s['max_length']} exceeds the model's max_seq_len "
                         f"{model.config.max_seq_len}.")
    data = load_dataset(args.data, tok, s["max_length"], kind=args.kind, pack=s["pack"])
    lr = s["learning_rate"]
    schedule = None
    if s["schedule"] == "warmup_cosine":
        peak = lr if lr is not None else (5e-5 if args.kind == "sft" else 1e-4)
        schedule = schedules.warmup_cosine(peak, s["warmup_steps"], s["steps"], peak / 10)
    elif s["schedule"] != "cosine":
        raise SystemExit(f"minillm-func: --schedule must be 'cosine' or 'warmup_cosine', got {s['schedule']!r}.")
    precompute = args.kind == "dpo" and s["precompute_reference"]
    trainer = create_trainer(args.kind, model, learning_rate=lr, weight_decay=s["weight_decay"],
                             max_grad_norm=s["max_grad_norm"] or None, T_max=s["T_max"], schedule=schedule,
                             accumulation_steps=s["accumulation_steps"], precision=s["precision"],
                             beta=s["beta"], loss_type=s["loss_type"], label_smoothing=s["label_smoothing"],
                             precomputed_reference=precompute, compile=s["compile"],
                             grad_sync=distributed.make_grad_sync() if world > 1 else None)
    if precompute:
        data = add_reference_logps(model, params, data)
    state = trainer.init(params)
    position = (0, 0)
    if args.resume:
        state, meta = checkpoint.load(out / "checkpoint", like=state)
        checkpoint.check_meta(meta, {"kind": args.kind, "model_config": dataclasses.asdict(model.config)})
        position = tuple(meta.get("data_position") or (0, 0))
        if main:
            print(f"resuming {args.kind} at update {meta['step']}, data position {position}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"kind": args.kind, "data": args.data, "world_size": world,
                                                     **s}, indent=2))
    # A last batch with fewer items than processes cannot be split: drop it (and say so).
    drop_last = world > 1 and 0 < len(data) % s["batch_size"] < world
    if drop_last and main:
        print(f"note: the last batch of each epoch holds {len(data) % s['batch_size']} item(s), fewer than the "
              f"{world} processes; it is dropped.")
    batches = Batches(data, s["batch_size"], seed=s["seed"], position=position, drop_last=drop_last,
                      rank=distributed.rank(), world_size=world)
    eval_batches = None
    if s["eval_data"]:
        held = load_dataset(s["eval_data"], tok, s["max_length"], kind=args.kind, pack=s["pack"])
        if precompute:
            held = add_reference_logps(model, params, held)
        eval_batches = lambda: Batches(held, s["batch_size"], shuffle=False, epochs=1,  # noqa: E731
                                       drop_last=world > 1 and 0 < len(held) % s["batch_size"] < world,
                                       rank=distributed.rank(), world_size=world)
    trainer.fit(state, batches, s["steps"], eval_batches=eval_batches, eval_every=s["eval_every"], out_dir=out,
                checkpoint_every=s["checkpoint_every"], progress=not args.no_progress,
                meta={"tokenizer": tok.to_json()})
    if main:
        print(f"{args.kind}: checkpoint in {out / 'checkpoint'}, metrics in {out / 'metrics.jsonl'}")
    distributed.shutdown()


def _generate(args) -> None:
    from .generate import generate_text

    state, meta, model, tok = _load_checkpoint(args.ckpt)
    texts = generate_text(model, state.params, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))


def _eval(args) -> None:
    from .data import Batches, load_dataset
    from .trainers import create_trainer

    state, meta, model, tok = _load_checkpoint(args.ckpt)
    kind = meta.get("kind", "pretrain")
    data = load_dataset(args.data, tok, model.config.max_seq_len, kind=kind)
    trainer = create_trainer(kind, model)
    if kind == "dpo" and "ref_params" not in state.extras:
        state = trainer.init(state.params)
    print(json.dumps(trainer.evaluate(state, Batches(data, args.batch_size, shuffle=False, epochs=1))))


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit(
                "minillm-func demo runs in one process, but it was started as one of "
                f"{os.environ['WORLD_SIZE']} processes (torchrun). Run `minillm-func demo` without torchrun; "
                "for data-parallel training use `torchrun --nproc_per_node=N -m minillm_func.cli train ...`.")
        from .demo import DemoConfig, run_demo
        config = DemoConfig(seed=args.seed)
        if args.quick:  # a couple of percent of the steps and a small held-out set: an installation check
            config = dataclasses.replace(config.scaled(0.02), n_eval=20, pretrain_batch=8, sft_batch=8)
        run_demo(args.out, config, progress=not args.no_progress)
    elif args.command == "train":
        _train(args)
    elif args.command == "generate":
        _generate(args)
    else:
        _eval(args)


if __name__ == "__main__":
    sys.exit(main())
