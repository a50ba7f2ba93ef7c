"""Evaluation against gold labels: accuracy, macro-F1, coverage, review-flag precision/recall."""
from __future__ import annotations

from collections.abc import Mapping, Sequence


def label_scores(pred: Mapping[str, str | None], gold: Mapping[str, str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy (a missing label counts as wrong), macro-F1 and the share of items with a label."""
    ids = [k for k in gold if k in pred]
    if not ids:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "coverage": float("nan"), "n": 0}
    correct = sum(pred[k] == gold[k] for k in ids)
    f1s = []
    for lab in labels:
        tp = sum(pred[k] == lab and gold[k] == lab for k in ids)
        fp = sum(pred[k] == lab and gold[k] != lab for k in ids)
        fn = sum(pred[k] != lab and gold[k] == lab for k in ids)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": correct / len(ids), "macro_f1": sum(f1s) / len(f1s),
            "coverage": sum(pred[k] is not None for k in ids) / len(ids), "n": len(ids)}


def flag_scores(flagged: Mapping[str, bool], pred: Mapping[str, str | None], gold: Mapping[str, str]
                ) -> dict[str, float]:
    """How well the review flag finds wrong labels: precision, recall, share flagged."""
    ids = [k for k in gold if k in pred and k in flagged]
    wrong = {k for k in ids if pred[k] != gold[k]}
    flags = {k for k in ids if flagged[k]}
    hit = len(wrong & flags)
    return {"precision": hit / len(flags) if flags else float("nan"),
            "recall": hit / len(wrong) if wrong else float("nan"),
            "flagged": len(flags) / len(ids) if ids else float("nan"), "errors": len(wrong)}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, digits: int = 4) -> str:
    """A GitHub Markdown table; floats with ``digits`` decimals, NaN as a dash."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "—" if v != v else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def review_scores(score: Sequence[float], wrong: Sequence[bool], *, unanswered: Sequence[bool] | None = None,
                  flagged: Sequence[bool] | None = None, shares: Sequence[float] = (0.05, 0.10)) -> dict[str, float]:
    """How well a review order (lowest ``score`` first) finds the ``wrong`` items.

    AUROC and average precision of ``-score`` for ``wrong``; for the review tab (``flagged``) and for the
    first ``share`` of the order: share of items, precision and recall for ``wrong`` items that were
    answered (``unanswered`` items are counted apart, as ``unanswered_recall``).
    """
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, w = np.asarray(score, dtype=float), np.asarray(wrong, dtype=bool)
    un = np.zeros(len(s), dtype=bool) if unanswered is None else np.asarray(unanswered, dtype=bool)
    ans_wrong = w & ~un
    out: dict[str, float] = {"items": float(len(s)), "answered_wrong": float(ans_wrong.sum()),
                             "unanswered": float(un.sum())}
    both = len(set(w[~un].tolist())) == 2
    out["auroc"] = float(roc_auc_score(w[~un], -s[~un])) if both else float("nan")
    out["average_precision"] = float(average_precision_score(w[~un], -s[~un])) if both else float("nan")

    def take(mask: np.ndarray, name: str) -> None:
        picked_answered = mask & ~un
        out[f"{name}_share"] = float(mask.mean())
        out[f"{name}_answered_wrong_precision"] = (float(ans_wrong[picked_answered].mean())
                                                   if picked_answered.any() else float("nan"))
        out[f"{name}_answered_wrong_recall"] = float(mask[ans_wrong].mean()) if ans_wrong.any() else float("nan")
        out[f"{name}_unanswered_recall"] = float(mask[un].mean()) if un.any() else float("nan")

    if flagged is not None:
        take(np.asarray(flagged, dtype=bool), "flag")
    order = np.argsort(s, kind="stable")  # the review tab's order: lowest score first
    for share in shares:
        top = np.zeros(len(s), dtype=bool)
        top[order[: int(round(share * len(s)))]] = True
        take(top, f"top{int(round(share * 100))}pct")
    return out


def expected_calibration_error(score: Sequence[float], right: Sequence[bool], bins: int = 10) -> float:
    """|mean score - accuracy| per equal-width score bin, weighted by the bin's share of items."""
    import numpy as np

    s, r = np.asarray(score, dtype=float), np.asarray(right, dtype=float)
    idx = np.clip((s * bins).astype(int), 0, bins - 1)
    return float(sum(abs(s[idx == b].mean() - r[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))
