"""Span (NER) building blocks: prompts, answer parsing, mention location, BIO conversion (pure, no I/O).

Offsets are Python ``str`` indices (Unicode code points), end exclusive: what Label Studio stores for
``<Labels>`` regions on ``<Text>`` since label-studio-frontend PR #308 (offsets in code points, not
UTF-16 units).

Rules for turning the LLM's list of ``(mention, type)`` into character spans (:func:`locate_mentions`):

* **Matching.** A mention matches the text ignoring whitespace (``"Parkinson's disease"`` matches
  ``"Parkinson ' s disease"``, CRLF, tabs and repeated spaces included) and Unicode composition (NFD:
  ``"é"`` matches ``"e"`` + U+0301); when no such occurrence exists, case and accents are ignored too.
  A match must sit on word boundaries (never half a word: the characters on either side of each end
  must not both be letters/digits/marks) and must not cut a character cluster (a combining mark,
  variation selector, skin-tone modifier or ZWJ right after its end or at its start).
* **Repeated mentions.** A mention named once labels every whole-word occurrence (NER guidelines label
  every occurrence); a mention named n >= 2 times labels its first n available occurrences, the i-th with
  the i-th named type.
* **Overlaps.** Longer mentions claim text first (ties: the one named first); an occurrence that overlaps
  an already claimed span is not available. So nested or overlapping answers keep the longer span.
* Mentions with no available whole-word occurrence are dropped and counted by reason
  (``not_found``, ``half_word``, ``overlap``, ``past_limit``, ``empty``).
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from freeal_backend.llm.prompts import Message

Entity = tuple[str, str]  # (mention text, entity type)
IGNORE = -100  # label id of tokens that carry no training signal (special tokens, later sub-tokens)
PROMPT_MAX_CHARS = 4000
MAX_JSON_STARTS = 256  # bracket positions tried per answer (bounds the work on a long garbage answer)


@dataclass(frozen=True, order=True)
class Span:
    """A labelled character span ``text[start:end]``; ``score`` is a confidence (None when unknown)."""

    start: int
    end: int
    label: str
    score: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ParseStats:
    """What :func:`parse_entities` made of an answer."""

    parsed: bool  # a JSON list/object of entities was found (False: the answer is unusable, not "no entity")
    items: int  # entries seen
    kept: int
    unknown_type: int
    malformed: int  # entries without a usable mention or type
    truncated: bool  # the list was cut off; complete entries before the cut were kept


# --- prompts -----------------------------------------------------------------------------------------

def prompt_text(text: str, max_chars: int = PROMPT_MAX_CHARS) -> str:
    """The prefix of ``text`` shown to the LLM: at most ``max_chars``, cut at whitespace when possible."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    return cut[:space] if space > max_chars // 2 else cut


def entities_json(entities: Sequence[Entity]) -> str:
    """The answer format: ``[{"text": ..., "type": ...}, ...]`` on one line."""
    return json.dumps([{"text": m, "type": t} for m, t in entities], ensure_ascii=False)


def span_system_prompt(types: Sequence[str], task_description: str | None = None) -> str:
    task = task_description or "Find the named entities in the text."
    return (f"{task} Entity types: {', '.join(types)}. Answer with a JSON list of objects "
            '{"text": <the entity exactly as written in the text>, "type": <one of the types>}, '
            "in order of appearance. Copy whole words only. A mention listed once counts for every "
            "occurrence of it. Answer [] when there is no entity. Reply with the JSON list only.")


