"""Property-based tests (hypothesis) of the core's pure input paths.

- ``prompts.parse_label`` never raises, answers a label from the set or None, and round-trips the usual
  decorations of a label ("Answer: X.", quotes, case, markdown);
- ``dataio.read_rows`` on malformed JSONL/CSV gives a clear ``ValueError`` naming the file, never
  another exception; valid rows round-trip, Unicode oddities included;
- the loop keeps any text (RTL, zero-width, emoji, escaped lone surrogates, empty) storable, and
  truncates huge texts with a warning.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from freeal_backend.config import Settings
from freeal_backend.dataio import read_rows, rows_to_items, write_results
from freeal_backend.loop import FreeALRun
from freeal_backend.llm.prompts import _PREFIX, label_messages, parse_label
from freeal_backend.records import Item, ItemResult

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# every code point, lone surrogates included (what a JSON "\ud800" escape produces)
ANY_CHAR = st.characters(codec=None, categories=None)
ODD_TEXTS = st.sampled_from([
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",  # Hebrew (RTL)
    "\u0645\u0631\u062d\u0628\u0627 \u202e\u202d mixed",  # Arabic + bidi overrides
    "zero\u200bwidth\u200c\u200d\ufeffjoiners",
    "emoji \U0001F600\U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469",
    "combining e\u0301\u0301\u0301", "nul\x00byte", "line\u2028separator\u2029para", "\ud800 lone surrogate",
    "\udfff", "tab\tand\r\ncrlf", "\U0010FFFF max", "\u3000ideographic space", "\x1b[31mansi\x1b[0m",
])
TEXTS = st.one_of(st.text(ANY_CHAR, max_size=200), ODD_TEXTS)

REAL_LABELS = ["positive", "negative", "neutral", "subjective", "objective", "abbreviation", "description",
               "entity", "human", "location", "number", "spam", "ham", "sports", "world", "business", "sci/tech",
               "type", "classic", "labelled", "answer", "other", "Very Positive", "not sure", "4 stars"]


def _norm(s: str) -> str:
    return " ".join("".join(" " if c in "\"'`*_.,;:!?()[]{}<>" else c for c in s.strip().lower()).split())


@st.composite
def label_sets(draw: st.DrawFn) -> list[str]:
    """2-6 distinct labels whose normalised forms differ and are not words of one another."""
    word = st.builds(str.__add__, st.sampled_from(string.ascii_letters + string.digits),
                     st.text(string.ascii_letters + "-/ 0123456789", max_size=13))
    labels = draw(st.lists(st.one_of(st.sampled_from(REAL_LABELS), word), min_size=2, max_size=6,
                           unique_by=lambda s: _norm(s)))
    norms = [_norm(x) for x in labels]
    assume(all(norms))
    for a in norms:  # a label that is a whole word of another makes "Answer: X" genuinely ambiguous
        for b in norms:
            assume(a == b or f" {a} " not in f" {b} ")
    return labels


# --- parse_label -------------------------------------------------------------------------------------------

@FUZZ
@given(answer=st.one_of(st.none(), TEXTS), labels=label_sets())
def test_parse_label_never_raises_and_answers_from_the_set(answer: str | None, labels: list[str]) -> None:
    got = parse_label(answer, labels)
    assert got is None or got in labels


@FUZZ
@given(labels=label_sets(), data=st.data())
@example(labels=["type", "other"], data=None)
@example(labels=["classic", "modern"], data=None)
@example(labels=["labelled", "unlabelled x"], data=None)
@example(labels=["Answer", "Question"], data=None)
def test_parse_label_round_trips_decorated_labels(labels: list[str], data: st.DataObject | None) -> None:
    templates = ["{}", "{}.", "Answer: {}.", "answer: {}", "Label: {}!", "'{}'", '"{}"', "**{}**", "  {}  ",
                 "The answer is {}.", "{}\nBecause the text says so."]
    for label in labels if data is None else [data.draw(st.sampled_from(labels))]:
        for template in templates:
            for shape in (label, label.upper(), label.lower()):
                answer = template.format(shape)
                assert parse_label(answer, labels) == label, (answer, labels)


@FUZZ
@given(labels=label_sets(), noise=st.text(ANY_CHAR, max_size=40))
def test_parse_label_is_total_on_label_plus_noise(labels: list[str], noise: str) -> None:
    for answer in (labels[0] + noise, noise + labels[-1], noise):
        got = parse_label(answer, labels)
        assert got is None or got in labels


def test_prefix_words_do_not_eat_labels_that_start_with_them() -> None:
    assert _PREFIX.sub("", "classic") == "classic" and _PREFIX.sub("", "types") == "types"
    assert parse_label("Answer: classic", ["classic", "modern"]) == "classic"
    assert parse_label("type", ["type", "token"]) == "type"


@FEW
@given(text=TEXTS, labels=label_sets())
def test_label_messages_carry_any_text_verbatim(text: str, labels: list[str]) -> None:
    msgs = label_messages(text, labels)
    assert msgs[-1]["content"] == f"Text: {text}\nLabel:"
    assert all(lab in msgs[0]["content"] for lab in labels)


# --- dataio.read_rows ---------------------------------------------------------------------------------------

def _check_read(path: Path) -> list[dict] | None:
    """read_rows must return rows with a text, or raise a ValueError that names the file."""
    try:
        rows = read_rows(path)
    except ValueError as exc:
        assert type(exc) is ValueError, f"{type(exc).__name__} is not a plain ValueError: {exc}"
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        return None
    assert all(isinstance(r, dict) and str(r.get("text") or "").strip() for r in rows)
    return rows


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXTS,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3),
                           max_leaves=6)


@FUZZ
@given(lines=st.lists(st.one_of(
    st.binary(max_size=60),  # arbitrary bytes: invalid UTF-8, NUL, half a JSON document
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"text": JSON_VALUES}).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"text": TEXTS}).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"text": TEXTS}).map(lambda v: json.dumps(v).encode()[:-3]),  # cut-off line
), max_size=6))
def test_read_rows_jsonl_malformed_input_gives_a_clear_value_error(tmp_path: Path, lines: list[bytes]) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines))
    _check_read(path)


@FUZZ
@given(blob=st.one_of(st.binary(max_size=200), st.text(ANY_CHAR, max_size=200).map(
    lambda s: s.encode("utf-8", "surrogatepass"))))
def test_read_rows_csv_malformed_input_gives_a_clear_value_error(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"text,label\n" + blob)
    _check_read(path)


@FEW
@given(texts=st.lists(TEXTS.filter(lambda t: t.strip()), min_size=1, max_size=5))
def test_read_rows_round_trips_unicode_in_jsonl_and_csv(tmp_path: Path, texts: list[str]) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": "x"}) + "\n" for t in texts), encoding="utf-8")
    rows = _check_read(jsonl)
    assert rows is not None
    items = rows_to_items(rows)
    assert len(items) == len(texts)
    for item, text in zip(items, texts):
        assert item.text.encode("utf-8")  # always encodable: a lone surrogate never reaches SQLite or HTTP
        if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            assert item.text == text


def test_read_rows_csv_with_a_huge_field_is_read_or_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["text", "label"])
    writer.writerow(["x" * 300_000, "positive"])
    writer.writerow(["short", "negative"])
    path.write_text(buf.getvalue(), encoding="utf-8")
    rows = _check_read(path)
    assert rows is not None and len(rows) == 2 and len(rows[0]["text"]) == 300_000


@pytest.mark.parametrize(("content", "needle"), [
    ('{"text": "ok"}\n{"text": "bad"\n', ":2: not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', "row 2 has no 'text'"),
    ('{"text": "   "}\n', "row 1 has no 'text'"),
    ('{"label": "positive"}\n', "row 1 has no 'text'"),
    ('{"text": {"nested": "object"}}\n', "row 1"),
    ('{"text": ["a", "list"]}\n', "row 1"),
])
def test_read_rows_specific_jsonl_errors(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_rows(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_read_rows_invalid_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError) as info:
        read_rows(path)
    assert str(path) in str(info.value) and "UTF-8" in str(info.value)


def test_lone_surrogates_from_json_escapes_reach_the_output_file_as_replacement_chars(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "\\ud800 lone"}\n{"id": "b", "text": "\\u202e RTL \\ud83d\\ude00"}\n',
                    encoding="utf-8")
    items = rows_to_items(read_rows(path))
    assert items[0].text == "\ufffd lone" and items[1].text == "\u202e RTL \U0001F600"
    write_results(tmp_path / "out.jsonl", items, [ItemResult("a", "x", 0.5), ItemResult("b", None, None)])
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == ["a", "b"] and lines[0]["text"] == "\ufffd lone"


# --- the loop's input preparation ---------------------------------------------------------------------------

def _run(tmp_path: Path, **overrides: object) -> FreeALRun:
    s = Settings(slm_min_steps=0, data_dir=tmp_path / "data", llm_base_url="http://127.0.0.1:9/v1", llm_model="none")
    return FreeALRun(s.with_(**overrides), ["positive", "negative"], tmp_path / "run")


@FEW
@given(texts=st.lists(st.one_of(TEXTS, st.just("")), min_size=1, max_size=6))
def test_prepare_stores_any_text(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> None:
    tmp = tmp_path_factory.mktemp("prep")
    with _run(tmp) as run:
        items = [Item(str(i), t) for i, t in enumerate(texts)]
        prepared = run._prepare(items)
        stored = run.store.items()
        assert [it.item_id for it in stored] == [str(i) for i in range(len(texts))]
        assert [it.text for it in stored] == [it.text for it in prepared]
        for it, text in zip(prepared, texts):
            assert len(it.text) <= len(text)


def test_huge_texts_are_truncated_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    huge = "great " * 200_000  # 1.2 M characters
    with _run(tmp_path, max_chars=1000) as run, caplog.at_level(logging.WARNING):
        prepared = run._prepare([Item("big", huge), Item("small", "fine")])
        assert len(prepared[0].text) == 1000 and prepared[1].text == "fine"
        assert len(run.store.items()[0].text) == 1000
    assert any("1 texts are longer than 1000 characters and were truncated" in r.getMessage()
               for r in caplog.records)


# --- the label-config parser -------------------------------------------------------------------------------

from xml.sax.saxutils import quoteattr  # noqa: E402

from freeal_backend.labelstudio.label_config import LabelConfigError, parse_task_config  # noqa: E402

NAMES = st.sampled_from(["text"] * 4 + ["t", "sentiment", "topic", "freeal_flag", "freeal_review", "", "x y", "é"])
VALUES = st.sampled_from(["$text"] * 4 + ["$t", "text", "$", "$review", "", "$ünï"])
CHOICE_VALUES = st.one_of(st.sampled_from(["positive", "negative", "neutral", "", "a&b", "<x>"]),
                          st.text(st.characters(categories=("L", "N", "P", "S", "Zs")), max_size=6))


def _attrs(**values: str | None) -> str:
    return "".join(f" {k}={quoteattr(v)}" for k, v in values.items() if v is not None)


@st.composite
def xml_configs(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    if depth == 0 and draw(st.integers(0, 4)):  # mostly start from a plausible text + choices pair
        parts.append(f"<Text{_attrs(name='text', value='$text')}/>")
        kids = "".join(f"<Choice{_attrs(value=v)}/>" for v in draw(st.lists(CHOICE_VALUES, min_size=1, max_size=4)))
        parts.append(f"<Choices{_attrs(name=draw(NAMES), toName='text')}>{kids}</Choices>")
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["Text", "Text", "Choices", "Choices", "Choices", "Labels", "TextArea", "Header",
                                     "View"]))
        if kind == "Text":
            parts.append(f"<Text{_attrs(name=draw(NAMES), value=draw(VALUES))}/>")
        elif kind in ("Choices", "Labels"):
            child = "Choice" if kind == "Choices" else "Label"
            kids = "".join(f"<{child}{_attrs(value=draw(CHOICE_VALUES), alias=draw(st.none() | CHOICE_VALUES))}/>"
                           for _ in range(draw(st.integers(0, 5))))
            attrs = _attrs(name=draw(NAMES), toName=draw(st.none() | NAMES),
                           choice=draw(st.sampled_from([None, "single", "multiple", "weird"])),
                           perRegion=draw(st.sampled_from([None, "true", "false"])))
            parts.append(f"<{kind}{attrs}>{kids}</{kind}>")
        elif kind == "TextArea":
            parts.append(f"<TextArea{_attrs(name=draw(NAMES), toName=draw(NAMES))}/>")
        elif kind == "Header":
            parts.append(f"<Header{_attrs(value=draw(CHOICE_VALUES))}/>")
        elif depth < 2:
            parts.append(draw(xml_configs(depth + 1)))
    return "<View>" + "".join(parts) + "</View>"


@FUZZ
@given(xml=st.one_of(xml_configs(), st.text(ANY_CHAR, max_size=80)), from_name=st.none() | NAMES.filter(bool))
def test_label_config_parser_accepts_or_refuses_clearly(xml: str, from_name: str | None) -> None:
    try:
        cfg = parse_task_config(xml, from_name=from_name)
    except LabelConfigError as exc:
        assert str(exc)
        event("refused")
        return
    event("parsed")
    assert cfg.labels and len(set(cfg.labels)) == len(cfg.labels) and all(cfg.labels)
    assert cfg.data_key and cfg.from_name and (from_name is None or cfg.from_name == from_name)
    assert f'value="${cfg.data_key}"' in xml or f"value='${cfg.data_key}'" in xml
