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
