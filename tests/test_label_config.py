"""Label config parsing and prediction results (pure functions, no Label Studio needed)."""
from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freeal_backend.labelstudio.label_config import (
    AmbiguousChoicesError,
    LabelConfigError,
    NoChoicesError,
    NoTextObjectError,
    UnknownControlError,
    parse_label_config,
    parse_task_config,
)
from freeal_backend.labelstudio.label_results import (
    FLAG_OK,
    FLAG_SUSPICIOUS,
    REVIEW_MARKER,
    audit_marker,
    choice_result,
    labels_from_result,
    render_prediction,
    review_results,
    review_text,
    review_marker,
)
from freeal_backend.records import ItemResult

SHIPPED = Path(__file__).resolve().parents[1] / "label_config"


def test_shipped_sentiment() -> None:
    cfg = parse_label_config((SHIPPED / "sentiment.xml").read_text())
    assert (cfg.from_name, cfg.to_name, cfg.data_key) == ("sentiment", "text", "text")
    assert cfg.labels == ("positive", "negative") and not cfg.multiple
    assert cfg.review.text_name is None and cfg.review.flag_name is None


def test_shipped_topic_and_multilabel() -> None:
    topic = parse_label_config((SHIPPED / "topic.xml").read_text())
    assert len(topic.labels) == 6 and not topic.multiple
    multi = parse_label_config((SHIPPED / "multilabel.xml").read_text())
    assert multi.multiple and multi.from_name == "aspects"


def test_shipped_review_config_has_cue_and_ignores_it_as_label_control() -> None:
    cfg = parse_label_config((SHIPPED / "review.xml").read_text())
    assert cfg.from_name == "sentiment"
    assert cfg.review.text_name == "freeal_review" and cfg.review.flag_name == "freeal_flag"
    assert set(cfg.review.flag_choices) == {FLAG_SUSPICIOUS, FLAG_OK}
    results = review_results(cfg, suspicious=True, note="why")
    assert {r["from_name"] for r in results} == {"freeal_review", "freeal_flag"}
    flag = next(r for r in results if r["from_name"] == "freeal_flag")
    assert flag["value"] == {"choices": [FLAG_SUSPICIOUS]}


def test_review_cue_skipped_without_controls() -> None:
    cfg = parse_label_config((SHIPPED / "sentiment.xml").read_text())
    assert review_results(cfg, suspicious=True, note="x") == []


TWO = """<View><Text name="t" value="$body"/><Text name="u" value="$title"/>
<Choices name="a" toName="t"><Choice value="x"/><Choice value="y"/></Choices>
<Choices name="b" toName="u" choice="multiple"><Choice value="p" alias="P"/><Choice value="q"/></Choices></View>"""


def test_pick_by_name_and_ambiguity() -> None:
    with pytest.raises(AmbiguousChoicesError):
        parse_label_config(TWO)
    b = parse_label_config(TWO, from_name="b")
    assert (b.to_name, b.data_key, b.labels, b.multiple) == ("u", "title", ("P", "q"), True)
    with pytest.raises(UnknownControlError):
        parse_label_config(TWO, from_name="nope")


