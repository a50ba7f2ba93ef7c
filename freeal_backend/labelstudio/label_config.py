"""Read a Label Studio labeling config (pure, no I/O): the task it describes and its review cue controls.

A FreeAL project needs one text object (``<Text name=... value="$key"/>``) and one
classification control (``<Choices>``, single or multiple choice) pointing at it.
Controls whose name starts with ``freeal_`` are our own review cue, never the label control:

* ``<TextArea name="freeal_review" toName="text" .../>`` receives a one-line reason and
  the suggested label for flagged tasks (and the per-label confidences for all tasks);
* ``<Choices name="freeal_flag" toName="text">`` with choices ``Needs review`` / ``OK``
  receives the flag itself.

Both are optional: when a project's config lacks them the cue is skipped silently.

Span (NER) projects use a ``<Labels>`` control on the text object instead (:func:`parse_span_config`).
Turning results into Label Studio result JSON and back is :mod:`freeal_backend.labelstudio.label_results`.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

REVIEW_PREFIX = "freeal_"
REVIEW_TEXT_NAME = "freeal_review"
REVIEW_FLAG_NAME = "freeal_flag"
MAX_CONFIG_CHARS = 1_000_000


class LabelConfigError(ValueError):
    """The labeling config cannot be used for FreeAL text classification."""


class NoTextObjectError(LabelConfigError):
    """No ``<Text>`` object with a ``$variable`` value."""


class NoChoicesError(LabelConfigError):
    """No usable ``<Choices>`` control on a text object."""


class AmbiguousChoicesError(LabelConfigError):
    """Several ``<Choices>`` controls and no ``from_name`` to pick one."""


class UnknownControlError(LabelConfigError):
    """``from_name`` names no usable ``<Choices>`` (or, for spans, ``<Labels>``) control."""


class NoLabelsError(LabelConfigError):
    """No usable ``<Labels>`` control on a text object."""


class AmbiguousLabelsError(LabelConfigError):
    """Several ``<Labels>`` controls and no ``from_name`` to pick one."""


@dataclass(frozen=True)
class ReviewCue:
    """Names of the optional review controls found in the config (``None`` when absent)."""

    text_name: str | None = None
    text_to_name: str | None = None
    flag_name: str | None = None
    flag_to_name: str | None = None
    flag_choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassificationConfig:
    """The classification task a labeling config describes."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    multiple: bool
    review: ReviewCue = ReviewCue()
    task_type = "classification"


@dataclass(frozen=True)
class SpanConfig:
    """The span labelling (NER) task a labeling config describes."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    review: ReviewCue = ReviewCue()
    task_type = "ner"


TaskConfig = ClassificationConfig | SpanConfig


def parse_task_config(xml: str, from_name: str | None = None) -> TaskConfig:
    """The task of a labeling config: ``<Choices>`` on a text (classification) or ``<Labels>`` (spans).

    ``from_name`` picks the control by name; a config with both kinds and no ``from_name`` is ambiguous.
    """
    root = _parse_xml(xml)
    kinds = [tag for tag in ("Choices", "Labels")
             if any(el.get("name") == from_name if from_name else not el.get("name", "").startswith(REVIEW_PREFIX)
                    and el.get("perRegion", "false").lower() != "true" for el in root.iter(tag))]
    if len(kinds) == 2 and from_name is None:
        raise AmbiguousChoicesError("the label config has both <Choices> and <Labels> controls: say which one "
                                    "FreeAL labels with from_name")
    if kinds == ["Labels"]:
        return parse_span_config(xml, from_name)
    if not kinds and from_name is None:
        raise NoChoicesError("the label config has no <Choices> (classification) or <Labels> (spans) control "
                             "whose toName is a <Text> object")
    return parse_label_config(xml, from_name)


def parse_label_config(xml: str, from_name: str | None = None) -> ClassificationConfig:
    """Find the text object and classification control of ``xml``.

    ``from_name`` picks the ``<Choices>`` control by name when there are several.
    Raises a :class:`LabelConfigError` subclass with a readable message otherwise.
    """
    root = _parse_xml(xml)
    texts = _text_objects(root)
    if not texts:
        raise NoTextObjectError('the label config has no <Text name="..." value="$field"/> object')
    candidates = [
        el
        for el in root.iter("Choices")
        if not el.get("name", "").startswith(REVIEW_PREFIX)
        and el.get("perRegion", "false").lower() != "true"
    ]
    control = _pick_control(candidates, texts, from_name)
    name = control.get("name") or ""
    to_name = control.get("toName", "")
    _refuse_url_text(root, to_name)
    labels = _choice_values(control)
    if not labels:
        raise NoChoicesError(
            f'<Choices name="{name}"> has no static <Choice value="..."/> children '
            "(dynamic choices from task data are not supported)"
        )
    if len(set(labels)) != len(labels):
        raise LabelConfigError(f'<Choices name="{name}"> lists the same choice twice')
    return ClassificationConfig(
        from_name=name,
        to_name=to_name,
        data_key=texts[to_name],
        labels=tuple(labels),
        multiple=control.get("choice", "single").lower() == "multiple",
        review=_review_cue(root, texts),
    )


def parse_span_config(xml: str, from_name: str | None = None) -> SpanConfig:
    """Find the text object and the ``<Labels>`` control of a span labelling (NER) config.

    ``from_name`` picks the ``<Labels>`` control by name when there are several. The label names are the
    ``<Label value="...">`` values (Label Studio writes the value, not the alias, into region results).
    Raises a :class:`LabelConfigError` subclass with a readable message otherwise.
    """
    root = _parse_xml(xml)
    texts = _text_objects(root)
    if not texts:
        raise NoTextObjectError('the label config has no <Text name="..." value="$field"/> object')
    candidates = [el for el in root.iter("Labels") if not el.get("name", "").startswith(REVIEW_PREFIX)]
    control = _pick_control(candidates, texts, from_name, tag="Labels", missing=NoLabelsError,
                            ambiguous=AmbiguousLabelsError)
    name = control.get("name") or ""
    labels = [el.get("value") or "" for el in control.iter("Label") if el.get("value")]
    if not labels:
        raise NoLabelsError(f'<Labels name="{name}"> has no static <Label value="..."/> children '
                            "(dynamic labels from task data are not supported)")
    if len(set(labels)) != len(labels):
        raise LabelConfigError(f'<Labels name="{name}"> lists the same label twice')
    to_name = control.get("toName", "")
    _refuse_url_text(root, to_name)
    return SpanConfig(from_name=name, to_name=to_name, data_key=texts[to_name], labels=tuple(labels),
                      review=_review_cue(root, texts))


def _parse_xml(xml: str) -> ET.Element:
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    if len(xml) > MAX_CONFIG_CHARS:
        raise LabelConfigError(f"the label config is longer than {MAX_CONFIG_CHARS} characters")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise LabelConfigError("the label config may not declare a DOCTYPE or entities")
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"the label config is not well-formed XML: {exc}") from exc
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON "\ud800" escape
        raise LabelConfigError(f"the label config is not valid Unicode text ({exc.reason})") from exc


def _text_objects(root: ET.Element) -> dict[str, str]:
    """Map each ``<Text>`` object's name to the task data key its ``value="$key"`` reads."""
    texts: dict[str, str] = {}
    for el in root.iter("Text"):
        name, value = el.get("name"), el.get("value", "")
        if name and value.startswith("$") and len(value) > 1:
            texts[name] = value[1:]
    return texts


