"""The cross-fitted SLM finds instance-dependent label noise (real encoder, real training, ~1 min)."""
import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from freeal_backend.slm.detection import judge
from freeal_backend.slm.encoder import Encoder
from freeal_backend.slm.classifier import SLMConfig, SmallModel
from tests.fixtures_llm import shared_rows

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def noisy_sst2():
    """600 SST-2 texts labelled by a bag-of-words classifier trained on 3000 other gold texts (~22 % wrong):
    errors depend on the text (unseen words, negation), like an LLM's, not coin flips."""
    every = shared_rows("sst2")
    rows = every[::10][:600]
    seed_rows = [r for i, r in enumerate(every) if i % 10][:3000]
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit([r["text"] for r in seed_rows + rows])
    weak = LogisticRegression(C=10.0, max_iter=2000).fit(vec.transform([r["text"] for r in seed_rows]),
                                                           [LABELS.index(r["label"]) for r in seed_rows])
    gold = np.array([LABELS.index(r["label"]) for r in rows])
    noisy = weak.predict(vec.transform([r["text"] for r in rows]))
    return [r["text"] for r in rows], gold, noisy


def test_cross_fitted_slm_finds_instance_dependent_noise(noisy_sst2):
    texts, gold, noisy = noisy_sst2
    error = (noisy != gold).mean()
    assert 0.15 < error < 0.30  # a realistic weak labeller, far from perfect and far from chance
    encoder = Encoder()
    model = SmallModel(encoder, 2, train_layers=2,
                       config=SLMConfig(epochs=3, warmup_epochs=1, folds=3, lr=2e-4, robust=False))
    lower = encoder.lower_states(texts, model.split)
    untrained_probs = model._predict(model._new_model(0), lower)[0]
    out = model.fit(lower, noisy)
    wrong = noisy != gold
    j = judge(out.oof_probs, noisy)
    quality = j.posterior[np.arange(len(noisy)), noisy]
    auroc = roc_auc_score(wrong, -quality)
    recall, flagged = j.flagged[wrong].mean(), j.flagged.mean()
    print(f"error {error:.3f} auroc {auroc:.3f} recall {recall:.3f} flagged {flagged:.3f} "
          f"final {(j.labels == gold).mean():.3f} slm {(out.oof_probs.argmax(1) == gold).mean():.3f}")
    assert auroc > 0.7  # chance is 0.5
    assert recall > 1.5 * flagged  # the flag holds errors far above their share of flagged texts
    assert (out.oof_probs.argmax(1) == gold).mean() > (untrained_probs.argmax(1) == gold).mean() + 0.1
    assert (j.labels == gold).mean() >= (noisy == gold).mean()  # the final labels never end below the input
