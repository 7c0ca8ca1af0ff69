import json
import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func.data import Batches, collate, load_dataset, read_records
from minillm_func.data import demo_tasks as demo

IGN = mf.IGNORE_INDEX
tok = mf.ByteTokenizer()
any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates included
words = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=30)
nonblank = words.filter(lambda s: s.strip())


# --------------------------------------------------------------------------- tokenizers


@given(any_text)
def test_byte_tokenizer_round_trips_any_string(text):
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials are dropped


def test_bpe_tokenizer_trains_saves_and_loads(tmp_path):
    pytest.importorskip("tokenizers")
    texts = mf.demo_corpus(0, n_pretrain=200).pretrain
    bpe = mf.BPETokenizer.train(texts, vocab_size=400)
    assert 259 < bpe.vocab_size <= 400
    sample = "The reverse of abc is cba. Ünïcödé ✓"
    ids = bpe.encode(sample)
    assert bpe.decode(ids) == sample
    assert len(ids) < len(tok.encode(sample))  # merges compress
    assert {bpe.pad_id, bpe.bos_id, bpe.eos_id} == {0, 1, 2}
    bpe.save(tmp_path / "tok.json")
    again = mf.BPETokenizer.load(tmp_path / "tok.json")
    assert again.encode(sample) == ids and again.vocab_size == bpe.vocab_size
    assert mf.data.load_tokenizer(bpe.to_json()).encode(sample) == ids
    cfg = mf.ModelConfig(vocab_size=bpe.vocab_size, dim=16, n_layers=1, n_heads=2)
    assert cfg.padded_vocab_size % 64 == 0 and cfg.padded_vocab_size >= bpe.vocab_size


# --------------------------------------------------------------------------- language modelling


def check_aligned(item):
    ids, labels = item["input_ids"], item["labels"]
    counted = labels != IGN
    assert torch.equal(labels[:-1][counted[:-1]], ids[1:][counted[:-1]])


@given(st.lists(nonblank, min_size=1, max_size=5), st.integers(2, 40))
def test_unpacked_items_have_max_length_and_aligned_labels(texts, max_length):
    ds = mf.LanguageModelingDataset(texts, tok, max_length)
    assert len(ds) == len(texts)
    for text, item in zip(texts, ds):
        assert all(v.shape == (max_length,) for v in item.values())
        check_aligned(item)
        real = item["attention_mask"].bool()
        assert torch.all(item["labels"][~real] == IGN) and torch.all(item["input_ids"][~real] == tok.pad_id)
        assert item["labels"][-1] == IGN
        full = [tok.bos_id, *tok.encode(text), tok.eos_id]
        assert item["input_ids"][real].tolist() == full[:max_length]
        assert int((item["labels"] != IGN).sum()) == min(len(full), max_length) - 1


@given(st.lists(nonblank, min_size=1, max_size=6), st.integers(2, 30))
def test_packing_loses_no_token_and_separates_documents_with_eos(texts, max_length):
    ds = mf.LanguageModelingDataset(texts, tok, max_length, pack=True)
    stream = [tok.bos_id]
    for t in texts:
        stream += tok.encode(t) + [tok.eos_id]
    inputs = torch.cat([it["input_ids"][it["attention_mask"].bool()] for it in ds]).tolist()
    targets = torch.cat([it["labels"][it["labels"] != IGN] for it in ds]).tolist()
    assert inputs == stream  # every token is an input exactly once
    assert targets == stream[1:]  # and a target exactly once
    assert all(it["attention_mask"].all() for it in list(ds)[:-1])  # only the last block is padded
    for it in ds:
        check_aligned(it)


# --------------------------------------------------------------------------- conversations


@given(words, any_text, st.integers(2, 60))
def test_supervised_positions_are_exactly_the_reply(prompt, reply, max_length):
    p_ids, r_ids = tok.encode(prompt), tok.encode(reply) + [tok.eos_id]
    room = max_length - 1 - len(p_ids)
    if room < 1:
        with pytest.raises(ValueError, match="too small"):
            mf.ConversationDataset([{"prompt": prompt, "completion": reply}], tok, max_length)
        return
    item = mf.ConversationDataset([{"prompt": prompt, "completion": reply}], tok, max_length)[0]
    counted = (item["labels"] != IGN).nonzero().flatten().tolist()
    n = min(len(r_ids), room)
    assert len(counted) == n
    assert counted == list(range(len(p_ids), len(p_ids) + n))  # the positions just before each reply token
    assert item["labels"][counted].tolist() == r_ids[:n]
    assert item["input_ids"][: 1 + len(p_ids)].tolist() == [tok.bos_id, *p_ids][:max_length]
    check_aligned(item)


