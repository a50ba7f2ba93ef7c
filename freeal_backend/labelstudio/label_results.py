"""Label Studio result JSON both ways (pure, no I/O): FreeAL results as predictions for a parsed label
config, and the labels a person's annotation gives.

Classification predictions are ``choices`` results (:func:`render_prediction`); span (NER) predictions are
``labels`` regions with character offsets (:func:`render_span_prediction`). The review cue controls the
config has (:class:`~freeal_backend.labelstudio.label_config.ReviewCue`) get the review note and flag.
A random audit task nobody has labelled yet is *blind* (:func:`blind_prediction`): its prediction carries
the markers and the score but no label, so neither the Data Manager nor pre-labelling shows the person
whose label is to measure the run what the machine said.
"""
from __future__ import annotations

from typing import Any

from freeal_backend.labelstudio.label_config import ClassificationConfig, SpanConfig, TaskConfig
from freeal_backend.records import ItemResult
from freeal_backend.spans import Span, encode_spans

FLAG_SUSPICIOUS = "Needs review"
FLAG_OK = "OK"
MULTI_LABEL_THRESHOLD = 0.5
REVIEW_MARKER = "freeal:needs-review"  # in a flagged prediction's result: what the review view filters on
AUDIT_MARKER = "freeal:audit"  # in an audit task's prediction: what the audit view filters on
REASON_TEXT = {  # {who}: who gave the label under judgement ("the LLM", or a judged model version)
    "slm_overrules_llm": "the small model is confident the label {who} gave is wrong and changed it",
    "llm_rounds_disagree": "{who} answered otherwise in another round; averaged over the rounds, this label "
                           "is the likelier",
    "label_issue": "the small model, which never saw this label, doubts it",
    "labels_near_chance": "the labels {who} gave in this project look near chance: use a stronger LLM or label "
                          "by hand",
    "no_llm_label": "{who} gave no usable label",
    "not_yet_reviewed_by_slm": "LLM label only, not yet checked by the small model",
}
LLM = "the LLM"
AUDIT_NOTE = "FreeAL: audit label (measures the run; never shown to the LLM or the small model)."
BLIND_NOTE = ("FreeAL: audit task. Give your own label: the machine's is withheld until you do, so it cannot sway "
              "you. Your label measures the run and is never shown to the LLM or the small model.")


def reasons_text(reasons: list[str], who: str = LLM) -> str:
    """The review note's account of ``reasons`` (flag reason codes), naming ``who`` gave the label."""
    return "; ".join(REASON_TEXT.get(r, r).format(who=who) for r in reasons) or "flagged by the small model"


def review_marker(model_version: str) -> str:
    """The marker a flagged prediction of ``model_version`` carries: ``freeal:needs-review[<version>]``.

    The review view filters on the selected version's marker, so it is right as soon as a new version is
    in, while Label Studio is still deleting the previous one (slowly: one prediction at a time)."""
    return f"{REVIEW_MARKER}[{model_version}]"


def audit_marker(model_version: str) -> str:
    """The marker an audit task's prediction of ``model_version`` carries: ``freeal:audit[<version>]``."""
    return f"{AUDIT_MARKER}[{model_version}]"


def _markers(model_version: str, *, review: bool, audit: bool) -> str | None:
    """What a prediction's first result item carries for the Data Manager's tabs to filter on (or None)."""
    found = ([review_marker(model_version)] if review else []) + ([audit_marker(model_version)] if audit else [])
    return " ".join(found) or None


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
    who: str = LLM,
) -> str:
    """Human-readable review note: flag, reasons, suggested label and per-label confidences."""
    conf = ", ".join(f"{lab} {p:.2f}" for lab, p in sorted(probs.items(), key=lambda kv: -kv[1]))
    if not suspicious:
        return f"FreeAL: OK. Confidences: {conf}" if conf else "FreeAL: OK."
    parts = [f"FreeAL: NEEDS REVIEW ({reasons_text(reasons, who)})."]
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


def render_prediction(cfg: ClassificationConfig, res: ItemResult, model_version: str, who: str = LLM
                      ) -> dict[str, Any]:
    """One Label Studio prediction (``result``, ``score``, ``model_version``) for a FreeAL result.

    ``score`` is the final confidence in [0, 1] (0 when there is no label; none when a label has no confidence,
    i.e. an endpoint without logprobs before the small model's verdict, as for spans). The choices result carries
    the same score; the per-label confidences go into the review note when the config has one. A flagged
    prediction's first result item carries ``"freeal": review_marker(model_version)``, which the Data Manager
    can filter on ("Prediction results" contains ...) whatever controls the config has; an audit task's
    carries ``audit_marker(model_version)`` (both, space-separated, when both apply). An audit task that
    awaits a person's label gets :func:`blind_prediction`.
    """
    score = (min(1.0, max(0.0, float(res.confidence))) if res.confidence is not None
             else None if res.label is not None else 0.0)
    if awaits_audit(res):
        return blind_prediction(cfg, model_version, score=score, review=bool(res.suspicious))
    labels = predicted_labels(cfg, res.label, res.probs)
    result = [choice_result(cfg, labels, score=score)] if labels else []
    suspicious = bool(res.suspicious) and res.source != "human"
    note = review_text(suspicious=suspicious, reasons=list(res.reasons), suggested_label=res.suggested_label,
                       probs=res.probs, who=who)
    if res.source == "human":
        note = AUDIT_NOTE if res.audit else "FreeAL: human label (gold)."
    result.extend(review_results(cfg, suspicious=suspicious, note=note))
    marker = _markers(model_version, review=suspicious, audit=res.audit)
    if marker and result:
        result[0]["freeal"] = marker
    return {"result": result, **({} if score is None else {"score": score}), "model_version": model_version}


