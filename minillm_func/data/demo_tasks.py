"""The built-in demo corpus: a small synthetic world a tiny model learns in minutes on a CPU.

No download, deterministic for a seed, generated in well under a second.

**The world.** Three string rules applied to random lower-case words of 3 to 6
letters: ``reverse`` (abc -> cba), ``uppercase`` (abc -> ABC) and ``double``
(abc -> abcabc). Rules on fresh inputs are what a small model can learn and
generalise at this scale; facts about made-up entities are only memorised.
Every evaluation set uses words that appear in no training set.

**Stages and what each one measures** (``minillm-func demo`` reports each
before and after training):

- *pretrain* -- documents of declarative sentences, "The reverse of abc is
  cba." Metric: perplexity (exp of the mean next-token loss) on held-out
  documents. It falls as the model learns the format and the rules; it stays
  well above 1 because the random words themselves are unpredictable.
- *sft* -- prompt ``"Q: reverse abc\\nA: "`` with a reply in one of two styles:
  the bare answer ``"cba"`` (one third of the examples) or the hedged
  ``"cba, I think."`` (two thirds). Both start with the answer, so the style
  is only decided after it. Metric: exact-match accuracy of greedy replies to
  held-out prompts; the answer is read from either style (:func:`extract_answer`).
- *dpo* -- pairs with the same prompt: chosen = the bare answer, rejected =
  the hedged one, both correct. Metrics: preference accuracy on held-out pairs
  (share of pairs whose chosen reply gains more log-probability relative to the
  reference than the rejected one; 0 before DPO, since the policy *is* the
  reference and ties count as wrong) and the share of greedy held-out replies
  in the preferred bare style (:func:`is_preferred_style`), which SFT left in
  the minority.
- *grpo* -- prompts of training words with their answers; the policy samples
  several replies per prompt and is rewarded 1 for a right answer in either
  style (:func:`answer_reward`). Metric: the held-out exact match of greedy
  replies, as for SFT.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["DemoCorpus", "demo_corpus", "RULES", "question", "extract_answer", "is_preferred_style", "answer_reward"]

RULES = {
    "reverse": lambda w: w[::-1],
    "uppercase": str.upper,
    "double": lambda w: w + w,
}
HEDGED = "{}, I think."


def question(rule: str, word: str) -> str:
    """The SFT / DPO prompt for applying ``rule`` to ``word``."""
    return f"Q: {rule} {word}\nA: "


def sentence(rule: str, word: str) -> str:
    return f"The {rule} of {word} is {RULES[rule](word)}."


def extract_answer(reply: str) -> str:
    """The answer in a reply of either style ("cba" or "cba, I think.")."""
    return reply.strip().removesuffix(HEDGED.format("")).strip()


def is_preferred_style(reply: str) -> bool:
    """True for the bare style that the DPO pairs prefer."""
    reply = reply.strip()
    return bool(reply) and not reply.endswith(HEDGED.format(""))


@dataclass
class DemoCorpus:
    """Training and held-out data for the three stages (see the module docstring)."""

    pretrain: list = field(default_factory=list)       # str documents
    pretrain_eval: list = field(default_factory=list)  # str documents
    sft: list = field(default_factory=list)            # {"prompt", "completion"}
    sft_eval: list = field(default_factory=list)       # {"prompt", "answer", "rule", "word"}
    dpo: list = field(default_factory=list)            # {"prompt", "chosen", "rejected"}
    dpo_eval: list = field(default_factory=list)       # {"prompt", "chosen", "rejected"}
    grpo: list = field(default_factory=list)           # {"prompt", "answer"}


def _words(rng: random.Random, n: int, taken: set, held_out: frozenset = frozenset()) -> list[str]:
    """``n`` new random words; none whose reverse or double is a ``held_out`` word, so a
    held-out word never appears in training text, not even as another word's answer."""
    out = []
    while len(out) < n:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if w not in taken and w[::-1] not in held_out and w + w not in held_out:
            taken.add(w)
            out.append(w)
    return out


def demo_corpus(seed: int = 0, *, n_pretrain: int = 3000, sentences_per_doc: int = 8, n_sft: int = 3000,
                n_dpo: int = 2000, n_eval: int = 200, n_grpo: int = 2000) -> DemoCorpus:
    """Generate the corpus; identical for identical arguments."""
    for name, value in dict(n_pretrain=n_pretrain, sentences_per_doc=sentences_per_doc, n_sft=n_sft,
                            n_dpo=n_dpo, n_eval=n_eval, n_grpo=n_grpo).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"demo_corpus: {name} must be a positive int, got {value!r}.")
    rng = random.Random(seed)
    rules = list(RULES)
    taken: set = set()
    eval_words = _words(rng, 3 * n_eval, taken)  # reserved first: no training set may use them
    train_words = _words(rng, max(2000, n_sft), taken, frozenset(eval_words))

    def pick(words):
        return rng.choice(rules), rng.choice(words)

    c = DemoCorpus()
    c.pretrain = [" ".join(sentence(*pick(train_words)) for _ in range(sentences_per_doc))
                  for _ in range(n_pretrain)]
    c.pretrain_eval = [" ".join(sentence(*pick(eval_words[:n_eval])) for _ in range(sentences_per_doc))
                       for _ in range(max(1, n_eval // 4))]
    for _ in range(n_sft):
        rule, word = pick(train_words)
        answer = RULES[rule](word)
        c.sft.append({"prompt": question(rule, word),
                      "completion": answer if rng.random() < 1 / 3 else HEDGED.format(answer)})
    for rule_word in zip([rng.choice(rules) for _ in range(n_eval)], eval_words[n_eval:2 * n_eval]):
        rule, word = rule_word
        c.sft_eval.append({"prompt": question(rule, word), "answer": RULES[rule](word), "rule": rule, "word": word})

    def pair(rule, word):
        answer = RULES[rule](word)
        return {"prompt": question(rule, word), "chosen": answer, "rejected": HEDGED.format(answer)}

    c.dpo = [pair(*pick(train_words)) for _ in range(n_dpo)]
    c.dpo_eval = [pair(rng.choice(rules), w) for w in eval_words[2 * n_eval:]]
    # Drawn last, so the sets above are what they were before GRPO joined the demo.
    c.grpo = [{"prompt": question(rule, word), "answer": RULES[rule](word)}
              for rule, word in (pick(train_words) for _ in range(n_grpo))]
    return c


def answer_reward(prompts, completions, answer, **_) -> list[float]:
    """GRPO's reward on the demo tasks: 1.0 where the reply's answer (either style) is right."""
    return [float(extract_answer(c) == a) for c, a in zip(completions, answer)]