def test_examples_without_room_are_dropped_and_counted():
    examples = [{"prompt": "x" * 30, "completion": "y"}, {"prompt": "hi", "completion": "there"}]
    with pytest.warns(UserWarning, match="1 of 2 examples"):
        ds = mf.ConversationDataset(examples, tok, 10)
    assert len(ds) == 1 and ds.num_dropped == 1 and ds.dropped == [0]


def test_multi_turn_messages_supervise_every_assistant_turn():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    item = mf.ConversationDataset([{"messages": msgs}], tok, 200)[0]
    supervised = item["labels"][item["labels"] != IGN].tolist()
    assert supervised == tok.encode("hello") + [tok.eos_id] + tok.encode("ciao") + [tok.eos_id]
    text = tok.decode(item["input_ids"].tolist())
    assert text == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\nhello<|user|>\nbye\n<|assistant|>\nciao"
    prompt = mf.data.chat_prompt(msgs[:2], tok)
    assert tok.decode(prompt) == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"


def test_trl_conversational_lists_in_the_built_in_format():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    reply = [{"role": "assistant", "content": "hello"}]
    as_lists = mf.ConversationDataset([{"prompt": msgs, "completion": reply}], tok, 200)[0]
    as_messages = mf.ConversationDataset([{"messages": msgs + reply}], tok, 200)[0]
    assert torch.equal(as_lists["input_ids"], as_messages["input_ids"])
    assert torch.equal(as_lists["labels"], as_messages["labels"])
    # a few-shot assistant turn inside the prompt is not learned; only the completion is
    shots = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": "hi"}]
    item = mf.ConversationDataset([{"prompt": shots, "completion": reply}], tok, 200)[0]
    assert item["labels"][item["labels"] != IGN].tolist() == tok.encode("hello") + [tok.eos_id]
    rejected = [{"role": "assistant", "content": "yo"}]
    pair = mf.PreferenceDataset([{"prompt": msgs, "chosen": reply, "rejected": rejected}], tok, 200)[0]
    same = mf.PreferenceDataset([{"prompt": msgs, "chosen": "hello", "rejected": "yo"}], tok, 200)[0]
    assert all(torch.equal(pair[k], same[k]) for k in same)
    with pytest.raises(ValueError, match="'completion' must start with an assistant message"):
        mf.ConversationDataset([{"prompt": "a", "completion": [{"role": "user", "content": "b"}]}], tok, 16)
    with pytest.raises(ValueError, match="field 'chosen' must be a string, got int .*list of messages"):
        mf.PreferenceDataset([{"prompt": "a", "chosen": 1, "rejected": "b"}], tok, 16)


def test_start_ids_follow_the_tokenizers_bos_rule():
    class NoBos(mf.ByteTokenizer):
        add_bos_token = False

    assert mf.data.start_ids(tok) == [tok.bos_id]
    item = mf.LanguageModelingDataset(["ab"], NoBos(), 8)[0]
    assert item["input_ids"][item["attention_mask"].bool()].tolist() == tok.encode("ab") + [tok.eos_id]
    item = mf.ConversationDataset([{"prompt": "a", "completion": "b"}], NoBos(), 8)[0]
    assert item["input_ids"].tolist() == tok.encode("ab") + [tok.eos_id]
    assert item["labels"].tolist() == [*tok.encode("b"), tok.eos_id, IGN]


# --------------------------------------------------------------------------- preferences


@given(words, nonblank, nonblank, st.integers(8, 60))
def test_preference_items_share_the_prompt_and_supervise_only_replies(prompt, chosen, rejected, max_length):
    p = len(tok.encode(prompt)) + 1
    assume(p < max_length)  # room for at least one reply token
    item = mf.PreferenceDataset([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tok, max_length)[0]
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
        assert ids[:p].tolist() == [tok.bos_id, *tok.encode(prompt)]
        assert torch.all(labels[: p - 1] == IGN)
        assert labels[labels != IGN].tolist() == (tok.encode(reply) + [tok.eos_id])[: max_length - p]
    batch = collate([item, item], pad_id=tok.pad_id)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape


# --------------------------------------------------------------------------- collation and batches


@given(st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=12), min_size=1, max_size=5),
       st.sampled_from([None, 8]))
