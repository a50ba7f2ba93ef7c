"""The verdict's evidence (detection.py), on simulations where gold is known: human labels, the conservative
posterior, a weak judge, run health against chance, and the LLM's logprobs calibrated before they count."""
import numpy as np
from sklearn.metrics import roc_auc_score

from freeal_backend.slm.detection import (FLAG_EXPECTED_RECALL, SELF_AGREEMENT_MIN, SelfAgreement, judge,
                                          self_agreement)


def _ece(scores: np.ndarray, right: np.ndarray) -> float:
    bins = np.clip((scores * 10).astype(int), 0, 9)
    return float(sum(abs(scores[bins == b].mean() - right[bins == b].mean()) * (bins == b).mean()
                     for b in range(10) if (bins == b).any()))


def _two_class(n: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A true class, an SLM right with the probability it gives its top class (~80 %), ``noise`` flipped labels."""
    true = rng.integers(0, 2, n)
    conf = rng.uniform(0.6, 1.0, n)
    right = rng.random(n) < conf
    p1 = np.where(right == (true == 1), conf, 1 - conf)
    return true, np.stack([1 - p1, p1], axis=1), np.where(rng.random(n) < noise, 1 - true, true)


def _weak_judge(seed: int, n: int = 1500, classes: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shape of issue 23's medical abstracts: labels ~83 % right (errors on hard texts), a small model
    ~58 % right that some texts mislead into a confident wrong class."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    hard = rng.random(n)
    other = (true + rng.integers(1, classes, n)) % classes
    labels = np.where(rng.random(n) < 2 * 0.173 * hard, other, true)
    target = np.where(rng.random(n) < 0.12, (true + rng.integers(1, classes, n)) % classes, true)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), target] += 1.6 * (1.5 - hard) + 2.5 * (target != true)
    z = 1.5 * logits
    p = np.exp(z - z.max(1, keepdims=True))
    return true, p / p.sum(1, keepdims=True), labels


def test_human_labels_with_in_sample_probabilities_do_not_hide_the_noise():
    """Human rows are trained on in every fold: their near one-hot probabilities must not make the
    anchor-point transition look noiseless (issue 23: overrules fell from 19 to 3 with 10 % human labels)."""
    rng = np.random.default_rng(5)
    true, probs, labels = _two_class(3000, rng, noise=0.15)
    base = judge(probs, labels)
    human = rng.random(3000) < 0.1
    labels_h = np.where(human, true, labels)
    probs_h = probs.copy()
    probs_h[human] = np.where(np.arange(2) == true[human, None], 0.999, 0.001)  # in sample: memorised
    j = judge(probs_h, labels_h, human)
    overruled = (j.labels != labels_h) & ~human
    assert (base.labels != labels).sum() >= 5
    assert overruled.sum() >= 0.6 * (base.labels[~human] != labels[~human]).sum()


def test_an_overruled_label_goes_where_both_posteriors_agree():
    from freeal_backend.slm.detection import overrule

    labels = np.array([0, 0, 0, 1])
    plain = np.array([[0.1, 0.2, 0.7], [0.01, 0.98, 0.01], [0.6, 0.3, 0.1], [0.0, 0.5, 0.5]])
    conservative = np.array([[0.0, 0.995, 0.005], [0.001, 0.995, 0.004], [0.0, 0.995, 0.005], [0.0, 0.005, 0.995]])
    final = overrule(labels, plain, conservative)
    assert final.tolist() == [0, 1, 0, 1]  # row 0: plain says 2, conservative 1: no agreement, the label stays


def test_a_weak_judge_does_not_overrule_and_its_scores_say_it_knows_little():
    for seed in range(2):
        true, probs, labels = _weak_judge(seed)
        assert 0.8 < (labels == true).mean() < 0.86 and 0.5 < (probs.argmax(1) == true).mean() < 0.65
        j = judge(probs, labels)
        switched = j.labels != labels
        fixed, broke = (switched & (j.labels == true)).sum(), (switched & (labels == true)).sum()
        assert broke <= fixed  # overrules never break more labels than they fix
        right = j.labels == true
        assert right.mean() >= (labels == true).mean()
        # before: ECE 0.19 and an estimate 0.20 below the truth; a misled judge cannot be told from bad labels
        # by agreement alone, so these stay loose (see the report in issue 23)
        assert _ece(j.scores, right) < 0.15
        assert abs(j.health.estimated_accuracy - (labels == true).mean()) < 0.15
        assert j.health.weak_side == "judge" and "small model" in j.health.message


def test_rare_class_with_a_weak_judge_blames_the_judge_not_the_labels():
    """Issue 23: a 5 % minority class, labels 97 % right, a small model that barely sees the minority:
    kappa is low, but far above what label permutations reach, so the labels are not near chance."""
    rng = np.random.default_rng(7)
    n = 3000
    true = (rng.random(n) < 0.05).astype(int)
    labels = np.where(rng.random(n) < 0.03, 1 - true, true)
    p1 = np.clip(0.05 + 0.06 * true + rng.normal(0, 0.03, n), 0.001, 0.999)  # leans to the minority, never crosses
    p1[rng.random(n) < 0.02] = 0.6
    j = judge(np.stack([1 - p1, p1], 1), labels)
    assert j.health.kappa < 0.2
    assert j.health.verdict != "near_chance" and not j.flagged.all()
    assert j.health.weak_side == "judge" and "stronger LLM" not in j.health.message
    assert "small model" in j.health.message


def test_labels_the_judge_cannot_tell_from_permutations_are_near_chance():
    rng = np.random.default_rng(8)
    probs = rng.dirichlet([1, 1, 1], 900)
    labels = rng.integers(0, 3, 900)
    j = judge(probs, labels)
    assert j.health.verdict == "near_chance" and j.health.weak_side == "labels" and j.flagged.all()


def _with_logprobs(rng: np.random.Generator, informative: bool) -> tuple[np.ndarray, ...]:
    true, probs, labels = _two_class(3000, rng, noise=0.15)
    n = len(labels)
    if informative:  # the LLM is less sure of its wrong labels
        conf = np.where(labels == true, rng.uniform(0.7, 1.0, n), rng.uniform(0.5, 0.85, n))
    else:
        conf = np.full(n, 0.99)
    llm = np.zeros((n, 2))
    llm[np.arange(n), labels] = conf
    llm[np.arange(n), 1 - labels] = 1 - conf
    return true, probs, labels, llm


def test_uninformative_logprobs_change_nothing():
    """Issue 22: with 0.99 on every answer, estimated accuracy went 0.80 -> 0.93 and ECE 0.04 -> 0.10."""
    true, probs, labels, llm = _with_logprobs(np.random.default_rng(9), informative=False)
    plain, with_llm = judge(probs, labels), judge(probs, labels, llm_probs=llm)
    wrong = labels != true
    idx = np.arange(len(labels))
    assert abs(with_llm.health.estimated_accuracy - plain.health.estimated_accuracy) < 0.01
    assert abs(_ece(with_llm.scores, with_llm.labels == true) - _ece(plain.scores, plain.labels == true)) < 0.01
    low = lambda j: (j.posterior[idx, labels][wrong] < 0.5).mean()  # noqa: E731
    assert low(with_llm) > low(plain) - 0.02


def test_informative_logprobs_help():
    true, probs, labels, llm = _with_logprobs(np.random.default_rng(10), informative=True)
    plain, with_llm = judge(probs, labels), judge(probs, labels, llm_probs=llm)
    wrong = labels != true
    idx = np.arange(len(labels))
    auc = lambda j: roc_auc_score(wrong, -j.posterior[idx, labels])  # noqa: E731
    assert auc(with_llm) > auc(plain) + 0.03
    assert _ece(with_llm.scores, with_llm.labels == true) < 0.08
    assert (with_llm.labels == true).mean() >= (plain.labels == true).mean() - 0.002


def test_informative_logprobs_choose_what_the_flag_holds():
    """The flag must use all the evidence: with the LLM's confidence proven informative, a flag of the same
    size as the small model's alone holds clearly more of the wrong labels (the main job's flag held 50 % of
    them while its score ranked them better than the small model did)."""
    true, probs, labels, llm = _with_logprobs(np.random.default_rng(11), informative=True)
    plain, with_llm = judge(probs, labels), judge(probs, labels, llm_probs=llm)
    wrong = labels != true
    recall = lambda j: (j.flagged & wrong).sum() / wrong.sum()  # noqa: E731
    assert with_llm.flagged.mean() <= plain.flagged.mean() + 0.01
    assert recall(with_llm) > recall(plain) + 0.05


def test_good_labels_and_a_loose_judge_are_not_called_poor():
    """The main job (160 SST-2 texts): labels 88 % right, a small model 72 % right, an estimate of 81 % and
    kappa 0.33, which a weak judge produces as readily as weak labels: the labels must not be called poor
    (it said "the LLM labels look poor ... consider a stronger LLM endpoint" of labels 88 % right)."""
    from freeal_backend.slm.detection import _verdict

    health = _verdict(0.81, 0.81, 1.0, 0.66, 0.33, "labels", p_value=0.005)
    assert health.verdict == "ok" and "look poor" not in health.message and "loosely" in health.message
    poor = _verdict(0.70, 0.70, 1.0, 0.60, 0.33, "labels", p_value=0.005)  # a low estimate still is poor
    assert poor.verdict == "poor" and "look poor" in poor.message


def test_a_confident_llm_keeps_a_label_the_small_model_is_misled_on_out_of_certain_doubt():
    """Live runs: the small model, trained on the LLM's labels, confidently contradicts some labels that are
    right, and the product of its evidence and the LLM's scored them ~0.01 (right 58-73 % of the time; final
    score ECE 0.13 where the LLM's own confidence had 0.05-0.07). The LLM's calibrated confidence is pooled
    with the posterior (a linear pool), so such a label is doubted, not written off."""
    rng = np.random.default_rng(0)
    n = 1500
    true = rng.integers(0, 2, n)
    wrong = rng.random(n) < 0.15
    labels = np.where(wrong, 1 - true, true)
    misled = rng.random(n) < 0.12  # the small model is confidently against the label, right or not
    p_true = np.clip(rng.beta(6, 2, n), 0.02, 0.99)
    p_label = np.where(misled, rng.uniform(0.005, 0.03, n), np.where(wrong, 1 - p_true, p_true))
    probs = np.stack([np.where(labels == 0, p_label, 1 - p_label), np.where(labels == 1, p_label, 1 - p_label)], 1)
    conf = np.where(wrong, rng.uniform(0.5, 0.85, n), rng.uniform(0.7, 1.0, n))  # informative
    llm = np.zeros((n, 2))
    llm[np.arange(n), labels], llm[np.arange(n), 1 - labels] = conf, 1 - conf
    j = judge(probs, labels, llm_probs=llm)
    right = j.labels == true
    assert j.scores[misled & ~wrong].mean() > 0.3  # the product gave them 0.13
    assert roc_auc_score(~right, -j.scores) > 0.9
    assert (j.flagged & ~right).sum() / (~right).sum() > 0.8  # the wrong ones are still flagged


def _consistent_errors(seed: int, n: int = 1500, classes: int = 4) -> tuple[np.ndarray, ...]:
    """The shape of TREC with the 0.5B LLM: labels ~50 % right, the wrong ones mostly a consistent mistake
    (class c read as c + 1), which the small model, trained on those labels, learnt: out of sample it backs
    the label, right or wrong. The LLM's own confidence is informative and, as LLMs are, somewhat high."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    wrong = rng.random(n) < 0.5
    labels = np.where(wrong, (true + 1) % classes, true)
    backs = rng.random(n) < 0.85  # the small model's top class is the label
    top = np.where(backs, labels, (labels + rng.integers(1, classes, n)) % classes)
    logits = rng.normal(0, 0.5, (n, classes))
    logits[np.arange(n), top] += rng.uniform(1.5, 4.0, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    conf = np.where(wrong, rng.uniform(0.25, 0.65, n), rng.uniform(0.45, 0.95, n))  # ~0.1 too high on average
    llm = np.tile(((1 - conf) / (classes - 1))[:, None], (1, classes))
    llm[np.arange(n), labels] = conf
    return true, probs, labels, llm


def test_a_small_model_that_learnt_the_llms_consistent_errors_does_not_vouch_for_them():
    """Live TREC runs (labels 46-50 % right): the small model learnt the LLM's consistent mistakes, so run
    health said 81-82 % right and the final score's ECE was 0.35-0.38, while the LLM's own confidence had an
    ECE of 0.10. Both views tend to overrate the labels; the lower figure must count, and the scores must
    move down to it without changing their order."""
    true, probs, labels, llm = _consistent_errors(0)
    capped, uncapped = judge(probs, labels, llm_probs=llm), judge(probs, labels, llm_probs=llm, cap=False)
    truth = (labels == true).mean()
    assert uncapped.health.estimated_accuracy > truth + 0.2  # what the product said before
    assert abs(capped.health.estimated_accuracy - truth) < 0.15
    assert capped.health.verdict == "poor" and "own confidence" in capped.health.message
    right = capped.labels == true
    assert (capped.labels == uncapped.labels).all()
    assert _ece(capped.scores, right) < _ece(uncapped.scores, right) - 0.1
    assert roc_auc_score(~right, -capped.scores) == roc_auc_score(~right, -uncapped.scores)
    idx = np.arange(len(labels))
    assert np.allclose(capped.posterior[idx, capped.labels], capped.scores)


def test_an_llm_surer_than_the_small_model_does_not_raise_the_estimate():
    true, probs, labels, llm = _with_logprobs(np.random.default_rng(12), informative=True)
    llm[np.arange(len(labels)), labels] = np.clip(llm[np.arange(len(labels)), labels] + 0.1, 0, 0.999)
    llm[np.arange(len(labels)), 1 - labels] = 1 - llm[np.arange(len(labels)), labels]
    capped, uncapped = judge(probs, labels, llm_probs=llm), judge(probs, labels, llm_probs=llm, cap=False)
    assert capped.health.estimated_accuracy == uncapped.health.estimated_accuracy
    assert np.array_equal(capped.scores, uncapped.scores)


def _calibrated_llm(rng: np.random.Generator, n: int, sure: tuple[float, float], learnt: float, peak: int = 2
                    ) -> tuple[np.ndarray, ...]:
    """An LLM right with the probability it gives its answer (~92 %; the higher ``peak``, the more of its
    answers are near-certain), and a small model right with the probability it gives its top class
    (``sure``), except that on a share ``learnt`` of the LLM's wrong labels it learnt the LLM's answer
    (trained on those labels, as in a FreeAL run)."""
    true = rng.integers(0, 2, n)
    conf = 1 - (peak + 1) / 12 * rng.random(n) ** peak
    labels = np.where(rng.random(n) < conf, true, 1 - true)
    p_top = rng.uniform(*sure, n)
    lean = np.where((labels != true) & (rng.random(n) < learnt), labels,
                    np.where(rng.random(n) < p_top, true, 1 - true))
    p1 = np.where(lean == 1, p_top, 1 - p_top)
    llm = np.zeros((n, 2))
    llm[np.arange(n), labels], llm[np.arange(n), 1 - labels] = conf, 1 - conf
    return true, np.stack([1 - p1, p1], axis=1), labels, llm, conf


def test_an_llm_known_to_be_calibrated_sets_the_level_up_as_well():
    """The embedded 1.5B's confidence is calibrated (main job: its mean within 1 point of the truth) while
    the small model's estimate was 10-26 points low. Its level must count, up as well as down (labels and
    order kept where the small model is not outranked); for an LLM not known to be calibrated the lower
    figure still counts."""
    true, probs, labels, llm, _ = _calibrated_llm(np.random.default_rng(0), 2000, (0.85, 1.0), 0.0)
    unknown, known = judge(probs, labels, llm_probs=llm), judge(probs, labels, llm_probs=llm, llm_calibrated=True)
    truth = (labels == true).mean()
    assert unknown.health.estimated_accuracy < truth - 0.03
    assert abs(known.health.estimated_accuracy - truth) < 0.01 and known.health.weak_side != "judge"
    assert (known.labels == unknown.labels).all()
    assert np.array_equal(np.argsort(known.scores, kind="stable"), np.argsort(unknown.scores, kind="stable"))


def test_a_small_model_a_calibrated_llm_outranks_overrules_nothing_and_its_confidence_scores():
    """Main jobs and loops with the 1.5B: labels 90-94 % right, a small model trained on 160-300 of them that
    agrees with 67-80 % (so it is at most ~85 % right) and learnt many of the LLM's errors; pooled with it,
    the LLM's confidence ranked the wrong labels worse (AUROC 0.72-0.87 against 0.80-0.94 alone) and the
    score's ECE was 0.11-0.25 before the LLM's level counted. Such a judge overrules nothing, and each score
    is the LLM's own calibrated confidence; for an LLM not known to be calibrated run health names its figure."""
    true, probs, labels, llm, conf = _calibrated_llm(np.random.default_rng(0), 2000, (0.55, 0.95), 0.7)
    unknown, known = judge(probs, labels, llm_probs=llm), judge(probs, labels, llm_probs=llm, llm_calibrated=True)
    truth, wrong = (labels == true).mean(), labels != true
    assert unknown.health.estimated_accuracy < truth - 0.05 and "FREEAL_LLM_CALIBRATED" in unknown.health.message
    assert abs(known.health.estimated_accuracy - truth) < 0.02
    assert known.health.weak_side == "judge" and "at most" in known.health.message
    assert (known.labels == labels).all() and np.allclose(known.scores, conf)
    assert _ece(known.scores, known.labels == true) < 0.05 < _ece(unknown.scores, unknown.labels == true)
    assert roc_auc_score(wrong, -known.scores) > roc_auc_score(unknown.labels != true, -unknown.scores) + 0.05


def test_an_outranked_small_model_does_not_size_the_flag():
    """Main job with the 1.5B, seed 2: the small model agreed with 61 % of the labels, cleanlab on its view
    found 55 issues among 160 texts (34 % flagged where 8 % were wrong). A judge the LLM outranks sizes
    nothing: the flag is the fewest lowest-scored texts expected (by the calibrated scores) to hold
    ``FLAG_EXPECTED_RECALL`` of the wrong labels, and so it holds most of them in a small share (the 1.5B's
    confidences: median 0.99, a tenth below 0.72-0.75; here 0.69)."""
    true, probs, labels, llm, conf = _calibrated_llm(np.random.default_rng(0), 2000, (0.5, 0.8), 0.7, peak=6)
    assert abs(np.median(conf) - 0.99) < 0.01 and 0.65 < np.quantile(conf, 0.1) < 0.76
    verdict = judge(probs, labels, llm_probs=llm, llm_calibrated=True)
    wrong = labels != true
    assert verdict.health.weak_side == "judge" and "at most" in verdict.health.message
    assert verdict.flagged.mean() < 0.2 and (verdict.flagged & wrong).sum() > 0.6 * wrong.sum()
    expected_wrong = 1 - verdict.scores
    held = expected_wrong[verdict.flagged].sum() / expected_wrong.sum()
    assert FLAG_EXPECTED_RECALL <= held < FLAG_EXPECTED_RECALL + expected_wrong[verdict.flagged].max() / expected_wrong.sum()
    assert "expected to hold" in verdict.health.message


def test_an_outranked_small_model_leaves_the_label_to_the_llms_rounds_averaged():
    """The loops with the 1.5B: where a calibrated LLM outranks the small model, each score is the LLM's
    probability of the label averaged over the rounds that asked the text; the label was its last answer,
    so where the rounds disagreed a label could score below 0.5 while the other class scored above it (on the
    SST-2 and MR loops taking the averaged label instead raised the labels by 1.3 and 1.2 points,
    refinement_why_loop_n300_1.5b.md). The label must be the one the averaged probabilities favour, said so
    in the reasons; ``average_rounds=False`` keeps the last answer (ablations)."""
    rng = np.random.default_rng(1)
    true, probs, last, llm_last, _ = _calibrated_llm(rng, 2000, (0.5, 0.8), 0.7)
    conf0 = 1 - 0.25 * rng.random(len(true)) ** 2  # an earlier round with other demonstrations, as calibrated
    first = np.where(rng.random(len(true)) < conf0, true, 1 - true)
    llm_first = np.zeros_like(llm_last)
    llm_first[np.arange(len(true)), first], llm_first[np.arange(len(true)), 1 - first] = conf0, 1 - conf0
    same = rng.random(len(true)) < 0.7  # the same LLM on the same text: mostly the same answer
    averaged = (np.where(same[:, None], llm_last, llm_first) + llm_last) / 2
    kept = judge(probs, last, llm_probs=averaged, llm_calibrated=True, average_rounds=False)
    verdict = judge(probs, last, llm_probs=averaged, llm_calibrated=True)
    assert kept.health.weak_side == verdict.health.weak_side == "judge"  # outranked either way
    assert (kept.labels == last).all() and (kept.scores < 0.5).any()
    assert np.array_equal(verdict.labels, averaged.argmax(axis=1)) and (verdict.scores >= 0.5).all()
    switched = verdict.labels != last
    assert switched.any() and all("llm_rounds_disagree" in verdict.reasons[i]
                                  for i in np.flatnonzero(switched & verdict.flagged))
    assert not any("slm_overrules_llm" in r for r in verdict.reasons)
    assert (verdict.labels == true).mean() > (last == true).mean() + 0.01
    assert _ece(verdict.scores, verdict.labels == true) <= _ece(kept.scores, last == true) + 0.005
    # where rounds err independently their average is underconfident (here 1 point more than the last answers')
    assert abs(verdict.health.estimated_accuracy - (verdict.labels == true).mean()) < 0.04


def test_without_llm_confidence_scores_are_pooled_with_the_run_estimate():
    """The posterior counts the small model as independent of the labeller's errors; one that learnt them
    (it leans to the label given on the hard texts the labeller gets wrong) and errs on its own elsewhere
    makes the posterior's extremes too extreme. Without the LLM's confidence, each score is pooled with the
    run's estimated accuracy: the same labels and order, a calibration error clearly lower (0.20 -> 0.13)."""
    rng = np.random.default_rng(0)
    n = 3000
    true = rng.integers(0, 2, n)
    hard = rng.random(n) < 0.25
    labels = np.where(hard & (rng.random(n) < 0.5), 1 - true, true)
    lean = np.where(hard, labels, np.where(rng.random(n) < 0.85, true, 1 - true))
    conf = rng.uniform(0.7, 0.99, n)
    p1 = np.where(lean == 1, conf, 1 - conf)
    probs = np.stack([1 - p1, p1], axis=1)
    pooled, plain = judge(probs, labels), judge(probs, labels, pool=False)
    assert (pooled.labels == plain.labels).all()
    assert np.array_equal(np.argsort(pooled.scores, kind="stable"), np.argsort(plain.scores, kind="stable"))
    assert _ece(pooled.scores, pooled.labels == true) < _ece(plain.scores, plain.labels == true) - 0.05


def _unsure_judge(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shape of a 300-text MR project judged with gpt-3.5's labels (~92 % right): a small model ~66 % right
    and unsure of nearly every text."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, n)
    p_true = 1 / (1 + np.exp(-rng.normal(0.5, 1.0, n)))
    p1 = np.where(true == 1, p_true, 1 - p_true)
    return true, np.stack([1 - p1, p1], 1), np.where(rng.random(n) < 0.92, true, 1 - true)


def test_a_judge_too_unsure_to_tell_does_not_call_good_labels_poor():
    """Three 300-text MR projects with gpt-3.5's labels (89-92 % right): run health said "the LLM labels look
    poor (estimated 70 % right)" on two of them, where the small model was 63-69 % right. Where the labels look
    poor only by the small model's unsure texts, and not by those it is surest of, it cannot tell poor labels
    from its own weakness: the labels keep their word and the figure is the surest texts' one."""
    for seed in (1, 2):
        true, probs, labels = _unsure_judge(seed)
        j = judge(probs, labels)
        truth = (labels == true).mean()
        assert j.health.verdict != "poor" and "look poor" not in j.health.message
        assert j.health.weak_side == "judge" and "too unsure" in j.health.message
        assert np.array_equal(j.labels, labels)  # nothing overruled
        assert abs(j.health.estimated_accuracy - truth) < 0.1


def test_labels_poor_by_the_judges_surest_texts_too_stay_poor():
    from freeal_backend.slm.detection import _verdict

    poor = _verdict(0.70, 0.70, 1.0, 0.60, 0.45, "labels", p_value=0.005, upper=0.72)
    assert poor.verdict == "poor" and "look poor" in poor.message and poor.weak_side == "labels"
    unsure = _verdict(0.70, 0.70, 1.0, 0.60, 0.45, "labels", p_value=0.005, upper=0.86)
    assert unsure.verdict == "ok" and unsure.weak_side == "judge" and unsure.estimated_accuracy == 0.86


def _one_sided(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SUBJ with the 1.5B: balanced truth, an LLM that gives class 0 to ~88 % of the texts and is barely right
    (~55 %), and a small model that learnt that balance and a little of the labels' text signal."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, n)
    labels = np.where(rng.random(n) < 0.88, 0, true)
    p1 = np.clip(0.12 + 0.10 * labels + rng.normal(0, 0.04, n), 0.01, 0.99)
    return true, np.stack([1 - p1, p1], 1), labels


def test_an_llm_that_disagrees_with_itself_is_near_chance_whatever_the_small_model_learnt():
    """Last session's SUBJ runs: run health said 99 % right where 54 % were, because the small model learnt
    the LLM's one-sided balance (above chance by permutations). Asked again with other demonstrations, that
    LLM changed many answers (kappa 0.16-0.20): its labels are near chance."""
    true, probs, labels = _one_sided(3)
    alone = judge(probs, labels)
    assert alone.health.verdict != "near_chance" and alone.health.estimated_accuracy > 0.7  # the defect
    assert (labels == true).mean() < 0.6
    j = judge(probs, labels, llm_self=SelfAgreement(texts=250, changed=45, kappa=0.18))
    assert j.health.verdict == "near_chance" and j.health.weak_side == "labels" and j.flagged[labels >= 0].all()
    assert j.health.estimated_accuracy == 0.5 and j.health.llm_self_kappa == 0.18
    assert "changed its answer on 45" in j.health.message and "stronger LLM" in j.health.message


def test_an_llm_consistent_with_itself_keeps_the_verdict():
    """The same judgement with an LLM that agrees with itself (SST-2 and MR: kappa 0.82-0.93), or with too
    few texts asked twice to tell: run health as without it, the figure kept."""
    true, probs, labels = _one_sided(3)
    alone = judge(probs, labels)
    for llm_self in (SelfAgreement(250, 12, 0.85), SelfAgreement(SELF_AGREEMENT_MIN - 1, 30, 0.05)):
        j = judge(probs, labels, llm_self=llm_self)
        assert j.health.verdict == alone.health.verdict and j.health.message == alone.health.message
        assert j.health.estimated_accuracy == alone.health.estimated_accuracy
        assert j.health.llm_self_kappa == llm_self.kappa
        assert (j.flagged == alone.flagged).all()


def test_self_agreement_counts_changes_and_kappa():
    first = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    assert self_agreement(first, first) == SelfAgreement(8, 0, 1.0)
    out = self_agreement(first, np.array([0, 1, 1, 0, 2, 2, 0, 1]))
    assert out.texts == 8 and out.changed == 2 and 0.5 < out.kappa < 0.9
    assert self_agreement(np.array([], dtype=int), np.array([], dtype=int)) == SelfAgreement(0, 0, 0.0)
    assert self_agreement(np.zeros(60, dtype=int), np.r_[np.zeros(59, dtype=int), 1]).kappa == 0.0


def test_run_health_keeps_the_llms_self_agreement_when_its_confidence_sets_the_level():
    """Seen on a SUBJ loop: the calibrated LLM's confidence rebuilt run health and dropped the kappa."""
    _, probs, labels, llm, _ = _calibrated_llm(np.random.default_rng(1), 600, (0.7, 0.95), 0.3)
    for calibrated in (False, True):
        j = judge(probs, labels, llm_probs=llm, llm_calibrated=calibrated, llm_self=SelfAgreement(400, 30, 0.83))
        assert j.health.llm_self_kappa == 0.83 and j.health.verdict != "near_chance"


def test_a_refinement_that_fixed_many_answers_is_not_called_near_chance():
    """Round 0 with poor demonstrations, a refinement that fixed many of its answers: the two answers agree
    little (kappa 0.25), but the small model learnt the refined labels, so the verdict stands."""
    _, probs, labels = _two_class(600, np.random.default_rng(4), 0.1)
    alone = judge(probs, labels)
    j = judge(probs, labels, llm_self=SelfAgreement(500, 150, 0.25))
    assert alone.health.kappa >= 0.2 and j.health.verdict == alone.health.verdict != "near_chance"
    assert j.health.estimated_accuracy == alone.health.estimated_accuracy and j.health.llm_self_kappa == 0.25


def test_every_verdict_carries_its_evidence():
    """``_verdict`` rebuilt run health without the permutation test's p-value and the LLM's self-kappa, so
    every caller had to put them back by hand (one forgot the self-kappa: the SUBJ loop lost it). Each of its
    branches now keeps both."""
    from freeal_backend.slm.detection import _verdict

    cases = [dict(kappa=0.05, p_value=0.5),  # near chance
             dict(kappa=0.30, p_value=0.005, weak_judge=True),  # weak judge
             dict(est=0.70, kappa=0.45, p_value=0.005, upper=0.86),  # too unsure
             dict(kappa=0.33, p_value=0.005),  # loose
             dict(est=0.70, kappa=0.45, p_value=0.005),  # poor
             dict(kappa=0.7, p_value=0.005)]  # ok
    verdicts = set()
    for case in cases:
        est = case.pop("est", 0.85)
        health = _verdict(est, est, 1.0, 0.8, case.pop("kappa"), "labels", llm_self_kappa=0.6, **case)
        assert health.p_value == case["p_value"] and health.llm_self_kappa == 0.6
        verdicts.add((health.verdict, health.weak_side, health.message[:45]))
    assert len(verdicts) == len(cases)  # each case took another branch