def awaits_audit(res: ItemResult) -> bool:
    """Whether ``res`` is a random audit task that no person has labelled yet."""
    return res.audit and res.source != "human"


def can_blind(cfg: TaskConfig) -> bool:
    """Whether ``cfg`` has a control that carries the audit marker without a label: a classification control
    (an empty choice) or the review note; a span config without the note has only its regions."""
    return isinstance(cfg, ClassificationConfig) or bool(cfg.review.text_name and cfg.review.text_to_name)


def blind_prediction(cfg: TaskConfig, model_version: str, *, score: float | None, review: bool) -> dict[str, Any]:
    """The prediction of an audit task that awaits a person's label (``can_blind(cfg)``): no label, no flag,
    no suggestion; the empty classification choice or the note (:data:`BLIND_NOTE`) carries the audit marker
    and, when the task is flagged (``review``), the review marker, so both tabs still list it."""
    carrier = [choice_result(cfg, [])] if isinstance(cfg, ClassificationConfig) else []
    carrier += [r for r in review_results(cfg, suspicious=False, note=BLIND_NOTE) if r["type"] == "textarea"]
    carrier[0]["freeal"] = _markers(model_version, review=review, audit=True)
    prediction: dict[str, Any] = {"result": carrier, "model_version": model_version}
    if score is not None:
        prediction["score"] = min(1.0, max(0.0, float(score)))
    return prediction


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
                           note: str | None = None, audit: bool = False) -> dict[str, Any]:
    """One Label Studio prediction for a task's spans (an empty result list when there is no entity).

    ``score`` is the task's confidence; without it, the lowest span score when every span has one, else
    the prediction carries no score (never a made-up constant). The review cue controls get ``note`` and
    the flag when the config has them; a flagged prediction's first result item carries ``review_marker``, an
    ``audit`` sentence's ``audit_marker`` (both when both apply). (An audit sentence that awaits a person's
    entities is rendered by :func:`blind_prediction` instead, where the config allows: see
    :func:`render_task_prediction`.)
    """
    result = [span_region(cfg, text, s) for s in sorted(spans)]
    if score is None and spans and all(s.score is not None for s in spans):
        score = min(float(s.score) for s in spans if s.score is not None)
    if note is not None:
        result.extend(review_results(cfg, suspicious=suspicious, note=note))
    marker = _markers(model_version, review=suspicious, audit=audit)
    if marker and result:
        result[0]["freeal"] = marker
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


def human_labels(cfg: TaskConfig, result: list[dict[str, Any]], text: str | None) -> list[str]:
    """The labels a submitted annotation gives, as FreeAL stores them: the chosen classes, or for spans
    one encoded span list (an annotation with no region says "no entity": that is a label too)."""
    if isinstance(cfg, ClassificationConfig):
        return labels_from_result(cfg, result)
    return [encode_spans(spans_from_result(cfg, text, result))]


def render_task_prediction(cfg: TaskConfig, res: ItemResult, text: str, model_version: str, who: str = LLM
                           ) -> dict[str, Any]:
    """One Label Studio prediction for a FreeAL result of either task type (``text``: the task's text;
    ``who``: who gave the labels judged, for the review note)."""
    if isinstance(cfg, ClassificationConfig):
        return render_prediction(cfg, res, model_version, who)
    suspicious = bool(res.suspicious) and res.source != "human"
    if awaits_audit(res) and can_blind(cfg):
        return blind_prediction(cfg, model_version, score=res.confidence, review=suspicious)
    if res.source == "human":
        note = AUDIT_NOTE if res.audit else "FreeAL: human label (gold)."
    elif res.note:
        note = res.note
    elif suspicious:
        note = f"FreeAL: NEEDS REVIEW ({reasons_text(list(res.reasons), who)})."
    else:
        note = "FreeAL: OK."
    spans = [Span(int(d["start"]), int(d["end"]), str(d["label"]), d.get("score")) for d in res.spans or []]
    return render_span_prediction(cfg, text, spans, model_version, score=res.confidence, suspicious=suspicious,
                                  note=note, audit=res.audit)
