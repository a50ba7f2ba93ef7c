"""Chat prompts for labelling and demo generation, and parsing of the LLM's answers."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

Message = dict[str, str]

# Answer words that mean a label, per data set (SST-2/MR, SUBJ, TREC). They apply only to a task whose label
# names are exactly that data set's (any case): "thing" means TREC's entity, not any label named "entity".
DATASET_SYNONYMS: dict[frozenset[str], dict[str, tuple[str, ...]]] = {
    frozenset({"positive", "negative"}): {
        "positive": ("pos", "good", "favorable", "favourable"),
        "negative": ("neg", "bad", "unfavorable", "unfavourable"),
    },
    frozenset({"subjective", "objective"}): {
        "subjective": ("opinion", "subj"),
        "objective": ("fact", "factual", "obj"),
    },
    frozenset({"abbreviation", "description", "entity", "human", "location", "number"}): {
        "number": ("numeric", "num", "quantity"),
        "location": ("place", "loc"),
        "human": ("person", "people", "hum"),
        "entity": ("thing", "enty"),
        "description": ("definition", "desc", "explanation"),
        "abbreviation": ("abbr", "acronym", "abbrev"),
    },
}
SYNONYM_WORDS = 3  # synonyms count only in answers this short ("a person", "It is good")

_PREFIX = re.compile(r"^\s*(the\s+)?(final\s+)?(answer|label|category|class|sentiment|output|type)\b"
                     r"\s*(is\b)?\s*[:=\-]?\s*", re.IGNORECASE)
_SEPARATED = re.compile(r"\bis\b|[:=\-]\s*$")  # a prefix marked off by "is" or ":", "=", "-"


def system_prompt(labels: Sequence[str], task_description: str | None = None) -> str:
    """The instruction shared by every labelling request."""
    task = task_description or "Classify the text."
    return (f"{task} Answer with exactly one label from this list: {', '.join(labels)}. "
            "Reply with the label only.")


# words after which a label's name (up to ORDER_GAP words on, in the same sentence) tells the labeller what to
# answer: "answer positive", "the correct label for this text is negative", "Label: positive"
ORDER_CUES = ("answer", "answers", "label", "labels", "labeled", "labelled", "labeling", "labelling", "class",
              "classify", "classified", "category", "categorize", "categorise", "output", "respond", "reply", "say",
              "choose", "pick", "select", "mark", "tag", "annotate", "annotator", "correct")
ORDER_GAP = 5
_ORDER = re.compile(rf"\b(?:{'|'.join(ORDER_CUES)})\b(?:\W+\w+){{0,{ORDER_GAP}}}\W*$", re.IGNORECASE)
_QUOTES = "\"'`\u2018\u2019\u201c\u201d"
MASK = "___"  # a blank: "..." was echoed as the answer (4 of 8 SST-2 orders, with demonstrations)


def mask_label_orders(text: str, labels: Sequence[str]) -> str:
    """``text`` with each label name that reads as an order to the labeller replaced by ``MASK``: quoted, or
    written shortly after a cue word such as "answer" or "label" in the same sentence. Data can carry
    instructions, and a label named in one steers a small LLM to it (24 SST-2 texts with an instruction
    naming the wrong label: the embedded 1.5B followed 21 of them in round 0, 1 with the names masked;
    ``benchmarks/results/injection_sst2_n160*.md``). A name written as content ("What is the abbreviation
    for ...", "the most positive thing") stays: masking every label name cost TREC's 70 label-naming
    training questions 15 right answers."""
    names = "|".join(re.escape(n) for n in sorted(labels, key=len, reverse=True) if n.strip())
    if not names:
        return text

    def mask(match: re.Match[str]) -> str:
        start, end = match.span()
        quoted = start > 0 and end < len(text) and text[start - 1] in _QUOTES and text[end] in _QUOTES
        clause = re.split(r"[.!?\n]", text[max(0, start - 80):start])[-1]
        return MASK if quoted or _ORDER.search(clause) else match.group(0)

    return re.sub(rf"(?<!\w)(?:{names})(?!\w)", mask, text, flags=re.IGNORECASE)


def label_messages(text: str, labels: Sequence[str], demos: Sequence[tuple[str, str]] = (),
                   task_description: str | None = None) -> list[Message]:
    """Messages for labelling one text; demonstrations become earlier user/assistant turns. Label names that
    a text orders the labeller to answer are masked (:func:`mask_label_orders`)."""
    messages: list[Message] = [{"role": "system", "content": system_prompt(labels, task_description)}]
    for demo_text, demo_label in demos:
        messages.append({"role": "user", "content": f"Text: {mask_label_orders(demo_text, labels)}\nLabel:"})
        messages.append({"role": "assistant", "content": demo_label})
    messages.append({"role": "user", "content": f"Text: {mask_label_orders(text, labels)}\nLabel:"})
    return messages


def demo_generation_messages(label: str, labels: Sequence[str], style_examples: Sequence[str], count: int,
                             task_description: str | None = None) -> list[Message]:
    """Ask the LLM to write ``count`` new texts of class ``label`` in the style of unlabeled examples (label
    names they order the labeller to answer masked, as in :func:`label_messages`)."""
    examples = "\n".join(f"- {mask_label_orders(t, labels)}" for t in style_examples)
    task = task_description or f"The texts are classified into: {', '.join(labels)}."
    return [
        {"role": "system", "content": "You write realistic example texts for a text classification data set."},
        {"role": "user", "content": (
            f"{task}\nHere are some unlabeled texts from the data set, showing its style:\n{examples}\n\n"
            f"Write {count} new, different texts in the same style whose label is \"{label}\". "
            "Write one text per line, with no numbering and no explanation.")},
    ]


# an assistant's reply about the request rather than an example text ("I'm sorry, but I can't assist...",
# "Here are five reviews:"), as small models write when asked for examples
_CHATTER = re.compile(r"^(i'?m sorry|i am sorry|sorry\b|i'?m not sure|i am not sure|i can'?not|i can'?t|i'?m unable|"
                      r"as an ai|sure\b|certainly\b|of course\b|here (are|is)\b|note\b)", re.IGNORECASE)


def parse_generated_texts(answer: str, limit: int, labels: Sequence[str] = ()) -> list[str]:
    """Split a demo-generation answer into clean, distinct texts: numbering, bullets and a leading label name
    ("Negative 1. ...") stripped; the assistant's chatter about the request dropped (a refusal written as a
    "negative" demonstration teaches the LLM that refusals are negative)."""
    names = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    label_prefix = re.compile(rf"^\s*({names})\s*\d*\s*[.):\-]\s*", re.IGNORECASE) if names else None
    seen: set[str] = set()
    texts: list[str] = []
    for line in answer.splitlines():
        line = re.sub(r"^\s*(\d+[.):]|[-*•]|text\s*\d*\s*:)\s*", "", line, flags=re.IGNORECASE).strip().strip('"')
        if label_prefix is not None:
            line = label_prefix.sub("", line).strip().strip('"')
        if len(line) < 8 or line.lower() in seen or line.endswith(":") or _CHATTER.match(line):
            continue
        seen.add(line.lower())
        texts.append(line)
        if len(texts) == limit:
            break
    return texts


_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
# words that negate the label named right after them or one word later ("not positive", "not very good");
# "t" is the tail of "isn't" / "don't" once punctuation is squashed
_NEGATIONS = frozenset({"not", "no", "never", "neither", "nor", "hardly", "t"})


def strip_thinking(answer: str) -> str | None:
    """The answer without ``<think>…</think>`` blocks; None when thinking was cut off (no answer given)."""
    text = _THINK.sub(" ", answer)
    return None if "<think>" in text.lower() else text


def _squash(text: str) -> str:
    text = re.sub(r"[\"'`*_.,;:!?()\[\]{}<>\u2018\u2019\u201c\u201d]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def label_name(label: str) -> str:
    """A label's name as answers are compared with it: lower case, punctuation and spacing ignored."""
    return _squash(label.lower())


