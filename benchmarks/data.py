"""The data path at scale, in one process each, against the baselines the issue names.

    python benchmarks/data.py              # ~200 MB prepare race, 10 MB vs 1 GB memory, packing (several minutes)
    python benchmarks/data.py --tiny       # smoke-test sizes (seconds)
    python benchmarks/data.py --only prepare|memory|packing

1. **prepare throughput**: MB/s of text from one JSON Lines file to token ids on
   disk, ``mf.data.prepare`` against ``datasets``: ``load_dataset("json")`` then
   ``Dataset.map`` (batched, the same ``tokenizers`` tokenizer, loaded from the
   same tokenizer.json, adding the EOS each document gets), into a fresh cache
   folder. The corpus (~200 MB) is generated from a seed: documents of
   log-normally many words drawn from a Zipf-like vocabulary. The variants are
   alternated; the median of ``--rounds`` is kept.
2. **memory against corpus size**: the peak resident memory (``ru_maxrss``) of a
   fresh process that opens a token folder (checksums verified), batches it with
   ``Batches`` and runs ``fit`` for a fixed number of pretraining updates, for a
   10 MB and a 1 GB token folder (uint16 ids of the byte tokenizer, prepared
   here from generated text).
3. **packing**: real tokens/s of SFT and DPO steps, packed against padded, on
   length-skewed examples (below).

The packing comparison:
Lengths are drawn log-normally (median 128 tokens, sigma 1.0) and clipped to 16..1024, as
replies are: many short, a few long. The same examples are trained on both ways:

- padded: batches of ``batch`` examples in random order, each padded to its longest
  (the default of every trainer; also shown: length-grouped batches, which pad less);
- packed: :class:`~minillm_func.data.PackedDataset` rows of 1024 tokens (2048 for pairs),
  best-fit decreasing, in batches of ``rows`` rows.

One "pass" runs a train step on every batch of the epoch; passes of the variants are
alternated and the median pass time kept. tokens/s counts real (non-padding) tokens,
the same in every variant.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, machine, parse  # noqa: E402

import minillm_func as mf  # noqa: E402
from minillm_func.data import Batches, PackedDataset  # noqa: E402

PACK_FULL = dict(vocab=2048, dim=256, n_layers=4, n_heads=4, examples=96, pairs=48, longest=1024, batch=8, rows=2,
                 passes=3)
PREPARE_FULL = dict(megabytes=200, bpe_vocab=8192, rounds=3)
PREPARE_TINY = dict(megabytes=2, bpe_vocab=512, rounds=1)
MEMORY_FULL = dict(small_mb=10, large_mb=1024, steps=30, max_length=256, batch=16, dim=128, n_layers=2)
MEMORY_TINY = dict(small_mb=1, large_mb=8, steps=3, max_length=64, batch=4, dim=32, n_layers=1)
PACK_TINY = dict(vocab=64, dim=32, n_layers=1, n_heads=4, examples=16, pairs=8, longest=64, batch=4, rows=2, passes=1)


class _Items:
    """A minimal dataset of precomputed items (what ConversationDataset and PreferenceDataset hold)."""

    def __init__(self, items, max_length, pad_id=0):
        self.items, self.max_length = items, max_length
        self.tokenizer = type("Tok", (), {"pad_id": pad_id})()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lengths(self):
        return [max(int(v.shape[0]) for k, v in it.items() if k.endswith("input_ids")) for it in self.items]


def lognormal_lengths(n: int, g: torch.Generator, longest: int) -> list[int]:
    median = 128 * longest / 1024
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return [int(min(max(16 * longest / 1024, math.exp(math.log(median) + float(x))), longest)) for x in z]


def _sequence(n: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and aligned labels: the first ~30% a prompt (not learned), the rest a reply."""
    ids = torch.randint(0, vocab, (n,), generator=g)
    labels = torch.cat([ids[1:], torch.tensor([mf.IGNORE_INDEX])])
    labels[: max(0, int(0.3 * n) - 1)] = mf.IGNORE_INDEX
    return ids, labels


def sft_items(size, g):
    items = []
    for n in lognormal_lengths(size["examples"], g, size["longest"]):
        ids, labels = _sequence(n, size["vocab"], g)
        items.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(n, dtype=torch.long)})
    return _Items(items, size["longest"])


