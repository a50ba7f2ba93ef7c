"""Property tests (hypothesis) of ``parse_label`` over label sets whose names share words and prefixes.

Labels are built from a small vocabulary, so sets like positive / very positive / not positive, spam / not
spam and Type A / Type B / A come up all the time. The answer templates use no vocabulary word, so an answer
names exactly the labels put into it.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from freeal_backend.llm.prompts import LabelMatcher, label_name, parse_label

VOCAB = ["positive", "negative", "very", "not", "spam", "type", "class", "a", "b", "good", "neutral", "sci/tech",
         "4", "x-ray"]
FILLER = ["maybe", "unclear", "hmm", "dunno", "cannot", "tell", "zebra", "i", "would", "guess"]

ONE = ["{}", "{}.", "{}!", '"{}"', "'{}'", "**{}**", "`{}`", "  {}  ", "Answer: {}", "answer: {}.", "Label: {}",
       "The answer is {}.", "The label is: {}", "Final answer: {}", "{}\nBecause the text says so.",
       "<think>maybe {other}?</think>\n{}", "The text is {}.", "I would say {}.", "It is {}"]
TWO = ["{} or {}", "{} and {}", "Either {} or {}", "{}, maybe {}", "Answer: {} or {}", "{} / {}", "{} vs. {}"]
CASES = [str, str.lower, str.upper, str.title]

MAIN = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MORE = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _label(i: int) -> str:
    """Label number ``i``: 1-3 vocabulary words (each length equally likely) in one of four cases."""
    case, j = CASES[i % len(CASES)], i // len(CASES)
    n, k = 1 + j % 3, j // 3
    return case(" ".join(VOCAB[k // len(VOCAB) ** p % len(VOCAB)] for p in range(n)))


def _decode(x: int) -> tuple[list[str], int]:
    """2-6 labels with distinct names, and a number that picks the answer, from one generated integer.

    One integer per example (shrinking towards 0: towards short, lower-case labels) keeps 10,000 examples
    fast to generate; a label list strategy costs several times more per example.
    """
    count, x = 2 + x % 5, x // 5
    labels: list[str] = []
    for _ in range(count):
        i, x = x % RADIX, x // RADIX
        while label_name(_label(i)) in {label_name(lab) for lab in labels}:
            i = (i + 1) % RADIX
        labels.append(_label(i))
    return labels, x


RADIX = len(CASES) * 3 * len(VOCAB) ** 3
GENERATED = st.integers(0, 2 ** 128).map(_decode)  # (labels, pick)


@MAIN
@given(case=GENERATED)
@example(case=(["very positive", "positive", "not positive"], None))
@example(case=(["spam", "not spam"], None))
@example(case=(["Type A", "Type B", "A"], None))
@example(case=(["Class A", "Type A", "a"], None))
@example(case=(["type", "a", "type a"], None))
def test_an_answer_that_is_one_label_parses_to_that_label(case: tuple[list[str], int | None]) -> None:
    labels, pick = case
    answers = ([(lab, t, c, o) for lab in labels for t in ONE for c in CASES for o in labels] if pick is None else
             [(labels[pick % len(labels)], ONE[pick // 7 % len(ONE)], CASES[pick // 11 % len(CASES)],
               labels[pick // 13 % len(labels)])])
    for label, template, shape, other in answers:
        answer = template.replace("{other}", other).format(shape(label))
        assert parse_label(answer, labels) == label, (answer, labels)


@MORE
@given(case=GENERATED)
@example(case=(["very positive", "positive"], None))
@example(case=(["spam", "not spam"], None))
@example(case=(["type", "a", "type a"], None))
def test_an_answer_naming_two_labels_is_none(case: tuple[list[str], int | None]) -> None:
    labels, pick = case
    pairs = ([(a, b, t) for a in labels for b in labels if a != b for t in TWO] if pick is None else
             [(labels[pick % len(labels)], labels[(pick // 7 % (len(labels) - 1) + 1 + pick) % len(labels)],
               TWO[pick // 11 % len(TWO)])])
    for a, b, template in pairs:
        answer = template.format(a, b)
        assert parse_label(answer, labels) is None, (answer, labels)


@MORE
@given(case=GENERATED)
@example(case=(["positive", "not positive", "very positive"], None))
@example(case=(["spam", "not spam"], None))
@example(case=(["positive", "very x-ray", "Type Not Positive"], None))
def test_a_negated_label_never_parses_to_that_label(case: tuple[list[str], int | None]) -> None:
    labels, pick = case
    aliases = LabelMatcher(labels).by_alias
    for label in labels if pick is None else [labels[pick % len(labels)]]:
        negated = f"not {label_name(label)}"
        for template in ("not {}", "It is not {}.", "Answer: not {}", "It isn't {}", "never {}", "not really {}"):
            answer = template.format(label)
            got = parse_label(answer, labels)  # None, or a label that is itself "not <label>": by name, or by
            # its distinctive part ("not positive" names "Type Not Positive", as "B" names "Type B")
            assert got is None or label_name(got) == negated or aliases.get(negated) == got, (answer, labels)


@MORE
@given(case=GENERATED)
def test_an_answer_naming_no_label_is_none(case: tuple[list[str], int]) -> None:
    labels, pick = case
    answer = " ".join(FILLER[pick // len(FILLER) ** k % len(FILLER)] for k in range(1 + pick % 5))
    assert parse_label(answer, labels) is None, (answer, labels)


TWINS = [str.upper, lambda s: s + ".", lambda s: s.replace(" ", "_"), lambda s: f"**{s}**", lambda s: f"  {s} "]


@MORE
@given(case=GENERATED)
def test_labels_that_are_one_name_apart_from_case_and_punctuation_are_refused(case: tuple[list[str], int]) -> None:
    labels, pick = case
    label = labels[pick // 7 % len(labels)]
    twin = TWINS[pick % len(TWINS)](label)
    assume(twin != label)  # the same string twice is one label
    with pytest.raises(ValueError, match="same label"):
        parse_label("anything", [*labels, twin])
