"""Entity-level evaluation of character spans with seqeval (exact match of boundaries and type)."""
from __future__ import annotations

from collections.abc import Sequence

from freeal_backend.spans import Span, bio_labels, spans_to_bio, _is_word


def word_offsets(text: str) -> list[tuple[int, int]]:
    """Words for evaluation: runs of letters/digits/combining marks, and every other non-space character alone."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        j = i + 1
        if _is_word(text[i]):
            while j < len(text) and _is_word(text[j]):
                j += 1
        out.append((i, j))
        i = j
    return out


def bio_tags(text: str, spans: Sequence[Span], types: Sequence[str]) -> list[str]:
    """BIO tag names over :func:`word_offsets` (a span boundary inside a word snaps outward)."""
    offsets = word_offsets(text)
    ids, _ = spans_to_bio(offsets, list(range(len(offsets))), spans, types)
    names = bio_labels(types)
    return [names[i] for i in ids]


def entity_scores(texts: Sequence[str], gold: Sequence[Sequence[Span]], pred: Sequence[Sequence[Span]],
                  types: Sequence[str]) -> dict[str, dict[str, float]]:
    """Entity precision/recall/F1 (and gold support): ``{"overall": {...}, type: {...}}``, from seqeval.

    Both span lists go through the same BIO conversion over the same words, so an entity counts as found
    only with the exact boundaries (up to whole words) and type.
    """
    from seqeval.metrics import classification_report

    y_true = [bio_tags(t, g, types) for t, g in zip(texts, gold)]
    y_pred = [bio_tags(t, p, types) for t, p in zip(texts, pred)]
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    zero = {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    out = {}
    for key, name in [("micro avg", "overall"), *((t, t) for t in types)]:
        row = report.get(key, zero)
        out[name] = {"precision": float(row["precision"]), "recall": float(row["recall"]),
                     "f1": float(row["f1-score"]), "support": float(row["support"])}
    return out