@pytest.mark.parametrize(
    ("xml", "error"),
    [
        ("", LabelConfigError),
        ("<View><Text", LabelConfigError),
        ('<View><Image name="i" value="$img"/></View>', NoTextObjectError),
        ('<View><Text name="t" value="$x"/></View>', NoChoicesError),
        ('<View><Text name="t" value="$x"/><Choices name="c" toName="other"><Choice value="a"/></Choices></View>',
         NoChoicesError),
        ('<View><Text name="t" value="$x"/><Choices name="c" toName="t" value="$opts"/></View>', NoChoicesError),
        ('<!DOCTYPE x [<!ENTITY a "b">]><View/>', LabelConfigError),
    ],
)
def test_clear_errors(xml: str, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        parse_label_config(xml)
    assert isinstance(info.value, ValueError) and str(info.value)


def test_text_loaded_from_a_url_is_refused_clearly() -> None:
    """``<Text valueType="url">`` (Label Studio's docs show it) leaves only an address in the task data: FreeAL
    took it for the text and the LLM labelled URLs. /setup now says why it cannot label such a project."""
    choices = ('<View><Text name="t" value="$src" valueType="url"/>'
               '<Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>')
    spans = ('<View><Labels name="l" toName="t"><Label value="X"/></Labels>'
             '<Text name="t" value="$src" valueType="URL"/></View>')
    for xml in (choices, spans):
        with pytest.raises(LabelConfigError, match='valueType="url".*import the texts themselves'):
            parse_task_config(xml)
    assert parse_task_config(choices.replace(' valueType="url"', ' valueType="text"')).data_key == "src"


def test_choice_result_single_and_multi() -> None:
    single = parse_label_config((SHIPPED / "sentiment.xml").read_text())
    res = choice_result(single, ["positive"], score=0.8)
    assert res == {
        "from_name": "sentiment", "to_name": "text", "type": "choices",
        "value": {"choices": ["positive"]}, "score": 0.8,
    }
    with pytest.raises(ValueError):
        choice_result(single, ["positive", "negative"])
    with pytest.raises(ValueError):
        choice_result(single, ["meh"])
    multi = parse_label_config((SHIPPED / "multilabel.xml").read_text())
    assert choice_result(multi, ["plot", "music"])["value"]["choices"] == ["plot", "music"]


def test_labels_from_result_ignores_cue_and_unknown() -> None:
    cfg = parse_label_config((SHIPPED / "review.xml").read_text())
    result = [
        {"from_name": "freeal_flag", "type": "choices", "value": {"choices": ["Needs review"]}},
        {"from_name": "sentiment", "type": "choices", "value": {"choices": ["negative", "bogus"]}},
        "garbage",
    ]
    assert labels_from_result(cfg, result) == ["negative"]  # type: ignore[arg-type]


def test_review_text_mentions_reason_and_suggestion() -> None:
    note = review_text(suspicious=True, reasons=["LLM and SLM disagree"], suggested_label="negative",
                       probs={"positive": 0.3, "negative": 0.7})
    assert "NEEDS REVIEW" in note and "LLM and SLM disagree" in note and "negative" in note
    assert review_text(suspicious=False, reasons=[], suggested_label=None, probs={}).startswith("FreeAL: OK")


# --- property tests -------------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True).filter(lambda s: not s.startswith("freeal_"))
label_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20
).filter(lambda s: s.strip() == s and s)


@settings(max_examples=80, deadline=None)
@given(
    text_name=names,
    key=names,
    control=names,
    labels=st.lists(label_text, min_size=1, max_size=8, unique=True),
    multiple=st.booleans(),
)
def test_parser_roundtrip(text_name: str, key: str, control: str, labels: list[str], multiple: bool) -> None:
    choices = "".join(f"<Choice value={quoteattr(lab)}/>" for lab in labels)
    xml = (
        f'<View><Text name="{text_name}" value="${key}"/>'
        f'<Choices name="{control}" toName="{text_name}" choice="{"multiple" if multiple else "single"}">'
        f"{choices}</Choices></View>"
    )
    cfg = parse_label_config(xml)
    assert (cfg.from_name, cfg.to_name, cfg.data_key) == (control, text_name, key)
    assert cfg.labels == tuple(labels) and cfg.multiple is multiple
    picked = labels[:2] if multiple else labels[:1]
    res = choice_result(cfg, picked, score=0.5)
    assert labels_from_result(cfg, [res]) == picked


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_crashes_on_junk(xml: str) -> None:
    try:
        parse_label_config(xml)
    except LabelConfigError:
        pass


