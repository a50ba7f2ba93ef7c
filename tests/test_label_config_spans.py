"""Span (NER) label configs: <Labels> on <Text>, labels regions with code-point offsets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freeal_backend.labelstudio.label_config import (
    AmbiguousLabelsError,
    LabelConfigError,
    NoChoicesError,
    NoLabelsError,
    NoTextObjectError,
    UnknownControlError,
    parse_label_config,
    parse_span_config,
)
from freeal_backend.labelstudio.label_results import (
    FLAG_SUSPICIOUS,
    audit_marker,
    render_span_prediction,
    render_task_prediction,
    spans_from_result,
    review_marker,
)
from freeal_backend.records import ItemResult
from freeal_backend.spans import Span

SHIPPED = Path(__file__).resolve().parents[1] / "label_config"


def test_shipped_ner_configs() -> None:
    cfg = parse_span_config((SHIPPED / "ner.xml").read_text())
    assert (cfg.from_name, cfg.to_name, cfg.data_key, cfg.labels) == ("label", "text", "text", ("Chemical", "Disease"))
    assert cfg.review.flag_name is None and cfg.review.text_name is None
    review = parse_span_config((SHIPPED / "ner_review.xml").read_text())
    assert review.labels == cfg.labels
    assert (review.review.flag_name, review.review.text_name) == ("freeal_flag", "freeal_review")
    with pytest.raises(NoChoicesError):  # the classification parser still wants <Choices>
        parse_label_config((SHIPPED / "ner.xml").read_text())
    with pytest.raises(NoLabelsError):
        parse_span_config((SHIPPED / "sentiment.xml").read_text())


TWO = """<View><Text name="t" value="$body"/><Text name="u" value="$title"/>
<Labels name="a" toName="t"><Label value="X"/></Labels>
<Labels name="b" toName="u"><Label value="P" alias="p"/><Label value="Q"/></Labels>
<Labels name="freeal_x" toName="t"><Label value="Z"/></Labels></View>"""


def test_pick_labels_by_name_and_errors() -> None:
    with pytest.raises(AmbiguousLabelsError):
        parse_span_config(TWO)
    b = parse_span_config(TWO, from_name="b")
    assert (b.to_name, b.data_key, b.labels) == ("u", "title", ("P", "Q"))  # value, not alias
    with pytest.raises(UnknownControlError):
        parse_span_config(TWO, from_name="freeal_x")
    for xml, error in [
        ('<View><Labels name="l" toName="t"><Label value="A"/></Labels></View>', NoTextObjectError),
        ('<View><Text name="t" value="$x"/><Labels name="l" toName="zz"><Label value="A"/></Labels></View>',
         NoLabelsError),
        ('<View><Text name="t" value="$x"/><Labels name="l" toName="t" value="$opts"/></View>', NoLabelsError),
        ('<View><Text name="t" value="$x"/><Labels name="l" toName="t"><Label value="A"/><Label value="A"/>'
         "</Labels></View>", LabelConfigError),
    ]:
        with pytest.raises(error) as info:
            parse_span_config(xml)
        assert str(info.value)


def test_render_span_prediction_offsets_and_review() -> None:
    cfg = parse_span_config((SHIPPED / "ner_review.xml").read_text())
    text = "😀 Lithium\r\n-induced tre\u0301mor"
    start = text.index("tre")
    spans = [Span(start, len(text), "Disease", 0.4), Span(2, 9, "Chemical", 0.9)]
    pred = render_span_prediction(cfg, text, spans, "freeal-ner-r1", suspicious=True, note="FreeAL: NEEDS REVIEW")
    regions = [r for r in pred["result"] if r["type"] == "labels"]
    assert [r["value"]["text"] for r in regions] == ["Lithium", "tre\u0301mor"]
    for r in regions:
        assert text[r["value"]["start"]:r["value"]["end"]] == r["value"]["text"]
        assert (r["from_name"], r["to_name"]) == ("label", "text")
    assert regions[0]["value"] == {"start": 2, "end": 9, "text": "Lithium", "labels": ["Chemical"]}
    assert [r["score"] for r in regions] == [0.9, 0.4] and pred["score"] == 0.4
    assert pred["result"][0]["freeal"] == review_marker("freeal-ner-r1")
    flag = next(r for r in pred["result"] if r["from_name"] == "freeal_flag")
    assert flag["value"] == {"choices": [FLAG_SUSPICIOUS]}
    assert spans_from_result(cfg, text, pred["result"]) == sorted(spans)
    json.dumps(pred)


def test_render_no_entity_and_unscored() -> None:
    cfg = parse_span_config((SHIPPED / "ner.xml").read_text())
    empty = render_span_prediction(cfg, "No entity here .", [], "v")
    assert empty == {"result": [], "model_version": "v"}  # one prediction, empty result, no made-up score
    unscored = render_span_prediction(cfg, "Lithium .", [Span(0, 7, "Chemical")], "v")
    assert "score" not in unscored and "score" not in unscored["result"][0]
    assert render_span_prediction(cfg, "Lithium .", [Span(0, 7, "Chemical")], "v", score=0.7)["score"] == 0.7
    for bad in (Span(0, 99, "Chemical"), Span(3, 3, "Chemical"), Span(0, 7, "Gene")):
        with pytest.raises(ValueError):
            render_span_prediction(cfg, "Lithium .", [bad], "v")


def test_spans_from_result_ignores_junk() -> None:
    cfg = parse_span_config((SHIPPED / "ner_review.xml").read_text())
    result = [
        {"from_name": "freeal_flag", "type": "choices", "value": {"choices": ["Needs review"]}},
        {"from_name": "label", "type": "labels", "value": {"start": 0, "end": 7, "labels": ["Chemical", "Gene"]}},
        {"from_name": "label", "type": "labels", "value": {"start": 5, "end": 500, "labels": ["Disease"]}},
        {"from_name": "label", "type": "labels", "value": {"start": "0", "end": 7, "labels": ["Disease"]}},
        "garbage",
    ]
    assert spans_from_result(cfg, "Lithium .", result) == [Span(0, 7, "Chemical")]  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_span_parser_never_crashes_on_junk(xml: str) -> None:
    try:
        parse_span_config(xml)
    except LabelConfigError:
        pass


def test_an_audit_sentence_awaiting_its_entities_is_blind() -> None:
    """With the review note to carry the audit marker, an audit sentence nobody has labelled yet shows no
    entity of the machine's (they would sway the person); without a note control there is nothing to carry
    the marker but the regions, so the sentence keeps them (the README says to switch off pre-labelling)."""
    text = "Lithium - induced tremor ."
    spans = [{"start": 0, "end": 7, "label": "Chemical", "score": 0.9}]
    res = ItemResult("1", "x", 0.8, {}, spans=spans, audit=True)
    review = parse_span_config((SHIPPED / "ner_review.xml").read_text())
    blind = render_task_prediction(review, res, text, "v1")
    assert spans_from_result(review, text, blind["result"]) == [] and "Chemical" not in json.dumps(blind)
    assert blind["result"][0]["freeal"] == audit_marker("v1") and "withheld" in json.dumps(blind)
    plain = parse_span_config((SHIPPED / "ner.xml").read_text())
    shown = render_task_prediction(plain, res, text, "v1")
    assert spans_from_result(plain, text, shown["result"]) == [Span(0, 7, "Chemical")]
    human = ItemResult("1", "x", 1.0, {}, spans=spans, source="human", audit=True)
    assert spans_from_result(review, text, render_task_prediction(review, human, text, "v1")["result"]) == [
        Span(0, 7, "Chemical")]
