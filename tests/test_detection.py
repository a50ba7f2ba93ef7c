"""The verdict on labels (detection.py): final label, score order, flag and run health, on arrays."""
from collections.abc import Callable

import numpy as np
import pytest

from freeal_backend.slm.detection import judge, temperature_scale


def _two_class(n: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A true class, a calibrated SLM (right with the probability it gives its top class, ~80 % on
    average), and labels with ``noise`` of them flipped."""
    true = rng.integers(0, 2, n)
    conf = rng.uniform(0.6, 1.0, n)
    right = rng.random(n) < conf
    p1 = np.where(right == (true == 1), conf, 1 - conf)
    probs = np.stack([1 - p1, p1], axis=1)
    labels = np.where(rng.random(n) < noise, 1 - true, true)
    return true, probs, labels


def test_unanswered_first_then_wrong_looking_and_human_last():
    kinds_probs = [[0.98, 0.02], [0.03, 0.97], [0.6, 0.4], [0.01, 0.99], [0.2, 0.8]]
    kinds_labels = [0, 1, 0, 0, -1]  # agreed, agreed, doubtful, contradicted, unanswered
    probs = np.array(kinds_probs * 40)
    labels = np.array(kinds_labels * 40)
    kinds = np.arange(len(labels)) % 5
    # most of the texts the SLM is surest of agree with their label (an LLM errs on hard texts; were most
    # of them contradicted, the SLM would be the one misled); one in eight is contradicted
    labels[(kinds == 3) & (np.arange(len(labels)) // 5 % 8 != 0)] = 1
    kinds[(kinds == 3) & (labels == 1)] = 1
    human = np.zeros(len(labels), dtype=bool)
    human[:4] = True  # a person labelled the first text of each answered kind
    j = judge(probs, labels, human)
    judged = np.argsort(j.scores, kind="stable")
    judged = judged[~human[judged]]
    assert (j.labels[kinds == 4] == 1).all() and all("no_llm_label" in j.reasons[i] for i in np.flatnonzero(kinds == 4))
    assert j.flagged[kinds == 4].all()  # a text with no LLM label is always in the review tab
    contradicted = (kinds == 3) & ~human
    assert (j.labels[contradicted] == 1).all()  # the label the SLM all but rules out is overruled ...
    assert all("slm_overrules_llm" in j.reasons[i] for i in np.flatnonzero(contradicted))
    agreed = np.isin(kinds, [0, 1]) & ~human
    doubtful = (kinds == 2) & ~human
    assert j.scores[doubtful].max() < j.scores[agreed].min()  # ... the doubtful one scores lower
    assert not j.flagged[(kinds == 1) & ~human].any()  # and a sure one is not flagged
    assert (j.scores[human] == 1.0).all() and not j.flagged[human].any()
    assert (j.labels[human] == labels[human]).all()


def test_strong_evidence_overrules_the_llm_and_weak_evidence_does_not():
    rng = np.random.default_rng(0)
    true, probs, labels = _two_class(2000, rng, noise=0.1)
    probs[0], labels[0] = [0.001, 0.999], 0  # the SLM is all but certain the label is wrong
    probs[1], labels[1] = [0.35, 0.65], 0  # mild doubt only
    j = judge(probs, labels)
    assert j.labels[0] == 1 and j.flagged[0] and "slm_overrules_llm" in j.reasons[0]
    assert j.labels[1] == 0
    switched = j.labels != labels
    assert 0 < switched.mean() < 0.2  # the LLM label stays the rule, not the exception


def test_flag_and_score_find_the_wrong_labels_and_score_is_calibrated():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    true, probs, labels = _two_class(4000, rng, noise=0.15)
    j = judge(probs, labels)
    wrong_given = labels != true
    assert roc_auc_score(wrong_given, -j.posterior[np.arange(len(labels)), labels]) > 0.75
    assert j.flagged[wrong_given].mean() > 3 * j.flagged[~wrong_given].mean()
    right_final = j.labels == true
    assert right_final.mean() >= (labels == true).mean() - 0.005  # never worse than keeping every label
    bins = np.clip((j.scores * 10).astype(int), 0, 9)
    ece = sum(abs(j.scores[bins == b].mean() - right_final[bins == b].mean()) * (bins == b).mean()
              for b in range(10) if (bins == b).any())
    assert ece < 0.12  # keeping every label at a constant score would be off by about 0.15
    assert j.health.verdict == "ok"
    # cleanlab's noise estimate runs high when the SLM is weaker than the labels (80 % vs 85 % here)
    assert j.health.estimated_accuracy == pytest.approx((labels == true).mean(), abs=0.1)


def test_a_text_with_no_llm_label_is_scored_by_what_the_small_model_knows():
    """Its label is the small model's and its score the posterior of that label, like any other text's: on
    the MR replay a floor below every answered text put 384 texts labelled 62 % right at score 0, the
    largest part of the score's calibration error (0.085 -> 0.061 without it) and 3 points of the budget
    curve's error. They stay flagged ("no_llm_label"), so the review tab holds them all the same."""
    rng = np.random.default_rng(5)
    true, probs, labels = _two_class(3000, rng, noise=0.1)
    unanswered = rng.random(3000) < 0.1
    labels = np.where(unanswered, -1, labels)
    j = judge(probs, labels)
    right = j.labels == true
    assert j.flagged[unanswered].all() and all("no_llm_label" in j.reasons[i] for i in np.flatnonzero(unanswered))
    assert np.allclose(j.scores[unanswered], j.posterior[unanswered].max(axis=1))
    assert j.scores[unanswered].mean() == pytest.approx(right[unanswered].mean(), abs=0.06)  # ~0.8, not ~0


def test_near_chance_labels_are_said_to_be_so_and_everything_is_flagged():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet([1, 1, 1, 1, 1, 1], 600)
    labels = rng.integers(0, 6, 600)
    j = judge(probs, labels)
    assert j.health.verdict == "near_chance" and "stronger LLM" in j.health.message
    assert j.flagged.all()


def test_llm_logprobs_weigh_in_once_they_prove_informative():
    rng = np.random.default_rng(3)
    true, probs, labels = _two_class(1000, rng, noise=0.1)
    probs[0], labels[0] = [0.015, 0.985], 0  # strong evidence against the label, just short of overruling it
    conf = np.where(labels == true, rng.uniform(0.7, 1.0, 1000), rng.uniform(0.5, 0.8, 1000))  # unsure when wrong
    llm = np.zeros((1000, 2))
    llm[np.arange(1000), labels] = conf
    llm[np.arange(1000), 1 - labels] = 1 - conf
    sure, unsure = llm.copy(), llm.copy()
    sure[0], unsure[0] = [0.99, 0.01], [0.51, 0.49]
    assert judge(probs, labels, llm_probs=sure).labels[0] == 0  # a sure LLM keeps its label
    assert judge(probs, labels, llm_probs=unsure).labels[0] == 1  # an unsure one is overruled
    constant = np.zeros((1000, 2))
    constant[np.arange(1000), labels] = 0.99
    constant[0] = [0.51, 0.49]  # one unsure answer among constant ones proves nothing about the LLM
    assert judge(probs, labels, llm_probs=constant).labels[0] == judge(probs, labels).labels[0] == 0


def test_temperature_scaling_softens_overconfident_probabilities():
    rng = np.random.default_rng(4)
    n = 3000
    labels = rng.integers(0, 2, n)
    right = rng.random(n) < 0.8  # 80 % right but always 99 % sure
    p1 = np.where(right == (labels == 1), 0.99, 0.01)
    scaled, t = temperature_scale(np.stack([1 - p1, p1], 1), labels)
    assert t > 1 and scaled.max(1).mean() == pytest.approx(0.8, abs=0.03)


def _bimodal_doubt(rng: np.random.Generator, n_right: int, n_wrong: int) -> np.ndarray:
    """Held-out doubt of labels the tagger reproduces (worst word loss ~ 0.02) and of wrong ones (~ 2)."""
    loss = np.concatenate([np.exp(rng.normal(np.log(0.02), 0.8, n_right)),
                           np.exp(rng.normal(np.log(2.0), 0.6, n_wrong))])
    return 1.0 - np.exp(-loss)


def _weak_tagger_run(rng: np.random.Generator, n: int = 600, words: int = 12, wrong: float = 0.5,
                     tagger_errs: float = 0.04) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Word tag probabilities of a held-out tagger (tags O, B, I) that is itself wrong on ``tagger_errs`` of
    the words, right and wrong labels alike, and label tags of which ``wrong`` of the sentences hold one
    wrong tag: (probs, label tags, sentence right)."""
    probs, tags, right = [], [], []
    for _ in range(n):
        true = np.zeros(words, dtype=int)
        start = rng.integers(0, words - 2)
        true[start], true[start + 1] = 1, 2
        label = true.copy()
        ok = rng.random() >= wrong
        if not ok:
            w = rng.integers(words)
            label[w] = rng.choice([c for c in range(3) if c != true[w]])
        p = np.full((words, 3), 0.02)
        p[np.arange(words), true] = 0.96
        for w in np.flatnonzero(rng.random(words) < tagger_errs):
            other = rng.choice([c for c in range(3) if c != true[w]])
            p[w] = 0.05
            p[w, other] = rng.uniform(0.5, 0.9)
            p[w, true[w]] = 1.0 - p[w].sum() + p[w, true[w]]
        p = p + 0.1 * rng.dirichlet(np.full(3, 0.5), words)
        probs.append(p / p.sum(axis=1, keepdims=True))
        tags.append(label)
        right.append(ok)
    return probs, tags, np.array(right)


def test_span_score_is_set_to_the_level_word_level_confident_learning_finds() -> None:
    """A tagger wrong on 4 % of the words doubts many right labels: its ``1 - doubt`` (and the small-loss GMM
    over its worst word's loss, the score before) put the share of right sentences near 0.3 where 0.53 are
    right. Confident learning over the words charges the tagger's own mistakes to it."""
    from freeal_backend.slm.detection import span_clean_probability, span_words_right

    probs, tags, right = _weak_tagger_run(np.random.default_rng(0))
    doubt = np.array([1.0 - p[np.arange(len(t)), t].min() for p, t in zip(probs, tags)])
    assert abs((1.0 - doubt).mean() - right.mean()) > 0.15  # the problem
    words_right = span_words_right(probs, tags)
    p = span_clean_probability(doubt, None, words_right)
    assert abs(p.mean() - right.mean()) < 0.05, (p.mean(), right.mean())
    assert p[right].mean() > 0.6 > 0.3 > p[~right].mean()
    order = np.argsort(doubt)
    assert np.all(np.diff(p[order]) <= 1e-9)  # more doubt, never more probably right: the ranking stays
    assert np.allclose(span_clean_probability(doubt[:10], None, words_right[:10]), 1 - doubt[:10])  # too few
    assert np.allclose(span_clean_probability(doubt, None, None), 1 - doubt)  # no word evidence (older store)
    include = np.arange(600) % 2 == 0
    part = span_clean_probability(doubt, include, span_words_right(probs, tags, include))
    assert np.allclose(part[~include], 1 - doubt[~include])
    assert abs(part[include].mean() - right[include].mean()) < 0.06
    assert np.isnan(span_words_right(probs[:10], tags[:10])).all()


def test_judge_span_labels_flags_disputed_doubtful_sentences_only() -> None:
    from freeal_backend.slm.detection import judge_span_labels
    from freeal_backend.spans import Span

    rng = np.random.default_rng(1)
    doubt = _bimodal_doubt(rng, 70, 30)
    a, b = Span(0, 5, "Chemical"), Span(10, 15, "Disease")
    labels: list = [[a] for _ in range(100)]
    predicted = [[a] for _ in range(100)]
    for i in range(70, 100):
        predicted[i] = [a, b]  # the tagger finds a missing span in the doubtful ones
    predicted[5] = [a, b]  # a disagreement without doubt: not flagged
    labels[6] = None  # no answer: flagged, score 0
    human = np.zeros(100, dtype=bool)
    human[99] = True
    words_right = np.where(np.arange(100) < 70, 0.95, 0.05)  # word-level evidence: 70 % of them right
    v = judge_span_labels(labels, predicted, doubt, human, lambda i, spans: [
        "B-Chemical" if a in spans else "O", "B-Disease" if b in spans else "O", "O"], words_right)
    assert v.health.verdict != "near_chance" and abs(v.health.answered_accuracy - 0.7) < 0.02
    assert v.reasons[6] == ["no_llm_label"] and v.scores[6] == 0.0 and v.flagged[6]
    assert not v.flagged[5] and v.scores[5] > 0.9
    assert v.flagged[70:99].all() and v.reasons[70] == ["missing"] and (v.scores[70:99] < 0.5).all()
    assert not v.flagged[99] and v.scores[99] == 1.0
    assert v.flagged.sum() == 30


def test_span_labels_near_chance_are_said_to_be_so_and_every_sentence_is_flagged() -> None:
    from freeal_backend.slm.detection import judge_span_labels
    from freeal_backend.spans import Span

    rng = np.random.default_rng(2)
    a = Span(0, 5, "Chemical")
    labels = [[a] if rng.random() < 0.5 else [] for _ in range(200)]  # the tagger's spans are unrelated to them
    predicted = [[a] if rng.random() < 0.5 else [] for _ in range(200)]
    doubt = rng.uniform(0.0, 1.0, 200)
    v = judge_span_labels(labels, predicted, doubt, np.zeros(200, dtype=bool),
                          lambda i, spans: ["B-Chemical" if spans else "O"])
    assert v.health.verdict == "near_chance" and "near chance" in v.health.message
    assert v.flagged.all() and all("labels_near_chance" in r for r in v.reasons)
    assert (v.scores <= v.health.answered_accuracy + 1e-12).all()


def _tagger_too_weak_to_name_an_entity(rng: np.random.Generator, n: int, words: int) -> tuple[
        list, list, np.ndarray, Callable[[int, list], list[str]], list[np.ndarray], list[np.ndarray]]:
    """Entity lists 97 % right (word 0 of 40 % of the sentences is a chemical) and a tagger that names no
    entity but gives a chemical a little more B: (labels, predicted, doubt, word_tags, word probabilities,
    the labels' word tag ids)."""
    from freeal_backend.spans import Span

    a = Span(0, 5, "Chemical")
    is_entity = rng.random(n) < 0.4
    labels = [[a] if e != (rng.random() < 0.03) else [] for e in is_entity]
    tags = [np.array([1 if lab else 0] + [0] * (words - 1)) for lab in labels]  # O, B-Chemical, I-Chemical
    probs = []
    for e in is_entity:
        p = np.tile([0.9, 0.06, 0.04], (words, 1))
        p[0] = [0.7, 0.26, 0.04] if e else [0.9, 0.06, 0.04]  # a chemical gets a little more B, never the argmax
        probs.append(p)
    doubt = np.array([1.0 - p[np.arange(words), t].min() for p, t in zip(probs, tags)])

    def word_tags(i: int, spans: list) -> list[str]:
        return ["B-Chemical" if spans else "O"] + ["O"] * (words - 1)

    return labels, [[] for _ in range(n)], doubt, word_tags, probs, tags


def test_span_lists_the_llm_changes_at_random_are_near_chance_whatever_a_weak_tagger_finds() -> None:
    """The tagger too weak to name an entity (kappa ~0, above chance) leaves run health to the LLM's own
    consistency, as for labels: lists that agree with themselves across rounds word by word at kappa below
    ``SELF_NEAR_CHANCE_KAPPA`` are near chance (every sentence flagged); consistent ones are not."""
    from freeal_backend.slm.detection import (SELF_NEAR_CHANCE_KAPPA, judge_span_labels, span_judge_evidence,
                                              span_self_agreement)

    n, words = 200, 8
    labels, predicted, doubt, word_tags, probs, tags = _tagger_too_weak_to_name_an_entity(np.random.default_rng(5),
                                                                                          n, words)
    evidence = span_judge_evidence(probs, tags)
    first = [word_tags(i, lab) for i, lab in enumerate(labels)]
    rng = np.random.default_rng(6)
    again = [["O"] * words for _ in range(n)]  # re-asked: a chemical on a random word of 40 % of them
    for tags in again:
        if rng.random() < 0.4:
            tags[rng.integers(words)] = "B-Chemical"
    fickle, steady = span_self_agreement(first, again), span_self_agreement(first, first)
    assert fickle.texts == n and fickle.changed > 40 and fickle.kappa < SELF_NEAR_CHANCE_KAPPA
    assert steady == span_self_agreement(first, [list(t) for t in first]) and steady.changed == 0 and steady.kappa == 1
    human = np.zeros(n, dtype=bool)
    v = judge_span_labels(labels, predicted, doubt, human, word_tags, evidence=evidence, llm_self=fickle)
    assert v.health.verdict == "near_chance" and "entity lists look near chance" in v.health.message
    assert "tag balance" in v.health.message and v.flagged.all() and v.health.llm_self_kappa == fickle.kappa
    v = judge_span_labels(labels, predicted, doubt, human, word_tags, evidence=evidence, llm_self=steady)
    assert v.health.verdict != "near_chance" and v.health.weak_side == "judge" and v.health.llm_self_kappa == 1.0


def test_span_scores_weigh_the_llms_evidence_where_it_informs_and_only_there() -> None:
    """The LLM's own evidence on a sentence's entity list (its confidence averaged over the rounds, 0 for a
    round that gave another list) raises the ranking of wrong lists where it informs; a constant confidence
    (an endpoint's uninformative 0.99, or every list repeated without logprobs), no confidence and too few
    sentences with one leave the scores as they are; an unanswered sentence is never moved."""
    from sklearn.metrics import roc_auc_score

    from freeal_backend.slm.detection import (LLM_CALIBRATION_MIN, span_clean_probability, span_llm_evidence,
                                              span_words_right)

    rng = np.random.default_rng(0)
    probs, tags, right = _weak_tagger_run(rng, tagger_errs=0.25)
    n = len(right)
    doubt = np.array([1.0 - p[np.arange(len(t)), t].min() for p, t in zip(probs, tags)])
    base = span_clean_probability(doubt, None, span_words_right(probs, tags))
    answered = np.ones(n, dtype=bool)
    repeated = np.where(right, rng.random(n) < 0.9, rng.random(n) < 0.4)  # asked twice: the same list again?
    sure = np.where(right, rng.uniform(0.6, 1.0, n), rng.uniform(0.2, 0.9, n))
    conf = np.where(repeated, sure, sure / 2)
    informed = span_llm_evidence(base, answered, conf)
    assert roc_auc_score(~right, -informed) > roc_auc_score(~right, -base) + 0.02
    few = np.where(np.arange(n) < LLM_CALIBRATION_MIN - 1, conf, np.nan)
    for flat in (np.full(n, 0.99), np.full(n, np.nan), few, None):
        assert np.array_equal(span_llm_evidence(base, answered, flat), base)
    some = answered.copy()
    some[:10] = False
    assert np.array_equal(span_llm_evidence(base, some, conf)[:10], base[:10])


def test_region_scores_rank_by_the_llm_and_the_tagger_at_the_llms_level() -> None:
    """A span's region score averages the LLM's view (its confidence over the rounds; without logprobs, the
    share of rounds that named it) with the held-out tagger's (its score for the same span, 0 where it
    predicts another). The ranking takes both views; where the LLM gave a confidence, its mean sets the level
    (the tagger's lowest word probability is no probability of the span being right)."""
    from sklearn.metrics import roc_auc_score

    from freeal_backend.slm.detection import span_region_scores

    rng = np.random.default_rng(3)
    n = 600
    right = rng.random(n) < 0.55
    llm = np.clip(np.where(right, rng.normal(0.75, 0.2, n), rng.normal(0.55, 0.2, n)), 0.01, 1.0)
    found = np.where(right, rng.random(n) < 0.6, rng.random(n) < 0.2)  # the tagger predicts the same span
    tagger = np.where(found, rng.uniform(0.3, 1.0, n), 0.0)
    confident = np.ones(n, dtype=bool)
    out = span_region_scores(llm, tagger, confident)
    assert roc_auc_score(~right, -out) > max(roc_auc_score(~right, -llm), roc_auc_score(~right, -tagger)) + 0.02
    assert out.mean() == pytest.approx(llm.mean(), abs=1e-6)
    assert np.array_equal(np.argsort(out, kind="stable"), np.argsort((llm + tagger) / 2, kind="stable"))
    shares = rng.choice([0.5, 1.0], n)  # no logprobs: the share of the two rounds that named the span
    plain = span_region_scores(shares, tagger, np.zeros(n, dtype=bool))
    assert np.allclose(plain, (shares + tagger) / 2)
    mixed = confident.copy()
    mixed[: n // 2] = False
    part = span_region_scores(np.where(mixed, llm, shares), tagger, mixed)
    assert np.allclose(part[: n // 2], (shares[: n // 2] + tagger[: n // 2]) / 2)
    assert part[mixed].mean() == pytest.approx(llm[mixed].mean(), abs=1e-6)
    assert ((0.0 <= out) & (out <= 1.0)).all() and len(span_region_scores(llm[:0], tagger[:0], confident[:0])) == 0


def test_a_sentence_score_pools_the_taggers_level_with_its_spans_own_scores() -> None:
    """P(an entity list is exactly right) from its spans' own scores: every span right and none of the
    tagger's extra spans real, as if independent (a list without spans and without extras: 1; a span
    without a score: unknown). Where it is known it is pooled linearly with the tagger's score, which
    otherwise stays; the run health estimate (the mean score) moves with it. With the tagger too weak to
    name an entity, its level is low (it charges the lists with its own misses) where the lists are 97 %
    right, and the pool lifts the estimate towards the truth."""
    from freeal_backend.slm.detection import judge_span_labels, span_judge_evidence, span_list_right

    got = span_list_right([[0.9, 0.8], [], [], [np.nan, 0.9]], [[0.5], [], [0.2, 0.5], []])
    assert np.allclose(got[:3], [0.9 * 0.8 * 0.5, 1.0, 0.8 * 0.5]) and np.isnan(got[3])
    rng = np.random.default_rng(11)
    n, words = 200, 8
    labels, predicted, doubt, word_tags, probs, tags = _tagger_too_weak_to_name_an_entity(rng, n, words)
    human = np.zeros(n, dtype=bool)
    evidence = span_judge_evidence(probs, tags)
    unanswered = [None if i < 5 else lab for i, lab in enumerate(labels)]
    plain = judge_span_labels(unanswered, predicted, doubt, human, word_tags, evidence=evidence)
    list_right = np.where(np.arange(n) % 10 == 0, np.nan, rng.uniform(0.85, 1.0, n))  # the spans' own view
    pooled = judge_span_labels(unanswered, predicted, doubt, human, word_tags, evidence=evidence,
                               list_right=list_right)
    known = np.isfinite(list_right) & (np.arange(n) >= 5)
    assert np.allclose(pooled.scores[known], (plain.scores[known] + list_right[known]) / 2)
    assert np.array_equal(pooled.scores[~known], plain.scores[~known])
    truth = 0.97 * (n - 5) / n  # the lists' accuracy times the answered share
    assert plain.health.estimated_accuracy < 0.65 < pooled.health.estimated_accuracy < truth  # seen: 0.59, 0.73


def test_a_weak_tagger_is_not_read_as_span_labels_near_chance() -> None:
    """Entity lists 97 % right judged by a tagger too weak to name an entity (BC5CDR, 40 sentences: it found 7 %
    of them, kappa 0.06). Its word probabilities still favour the label's tags, which shuffled tags do not get:
    the lists are not near chance, run health blames the tagger, and not every sentence is flagged. Entity
    lists unrelated to the text stay near chance under the same test."""
    from freeal_backend.slm.detection import judge_span_labels, span_judge_evidence
    from freeal_backend.spans import Span

    rng = np.random.default_rng(5)
    n, words = 200, 8
    a = Span(0, 5, "Chemical")
    labels, predicted, doubt, word_tags, probs, tags = _tagger_too_weak_to_name_an_entity(rng, n, words)
    human = np.zeros(n, dtype=bool)
    evidence = span_judge_evidence(probs, tags)
    assert evidence is not None and evidence["p_value"] < 0.01
    kappa_only = judge_span_labels(labels, predicted, doubt, human, word_tags)
    assert kappa_only.health.verdict == "near_chance"  # kappa 0: the old reading, which blamed the labels
    v = judge_span_labels(labels, predicted, doubt, human, word_tags, evidence=evidence)
    assert v.health.verdict != "near_chance" and v.health.weak_side == "judge" and "weak judge" in v.health.message
    assert v.health.p_value == evidence["p_value"] and not v.flagged.all()
    assert not any("labels_near_chance" in r for r in v.reasons)

    unrelated = [np.zeros(words, dtype=int) for _ in range(n)]  # a chemical on a random word of 40 % of them
    for t in unrelated:
        if rng.random() < 0.4:
            t[rng.integers(words)] = 1
    noise = span_judge_evidence(probs, unrelated)
    assert noise is not None and noise["p_value"] >= 0.01
    lists = [[a] if t[0] else [] for t in unrelated]
    chance = judge_span_labels(lists, predicted, doubt, human, word_tags, evidence=noise)
    assert chance.health.verdict == "near_chance" and chance.flagged.all()
    assert span_judge_evidence([np.zeros((0, 3))] * 3, [np.zeros(0, dtype=int)] * 3) is None


def test_labels_of_one_class_are_near_chance_and_scored_so():
    """An LLM that answers one class for every text (the embedded 0.5B on SUBJ: 300 of 300) gives labels the
    small model can neither confirm nor refute: near chance, and neither the run's estimate nor any score may
    say they are all right (the SUBJ run said 100 % with scores of 1.0 where 48 % were right)."""
    rng = np.random.default_rng(4)
    probs = rng.dirichlet([1, 1], 300)
    labels = np.zeros(300, dtype=int)
    j = judge(probs, labels)
    assert j.health.verdict == "near_chance" and j.flagged.all()
    assert j.health.estimated_accuracy <= 0.5 + 1e-9 and j.scores.max() <= 0.5 + 1e-9


def test_a_class_the_small_model_never_learnt_draws_no_label_into_it() -> None:
    """TREC with made noise (benchmarks/results/made_noise_n1000_plain.npz, seed 2, out-of-sample SLM
    probabilities as the benchmark saved them): the small model never learnt the 1.5 % ABBR class (its
    surest ABBR texts get ABBR 0.05 on average). The noise row estimated for that class said true ABBR is
    labelled DESC or ENTY 86 % of the time; inverted, it drew 6 labels into ABBR, 5 of them right ones,
    and the final labels ended below the labels given (81.5 % against 82.0 %)."""
    from pathlib import Path

    from freeal_backend.slm.detection import anchor_transition, trust_unlearnt, unlearnt_classes

    saved = np.load(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "made_noise_n1000_plain.npz")
    probs, labels, gold = saved["trec_seed2_probs"], saved["trec_seed2_labels"], saved["trec_seed2_gold"]
    assert unlearnt_classes(anchor_transition(temperature_scale(probs, labels)[0])).tolist() == [True] + [False] * 5
    v = judge(probs, labels)
    assert not ((v.labels == 0) & (labels != 0)).any()
    assert (v.labels == gold).mean() >= (labels == gold).mean()
    trans = np.array([[0.05, 0.5, 0.45], [0.1, 0.9, 0.0], [0.0, 0.2, 0.8]])
    fixed = trust_unlearnt(trans, np.array([True, False, False]))
    assert np.allclose(fixed[0], [0.85, 0.075, 0.075]) and np.allclose(fixed[1:], trans[1:])
    assert np.allclose(fixed.sum(axis=1), 1.0)
    assert np.array_equal(trust_unlearnt(trans, np.ones(3, dtype=bool)), trans)  # nothing learnt: nothing to borrow