def span_messages(text: str, types: Sequence[str], demos: Sequence[tuple[str, Sequence[Entity]]] = (),
                  task_description: str | None = None, *, max_chars: int = PROMPT_MAX_CHARS) -> list[Message]:
    """Messages for extracting the entities of one text; demonstrations become earlier turns.

    Each demo is ``(text, entities)`` (see :func:`entities_of` to make entities from gold spans).
    Texts longer than ``max_chars`` are cut (:func:`prompt_text`); pass the same limit to
    :func:`locate_mentions` so no span lands in the unseen part.
    """
    messages: list[Message] = [{"role": "system", "content": span_system_prompt(types, task_description)}]
    for demo_text, demo_entities in demos:
        messages.append({"role": "user", "content": f"Text: {prompt_text(demo_text, max_chars)}\nEntities:"})
        messages.append({"role": "assistant", "content": entities_json(demo_entities)})
    messages.append({"role": "user", "content": f"Text: {prompt_text(text, max_chars)}\nEntities:"})
    return messages


def span_demo_generation_messages(types: Sequence[str], style_examples: Sequence[str], count: int,
                                  task_description: str | None = None) -> list[Message]:
    """Round 0: ask the LLM to write ``count`` new texts in the style of unlabeled examples, with entities."""
    examples = "\n".join(f"- {t}" for t in style_examples)
    task = task_description or f"Named entities of these types are marked: {', '.join(types)}."
    return [
        {"role": "system", "content": "You write realistic example texts for a named entity recognition data set."},
        {"role": "user", "content": (
            f"{task}\nHere are some unlabeled texts from the data set, showing its style:\n{examples}\n\n"
            f"Write {count} new, different texts in the same style. Together they should contain entities of "
            f"every type ({', '.join(types)}). Answer with a JSON list, one object per text: "
            '{"text": <the text>, "entities": [{"text": <entity exactly as written>, "type": <type>}, ...]}. '
            "List every entity of the text. Reply with the JSON list only.")},
    ]


# --- parsing -----------------------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)(```|$)", re.DOTALL)
_TEXT_KEYS = ("text", "mention", "entity", "name", "span", "word")
_TYPE_KEYS = ("type", "label", "entity_type", "category", "class", "tag")


def _strip_reasoning(raw: str) -> str:
    """Drop ``<think>...</think>`` blocks (an unclosed one runs to the end) and text before a stray ``</think>``."""
    if "</think>" in raw.lower() and "<think>" not in raw.lower():
        raw = raw[raw.lower().rindex("</think>") + len("</think>"):]
    raw = _THINK.sub(" ", raw)
    fences = [m.group(1) for m in _FENCE.finditer(raw)]
    return "\n".join(fences) if fences else raw


def _decode_sequence(text: str, open_at: int) -> tuple[list[Any], bool] | None:
    """Decode the JSON list opening at ``open_at`` item by item: (items, closed). None when no item decodes.

    A truncated list yields the complete items before the cut (``closed`` False).
    """
    decoder = json.JSONDecoder()
    items: list[Any] = []
    pos = open_at + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            return (items, False) if items else None
        if text[pos] == "]":
            return items, True
        try:
            item, pos = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            return (items, False) if items else None
        items.append(item)


def _find_json(text: str) -> tuple[Any, bool] | None:
    """The first JSON list (or object) in ``text`` that decodes, tolerating a truncated tail."""
    decoder = json.JSONDecoder()
    for tried, m in enumerate(re.finditer(r"[\[{]", text)):
        if tried == MAX_JSON_STARTS:
            break
        if m.group() == "{":
            try:
                obj, _ = decoder.raw_decode(text, m.start())
            except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
                continue
            if isinstance(obj, dict) and any(isinstance(v, list) for v in obj.values()):
                return obj, True
            if isinstance(obj, dict) and _entry(obj)[0] is not None:  # one entity, not in a list
                return [obj], True
            continue
        found = _decode_sequence(text, m.start())
        if found is not None:
            return found
    return None


def _type_lookup(types: Sequence[str]) -> dict[str, str]:
    lookup: dict[str, str] = {}
    for t in types:
        key = t.strip().casefold()
        lookup[key] = t
        lookup.setdefault(key + "s", t)  # "Chemicals" -> "Chemical"
    return lookup


