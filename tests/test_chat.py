"""HFTokenizer and chat templates against transformers, on tokenizers trained here (nothing is downloaded).

Each model family gets a folder like the one it ships: a byte-level BPE (or, for
Mistral, a SentencePiece-style BPE with byte fallback) trained on a few
sentences, the family's special tokens, pre-tokenizer, post-processor and
``tokenizer_class``, and its real chat template (tests/data/chat_templates,
sources in the README there). ``transformers.AutoTokenizer`` loads the same
folder; ids, renderings and masks must agree.
"""
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm_func as mf
from minillm_func.data import HFTokenizer, chat, load_tokenizer, tokenize_chat

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every folder here is local; nothing may be fetched
tk = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

IGN = mf.IGNORE_INDEX
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
DATE = {"date_string": "26 Jul 2024"}  # Llama 3.2 would otherwise print today's date

CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Ünïcödé text: café, naïve, 東京, Ελληνικά, emoji 🙂 and tabs\tand\nnewlines.",
    "def add(a, b):\n    return a + b  # Python code\n",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024",
    "What is 2 + 2? It is 4. Bye! See you soon. Four. Five.",
] * 10
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")


# --------------------------------------------------------------------------- family folders


def _byte_level_bpe(pre, specials, normalizer=None, added=()):
    t = tk.Tokenizer(models.BPE())
    t.normalizer = normalizer
    t.pre_tokenizer = pre
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_tokens([tk.AddedToken(a, special=False, normalized=False) for a in added])
    return t


def _split_byte_level(regex):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_family(name):
    """``(backend, tokenizer_config, generation_config)`` shaped like the family's shipped folder."""
    if name == "llama3":  # PreTrainedTokenizerFast; BOS from tokenizer.json's post-processor; no pad
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                    "<|eot_id|>", "<|python_tag|>"]
        t = _byte_level_bpe(_split_byte_level(LLAMA3_RE), specials)
        bos = t.token_to_id("<|begin_of_text|>")
        t.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
               "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072}
        gen = {"bos_token_id": bos,
               "eos_token_id": [t.token_to_id(s) for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]}
    elif name == "qwen":  # Qwen2Tokenizer (transformers rebuilds NFC + split + byte level); no BOS
        t = _byte_level_bpe(_split_byte_level(QWEN_RE), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            normalizer=normalizers.NFC(), added=["<tool_call>", "</tool_call>", "<think>", "</think>"])
        t.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        cfg = {"tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "bos_token": None,
               "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
               "split_special_tokens": False, "clean_up_tokenization_spaces": False, "model_max_length": 131072}
        gen = {"eos_token_id": [t.token_to_id("<|im_end|>"), t.token_to_id("<|endoftext|>")]}
    elif name == "smollm2":  # GPT2Tokenizer; bos_token named but never added to a text
        t = _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        t.post_processor = processors.ByteLevel(trim_offsets=False)
        cfg = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": "<|im_start|>",
               "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
               "clean_up_tokenization_spaces": False, "model_max_length": 8192}
        gen = {"bos_token_id": 1, "eos_token_id": 2}
    elif name == "mistral":  # LlamaTokenizer: Metaspace BPE with byte fallback, add_bos_token in the config
        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
        t = tk.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        t.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                                  show_progress=False))
        spec = json.loads(t.to_str())
        vocab = spec["model"]["vocab"]
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        spec["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
        t = tk.Tokenizer.from_str(json.dumps(spec))
        t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                         special_tokens=[("<s>", 1)])
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
               "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False}
        gen = {"bos_token_id": 1, "eos_token_id": 2}
    else:
        raise KeyError(name)
    cfg["added_tokens_decoder"] = {
        str(i): {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized, "rstrip": a.rstrip,
                 "single_word": a.single_word, "special": a.special}
        for i, a in sorted(t.get_added_tokens_decoder().items())}
    return t, cfg, gen


_BUILT = {}


