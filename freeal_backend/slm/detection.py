"""Which labels are wrong, and how sure we are: out-of-sample SLM evidence + the LLM's own confidence.

Pure functions over arrays (no I/O, no torch). Inputs per text: the SLM's out-of-sample class
probabilities (cross-fitted, see slm.py), the label under judgement (the LLM's, -1 when it gave none),
whether that label is a person's, and optionally the LLM's own per-class probabilities (logprobs).

1. The SLM's probabilities are temperature-scaled against the labels (cross-fitted: calibrated estimates
   of P(label | text), no gold needed); ``cleanlab`` names the label issues on them (confident learning).
2. How the labeller errs (the noise transition P(label | true class)) is cleanlab's confident joint,
   inverted to give P(true class | text). A class the small model never learnt (``unlearnt_classes``: its
   surest texts get it below ``LEARNT_AT``) has a row no one can estimate; it takes the learnt classes'
   mean reliability (``trust_unlearnt``), so no label is drawn into it.
3. Posterior of the true class: SLM prior x likelihood of the label given each true class. The LLM's
   logprob confidence in its label counts only as calibrated out of sample (``llm_likelihood_ratio``: a
   cross-fitted latent-class EM learns P(label right | confidence), isotonic in the confidence; constant
   or uninformative confidences change nothing). Once it informs, the label's posterior is pooled
   linearly with that calibrated P(right | confidence) (``_pool_label``: the small model learnt the
   LLM's labels, so the product double-counts). The score is the posterior of the final label. Both views
   tend to overrate the labels (a small model trained on them learns the LLM's consistent errors; LLMs are
   overconfident), so where the LLM's mean confidence in its labels is below the mean score, every
   answered score moves down to it by one logit offset (``shift_to_mean``: rankings unchanged) and run
   health takes that lower figure; an LLM whose confidence is known to be calibrated (``llm_calibrated``:
   the embedded 1.5B, or ``FREEAL_LLM_CALIBRATED``) moves them up to it too; and where such an LLM's
   labels are surely more accurate than the small model (``judge_outranked``), that small model overrules
   nothing and each score is the LLM's own confidence; the label is then the one the LLM's probabilities,
   averaged over every round that asked the text, favour (where the rounds' answers differ, the last one is
   not the surer). Where the LLM's confidence
   does not inform (none, or uninformative), each score is instead pooled linearly with the run's
   estimated accuracy (``_pool_with_base_rate``: the same double-counting, with no second opinion but the
   base rate). The final label is the LLM's unless
   the evidence against it is strong: the posterior and a conservative anchor-point posterior (anchors
   from out-of-sample rows only: human rows are trained on) pick the same other class, the latter with at
   least ``OVERRULE_AT``. A *weak judge* (labels agree with it on fewer
   than ``WEAK_JUDGE_BELOW`` of its surest texts, ``anchor_agreement``: an LLM errs on hard texts, so the
   small model is the one misled there) overrules nothing, and its scores are the conservative
   posterior's. Texts the LLM left unanswered get the SLM's label and, like any other text, that label's
   posterior as their score (they are always flagged, so the review tab holds them whatever they score).
   The flag holds cleanlab's issues; once the LLM's confidence is informative, cleanlab only sizes the set
   and it holds that many lowest-scored answered texts (the ranking uses all the evidence); an outranked
   small model sizes nothing either: the flag is then the fewest lowest-scored texts that the calibrated
   scores expect to hold ``FLAG_EXPECTED_RECALL`` of the wrong labels (``budget.holding_share``).
4. Run health: estimated accuracy of the labels (mean posterior of the given label; unanswered texts
   count as wrong), agreement and Cohen's kappa between the SLM and the labels, and which side looks weak.
   The labels look poor when the estimate is below ``POOR_ACCURACY``; a low kappa with a fair estimate makes
   the verdict rough, not the labels poor (a 72 %-right judge and 88 %-right labels agree at kappa ~0.3).
   The labels are near chance when the SLM finds no more evidence for them than for shuffled labels
   (``above_chance``, a permutation test), or when the LLM, asked the same texts twice with different
   demonstrations, agrees with itself little beyond the class balance and the SLM with its labels no more
   (``_self_consistent``: the SLM learns a one-sided LLM's balance and looks above chance); then every text
   is flagged, and the estimate and every score are a guess's (1 / number of classes), whatever the
   posterior says. A low kappa above chance, or a weak judge, is said to be the small model's weakness, not
   the labels'; so is an estimate that calls the
   labels poor where the small model's surest texts (the anchor-point posterior) do not: it is then too
   unsure to tell, the labels keep their word and that higher figure is the estimate. With people's
   labels on a random audit (``audit_labels``, slm/audit.py; blind: the rows are judged like any other) the
   audit's share of right labels is run health from ``AUDIT_MIN`` audited texts on, and the scores are
   recalibrated on it.
5. Spans (``judge_span_labels``): the held-out tagger's spans are compared with the label's
   (``judge_spans``: missing, spurious, wrong type, wrong boundary). The score of a sentence, P(its
   spans are right), ranks by the held-out tagger's doubt about its worst word and is set to the level
   that confident learning over the run's words finds (``span_clean_probability``, ``span_words_right``:
   the words as one classification task under cleanlab's noise transition, so the tagger's own mistakes
   are not all charged to the labels; no gold); a sentence is flagged when that is below
   ``SPAN_FLAG_BELOW`` and the tagger disagrees with the label.
   Health as above, with kappa over word-level BIO tags and the permutation test over the tagger's word
   tag probabilities (``span_judge_evidence``).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from sklearn.metrics import cohen_kappa_score

from freeal_backend.slm.audit import (AUDIT_MIN, Audit, audit_message, audit_outcome, calibrate_to_audit,
                                      smoothed_share)
from freeal_backend.slm.budget import holding_share, review_order
from freeal_backend.spans import Span

log = logging.getLogger(__name__)

SPAN_FLAG_BELOW = 0.5  # a sentence whose spans are more likely wrong than right (and disputed) is flagged
SPAN_CALIBRATION_MIN = 20  # fewer sentences than this: a span score is the tagger's 1 - doubt as it is
NEAR_CHANCE_KAPPA = 0.2  # SLM-vs-label agreement this close to chance: the labels carry (almost) no signal
POOR_KAPPA = 0.4
POOR_ACCURACY = 0.75
LEARNT_AT = 0.5  # a class whose anchor points the small model gives less than this on average: not learnt
OVERRULE_AT = 0.99  # the conservative posterior must give another class this much to overrule a label (TREC with
#   made noise: at 0.5, 3 % of labels changed and the final labels lost 0.7 points; at 0.99, 0.4 % and 0.3)
CHANCE_PERMUTATIONS = 199  # label permutations for the near-chance test
CHANCE_P = 0.01  # labels are near chance when shuffled labels get this often as much evidence from the small model
FLAG_EXPECTED_RECALL = 0.75  # an outranked small model's flag: the fewest texts expected to hold this share of
#   the wrong labels (1.5B main jobs, 3 seeds: 14-17 % of the texts holding 50-77 % of them, where cleanlab's
#   count on the small model's view flagged 16-34 %; benchmarks/results/evidence_ablation_main_jobs_1.5b.md)
WEAK_JUDGE_BELOW = 0.8  # labels agree with the small model's surest texts less than this: the judge is misled
SAY_LLM_CONFIDENCE_GAP = 0.05  # run health says why it took the LLM's lower mean confidence from this gap on
LLM_CALIBRATION_MIN = 50  # fewer answers with a confidence than this: the LLM's confidence is not used
LLM_CALIBRATION_FOLDS = 5
SELF_NEAR_CHANCE_KAPPA = 0.3  # the LLM's two answers to the same texts (other demonstrations) agree this close to
#   chance: it does not know the task (1.5B, 300 texts, round 0 vs refined: SUBJ 0.16-0.45 with labels 51-57 %
#   right; TREC 0.60-0.67, SST-2 and MR 0.82-0.93; loop_subj_n300_self_agreement.md)
SELF_AGREEMENT_MIN = 50  # texts answered twice needed before that agreement counts


@dataclass
class Health:
    """How good the judged labels look without gold."""

    estimated_accuracy: float  # share of all non-human texts whose label is right (unanswered = wrong)
    answered_accuracy: float  # the same among answered texts
    coverage: float  # share of non-human texts with a label
    agreement: float  # out-of-sample SLM argmax == label, among answered texts
    kappa: float  # Cohen's kappa of that agreement (0 = chance)
    verdict: str  # ok | poor | near_chance
    message: str
    weak_side: str = ""  # labels | judge (the small model) | "" (neither looks weak)
    p_value: float | None = None  # of the label-permutation test (``above_chance``; spans: over word tags)
    llm_self_kappa: float | None = None  # kappa between the LLM's two answers to the same texts (``SelfAgreement``)

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


@dataclass(frozen=True)
class SelfAgreement:
    """How the LLM's answers to the same texts agree when it is asked again with other demonstrations."""

    texts: int  # texts with an answer from both askings
    changed: int  # of them, those whose answer changed
    kappa: float  # Cohen's kappa between the two answers (0 = no more than their class balances explain)