def _entries(obj: Any) -> list[Any]:
    """Flatten the usual answer shapes into a list of entries."""
    if isinstance(obj, list):
        return obj
    # {"entities": [...]} or {"Chemical": ["aspirin"], "Disease": [...]}
    for key in ("entities", "entity", "results", "spans"):
        if isinstance(obj.get(key), list):
            return obj[key]
    out: list[Any] = []
    for key, value in obj.items():
        if isinstance(value, list):
            out.extend([m, key] if isinstance(m, str) else m for m in value)
    return out


def _entry(item: Any) -> tuple[Any, Any]:
    if isinstance(item, dict):
        low = {str(k).casefold(): v for k, v in item.items()}
        return (next((low[k] for k in _TEXT_KEYS if k in low), None),
                next((low[k] for k in _TYPE_KEYS if k in low), None))
    if isinstance(item, list) and len(item) == 2:
        return item[0], item[1]
    return None, None


def parse_entities(raw: str | None, types: Sequence[str]) -> tuple[list[Entity], ParseStats]:
    """``(mention, type)`` pairs from an LLM answer, in the order given.

    Tolerates ``<think>`` blocks, code fences, prose around the JSON, truncated lists (complete objects
    are kept), ``{"entities": [...]}`` and ``{"Type": [mentions]}`` shapes, type names in any case or
    plural. Entries of unknown types are dropped and counted.
    """
    found = _find_json(_strip_reasoning(raw or ""))
    if found is None:
        return [], ParseStats(False, 0, 0, 0, 0, False)
    obj, closed = found
    lookup = _type_lookup(types)
    out: list[Entity] = []
    items = _entries(obj)
    unknown = malformed = 0
    for item in items:
        mention, kind = _entry(item)
        if not isinstance(mention, str) or not mention.strip() or not isinstance(kind, str):
            malformed += 1
            continue
        label = lookup.get(kind.strip().casefold())
        if label is None:
            unknown += 1
            continue
        out.append((mention.strip(), label))
    return out, ParseStats(True, len(items), len(out), unknown, malformed, not closed)


# --- locating mentions -------------------------------------------------------------------------------

def _is_word(ch: str) -> bool:
    return ch.isalnum() or unicodedata.category(ch).startswith("M")


def _is_cluster_extender(ch: str) -> bool:
    """Characters that belong to the preceding character: combining marks, VS, skin tones, ZWJ."""
    return (unicodedata.category(ch).startswith("M") or ch == "\u200d"
            or "\U0001f3fb" <= ch <= "\U0001f3ff" or "\ufe00" <= ch <= "\ufe0f")


def _on_boundaries(text: str, start: int, end: int) -> bool:
    """Whole words only, and no character cluster (combining marks, VS, skin tones, ZWJ) cut at either end."""
    if start > 0 and (_is_cluster_extender(text[start]) or text[start - 1] == "\u200d"
                      or (_is_word(text[start - 1]) and _is_word(text[start]))):
        return False
    return not (end < len(text) and (_is_cluster_extender(text[end])
                                     or (_is_word(text[end - 1]) and _is_word(text[end]))))


def _fold(text: str, loose: bool) -> tuple[str, list[int]]:
    """Text without whitespace, canonically decomposed (NFD; when ``loose`` also case-folded and without
    combining marks), and the index of the original character behind each folded character."""
    chars: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        if ch.isspace():
            continue
        piece = unicodedata.normalize("NFD", ch)
        if loose:
            piece = "".join(c for c in piece if not unicodedata.category(c).startswith("M")).casefold()
        for c in piece:
            chars.append(c)
            index.append(i)
    return "".join(chars), index


def _occurrences(text: str, mention: str, loose: bool, folded: tuple[str, list[int]]) -> list[tuple[int, int]]:
    """Every (start, end) where ``mention`` matches the folded text (loose: end moved past combining marks)."""
    needle, _ = _fold(mention, loose)
    hay, index = folded
    if not needle:
        return []
    out = []
    pos = hay.find(needle)
    while pos >= 0:
        end = index[pos + len(needle) - 1] + 1
        while loose and end < len(text) and unicodedata.category(text[end]).startswith("M"):
            end += 1
        out.append((index[pos], end))
        pos = hay.find(needle, pos + 1)
    return out


