"""The review budget: how right the whole set becomes when people review its least-confident texts.

Pure numpy, no I/O, no gold. Each text's score is P(its final label is right), calibrated without gold
(detection.py); people's labels score 1. Reviewing a text makes its label right. The labels left unreviewed are
right independently with their scores, so the number of wrong ones is Poisson-binomial: mean sum(1 - p),
variance sum(p(1 - p)), third cumulant sum(p(1 - p)(2p - 1)). Its quantiles come from the Cornish-Fisher
expansion (normal + skewness, with a continuity correction), O(1) per k after cumulative sums, so a whole
curve over 100k texts costs milliseconds; tests check them against the exact distribution.

Chance is the smaller part of the doubt. Scores calibrated without gold can be off as a whole: a small model
that learns the labeller's own errors scores too high (made noise: the truth 0.4-1.8 logits lower), a weak
one too low. So the interval also counts one offset shared by every score's logit, normal with sd
``CALIBRATION_SD``, combined with chance in quadrature. benchmarks/budget_check.py measures the estimate, the
offset that would have matched the truth and the interval's coverage against gold. A random audit moves the
scores' level to the truth but leaves this width: narrowed by the audit's own uncertainty, the interval held
the truth less often than the nominal 90 % (benchmarks/results/audit_check_budget_interval.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.9  # the two-sided interval the page shows
SHARES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # curve points shown: these shares of all texts reviewed
HEADLINE_SHARE = 0.1  # without a target error, the sentence speaks of reviewing this share
_TOLERANCE = 1e-9  # scores this far outside [0, 1] are float noise and clipped
# sd of the shared logit offset between the scores and the truth, with or without an audit. The offsets that
# would have matched the truth: -1.8 to -0.02 on 22 re-judged benchmark cases, within 1.15 (= 1.645 sd) in 18
# of them (benchmarks/results/budget_check_offset.md; made, learnable noise the largest); about -0.8 to +0.9
# on 22 live runs (README, "How sure the budget is").
CALIBRATION_SD = 0.7


@dataclass(frozen=True)
class Estimate:
    """Reviewing the ``k`` least-confident reviewable texts: estimated share of all labels right, and its
    ``level`` interval."""

    k: int
    accuracy: float
    low: float
    high: float
    level: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class BudgetCurve:
    """Estimated accuracy of all ``texts`` labels after reviewing ``k`` texts, lowest score first."""

    texts: int
    reviewable: int
    level: float
    k: np.ndarray
    accuracy: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def points(self) -> list[Estimate]:
        return [Estimate(int(k), float(a), float(lo), float(hi), self.level)
                for k, a, lo, hi in zip(self.k, self.accuracy, self.low, self.high)]


def review_order(scores: Sequence[float] | np.ndarray, reviewable: Sequence[bool] | np.ndarray | None = None
                 ) -> np.ndarray:
    """Indices of the reviewable texts, lowest score first (ties: lower index first)."""
    p, mask = _checked(scores, reviewable)
    return _order(p, mask)


def budget_curve(scores: Sequence[float] | np.ndarray, reviewable: Sequence[bool] | np.ndarray | None = None,
                 ks: Sequence[int] | np.ndarray | None = None, level: float = LEVEL,
                 calibration_sd: float = CALIBRATION_SD) -> BudgetCurve:
    """Estimated share of all labels right after reviewing the ``k`` lowest-scored reviewable texts, per k.

    ``scores``: P(label right) per text; ``reviewable``: which texts people may review (default all; people's
    own labels score 1 and come last anyway); ``ks``: the review counts to estimate (default 0..reviewable);
    ``calibration_sd``: sd of the scores' shared logit offset the interval counts besides chance (0: chance
    only, as if the scores were exactly calibrated).
    """
    p, mask = _checked(scores, reviewable)
    _check_probability("level", level)
    _check_sd(calibration_sd)
    order = _order(p, mask)
    m = len(order)
    k = np.arange(m + 1) if ks is None else np.asarray(ks, dtype=np.int64)
    if k.ndim != 1 or (k < 0).any() or (k > m).any():
        raise ValueError(f"ks: review counts between 0 and the {m} reviewable texts")
    wrong = _WrongCount(p, mask, order, calibration_sd)
    wrong_hi, wrong_lo = (wrong.quantile(k, x) for x in ((1 + level) / 2, (1 - level) / 2))
    n = len(p)
    return BudgetCurve(n, m, level, k, 1 - wrong.cum[0][k] / n, 1 - wrong_hi / n, 1 - wrong_lo / n)


def review_set(scores: Sequence[float] | np.ndarray, target_error: float,
               reviewable: Sequence[bool] | np.ndarray | None = None, confidence: float | None = None,
               level: float = LEVEL, calibration_sd: float = CALIBRATION_SD) -> tuple[np.ndarray, Estimate]:
    """The smallest set of reviewable texts, lowest score first, whose review brings the estimated error of
    all labels to ``target_error`` or below: the expected error, or with ``confidence`` its upper bound at that
    confidence (one-sided, counting ``calibration_sd`` as ``budget_curve`` does). Returns the indices (review
    order) and the estimate after their review. Raises ValueError when reviewing every reviewable text would
    not meet the target.
    """
    _check_probability("target_error", target_error)
    if confidence is not None:
        _check_probability("confidence", confidence)
    _check_sd(calibration_sd)
    p, mask = _checked(scores, reviewable)
    order = _order(p, mask)
    k = np.arange(len(order) + 1)
    count = _WrongCount(p, mask, order, calibration_sd)
    wrong = count.cum[0] if confidence is None else count.quantile(k, confidence)
    meets = np.flatnonzero(wrong / len(p) <= target_error + 1e-12)
    if not len(meets):
        what = "expected error" if confidence is None else f"error at {confidence:.0%} confidence"
        raise ValueError(f"target error {target_error:g} cannot be met: reviewing all {len(order)} reviewable "
                         f"texts leaves an {what} of {wrong[-1] / len(p):.4f}")
    best = int(meets[0])
    curve = budget_curve(p, mask, [best], level, calibration_sd)
    return order[:best], curve.points()[0]


def holding_share(scores: Sequence[float] | np.ndarray, share: float,
                  reviewable: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
    """The fewest reviewable texts, lowest score first, expected to hold ``share`` of the wrong labels among
    the reviewable ones (expected wrong: sum of 1 - score). Returns their indices in review order."""
    _check_probability("share", share)
    p, mask = _checked(scores, reviewable)
    order = _order(p, mask)
    held = np.cumsum(1.0 - p[order])
    if not len(order) or held[-1] <= 0:
        return order[:0]
    return order[:int(np.searchsorted(held, share * held[-1] - 1e-12)) + 1]


def budget_summary(scores: Sequence[float] | np.ndarray, reviewable: Sequence[bool] | np.ndarray | None = None,
                   target_error: float | None = None, shares: Sequence[float] = SHARES,
                   level: float = LEVEL, calibration_sd: float = CALIBRATION_SD,
                   confidence: float | None = None) -> dict[str, object]:
    """What the status page, ``/status`` and ``freeal run`` show: a few points of the curve (``shares`` of all
    texts reviewed, at most every reviewable one), the review set that meets ``target_error`` if set (in
    expectation, or with ``confidence``: see ``review_set``), and one sentence about the set to review (the
    target's, else the ``HEADLINE_SHARE`` point's)."""
    p, mask = _checked(scores, reviewable)
    n, m = len(p), int(mask.sum())
    head_k = min(m, round(HEADLINE_SHARE * n))
    curve = budget_curve(p, mask, sorted({min(m, round(s * n)) for s in shares} | {head_k}), level,
                         calibration_sd)
    points = curve.points()
    target = None
    headline = next(pt for pt in points if pt.k == head_k)
    sentence = budget_sentence(headline, n)
    if target_error is not None:
        _, headline = review_set(p, target_error, mask, confidence, level, calibration_sd)
        target = {**headline.as_dict(), "share": headline.k / n, "target_error": target_error,
                  "confidence": confidence}
        aim = f"at most {100 * target_error:.1f} %" + (f" with {100 * confidence:.0f} % confidence" if confidence
                                                         else "")
        what = "error" if confidence else "estimated error"
        sentence = (f"to bring the {what} to {aim}, " if headline.k else
                    f"the {what} is already {aim}: ") + budget_sentence(headline, n)
    return {"texts": n, "reviewable": m, "level": level, "calibration_sd": calibration_sd,
            "sentence": sentence, "target": target,
            "points": [{**pt.as_dict(), "share": pt.k / n} for pt in points]}


def shift_logits(p: np.ndarray, delta: float) -> np.ndarray:
    """``p`` with ``delta`` added to every logit; 0 and 1 (no doubt) stay."""
    out = p.copy()
    inner = (p > 0) & (p < 1)
    out[inner] = 1.0 / (1.0 + np.exp(-(np.log(p[inner]) - np.log1p(-p[inner]) + delta)))
    return out


def budget_sentence(estimate: Estimate, texts: int) -> str:
    """``review the 40 least-confident tasks and about 95.0 % (90 % interval 93.5–96.5 %) of all 400 labels
    should be right``."""
    right = (f"about {100 * estimate.accuracy:.1f} % ({100 * estimate.level:.0f} % interval "
             f"{100 * estimate.low:.1f}–{100 * estimate.high:.1f} %) of all {texts:,} labels should be right")
    if estimate.k == 0:
        return f"without review {right}"
    return f"review the {estimate.k:,} least-confident task{'s' if estimate.k != 1 else ''} and {right}"


# internals ------------------------------------------------------------------------------------------------
def _checked(scores: Sequence[float] | np.ndarray, reviewable: Sequence[bool] | np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(scores, dtype=np.float64)
    if p.ndim != 1 or not len(p):
        raise ValueError("scores: a non-empty list of P(label right), one per text")
    if np.isnan(p).any():
        raise ValueError(f"scores: {int(np.isnan(p).sum())} NaN score(s), e.g. at index "
                         f"{int(np.flatnonzero(np.isnan(p))[0])}; every text needs P(label right)")
    if (p < -_TOLERANCE).any() or (p > 1 + _TOLERANCE).any():
        raise ValueError(f"scores: probabilities in [0, 1], got {p.min():g} .. {p.max():g}")
    mask = np.ones(len(p), dtype=bool) if reviewable is None else np.asarray(reviewable, dtype=bool)
    if mask.shape != p.shape:
        raise ValueError(f"reviewable: one flag per text ({len(p)}), got shape {mask.shape}")
    return np.clip(p, 0.0, 1.0), mask


def _check_probability(name: str, value: float) -> None:
    if not 0 < value < 1:  # also False for NaN
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")


def _check_sd(sd: float) -> None:
    if not 0 <= sd < np.inf:  # also False for NaN
        raise ValueError(f"calibration_sd must be a finite sd >= 0, got {sd!r}")


def _order(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(mask)
    return idx[np.argsort(p[idx], kind="stable")]


class _WrongCount:
    """The number of wrong labels left after reviewing the first k texts of ``order``, for every k: chance (the
    Poisson-binomial's cumulants, ``cum``) and a logit offset shared by every score, normal with sd ``sd``."""

    def __init__(self, p: np.ndarray, mask: np.ndarray, order: np.ndarray, sd: float) -> None:
        self.p_order, self.p_fixed, self.sd = p[order], p[~mask], sd
        self.cum = _tail_cumulants(1.0 - self.p_order, 1.0 - self.p_fixed)

    def quantile(self, k: np.ndarray, prob: float) -> np.ndarray:
        """The ``prob`` quantile at each review count ``k``: chance's and the offset's distance from the mean
        added in quadrature (both about normal), the offset's at its own ``prob`` quantile; never rising as
        more texts are reviewed (chance's whole counts would otherwise make it wobble)."""
        if self.sd == 0:
            return _quantile(self.cum, k, prob)
        every = np.arange(len(self.p_order) + 1)
        chance, mean = _quantile(self.cum, every, prob), self.cum[0]
        z = NormalDist().inv_cdf(prob)
        moved = _tail_cumulants(1.0 - shift_logits(self.p_order, -z * self.sd),
                                1.0 - shift_logits(self.p_fixed, -z * self.sd))
        both = np.clip(mean + np.sign(z) * np.hypot(chance - mean, moved[0] - mean), 0, self.cum[3])
        return np.minimum.accumulate(both)[k]


def _tail_cumulants(q_order: np.ndarray, q_fixed: np.ndarray) -> np.ndarray:
    """(4, m + 1): the cumulants (mean, variance, third) of the wrong count and the texts that may be wrong,
    when the first k of ``q_order`` (P(wrong), review order) are reviewed and the ``q_fixed`` texts never are,
    for k = 0..m."""
    def per_text(q: np.ndarray) -> np.ndarray:
        v = q * (1 - q)
        return np.stack([q, v, v * (1 - 2 * q), (q > 0).astype(np.float64)])

    tail = np.zeros((4, len(q_order) + 1))
    tail[:, :-1] = np.cumsum(per_text(q_order)[:, ::-1], axis=1)[:, ::-1]
    return tail + per_text(q_fixed).sum(axis=1, keepdims=True)


def _quantile(cum: np.ndarray, k: np.ndarray, prob: float) -> np.ndarray:
    """The ``prob`` quantile of the wrong count at each review count ``k`` (Cornish-Fisher, continuity
    corrected), an integer in [0, its possible maximum]."""
    mean, var, third = (c[k] for c in cum[:3])
    z = NormalDist().inv_cdf(prob)
    skew_term = np.divide(third * (z * z - 1) / 6, var, out=np.zeros_like(var), where=var > 0)
    x = np.ceil(mean + np.sqrt(var) * z + skew_term - 0.5 - 1e-9)
    return np.clip(x, 0, cum[3][k])
