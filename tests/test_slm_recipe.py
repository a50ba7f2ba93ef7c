"""The SLM's training recipe against the authors' (mytrainer.py): the small-loss split reads eval-mode losses
at each epoch's end, early stopping never reads the labels being judged, duplicate texts share a fold, and
the consistency term sums over the noisy samples (real encoder, real training on SST-2 texts, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freeal_backend.slm import classifier
from freeal_backend.slm.classifier import SLMConfig, SmallModel, _consistency, text_groups
from freeal_backend.slm.encoder import Encoder
from tests.fixtures_llm import shared_rows

LABELS = ["negative", "positive"]
BC5CDR = Path(__file__).resolve().parents[2] / "shared" / "data" / "bc5cdr"


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.set_num_threads(1)
    return Encoder()


def sst2(n: int) -> tuple[list[str], np.ndarray]:
    rows = shared_rows("sst2", n=n, stride=11)
    return [r["text"] for r in rows], np.array([LABELS.index(r["label"]) for r in rows])


def test_small_loss_split_reads_eval_mode_losses_of_the_model_at_the_epoch_end(encoder, monkeypatch) -> None:
    """Each robust epoch's GMM split gets, per training text, the loss of the model as the previous epoch left
    it, in eval mode (no dropout): not losses recorded in train mode during shuffled training, averaged."""
    texts, labels = sst2(120)
    labels[::6] = 1 - labels[::6]  # some noise, so the split has two sides
    epochs = 3
    model = SmallModel(encoder, 2, train_layers=1,
                       config=SLMConfig(epochs=epochs, warmup_epochs=1, folds=2, robust=True, seed=1))
    lower = encoder.lower_states(texts, model.split)
    trained: list[classifier.SLMClassifier] = []
    new_model = model._new_model

    def spy_new_model(seed: int) -> classifier.SLMClassifier:
        trained.append(new_model(seed))
        return trained[-1]

    events: list[tuple] = []
    real_split = classifier.split_clean_noisy

    def spy_split(losses: np.ndarray, **kwargs):
        events.append(("split", np.array(losses, dtype=float)))
        return real_split(losses, **kwargs)

    def on_epoch(done: int, total: int, metrics: dict[str, float]) -> None:
        probs = model._predict(trained[-1], lower)[0]  # eval mode, the model as this epoch leaves it
        events.append(("end", (done - 1) % epochs, SmallModel._losses(probs, labels)))

    monkeypatch.setattr(model, "_new_model", spy_new_model)
    monkeypatch.setattr(classifier, "split_clean_noisy", spy_split)
    model.fit(lower, labels, on_epoch=on_epoch)
    pairs = [(before[2], after[1]) for before, after in zip(events, events[1:])
             if before[0] == "end" and after[0] == "split" and before[1] < epochs - 1]
    assert len(pairs) == 2 * (epochs - 1)  # per fold model, a split before each epoch after the warm-up
    for eval_losses, split_losses in pairs:
        seen = ~np.isnan(split_losses)
        assert 40 < seen.sum() < len(texts)  # the fold model's training texts only
        np.testing.assert_allclose(split_losses[seen], eval_losses[seen], rtol=1e-4, atol=1e-5)


def test_held_out_labels_cannot_choose_the_epoch(encoder) -> None:
    """Inverting every label of fold 0 changes nothing fold 0's model does: neither the epoch it stops at nor
    its verdict on fold 0 (early stopping reads an inner split of the training folds)."""
    texts, labels = sst2(160)
    cfg = SLMConfig(epochs=4, warmup_epochs=1, folds=2, lr=3e-4, robust=False, seed=2)
    lower = encoder.lower_states(texts, encoder.split_for(1))
    out = SmallModel(encoder, 2, train_layers=1, config=cfg).fit(lower, labels)
    held = out.fold == 0
    assert 0 < held.sum() < len(texts) and len(out.best_epochs) == 2
    inverted = labels.copy()
    inverted[held] = 1 - inverted[held]
    again = SmallModel(encoder, 2, train_layers=1, config=cfg).fit(lower, inverted)
    np.testing.assert_array_equal(again.fold, out.fold)
    assert again.best_epochs[0] == out.best_epochs[0]
    np.testing.assert_array_equal(again.oof_probs[held], out.oof_probs[held])


def test_text_groups_normalise_case_and_whitespace() -> None:
    groups = text_groups(["A  film.", "a film.", " a\tFILM. ", "a film!", "Straße", "STRASSE"])
    assert groups[0] == groups[1] == groups[2] != groups[3]
    assert groups[4] == groups[5] != groups[0]


def test_duplicate_texts_share_a_fold(encoder) -> None:
    """40 texts appear twice (once in capitals or with other whitespace): each pair lands in one fold, so no
    fold model trains on the copy of a text it judges."""
    texts, labels = sst2(60)
    copies = [t.upper() for t in texts[:20]] + ["  " + t.replace(" ", " \t ") for t in texts[20:40]]
    every = texts + copies
    model = SmallModel(encoder, 2, train_layers=1, config=SLMConfig(epochs=1, warmup_epochs=1, folds=3))
    lower = encoder.lower_states(every, model.split)
    out = model.fit(lower, np.concatenate([labels, labels[:40]]), groups=text_groups(every))
    assert set(out.fold.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(out.fold[:40], out.fold[60:])


def test_span_cross_fit_keeps_duplicate_sentences_in_one_fold(encoder) -> None:
    from freeal_backend.slm.tagger import SpanSLMConfig, cross_fit
    from freeal_backend.spans import spans_from_dicts

    path = BC5CDR / "train.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found (shared data)")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(30), f)]
    texts = [r["text"] for r in rows] + [r["text"] for r in rows[:12]]
    spans = [spans_from_dicts(r["spans"]) for r in rows + rows[:12]]
    result = cross_fit(encoder, texts, spans, ["Chemical", "Disease"], folds=2, train_layers=1,
                       config=SpanSLMConfig(epochs=1, max_length=64))
    assert result.fold is not None and set(result.fold.tolist()) == {0, 1}
    np.testing.assert_array_equal(result.fold[:12], result.fold[30:])


def test_consistency_sums_over_the_noisy_samples() -> None:
    """The authors' KLDivLoss(reduction='sum'): the term grows with the number of noisy samples in the batch
    (twice the samples, twice the term) and equals the sum of each sample's symmetric, sharpened KL."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    t = 0.85

    def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p = F.softmax(teacher, dim=-1)
        return (p * (p.log() - F.log_softmax(student / t, dim=-1))).sum()

    assert float(_consistency(a, b, t)) == pytest.approx(float(0.5 * (kl(a, b) + kl(b, a))), rel=1e-5)
    doubled = _consistency(torch.cat([a, a]), torch.cat([b, b]), t)
    assert float(doubled) == pytest.approx(2 * float(_consistency(a, b, t)), rel=1e-5)


def test_a_small_project_gets_at_least_min_steps_per_fold_model():
    """2 epochs over ~50 texts are 4 optimiser steps: the judge stays near chance. min_steps adds epochs."""
    from freeal_backend.config import Settings

    cfg = SLMConfig(epochs=2, min_steps=30, batch_size=16, folds=2)
    model = SmallModel.__new__(SmallModel)
    model.config = cfg
    assert model.epochs_for(48) == 10  # 3 steps an epoch
    assert model.epochs_for(10_000) == 2  # a big project already takes more steps than that
    assert Settings().slm_min_steps == 50 and SLMConfig().min_steps == 0
