"""Token shards: prepare's files against independent references, TokenShards' epochs, resume and integrity.

The references: the shards are read back here with ``numpy.fromfile`` and the
index alone (not TokenShards); documents are compared with the input texts
(as ``read_records`` splits a text file); the token stream and the blocks with
``LanguageModelingDataset(texts, tok, L, pack=True)``; an interrupted prepare
with an uninterrupted one, file by file.
"""
import gzip
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func import checkpoint, cli
from minillm_func.data import Batches, LanguageModelingDataset, TokenShards, prepare, read_records

ROOT = Path(__file__).resolve().parents[1]
IGN = mf.IGNORE_INDEX
tok = mf.ByteTokenizer()
TEXTS = mf.demo_corpus(3, n_pretrain=60, n_sft=1, n_dpo=1).pretrain
UNICODE = ["héllo wörld ☃ — naïve café", "日本語のテキスト。𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 🙂🚀", "tab\tinside and  spaces"]
any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates included (JSON escapes them)
nonblank = any_text.filter(lambda s: s.strip())


# --------------------------------------------------------------------------- references


def read_shards(folder):
    """``(index, [document id arrays])`` read with numpy and the index alone."""
    index = json.loads((Path(folder) / "index.json").read_text())
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    docs = []
    for s in index["shards"]:
        ids = np.fromfile(Path(folder) / s["file"], dtype=dtype)
        offsets = np.load(Path(folder) / s["docs_file"])
        assert len(ids) == s["num_tokens"] and len(offsets) == s["num_documents"] + 1
        assert offsets[0] == 0 and offsets[-1] == len(ids) and np.all(np.diff(offsets) > 0)
        docs += [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    assert sum(map(len, docs)) == index["num_tokens"] and len(docs) == index["num_documents"]
    return index, docs


def packed_stream(texts, tokenizer) -> list[int]:
    """The stream LanguageModelingDataset(pack=True) builds, read back from its blocks' inputs."""
    ds = LanguageModelingDataset(texts, tokenizer, 16, pack=True)
    return [t for item in ds.items for t in item["input_ids"][item["attention_mask"].bool()].tolist()]


def folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def write_jsonl(path, texts, field="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")


class WideTokenizer:
    """A made-up tokenizer with 70,000 ids: each character is one id past the uint16 range (or just below it)."""

    vocab_size, pad_id, bos_id, eos_id, add_bos_token = 70_000, 0, None, 69_999, False

    def encode(self, text):
        return [60_000 + ord(c) % 9_000 for c in text]

    def to_json(self):
        return {"type": "wide"}


class CountingTokenizer:
    """Texts are numbers separated by spaces, each its own id: ids name their place in the stream."""

    vocab_size, pad_id, eos_id, bos_id, add_bos_token = 60_000, 0, 1, 2, True

    def encode(self, text):
        return [int(x) for x in text.split()]

    def to_json(self):
        return {"type": "counting"}


def counting_corpus(tmp, lengths, *, shard_tokens=50):
    """A token folder whose documents hold the ids 3, 4, 5, ... (each once), with the given lengths."""
    texts, nxt = [], 3
    for n in lengths:
        texts.append(" ".join(str(i) for i in range(nxt, nxt + n)))
        nxt += n
    write_jsonl(Path(tmp) / "c.jsonl", texts)
    return prepare(Path(tmp) / "c.jsonl", CountingTokenizer(), Path(tmp) / "tokens", shard_tokens=shard_tokens,
                   progress=False)


# --------------------------------------------------------------------------- prepare: what it writes


def corpus_folder(root: Path) -> list[str]:
    """A folder of every input format, nested; returns the documents in the order prepare reads them (paths sorted)."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    texts = TEXTS[:40] + UNICODE
    parts = [texts[0:6], texts[6:12], texts[12:18], texts[18:24], texts[24:30], texts[30:36], texts[36:]]
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("\ufeff" + "\r\n\r\n".join(parts[0]) + "\n\n\n", encoding="utf-8")  # BOM, CRLF
    with gzip.open(root / "b" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(parts[1]))
    write_jsonl(root / "b" / "d.jsonl", parts[2])
    write_jsonl(root / "b" / "e.jsonl.gz", parts[3])
    datasets.Dataset.from_dict({"text": parts[4], "n": list(range(len(parts[4])))}).to_parquet(root / "f.parquet")
    datasets.Dataset.from_dict({"text": parts[5]}).save_to_disk(str(root / "g_saved"))
    table = pa.table({"text": parts[6]})
    with pa.OSFile(str(root / "h.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (root / "README.md").write_text("not a corpus file")
    # sorted walk: a.txt, b/c.txt.gz, b/d.jsonl, b/e.jsonl.gz, f.parquet, g_saved/, h.arrow
    return [t for p in parts for t in p]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_documents_round_trip_over_every_format_and_several_shards(tmp_path, kind):
    expected = corpus_folder(tmp_path / "corpus")
    tokenizer = tok if kind == "byte" else mf.BPETokenizer.train(TEXTS + UNICODE, vocab_size=400)
    with pytest.warns(UserWarning, match="skipped 1 file"):
        out = prepare(tmp_path / "corpus", tokenizer, tmp_path / "tokens", shard_tokens=1500, progress=False)
    index, docs = read_shards(out)
    assert len(index["shards"]) > 3 and index["dtype"] == "uint16"
    assert [tokenizer.decode(d.tolist()) for d in docs] == expected
    assert all(d[-1] == tokenizer.eos_id for d in docs) and docs[0][0] == tokenizer.bos_id
    assert np.concatenate(docs).tolist() == packed_stream(expected, tokenizer)
    assert mf.data.load_tokenizer(index["tokenizer"]).to_json() == tokenizer.to_json()
    assert TokenShards(out, 8).tokenizer.to_json() == tokenizer.to_json()


@given(st.lists(nonblank, min_size=1, max_size=8), st.integers(1, 60))
def test_jsonl_documents_round_trip_exactly_in_any_shard_size(texts, shard_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(Path(tmp) / "x.jsonl", texts)
        out = prepare(Path(tmp) / "x.jsonl", tok, Path(tmp) / "t", shard_tokens=shard_tokens, progress=False)
        index, docs = read_shards(out)
        assert [tok.decode(d.tolist()) for d in docs] == texts
        assert np.concatenate(docs).tolist() == packed_stream(texts, tok)
        # a shard closes at the document that brings it to shard_tokens, never inside one
        assert all(s["num_tokens"] >= shard_tokens for s in index["shards"][:-1])


text_pieces = st.lists(st.sampled_from(["a", "b c", " ", "\n", "\r\n", "\n\n", "\r", "é", "☃", "🙂", "\t", "\ufeff"]),
                       max_size=30)


@given(text_pieces, st.integers(1, 9))
def test_text_files_split_into_documents_as_read_records_does(pieces, chunk):
    text = "".join(pieces)
    assume(text.strip())
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(mf.data.shards, "_READ_CHUNK", chunk)  # chunk ends everywhere: inside \r\n and characters
        path = Path(tmp) / "x.txt"
        path.write_bytes(("\ufeff" + text).encode("utf-8"))
        expected = [r["text"] for r in read_records(path)[1]]
        if not expected:
            with pytest.raises(ValueError, match="no documents"):
                prepare(path, tok, Path(tmp) / "t", progress=False)
            assert not (Path(tmp) / "t").exists()  # no half-made folder left to block the next prepare
            return
        _, docs = read_shards(prepare(path, tok, Path(tmp) / "t", progress=False))
        assert [tok.decode(d.tolist()) for d in docs] == expected


def test_empty_records_are_skipped_and_counted_and_a_bad_record_names_its_line(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", ["one", "  ", "two", None])
    index, docs = read_shards(prepare(tmp_path / "x.jsonl", tok, tmp_path / "t", progress=False))
    assert [tok.decode(d.tolist()) for d in docs] == ["one", "two"] and index["skipped_empty"] == 2
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"y\.jsonl:2: no 'text' field .*text_field="):
        prepare(tmp_path / "y.jsonl", tok, tmp_path / "u", progress=False)
    write_jsonl(tmp_path / "z.jsonl", ["a", "b"], field="body")
    _, docs = read_shards(prepare(tmp_path / "z.jsonl", tok, tmp_path / "v", text_field="body", progress=False))
    assert len(docs) == 2
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.md: prepare cannot read this file; it reads \.txt"):
        prepare(tmp_path / "notes.md", tok, tmp_path / "w", progress=False)


def test_dtype_is_uint16_up_to_65536_ids_and_uint32_beyond(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", UNICODE)
    index, docs = read_shards(prepare(tmp_path / "x.jsonl", tok, tmp_path / "byte", progress=False))
    assert index["dtype"] == "uint16"
    assert (tmp_path / "byte" / "shard-00000.bin").stat().st_size == 2 * index["num_tokens"]
    wide = WideTokenizer()
    index, docs = read_shards(prepare(tmp_path / "x.jsonl", wide, tmp_path / "wide", progress=False))
    assert index["dtype"] == "uint32"
    assert (tmp_path / "wide" / "shard-00000.bin").stat().st_size == 4 * index["num_tokens"]
    assert [d.tolist() for d in docs] == [wide.encode(t) + [wide.eos_id] for t in UNICODE]  # no BOS: it adds none
    assert max(max(d) for d in docs) > 65_535
    item = TokenShards(tmp_path / "wide", 4, tokenizer=wide)[0]
    assert item["input_ids"].tolist() == wide.encode(UNICODE[0])[:4]

    class Lying(WideTokenizer):
        vocab_size = 1000  # but its ids go past 65535

    with pytest.raises(ValueError, match="produced id .* outside uint16"):
        prepare(tmp_path / "x.jsonl", Lying(), tmp_path / "lying", progress=False)


# --------------------------------------------------------------------------- prepare: resume, re-runs, refusals


class Stop(Exception):
    pass


def stop_after(k):
    def hook(entry):
        if entry["file"] == f"shard-{k:05d}.bin":
            raise Stop
    return hook


@pytest.mark.parametrize("k, kind", [(0, "byte"), (2, "byte"), (5, "byte"), (2, "wide"), (1, "hf")])
def test_an_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, k, kind):
    write_jsonl(tmp_path / "a.jsonl", TEXTS[:30])
    (tmp_path / "b.txt").write_text("\n\n".join(TEXTS[30:]))
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.txt"]
    if kind == "hf":  # a Hugging Face folder's tokenizer: the tokenizers backend, its spec kept as first written
        mf.BPETokenizer.train(TEXTS, vocab_size=300).save_pretrained(tmp_path / "hf")
    tokenizer = {"byte": tok, "wide": WideTokenizer(), "hf": None}[kind] or mf.HFTokenizer.from_folder(tmp_path / "hf")
    whole = prepare(inputs, tokenizer, tmp_path / "whole", shard_tokens=1000, progress=False)
    with pytest.raises(Stop):
        prepare(inputs, tokenizer, tmp_path / "cut", shard_tokens=1000, progress=False, on_shard=stop_after(k))
    cut = tmp_path / "cut"
    assert not (cut / "index.json").exists() and (cut / "progress.json").exists()
    with pytest.raises(ValueError, match="prepare has not finished .* run the same prepare command again"):
        TokenShards(cut, 8)
    # what a kill -9 can leave: the next shard half-written, or written but not yet recorded
    (cut / f".shard-{k + 1:05d}.bin.tmp").write_bytes(b"\x01\x02\x03")
    (cut / f"shard-{k + 1:05d}.bin").write_bytes(b"garbage")
    prepare(inputs, tokenizer, cut, shard_tokens=1000, progress=False)
    assert folder_bytes(cut) == folder_bytes(whole)
    if kind == "hf":
        _, docs = read_shards(cut)
        assert [tokenizer.decode(d.tolist()) for d in docs] == TEXTS


def test_a_trained_bpe_is_kept_for_the_resumed_run(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXTS)
    args = (tmp_path / "a.jsonl", "bpe:300")
    whole = prepare(*args, tmp_path / "whole", shard_tokens=2000, progress=False, bpe_sample_bytes=4000)
    with pytest.raises(Stop):
        prepare(*args, tmp_path / "cut", shard_tokens=2000, progress=False, bpe_sample_bytes=4000,
                on_shard=stop_after(1))
    trained = json.loads((tmp_path / "cut" / "progress.json").read_text())["tokenizer"]
    prepare(*args, tmp_path / "cut", shard_tokens=2000, progress=False, bpe_sample_bytes=4000)
    index, docs = read_shards(tmp_path / "cut")
    assert index["tokenizer"] == trained and index["tokenizer"]["type"] == "bpe"
    assert [TokenShards(tmp_path / "cut", 8).tokenizer.decode(d.tolist()) for d in docs] == TEXTS
    assert folder_bytes(tmp_path / "cut") == folder_bytes(whole)  # BPE training is deterministic


@pytest.mark.slow  # a process of its own (seconds to import torch); the fast tests stop prepare with on_shard
def test_a_kill_9_mid_prepare_resumes_to_the_same_bytes(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXTS * 3)
    whole = prepare(tmp_path / "a.jsonl", tok, tmp_path / "whole", shard_tokens=400, progress=False)
    script = ("import sys, time; from minillm_func.data import prepare, ByteTokenizer\n"
              "prepare(sys.argv[1], ByteTokenizer(), sys.argv[2], shard_tokens=400, progress=False,\n"
              "        on_shard=lambda e: time.sleep(0.02))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "a.jsonl"), str(tmp_path / "cut")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress, deadline = tmp_path / "cut" / "progress.json", time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(progress.read_text())["shards"]) >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "index.json").exists()  # it was stopped mid-run
    prepare(tmp_path / "a.jsonl", tok, tmp_path / "cut", shard_tokens=400, progress=False)
    assert folder_bytes(tmp_path / "cut") == folder_bytes(whole)


def test_a_finished_folder_is_kept_and_one_made_otherwise_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXTS[:5])
    out = prepare(tmp_path / "a.jsonl", tok, tmp_path / "t", shard_tokens=500, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare(tmp_path / "a.jsonl", tok, out, shard_tokens=500, progress=False)  # a no-op
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    for change, what in [(dict(shard_tokens=501), "another shard_tokens"), (dict(text_field="body"), "text_field"),
                         (dict(tokenizer=mf.BPETokenizer.train(TEXTS, vocab_size=300)), "another tokenizer")]:
        kwargs = {"tokenizer": tok, "shard_tokens": 500, **change}
        with pytest.raises(ValueError, match=f"prepared with .*{what}.*prepare into another folder, or delete"):
            prepare(tmp_path / "a.jsonl", kwargs.pop("tokenizer"), out, progress=False, **kwargs)
    write_jsonl(tmp_path / "a.jsonl", TEXTS[:6])  # the input changed
    with pytest.raises(ValueError, match="other inputs"):
        prepare(tmp_path / "a.jsonl", tok, out, shard_tokens=500, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds other files"):
        prepare(tmp_path / "a.jsonl", tok, tmp_path / "busy", progress=False)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        prepare(tmp_path / "missing.jsonl", tok, tmp_path / "x", progress=False)


# --------------------------------------------------------------------------- integrity


def test_corrupted_truncated_or_missing_files_are_one_line_errors_naming_them(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXTS[:20])
    out = prepare(tmp_path / "a.jsonl", tok, tmp_path / "t", shard_tokens=1000, progress=False)
    TokenShards(out, 16)  # intact
    shard = out / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00001\.bin is corrupted .*run prepare again") as e:
        TokenShards(out, 16)
    assert "\n" not in str(e.value)
    TokenShards(out, 16, verify=False)  # sizes only: a flipped byte passes, as documented
    shard.write_bytes(bytes(data[:-3]))
    with pytest.raises(ValueError, match=r"shard-00001\.bin holds \d+ bytes, and index.json says"):
        TokenShards(out, 16, verify=False)
    docs = out / "shard-00002.docs.npy"
    raw = bytearray(docs.read_bytes())
    raw[-1] ^= 0x40
    docs.write_bytes(bytes(raw))
    shard.unlink()
    with pytest.raises(ValueError, match=r"shard-00001\.bin is missing"):
        TokenShards(out, 16)
    with pytest.raises(FileNotFoundError, match="no such token folder"):
        TokenShards(tmp_path / "nowhere", 16)


# --------------------------------------------------------------------------- TokenShards


@given(st.lists(nonblank, min_size=1, max_size=6), st.integers(2, 12), st.integers(1, 40))
def test_blocks_are_the_items_of_the_packed_dataset(texts, max_length, shard_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(Path(tmp) / "x.jsonl", texts)
        out = prepare(Path(tmp) / "x.jsonl", tok, Path(tmp) / "t", shard_tokens=shard_tokens, progress=False)
        shards, ref = TokenShards(out, max_length), LanguageModelingDataset(texts, tok, max_length, pack=True)
        assert len(shards) == len(ref)
        for i in range(len(ref)):  # blocks straddle shards wherever shard_tokens puts their ends
            got = shards[i]
            assert set(got) == set(ref[i]) and all(torch.equal(got[k], ref[i][k]) for k in ref[i])


@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.integers(1, 9), st.integers(1, 7),
       st.integers(0, 1000))
def test_every_token_is_an_input_exactly_once_per_epoch_and_two_ranks_split_it(lengths, max_length, batch, seed):
    with tempfile.TemporaryDirectory() as tmp:
        counting = CountingTokenizer()
        data = TokenShards(counting_corpus(tmp, lengths, shard_tokens=17), max_length, tokenizer=counting)
        n_ids = sum(lengths) + 3  # pad 0, eos 1, bos 2, then the documents' ids

        def inputs(batches):
            ids = [b["input_ids"][b["attention_mask"].bool()] for b in batches]
            return torch.cat(ids).numpy() if ids else np.zeros(0, np.int64)

        seen = inputs(Batches(data, batch, seed=seed, epochs=1))
        counts = np.bincount(seen, minlength=n_ids)
        assert counts[0] == 0 and counts[1] == len(lengths) and counts[2] == 1 and np.all(counts[3:] == 1)
        assert len(seen) == data.num_tokens
        if batch >= 2 and len(data) % batch in (0,) + tuple(range(2, batch)):
            ranks = [inputs(Batches(data, batch, seed=seed, epochs=1, rank=r, world_size=2)) for r in range(2)]
            mine = [set(x.tolist()) - {1} for x in ranks]
            assert not mine[0] & mine[1]  # disjoint
            assert np.array_equal(np.sort(np.concatenate(ranks)), np.sort(seen))  # together: the epoch


@given(st.integers(1, 6), st.integers(0, 30), st.integers(0, 100), st.sampled_from(["blocks", "windows"]))
def test_a_saved_position_resumes_the_same_batches_bit_for_bit(batch, stop, seed, mode):
    with tempfile.TemporaryDirectory() as tmp:
        out = counting_corpus(tmp, [40, 7, 13, 25])
        data = TokenShards(out, 8, mode=mode, seed=seed, tokenizer=CountingTokenizer())
        reference = list(Batches(data, batch, seed=seed, epochs=3))
        first = Batches(data, batch, seed=seed, epochs=3)
        it = iter(first)
        seen = [next(it) for _ in range(min(stop, len(reference)))]
        again = TokenShards(out, 8, mode=mode, seed=seed, tokenizer=CountingTokenizer())  # a new process, say
        resumed = list(Batches(again, batch, seed=seed, epochs=3, position=first.position))
        for x, y in zip(seen + resumed, reference, strict=True):
            assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in y)


def test_windows_are_random_consecutive_tokens_drawn_from_seed_epoch_and_index(tmp_path):
    counting = CountingTokenizer()
    out = counting_corpus(tmp_path, [500])  # the stream: 2 (bos), 3, 4, ..., 502, 1 (eos)
    data = TokenShards(out, 16, mode="windows", seed=7, tokenizer=counting)
    assert len(data) == (data.num_tokens - 1) // 16
    stream = np.array([2, *range(3, 503), 1])
    offsets = []
    for i in range(len(data)):
        item = data[i]
        o = int(np.flatnonzero(stream == int(item["input_ids"][0]))[0])
        offsets.append(o)
        assert item["input_ids"].tolist() == stream[o:o + 16].tolist()
        assert item["labels"].tolist() == stream[o + 1:o + 17].tolist()  # aligned: the next token
        assert bool(item["attention_mask"].all())
    assert 0 <= min(offsets) and max(offsets) <= data.num_tokens - 17 and len(set(offsets)) > len(data) // 2

    def epoch(seed, e):
        d = TokenShards(out, 16, mode="windows", seed=seed, tokenizer=counting)
        return torch.stack([d.for_epoch(e)[i]["input_ids"] for i in range(len(d))])

    assert torch.equal(epoch(7, 0), torch.stack([data[i]["input_ids"] for i in range(len(data))]))
    # deterministic: another process (another hash seed, another allocator) draws the same windows
    script = ("import sys, json, types\nfrom minillm_func.data import TokenShards, read_index\n"
              "spec = read_index(sys.argv[1])['tokenizer']\n"  # the test's own tokenizer, by its spec
              "tok = types.SimpleNamespace(to_json=lambda: spec, pad_id=0)\n"
              "d = TokenShards(sys.argv[1], 16, mode='windows', seed=7, verify=False, tokenizer=tok)\n"
              "print(json.dumps([int(d.window_offset(i, 1)) for i in range(len(d))]))")
    other = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, check=True)
    here = [int(data.window_offset(i, 1)) for i in range(len(data))]
    assert json.loads(other.stdout) == here
    assert not torch.equal(epoch(7, 1), epoch(7, 0))  # new windows every epoch
    assert not torch.equal(epoch(8, 0), epoch(7, 0))  # and for another seed
    batches = [b["input_ids"] for b in Batches(data, 4, seed=0, epochs=2, shuffle=False)]
    half = len(batches) // 2
    assert torch.equal(torch.cat(batches[:half]), epoch(7, 0)) and torch.equal(torch.cat(batches[half:]), epoch(7, 1))


def test_bad_arguments_teach_the_right_call(tmp_path):
    out = counting_corpus(tmp_path, [5])
    counting = CountingTokenizer()
    with pytest.raises(ValueError, match="mode must be 'blocks'"):
        TokenShards(out, 4, mode="random", tokenizer=counting)
    with pytest.raises(ValueError, match="too few for a window"):
        TokenShards(out, 50, mode="windows", tokenizer=counting)
    with pytest.raises(ValueError, match="was tokenised with .* not with the tokenizer given"):
        TokenShards(out, 4, tokenizer=tok)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        TokenShards(out, 0, tokenizer=counting)


def test_batches_keep_an_epoch_order_in_8_bytes_per_item():
    class Many:
        tokenizer = tok

        def __len__(self):
            return 3_000_000

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([i])}

    b = Batches(Many(), 16, seed=0)
    order, batch_ids = b.epoch_indices(0)
    assert order.dtype == torch.int64 and order.numel() == 3_000_000 and batch_ids.numel() == len(b)
    first = next(iter(b))["input_ids"][:, 0]
    # the documented order, drawn independently: torch.randperm from the (seed, epoch) generator
    assert torch.equal(first, torch.randperm(3_000_000, generator=torch.Generator().manual_seed(0))[:16])


# --------------------------------------------------------------------------- the command


TINY = ["--dim", "32", "--n-layers", "1", "--n-heads", "4", "--max-length", "32", "--batch-size", "4",
        "--no-progress"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *, contains=()):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("minillm-func: error: "), (code, err)
    assert "Traceback" not in err
    for text in contains:
        assert text in lines[0], lines[0]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pre.txt").write_text("\n\n".join(TEXTS[:30]))
    return tmp_path


def test_cli_trains_on_a_token_folder_as_on_its_text_and_resumes(corpus, capsys):
    code, out, err = run(capsys, "prepare", "--data", "pre.txt", "--out", "tokens", "--shard-tokens", "700",
                         "--no-progress")
    assert code == 0 and "30 documents" in out and "shard(s)" in out, err
    flags = ["--T-max", "5", "--checkpoint-every", "1", *TINY]
    assert run(capsys, "train", "pretrain", "--data", "tokens", "--out", "a", "--steps", "3", *flags)[0] == 0
    code, out, err = run(capsys, "train", "pretrain", "--out", "a", "--steps", "5", "--resume", *flags)
    assert code == 0 and "resuming pretrain at update 3" in out, err
    assert run(capsys, "train", "pretrain", "--data", "pre.txt", "--out", "b", "--steps", "5", *flags)[0] == 0
    a, b = (checkpoint.load(checkpoint.resolve(r))[0].params for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in b)  # the same blocks, batches and updates as from the text
    assert json.loads((corpus / "a" / "config.json").read_text())["tokenizer"] == "data"
    code, out, _ = run(capsys, "eval", "--ckpt", "a", "--data", "tokens")
    assert code == 0 and json.loads(out)["kind"] == "pretrain"


def test_cli_refuses_in_one_line(corpus, capsys):
    assert run(capsys, "prepare", "--data", "pre.txt", "--out", "tokens", "--shard-tokens", "700",
               "--no-progress")[0] == 0
    cases = [
        (["prepare", "--data", "nope.txt", "--out", "t2"], ["--data nope.txt: no such file or folder"]),
        (["prepare", "--data", "pre.txt", "--out", "t2", "--tokenizer", "bpe:x"], ["whole number"]),
        (["prepare", "--data", "pre.txt", "--out", "tokens", "--shard-tokens", "900", "--no-progress"],
         ["another shard_tokens", "prepare into another folder"]),
        (["train", "sft", "--data", "tokens", "--out", "r", "--steps", "1", *TINY], ["for pretraining"]),
        (["train", "pretrain", "--data", "tokens", "--out", "r", "--steps", "1", "--tokenizer", "bpe:300", *TINY],
         ["conflicts with --data tokens", "drop --tokenizer"]),
    ]
    for argv, contains in cases:
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, contains=contains)
    shard = corpus / "tokens" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run(capsys, "train", "pretrain", "--data", "tokens", "--out", "r", "--steps", "1", *TINY)
    assert_one_line_error(code, err, contains=["shard-00001.bin is corrupted", "run prepare again"])
    (corpus / "tokens" / "index.json").unlink()
    code, _, err = run(capsys, "train", "pretrain", "--data", "tokens", "--out", "r", "--steps", "1", *TINY)
    assert_one_line_error(code, err, contains=["no index.json"])


def test_cli_prepare_trains_a_bpe_on_a_bounded_sample(corpus, capsys):
    code, out, err = run(capsys, "prepare", "--data", "pre.txt", "--out", "t", "--tokenizer", "bpe:300",
                         "--bpe-sample-mb", "0.004", "--no-progress")
    assert code == 0, err
    index = json.loads((corpus / "t" / "index.json").read_text())
    assert index["source"]["tokenizer"] == {"train_bpe": 300, "sample_bytes": int(0.004 * 2**20)}
    assert TokenShards(corpus / "t", 8).tokenizer.vocab_size <= 300
    code, _, err = run(capsys, "prepare", "--data", "pre.txt", "--out", "u", "--bpe-sample-mb", "1")
    assert_one_line_error(code, err, contains=["needs --tokenizer bpe:VOCAB"])