def kappa_or_zero(a: Sequence[object], b: Sequence[object]) -> float:
    """Cohen's kappa of two labellings of the same items; 0 where it is undefined (one class throughout)."""
    if len(set(a) | set(b)) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(a, b))
    return 0.0 if np.isnan(kappa) else kappa


def self_agreement(first: np.ndarray, again: np.ndarray) -> SelfAgreement:
    """The agreement of two answers per text (class indices, the same texts in the same order)."""
    first, again = np.asarray(first, dtype=int), np.asarray(again, dtype=int)
    if len(first) == 0:
        return SelfAgreement(0, 0, 0.0)
    changed = int((first != again).sum())
    if changed == 0:
        return SelfAgreement(len(first), 0, 1.0)
    return SelfAgreement(len(first), changed, kappa_or_zero(first.tolist(), again.tolist()))


def span_self_agreement(first: Sequence[Sequence[str]], again: Sequence[Sequence[str]]) -> SelfAgreement:
    """The agreement of two entity lists per sentence, given as word tags (BIO, the same sentences in the
    same order): a sentence changed when any tag did; kappa over all the words."""
    if not first:
        return SelfAgreement(0, 0, 0.0)
    changed = sum(list(a) != list(b) for a, b in zip(first, again))
    if changed == 0:
        return SelfAgreement(len(first), 0, 1.0)
    return SelfAgreement(len(first), changed, kappa_or_zero([t for a in first for t in a],
                                                            [t for b in again for t in b]))


@dataclass
class Judgement:
    """Per text: final label, calibrated score, review flag and reasons; plus the run's health."""

    labels: np.ndarray  # (n,) final class index
    scores: np.ndarray  # (n,) probability that the final label is right
    flagged: np.ndarray  # (n,) bool
    reasons: list[list[str]]
    posterior: np.ndarray  # (n, classes)
    issues: np.ndarray  # (n,) bool, label issues (cleanlab's; once the LLM informs: as many, lowest-scored)
    temperature: float
    health: Health
    audit: Audit | None = None  # what people's labels on the random audit tasks say (slm/audit.py)