def write_folder(folder, family, template=None, *, where="config", config=None, generation=True):
    """A model folder of ``family`` holding ``template`` (a file name in tests/data/chat_templates or None)."""
    if family not in _BUILT:
        _BUILT[family] = build_family(family)
    backend, cfg, gen = _BUILT[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    cfg = {**cfg, **(config or {})}
    if template is not None:
        text = (TEMPLATES / template).read_text(encoding="utf-8")
        if where == "config":
            cfg["chat_template"] = text
        else:
            (folder / "chat_template.jinja").write_text(text, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    if generation:
        (folder / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    return folder


CASES = [("llama3", "llama3.jinja"), ("llama3", "llama3_2.jinja"), ("llama3", "llama3_3.jinja"),
         ("qwen", "qwen2_5.jinja"), ("qwen", "qwen2_5_training.jinja"), ("qwen", "qwen3.jinja"),
         ("mistral", "mistral_v0_3.jinja"), ("smollm2", "smollm2.jinja")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(ours, transformers') tokenizers for every case, loaded once."""
    out = {}
    for family, template in CASES:
        folder = write_folder(tmp_path_factory.mktemp(template.split(".")[0]), family, template)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[template] = (HFTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder))
    return out


def hf_ids(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
    [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."},
     {"role": "user", "content": "Thank you, bye!"}, {"role": "assistant", "content": "Bye! See you soon."}],
    [{"role": "user", "content": "Ünïcödé café 東京 🙂?\n\tTabs & <html> \"quotes\""},
     {"role": "assistant", "content": "  naïve\ttext\n "}],
]


# --------------------------------------------------------------------------- ids equal transformers'


@pytest.mark.parametrize("template", [t for _, t in CASES])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_ids_equal_transformers(pairs, template, conversation, add_generation_prompt):
    ours, hf = pairs[template]
    messages = CONVERSATIONS[conversation]
    kw = DATE if "llama3_" in template else {}
    text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt, **kw)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw) == \
        hf_ids(hf, messages, add_generation_prompt=add_generation_prompt, **kw)


content = st.lists(st.sampled_from(list("abcXYZ 019.,!?'\n\t\"<>&-éü東京🙂") + [
    "Hello", " there", "<|im_end|>", "[INST]", "<|eot_id|>", "</s>", "<think>", "</think>", "  ", "\n\n"]),
    max_size=12).map("".join)


@st.composite
def conversations(draw):
    """Optional system message, then alternating user/assistant turns (Mistral's template refuses anything else)."""
    msgs = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
    for k in range(draw(st.integers(1, 5))):
        msgs.append({"role": "user" if k % 2 == 0 else "assistant", "content": draw(content)})
    return msgs


@given(st.sampled_from([t for _, t in CASES]), conversations(), st.booleans())
def test_random_conversations_render_and_tokenize_like_transformers(pairs, template, messages, add_generation_prompt):
    ours, hf = pairs[template]
    kw = DATE if "llama3_" in template else {}
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw) == \
        hf_ids(hf, messages, add_generation_prompt=add_generation_prompt, **kw)


def test_template_features_match_transformers(pairs):
    """Tools through tojson (indent, non-ASCII, HTML characters), tool calls, reasoning, enable_thinking, dates."""
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function",
              "function": {"name": "get_weather", "description": "Weather <today> & café", "parameters": params}}]
    ask = [{"role": "user", "content": "Weather in Zürich?"}]
    called = ask + [{"role": "assistant", "content": "",
                     "tool_calls": [{"type": "function", "id": "abcdefghi",
                                     "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
                    {"role": "tool", "content": "20 °C", "tool_call_id": "abcdefghi"}]
    cases = [
        ("qwen2_5.jinja", ask, {"tools": tools}), ("qwen2_5.jinja", called, {"tools": tools}),
        ("qwen3.jinja", called, {"tools": tools}), ("llama3_2.jinja", ask, {"tools": tools, **DATE}),
        ("llama3_3.jinja", ask, {"tools": tools, "tools_in_user_message": False, **DATE}),
        ("mistral_v0_3.jinja", ask, {"tools": tools}),
        ("qwen3.jinja", ask, {"enable_thinking": False}),
        ("qwen3.jinja", ask + [{"role": "assistant", "content": "Sunny.", "reasoning_content": "Look it up."}], {}),
        ("qwen3.jinja", ask + [{"role": "assistant", "content": "<think>\nhmm\n</think>\n\nSunny."}], {}),
        ("llama3_2.jinja", ask, {}),  # today's date from strftime_now, on both sides
        ("qwen3.jinja", ask + [{"role": "assistant", "content": "Sunny.", "tool_calls": None}], {}),
    ]
    for template, messages, kw in cases:
        ours, hf = pairs[template]
        for agp in (False, True):
            assert ours.render_chat(messages, add_generation_prompt=agp, **kw) == \
                hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp, **kw), (template, kw)
            assert ours.apply_chat_template(messages, add_generation_prompt=agp, **kw) == \
                hf_ids(hf, messages, add_generation_prompt=agp, **kw)


def test_template_errors_and_sandbox(pairs):
    ours, hf = pairs["mistral_v0_3.jinja"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        ours.apply_chat_template(bad)
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        hf.apply_chat_template(bad)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    probe = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
             "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}"
             "{% endfor %}{{ ns.n }}{{ dict(x=1) | tojson(separators=(',', ':')) }}")
    messages = [{"role": "user", "content": "<a href='x'>é & 東</a>"}, {"role": "user", "content": "skipped"}]
    assert chat.render_chat(probe, messages) == hf.apply_chat_template(messages, chat_template=probe, tokenize=False)
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat.render_chat("{{ messages.__class__ }}{{ ''.__class__.__mro__ }}", messages)
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat.render_chat("{% set ns = namespace() %}{% set ns._x = 1 %}", messages)


# --------------------------------------------------------------------------- where the template comes from


def test_chat_template_jinja_file_is_read_and_wins_over_the_config_field(tmp_path):
    folder = write_folder(tmp_path / "file", "qwen", "qwen2_5.jinja", where="file")
    ours, hf = HFTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == (TEMPLATES / "qwen2_5.jinja").read_text()
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
            hf_ids(hf, messages, add_generation_prompt=True)
    both = write_folder(tmp_path / "both", "qwen", "qwen2_5.jinja", where="file",
                        config={"chat_template": (TEMPLATES / "smollm2.jinja").read_text()})
    ours, hf = HFTokenizer.from_folder(both), transformers.AutoTokenizer.from_pretrained(both)
    assert ours.chat_template == hf.chat_template == (TEMPLATES / "qwen2_5.jinja").read_text()


def test_named_templates_pick_default_or_tool_use(tmp_path):
    default, tool_use = "{{ 'D' }}{{ messages[0].content }}", "{{ 'T' }}{{ messages[0].content }}"
    folder = write_folder(tmp_path, "qwen", config={"chat_template": [{"name": "default", "template": default},
                                                                      {"name": "tool_use", "template": tool_use}]})
    ours, hf = HFTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": "x"}]
    assert ours.render_chat(msgs) == hf.apply_chat_template(msgs, tokenize=False) == "Dx"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.render_chat(msgs, tools=tools) == hf.apply_chat_template(msgs, tools=tools, tokenize=False) == "Tx"
    with pytest.raises(ValueError, match="no chat template"):
        HFTokenizer.from_folder(write_folder(tmp_path / "none", "qwen")).apply_chat_template(msgs)


# --------------------------------------------------------------------------- SFT masks


def masked_strings(tok, ids, mask):
    """The decoded runs of consecutive masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for r in runs + ([cur] if cur else [])]


EXPECTED_MASKS = {  # CONVERSATIONS[3]: what the model learns to write after each generation prompt
    "llama3.jinja": ["It is 4.<|eot_id|>", "Bye! See you soon.<|eot_id|>"],
    "llama3_2.jinja": ["It is 4.<|eot_id|>", "Bye! See you soon.<|eot_id|>"],
    "llama3_3.jinja": ["It is 4.<|eot_id|>", "Bye! See you soon.<|eot_id|>"],
    "qwen2_5.jinja": ["It is 4.<|im_end|>", "Bye! See you soon.<|im_end|>"],
    # {% generation %} blocks: the template's choice, newlines around the turn included
    "qwen2_5_training.jinja": ["\nIt is 4.<|im_end|>\n", "\nBye! See you soon.<|im_end|>\n"],
    # the last turn after the last user query gets Qwen3's empty thinking block, the earlier one does not
    "qwen3.jinja": ["It is 4.<|im_end|>", "<think>\n\n</think>\n\nBye! See you soon.<|im_end|>"],
    # Mistral's space before the reply is learned ("▁It"); the Metaspace decoder strips a leading space
    "mistral_v0_3.jinja": ["It is 4.</s>", "Bye! See you soon.</s>"],
    "smollm2.jinja": ["It is 4.<|im_end|>", "Bye! See you soon.<|im_end|>"],
}


@pytest.mark.parametrize("template", [t for _, t in CASES])
def test_sft_mask_covers_exactly_the_assistant_turns(pairs, template):
    ours, hf = pairs[template]
    kw = DATE if "llama3_" in template else {}
    messages = CONVERSATIONS[3]
    ids, mask = tokenize_chat(ours, messages, **kw)
    assert ids == hf_ids(hf, messages, **kw)
    assert masked_strings(ours, ids, mask) == EXPECTED_MASKS[template]
    if chat.has_generation_blocks(ours.chat_template):  # exactly transformers' assistant mask
        out = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True, **kw)
        assert out["assistant_masks"] == [int(m) for m in mask]
    # prompt/completion: only the completion's turns
    ids, mask = tokenize_chat(ours, messages, supervise_from=4, **kw)
    assert masked_strings(ours, ids, mask) == EXPECTED_MASKS[template][1:]
    # Mistral drops the system prompt once an assistant reply ends the conversation: the turn is found anyway;
    # Qwen3 gives a reply after the last user query an empty thinking block
    ids, mask = tokenize_chat(ours, messages[:3], **kw)
    first = EXPECTED_MASKS[template][0]
    think = "<think>\n\n</think>\n\n" if template == "qwen3.jinja" else ""
    assert masked_strings(ours, ids, mask) == [think + first]


plain = st.builds(lambda a, b, c: a + b + c, st.sampled_from(["It", "Bye", "4", "café", "東京", "Hello", "!"]),
                  st.text(st.sampled_from(list("ab 12.,?\t\néü東🙂")), max_size=10),
                  st.sampled_from(["", ".", "x", "🙂"]))


@st.composite
def plain_conversations(draw):
    msgs = [{"role": "system", "content": draw(plain)}] if draw(st.booleans()) else []
    for k in range(draw(st.integers(2, 6))):
        msgs.append({"role": "user" if k % 2 == 0 else "assistant", "content": draw(plain).strip() or "ok"})
    return msgs


def expected_turns(template, messages):
    """What each assistant turn decodes to, per the masking rule, for contents without outer whitespace."""
    end = "<|eot_id|>" if template.startswith("llama") else "</s>" if template.startswith("mistral") else "<|im_end|>"
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if template == "qwen2_5_training.jinja":
            out.append("\n" + m["content"] + "<|im_end|>\n")
        elif template == "qwen3.jinja" and i == len(messages) - 1:
            out.append("<think>\n\n</think>\n\n" + m["content"] + "<|im_end|>")
        else:
            out.append(m["content"] + end)
    return out


@given(st.sampled_from([t for _, t in CASES]), plain_conversations())
def test_random_conversations_mask_exactly_the_assistant_turns(pairs, template, messages):
    ours, hf = pairs[template]
    kw = DATE if "llama3_" in template else {}
    ids, mask = tokenize_chat(ours, messages, **kw)
    assert ids == hf_ids(hf, messages, **kw)
    assert masked_strings(ours, ids, mask) == expected_turns(template, messages)


def test_qwen3_masks_follow_thinking_mode_and_reasoning(pairs):
    ours, hf = pairs["qwen3.jinja"]
    messages = CONVERSATIONS[3]
    # enable_thinking=False puts the empty thinking block into the generation prompt: it is not learned
    ids, mask = tokenize_chat(ours, messages, enable_thinking=False)
    assert ids == hf_ids(hf, messages, enable_thinking=False)
    assert masked_strings(ours, ids, mask) == ["It is 4.<|im_end|>", "Bye! See you soon.<|im_end|>"]
    # reasoning is rendered (and learned) only after the last user query
    thought = [{**m, "reasoning_content": "Think."} if m["role"] == "assistant" else m for m in messages]
    ids, mask = tokenize_chat(ours, thought)
    assert ids == hf_ids(hf, thought)
    assert masked_strings(ours, ids, mask) == ["It is 4.<|im_end|>",
                                               "<think>\nThink.\n</think>\n\nBye! See you soon.<|im_end|>"]


def test_mask_character_spans_leave_headers_and_trailing_newline_out(pairs):
    ours, _ = pairs["qwen2_5.jinja"]
    text, spans = chat.assistant_spans(ours, CONVERSATIONS[3])
    assert [text[s:e] for s, e in spans] == ["It is 4.<|im_end|>", "Bye! See you soon.<|im_end|>"]
    assert all(text[s - len("<|im_start|>assistant\n"):s] == "<|im_start|>assistant\n" and text[e] == "\n"
               for s, e in spans)
    with pytest.raises(ValueError, match="starts with an assistant message"):
        chat.assistant_spans(ours, [{"role": "assistant", "content": "hi"}])


# --------------------------------------------------------------------------- special tokens and BOS


def test_special_tokens_bos_rule_and_eos_ids(pairs):
    text = "Hello there! 12345 café 東京 🙂\n"
    expected = {"llama3.jinja": True, "qwen2_5.jinja": False, "mistral_v0_3.jinja": True, "smollm2.jinja": False}
    for template, adds_bos in expected.items():
        ours, hf = pairs[template]
        assert ours.add_bos_token is adds_bos
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
        assert (ours.bos_id, ours.eos_id, ours.unk_id) == (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id)
        assert ours.vocab_size == len(hf)
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False),
                                                          skip_special_tokens=True)
    qwen, _ = pairs["qwen2_5.jinja"]
    assert qwen.bos_id is None and qwen.pad_id == qwen.token_to_id("<|endoftext|>")
    assert qwen.eos_ids == (qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>"))
    llama, _ = pairs["llama3.jinja"]
    assert llama.eos_ids == tuple(llama.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"))
    smol, _ = pairs["smollm2.jinja"]
    assert smol.bos_id == smol.token_to_id("<|im_start|>") and smol.unk_id == smol.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("family, flags", [("llama3", {"add_bos_token": False}), ("llama3", {"add_eos_token": True}),
                                           ("mistral", {"add_bos_token": False, "add_eos_token": True}),
                                           ("qwen", {"add_bos_token": True})])
def test_config_add_bos_flags_are_ignored_like_transformers_does_with_a_tokenizer_json(tmp_path, family, flags):
    folder = write_folder(tmp_path, family, config=flags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = HFTokenizer.from_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ("Hello there!", "", "12345 東京"):
        assert ours.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
    assert ours.add_bos_token is (family != "qwen")


def test_missing_special_token_raises_and_missing_pad_warns(tmp_path):
    with pytest.raises(ValueError, match=r"eos_token '<\|missing\|>' is not in the vocabulary"):
        HFTokenizer.from_folder(write_folder(tmp_path / "a", "qwen", config={"eos_token": "<|missing|>"}))
    with pytest.raises(ValueError, match=r"bos_token '<s>' is not in the vocabulary"):
        HFTokenizer.from_folder(write_folder(tmp_path / "b", "qwen", config={"bos_token": {"content": "<s>"}}))
    with pytest.raises(ValueError, match="no eos_token"):
        HFTokenizer.from_folder(write_folder(tmp_path / "c", "qwen", config={"eos_token": None}, generation=False))
    with pytest.warns(UserWarning, match=r"no pad_token; padding with the eos token '<\|eot_id\|>'"):
        tok = HFTokenizer.from_folder(write_folder(tmp_path / "d", "llama3"))
    assert tok.pad_id == tok.eos_id == tok.token_to_id("<|eot_id|>")
    # AddedToken-like dicts; special_tokens_map.json, which counts (and wins) only in a legacy config
    added = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False, "special": True}  # how older transformers serialised special tokens
    folder = write_folder(tmp_path / "e", "qwen", config={"eos_token": added})
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|im_start|>"}}))
    for legacy in (False, True):
        if legacy:
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
            del cfg["added_tokens_decoder"]
            (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        tok, hf = HFTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
        assert (tok.eos_id, tok.pad_id) == (hf.eos_token_id, hf.pad_token_id) == \
            (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_start|>" if legacy else "<|endoftext|>"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer.from_folder(tmp_path / "nowhere")


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("template", ["llama3_2.jinja", "qwen3.jinja", "mistral_v0_3.jinja"])
def test_save_pretrained_and_to_json_round_trip(pairs, tmp_path, template):
    ours, _ = pairs[template]
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == ours.chat_template
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    again = load_tokenizer(json.loads(json.dumps(ours.to_json())))
    kw = DATE if "llama3_" in template else {}
    for tok in (again, HFTokenizer.from_folder(tmp_path, warn=False)):
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos_token) == \
            (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size, ours.add_bos_token)
        for messages in CONVERSATIONS:
            assert tok.apply_chat_template(messages, **kw) == ours.apply_chat_template(messages, **kw) == \
                hf_ids(hf, messages, **kw)
    assert again.eos_ids == ours.eos_ids
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == \
        tuple(ours.id_to_token(i) if i is not None else None for i in (ours.bos_id, ours.eos_id, ours.unk_id))
    text = "Hello there! café 東京"
    assert hf(text)["input_ids"] == ours.encode(text, add_special_tokens=True)


unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # no lone surrogates


@pytest.fixture(scope="module")
def own_folders(tmp_path_factory):
    byte, bpe = mf.ByteTokenizer(), mf.BPETokenizer.train(CORPUS, vocab_size=400)
    out = {}
    for name, tok in (("byte", byte), ("bpe", bpe)):
        folder = tok.save_pretrained(tmp_path_factory.mktemp(name))
        out[name] = (tok, transformers.AutoTokenizer.from_pretrained(folder), HFTokenizer.from_folder(folder))
    return out


@given(unicode_text | st.sampled_from(["<eos>", "a<bos>b<pad>", "\x00\x7f\u200b\ufeff", "𝔘𝔫𝔦"]))
def test_own_tokenizers_export_to_transformers_with_equal_ids(own_folders, text):
    for name, (tok, hf, again) in own_folders.items():
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, name
        assert hf(text)["input_ids"] == [tok.bos_id] + ids == tok.encode(text, add_special_tokens=True)
        assert again.encode(text) == ids and again.add_bos_token
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids) == again.decode(ids)
        if name == "byte":  # every string round-trips (a BPE tokenizer reads "<eos>" in a text as its EOS)
            assert hf.decode(ids) == text
        assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
        assert len(hf) == tok.vocab_size


def test_byte_tokenizer_backend_refuses_lone_surrogates_which_byte_tokenizer_encodes():
    tok = mf.ByteTokenizer()
    assert tok.encode("\ud800") == [0xED, 0xA0, 0x80]
    with pytest.raises(Exception):
        tok.backend().encode("\ud800")


# --------------------------------------------------------------------------- datasets with a template


def labelled(item, prefix=""):
    ids, labels = item[prefix + "input_ids"], item[prefix + "labels"]
    counted = labels != IGN
    assert torch.equal(labels[:-1][counted[:-1]], ids[1:][counted[:-1]])  # pre-aligned: labels[t] == ids[t+1]
    return labels[counted].tolist()


@pytest.mark.parametrize("template", ["qwen2_5.jinja", "llama3_2.jinja", "mistral_v0_3.jinja"])
def test_conversation_dataset_uses_the_template(pairs, template):
    ours, hf = pairs[template]
    kw = DATE if "llama3_" in template else {}
    messages = CONVERSATIONS[3]
    ds = mf.ConversationDataset([{"messages": messages}, {"prompt": "What is 2 + 2?", "completion": "It is 4."}],
                                ours, 512, template_kwargs=kw)
    assert ds.use_template
    ids, mask = tokenize_chat(ours, messages, **kw)
    item = ds[0]
    assert item["input_ids"].tolist() == hf_ids(hf, messages, **kw) == ids
    assert labelled(item) == [i for i, m in zip(ids, mask) if m]
    pc = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
    assert ds[1]["input_ids"].tolist() == hf_ids(hf, pc, **kw)
    assert ours.decode(labelled(ds[1]), skip_special_tokens=False) == EXPECTED_MASKS[template][0]
    # TRL's conversational prompt/completion, with a few-shot assistant turn in the prompt that is not learned
    shots = {"prompt": messages[:4], "completion": [messages[4]]}
    item = mf.ConversationDataset([shots], ours, 512, template_kwargs=kw)[0]
    assert item["input_ids"].tolist() == hf_ids(hf, messages, **kw)
    assert ours.decode(labelled(item), skip_special_tokens=False) == EXPECTED_MASKS[template][1]
    # built-in format on demand; truncation keeps the start
    plain = mf.ConversationDataset([{"messages": messages}], ours, 512, chat_template=False)[0]
    assert "<|assistant|>" in ours.decode(plain["input_ids"].tolist())
    short = mf.ConversationDataset([{"messages": messages}], ours, len(ids) - 3, template_kwargs=kw)[0]
    assert short["input_ids"].tolist() == ids[: len(ids) - 3]


@pytest.mark.parametrize("template", ["qwen3.jinja", "llama3.jinja", "smollm2.jinja"])
def test_preference_dataset_takes_trl_conversational_pairs(pairs, template):
    ours, hf = pairs[template]
    prompt = [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}]
    ex = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Four."}],
          "rejected": [{"role": "assistant", "content": "Five."}]}
    item = mf.PreferenceDataset([ex], ours, 512)[0]
    prompt_ids = hf_ids(hf, prompt, add_generation_prompt=True)
    eot = {"qwen3.jinja": "<|im_end|>", "llama3.jinja": "<|eot_id|>", "smollm2.jinja": "<|im_end|>"}[template]
    think = "<think>\n\n</think>\n\n" if template == "qwen3.jinja" else ""
    for side, reply in (("chosen", "Four."), ("rejected", "Five.")):
        ids = item[f"{side}_input_ids"].tolist()
        assert ids == hf_ids(hf, prompt + ex[side]) == ours.apply_chat_template(prompt + ex[side])
        assert ids[: len(prompt_ids)] == prompt_ids  # the prompt rendered with its generation prompt, then the reply
        assert ours.decode(labelled(item, side + "_"), skip_special_tokens=False) == think + reply + eot
    # plain strings become a user message and assistant replies
    flat = mf.PreferenceDataset([{"prompt": "What is 2 + 2?", "chosen": "Four.", "rejected": "Five."}], ours, 512)[0]
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    assert flat["chosen_input_ids"].tolist() == hf_ids(hf, user + ex["chosen"])


def test_plain_text_datasets_start_with_bos_exactly_when_transformers_adds_it(pairs):
    texts = ["Hello there!", "12345 café"]
    for template in ("llama3.jinja", "qwen2_5.jinja", "smollm2.jinja", "mistral_v0_3.jinja"):
        ours, hf = pairs[template]
        ds = mf.LanguageModelingDataset(texts, ours, 64)
        for text, item in zip(texts, ds):
            real = item["attention_mask"].bool()
            assert item["input_ids"][real].tolist() == hf(text)["input_ids"] + [ours.eos_id]
        packed = mf.LanguageModelingDataset(texts, ours, 8, pack=True)
        stream = torch.cat([it["input_ids"][it["attention_mask"].bool()] for it in packed]).tolist()
        assert stream == hf(texts[0])["input_ids"] + [ours.eos_id] + ours.encode(texts[1]) + [ours.eos_id]
        assert mf.data.chat_prompt(CONVERSATIONS[1], ours) == hf_ids(hf, CONVERSATIONS[1], add_generation_prompt=True)


def test_chat_template_true_needs_a_template():
    with pytest.raises(ValueError, match="has no chat template"):
        mf.ConversationDataset([{"prompt": "a", "completion": "b"}], mf.ByteTokenizer(), 16, chat_template=True)