def locate_mentions(text: str, entities: Sequence[Entity], *, scores: Sequence[float | None] | None = None,
                    limit: int | None = None) -> tuple[list[Span], Counter[str]]:
    """Character spans for ``(mention, type)`` pairs, by the rules in the module docstring.

    ``scores`` (one per entity, e.g. from :func:`span_confidences`) become the spans' scores. With
    ``limit``, only ``text[:limit]`` is searched (the part the LLM saw). Returns the spans sorted by
    start and the dropped entities counted by reason.
    """
    scores = list(scores) if scores is not None else [None] * len(entities)
    hay = text if limit is None else text[:limit]
    dropped: Counter[str] = Counter()
    groups: dict[str, list[int]] = {}
    for i, (mention, _) in enumerate(entities):
        if not mention.strip():
            dropped["empty"] += 1
            continue
        groups.setdefault(mention, []).append(i)
    folded = {loose: _fold(hay, loose) for loose in (False, True)}
    order = sorted(groups, key=lambda m: (-len(_fold(m, False)[0]), groups[m][0]))
    claimed = [False] * len(hay)
    spans: list[Span] = []
    for mention in order:
        named = groups[mention]
        found: list[tuple[int, int]] = []
        any_hit = False
        for loose in (False, True):
            hits = _occurrences(hay, mention, loose, folded[loose])
            any_hit = any_hit or bool(hits)
            found = [(s, e) for s, e in hits if _on_boundaries(text, s, e)]
            if found:
                break
        free = [(s, e) for s, e in found if not any(claimed[s:e])]
        take = free if len(named) == 1 else free[:len(named)]
        for k, (s, e) in enumerate(take):
            i = named[0] if len(named) == 1 else named[k]
            spans.append(Span(s, e, entities[i][1], scores[i]))
            claimed[s:e] = [True] * (e - s)
        missing = 0 if take and len(named) == 1 else len(named) - len(take)
        if missing:
            if found:
                reason = "overlap"
            elif any_hit:
                reason = "half_word"
            elif limit is not None and any(_occurrences(text, mention, loose, _fold(text, loose))
                                           for loose in (False, True)):
                reason = "past_limit"
            else:
                reason = "not_found"
            dropped[reason] += missing
    return sorted(spans), dropped


def entities_of(text: str, spans: Sequence[Span]) -> list[Entity]:
    """The ``(mention, type)`` answer that :func:`locate_mentions` maps back to ``spans`` (for demos).

    A mention is listed once when that labels exactly its spans (every available occurrence, one type),
    else once per labelled occurrence, in order of appearance. Some span sets cannot be said under the
    repeated-mention rule (one of two occurrences labelled); the closest answer is returned then.
    """
    ordered = sorted(spans)
    groups: dict[str, list[Span]] = {}
    for s in ordered:
        groups.setdefault(text[s.start:s.end], []).append(s)
    once = {m: len({s.label for s in g}) == 1 for m, g in groups.items()}

    def answer() -> list[Entity]:
        out: list[Entity] = []
        for s in ordered:
            mention = text[s.start:s.end]
            if not once[mention] or s is groups[mention][0]:
                out.append((mention, s.label))
        return out

    located, _ = locate_mentions(text, answer())
    for mention, group in groups.items():
        if once[mention] and [s for s in located if text[s.start:s.end] == mention] != group:
            once[mention] = False
    return answer()


def resolve_overlaps(spans: Sequence[Span]) -> list[Span]:
    """Keep the longer of overlapping spans (ties: the earlier one); sorted by start."""
    kept: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.start - s.end, s.start)):
        if all(s.end <= k.start or k.end <= s.start for k in kept):
            kept.append(s)
    return sorted(kept)


