"""A random audit: people label a few tasks drawn at random, blind to the machine; the run's health is read off them.

Every estimate the verdict makes without gold leans on the small model, which partly learns the labeller's
consistent errors (made noise: run health 7-10 points too high) or charges its own errors to the labels (a
weak judge: too low). No recipe without gold can tell which. A handful of tasks drawn at random and labelled
by a person can: the share of them the LLM got right is an unbiased estimate of its accuracy on every text.

Pure functions, no I/O. The sample is the ``size`` tasks with the smallest keyed hash of their id (uniform,
reproducible, no state). A person's label on an audit task is *blind*: the loop keeps it from the LLM's
demonstrations and the small model's training, so the machine labels and scores that task like any other,
and the comparison is out of sample. The interval is Wilson's for a binomial share (scipy); with 20-100
audited tasks it held the true accuracy in 85-100 % of the draws per case at the nominal 90 % (made noise,
the MR replay and live runs: ``benchmarks/results/audit_check.md``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression

AUDIT_MIN = 20  # audited tasks before the audit replaces the small model's estimate and sets the scores' level
AUDIT_LEVEL = 0.9  # the two-sided interval shown


def audit_sample(item_ids: Iterable[str], size: int, seed: int = 0) -> set[str]:
    """The ``size`` ids with the smallest BLAKE2b hash of ``seed:id``: a uniform random sample that stays the
    same across runs (and mostly the same as tasks are added)."""
    if size <= 0:
        return set()
    keyed = sorted((hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), i) for i in item_ids)
    return {i for _, i in keyed[:size]}


@dataclass(frozen=True)
class Audit:
    """What the people's labels on the audited tasks say about the machine's.

    ``accuracy``: share of audited tasks whose LLM label is right (none given = wrong), with its Wilson
    ``low``-``high`` interval; ``final_accuracy``: the same for the final labels; ``score_before``: the mean
    score the verdict gave those final labels before the audit set the level; ``flagged`` / ``flagged_wrong``
    and ``unflagged`` / ``unflagged_right``: how the review flag split them."""

    audited: int
    llm_right: int
    accuracy: float
    low: float
    high: float
    final_right: int
    final_accuracy: float
    score_before: float
    flagged: int
    flagged_wrong: int
    unflagged: int
    unflagged_right: int
    level: float = AUDIT_LEVEL

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @property
    def decides(self) -> bool:
        """Enough audited tasks for the audit to set the run's estimate and the scores' level."""
        return self.audited >= AUDIT_MIN


def wilson(right: int, n: int, level: float = AUDIT_LEVEL) -> tuple[float, float]:
    """Wilson's two-sided ``level`` interval for a share of ``right`` in ``n``."""
    ci = binomtest(int(right), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def smoothed_share(right: np.ndarray) -> float:
    """The share of ``right``, smoothed by one right and one wrong (20 of 20 is not 100 %)."""
    return (float(np.sum(right)) + 1.0) / (len(right) + 2.0)


def calibrate_to_audit(scores: np.ndarray, audited: np.ndarray, right: np.ndarray) -> np.ndarray | None:
    """``scores`` recalibrated on the audit: Platt scaling (scikit-learn's logistic regression, default
    regularisation, on the score's logit) fitted on the audited tasks' scores ``scores[audited]`` and whether
    their final label was ``right``; a monotone map, so every ranking stays. None where the audit is all
    right or all wrong, or the fit would reverse the ranking (the caller then moves the scores by one logit
    offset to the smoothed share).

    With 50 audited tasks, ECE on the other texts: made noise 0.05-0.08, where the verdict alone had
    0.08-0.13 and that offset alone left 0.06-0.12; the MR replay 0.07 (``benchmarks/audit_check.py``)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-9, 1 - 1e-9)
    z = np.log(p / (1 - p))[:, None]
    right = np.asarray(right, dtype=bool)
    if right.all() or not right.any():
        return None
    fit = LogisticRegression().fit(z[np.asarray(audited, dtype=bool)], right)
    return fit.predict_proba(z)[:, 1] if fit.coef_[0, 0] > 0 else None


def audit_outcome(llm_right: np.ndarray, final_right: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> Audit:
    """The audit from its rows (at least one): whether the LLM's label (none = wrong) and the final label equal
    the person's, the final label's score before the audit and the review flag."""
    llm_ok, final_ok = np.asarray(llm_right, dtype=bool), np.asarray(final_right, dtype=bool)
    flag = np.asarray(flagged, dtype=bool)
    low, high = wilson(int(llm_ok.sum()), len(llm_ok))
    return Audit(audited=len(llm_ok), llm_right=int(llm_ok.sum()), accuracy=float(llm_ok.mean()), low=low, high=high,
                 final_right=int(final_ok.sum()), final_accuracy=float(final_ok.mean()),
                 score_before=float(np.mean(scores)), flagged=int(flag.sum()),
                 flagged_wrong=int((flag & ~final_ok).sum()), unflagged=int((~flag).sum()),
                 unflagged_right=int((~flag & final_ok).sum()))


def audit_message(audit: Audit, model_estimate: float, what: str = "labels") -> str:
    """The audit in words for run health (``what`` the LLM gave: labels, entity lists)."""
    interval = f"{audit.level:.0%} interval {audit.low:.0%}-{audit.high:.0%}"
    text = (f"a random audit of {audit.audited} tasks found {audit.llm_right} of the LLM {what} right "
            f"({audit.accuracy:.0%}, {interval})")
    if not audit.decides:
        return (text + f"; the small model's estimate of {model_estimate:.0%} stands until {AUDIT_MIN} audited "
                "tasks")
    text += f"; the small model had estimated {model_estimate:.0%}; the scores are recalibrated on the audit"
    if audit.unflagged:
        text += (f"; of the audited tasks the flag left alone, {audit.unflagged_right} of {audit.unflagged} "
                 "were right")
    return text
