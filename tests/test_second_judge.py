"""The second judge (FREEAL_SECOND_JUDGE): a probe on frozen embeddings beside the small model; the verdict
ranks by the mean of both and keeps the small model's level and health."""
from dataclasses import replace

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from freeal_backend.config import Settings
from freeal_backend.dataio import rows_to_items
from freeal_backend.loop import FreeALRun
from freeal_backend.slm.detection import judge
from freeal_backend.slm.encoder import Encoder, default_encoder_path
from freeal_backend.slm.second_judge import probe_oof, ranked_at_level
from tests.fixtures_llm import shared_rows

LABELS = ["negative", "positive"]


def test_ranked_at_level_keeps_the_small_models_scores_and_health_in_the_means_order():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 300)
    labels = np.where(rng.random(300) < 0.2, 1 - truth, truth)  # 20 % wrong
    slm = rng.dirichlet([1, 1], 300) * 0.5 + np.eye(2)[truth] * 0.5
    probe = rng.dirichlet([1, 1], 300) * 0.6 + np.eye(2)[truth] * 0.4
    own, both = judge(slm, labels), judge((slm + probe) / 2, labels)
    assert len(np.unique(own.scores)) > 100  # a spread of scores to hand out
    out = ranked_at_level(own, both)
    assert np.array_equal(np.sort(out.scores), np.sort(own.scores))  # the small model's level
    assert np.all(np.diff(out.scores[np.argsort(both.scores, kind="stable")]) >= 0)  # in the mean's order
    assert out.health == own.health
    assert np.array_equal(out.labels, both.labels) and np.array_equal(out.flagged, both.flagged)


def test_probe_is_out_of_sample_and_trains_on_peoples_labels_in_every_fold():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 300)
    emb = rng.normal(size=(300, 8)) + 3 * truth[:, None]  # separable
    labels = truth.copy()
    labels[:30] = 1 - labels[:30]  # wrong labels
    labels[30] = -1  # unlabelled
    human = np.zeros(300, dtype=bool)
    human[31:34] = True
    texts = [f"text {i}" for i in range(300)]
    probs = probe_oof(emb, labels, 2, texts, human=human, seed=0)
    assert np.allclose(probs.sum(1), 1)
    # judged by models that never saw their (wrong) labels: they side with the truth
    assert (probs[:30].argmax(1) == truth[:30]).mean() > 0.9
    assert probs[30].argmax() == truth[30]
    # the unlabelled text and people's labels: predicted by the model trained on every label, theirs included
    every = LogisticRegression(C=1.0, max_iter=3000).fit(emb[labels >= 0], labels[labels >= 0])
    assert np.allclose(probs[30:34], every.predict_proba(emb[30:34]))
    # one class in every training fold: no model can be fitted, the fallback stands
    fallback = np.full((300, 2), [0.2, 0.8])
    assert np.array_equal(probe_oof(emb, np.ones(300, dtype=int), 2, texts, fallback=fallback), fallback)


def test_a_run_with_the_second_judge_reranks_at_the_small_models_level(tmp_path):
    """Judge-only (no LLM call): the same run judged without, then with, the second judge (the packaged
    MiniLM as its frozen encoder); the final verdict is recomputed, the stages are kept."""
    rows = shared_rows("sst2", n=120, stride=31)
    rng = np.random.default_rng(0)
    given = {str(i): (lab if rng.random() > 0.2 else LABELS[1 - LABELS.index(lab)])
             for i, lab in enumerate(r["label"] for r in rows)}
    items = rows_to_items([{"id": str(i), "text": r["text"]} for i, r in enumerate(rows)])
    base = dict(slm_min_steps=0, data_dir=tmp_path, slm_epochs=2, llm_base_url="http://127.0.0.1:9/v1")
    encoder = Encoder()
    with FreeALRun(Settings(**base), LABELS, tmp_path / "run", encoder=encoder) as run:
        alone = run.run(items, rounds=0, llm_labels=given)
        health, trained = run.health(), run.store.stages()["slm_r1"]
    second = str(default_encoder_path())
    with FreeALRun(Settings(**base, second_judge=second), LABELS, tmp_path / "run", encoder=encoder) as run:
        both = run.run(items, rounds=0, llm_labels=given)
        assert run.health() == health
        assert run.store.stages()["slm_r1"] == trained  # the small model is not trained again
        assert "second_judge" in run.timings
    assert list(run.run_dir.glob("second_judge-*.npy"))
    s_alone, s_both = np.array([r.confidence for r in alone]), np.array([r.confidence for r in both])
    assert np.allclose(np.sort(s_alone), np.sort(s_both))
    assert not np.array_equal(np.argsort(s_alone, kind="stable"), np.argsort(s_both, kind="stable"))


def test_a_second_judge_that_cannot_load_is_refused_before_any_work(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path, second_judge=str(tmp_path / "no-model"), llm_base_url="http://127.0.0.1:9/v1")
    with pytest.raises(FileNotFoundError, match="FREEAL_SECOND_JUDGE"):
        FreeALRun(settings, LABELS, tmp_path / "run")
    monkeypatch.setenv("FREEAL_MODELS_DIR", str(tmp_path / "models"))  # where nothing is installed
    with pytest.raises(RuntimeError, match="freeal models install all-mpnet-base-v2"):
        FreeALRun(replace(settings, second_judge="all-mpnet-base-v2"), LABELS, tmp_path / "run2")


def test_the_small_models_health_check_fits_no_probe(tmp_path, monkeypatch):
    """The SLM stage records only the small model's health, which the second judge leaves as it is: the
    probe is fitted once, for the final verdict, not for that check too."""
    import freeal_backend.loop as loop

    fits = []
    monkeypatch.setattr(loop, "probe_oof", lambda *a, **k: fits.append(1) or probe_oof(*a, **k))
    rows = shared_rows("sst2", n=60, stride=53)
    given = {str(i): r["label"] for i, r in enumerate(rows)}
    items = rows_to_items([{"id": str(i), "text": r["text"]} for i, r in enumerate(rows)])
    settings = Settings(slm_min_steps=0, data_dir=tmp_path, slm_epochs=1, llm_base_url="http://127.0.0.1:9/v1",
                        second_judge=str(default_encoder_path()))
    with FreeALRun(settings, LABELS, tmp_path / "run") as run:
        run.run(items, rounds=0, llm_labels=given)
    assert len(fits) == 1