def dpo_items(size, g):
    items = []
    lengths = lognormal_lengths(2 * size["pairs"], g, size["longest"])
    for c, r in zip(lengths[0::2], lengths[1::2]):
        (ci, cl), (ri, rl) = _sequence(c, size["vocab"], g), _sequence(r, size["vocab"], g)
        items.append({"chosen_input_ids": ci, "chosen_labels": cl, "chosen_attention_mask": torch.ones_like(ci),
                      "rejected_input_ids": ri, "rejected_labels": rl, "rejected_attention_mask": torch.ones_like(ri)})
    return _Items(items, size["longest"])


def _real_tokens(batches) -> int:
    return sum(int(b[k].sum()) for b in batches for k in b if k.endswith("attention_mask"))


def packing(kind: str, size: dict, *, seed: int = 0) -> list[dict]:
    """One row per variant: passes' median seconds, real tokens, tokens/s, padding share, ratio to padded."""
    g = torch.Generator().manual_seed(seed)
    data = sft_items(size, g) if kind == "sft" else dpo_items(size, g)
    packed = PackedDataset(data)
    cfg = mf.ModelConfig(vocab_size=size["vocab"], dim=size["dim"], n_layers=size["n_layers"],
                         n_heads=size["n_heads"], max_seq_len=packed.capacity)
    model = mf.build_model(cfg)
    trainer = mf.create_trainer(kind, model, learning_rate=1e-4)
    state = trainer.init(model.init(0))
    variants = {
        "padded": list(Batches(data, size["batch"], seed=seed, epochs=1)),
        "padded, length-grouped": list(Batches(data, size["batch"], seed=seed, epochs=1, group_by_length=True)),
        "packed": list(Batches(packed, size["rows"], seed=seed, epochs=1)),
    }
    tokens = {name: _real_tokens(b) for name, b in variants.items()}
    assert len(set(tokens.values())) == 1, tokens  # the same examples every way
    slots = {name: sum(int(b[k].numel()) for b in bs for k in b if k.endswith("input_ids"))
             for name, bs in variants.items()}

    def one_pass(batches):
        for b in batches:
            trainer.step(state, b)

    one_pass(variants["packed"][:1])  # warm-up
    times = {name: [] for name in variants}
    for _ in range(size["passes"]):
        for name, batches in variants.items():
            start = time.perf_counter()
            one_pass(batches)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["padded"])
    rows = []
    for name in variants:
        t = statistics.median(times[name])
        rows.append({"variant": name, "seconds": t, "tokens": tokens[name], "tokens_per_s": tokens[name] / t,
                     "padding": 1 - tokens[name] / slots[name], "speedup": base / t})
    return rows


def packing_table(kind: str, rows: list[dict]) -> str:
    lines = [f"{kind}: real tokens/s over one pass of the same examples", "",
             "| variant | s per pass | tokens/s | padding share | tokens/s vs padded |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['padding']:.0%} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 1. prepare throughput


def corpus_jsonl(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSON Lines file of ``{"text"}`` documents, about ``megabytes`` MB of text; returns the text bytes."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(20000)]
    weights = [1 / (r + 1) for r in range(len(words))]  # Zipf-like: a few words are most of the text
    target, total = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while total < target:
            n = max(5, int(math.exp(rng.gauss(math.log(150), 0.8))))
            text = " ".join(rng.choices(words, weights, k=n)) + "."
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text.encode())
    return total


def _datasets_map(jsonl: Path, tokenizer_json: Path, eos: int, cache: Path) -> None:
    """The baseline: ``load_dataset("json")`` into a fresh cache, then a batched ``map`` with the same tokenizer."""
    import datasets
    import tokenizers

    datasets.disable_progress_bars()
    tk = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(cache))

    def encode(batch):
        return {"ids": [e.ids + [eos] for e in tk.encode_batch(batch["text"], add_special_tokens=False)]}

    ds.map(encode, batched=True, remove_columns=["text"])


