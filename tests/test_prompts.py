"""Answer parsing and prompt building."""
import pytest

from freeal_backend.llm.prompts import label_messages, parse_generated_texts, parse_label

LABELS = ["negative", "positive"]
TREC = ["abbreviation", "description", "entity", "human", "location", "number"]


@pytest.mark.parametrize("answer,expected", [
    ("positive", "positive"), ("Positive", "positive"), ("POSITIVE.", "positive"), ('"negative"', "negative"),
    ("Answer: negative", "negative"), ("Label: Positive!", "positive"), ("The sentiment is negative.", "negative"),
    ("  **positive**  ", "positive"), ("pos", "positive"), ("Neg", "negative"), ("good", "positive"),
    ("positive\nBecause the reviewer liked it", "positive"),
])
def test_parse_label_accepts_common_answer_shapes(answer, expected):
    assert parse_label(answer, LABELS) == expected


@pytest.mark.parametrize("answer", ["", None, "I am not sure", "positive or negative", "neutral", "???"])
def test_parse_label_refuses_unclear_answers(answer):
    assert parse_label(answer, LABELS) is None


def test_parse_label_multiclass_synonyms_and_prefixes():
    assert parse_label("Location.", TREC) == "location"
    assert parse_label("a person", TREC) == "human"
    assert parse_label("num", TREC) == "number"
    assert parse_label("Category: description", TREC) == "description"


def test_label_messages_puts_demos_as_prior_turns():
    msgs = label_messages("great film", LABELS, [("awful", "negative"), ("lovely", "positive")], "Sentiment?")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "negative, positive" in msgs[0]["content"] and msgs[0]["content"].startswith("Sentiment?")
    assert msgs[2]["content"] == "negative" and msgs[-1]["content"].endswith("great film\nLabel:")


def test_parse_generated_texts_strips_numbering_and_duplicates():
    answer = "1. A wonderful, moving film.\n2) a wonderful, moving film.\n- Dull and far too long.\nHere:\n\nok"
    assert parse_generated_texts(answer, 5) == ["A wonderful, moving film.", "Dull and far too long."]


@pytest.mark.parametrize("answer", ["not positive", "Not good", "It isn't good.", "not very positive",
                                    "<think>positive?</think>not negative", "<think>it is positive, so"])
def test_parse_label_refuses_negated_and_cut_off_answers(answer):
    assert parse_label(answer, LABELS) is None


def test_parse_label_reads_the_answer_after_thinking():
    assert parse_label("<think>The reviewer hated it.</think>\nnegative", LABELS) == "negative"