def test_render_prediction_flagged_human_and_multilabel() -> None:
    cfg = parse_label_config((SHIPPED / "review.xml").read_text())
    flagged = ItemResult("1", "positive", 0.6, {"positive": 0.6, "negative": 0.4}, suspicious=True,
                         reasons=["label_issue"], suggested_label="negative")
    pred = render_prediction(cfg, flagged, "freeal-r1-abc")
    assert pred["score"] == 0.6 and pred["model_version"] == "freeal-r1-abc"
    assert pred["result"][0]["value"] == {"choices": ["positive"]} and pred["result"][0]["freeal"] == review_marker(
        "freeal-r1-abc") == f"{REVIEW_MARKER}[freeal-r1-abc]"
    assert REVIEW_MARKER in json.dumps(pred)
    assert "the small model, which never saw this label, doubts it" in json.dumps(pred)
    unanswered = ItemResult("5", "negative", 0.1, {}, suspicious=True, reasons=["no_llm_label"])
    assert "the LLM gave no usable label" in json.dumps(render_prediction(cfg, unanswered, "v"))
    assert "model version 'acme' gave no usable label" in json.dumps(
        render_prediction(cfg, unanswered, "v", "model version 'acme'"))
    human = ItemResult("2", "negative", 1.0, {}, suspicious=True, source="human")
    assert REVIEW_MARKER not in json.dumps(render_prediction(cfg, human, "v"))  # gold is never flagged
    unlabeled = render_prediction(cfg, ItemResult("3", None, None), "v")
    assert unlabeled["score"] == 0.0 and all(r["type"] != "choices" or r["from_name"] != "sentiment"
                                             for r in unlabeled["result"])
    # a label with no confidence (an endpoint without logprobs, before the small model's verdict) carries no
    # score, as a span prediction does: 0 would claim it surely wrong and sort it first among the doubtful
    quick = render_prediction(cfg, ItemResult("6", "positive", None, {}, reasons=["not_yet_reviewed_by_slm"]), "v")
    assert "score" not in quick and quick["result"][0]["value"] == {"choices": ["positive"]}
    assert all("score" not in r for r in quick["result"])
    multi = parse_label_config((SHIPPED / "multilabel.xml").read_text())
    res = ItemResult("4", "plot", 0.7, {"plot": 0.7, "acting": 0.6, "music": 0.1, "visuals": 0.2})
    assert render_prediction(multi, res, "v")["result"][0]["value"]["choices"] == ["acting", "plot"]


def test_an_audit_task_awaiting_its_label_is_blind() -> None:
    """A random audit task nobody has labelled yet: its prediction holds no label (shown, or pre-labelled, the
    machine's label would sway the person whose label is to measure it), only the marker the audit tab filters
    on, the review marker when flagged, and a note saying why; once a person labelled it, their label shows."""
    for name in ("review.xml", "sentiment.xml"):
        cfg = parse_label_config((SHIPPED / name).read_text())
        res = ItemResult("1", "positive", 0.6, {"positive": 0.6, "negative": 0.4}, suspicious=True,
                         reasons=["label_issue"], suggested_label="negative", llm_label="positive", audit=True)
        pred = render_prediction(cfg, res, "v1")
        text = json.dumps(pred)
        assert "positive" not in text and "negative" not in text and "Suggested" not in text, (name, pred)
        assert labels_from_result(cfg, pred["result"]) == []
        assert pred["result"][0]["freeal"] == f"{review_marker('v1')} {audit_marker('v1')}"
        assert pred["model_version"] == "v1" and pred["score"] == 0.6
        assert ("withheld" in text) == (name == "review.xml")  # the note, where the config has one
        human = ItemResult("1", "negative", 1.0, {}, source="human", llm_label="positive", audit=True)
        shown = render_prediction(cfg, human, "v1")
        assert labels_from_result(cfg, shown["result"]) == ["negative"]
        assert shown["result"][0]["freeal"] == audit_marker("v1")