def prepare_race(size: dict, work: Path) -> list[dict]:
    jsonl = work / "corpus.jsonl"
    text_bytes = corpus_jsonl(jsonl, size["megabytes"])
    with open(jsonl, encoding="utf-8") as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(20000), f)]
    tok = mf.BPETokenizer.train(sample, vocab_size=size["bpe_vocab"])
    tok.save(work / "tokenizer.json")

    def ours():
        out = work / "tokens"
        shutil.rmtree(out, ignore_errors=True)
        mf.data.prepare(jsonl, tok, out, progress=False)

    def theirs():
        cache = work / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        _datasets_map(jsonl, work / "tokenizer.json", tok.eos_id, cache)

    times = {"mf.data.prepare": [], "datasets load_dataset + map": []}
    for _ in range(size["rounds"]):
        for name, fn in zip(times, (ours, theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["datasets load_dataset + map"])
    return [{"variant": name, "seconds": statistics.median(ts), "mb_per_s": text_bytes / 1e6 / statistics.median(ts),
             "speedup": base / statistics.median(ts), "text_mb": text_bytes / 1e6} for name, ts in times.items()]


def prepare_table(rows: list[dict]) -> str:
    lines = [f"prepare: {rows[0]['text_mb']:.0f} MB of JSON Lines text to token ids on disk", "",
             "| variant | s | MB/s of text | throughput vs datasets |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seconds']:.1f} | {r['mb_per_s']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 2. memory against corpus size


def token_folder(path: Path, token_mb: float, seed: int) -> Path:
    """A token folder of about ``token_mb`` MB (uint16 byte-tokenizer ids: half as many bytes of text)."""
    text = path.with_suffix(".txt")
    rng = random.Random(seed)
    chunk = "".join(rng.choice("abcdefghij klmnop qrstuv wxyz.,") for _ in range(1 << 20))  # 1 MB, repeated
    remaining = int(token_mb * 1e6 / 2)
    with open(text, "w", encoding="ascii") as f:
        while remaining > 0:
            piece = chunk[: min(len(chunk), remaining)]
            f.write(piece.replace(".", ".\n\n", 3))  # blank lines: a few documents per MB
            remaining -= len(piece)
    mf.data.prepare(text, mf.ByteTokenizer(), path, progress=False)
    text.unlink()
    return path


_TRAIN = """
import resource, sys, torch
import minillm_func as mf
folder, steps, max_length, batch, dim, n_layers = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(1)
data = mf.data.TokenShards(folder, max_length)
model = mf.build_model(mf.ModelConfig(vocab_size=data.tokenizer.vocab_size, dim=dim, n_layers=n_layers, n_heads=4,
                                      max_seq_len=max_length))
trainer = mf.create_trainer("pretrain", model, learning_rate=1e-3)
state = trainer.fit(trainer.init(model.init(0)), mf.Batches(data, batch, seed=0), steps, progress=False)
print(len(data), data.num_tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def memory_race(size: dict, work: Path) -> list[dict]:
    rows = []
    for name, mb in (("small", size["small_mb"]), ("large", size["large_mb"])):
        folder = token_folder(work / f"tokens-{name}", mb, seed=1)
        on_disk = sum(f.stat().st_size for f in folder.iterdir())
        args = [str(folder), *(str(size[k]) for k in ("steps", "max_length", "batch", "dim", "n_layers"))]
        out = subprocess.run([sys.executable, "-c", _TRAIN, *args], capture_output=True, text=True, check=True)
        blocks, tokens, peak = map(int, out.stdout.split()[-3:])
        rows.append({"corpus": f"{on_disk / 1e6:.0f} MB", "tokens": tokens, "blocks": blocks, "peak": peak})
        shutil.rmtree(folder)
    for r in rows:
        r["ratio"] = r["peak"] / rows[0]["peak"]
    return rows


def memory_table(rows: list[dict], size: dict) -> str:
    lines = [f"peak resident memory of {size['steps']} pretraining updates (batch {size['batch']} x "
             f"{size['max_length']}, dim {size['dim']}) over a token folder", "",
             "| token folder | tokens | blocks | peak RSS | ratio to the small one |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['tokens']:,} | {r['blocks']:,} | {r['peak'] / 2**20:.0f} MiB | "
                     f"{r['ratio']:.3f} |")
    return "\n".join(lines)


def main():
    parser = arguments(__doc__, threads=1)
    parser.add_argument("--only", choices=["prepare", "memory", "packing"])
    args = parse(parser)
    print(f"# {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "prepare"):
            print(prepare_table(prepare_race(PREPARE_TINY if args.tiny else PREPARE_FULL, work)) + "\n", flush=True)
        if args.only in (None, "memory"):
            size = MEMORY_TINY if args.tiny else MEMORY_FULL
            print(memory_table(memory_race(size, work), size) + "\n", flush=True)
        if args.only in (None, "packing"):
            for kind in ("sft", "dpo"):
                print(packing_table(kind, packing(kind, PACK_TINY if args.tiny else PACK_FULL)) + "\n", flush=True)


if __name__ == "__main__":
    main()
