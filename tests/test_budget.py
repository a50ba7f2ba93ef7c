"""The review budget (slm/budget.py): the curve by hand, its shape, its quantiles against the exact
Poisson-binomial, its interval in simulation (and that the simulation catches overconfident scores), the
target-error review set, bad input, FREEAL_TARGET_ERROR, and benchmarks/budget_check.py's arithmetic."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from freeal_backend.config import Settings
from freeal_backend.records import Item, ItemResult
from freeal_backend.slm.budget import (CALIBRATION_SD, budget_curve, budget_summary, holding_share, review_order,
                                       review_set)
from freeal_backend.storage import Store

HAND = [0.5, 0.9, 1.0, 0.7]  # review order: 0 (0.5), 3 (0.7), 1 (0.9), 2 (1.0)


def exact_quantile(q: np.ndarray, prob: float) -> int:
    """The ``prob`` quantile of a sum of independent Bernoulli(q_i), by dynamic programming over the count."""
    dist = np.zeros(len(q) + 1)
    dist[0] = 1.0
    for x in q:
        dist[1:] = dist[1:] * (1 - x) + dist[:-1] * x
        dist[0] *= 1 - x
    return int(np.searchsorted(np.cumsum(dist), prob - 1e-12))


def test_curve_by_hand() -> None:
    curve = budget_curve(HAND)
    assert list(review_order(HAND)) == [0, 3, 1, 2]
    assert curve.texts == curve.reviewable == 4 and list(curve.k) == [0, 1, 2, 3, 4]
    assert curve.accuracy == pytest.approx([3.1 / 4, 3.6 / 4, 3.9 / 4, 1.0, 1.0])
    assert curve.low[-1] == curve.high[-1] == 1.0  # nothing left unreviewed may be wrong
    two = budget_curve([0.5, 0.5], ks=[0])  # Binomial(2, 1/2) wrong: 5 % quantile 0, 95 % quantile 2
    assert (two.accuracy[0], two.low[0], two.high[0]) == pytest.approx((0.5, 0.0, 1.0))
    sure = budget_curve([1.0, 0.0, 0.0], ks=[0, 1])  # no doubt: the interval is the point
    assert list(sure.low) == list(sure.accuracy) == list(sure.high) == pytest.approx([1 / 3, 2 / 3])


def test_texts_that_cannot_be_reviewed_count_but_are_never_reviewed() -> None:
    scores, reviewable = [0.2, 0.5, 0.9], [True, False, True]
    assert list(review_order(scores, reviewable)) == [0, 2]
    curve = budget_curve(scores, reviewable)
    assert list(curve.k) == [0, 1, 2] and curve.reviewable == 2 and curve.texts == 3
    assert curve.accuracy == pytest.approx([1.6 / 3, 2.4 / 3, 2.5 / 3])  # index 1 stays at 0.5
    assert curve.high[-1] == 1.0 and curve.low[-1] == pytest.approx(2 / 3)


def test_curve_is_monotone_and_brackets_its_estimate() -> None:
    rng = np.random.default_rng(1)
    scores = rng.beta(6, 1.5, 3000)
    curve = budget_curve(scores)
    assert (np.diff(curve.accuracy) >= -1e-12).all()
    assert (np.diff(curve.low) >= -1e-12).all() and (np.diff(curve.high) >= -1e-12).all()
    one = 1 / len(scores)  # the bounds are whole label counts: the mean may lie less than one label outside
    assert (curve.low - one <= curve.accuracy).all() and (curve.accuracy <= curve.high + one).all()
    assert (curve.low[:2000] <= curve.accuracy[:2000]).all()  # while many doubtful labels remain: inside
    assert curve.accuracy[0] == pytest.approx(scores.mean()) and curve.accuracy[-1] == 1.0
    assert budget_curve(scores, level=0.99).low[0] < curve.low[0]  # a surer interval is wider


@pytest.mark.parametrize("draw", ["uniform", "mostly right", "near certain", "constant", "with sure ones"])
def test_quantiles_match_the_exact_poisson_binomial(draw: str) -> None:
    rng = np.random.default_rng(len(draw))
    for _ in range(15):
        n = int(rng.integers(1, 250))
        scores = {"uniform": lambda: rng.uniform(0, 1, n), "mostly right": lambda: rng.beta(8, 0.4, n),
                  "near certain": lambda: np.full(n, 0.999), "constant": lambda: np.full(n, rng.uniform()),
                  "with sure ones": lambda: np.concatenate([rng.beta(5, 0.3, n), np.ones(5), np.zeros(3)])}[draw]()
        for level in (0.8, 0.9, 0.98):
            curve = budget_curve(scores, ks=[0], level=level, calibration_sd=0.0)
            q = 1 - scores
            hi, lo = exact_quantile(q, (1 + level) / 2), exact_quantile(q, (1 - level) / 2)
            # at most one label off the exact quantile, either side
            assert abs((1 - curve.low[0]) * len(q) - hi) <= 1 + 1e-9
            assert abs((1 - curve.high[0]) * len(q) - lo) <= 1 + 1e-9


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _coverage(scores: np.ndarray, truth: np.ndarray, ks: list[int], rng: np.random.Generator, draws: int,
              calibration_sd: float = 0.0, offset_sd: float = 0.0) -> float:
    """Share of simulated label sets whose accuracy after review lies in the curve's interval: the curve sees
    ``scores``; labels are right with probability ``truth``, its logits moved per draw by one offset drawn
    with sd ``offset_sd``."""
    curve = budget_curve(scores, ks=ks, calibration_sd=calibration_sd)
    order = review_order(scores)
    inside = []
    for _ in range(draws):
        moved = 1 / (1 + np.exp(-(_logit(truth) + rng.normal(0, offset_sd)))) if offset_sd else truth
        right = rng.random(len(scores)) < moved
        for k, lo, hi in zip(ks, curve.low, curve.high):
            after = right.copy()
            after[order[:k]] = True
            inside.append(lo - 1e-12 <= after.mean() <= hi + 1e-12)
    return float(np.mean(inside))


def test_interval_covers_simulated_accuracy_when_the_scores_are_calibrated() -> None:
    rng = np.random.default_rng(7)
    scores = rng.beta(5, 1, 2000)
    ks = [0, 20, 100, 400, 1000]
    curve = budget_curve(scores, ks=ks, calibration_sd=0.0)
    order = review_order(scores)
    means = []
    for _ in range(300):
        right = rng.random(len(scores)) < scores
        row = []
        for k in ks:
            after = right.copy()
            after[order[:k]] = True
            row.append(after.mean())
        means.append(row)
    assert np.mean(means, axis=0) == pytest.approx(curve.accuracy, abs=0.002)  # unbiased
    assert 0.86 <= _coverage(scores, scores, ks, rng, 300) <= 0.97  # a 90 % interval (integer counts: a bit more)


def test_interval_counts_a_shared_calibration_offset_by_default() -> None:
    """Scores calibrated without gold can be off as a whole (made noise: the truth up to 1.8 logits lower).
    The default interval counts an offset with sd CALIBRATION_SD; chance alone covered far less."""
    rng = np.random.default_rng(11)
    scores = rng.beta(6, 1, 2000)
    ks = [0, 100, 400]
    assert CALIBRATION_SD == 0.7
    assert _coverage(scores, scores, ks, rng, 300, calibration_sd=0.0, offset_sd=CALIBRATION_SD) < 0.4
    assert 0.85 <= _coverage(scores, scores, ks, rng, 300, calibration_sd=CALIBRATION_SD,
                             offset_sd=CALIBRATION_SD) <= 0.97
    # a made-noise-like run: the truth one logit below the scores (about 9 points at 85 % right)
    truth = 1 / (1 + np.exp(-(_logit(np.clip(scores, 1e-9, 1 - 1e-9)) - 1.0)))
    plain = budget_curve(scores, ks=[0])
    assert truth.mean() < scores.mean() - 0.05
    assert plain.low[0] < truth.mean() < plain.high[0]
    assert not budget_curve(scores, ks=[0], calibration_sd=0.0).low[0] < truth.mean()
    assert plain.high[0] - plain.low[0] < 0.3  # wide where many scores are low (here 69-95 %)


def test_a_negative_calibration_sd_is_refused() -> None:
    with pytest.raises(ValueError, match="calibration_sd"):
        budget_curve([0.5, 0.9], calibration_sd=-0.1)
    with pytest.raises(ValueError, match="calibration_sd"):
        review_set([0.5, 0.9], 0.1, calibration_sd=float("nan"))


def test_simulation_catches_overconfident_scores() -> None:
    rng = np.random.default_rng(8)
    scores = rng.beta(5, 1, 2000)
    assert _coverage(scores, scores**2, [0, 100, 400], rng, 200) < 0.2  # labels right less often than scored


def test_review_set_by_hand() -> None:
    idx, est = review_set(HAND, 0.05)  # expected error after k: 0.225, 0.1, 0.025
    assert list(idx) == [0, 3] and est.k == 2 and est.accuracy == pytest.approx(0.975)
    idx, est = review_set(HAND, 0.1)  # exactly on the target counts as met
    assert list(idx) == [0] and est.accuracy == pytest.approx(0.9)
    assert review_set(HAND, 0.3)[1].k == 0  # already below: nothing to review
    with pytest.raises(ValueError, match="cannot be met"):
        review_set([0.2, 0.5, 0.9], 0.05, reviewable=[True, False, True])  # index 1 alone: 1/6 wrong expected


def test_review_set_is_the_smallest_and_confidence_asks_for_more() -> None:
    rng = np.random.default_rng(3)
    scores = rng.beta(6, 1, 5000)
    curve = budget_curve(scores)
    for target in (0.01, 0.03, 0.08):
        idx, est = review_set(scores, target)
        assert 1 - curve.accuracy[est.k] <= target < 1 - curve.accuracy[est.k - 1]
        assert list(idx) == list(review_order(scores)[: est.k]) and scores[idx].max() <= np.sort(scores)[est.k]
        sure_idx, sure = review_set(scores, target, confidence=0.95)
        assert sure.k > est.k and 1 - sure.low <= target + 1e-12  # the 95 % one-sided bound meets it
        assert list(sure_idx[: est.k]) == list(idx)


@pytest.mark.parametrize("call", [
    lambda: budget_curve([0.5, float("nan")]),
    lambda: budget_curve([]),
    lambda: budget_curve([0.5, 1.2]),
    lambda: budget_curve([[0.5, 0.5]]),
    lambda: budget_curve([0.5, 0.6], reviewable=[True]),
    lambda: budget_curve([0.5, 0.6], ks=[3]),
    lambda: budget_curve([0.5, 0.6], level=1.0),
    lambda: review_set([0.5], 0.0),
    lambda: review_set([0.5], 1.0),
    lambda: review_set([0.5], float("nan")),
    lambda: review_set([0.5], 0.1, confidence=1.5),
])
def test_bad_input_is_refused_clearly(call: object) -> None:
    with pytest.raises(ValueError, match="scores|reviewable|ks|level|target_error|confidence"):
        call()  # type: ignore[operator]


def test_summary_points_target_and_sentence() -> None:
    scores = np.r_[np.linspace(0.3, 1.0, 90), np.ones(10)]
    reviewable = np.r_[np.ones(90, bool), np.zeros(10, bool)]  # 10 people's labels
    plain = budget_summary(scores, reviewable)
    assert [p["k"] for p in plain["points"]] == [0, 1, 2, 5, 10, 20, 30, 50]
    assert plain["target"] is None and plain["texts"] == 100 and plain["reviewable"] == 90
    ten = next(p for p in plain["points"] if p["k"] == 10)
    assert plain["sentence"].startswith("review the 10 least-confident tasks and about "
                                        f"{100 * ten['accuracy']:.1f} % (90 % interval")
    aimed = budget_summary(scores, reviewable, target_error=0.02)
    _, est = review_set(scores, 0.02, reviewable)
    assert aimed["target"]["k"] == est.k and aimed["target"]["target_error"] == 0.02
    assert aimed["sentence"].startswith(f"to bring the estimated error to at most 2.0 %, review the {est.k} ")
    assert [p["k"] for p in budget_summary(scores[:4], reviewable[:4])["points"]] == [0, 1, 2]  # capped at 4 texts
    sure = budget_summary(scores, reviewable, target_error=0.02, confidence=0.9)
    sure_idx, sure_est = review_set(scores, 0.02, reviewable, confidence=0.9)
    assert sure["target"]["k"] == sure_est.k > est.k and sure["target"]["confidence"] == 0.9
    assert sure["sentence"].startswith(f"to bring the error to at most 2.0 % with 90 % confidence, review the "
                                       f"{sure_est.k} ")
    met = budget_summary(scores, reviewable, target_error=0.5)
    assert met["target"]["k"] == 0 and met["sentence"].startswith(
        "the estimated error is already at most 50.0 %: without review about ")


@pytest.mark.parametrize("name, field, value, bad", [
    ("FREEAL_TARGET_ERROR", "target_error", 0.05, ("5", "0", "-0.1", "nan", "five percent")),
    ("FREEAL_TARGET_CONFIDENCE", "target_confidence", 0.9, ("90", "1", "0", "nan")),
])
def test_target_settings(monkeypatch: pytest.MonkeyPatch, name: str, field: str, value: float,
                         bad: tuple[str, ...]) -> None:
    """FREEAL_TARGET_ERROR and FREEAL_TARGET_CONFIDENCE: off when unset, a share strictly between 0 and 1."""
    monkeypatch.delenv(name, raising=False)
    assert getattr(Settings.from_env(), field) is None
    monkeypatch.setenv(name, str(value))
    assert getattr(Settings.from_env(), field) == value
    for text in bad:
        monkeypatch.setenv(name, text)
        numeric = text.lstrip("-").replace(".", "").isdigit() or text == "nan"
        with pytest.raises(ValueError, match=f"{name} must lie strictly between 0 and 1" if numeric else name):
            Settings.from_env()


def test_budget_check_benchmark_measures_true_accuracy_after_review(tmp_path: Path) -> None:
    """benchmarks/budget_check.py on a made-noise style .npz and a finished run's stored scores: the true
    accuracy after review is the brute-force one, and the gap is predicted minus true."""
    from benchmarks.budget_check import main as budget_check

    rng = np.random.default_rng(5)
    gold = rng.integers(0, 2, 300)
    noisy = np.where(rng.random(300) < 0.8, gold, 1 - gold)
    probs = np.clip(np.eye(2)[gold] * 0.6 + rng.dirichlet([1, 1], 300) * 0.4, 1e-3, 1)
    np.savez(tmp_path / "made.npz", toy_seed0_probs=probs / probs.sum(1, keepdims=True), toy_seed0_labels=noisy,
             toy_seed0_gold=gold)
    store = Store(tmp_path / "run" / "state.sqlite")
    scores = rng.uniform(0.2, 1.0, 30)
    store.replace_items([Item(str(i), f"text {i}", gold="a") for i in range(30)])
    store.set_results([ItemResult(str(i), "a" if rng.random() < scores[i] else "b", float(scores[i]),
                                  source="human" if i == 0 else "llm") for i in range(30)])
    stored = store.results()
    right = np.array([stored[str(i)].label == "a" for i in range(30)])
    store.close()
    assert budget_check(["--npz", str(tmp_path / "made.npz"), "--run", str(tmp_path / "run"),
                         "--out", str(tmp_path / "check")]) == 0
    cases = json.loads((tmp_path / "check.json").read_text())["cases"]
    assert [c["case"] for c in cases] == ["made toy_seed0", f"run {tmp_path / 'run'}"]
    run = cases[1]
    reviewable = np.arange(30) != 0
    order = review_order(np.where(reviewable, scores, 1.0), reviewable)
    for point in run["points"]:
        after = right.copy()
        after[order[: point["k"]]] = True
        assert point["true"] == pytest.approx(after.mean())
    assert run["true_accuracy"] == pytest.approx(right.mean()) and run["reviewable"] == 29
    assert "| made toy_seed0 | 300 |" in (tmp_path / "check.md").read_text()


def test_benchmark_review_measure_follows_the_review_tab_order() -> None:
    """``metrics.review_scores`` takes the first share of the review tab's order (lowest score first), with
    texts the LLM left unanswered where their score puts them, not ahead of everything."""
    from freeal_backend.metrics import review_scores

    score = np.array([0.9, 0.1, 0.2, 0.95, 0.97, 0.99, 0.98, 0.96, 0.94, 0.93])
    wrong = np.array([True, True, True] + [False] * 7)
    unanswered = np.array([True] + [False] * 9)
    out = review_scores(score, wrong, unanswered=unanswered, shares=(0.2,))
    assert out["top20pct_answered_wrong_recall"] == 1.0 and out["top20pct_unanswered_recall"] == 0.0


def test_holding_share_is_the_fewest_lowest_scored_texts_expected_to_hold_that_share_of_the_wrong_labels():
    scores = np.array([0.9, 0.1, 1.0, 0.5, 0.0])
    reviewable = np.array([True, True, True, True, False])  # a person's label: never in the set
    # expected wrong among the reviewable: 0.9 + 0.5 + 0.1 + 0 = 1.5; three quarters of it is 1.125
    assert holding_share(scores, 0.75, reviewable).tolist() == [1, 3]
    assert holding_share(scores, 0.6, reviewable).tolist() == [1]
    assert holding_share(np.ones(3), 0.75).tolist() == []  # nothing expected wrong: nothing to hold
    with pytest.raises(ValueError, match="share"):
        holding_share(scores, 1.0)