# --- round-0 generated demos -------------------------------------------------------------------------

def parse_generated_span_demos(answer: str | None, types: Sequence[str], limit: int
                               ) -> list[tuple[str, list[Span]]]:
    """Texts with located entity spans from a demo-generation answer.

    A text whose listed entities cannot all be located (or whose type is unknown) is dropped: a demo with
    wrong labels teaches the wrong thing. Duplicate texts are dropped. At most ``limit`` demos.
    """
    found = _find_json(_strip_reasoning(answer or ""))
    if found is None:
        return []
    obj, _ = found
    demos: list[tuple[str, list[Span]]] = []
    seen: set[str] = set()
    for item in _entries(obj):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            continue
        text = item["text"].strip()
        listed = item.get("entities", [])
        if not text or text.casefold() in seen or not isinstance(listed, list):
            continue
        entities, stats = parse_entities(json.dumps(listed), types)
        spans, dropped = locate_mentions(text, entities)
        if stats.kept != len(listed) or sum(dropped.values()):
            continue
        seen.add(text.casefold())
        demos.append((text, spans))
        if len(demos) == limit:
            break
    return demos


# --- confidence from logprobs ------------------------------------------------------------------------

def span_confidences(raw: str, token_logprobs: Sequence[tuple[str, float]],
                     entities: Sequence[Entity]) -> list[float | None]:
    """Per entity: the lowest probability among the answer tokens that spell its mention and its type.

    ``token_logprobs`` are the answer's chosen tokens with their logprobs, in order (their text must
    concatenate to ``raw``, else every confidence is None). Entities are found in order in the raw
    answer, as the JSON string of the mention followed by the JSON string of the type. The minimum,
    not the mean, so one doubtful token (a boundary word, the type) makes the whole span doubtful.
    An entity that cannot be found in the answer gets None, never a constant.
    """
    if not token_logprobs or "".join(t for t, _ in token_logprobs) != raw:
        return [None] * len(entities)
    starts: list[int] = []
    pos = 0
    for token, _ in token_logprobs:
        starts.append(pos)
        pos += len(token)
    out: list[float | None] = []
    cursor = 0
    for mention, kind in entities:
        m_at = _find_json_string(raw, mention, cursor)
        if m_at is None:
            out.append(None)
            continue
        t_at = _find_json_string(raw, kind, m_at[1], case_insensitive=True)
        ranges = [m_at] + ([t_at] if t_at is not None else [])
        probs = [math.exp(lp) for (token, lp), s in zip(token_logprobs, starts)
                 if any(s < b and s + len(token) > a for a, b in ranges)]
        out.append(min(probs) if probs else None)
        cursor = (t_at or m_at)[1]
    return out


def _find_json_string(raw: str, value: str, start: int, *, case_insensitive: bool = False
                      ) -> tuple[int, int] | None:
    """Character range of ``value``'s content (as written in JSON, escaped or not) in ``raw`` from ``start``."""
    hay = raw.casefold() if case_insensitive else raw
    for form in dict.fromkeys((json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1], value)):
        needle = form.casefold() if case_insensitive else form
        at = hay.find(needle, start)
        if at >= 0:
            return at, at + len(needle)
    return None


# --- BIO <-> character spans -------------------------------------------------------------------------

def bio_labels(types: Sequence[str]) -> list[str]:
    """Tag names: ``O`` then ``B-T``, ``I-T`` per type; a tag's id is its index."""
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def token_words(offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None]
                ) -> list[tuple[int, int, int]]:
    """Per word of a fast tokenizer's encoding: (first token index, char start, char end)."""
    words: dict[int, list[int]] = {}
    for i, w in enumerate(word_ids):
        if w is not None and offsets[i][1] > offsets[i][0]:
            if w in words:
                words[w][2] = offsets[i][1]
            else:
                words[w] = [i, offsets[i][0], offsets[i][1]]
    return [(a, b, c) for a, b, c in words.values()]


