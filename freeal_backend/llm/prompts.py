"""Chat prompts for labelling and demo generation, and parsing of the LLM's answers."""
from __future__ import annotations

import re
from collections.abc import Sequence

Message = dict[str, str]

# Common answer words that mean one of the usual label names.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "positive": ("pos", "good", "favorable", "favourable"),
    "negative": ("neg", "bad", "unfavorable", "unfavourable"),
    "subjective": ("opinion", "subj"),
    "objective": ("fact", "factual", "obj"),
    "number": ("numeric", "num", "quantity"),
    "location": ("place", "loc"),
    "human": ("person", "people", "hum"),
    "entity": ("thing", "enty"),
    "description": ("definition", "desc", "explanation"),
    "abbreviation": ("abbr", "acronym", "abbrev"),
}

_PREFIX = re.compile(r"^\s*(the\s+)?(final\s+)?(answer|label|category|class|sentiment|output|type)\b"
                     r"\s*(is\b)?\s*[:=\-]?\s*", re.IGNORECASE)


def system_prompt(labels: Sequence[str], task_description: str | None = None) -> str:
    """The instruction shared by every labelling request."""
    task = task_description or "Classify the text."
    return (f"{task} Answer with exactly one label from this list: {', '.join(labels)}. "
            "Reply with the label only.")


def label_messages(text: str, labels: Sequence[str], demos: Sequence[tuple[str, str]] = (),
                   task_description: str | None = None) -> list[Message]:
    """Messages for labelling one text; demonstrations become earlier user/assistant turns."""
    messages: list[Message] = [{"role": "system", "content": system_prompt(labels, task_description)}]
    for demo_text, demo_label in demos:
        messages.append({"role": "user", "content": f"Text: {demo_text}\nLabel:"})
        messages.append({"role": "assistant", "content": demo_label})
    messages.append({"role": "user", "content": f"Text: {text}\nLabel:"})
    return messages


def demo_generation_messages(label: str, labels: Sequence[str], style_examples: Sequence[str], count: int,
                             task_description: str | None = None) -> list[Message]:
    """Ask the LLM to write ``count`` new texts of class ``label`` in the style of unlabeled examples."""
    examples = "\n".join(f"- {t}" for t in style_examples)
    task = task_description or f"The texts are classified into: {', '.join(labels)}."
    return [
        {"role": "system", "content": "You write realistic example texts for a text classification data set."},
        {"role": "user", "content": (
            f"{task}\nHere are some unlabeled texts from the data set, showing its style:\n{examples}\n\n"
            f"Write {count} new, different texts in the same style whose label is \"{label}\". "
            "Write one text per line, with no numbering and no explanation.")},
    ]


def parse_generated_texts(answer: str, limit: int) -> list[str]:
    """Split a demo-generation answer into clean, distinct texts."""
    seen: set[str] = set()
    texts: list[str] = []
    for line in answer.splitlines():
        line = re.sub(r"^\s*(\d+[.):]|[-*•]|text\s*\d*\s*:)\s*", "", line, flags=re.IGNORECASE).strip().strip('"')
        if len(line) < 8 or line.lower() in seen or line.endswith(":"):
            continue
        seen.add(line.lower())
        texts.append(line)
        if len(texts) == limit:
            break
    return texts


_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_NEGATION = r"(not|no|never|neither|nor|hardly|t)"  # "t": the tail of "isn't"/"don't" once squashed


def strip_thinking(answer: str) -> str | None:
    """The answer without ``<think>…</think>`` blocks; None when thinking was cut off (no answer given)."""
    text = _THINK.sub(" ", answer)
    return None if "<think>" in text.lower() else text


def _negated(norm: str, key: str) -> bool:
    """Whether ``key`` appears negated ("not positive", "isn't good", "not very good") in ``norm``."""
    return re.search(rf"(^| ){_NEGATION}( \w+)? {re.escape(key)}( |$)", norm) is not None


def _squash(text: str) -> str:
    text = re.sub(r"[\"'`*_.,;:!?()\[\]{}<>]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _normalise(text: str) -> str:
    text = text.strip().lower()
    # strip an "Answer:"-style prefix, unless it is all there is (a label may be named "Type" or "Answer")
    return _squash(_PREFIX.sub("", text)) or _squash(text)


def parse_label(answer: str | None, labels: Sequence[str],
                synonyms: dict[str, tuple[str, ...]] | None = None) -> str | None:
    """Map a free-form answer to one label, or None when it names none or several.

    Tolerates case, punctuation, quotes, prefixes such as "Answer: X", label synonyms, unambiguous
    prefixes ("pos" -> "positive") and ``<think>`` blocks. A negated label or synonym ("not positive",
    "not good") is refused rather than guessed.
    """
    answer = strip_thinking(answer) if answer else None
    if not answer:
        return None
    syn = SYNONYMS if synonyms is None else synonyms
    by_norm = {_normalise(lab): lab for lab in labels}
    norm = _normalise(answer)
    if not norm:
        return None
    if norm in by_norm:
        return by_norm[norm]
    first_line = _normalise(answer.strip().splitlines()[0])
    if first_line in by_norm:
        return by_norm[first_line]
    words = norm.split(" ")
    named = [(key, lab) for key, lab in by_norm.items() if re.search(rf"(^| ){re.escape(key)}( |$)", norm)]
    named += [(word, lab) for key, lab in by_norm.items() for word in words[:3] if word in syn.get(key, ())]
    if any(_negated(norm, key) for key, _ in named):
        return None
    found = {lab for key, lab in named if re.search(rf"(^| ){re.escape(key)}( |$)", norm) and key in by_norm}
    if len(found) == 1:
        return found.pop()
    if found:
        return None
    for key, lab in named:
        return lab
    head = words[0]
    prefixed = [lab for key, lab in by_norm.items() if len(head) >= 3 and key.startswith(head)]
    return prefixed[0] if len(prefixed) == 1 else None


def label_token_prefixes(labels: Sequence[str]) -> dict[str, str]:
    """Lower-case label name per label, used to attribute first-token logprobs to labels."""
    return {lab: _normalise(lab) for lab in labels}