@dataclass(frozen=True)
class _Answer:
    """One answer text, normalised: ``words`` with the first ``skip`` an "Answer:"-style prefix."""

    full: str  # the whole text, normalised
    short: str  # without the prefix (the whole text when nothing follows the prefix)
    words: list[str]
    skip: int

    @classmethod
    def of(cls, text: str) -> _Answer:
        low = text.strip().lower()
        full = _squash(low)
        match = _PREFIX.match(low)
        if match is None or not _squash(low[match.end():]):
            return cls(full, full, full.split(), 0)
        head, rest = _squash(match.group(0)).split(), _squash(low[match.end():]).split()
        if head + rest != full.split() or not _SEPARATED.search(match.group(0)):
            # glued into a word ("type-x"), or no "is"/":" to mark it off ("Type or A"): its words may name labels
            return cls(full, " ".join(rest), full.split(), 0)
        return cls(full, " ".join(rest), head + rest, len(head))


class LabelMatcher:
    """Maps free-form LLM answers to one label of a fixed label set (see :meth:`parse`).

    Raises ValueError when two labels have the same :func:`label_name` (no answer could tell them apart).
    """

    def __init__(self, labels: Sequence[str], synonyms: dict[str, tuple[str, ...]] | None = None) -> None:
        self.by_name: dict[str, str] = {}
        for lab in labels:
            name = label_name(lab)
            if self.by_name.get(name, lab) != lab:
                raise ValueError(f"labels {self.by_name[name]!r} and {lab!r} are the same label once case, spacing "
                                 "and punctuation are ignored; rename one of them")
            self.by_name[name] = lab
        self.by_name.pop("", None)  # a label of punctuation only ("?") is never named by an answer
        self._names = [(tuple(name.split(" ")), lab) for name, lab in self.by_name.items()]
        # "B" for "Type B": a label's name without an "Answer:"-style word, when no other label has it
        short: dict[str, list[str]] = {}
        for name, lab in self.by_name.items():
            alias = _squash(_PREFIX.sub("", name))
            if alias and alias != name:
                short.setdefault(alias, []).append(lab)
        self.by_alias = {a: labs[0] for a, labs in short.items() if len(labs) == 1 and a not in self.by_name}
        if synonyms is None:
            synonyms = DATASET_SYNONYMS.get(frozenset(self.by_name), {})
        self.by_synonym = {word: self.by_name[label_name(name)] for name, words in synonyms.items()
                           if label_name(name) in self.by_name for word in words if word not in self.by_name}

    def parse(self, answer: str | None) -> str | None:
        """The one label ``answer`` names, or None when it names none, several, or a negated one.

        In order: the whole answer or its first line is a label (case, punctuation, quotes, markdown and an
        "Answer:" / "The label is" prefix ignored), or a label's distinctive part ("B" for "Type B");
        otherwise the labels named in the first line, else in the whole answer, where the longest name wins
        ("very positive" over "positive", "not spam" over "spam"); otherwise, in a short answer, the data
        set's synonyms ("good"); otherwise a one-word abbreviation of one label ("pos"). ``<think>`` blocks
        are skipped.
        """
        text = strip_thinking(answer) if answer else None
        if not text or not text.strip():
            return None
        whole = _Answer.of(text)
        first = _Answer.of(text.strip().splitlines()[0])
        for table in (self.by_name, self.by_alias):
            for form in (whole.full, whole.short, first.full, first.short):
                if form in table:
                    return table[form]
        found = self._mentioned(first)
        return found if found is not None or first == whole else self._mentioned(whole)

    def _mentioned(self, answer: _Answer) -> str | None:
        words, skip = answer.words, answer.skip
        at: dict[str, list[int]] = {}
        for i, word in enumerate(words):
            at.setdefault(word, []).append(i)
        spans = [(i, i + len(name), lab) for name, lab in self._names for i in at.get(name[0], ())
                 if tuple(words[i:i + len(name)]) == name and i + len(name) > skip]
        named = [(i, lab) for i, end, lab in spans  # a name inside a longer one ("spam" in "not spam") is not one
                 if not any(o_i <= i and end <= o_end and o_end - o_i > end - i for o_i, o_end, _ in spans)]
        if not named and len(words) - skip <= SYNONYM_WORDS:
            named = [(i, self.by_synonym[w]) for i, w in enumerate(words) if i >= skip and w in self.by_synonym]
        if not named:
            rest = words[skip:]
            if len(rest) != 1 or len(rest[0]) < 3:
                return None
            starts = [(name, lab) for name, lab in self._names if name[0].startswith(rest[0])]
            return starts[0][1] if len(starts) == 1 and starts[0][0][0] != rest[0] else None
        if len({lab for _, lab in named}) > 1 or any(_NEGATIONS.intersection(words[max(0, i - 2):i])
                                                     for i, _ in named):
            return None
        return named[0][1]


def parse_label(answer: str | None, labels: Sequence[str],
                synonyms: dict[str, tuple[str, ...]] | None = None) -> str | None:
    """Map a free-form answer to one label, or None when it names none or several (see
    :meth:`LabelMatcher.parse`). ``synonyms`` (label name -> answer words) replaces the data set's synonyms.

    Raises ValueError when two labels are the same once case and punctuation are ignored.
    """
    return LabelMatcher(labels, synonyms).parse(answer)


def label_token_prefixes(labels: Sequence[str]) -> dict[str, str]:
    """Lower-case label name per label, used to attribute first-token logprobs to labels."""
    return {lab: name for name, lab in LabelMatcher(labels, {}).by_name.items()}