def temperature_scale(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Rescale ``probs`` by the temperature that minimises the log-loss of ``labels`` (>= 0) on them."""
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    ok = labels >= 0
    if ok.sum() < 10:
        return probs, 1.0

    def scaled(t: float) -> np.ndarray:
        z = logp / t
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def nll(t: float) -> float:
        p = scaled(t)[ok]
        return float(-np.log(np.clip(p[np.arange(len(p)), labels[ok]], 1e-12, 1.0)).mean())

    t = float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)
    return scaled(t), t


def noise_transition(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """P(label = l | true class = k) as a (k, l) matrix, from cleanlab's confident joint on the
    out-of-sample ``probs``. Falls back to 10 % uniform noise when there are too few labels to tell."""
    from cleanlab.count import estimate_joint

    classes = probs.shape[1]
    ok = labels >= 0
    fallback = np.full((classes, classes), 0.1 / max(1, classes - 1))
    np.fill_diagonal(fallback, 0.9)
    if ok.sum() < 10 * classes or len(np.unique(labels[ok])) < classes:
        return fallback
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            joint = estimate_joint(labels[ok], probs[ok])  # rows: given label, columns: true class
    except (ValueError, AssertionError) as exc:
        log.warning("noise transition not estimable (%s); assuming 10%% label noise", exc)
        return fallback
    trans = joint.T + 1e-4  # (true, given), smoothed so no class is impossible
    return trans / trans.sum(axis=1, keepdims=True)


def anchor_transition(probs: np.ndarray, *, anchor_quantile: float = 0.97) -> np.ndarray:
    """A conservative P(label = l | true class = k) from anchor points (Patrini et al., 2017): the texts
    the model is surest belong to class k are taken as truly of class k, their mean predicted label
    distribution is row k. Under noise that hits hard texts (an LLM's) it sees less noise than there is,
    so it is used only to decide whether the evidence is strong enough to overrule a label."""
    classes = probs.shape[1]
    trans = np.zeros((classes, classes))
    for k in range(classes):
        col = probs[:, k]
        trans[k] = probs[col >= np.quantile(col, anchor_quantile)].mean(axis=0)
    trans = np.maximum(trans, 1e-4)
    return trans / trans.sum(axis=1, keepdims=True)


def unlearnt_classes(anchor: np.ndarray) -> np.ndarray:
    """(C,) bool: classes the small model never learnt to tell, whose surest texts (the anchor points of
    ``anchor``, an :func:`anchor_transition`) it gives that class less than ``LEARNT_AT`` on average
    (TREC's 1.5 % ABBR class with made noise: 0.05, where every other class gets 0.94-0.98)."""
    return np.diag(anchor) < LEARNT_AT


def trust_unlearnt(transition: np.ndarray, unlearnt: np.ndarray) -> np.ndarray:
    """``transition`` whose rows for ``unlearnt`` classes say their labels are as reliable as the learnt
    classes' on average (mean diagonal, the rest spread evenly). Such a row cannot be estimated: inverted,
    the row it would get (true ABBR labelled ABBR 5 % of the time) gave the class 8 % of every text's
    prior where 1.5 % belong to it, and the verdict then overruled right labels into it."""
    if not unlearnt.any() or unlearnt.all():
        return transition
    out = transition.copy()
    classes = len(out)
    diag = float(np.diag(out)[~unlearnt].mean())
    out[unlearnt] = (1.0 - diag) / (classes - 1)
    out[unlearnt, unlearnt] = diag
    return out


def anchor_agreement(probs: np.ndarray, labels: np.ndarray, *, anchor_quantile: float = 0.97) -> float:
    """Share of labels that agree with the small model on its surest texts (per class, the top
    ``1 - anchor_quantile`` by its probability for that class; mean over classes), among texts with a label.
    An LLM errs on hard texts, so there nearly every label should agree; when many do not, the small model
    is confidently wrong (misled), and its verdict is not to be trusted over the labels."""
    ok = labels >= 0
    shares = []
    for k in range(probs.shape[1]):
        col = probs[ok, k]
        if len(col):
            shares.append(float((labels[ok][col >= np.quantile(col, anchor_quantile)] == k).mean()))
    return float(np.mean(shares)) if shares else 1.0


def posterior_given_label(prior_noisy: np.ndarray, labels: np.ndarray, transition: np.ndarray,
                          likelihood_override: np.ndarray | None = None) -> np.ndarray:
    """P(true class | text, label): P(true | text) (from ``prior_noisy`` = P(label | text) inverted through
    ``transition``) times P(label | true) (or ``likelihood_override`` rows where given), normalised."""
    prior = true_class_probs(prior_noisy, transition)
    likelihood = np.ones_like(prior)
    answered = labels >= 0
    likelihood[answered] = transition[:, labels[answered]].T
    if likelihood_override is not None:
        has = ~np.isnan(likelihood_override[:, 0])
        likelihood[has] = likelihood_override[has]
    post = prior * likelihood
    return post / post.sum(axis=1, keepdims=True)


def true_class_probs(noisy_probs: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """Invert P(label | x) = P(true | x) @ T for P(true | x) (clipped to the simplex)."""
    try:
        p = noisy_probs @ np.linalg.inv(transition)
    except np.linalg.LinAlgError:
        return noisy_probs
    p = np.clip(p, 1e-6, None)
    return p / p.sum(axis=1, keepdims=True)


def find_issues(labels: np.ndarray, probs: np.ndarray, posterior: np.ndarray) -> np.ndarray:
    """cleanlab's label issues (confident learning, pruned by its estimated noise rate) among texts with a
    label; where cleanlab cannot run (too few texts or classes), a posterior below one half."""
    from cleanlab.filter import find_label_issues

    issues = np.zeros(len(labels), dtype=bool)
    ok = np.flatnonzero(labels >= 0)
    if len(ok) == 0:
        return issues
    classes = probs.shape[1]
    if len(ok) >= 10 * classes and len(np.unique(labels[ok])) == classes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                issues[ok] = find_label_issues(labels[ok], probs[ok], filter_by="prune_by_noise_rate", n_jobs=1)
            return issues
        except (ValueError, AssertionError) as exc:
            log.warning("cleanlab could not rank label issues (%s); using the posterior", exc)
    issues[ok] = posterior[ok, labels[ok]] < 0.5
    return issues


def llm_likelihood_ratio(confidence: np.ndarray, p_right: np.ndarray, *, folds: int = LLM_CALIBRATION_FOLDS,
                         iterations: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """How much the LLM's own confidence in its label should move the odds that the label is right.

    ``confidence``: per text the LLM's probability for the label it gave (NaN where it gave none);
    ``p_right``: P(label right) from the small model alone. The LLM's confidence is taken at face value
    nowhere: a latent-class EM (label right / wrong) learns P(right | confidence) as an isotonic function of
    the confidence, each fold's function fitted on the other folds' responsibilities (cross-fitted, so a
    text's own label never calibrates its own confidence). Returns the likelihood ratio
    P(confidence | right) / P(confidence | wrong) per text: 1 where there is no confidence, where fewer
    than ``LLM_CALIBRATION_MIN`` texts have one, and wherever the confidence carries no information (a
    constant 0.99 gets ratio 1 everywhere); and beside it that calibrated P(right | confidence) (the
    isotonic function's out-of-fold value; NaN where the ratio is 1 for want of a usable confidence).
    """
    from sklearn.isotonic import IsotonicRegression

    conf = np.asarray(confidence, dtype=np.float64)
    prior = np.clip(np.asarray(p_right, dtype=np.float64), 1e-6, 1 - 1e-6)
    ratio = np.ones(len(conf))
    calibrated = np.full(len(conf), np.nan)
    has = np.flatnonzero(~np.isnan(conf))
    if len(has) < LLM_CALIBRATION_MIN or np.ptp(conf[has]) == 0:
        return ratio, calibrated
    fold = np.empty(len(has), dtype=int)
    fold[np.random.default_rng(seed).permutation(len(has))] = np.arange(len(has)) % folds
    x, logit0 = conf[has], np.log(prior[has] / (1 - prior[has]))
    log_lr = np.zeros(len(has))
    h = np.empty(len(has))
    for _ in range(iterations):
        resp = 1.0 / (1.0 + np.exp(-(logit0 + log_lr)))
        new = np.empty(len(has))
        for f in range(folds):
            fit = fold != f
            iso = IsotonicRegression(y_min=0.02, y_max=0.98, out_of_bounds="clip").fit(x[fit], resp[fit])
            h[~fit] = iso.predict(x[~fit])
            base = float(np.clip(resp[fit].mean(), 0.02, 0.98))
            new[~fit] = np.log(h[~fit] / (1 - h[~fit])) - np.log(base / (1 - base))
        if np.abs(new - log_lr).max() < 1e-4:
            log_lr = new
            break
        log_lr = new
    ratio[has] = np.exp(log_lr)
    calibrated[has] = h
    return ratio, calibrated


def _weigh_label(posterior: np.ndarray, labels: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Multiply each answered text's posterior of its given label by ``ratio`` and renormalise."""
    out = posterior.copy()
    answered = np.flatnonzero(labels >= 0)
    out[answered, labels[answered]] *= ratio[answered]
    return out / out.sum(axis=1, keepdims=True)


def _pool_label(posterior: np.ndarray, labels: np.ndarray, llm_right: np.ndarray) -> np.ndarray:
    """A linear opinion pool for each answered text with a calibrated LLM confidence: its label's posterior
    becomes the mean of the posterior (small model x LLM) and the LLM's calibrated P(right | confidence),
    the other classes keep their proportions. Multiplying the two views treats them as independent; the
    small model learnt the LLM's labels, so the product double-counts and its scores sit too near 0 and 1
    (on live runs the final score's ECE was 0.13-0.14 where the LLM's own confidence had 0.05-0.07)."""
    rows = np.flatnonzero((labels >= 0) & ~np.isnan(llm_right))
    cols = labels[rows]
    return _set_probability(posterior, rows, cols, (posterior[rows, cols] + llm_right[rows]) / 2)


def _pool_with_base_rate(scores: np.ndarray, posterior: np.ndarray, final: np.ndarray, judged: np.ndarray,
                         base: float) -> tuple[np.ndarray, np.ndarray]:
    """Where the LLM's confidence does not inform, each judged text's score is pooled linearly, with equal
    weights, with the run's estimated accuracy ``base`` (one map for every text, so the order stays). The
    posterior counts the small model's evidence as independent of the labeller's errors, but the small model
    learnt from those very labels, so its extremes are too extreme: on the MR replay labels it scored below
    0.1 were right 75 % of the time, on made noise labels it scored above 0.9 were wrong 8-12 % of the time
    (ECE on the MR replay 0.057-0.063 -> 0.018-0.025, on made noise 0.08-0.13 -> 0.07-0.10; re-judged by
    ``benchmarks/audit_check.py``). Equal
    weights as in ``_pool_label``: there is no gold to fit them (an audit does: ``_audit_level``)."""
    scores = scores.copy()
    scores[judged] = (scores[judged] + base) / 2
    rows = np.flatnonzero(judged)
    return scores, _set_probability(posterior, rows, final[rows], scores[rows])


def _set_probability(posterior: np.ndarray, rows: np.ndarray, cols: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``posterior`` with ``posterior[rows, cols] = new``, each row's other classes keeping their proportions."""
    out = posterior.copy()
    rest = np.clip(1.0 - out[rows, cols], 1e-12, None)
    out[rows] *= ((1.0 - new) / rest)[:, None]
    out[rows, cols] = new
    return out / out.sum(axis=1, keepdims=True)  # a label the posterior gave all its mass keeps it


def shift_to_mean(scores: np.ndarray, target: float) -> np.ndarray:
    """``scores`` moved by one common offset in logit space so that their mean is ``target`` (the order of
    the scores, hence every ranking, stays as it was)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-9, 1 - 1e-9)
    z = np.log(p / (1 - p))
    target = float(np.clip(target, 1e-6, 1 - 1e-6))
    offset = brentq(lambda b: float(np.mean(1.0 / (1.0 + np.exp(-(z + b))))) - target, -40.0, 40.0)
    return 1.0 / (1.0 + np.exp(-(z + offset)))


def judge_outranked(agreement: float, llm_accuracy: float) -> bool:
    """Whether the small model is surely less accurate than labels whose accuracy is ``llm_accuracy`` (the
    mean confidence of an LLM known to be calibrated): it is right at most where it agrees with a right label
    or where the label is wrong, so at most ``agreement + 1 - llm_accuracy``. The embedded 1.5B's labels
    (90-94 % right) and a small model trained on 160-300 of them (agreeing with 67-80 %, and with many of
    the LLM's errors): pooled with it, the LLM's confidence ranked the wrong labels worse than alone (SST-2
    and MR loops: AUROC 0.87 and 0.72, against 0.94 and 0.82; evidence_ablation_loop_n300_1.5b*.md). A judge
    whose errors were independent of the LLM's would add to the ranking even then; one trained on the
    LLM's labels is not."""
    return agreement + 1.0 - llm_accuracy < llm_accuracy


def _level_llm_confidence(health: Health, own: float, calibrated: bool) -> Health:
    """``health`` beside the LLM's mean confidence ``own`` in its labels: the estimate where ``own`` is lower
    (or ``calibrated``: an LLM whose confidence is known to be calibrated sets the level either way); else
    the lower figure counts and the message names the higher one when they differ by
    ``SAY_LLM_CONFIDENCE_GAP`` or more."""
    gap = health.answered_accuracy - own
    if not calibrated and gap <= 0:
        if -gap < SAY_LLM_CONFIDENCE_GAP:
            return health
        return replace(health, message=health.message + (
            f" (the LLM's own confidence in its labels averages {own:.0%}, above this estimate; where that "
            "confidence is known to be calibrated, FREEAL_LLM_CALIBRATED=1 lets it count, and a random audit, "
            "FREEAL_AUDIT, measures it)"))
    if calibrated:  # the verdict and its words follow the LLM's figure, the small model's is named beside it
        out = _verdict(own * health.coverage, own, health.coverage, health.agreement, health.kappa, "labels",
                       p_value=health.p_value, weak_judge=health.weak_side == "judge",
                       llm_self_kappa=health.llm_self_kappa)
        if abs(gap) < SAY_LLM_CONFIDENCE_GAP:
            return out
        return replace(out, message=out.message + (
            f" (the LLM's own confidence in its labels, calibrated for this model, averages {own:.0%}; the small "
            f"model alone gives them {health.answered_accuracy:.0%})"))
    out = _with_accuracy(health, own)
    message = out.message
    if gap >= SAY_LLM_CONFIDENCE_GAP:
        message += (f" (the LLM's own confidence in its labels averages {own:.0%}, below the "
                    f"{health.answered_accuracy:.0%} the verdict gives them; the small model may have learnt the "
                    "LLM's consistent errors, so the lower figure counts)")
    if out.verdict == "poor" and health.verdict != "poor":
        message += "; the labels look poor: review the flagged tasks, and consider a stronger LLM endpoint"
    return replace(out, message=message, weak_side=out.weak_side or ("labels" if out.verdict == "poor" else ""))


def _self_consistent(health: Health, agreement: SelfAgreement | None, what: str = "labels") -> Health:
    """``health`` with the LLM's agreement with itself: near chance where its two answers to the same texts
    agree with kappa below ``SELF_NEAR_CHANCE_KAPPA`` (from ``SELF_AGREEMENT_MIN`` texts on) and the small
    model agrees with the labels no more than their class balance explains (kappa below
    ``NEAR_CHANCE_KAPPA``). An LLM that does not know the task can still give one class to most texts; the
    small model then learns that balance and looks above chance (SUBJ with the 1.5B: 88 % of the texts
    "objective", gold 48 %; run health said 99 % right where 54 % were), so only the LLM's own inconsistency
    tells such labels from a rare class. A refinement that fixed many poor round-0 answers also changes them,
    but leaves labels the small model learns (kappa with them above ``NEAR_CHANCE_KAPPA``). ``what`` the
    labels are called (entity lists: their kappas are over word tags)."""
    if agreement is None:
        return health
    health = replace(health, llm_self_kappa=agreement.kappa)
    if (agreement.texts < SELF_AGREEMENT_MIN or agreement.kappa >= SELF_NEAR_CHANCE_KAPPA
            or health.kappa >= NEAR_CHANCE_KAPPA or health.verdict == "near_chance"):
        return health
    return replace(health, verdict="near_chance", weak_side="labels", message=(
        f"the LLM {what} look near chance: asked {agreement.texts} of the texts twice with different demonstrations, "
        f"the LLM changed its answer on {agreement.changed}, and its two answers agree little beyond their "
        f"{'class' if what == 'labels' else 'tag'} balance (kappa {agreement.kappa:.2f}), as does the small model "
        f"trained on its {what} (kappa "
        f"{health.kappa:.2f} with them): it does not know this task; do not trust them: use a stronger LLM "
        "endpoint (LLM_BASE_URL) or label some tasks by hand"))


def overrule(labels: np.ndarray, posterior: np.ndarray, conservative: np.ndarray) -> np.ndarray:
    """The final label per text: the given one (or, where there is none, the posterior's argmax), unless
    both posteriors pick the same other class and the conservative one gives it at least ``OVERRULE_AT``."""
    pick, strict = posterior.argmax(axis=1), conservative.argmax(axis=1)
    answered = labels >= 0
    switch = answered & (pick == strict) & (pick != labels) & (conservative.max(axis=1) >= OVERRULE_AT)
    return np.where(answered & ~switch, labels, pick)


def above_chance(probs: np.ndarray, labels: np.ndarray, *, permutations: int = CHANCE_PERMUTATIONS,
                 seed: int = 0) -> float:
    """Permutation p-value of the small model's out-of-sample evidence for the labels: how often the mean
    log-probability it gives shuffled labels reaches the one it gives the real ones. Small: the labels carry
    signal the small model learnt, whatever kappa says (a rare class or a weak model keeps kappa low)."""
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    rows = np.arange(len(labels))
    real = logp[rows, labels].mean()
    rng = np.random.default_rng(seed)
    hits = sum(logp[rows, rng.permutation(labels)].mean() >= real for _ in range(permutations))
    return (1 + hits) / (1 + permutations)


def _label_posterior(posterior: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> float:
    """Mean probability ``posterior`` gives the label of each of ``rows`` (a bool mask of labelled rows)."""
    return float(posterior[rows, labels[rows]].mean())


def _health(labels: np.ndarray, human: np.ndarray, probs: np.ndarray, posterior: np.ndarray,
            judge_agreement: float, strict: np.ndarray) -> Health:
    judged = ~human
    answered = judged & (labels >= 0)
    n_judged, n_answered = int(judged.sum()), int(answered.sum())
    coverage = n_answered / n_judged if n_judged else 1.0
    if n_answered == 0:
        return Health(0.0, 0.0, coverage, 0.0, 0.0, "near_chance",
                      "the LLM labelled no text: check the endpoint and the label names", weak_side="labels")
    lab = labels[answered]
    pred = probs[answered].argmax(1)
    agreement = float((pred == lab).mean())
    kappa = kappa_or_zero(pred.tolist(), lab.tolist())
    answered_acc = _label_posterior(posterior, labels, answered)
    upper = _label_posterior(strict, labels, answered)
    p_value = above_chance(probs[answered], lab)
    return _verdict(answered_acc * coverage, answered_acc, coverage, agreement, kappa, "labels", p_value=p_value,
                    weak_judge=judge_agreement < WEAK_JUDGE_BELOW, upper=upper)


def _verdict(est: float, answered_acc: float, coverage: float, agreement: float, kappa: float,
             what: str, *, p_value: float | None = None, weak_judge: bool = False,
             upper: float | None = None, llm_self_kappa: float | None = None) -> Health:
    """Health from the estimates: near chance, poor or ok, which side is weak, and the message a user reads.

    With ``p_value`` (the label-permutation test, :func:`above_chance`) the labels are near chance only when
    the small model finds no more evidence for them than for shuffled ones; a low kappa above chance, or a
    ``weak_judge``, blames the small model, not the labels. Without it, kappa alone decides (spans judged
    without the tagger's word evidence). ``upper``: the answered labels' accuracy by the anchor-point
    posterior (the small model's surest texts only); where the estimate calls the labels poor and that one
    does not, the small model is too unsure to tell poor labels from its own weakness, and the labels keep
    their word (300-text MR projects with gpt-3.5's labels, 89-92 % right: a judge 63-74 % right estimated
    70-79 %, the anchor points 86-90 %). ``p_value`` and ``llm_self_kappa`` are kept on the result whatever
    the verdict, so the evidence travels with it.
    """
    def health(est: float, acc: float, verdict: str, message: str, weak_side: str = "") -> Health:
        return Health(est, acc, coverage, agreement, kappa, verdict, message, weak_side=weak_side, p_value=p_value,
                      llm_self_kappa=llm_self_kappa)

    chance = kappa < NEAR_CHANCE_KAPPA if p_value is None else p_value >= CHANCE_P
    if chance:
        how = (f"kappa {kappa:.2f}" if p_value is None
               else f"kappa {kappa:.2f}, no better than with shuffled labels: p = {p_value:.2f}")
        return health(est, answered_acc, "near_chance",
                      f"the LLM {what} look near chance (a cross-checked small model agrees with them at {how}); "
                      "do not trust them: use a stronger LLM endpoint (LLM_BASE_URL) or label some tasks by hand",
                      weak_side="labels")
    if p_value is not None and (weak_judge or kappa < NEAR_CHANCE_KAPPA):
        return health(est, answered_acc, "poor" if est < POOR_ACCURACY else "ok",
                      f"the small model is a weak judge of these {what} (kappa {kappa:.2f}, though above chance: "
                      f"p = {p_value:.3f}; it often disagrees with them where it is surest): the {what} keep their "
                      f"word, about {est:.0%} look right, and scores and flags say little; review a sample by hand",
                      weak_side="judge")
    if p_value is not None and upper is not None and est < POOR_ACCURACY <= upper * coverage:
        return health(upper * coverage, upper, "ok",
                      f"the small model is too unsure to judge these {what} (kappa {kappa:.2f}): about "
                      f"{upper * coverage:.0%} look right by the texts it is surest of, {est:.0%} by all of them, "
                      f"so it cannot tell poor {what} from its own weakness; the {what} keep their word, and scores "
                      "and flags say little: review a sample by hand, or set FREEAL_AUDIT", weak_side="judge")
    if est >= POOR_ACCURACY and kappa < POOR_KAPPA and p_value is not None:  # a 72 %-right judge and labels
        return health(est, answered_acc, "ok",  # 88 % right agree at kappa ~0.3
                      f"estimated {est:.0%} of the LLM {what} right; the small model agrees with them only loosely "
                      f"(kappa {kappa:.2f}), so that estimate, the scores and the flag are rough")
    if kappa < POOR_KAPPA or est < POOR_ACCURACY:
        return health(est, answered_acc, "poor",
                      f"the LLM {what} look poor (estimated {est:.0%} right, kappa {kappa:.2f}); review the "
                      "flagged tasks, and consider a stronger LLM endpoint", weak_side="labels")
    return health(est, answered_acc, "ok",
                  f"estimated {est:.0%} of the LLM {what} right (kappa {kappa:.2f} with the small model)")


def judge(probs: np.ndarray, labels: np.ndarray, human: np.ndarray | None = None,
          llm_probs: np.ndarray | None = None, *, pool: bool = True, cap: bool = True,
          audit_labels: np.ndarray | None = None, llm_calibrated: bool = False,
          average_rounds: bool = True, llm_self: SelfAgreement | None = None) -> Judgement:
    """Final label, score, flag and reasons per text, and the run's health (see the module doc).

    ``probs``: (n, C) out-of-sample SLM probabilities (human-labelled rows are trained on in every fold:
    in sample, so they never estimate noise); ``labels``: (n,) given label index or -1;
    ``human``: (n,) bool, labels given by a person (kept, score 1, never flagged);
    ``llm_probs``: (n, C) the LLM's per-class probabilities, rows of zeros where it gave none;
    ``pool=False`` leaves out the linear pool (with the LLM's calibrated confidence where it informs, else
    with the run's estimated accuracy: ``_pool_with_base_rate``), ``cap=False`` the cap of
    the scores and the estimate at the LLM's mean confidence (both for ablations);
    ``llm_calibrated``: the LLM's confidence is known to be calibrated (``FREEAL_LLM_CALIBRATED``; the embedded
    1.5B), so once it informs its mean sets the level of the scores and of run health, up as well as down;
    ``average_rounds=False`` keeps an outranked small model's final labels the LLM's last answers (for
    ablations; by default they are the labels its probabilities, averaged over rounds, favour);
    ``llm_self``: how the LLM's answers agree across rounds (``_self_consistent``: near chance when they agree
    little, whatever the small model says);
    ``audit_labels``: (n,) a person's label for the random audit tasks, -1 elsewhere (blind: those rows are
    judged like any other, see slm/audit.py). From ``AUDIT_MIN`` audited tasks on, run health is the audit's
    share of right LLM labels (smoothed by one right and one wrong: 20 of 20 is not 100 %) and the answered
    scores are recalibrated on the audited ones (``calibrate_to_audit``: Platt scaling, ranking unchanged).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    n, classes = probs.shape
    human = np.zeros(n, dtype=bool) if human is None else np.asarray(human, dtype=bool)
    llm_informs = False
    judged_labels = np.where(human, -1, labels)
    answered = judged_labels >= 0
    calibrated, temperature = temperature_scale(probs, judged_labels)  # P(label | x)
    out_of_sample = ~human if (~human).any() else np.ones(n, dtype=bool)
    anchor = anchor_transition(calibrated[out_of_sample])
    unlearnt = unlearnt_classes(anchor)
    trans = trust_unlearnt(noise_transition(judged_labels, calibrated), unlearnt)
    anchor = trust_unlearnt(anchor, unlearnt)
    posterior = posterior_given_label(calibrated, judged_labels, trans)
    strict = posterior_given_label(calibrated, judged_labels, anchor)
    judge_agreement = anchor_agreement(probs, judged_labels)  # labels vs the small model where it is surest
    health = _self_consistent(_health(labels, human, calibrated, posterior, judge_agreement, strict), llm_self)
    if health.weak_side == "judge":  # the labels keep their word; the score is the conservative posterior's
        posterior = strict
        health = _with_estimate(health, posterior, judged_labels, human)
    if llm_probs is not None:  # the LLM's confidence in its label, calibrated out of sample (no face value)
        q = np.asarray(llm_probs, dtype=np.float64)
        total = q.sum(axis=1)
        conf = np.full(n, np.nan)
        has_q = answered & (total > 0)
        conf[has_q] = q[has_q, judged_labels[has_q]] / total[has_q]
        p_right = np.where(answered, posterior[np.arange(n), np.maximum(judged_labels, 0)], 0.5)
        ratio, llm_right = llm_likelihood_ratio(conf, p_right)
        llm_informs = bool(np.any(ratio != 1.0))
        posterior = _weigh_label(posterior, judged_labels, ratio)
        strict = _weigh_label(strict, judged_labels, ratio)
        if llm_informs and pool:  # the product counts the two views as independent; they are not
            posterior = _pool_label(posterior, judged_labels, llm_right)
        health = _with_estimate(health, posterior, judged_labels, human)
    own = float(np.nanmean(conf[answered])) if llm_informs else float("nan")  # the LLM's mean confidence
    outranked = (llm_calibrated and llm_informs and health.verdict != "near_chance"
                 and judge_outranked(health.agreement, own))
    if health.weak_side == "judge" or outranked:
        final = np.where(answered, judged_labels, posterior.argmax(axis=1))
    else:
        final = overrule(judged_labels, posterior, strict)
    rounds_pick = np.zeros(n, dtype=bool)
    if outranked and average_rounds:  # the label is the one the LLM's answers favour over every round that
        # asked the text (each with other demonstrations), as its score is that label's averaged probability
        rows = np.flatnonzero(has_q)
        best = q[rows].argmax(axis=1)
        rounds_pick[rows] = q[rows, best] > q[rows, judged_labels[rows]] * (1 + 1e-9)
        final[rounds_pick] = best[rounds_pick[rows]]
        conf[rows] = q[rows, final[rows]] / total[rows]
        own = float(np.nanmean(conf[answered]))
    final[human] = labels[human]
    scores = posterior[np.arange(n), final]
    scores[human] = 1.0
    if outranked:  # each answered label's score is the LLM's own confidence in it, known to be calibrated
        rows = np.flatnonzero(~np.isnan(conf) & ~human)
        scores[rows] = conf[rows]
        posterior = _set_probability(posterior, rows, final[rows], scores[rows])
    if cap and llm_informs and health.verdict != "near_chance":  # both views tend to overrate the labels: the
        # lower figure counts, every score moved to it alike (an LLM known to be calibrated sets it either way)
        if llm_calibrated or own < scores[answered].mean():
            scores[answered] = shift_to_mean(scores[answered], own)
            posterior = _set_probability(posterior, np.flatnonzero(answered), final[answered], scores[answered])
        health = _level_llm_confidence(health, own, llm_calibrated)
    if outranked:
        health = replace(health, weak_side="judge", message=health.message + (
            f"; the small model agrees with {health.agreement:.0%} of the labels, so it is at most "
            f"{min(1.0, health.agreement + 1 - own):.0%} right, below the {own:.0%} the LLM's calibrated confidence "
            "gives the labels: it overrules none, and each score is the LLM's own confidence"))
    if pool and not llm_informs and health.verdict != "near_chance" and answered.any():
        scores, posterior = _pool_with_base_rate(scores, posterior, final, ~human, health.answered_accuracy)
    unanswered = ~human & ~answered
    issues = find_issues(judged_labels, calibrated, posterior)
    if outranked:  # nor does the outranked small model size the flag: the calibrated scores do
        lowest = holding_share(scores, FLAG_EXPECTED_RECALL, answered)
        health = replace(health, message=health.message + (
            f"; the flag holds the {len(lowest)} lowest-scored labels, expected to hold "
            f"{FLAG_EXPECTED_RECALL:.0%} of the wrong ones"))
    elif llm_informs:  # cleanlab sizes the set; the ranking takes the LLM's calibrated confidence in too
        lowest = review_order(scores, answered)[:int(issues.sum())]
    if llm_informs:
        issues = np.zeros(n, dtype=bool)
        issues[lowest] = True
    if health.verdict == "near_chance":  # labels the small model cannot tell from chance are worth a guess's
        chance = 1.0 / classes  # share, whatever the posterior says (one class for every text: "all right")
        health = replace(health, estimated_accuracy=chance * health.coverage, answered_accuracy=chance)
        scores[~human] = np.minimum(scores[~human], chance)
    truth = np.full(n, -1) if audit_labels is None else np.where(human, -1, np.asarray(audit_labels, dtype=int))
    audited = truth >= 0
    llm_right, final_right = audited & (judged_labels == truth), audited & (final == truth)
    scores_before, model_estimate = scores.copy(), health.estimated_accuracy
    if audited.sum() >= AUDIT_MIN:
        scores, health = _audit_level(scores, health, answered, audited, llm_right, final_right)
        posterior = _set_probability(posterior, np.flatnonzero(answered), final[answered], scores[answered])
    switched = answered & (final != judged_labels)
    reasons: list[list[str]] = []
    for i in range(n):
        why = []
        if unanswered[i]:
            why.append("no_llm_label")
        if rounds_pick[i]:
            why.append("llm_rounds_disagree")
        elif switched[i]:
            why.append("slm_overrules_llm")
        if (issues[i] or scores[i] < 0.5) and answered[i] and not switched[i]:
            why.append("label_issue")
        if health.verdict == "near_chance" and not human[i]:
            why.append("labels_near_chance")
        reasons.append(why)
    flagged = np.array([bool(r) for r in reasons]) & ~human
    audit, health = _audit_said(health, audited, llm_right, final_right, scores_before, flagged, model_estimate)
    return Judgement(final, scores, flagged, reasons, posterior, issues, temperature, health, audit)


def _audit_level(scores: np.ndarray, health: Health, answered: np.ndarray, audited: np.ndarray,
                 llm_right: np.ndarray, final_right: np.ndarray) -> tuple[np.ndarray, Health]:
    """With ``AUDIT_MIN`` audited texts or more (people's labels on random tasks outrank every estimate made
    without them): the answered scores recalibrated on the audited ones (Platt, else one logit offset to the
    audit's smoothed share; unanswered texts keep theirs), and run health the audit's share."""
    scores = scores.copy()
    on = audited & answered
    if on.any():
        platt = calibrate_to_audit(scores[answered], on[answered], final_right[on])
        scores[answered] = (platt if platt is not None
                            else shift_to_mean(scores[answered], smoothed_share(final_right[on])))
        health = _with_accuracy(health, smoothed_share(llm_right[on]))
    verdict = "poor" if health.estimated_accuracy < POOR_ACCURACY else "ok"
    return scores, replace(health, verdict=verdict, weak_side="labels" if verdict == "poor" else "")


def _audit_said(health: Health, audited: np.ndarray, llm_right: np.ndarray, final_right: np.ndarray,
                scores_before: np.ndarray, flagged: np.ndarray, model_estimate: float, what: str = "labels"
                ) -> tuple[Audit | None, Health]:
    """The audit's outcome (None without audited texts) and run health's message saying it."""
    if not audited.any():
        return None, health
    audit = audit_outcome(llm_right[audited], final_right[audited], scores_before[audited], flagged[audited])
    said = audit_message(audit, model_estimate, what)
    if audit.decides and health.verdict == "poor":
        said += f"; the LLM {what} look poor: review the flagged tasks, and consider a stronger LLM endpoint"
    return audit, replace(health, message=said if audit.decides else f"{health.message}; {said}")


def _with_estimate(health: Health, posterior: np.ndarray, labels: np.ndarray, human: np.ndarray) -> Health:
    """``health`` with its accuracy estimate (and the message's figure) taken from ``posterior``."""
    answered = ~human & (labels >= 0)
    if not answered.any():
        return health
    return _with_accuracy(health, _label_posterior(posterior, labels, answered))


def _with_accuracy(health: Health, acc: float) -> Health:
    """``health`` with ``acc`` as the answered labels' estimated accuracy (the message's figure and the
    verdict follow it)."""
    est = acc * health.coverage
    message = health.message.replace(f"{health.estimated_accuracy:.0%}", f"{est:.0%}", 1)
    verdict = health.verdict
    if verdict != "near_chance":  # a low kappa alone blames no side (see ``_verdict``)
        verdict = "poor" if est < POOR_ACCURACY else "ok"
    return replace(health, estimated_accuracy=est, answered_accuracy=acc, verdict=verdict, message=message)


# --- spans -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpanJudgement:
    """One disagreement between the noisy label and the held-out tagger.

    ``kind``: ``missing`` (the tagger finds an entity the label lacks), ``spurious`` (the label has an
    entity the tagger does not see), ``wrong_type`` (same boundaries, other type), ``wrong_boundary``
    (overlapping spans with other boundaries). ``label`` / ``predicted`` are the spans involved.
    """

    kind: str
    label: Span | None
    predicted: Span | None


def judge_spans(label: Sequence[Span], predicted: Sequence[Span]) -> list[SpanJudgement]:
    """Compare a sentence's label spans with predicted spans; exact matches give no judgement.

    Overlapping pairs are matched greedily by overlap length (each span at most once).
    """
    exact = set((s.start, s.end, s.label) for s in label) & set((s.start, s.end, s.label) for s in predicted)
    rest_l = [s for s in label if (s.start, s.end, s.label) not in exact]
    rest_p = [s for s in predicted if (s.start, s.end, s.label) not in exact]
    pairs = sorted(((min(a.end, b.end) - max(a.start, b.start), i, j) for i, a in enumerate(rest_l)
                    for j, b in enumerate(rest_p) if min(a.end, b.end) > max(a.start, b.start)), reverse=True)
    used_l: set[int] = set()
    used_p: set[int] = set()
    out: list[SpanJudgement] = []
    for _, i, j in pairs:
        if i in used_l or j in used_p:
            continue
        used_l.add(i)
        used_p.add(j)
        a, b = rest_l[i], rest_p[j]
        out.append(SpanJudgement("wrong_type" if (a.start, a.end) == (b.start, b.end) else "wrong_boundary", a, b))
    out += [SpanJudgement("spurious", s, None) for i, s in enumerate(rest_l) if i not in used_l]
    out += [SpanJudgement("missing", None, s) for j, s in enumerate(rest_p) if j not in used_p]
    return sorted(out, key=lambda j: (j.label or j.predicted).start)  # type: ignore[union-attr]


def review_note(text: str, judgements: Sequence[SpanJudgement]) -> str:
    """One line for the ``freeal_review`` TextArea: what the held-out tagger doubts in this sentence."""
    if not judgements:
        return "FreeAL: OK."

    def quote(s: Span) -> str:
        return f'"{text[s.start:s.end]}"'

    parts = []
    for j in judgements:
        if j.kind == "missing" and j.predicted is not None:
            parts.append(f"missing {j.predicted.label} {quote(j.predicted)}")
        elif j.kind == "spurious" and j.label is not None:
            parts.append(f"not an entity? {quote(j.label)} ({j.label.label})")
        elif j.kind == "wrong_type" and j.label is not None and j.predicted is not None:
            parts.append(f"{quote(j.label)}: {j.predicted.label}, not {j.label.label}?")
        elif j.label is not None and j.predicted is not None:
            parts.append(f"{quote(j.label)} should be {quote(j.predicted)} ({j.predicted.label})?")
    return "FreeAL: NEEDS REVIEW (small model disagrees): " + "; ".join(parts) + "."


@dataclass
class SpanVerdict:
    """Per sentence: score, review flag, reasons and the held-out tagger's disagreements; the run's health."""

    scores: np.ndarray  # (n,) P(spans right), see span_clean_probability; human 1, unanswered 0
    flagged: np.ndarray  # (n,) bool
    reasons: list[list[str]]
    judgements: list[list[SpanJudgement]]
    health: Health
    audit: Audit | None = None  # what people's spans on the random audit sentences say (slm/audit.py)


def span_words_right(word_probs: Sequence[np.ndarray], word_tags: Sequence[np.ndarray],
                     include: np.ndarray | None = None) -> np.ndarray:
    """Per sentence: P(every word tag of its label is right), by confident learning over the run's words.

    ``word_probs[i]`` (words, tags): the held-out tagger's tag probabilities at sentence i's tagged words;
    ``word_tags[i]``: the label's tag ids there. The ``include``d sentences' words (default: all) are pooled
    as one classification task: probabilities temperature-scaled against the label tags, cleanlab's noise
    transition, the posterior of each label tag (``posterior_given_label``); a sentence gets its least
    likely word's posterior (a wrong entity spoils the sentence once, whatever its length). The tagger's
    own mistakes are charged to it, not to the labels, in proportion to the noise the transition finds.
    NaN for excluded sentences, and everywhere when fewer than ``SPAN_CALIBRATION_MIN`` are included.
    """
    n = len(word_tags)
    include = np.ones(n, dtype=bool) if include is None else np.asarray(include, dtype=bool)
    out = np.full(n, np.nan)
    probs, tags, sentence = _pooled_words(word_probs, word_tags, include)
    if include.sum() < SPAN_CALIBRATION_MIN or not len(tags):
        return out
    calibrated, _ = temperature_scale(probs, tags)
    posterior = posterior_given_label(calibrated, tags, noise_transition(tags, calibrated))
    out[include] = 1.0  # a sentence without a tagged word has nothing to get wrong
    np.minimum.at(out, sentence, posterior[np.arange(len(tags)), tags])
    return out


def _pooled_words(word_probs: Sequence[np.ndarray], word_tags: Sequence[np.ndarray], include: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``include``d sentences' tagged words as one classification task: (words, tags) probabilities,
    label tag ids and each word's sentence index."""
    rows = [i for i in np.flatnonzero(include) if len(word_tags[i])]
    if not rows:
        return np.zeros((0, 0)), np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return (np.concatenate([np.asarray(word_probs[i], dtype=np.float64) for i in rows]),
            np.concatenate([np.asarray(word_tags[i], dtype=int) for i in rows]),
            np.concatenate([np.full(len(word_tags[i]), i) for i in rows]))


def span_judge_evidence(word_probs: Sequence[np.ndarray], word_tags: Sequence[np.ndarray],
                        include: np.ndarray | None = None) -> dict[str, float] | None:
    """How much the held-out tagger's word tags say about the label's, for run health (as :func:`judge`
    finds for classes): ``p_value`` of the label-permutation test over the ``include``d sentences' words
    (:func:`above_chance`: does the tagger give the label tags more probability than shuffled ones?) and
    ``judge_agreement`` (:func:`anchor_agreement`: do the labels agree with the tagger where it is surest?).
    Kappa over word tags cannot tell a weak tagger from labels near chance: a tagger trained on 40 sentences
    that finds 7 % of the entities agrees with fair labels at kappa 0.06. None without tagged words."""
    include = np.ones(len(word_tags), dtype=bool) if include is None else np.asarray(include, dtype=bool)
    probs, tags, _ = _pooled_words(word_probs, word_tags, include)
    if not len(tags):
        return None
    return {"p_value": above_chance(probs, tags), "judge_agreement": anchor_agreement(probs, tags)}


def span_clean_probability(doubt: np.ndarray, include: np.ndarray | None = None,
                           words_right: np.ndarray | None = None) -> np.ndarray:
    """P(a sentence's label spans are right): the held-out tagger's ``1 - doubt``, set to the right level.

    ``doubt`` is ``1 - min_w p(label tag_w)`` (slm/tagger.py ``doubt_score``); it ranks wrong sentences well
    (BC5CDR with made noise, benchmarks/results/ner_slm_plain_noisy.md: the top 15 % are 95 % wrong) but is
    far too low as a probability, the tagger being itself wrong on many words (ECE 0.21). Where ``words_right``
    (:func:`span_words_right`) is known for at least ``SPAN_CALIBRATION_MIN`` of the ``include``d
    sentences (default: all), their ``1 - doubt`` moves by one logit offset (``shift_to_mean``: the
    ranking stays) until its mean is the mean of ``words_right``, which charges the tagger's own mistakes
    to it (there: mean 0.455 against 0.512 right, ECE 0.056; the small-loss GMM this replaces: 0.354, 0.158).
    Otherwise, and for excluded sentences, ``1 - doubt``.
    """
    doubt = np.clip(np.asarray(doubt, dtype=np.float64), 0.0, 1.0)
    include = np.ones(len(doubt), dtype=bool) if include is None else np.asarray(include, dtype=bool)
    out = 1.0 - doubt
    level = (np.full(len(doubt), np.nan) if words_right is None else np.asarray(words_right, dtype=np.float64))
    known = include & np.isfinite(level)
    if known.sum() >= SPAN_CALIBRATION_MIN:
        out[include] = shift_to_mean(out[include], float(level[known].mean()))
    return out


def span_llm_evidence(scores: np.ndarray, answered: np.ndarray, confidence: np.ndarray | None) -> np.ndarray:
    """The answered sentences' scores with the LLM's own evidence on its entity list weighed in, as
    :func:`judge` weighs its confidence in a class: ``confidence`` per sentence (NaN where unknown) is the
    LLM's, averaged over every round that asked the sentence, a round whose list differed from the final one
    counting 0 (so it carries the LLM's agreement with itself across rounds; NaN without logprobs). Never
    at face value: :func:`llm_likelihood_ratio` calibrates it against the tagger's
    score, out of fold; each score's odds are multiplied by its ratio and the result pooled linearly with
    the calibrated P(right | confidence) (the two views are not independent). Unchanged where the
    confidence carries no information (a constant) or too few sentences have one."""
    out = np.asarray(scores, dtype=np.float64).copy()
    if confidence is None:
        return out
    conf = np.where(answered, np.asarray(confidence, dtype=np.float64), np.nan)
    ratio, llm_right = llm_likelihood_ratio(conf, out)
    rows = np.flatnonzero(answered & (ratio != 1.0))
    if not len(rows):
        return out
    binary = np.stack([1.0 - out[rows], out[rows]], axis=1)  # P(wrong), P(right): "right" is the label
    right = np.ones(len(rows), dtype=int)
    out[rows] = _pool_label(_weigh_label(binary, right, ratio[rows]), right, llm_right[rows])[:, 1]
    return out


def span_region_scores(llm: np.ndarray, tagger: np.ndarray, confident: np.ndarray) -> np.ndarray:
    """Each span's own score (the region score in Label Studio) from two views of it: ``llm``, the LLM's
    confidence in the span averaged over the rounds that asked its sentence (0 for a round that did not
    name it), or where a round gave no logprobs the share of rounds that named it; ``tagger``, the held-out
    tagger's score for the same span (its lowest word-tag probability), 0 where it predicts another.
    The two are averaged, which ranks wrong spans better than either (four BC5CDR runs,
    benchmarks/results/evidence_ablation_ner_regions.md). Where the LLM's view is a confidence
    (``confident``), the scores then move by one logit offset (the order stays) to its mean: the tagger's
    word probability says which spans are surer, not how sure."""
    llm, tagger = np.asarray(llm, dtype=np.float64), np.asarray(tagger, dtype=np.float64)
    confident = np.asarray(confident, dtype=bool)
    out = (llm + tagger) / 2.0
    if confident.any():
        out[confident] = shift_to_mean(out[confident], float(llm[confident].mean()))
    return out


def span_list_right(region: Sequence[Sequence[float]], missing: Sequence[Sequence[float]]) -> np.ndarray:
    """Per sentence, P(its entity list is exactly right) assembled from its spans' own scores: every span
    right (``region[i]``, :func:`span_region_scores`, NaN where unknown) and none missing (``missing[i]``:
    the held-out tagger's scores for the spans it predicts that the list lacks, each taken as P(that span is
    real)), all as if independent. NaN where a span's score is unknown. It misses what neither the LLM nor
    the tagger found, so it leans high, where the tagger's confident-learning level leans low."""
    return np.array([float(np.prod(np.asarray(r, dtype=np.float64)))
                     * float(np.prod(1.0 - np.clip(np.asarray(m, dtype=np.float64), 0.0, 1.0)))
                     for r, m in zip(region, missing)])


def judge_span_labels(labels: Sequence[Sequence[Span] | None], predicted: Sequence[Sequence[Span]],
                      doubt: np.ndarray, human: np.ndarray, word_tags: Callable[[int, Sequence[Span]], list[str]],
                      words_right: np.ndarray | None = None,
                      audit_labels: Sequence[Sequence[Span] | None] | None = None,
                      evidence: dict[str, float] | None = None, llm_confidence: np.ndarray | None = None,
                      llm_self: SelfAgreement | None = None, list_right: np.ndarray | None = None) -> SpanVerdict:
    """The verdict on span labels from the held-out tagger's spans and doubt (pure, no model).

    ``labels``: per sentence the label spans, None where the LLM gave no usable answer; ``predicted``:
    the held-out tagger's spans; ``doubt``: its doubt about the label (>= 0.5: it prefers another tag
    for some word); ``word_tags(i, spans)``: sentence i's word-level BIO tags for ``spans`` (for kappa);
    ``words_right``: :func:`span_words_right` per sentence (NaN where unknown); ``audit_labels``: a
    person's spans on the random audit sentences, None elsewhere (blind, as for labels: see :func:`judge`);
    ``evidence``: :func:`span_judge_evidence` of the round's tagger (without it, kappa alone decides);
    ``llm_confidence``: the LLM's own evidence per sentence (:func:`span_llm_evidence`); ``llm_self``: its
    agreement with itself across rounds, over word tags (near chance as for labels: :func:`_self_consistent`);
    ``list_right``: :func:`span_list_right` per sentence (NaN where unknown), from the spans' own scores of
    an LLM whose confidence is known to be calibrated.
    A sentence's score is P(its spans are right) (:func:`span_clean_probability` over the answered
    sentences, with the LLM's evidence), pooled linearly with ``list_right`` where that is known: the
    tagger's level leans low (it charges the labels with words the tagger itself gets wrong), the spans'
    own scores lean high (what neither found is never missed). It is flagged when the LLM gave no answer,
    or the score is below ``SPAN_FLAG_BELOW`` and the tagger disagrees with the label (a missing,
    spurious, wrong-type or wrong-boundary span).
    Health: agreement = share of answered sentences whose label the tagger reproduces exactly; kappa over
    the word tags of the answered sentences; estimated accuracy = mean score x coverage. Entity lists near
    chance (the permutation test of ``evidence``) are said to be so and every sentence is flagged, as for
    labels; a low kappa above chance, or labels at odds with the tagger's surest words, is the tagger's
    weakness, and run health says so.
    """
    n = len(labels)
    human = np.asarray(human, dtype=bool)
    answered = np.array([lab is not None for lab in labels]) & ~human
    judgements = [judge_spans(labels[i] or [], predicted[i]) if answered[i] else [] for i in range(n)]
    scores = np.where(answered, span_llm_evidence(span_clean_probability(doubt, answered, words_right), answered,
                                                  llm_confidence), 0.0)
    if list_right is not None:
        assembled = answered & np.isfinite(np.asarray(list_right, dtype=np.float64))
        scores[assembled] = (scores[assembled] + np.asarray(list_right, dtype=np.float64)[assembled]) / 2.0
    scores[human] = 1.0
    judged = ~human
    n_judged, n_answered = int(judged.sum()), int(answered.sum())
    coverage = n_answered / n_judged if n_judged else 1.0
    if n_answered == 0:
        health = Health(0.0, 0.0, coverage, 0.0, 0.0, "near_chance",
                        "the LLM gave no usable entity list: check the endpoint and the entity types")
    else:
        agreement = float(np.mean([not judgements[i] for i in np.flatnonzero(answered)]))
        gold_tags, pred_tags = [], []
        for i in np.flatnonzero(answered):
            gold_tags += word_tags(int(i), labels[i] or [])
            pred_tags += word_tags(int(i), predicted[i])
        kappa = kappa_or_zero(pred_tags, gold_tags)
        answered_acc = float(scores[answered].mean())
        p_value = None if evidence is None else float(evidence["p_value"])
        weak = evidence is not None and float(evidence["judge_agreement"]) < WEAK_JUDGE_BELOW
        health = _self_consistent(_verdict(answered_acc * coverage, answered_acc, coverage, agreement, kappa,
                                           "entity lists", p_value=p_value, weak_judge=weak), llm_self,
                                  "entity lists")
    disputed_at = scores.copy()  # a disputed sentence is flagged below SPAN_FLAG_BELOW (before any near-chance cap)
    if health.verdict == "near_chance":  # as for labels: say so, flag every sentence, no score above the estimate
        scores[~human] = np.minimum(scores[~human], health.answered_accuracy)
    person = audit_labels if audit_labels is not None else [None] * n
    audited = np.array([person[i] is not None for i in range(n)], dtype=bool) & ~human
    final = [labels[i] if answered[i] else predicted[i] for i in range(n)]
    llm_right = np.array([audited[i] and answered[i] and sorted(labels[i] or []) == sorted(person[i] or [])
                          for i in range(n)], dtype=bool)
    final_right = np.array([audited[i] and sorted(final[i] or []) == sorted(person[i] or []) for i in range(n)],
                           dtype=bool)
    scores_before, model_estimate = scores.copy(), health.estimated_accuracy
    if audited.sum() >= AUDIT_MIN:
        scores, health = _audit_level(scores, health, answered, audited, llm_right, final_right)
        disputed_at = scores
    reasons: list[list[str]] = []
    for i in range(n):
        if human[i]:
            reasons.append([])
            continue
        why = ["no_llm_label"] if not answered[i] else (
            sorted({j.kind for j in judgements[i]}) if judgements[i] and disputed_at[i] < SPAN_FLAG_BELOW else [])
        reasons.append(why + (["labels_near_chance"] if health.verdict == "near_chance" else []))
    flagged = np.array([bool(r) for r in reasons]) & ~human
    audit, health = _audit_said(health, audited, llm_right, final_right, scores_before, flagged, model_estimate,
                                "entity lists")
    return SpanVerdict(scores, flagged, reasons, judgements, health, audit)
