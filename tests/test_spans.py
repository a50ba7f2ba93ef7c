"""Span building blocks: prompts, answer parsing, mention location, BIO conversion, logprob confidence."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from freeal_backend.spans import (
    IGNORE,
    Span,
    bio_labels,
    bio_to_spans,
    entities_json,
    entities_of,
    locate_mentions,
    parse_entities,
    parse_generated_span_demos,
    prompt_text,
    resolve_overlaps,
    span_confidences,
    span_demo_generation_messages,
    span_messages,
    spans_from_dicts,
    spans_to_bio,
)

TYPES = ["Chemical", "Disease"]
BC5CDR = Path(__file__).resolve().parents[2] / "shared" / "data" / "bc5cdr"


def bc5cdr(split: str) -> list[dict]:
    path = BC5CDR / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found (shared data)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def texts_of(text: str, spans: list[Span]) -> list[tuple[str, str]]:
    return [(text[s.start:s.end], s.label) for s in spans]


# --- prompts ---------------------------------------------------------------------------------------

def test_span_messages_mirror_label_messages() -> None:
    demos = [("Aspirin caused ulcers .", [("Aspirin", "Chemical"), ("ulcers", "Disease")])]
    msgs = span_messages("Lithium and tremor .", TYPES, demos, "Find chemicals and diseases.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "Find chemicals and diseases." in msgs[0]["content"] and "Chemical, Disease" in msgs[0]["content"]
    assert msgs[1]["content"] == "Text: Aspirin caused ulcers .\nEntities:"
    assert msgs[2]["content"] == entities_json(demos[0][1])
    assert json.loads(msgs[2]["content"]) == [{"text": "Aspirin", "type": "Chemical"},
                                              {"text": "ulcers", "type": "Disease"}]
    assert msgs[3]["content"] == "Text: Lithium and tremor .\nEntities:"
    # a demo's answer parses back to its entities
    assert parse_entities(msgs[2]["content"], TYPES)[0] == demos[0][1]


def test_long_text_is_cut_and_no_span_past_what_the_llm_saw() -> None:
    words = [("aspirin" if i % 7 == 0 else "fever" if i % 11 == 0 else f"w{i}") for i in range(3400)]
    text = " ".join(words)
    assert len(text) > 20_000
    msgs = span_messages(text, TYPES)
    shown = prompt_text(text)
    assert msgs[-1]["content"] == f"Text: {shown}\nEntities:" and len(shown) <= 4000
    assert text.startswith(shown) and text[len(shown)] == " "  # cut at whitespace
    spans, dropped = locate_mentions(text, [("aspirin", "Chemical"), ("fever", "Disease"), ("w3398", "Chemical")],
                                     limit=len(shown))
    assert spans and all(s.end <= len(shown) for s in spans)
    assert dropped == {"past_limit": 1}
    assert all(text[s.start:s.end] in ("aspirin", "fever") for s in spans)


def test_demo_generation_round_trip() -> None:
    msgs = span_demo_generation_messages(TYPES, ["Lithium - induced tremor .", "No effect was seen ."], 3)
    assert "Write 3 new" in msgs[1]["content"] and "Lithium - induced tremor ." in msgs[1]["content"]
    answer = ("<think>plan</think>Here you go:\n```json\n["
              '{"text": "Cocaine use caused a stroke .", "entities": [{"text": "Cocaine", "type": "Chemical"}, '
              '{"text": "stroke", "type": "Disease"}]},'
              '{"text": "Heparin reduced thrombosis .", "entities": [{"text": "warfarin", "type": "Chemical"}]},'
              '{"text": "cocaine use caused a stroke .", "entities": []},'
              '{"text": "Patients were followed for a year .", "entities": []},'
              '{"text": "Valproate and hepatitis .", "entities": [{"text": "Valpro')
    demos = parse_generated_span_demos(answer, TYPES, limit=5)
    assert [d[0] for d in demos] == ["Cocaine use caused a stroke .", "Patients were followed for a year ."]
    assert texts_of(*demos[0]) == [("Cocaine", "Chemical"), ("stroke", "Disease")]
    assert parse_generated_span_demos(answer, TYPES, limit=1) == demos[:1]
    assert parse_generated_span_demos("I cannot do that.", TYPES, limit=3) == []


# --- parsing -----------------------------------------------------------------------------------------

ANSWER = '[{"text": "lithium", "type": "Chemical"}, {"text": "tremor", "type": "Disease"}]'
EXPECTED = [("lithium", "Chemical"), ("tremor", "Disease")]


@pytest.mark.parametrize("raw", [
    ANSWER,
    f"```json\n{ANSWER}\n```",
    f"```\n{ANSWER}",  # unclosed fence
    f"Sure! The entities are:\n{ANSWER}\nLet me know if you need more.",
    f"The types [Chemical, Disease] give: {ANSWER}",  # a bracket in prose before the JSON
    f"<think>Maybe [{{\"text\": \"lithium\", \"type\": \"Disease\"}}] ...</think>\n{ANSWER}",
    f"reasoning without an opening tag</think>{ANSWER}",
    '{"entities": ' + ANSWER + "}",
    '{"Chemicals": ["lithium"], "disease": ["tremor"]}',
    '[["lithium", "chemical"], ["tremor", "DISEASE"]]',
    '[{"Entity": "lithium", "Label": "Chemical"}, {"mention": "tremor", "category": "disease"}]',
])
def test_parse_entities_shapes(raw: str) -> None:
    entities, stats = parse_entities(raw, TYPES)
    assert entities == EXPECTED and stats.parsed and stats.kept == 2 and not stats.truncated


def test_parse_truncated_unknown_and_malformed() -> None:
    raw = ('[{"text": "lithium", "type": "Chemical"}, {"text": "BRCA1", "type": "Gene"}, {"text": "", "type": '
           '"Disease"}, {"type": "Disease"}, {"text": "tremor", "type": "Disease"}, {"text": "hal')
    entities, stats = parse_entities(raw, TYPES)
    assert entities == EXPECTED
    assert (stats.parsed, stats.items, stats.kept, stats.unknown_type, stats.malformed, stats.truncated) == \
        (True, 5, 2, 1, 2, True)


def test_parse_single_object_and_garbage_bound() -> None:
    assert parse_entities('Answer: {"text": "lithium", "type": "Chemical"}', TYPES)[0] == [("lithium", "Chemical")]
    entities, stats = parse_entities("[" * 100_000 + ANSWER, TYPES)  # bounded work, gives up cleanly
    assert entities == [] and not stats.parsed


@pytest.mark.parametrize(("raw", "parsed"), [
    ("[]", True), ("None.", False), ("", False), (None, False), ("<think>[{\"text\": \"x\"", False),
    ('[{"text": "lith', False),  # nothing complete before the cut
])
def test_parse_no_entities_vs_unusable(raw: str | None, parsed: bool) -> None:
    entities, stats = parse_entities(raw, TYPES)
    assert entities == [] and stats.parsed is parsed


# --- locating mentions ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "mention", "expected"), [
    ("Patients on lithium 😀 had tremor 🙂.", "lithium", "lithium"),
    ("😀😀 lithium 👍🏽 tremor", "tremor", "tremor"),
    ("Caf\u0065\u0301ine and tremor", "Caféine", "Caf\u0065\u0301ine"),  # decomposed text, composed mention
    ("Caféine and tremor", "Cafe\u0301ine", "Caféine"),  # composed text, decomposed mention
    ("lithium\r\ninduced\r\ntremor", "induced tremor", "induced\r\ntremor"),
    ("lithium\tinduced \t  tremor", "induced tremor", "induced \t  tremor"),
    ("Parkinson ' s   disease", "Parkinson's disease", "Parkinson ' s   disease"),
    ("LITHIUM toxicity", "lithium", "LITHIUM"),  # case-insensitive only when no exact occurrence
    ("acute Hepatite", "hépatite", "Hepatite"),  # accent-insensitive likewise
    ("Lithium-induced tremor", "Lithium", "Lithium"),  # a hyphen is a word boundary
])
def test_offsets_are_code_points_on_word_boundaries(text: str, mention: str, expected: str) -> None:
    spans, dropped = locate_mentions(text, [(mention, "Chemical")])
    assert not dropped and [text[s.start:s.end] for s in spans] == [expected]
    assert all(0 <= s.start < s.end <= len(text) for s in spans)


@pytest.mark.parametrize(("text", "mention"), [
    ("lithiumcarbonate was given", "lithium"),
    ("the antitremor effect", "tremor"),
    ("Cafe\u0301", "Cafe"),  # would cut a combining mark: case/accent-insensitive tier takes the whole "Café"
])
def test_half_words_refused(text: str, mention: str) -> None:
    spans, dropped = locate_mentions(text, [(mention, "Chemical")])
    if mention == "Cafe":
        assert texts_of(text, spans) == [("Cafe\u0301", "Chemical")]
    else:
        assert spans == [] and dropped == {"half_word": 1}


def test_emoji_cluster_never_cut() -> None:
    text = "family 👨\u200d👩\u200d👧 here and 👍🏽 there"
    spans, dropped = locate_mentions(text, [("👨", "Chemical"), ("👍", "Disease"), ("here", "Chemical")])
    assert texts_of(text, spans) == [("here", "Chemical")] and dropped == {"half_word": 2}


def test_not_found_and_empty_counted() -> None:
    spans, dropped = locate_mentions("Lithium and tremor .", [("aspirin", "Chemical"), (" ", "Disease")])
    assert spans == [] and dropped == {"not_found": 1, "empty": 1}
    assert locate_mentions("", [("aspirin", "Chemical")]) == ([], {"not_found": 1})


def test_repeated_mentions_rule() -> None:
    text = "PD patients : PD onset , PD drugs"
    once, _ = locate_mentions(text, [("PD", "Disease")])
    assert [s.start for s in once] == [0, 14, 25]  # named once: every occurrence
    twice, dropped = locate_mentions(text, [("PD", "Disease"), ("PD", "Chemical")])
    assert texts_of(text, twice) == [("PD", "Disease"), ("PD", "Chemical")] and [s.start for s in twice] == [0, 14]
    four, dropped = locate_mentions(text, [("PD", "Disease")] * 4)
    assert len(four) == 3 and dropped == {"overlap": 1}


def test_overlaps_keep_the_longer_span() -> None:
    text = "Parkinson ' s disease and liver disease"
    spans, dropped = locate_mentions(text, [("disease", "Disease"), ("Parkinson's disease", "Disease"),
                                            ("Parkinson", "Chemical")])
    assert texts_of(text, spans) == [("Parkinson ' s disease", "Disease"), ("disease", "Disease")]
    assert dropped == {"overlap": 1}  # "Parkinson" lies inside the longer span
    partial, dropped = locate_mentions("a b c d", [("a b", "Chemical"), ("b c d", "Disease")])
    assert texts_of("a b c d", partial) == [("b c d", "Disease")] and dropped == {"overlap": 1}
    same, _ = locate_mentions("x lithium y", [("lithium", "Chemical"), ("lithium ", "Disease")])
    assert texts_of("x lithium y", same) == [("lithium", "Chemical")]  # same span twice: first named wins
    assert resolve_overlaps([Span(0, 3, "A"), Span(2, 9, "B"), Span(9, 12, "A")]) == [Span(2, 9, "B"), Span(9, 12, "A")]


def test_scores_follow_their_entity() -> None:
    spans, _ = locate_mentions("a b a", [("a", "Chemical"), ("b", "Disease")], scores=[0.9, None])
    assert [(s.start, s.score) for s in spans] == [(0, 0.9), (2, None), (4, 0.9)]


def test_entities_of_round_trip_on_bc5cdr() -> None:
    """A gold sentence rendered as an answer locates back to the same spans (demos teach the rule)."""
    rows = bc5cdr("train")
    failures = []
    for row in rows:
        spans = spans_from_dicts(row["spans"])
        back, _ = locate_mentions(row["text"], entities_of(row["text"], spans))
        if back != spans:
            failures.append(row["text"])
    # the rule cannot express one of several occurrences of a mention labelled; BC5CDR never does that
    assert failures == []


# --- confidence --------------------------------------------------------------------------------------

def test_span_confidences_from_token_logprobs() -> None:
    raw = '[{"text": "lithium carbonate", "type": "Chemical"}, {"text": "tremor", "type": "Disease"}]'
    pieces = ['[{"text": "', "lith", "ium", " carbonate", '", "type": "', "Chemical", '"}, {"text": "', "tre",
              "mor", '", "type": "', "Disease", '"}]']
    assert "".join(pieces) == raw
    probs = {"lith": 0.9, "ium": 0.99, " carbonate": 0.6, "Chemical": 0.8, "tre": 0.95, "mor": 0.97, "Disease": 0.7}
    tokens = [(p, math.log(probs.get(p, 1.0))) for p in pieces]
    conf = span_confidences(raw, tokens, [("lithium carbonate", "Chemical"), ("tremor", "Disease")])
    assert conf == pytest.approx([0.6, 0.7])
    assert span_confidences(raw, tokens[:-1], [("tremor", "Disease")]) == [None]  # tokens do not spell the answer
    assert span_confidences(raw, [], [("tremor", "Disease")]) == [None]
    assert span_confidences(raw, tokens, [("aspirin", "Chemical")]) == [None]


# --- BIO ---------------------------------------------------------------------------------------------

def test_bio_by_hand() -> None:
    # tokens: [CLS] as pir in caused ul cers [SEP]; words 0..2
    offsets = [(0, 0), (0, 2), (2, 5), (5, 7), (8, 14), (15, 17), (17, 20), (0, 0)]
    word_ids = [None, 0, 0, 0, 1, 2, 2, None]
    spans = [Span(0, 7, "Chemical"), Span(15, 20, "Disease")]
    tags, lost = spans_to_bio(offsets, word_ids, spans, TYPES)
    names = bio_labels(TYPES)
    assert names == ["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]
    assert tags == [IGNORE, 1, IGNORE, IGNORE, 0, 3, IGNORE, IGNORE] and lost == 0
    assert bio_to_spans(tags, offsets, word_ids, TYPES) == spans
    # I- after O opens a span (conlleval), a type change splits, scores are the lowest word probability
    tags2 = [IGNORE, 2, IGNORE, IGNORE, 4, 4, IGNORE, IGNORE]
    probs = [1, 0.9, 1, 1, 0.5, 0.8, 1, 1]
    got = bio_to_spans(tags2, offsets, word_ids, TYPES, probs=probs)
    assert got == [Span(0, 7, "Chemical"), Span(8, 20, "Disease")] and [s.score for s in got] == [0.9, 0.5]
    # a span boundary inside a word snaps outward; a span past the truncated end is lost
    assert spans_to_bio(offsets, word_ids, [Span(3, 4, "Chemical"), Span(30, 35, "Disease")], TYPES) == \
        ([IGNORE, 1, IGNORE, IGNORE, 0, 0, IGNORE, IGNORE], 1)


def test_bio_round_trip_on_all_bc5cdr_training_sentences() -> None:
    from transformers import AutoTokenizer

    from freeal_backend.slm.encoder import default_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_encoder_path()), local_files_only=True)
    rows = bc5cdr("train")
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=128, return_offsets_mapping=True)
    truncated = mismatched = 0
    for i, row in enumerate(rows):
        spans = spans_from_dicts(row["spans"])
        offsets, word_ids = enc["offset_mapping"][i], enc.word_ids(i)
        tags, lost = spans_to_bio(offsets, word_ids, spans, TYPES)
        back = bio_to_spans(tags, offsets, word_ids, TYPES)
        if lost or len(enc["input_ids"][i]) == 128:
            truncated += 1
            last = max(e for _, e in offsets)
            assert all(s.end <= last for s in back)
            assert back == [s for s in spans if s.end <= last][:len(back)] or back[-1].end == last
        elif back != spans:
            mismatched += 1
    assert mismatched == 0
    assert truncated <= 0.01 * len(rows)  # 18 of 4560 sentences are longer than 128 sub-tokens