def test_collate_round_trips(seqs, multiple):
    items = [{"input_ids": torch.tensor(s), "labels": torch.tensor(s[1:] + [IGN])} for s in seqs]
    batch = collate(items, pad_id=tok.pad_id, pad_to_multiple_of=multiple)
    T = batch["input_ids"].shape[1]
    assert T == (max(map(len, seqs)) if multiple is None else 8 * -(-max(map(len, seqs)) // 8))
    for i, s in enumerate(seqs):
        n = int(batch["attention_mask"][i].sum())
        assert n == len(s)
        assert batch["input_ids"][i, :n].tolist() == s and torch.equal(batch["labels"][i, :n], items[i]["labels"])
        assert torch.all(batch["input_ids"][i, n:] == tok.pad_id) and torch.all(batch["labels"][i, n:] == IGN)


def small_dataset(n=23):
    return mf.ConversationDataset([{"prompt": f"q{i}", "completion": "a" * (i % 7)} for i in range(n)], tok, 32)


@given(st.integers(0, 10_000), st.integers(1, 8), st.booleans(), st.booleans())
def test_batches_are_deterministic_per_seed_and_cover_each_epoch(seed, bs, drop_last, grouped):
    ds = small_dataset()
    mk = lambda: Batches(ds, bs, seed=seed, drop_last=drop_last, group_by_length=grouped)  # noqa: E731
    a, b = mk(), mk()
    assert a.epoch_order(0) == b.epoch_order(0) and a.epoch_order(1) == b.epoch_order(1)
    flat = sorted(i for batch in a.epoch_order(0) for i in batch)
    if drop_last:
        assert len(flat) == len(ds) // bs * bs and len(set(flat)) == len(flat)
    else:
        assert flat == list(range(len(ds)))
    assert len(a.epoch_order(0)) == len(a)


@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(0, 12))
def test_batches_resume_exactly(seed, bs, stop):
    ds = small_dataset()
    full = Batches(ds, bs, seed=seed, epochs=3)
    reference = list(full)
    first = Batches(ds, bs, seed=seed, epochs=3)
    it = iter(first)
    seen = [next(it) for _ in range(min(stop, len(reference)))]
    resumed = list(Batches(ds, bs, seed=seed, epochs=3, position=first.position))
    for x, y in zip(seen + resumed, reference, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in y)


def test_shuffle_changes_order_between_epochs_and_group_by_length_cuts_padding():
    ds = small_dataset(200)
    b = Batches(ds, 8, seed=1)
    assert b.epoch_order(0) != b.epoch_order(1)
    pad = lambda batches: sum(len(x) * max(ds.lengths()[i] for i in x) for x in batches)  # noqa: E731
    assert pad(Batches(ds, 8, seed=1, group_by_length=True).epoch_order(0)) < pad(b.epoch_order(0))


# --------------------------------------------------------------------------- files


def write(tmp_path, name, content, binary=False):
    p = tmp_path / name
    (p.write_bytes if binary else p.write_text)(content)
    return p


def jsonl(records):
    return "\n".join(json.dumps(r) for r in records) + "\n"


def test_files_of_each_kind_load_into_the_right_dataset(tmp_path):
    cases = {
        "pre.jsonl": ([{"text": "hello world"}, {"text": "more text"}], mf.LanguageModelingDataset, "pretrain"),
        "sft.jsonl": ([{"prompt": "a", "completion": "b"}], mf.ConversationDataset, "sft"),
        "chat.jsonl": ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                       mf.ConversationDataset, "sft"),
        "dpo.jsonl": ([{"prompt": "a", "chosen": "b", "rejected": "c"}], mf.PreferenceDataset, "dpo"),
    }
    for name, (records, cls, kind) in cases.items():
        path = write(tmp_path, name, jsonl(records))
        assert read_records(path) == (kind, records)
        assert isinstance(load_dataset(path, tok, 32, kind=kind), cls)
    txt = write(tmp_path, "book.txt", "First paragraph.\n\nSecond\nparagraph.\n")
    kind, records = read_records(txt)
    assert kind == "pretrain" and [r["text"] for r in records] == ["First paragraph.", "Second\nparagraph."]
    noext = write(tmp_path, "data", jsonl([{"text": "x"}]))
    assert read_records(noext)[0] == "pretrain"
    with pytest.raises(ValueError, match=r"holds sft records .* pretrain training needs"):
        load_dataset(tmp_path / "sft.jsonl", tok, 32, kind="pretrain")


