"""Chat templates: render a conversation exactly as ``transformers`` does, and find what to learn in it.

A chat template is a Jinja2 program shipped with a model (``chat_template.jinja``,
or ``tokenizer_config.json["chat_template"]`` in older folders). ``transformers``
renders it in a sandbox set up in a particular way; the ids of a conversation
are then the tokenisation of the rendered string *without* added special tokens
(the template writes BOS itself when the model wants one). This module repeats
that set-up with our own code, so that ``HFTokenizer.apply_chat_template`` gives
the ids ``AutoTokenizer.apply_chat_template(..., tokenize=True)`` gives:

- ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
  ``loopcontrols`` extension (``{% break %}``, ``{% continue %}``) and the
  ``{% generation %}...{% endgeneration %}`` block, which renders its body
  unchanged and records where it landed in the output;
- a ``tojson`` filter that is ``json.dumps`` (no HTML escaping, ``ensure_ascii=False``,
  with ``indent``/``separators``/``sort_keys``), replacing Jinja's own;
- globals ``raise_exception(msg)`` (a ``TemplateError``), ``strftime_now(fmt)``
  (local time) and the restricted ``dict``/``namespace`` that refuse
  underscore attributes;
- variables ``messages``, ``tools`` (None unless given), ``documents`` (None),
  ``add_generation_prompt``, the tokenizer's named special tokens as strings
  (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, ... — those the
  folder names) and any extra keyword (``enable_thinking=False``,
  ``date_string=...``); a keyword overrides a special token of the same name.
- messages are normalised first, as transformers does: keys whose value is
  ``None`` are dropped, and a reasoning given as ``reasoning_content``,
  ``thinking`` or ``reasoning`` is visible under both ``reasoning_content`` and
  ``thinking``.

SFT loss masks (:func:`tokenize_chat`) — which tokens of a conversation the
model is trained to produce:

1. If the template has ``{% generation %}`` blocks, the mask is exactly
   transformers' ``return_assistant_tokens_mask``: every token that overlaps a
   generation block's characters. The template's author decided what is in the
   block (TRL's ``qwen2_5_training.jinja`` puts the newline after the header and
   the one after ``<|im_end|>`` inside it; we follow the template).
2. Otherwise, each assistant message ``i`` that is supervised spans from the end
   of ``render(messages[:i], add_generation_prompt=True)`` — everything after the
   generation prompt, i.e. what a model prompted with it must write: the
   content and any prefix the template adds to it (Mistral's space, Qwen3's
   empty ``<think>`` block when it is not part of the prompt) — to the end of
   that turn's end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, ``</s>``): the
   text ``render(messages[:i+1])`` adds after the prompt, with trailing
   whitespace removed, so the newline that ChatML writes *after* ``<|im_end|>``
   is not learned (it is never generated: decoding stops at ``<|im_end|>``).
   Some templates render a turn differently once more messages follow (Qwen3
   drops the ``<think>`` block of replies before the last user query; Mistral
   v0.3 writes the system prompt only into a *last* user message). Then the
   turn is located in the full rendering: it starts after the generation prompt
   if the rendering starts with it, else after the generation header that
   precedes the reply's content (found by rendering the content with a marker
   character before and after it); it ends at the first end-of-turn token after
   the content. A template for which that fails is refused with a ``ValueError``
   that asks for ``{% generation %}`` markers. Character spans become token
   positions through the tokenizer's offsets: a token is masked if its
   characters overlap a span (the rule transformers uses for generation blocks).

For ``{"prompt", "completion"}`` and preference records only the messages at or
after ``supervise_from`` (the completion) are supervised.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache, partial
from typing import Sequence

__all__ = [
    "render_chat", "render_chat_with_generation_spans", "has_generation_blocks", "compile_template",
    "normalize_messages", "assistant_spans", "tokenize_chat", "select_template",
]

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from e
    return jinja2


@lru_cache(maxsize=None)
def _environment():
    """One sandboxed environment, configured the way transformers configures its own."""
    jinja2 = _jinja()
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: output unchanged, character span recorded when tracking."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self._tracking: ContextVar = ContextVar("minillm_generation_tracking", default=None)
            environment.extend(track_generation=self.track)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

        def _record(self, caller):
            text = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                # Output is produced as a stream of blocks; everything written before this block is in `blocks`.
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

        @contextmanager
        def track(self, blocks: list, spans: list):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class SafeDict:
        """``dict(...)`` for templates, without a class object to climb out of the sandbox through."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore attributes on a namespace (got {name!r}).")

    class SafeNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=SafeDict(),
                       namespace=SafeNamespace)
    return env


@lru_cache(maxsize=64)
def compile_template(template: str):
    """The compiled Jinja template (cached: datasets render thousands of conversations with one template)."""
    if not isinstance(template, str):
        raise TypeError(f"a chat template is a Jinja string, got {type(template).__name__}.")
    return _environment().from_string(template)


def has_generation_blocks(template: str) -> bool:
    """Whether the template marks the assistant's output with ``{% generation %}`` (as transformers tests it)."""
    return bool(_GENERATION_RE.search(template))


