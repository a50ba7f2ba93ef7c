"""A second judge beside the small model (``FREEAL_SECOND_JUDGE``, classes only): a logistic regression on a
frozen encoder's mean-pooled sentence embeddings, cross-fitted on the labels it judges (3 folds grouped by
normalised text, as the small model's).

The verdict then runs twice: on the small model's out-of-sample probabilities alone, and on the mean of
both judges'. The second gives the labels, the ranking and the flag; the first gives the level: the i-th
lowest-scored text by the mean gets the small model's i-th lowest score, and run health stays the small
model's. On made noise and the MR replay (``benchmarks/second_judge.py``, ``results/second_judge_mpnet_ranked.md``,
all-mpnet-base-v2, 3 seeds) this ranked the wrong labels better everywhere and kept the small model's
calibration, but on MR its flag held fewer of the wrong labels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from sklearn.linear_model import LogisticRegression

from freeal_backend.slm.classifier import group_folds, text_groups
from freeal_backend.slm.detection import Judgement

FOLDS = 3
C = 1.0  # the probe's inverse regularisation (as measured)


def probe_oof(emb: np.ndarray, labels: np.ndarray, classes: int, texts: Sequence[str], *,
              human: np.ndarray | None = None, seed: int = 0, fallback: np.ndarray | None = None,
              c: float = C) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic regression on ``emb`` for ``labels``; -1 (unlabelled) and
    ``human`` rows (a person's label: trained on in every fold, as by the small model) are predicted by the
    model trained on every label. Rows whose training folds hold fewer than two classes get ``fallback``'s
    row (uniform when None)."""
    out = np.full((len(labels), classes), 1.0 / classes) if fallback is None else fallback.astype(float).copy()
    labelled = np.flatnonzero(labels >= 0)
    human = np.zeros(len(labels), dtype=bool) if human is None else np.asarray(human, dtype=bool)
    fold = group_folds(text_groups(texts), np.flatnonzero((labels >= 0) & ~human), FOLDS, seed)

    def fit_predict(train: np.ndarray, rows: np.ndarray) -> None:
        if not len(rows) or len(np.unique(labels[train])) < 2:
            return
        model = LogisticRegression(C=c, max_iter=3000).fit(emb[train], labels[train])
        probs = np.zeros((len(rows), classes))
        probs[:, model.classes_] = model.predict_proba(emb[rows])
        out[rows] = probs

    for f in range(int(fold.max()) + 1):
        fit_predict(np.flatnonzero((fold != f) & (labels >= 0)), np.flatnonzero(fold == f))
    fit_predict(labelled, np.flatnonzero(fold < 0))  # unlabelled, people's labels, every label when too few to fold
    return out


def ranked_at_level(own: Judgement, both: Judgement) -> Judgement:
    """``both`` (the verdict on the mean of both judges: its labels, flag and order) with ``own``'s scores (the
    small model's verdict) handed out in that order, and ``own``'s health."""
    scores = np.empty_like(own.scores)
    scores[np.argsort(both.scores, kind="stable")] = np.sort(own.scores)
    return replace(both, scores=scores, health=own.health)