def test_hf_style_dataset_objects_are_accepted():
    class Rows(list):  # what the loader relies on: iteration over dict rows and column_names
        column_names = ["prompt", "completion"]

    ds = load_dataset(Rows([{"prompt": "a", "completion": "b"}]), tok, 16, kind="sft")
    assert isinstance(ds, mf.ConversationDataset) and len(ds) == 1


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": broken}\n', r"bad.jsonl:2: not valid JSON"),
    ("missing.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"missing.jsonl:2: missing field 'completion'"),
    ("typed.jsonl", '{"prompt": "a", "completion": 3}\n', r"typed.jsonl:1: field 'completion' must be a string, got int"),
    ("empty.jsonl", "  \n\n", r"empty.jsonl: the file is empty"),
    ("emptytext.jsonl", '{"text": "a"}\n{"text": "  "}\n', r"emptytext.jsonl:2: 'text' is empty"),
    ("role.jsonl", '{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     r"role.jsonl:1: message 0 has unknown role 'human'; use one of system, user, assistant"),
    ("noreply.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n', r"noreply.jsonl:1: no 'assistant' message"),
    ("what.jsonl", '{"question": "a"}\n', r"what.jsonl:1: cannot tell what this record is for \(fields: 'question'\)"),
])
def test_bad_files_raise_errors_that_name_file_line_and_field(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(ValueError, match=message):
        read_records(path)


def test_non_utf8_files_and_tiny_max_length_are_refused_with_advice(tmp_path):
    path = write(tmp_path, "latin.txt", "caf\xe9 au lait".encode("latin-1"), binary=True)
    with pytest.raises(ValueError, match=r"latin.txt: not UTF-8 text \(byte 0xe9 at offset 3\); re-encode it"):
        read_records(path)
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        mf.ConversationDataset([{"prompt": "a", "completion": "b"}], tok, 1)
    with pytest.raises(ValueError, match="max_length=4 is too small to hold the prompt and one reply token"):
        mf.ConversationDataset([{"prompt": "long prompt", "completion": "b"}], tok, 4)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="not one string"):
        mf.LanguageModelingDataset("just a string", tok, 8)
    with pytest.raises(ValueError, match="drop_last=True would yield nothing"):
        Batches(small_dataset(3), 5, drop_last=True)


# --------------------------------------------------------------------------- demo corpus


def test_demo_corpus_is_deterministic_held_out_and_consistent():
    a, b = mf.demo_corpus(3), mf.demo_corpus(3)
    assert a == b and a != mf.demo_corpus(4)
    train_words = {ex["prompt"].split()[2] for ex in a.sft} | {ex["prompt"].split()[2] for ex in a.dpo}
    eval_words = {ex["word"] for ex in a.sft_eval} | {ex["prompt"].split()[2] for ex in a.dpo_eval}
    assert not train_words & eval_words
    pretrain_words = {w for doc in a.pretrain for w in re.findall(r"[a-z]+", doc)}
    assert not eval_words & pretrain_words  # held-out words never occur in pretraining text either
    for ex in a.sft_eval:
        assert demo.extract_answer(ex["answer"]) == ex["answer"] == demo.RULES[ex["rule"]](ex["word"])
    for ex in a.sft:
        rule, word = ex["prompt"].split()[1:3]
        assert demo.extract_answer(ex["completion"]) == demo.RULES[rule](word)
    styles = [demo.is_preferred_style(ex["completion"]) for ex in a.sft]
    assert 0.2 < sum(styles) / len(styles) < 0.45  # the preferred style is the minority after SFT data
    assert all(demo.is_preferred_style(p["chosen"]) and not demo.is_preferred_style(p["rejected"]) for p in a.dpo)
    # every split tokenises into its dataset without drops at the demo's length
    assert mf.ConversationDataset(a.sft, tok, 64).num_dropped == 0
    assert mf.PreferenceDataset(a.dpo, tok, 64).num_dropped == 0