def select_template(template, *, tools=None, name: str | None = None) -> str:
    """Pick one template from a folder's templates, as ``transformers``' ``get_chat_template`` does.

    ``template`` is a string, or a dict of named templates (a list of
    ``{"name", "template"}`` in older configs): ``name`` if given, else
    ``"tool_use"`` when tools are passed and it exists, else ``"default"``.
    """
    if isinstance(template, (list, tuple)):
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, dict):
        if name is not None:
            if name not in template:
                raise ValueError(f"no chat template named {name!r}; this tokenizer has {sorted(template)}.")
            return template[name]
        if tools is not None and "tool_use" in template:
            return template["tool_use"]
        if "default" in template:
            return template["default"]
        raise ValueError(f"this tokenizer has several chat templates {sorted(template)} and no 'default'; "
                         "pass chat_template_name=... to choose one.")
    if template is None:
        raise ValueError("this tokenizer has no chat template (no chat_template.jinja and no chat_template in "
                         "tokenizer_config.json).")
    return template


def _plain(value):
    """Plain JSON-like data for the sandbox: str/int/float/bool/None, lists, tuples and dicts of them."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as transformers hands them to the template: None-valued keys dropped, reasoning aliased."""
    if hasattr(messages, "messages"):
        messages = messages.messages
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"message {i} must be a dict like {{'role': 'user', 'content': '...'}}, got {m!r:.80}.")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _context(messages, add_generation_prompt, special_tokens, kwargs) -> dict:
    tools = kwargs.pop("tools", None)
    documents = kwargs.pop("documents", None)
    return {**{k: v for k, v in (special_tokens or {}).items() if v is not None}, **_plain(kwargs),
            "messages": normalize_messages(messages), "tools": _plain(tools), "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt}


def render_chat(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                special_tokens: dict | None = None, **kwargs) -> str:
    """The rendered conversation (a string), as ``apply_chat_template(..., tokenize=False)`` returns it.

    ``special_tokens`` maps ``bos_token``/``eos_token``/... to their strings;
    extra keywords (``tools=[...]``, ``enable_thinking=False``, ``date_string=...``)
    become template variables.

    >>> render_chat("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    ...             [{"role": "user", "content": "hi"}])
    '<user>hi'
    """
    if not messages:
        raise ValueError("cannot render an empty conversation; give at least one message.")
    return compile_template(template).render(**_context(messages, add_generation_prompt, special_tokens, kwargs))


def render_chat_with_generation_spans(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                                      special_tokens: dict | None = None, **kwargs):
    """``(text, spans)``: the rendering and the ``(start, end)`` characters of each ``{% generation %}`` block."""
    if not messages:
        raise ValueError("cannot render an empty conversation; give at least one message.")
    compiled = compile_template(template)
    blocks, spans = [], []
    with compiled.environment.track_generation(blocks, spans):
        for block in compiled.generate(**_context(messages, add_generation_prompt, special_tokens, kwargs)):
            blocks.append(block)
    return "".join(blocks), spans


# --------------------------------------------------------------------------- SFT masks


def _end_of_turn(turn: str, special_strings: Sequence[str]) -> str | None:
    """The special token that closes ``turn`` (after trailing whitespace is removed), if it ends with one."""
    body = turn.rstrip()
    best = None
    for s in special_strings:
        if s and body.endswith(s) and (best is None or len(s) > len(best)):
            best = s
    return best


def assistant_spans(tokenizer, messages: Sequence[dict], *, supervise_from: int = 0,
                    **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the conversation's rendering and the character spans the model learns to write.

    The rule is the module docstring's: ``{% generation %}`` blocks when the
    template has them, else each assistant message at index >= ``supervise_from``
    from the end of its generation prompt to the end of its end-of-turn token.
    """
    template = tokenizer.get_chat_template(tools=kwargs.get("tools"), name=kwargs.pop("chat_template_name", None))
    specials = tokenizer.template_special_tokens()
    if has_generation_blocks(template):
        text, spans = render_chat_with_generation_spans(template, messages, special_tokens=specials, **kwargs)
        if supervise_from > 0:  # blocks that start after the prompt's messages (a block may hold the header's newline)
            start = len(render_chat(template, messages[:supervise_from], special_tokens=specials, **kwargs))
            spans = [(s, e) for s, e in spans if s >= start]
        return text, [(s, e) for s, e in spans if e > s]

    text = render_chat(template, messages, special_tokens=specials, **kwargs)
    spans = []
    added = tokenizer.added_token_strings()
    for i, m in enumerate(messages):
        if i < supervise_from or m.get("role") != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant message; there is no prompt to answer. "
                             "Put a user (or system) message first.")
        render = partial(render_chat, template, special_tokens=specials, **kwargs)
        prompt, upto = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
        if text.startswith(upto) and upto.startswith(prompt):  # the common case: no search
            start, end = len(prompt), len(prompt) + len(upto[len(prompt):].rstrip())
        else:
            start, end = _locate_turn(render, messages, i, text, prompt, upto, added)
        if spans and start < spans[-1][1]:
            raise ValueError(f"assistant message {i} was found before the end of the previous one; the template "
                             "renders turns out of order. Mark the assistant's output with {% generation %}.")
        if end > start:
            spans.append((start, end))
    return text, spans


_HELP = ("Add {% generation %} / {% endgeneration %} around the assistant's output in the template (TRL ships such "
         "*_training.jinja templates) to say what to learn.")
_MARK = "\u2e3b"  # a character no template treats specially: appended/prepended to a content to find it


def _locate_turn(render, messages, i: int, text: str, prompt: str, upto: str, added: Sequence[str]):
    """Assistant turn ``i`` in ``text`` when the template renders earlier messages differently once more follow.

    Qwen3 drops the ``<think>`` block of replies before the last user query;
    Mistral v0.3 writes the system prompt only into a *last* user message. The
    turn still ends with the end-of-turn token that closes ``upto`` (the
    conversation rendered up to this reply). If ``text`` starts with
    ``prompt``, the turn starts there. Otherwise the reply's content is found by
    rendering it with a marker character prepended and appended (the
    renderings differ from ``text`` by one insertion exactly at the content's
    start and end), and the turn starts after the generation header that
    precedes the content (the special token and the text after it that the
    generation prompt ends with, e.g. ``<|im_start|>`` + ``assistant\\n``, or
    ``[/INST]``), so a space the template puts before the content is learned too.
    """
    eot = _end_of_turn(upto, added)
    if eot is None:
        raise ValueError(f"cannot find the end of assistant message {i}: the template renders it differently once "
                         f"more messages follow, and the turn does not end with a special token. {_HELP}")
    if text.startswith(prompt):
        start = len(prompt)
        content_end = start
    else:
        content_start, content_end = _content_span(render, messages, i, text)
        start = _after_header(text, content_start, prompt, render(messages[:i]), added)
    end = text.find(eot, content_end)
    if end < 0:
        raise ValueError(f"cannot find the end-of-turn token {eot!r} of assistant message {i}. {_HELP}")
    return start, end + len(eot)


def _content_span(render, messages, i: int, text: str) -> tuple[int, int]:
    content = messages[i].get("content")
    if not isinstance(content, str):
        raise ValueError(f"cannot find assistant message {i} in the rendering (its content is not a string and the "
                         f"template renders earlier turns differently once more messages follow). {_HELP}")
    ends = []
    for alt in (_MARK + content, content + _MARK):
        other = render([*messages[:i], {**messages[i], "content": alt}, *messages[i + 1:]])
        p = _common_prefix(text, other)
        q = min(_common_prefix(text[::-1], other[::-1]), len(text) - p)
        if p + q != len(text):
            raise ValueError(f"cannot find assistant message {i} in the rendering: changing its content changes more "
                             f"than the content (the template branches on it). {_HELP}")
        ends.append(p)
    return ends[0], ends[1]


def _after_header(text: str, pos: int, prompt: str, base: str, added: Sequence[str]) -> int:
    """The start of the turn whose content starts at ``pos``: after the last special token before it, and after
    the text the generation prompt writes after that token (``assistant\\n``), when it is there."""
    header = prompt[len(base):] if prompt.startswith(base) and len(prompt) > len(base) else prompt
    tails = {}
    for tok in added:  # what follows each special token in the generation header, up to the next one
        k = header.find(tok)
        while k >= 0:
            rest = header[k + len(tok):]
            nxt = min([j for j in (rest.find(t) for t in added) if j >= 0], default=len(rest))
            tails.setdefault(tok, rest[:nxt])
            k = header.find(tok, k + 1)
    best_end, best_tok = -1, None
    for tok in added:
        k = text.rfind(tok, 0, pos)  # an occurrence that ends at or before the content
        if k >= 0 and k + len(tok) > best_end:
            best_end, best_tok = k + len(tok), tok
    if best_tok is None:
        raise ValueError(f"cannot find where the assistant turn starts: no special token before its content. {_HELP}")
    tail = tails.get(best_tok, "")
    if tail and text.startswith(tail, best_end) and best_end + len(tail) <= pos:
        return best_end + len(tail)
    return best_end


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def tokenize_chat(tokenizer, messages: Sequence[dict], *, supervise_from: int = 0,
                  **kwargs) -> tuple[list[int], list[bool]]:
    """``(ids, mask)`` of a conversation: the ids ``apply_chat_template`` gives and which of them to learn.

    ``mask[t]`` is True for the tokens of the assistant's turns (content and
    end-of-turn token, not the role header nor the newline after the
    end-of-turn token; see the module docstring). ``supervise_from`` skips the
    assistant messages before that index (few-shot examples in a prompt).
    """
    text, spans = assistant_spans(tokenizer, messages, supervise_from=supervise_from, **kwargs)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask, k = [], 0
    for start, end in offsets:
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        mask.append(k < len(spans) and end > spans[k][0] and start < spans[k][1])
    return ids, mask