def spans_to_bio(offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None], spans: Sequence[Span],
                 types: Sequence[str]) -> tuple[list[int], int]:
    """Per-token tag ids for ``spans`` over one tokenized text, and the number of spans that got no token.

    Alignment: a word (the tokenizer's pre-tokenized word, from ``word_ids``) is tagged when it overlaps
    a span (a span boundary inside a word snaps outward); its first sub-token gets ``B-``/``I-`` or ``O``,
    later sub-tokens and special tokens get ``IGNORE`` (-100), so training and decoding read one tag per
    word. Overlapping spans are resolved first (:func:`resolve_overlaps`). A span past the truncated end
    gets no token and is counted.
    """
    names = bio_labels(types)
    ids = {n: i for i, n in enumerate(names)}
    tags = [IGNORE] * len(offsets)
    words = token_words(offsets, word_ids)
    for first, _, _ in words:
        tags[first] = ids["O"]
    lost = 0
    for span in resolve_overlaps(spans):
        inside = [first for first, s, e in words if s < span.end and e > span.start]
        if not inside:
            lost += 1
            continue
        tags[inside[0]] = ids[f"B-{span.label}"]
        for first in inside[1:]:
            tags[first] = ids[f"I-{span.label}"]
    return tags, lost


def bio_to_spans(tags: Sequence[int], offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None],
                 types: Sequence[str], *, probs: Sequence[float] | None = None) -> list[Span]:
    """Character spans from per-token tag ids (read at each word's first sub-token).

    Decoding follows seqeval's default (conlleval) scheme: ``I-T`` after ``O`` or after another type
    opens a new span. A span runs from its first word's start to its last word's end. With ``probs``
    (the probability of each token's tag), a span's score is the lowest over its words.
    """
    names = bio_labels(types)
    found: list[list[Any]] = []  # [start, end, label, score], the last one still open while I- continues it
    open_span = False
    for first, start, end in token_words(offsets, word_ids):
        tag = names[tags[first]] if 0 <= tags[first] < len(names) else "O"
        p = float(probs[first]) if probs is not None else None
        if tag == "O":
            open_span = False
            continue
        prefix, label = tag.split("-", 1)
        if prefix == "I" and open_span and found[-1][2] == label:
            found[-1][1] = end
            if p is not None:
                found[-1][3] = min(found[-1][3], p)
            continue
        found.append([start, end, label, p])
        open_span = True
    return [Span(s, e, lab, sc) for s, e, lab, sc in found]


def spans_from_dicts(items: Sequence[dict[str, Any]]) -> list[Span]:
    """Spans from ``{"start", "end", "label"}`` dicts (the shared data sets' format)."""
    return sorted(Span(int(d["start"]), int(d["end"]), str(d["label"])) for d in items)


# --- spans as one stored label -----------------------------------------------------------------------

def encode_spans(spans: Sequence[Span]) -> str:
    """A sentence's spans as one canonical label string (``[[start, end, type], ...]``, sorted; scores
    left out), so span answers are stored, cached, compared and counted like class labels."""
    return json.dumps([[s.start, s.end, s.label] for s in sorted(spans)], ensure_ascii=False, separators=(",", ":"))


def decode_spans(label: str | None, scores: dict[str, float] | None = None) -> list[Span]:
    """Inverse of :func:`encode_spans`; ``scores`` (by :func:`span_key`) become the spans' scores."""
    if not label:
        return []
    scores = scores or {}
    out = []
    for s, e, t in json.loads(label):
        out.append(Span(int(s), int(e), str(t), scores.get(f"{int(s)}:{int(e)}:{t}")))
    return out


def span_key(span: Span) -> str:
    """``"start:end:type"``: the key of a span's confidence in an answer's ``probs``."""
    return f"{span.start}:{span.end}:{span.label}"
