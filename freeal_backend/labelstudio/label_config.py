"""Read a Label Studio labeling config and build prediction results for it (pure, no I/O).

A FreeAL project needs one text object (``<Text name=... value="$key"/>``) and one
classification control (``<Choices>``, single or multiple choice) pointing at it.
Controls whose name starts with ``freeal_`` are our own review cue, never the label control:

* ``<TextArea name="freeal_review" toName="text" .../>`` receives a one-line reason and
  the suggested label for flagged tasks (and the per-label confidences for all tasks);
* ``<Choices name="freeal_flag" toName="text">`` with choices ``Needs review`` / ``OK``
  receives the flag itself.

Both are optional: when a project's config lacks them the cue is skipped silently.

Span (NER) projects use a ``<Labels>`` control on the text object instead (:func:`parse_span_config`);
their predictions are ``labels`` regions with character offsets (:func:`render_span_prediction`).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from freeal_backend.records import ItemResult
from freeal_backend.spans import Span, encode_spans

REVIEW_PREFIX = "freeal_"
REVIEW_TEXT_NAME = "freeal_review"
REVIEW_FLAG_NAME = "freeal_flag"
FLAG_SUSPICIOUS = "Needs review"
FLAG_OK = "OK"
MAX_CONFIG_CHARS = 1_000_000
MULTI_LABEL_THRESHOLD = 0.5
REVIEW_MARKER = "freeal:needs-review"  # in a flagged prediction's result: what the review view filters on
REASON_TEXT = {
    "slm_overrules_llm": "the small model is confident the LLM's label is wrong and changed it",
    "label_issue": "the small model, which never saw this label, doubts it",
    "labels_near_chance": "the LLM's labels in this project look near chance: use a stronger LLM or label by hand",
    "no_llm_label": "the LLM gave no usable label",
    "not_yet_reviewed_by_slm": "LLM label only, not yet checked by the small model",
}


def review_marker(model_version: str) -> str:
    """The marker a flagged prediction of ``model_version`` carries: ``freeal:needs-review[<version>]``.

    The review view filters on the selected version's marker, so it is right as soon as a new version is
    in, while Label Studio is still deleting the previous one (slowly: one prediction at a time)."""
    return f"{REVIEW_MARKER}[{model_version}]"


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


def choice_result(cfg: ClassificationConfig, labels: list[str], score: float | None = None) -> dict[str, Any]:
    """One ``choices`` result for ``labels`` (one label, or several for multi-label configs)."""
    unknown = [lab for lab in labels if lab not in cfg.labels]
    if unknown:
        raise ValueError(f"labels {unknown} are not choices of {cfg.from_name!r}: {list(cfg.labels)}")
    if not cfg.multiple and len(labels) > 1:
        raise ValueError(f"{cfg.from_name!r} is single-choice but got {len(labels)} labels")
    result: dict[str, Any] = {
        "from_name": cfg.from_name,
        "to_name": cfg.to_name,
        "type": "choices",
        "value": {"choices": list(labels)},
    }
    if score is not None:
        result["score"] = float(score)
    return result


def review_text(
    *,
    suspicious: bool,
    reasons: list[str],
    suggested_label: str | None,
    probs: dict[str, float],
) -> str:
    """Human-readable review note: flag, reasons, suggested label and per-label confidences."""
    conf = ", ".join(f"{lab} {p:.2f}" for lab, p in sorted(probs.items(), key=lambda kv: -kv[1]))
    if not suspicious:
        return f"FreeAL: OK. Confidences: {conf}" if conf else "FreeAL: OK."
    why = "; ".join(REASON_TEXT.get(r, r) for r in reasons) if reasons else "flagged by the small model"
    parts = [f"FreeAL: NEEDS REVIEW ({why})."]
    if suggested_label:
        parts.append(f"Suggested label: {suggested_label}.")
    if conf:
        parts.append(f"Confidences: {conf}")
    return " ".join(parts)


def review_results(cfg: ClassificationConfig | SpanConfig, *, suspicious: bool, note: str) -> list[dict[str, Any]]:
    """Results for the review cue controls present in ``cfg`` (empty when there are none)."""
    out: list[dict[str, Any]] = []
    cue = cfg.review
    if cue.text_name and cue.text_to_name:
        out.append(
            {
                "from_name": cue.text_name,
                "to_name": cue.text_to_name,
                "type": "textarea",
                "value": {"text": [note]},
            }
        )
    flag = FLAG_SUSPICIOUS if suspicious else FLAG_OK
    if cue.flag_name and cue.flag_to_name and flag in cue.flag_choices:
        out.append(
            {
                "from_name": cue.flag_name,
                "to_name": cue.flag_to_name,
                "type": "choices",
                "value": {"choices": [flag]},
            }
        )
    return out


def predicted_labels(cfg: ClassificationConfig, label: str | None, probs: dict[str, float]) -> list[str]:
    """Labels to predict: the label itself; for multi-label configs also every other label with p >= 0.5."""
    if label is None or label not in cfg.labels:
        return []
    if not cfg.multiple:
        return [label]
    return [lab for lab in cfg.labels if lab == label or probs.get(lab, 0.0) >= MULTI_LABEL_THRESHOLD]


def render_prediction(cfg: ClassificationConfig, res: ItemResult, model_version: str) -> dict[str, Any]:
    """One Label Studio prediction (``result``, ``score``, ``model_version``) for a FreeAL result.

    ``score`` is the final confidence in [0, 1] (0 when there is no label). The choices result carries
    the same score; the per-label confidences go into the review note when the config has one. A flagged
    prediction's first result item carries ``"freeal": review_marker(model_version)``, which the Data Manager
    can filter on ("Prediction results" contains ...) whatever controls the config has.
    """
    score = min(1.0, max(0.0, float(res.confidence))) if res.confidence is not None else 0.0
    labels = predicted_labels(cfg, res.label, res.probs)
    result = [choice_result(cfg, labels, score=score)] if labels else []
    suspicious = bool(res.suspicious) and res.source != "human"
    note = review_text(suspicious=suspicious, reasons=list(res.reasons), suggested_label=res.suggested_label,
                       probs=res.probs)
    if res.source == "human":
        note = "FreeAL: human label (gold)."
    result.extend(review_results(cfg, suspicious=suspicious, note=note))
    if suspicious and result:
        result[0]["freeal"] = review_marker(model_version)
    return {"result": result, "score": score, "model_version": model_version}


def labels_from_result(cfg: ClassificationConfig, result: list[dict[str, Any]]) -> list[str]:
    """The labels an annotation's ``result`` gives through the classification control.

    Review-cue results and labels that are not choices of the control are ignored.
    """
    found: list[str] = []
    for region in result or []:
        if not isinstance(region, dict) or region.get("from_name") != cfg.from_name:
            continue
        value = region.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list):
            found.extend(c for c in choices if isinstance(c, str) and c in cfg.labels and c not in found)
    return found


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
    return SpanConfig(from_name=name, to_name=to_name, data_key=texts[to_name], labels=tuple(labels),
                      review=_review_cue(root, texts))


def span_region(cfg: SpanConfig, text: str, span: Span) -> dict[str, Any]:
    """One ``labels`` region for ``span`` (character offsets into ``text``, end exclusive)."""
    if span.label not in cfg.labels:
        raise ValueError(f"label {span.label!r} is not a label of {cfg.from_name!r}: {list(cfg.labels)}")
    if not 0 <= span.start < span.end <= len(text):
        raise ValueError(f"span [{span.start}, {span.end}) is outside the text (length {len(text)})")
    value = {"start": span.start, "end": span.end, "text": text[span.start:span.end], "labels": [span.label]}
    assert text[value["start"]:value["end"]] == value["text"]
    region: dict[str, Any] = {"from_name": cfg.from_name, "to_name": cfg.to_name, "type": "labels", "value": value}
    if span.score is not None:
        region["score"] = float(span.score)
    return region


def render_span_prediction(cfg: SpanConfig, text: str, spans: list[Span], model_version: str, *,
                           score: float | None = None, suspicious: bool = False,
                           note: str | None = None) -> dict[str, Any]:
    """One Label Studio prediction for a task's spans (an empty result list when there is no entity).

    ``score`` is the task's confidence; without it, the lowest span score when every span has one, else
    the prediction carries no score (never a made-up constant). The review cue controls get ``note`` and
    the flag when the config has them; a flagged prediction's first result item carries ``review_marker``.
    """
    result = [span_region(cfg, text, s) for s in sorted(spans)]
    if score is None and spans and all(s.score is not None for s in spans):
        score = min(float(s.score) for s in spans if s.score is not None)
    if note is not None:
        result.extend(review_results(cfg, suspicious=suspicious, note=note))
    if suspicious and result:
        result[0]["freeal"] = review_marker(model_version)
    prediction: dict[str, Any] = {"result": result, "model_version": model_version}
    if score is not None:
        prediction["score"] = min(1.0, max(0.0, float(score)))
    return prediction


def spans_from_result(cfg: SpanConfig, text: str | None, result: list[dict[str, Any]]) -> list[Span]:
    """The spans an annotation's ``result`` gives through the ``<Labels>`` control.

    Regions of other controls, with unknown labels, or whose offsets fall outside ``text`` (when known)
    are ignored.
    """
    found: list[Span] = []
    for region in result or []:
        if not isinstance(region, dict) or region.get("from_name") != cfg.from_name:
            continue
        value = region.get("value")
        if not isinstance(value, dict):
            continue
        start, end, labels = value.get("start"), value.get("end"), value.get("labels")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end
                and (text is None or end <= len(text))):
            continue
        for label in labels if isinstance(labels, list) else []:
            if label in cfg.labels:
                found.append(Span(start, end, label))
    return sorted(set(found))


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


def human_labels(cfg: TaskConfig, result: list[dict[str, Any]], text: str | None) -> list[str]:
    """The labels a submitted annotation gives, as FreeAL stores them: the chosen classes, or for spans
    one encoded span list (an annotation with no region says "no entity": that is a label too)."""
    if isinstance(cfg, ClassificationConfig):
        return labels_from_result(cfg, result)
    return [encode_spans(spans_from_result(cfg, text, result))]


def render_task_prediction(cfg: TaskConfig, res: ItemResult, text: str, model_version: str) -> dict[str, Any]:
    """One Label Studio prediction for a FreeAL result of either task type (``text``: the task's text)."""
    if isinstance(cfg, ClassificationConfig):
        return render_prediction(cfg, res, model_version)
    suspicious = bool(res.suspicious) and res.source != "human"
    if res.source == "human":
        note = "FreeAL: human label (gold)."
    elif res.note:
        note = res.note
    elif suspicious:
        why = "; ".join(REASON_TEXT.get(r, r) for r in res.reasons) or "flagged by the small model"
        note = f"FreeAL: NEEDS REVIEW ({why})."
    else:
        note = "FreeAL: OK."
    spans = [Span(int(d["start"]), int(d["end"]), str(d["label"]), d.get("score")) for d in res.spans or []]
    return render_span_prediction(cfg, text, spans, model_version, score=res.confidence, suspicious=suspicious,
                                  note=note)