def _refuse_url_text(root: ET.Element, name: str) -> None:
    """A ``<Text valueType="url">`` object shows the text behind a URL: the task data holds only the address,
    which the LLM would label as if it were the text."""
    for el in root.iter("Text"):
        if el.get("name") == name and el.get("valueType", "").lower() == "url":
            raise LabelConfigError(f'<Text name="{name}"> loads its text from a URL (valueType="url"): FreeAL '
                                   "labels the text in the task data, not an address; import the texts themselves")


def _pick_control(candidates: list[ET.Element], texts: dict[str, str], from_name: str | None, *,
                  tag: str = "Choices", missing: type[LabelConfigError] = NoChoicesError,
                  ambiguous: type[LabelConfigError] = AmbiguousChoicesError) -> ET.Element:
    if from_name is not None:
        named = [el for el in candidates if el.get("name") == from_name]
        if not named:
            known = [el.get("name") for el in candidates]
            raise UnknownControlError(f"no <{tag} name={from_name!r}> in the label config (found {known})")
        control = named[0]
        if control.get("toName") not in texts:
            raise NoTextObjectError(
                f"<{tag} name={from_name!r}> points at {control.get('toName')!r}, which is not a <Text> object"
            )
        return control
    on_text = [el for el in candidates if el.get("name") and el.get("toName") in texts]
    if not on_text:
        raise missing(f"the label config has no <{tag}> control whose toName is a <Text> object")
    if len(on_text) > 1:
        names = [el.get("name") for el in on_text]
        raise ambiguous(f"several <{tag}> controls {names}: say which one with from_name")
    return on_text[0]


def _choice_values(control: ET.Element) -> list[str]:
    values = []
    for choice in control.iter("Choice"):
        value = choice.get("alias") or choice.get("value")
        if value:
            values.append(value)
    return values


def _review_cue(root: ET.Element, texts: dict[str, str]) -> ReviewCue:
    text_name = text_to = flag_name = flag_to = None
    flag_choices: tuple[str, ...] = ()
    for el in root.iter("TextArea"):
        if el.get("name") == REVIEW_TEXT_NAME and el.get("toName") in texts:
            text_name, text_to = REVIEW_TEXT_NAME, el.get("toName")
    for el in root.iter("Choices"):
        if el.get("name") == REVIEW_FLAG_NAME and el.get("toName") in texts:
            flag_name, flag_to = REVIEW_FLAG_NAME, el.get("toName")
            flag_choices = tuple(_choice_values(el))
    return ReviewCue(text_name, text_to, flag_name, flag_to, flag_choices)
