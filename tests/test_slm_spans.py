"""The span SLM: judgements, doubt, seqeval scores, and a tiny tagger that learns (real encoder, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from freeal_backend.span_eval import entity_scores, word_offsets
from freeal_backend.spans import IGNORE, Span, spans_from_dicts

TYPES = ["Chemical", "Disease"]
BC5CDR = Path(__file__).resolve().parents[2] / "shared" / "data" / "bc5cdr"


def test_judge_spans_kinds() -> None:
    from freeal_backend.slm.detection import judge_spans

    label = [Span(0, 5, "Chemical"), Span(10, 15, "Chemical"), Span(20, 30, "Disease"), Span(40, 45, "Disease")]
    pred = [Span(0, 5, "Chemical"), Span(10, 15, "Disease"), Span(20, 25, "Disease"), Span(50, 55, "Chemical")]
    got = [(j.kind, j.label, j.predicted) for j in judge_spans(label, pred)]
    assert got == [("wrong_type", label[1], pred[1]), ("wrong_boundary", label[2], pred[2]),
                   ("spurious", label[3], None), ("missing", None, pred[3])]
    assert judge_spans(label, label) == [] and judge_spans([], []) == []


def test_review_note_names_every_judgement() -> None:
    from freeal_backend.slm.detection import judge_spans, review_note

    text = "Lithium caused tremor in rats ."
    label = [Span(0, 7, "Disease"), Span(15, 21, "Disease"), Span(25, 29, "Chemical")]
    pred = [Span(0, 7, "Chemical"), Span(15, 29, "Disease")]
    note = review_note(text, judge_spans(label, pred))
    assert note.startswith("FreeAL: NEEDS REVIEW")
    assert '"Lithium": Chemical, not Disease?' in note and '"tremor" should be "tremor in rats" (Disease)?' in note
    assert 'not an entity? "rats" (Chemical)' in note
    assert review_note(text, judge_spans([], [Span(0, 7, "Chemical")])).endswith('missing Chemical "Lithium".')
    assert review_note(text, []) == "FreeAL: OK."


def test_doubt_score() -> None:
    from freeal_backend.slm.tagger import doubt_score

    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    assert doubt_score(probs, np.array([IGNORE, 0, 1])) == pytest.approx(0.2)
    assert doubt_score(probs, np.array([IGNORE, 1, 1])) > doubt_score(probs, np.array([IGNORE, 0, 1]))
    assert doubt_score(probs, np.array([IGNORE, IGNORE, IGNORE])) == 0.0


def test_entity_scores_with_seqeval() -> None:
    texts = ["Lithium caused tremor .", "No entity .", "Parkinson ' s disease and L - dopa ."]
    gold = [[Span(0, 7, "Chemical"), Span(15, 21, "Disease")], [], [Span(0, 21, "Disease"), Span(26, 34, "Chemical")]]
    assert entity_scores(texts, gold, gold, TYPES)["overall"]["f1"] == 1.0
    pred = [[Span(0, 7, "Chemical"), Span(15, 21, "Chemical")], [Span(3, 9, "Disease")], [Span(14, 21, "Disease")]]
    s = entity_scores(texts, gold, pred, TYPES)
    assert s["overall"]["precision"] == pytest.approx(1 / 4) and s["overall"]["recall"] == pytest.approx(1 / 4)
    assert s["Chemical"]["precision"] == pytest.approx(1 / 2) and s["Chemical"]["recall"] == pytest.approx(1 / 2)
    assert s["Disease"]["f1"] == 0.0 and s["Disease"]["support"] == 2
    assert word_offsets("a  b\r\nc😀d") == [(0, 1), (3, 4), (6, 7), (7, 8), (8, 9)]


def _rows(split: str, n: int, skip: int = 0) -> list[dict]:
    path = BC5CDR / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found (shared data)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(skip + n), f)][skip:]


@pytest.fixture(scope="module")
def tiny() -> dict:
    """200 BC5CDR training sentences (+100 held out) with the real encoder's lower states, one torch thread."""
    import torch

    from freeal_backend.slm.encoder import Encoder
    from freeal_backend.slm.tagger import SpanSLMConfig, tokenize

    torch.set_num_threads(1)
    train, test = _rows("train", 200), _rows("train", 100, skip=200)
    encoder = Encoder()
    cfg = SpanSLMConfig(epochs=4, warmup_epochs=2, max_length=96)
    texts, test_texts = [r["text"] for r in train], [r["text"] for r in test]
    split = encoder.split_for(1)
    return {"encoder": encoder, "cfg": cfg, "texts": texts, "gold": [spans_from_dicts(r["spans"]) for r in train],
            "lower": encoder.lower_states(texts, split, max_length=cfg.max_length),
            "test_texts": test_texts, "test_gold": [spans_from_dicts(r["spans"]) for r in test],
            "test_lower": encoder.lower_states(test_texts, split, max_length=cfg.max_length),
            "test_tok": tokenize(encoder, test_texts, cfg.max_length)}


def test_tiny_tagger_beats_untrained(tiny: dict) -> None:
    from freeal_backend.slm.tagger import SpanModel, encode_tags, ensemble_predict, tokenize

    encoder, cfg = tiny["encoder"], tiny["cfg"]

    def test_f1(model: SpanModel) -> float:
        pred = ensemble_predict([model], tiny["test_lower"], tiny["test_tok"], TYPES)
        return entity_scores(tiny["test_texts"], tiny["test_gold"], pred, TYPES)["overall"]["f1"]

    before = test_f1(SpanModel(encoder, TYPES, train_layers=1, config=cfg))
    tok = tokenize(encoder, tiny["texts"], cfg.max_length)
    tags, _ = encode_tags(tok, tiny["gold"], TYPES)
    trained = SpanModel(encoder, TYPES, train_layers=1, config=cfg)
    with pytest.raises(ValueError, match="word features"):
        trained.fit(tiny["lower"], tags)
    out = trained.fit(tiny["lower"], tags, features=tok.features)
    after = test_f1(trained)
    assert after > before + 0.2, (before, after)
    assert out is not None and out.losses.shape == (200,) and out.clean.mean() > 0.5


def test_a_small_project_gets_at_least_min_steps_per_tagger(tiny: dict) -> None:
    """One epoch over 20 sentences is one optimiser step; min_steps adds epochs (the class SLM's rule), and a
    big project keeps its epochs."""
    from dataclasses import replace

    from freeal_backend.slm.tagger import SpanModel, encode_tags, tokenize

    cfg = replace(tiny["cfg"], epochs=1, min_steps=6, robust=False)
    tok = tokenize(tiny["encoder"], tiny["texts"], cfg.max_length)
    tags, _ = encode_tags(tok, tiny["gold"], TYPES)
    model = SpanModel(tiny["encoder"], TYPES, train_layers=1, config=cfg)
    seen: list[tuple[int, int]] = []
    model.fit(tiny["lower"], tags, np.arange(20), score=False, features=tok.features,
              on_epoch=lambda epoch, epochs, _: seen.append((epoch, epochs)))
    assert seen == [(k, 6) for k in range(1, 7)]
    assert model.epochs_for(10_000) == 1


def test_cross_fit_finds_planted_spurious_spans(tiny: dict) -> None:
    """A spurious Chemical on the first plain word of 20 sentences: the held-out tagger must call it
    spurious and rank those sentences as more doubtful."""
    from freeal_backend.slm.tagger import cross_fit

    texts, gold = tiny["texts"], tiny["gold"]
    planted: dict[int, Span] = {}
    for i in range(0, 200, 10):
        start, end = next((a, b) for a, b in word_offsets(texts[i]) if texts[i][a:b].isalpha()
                          and all(b <= g.start or a >= g.end for g in gold[i]))
        planted[i] = Span(start, end, "Chemical")
    noisy = [sorted(g + [planted[i]]) if i in planted else g for i, g in enumerate(gold)]
    corrupted = np.isin(np.arange(200), list(planted))
    result = cross_fit(tiny["encoder"], texts, noisy, TYPES, folds=2, train_layers=1, config=tiny["cfg"],
                       lower=tiny["lower"])
    assert len(result.predicted) == len(result.judgements) == 200 and len(result.models) == 2
    assert result.doubt[corrupted].mean() > result.doubt[~corrupted].mean() + 0.1
    found = sum(any(j.kind == "spurious" and j.label == planted[i] for j in result.judgements[i]) for i in planted)
    assert found >= 0.5 * len(planted), found


def test_ner_benchmark_runs_on_a_tiny_slice(tmp_path: Path) -> None:
    """benchmarks/ner_slm.py end to end on 40 sentences (so it cannot rot); numbers are not checked."""
    import subprocess
    import sys

    _rows("train", 1)
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ner.md"
    proc = subprocess.run([sys.executable, "benchmarks/ner_slm.py", "--limit", "40", "--test-limit", "20", "--folds",
                           "2", "--epochs", "2", "--warmup", "1", "--train-layers", "0", "--threads", "1",
                           "--audit-sizes", "20", "--audit-draws", "2", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for row in ["noisy labels themselves", "SLM on noisy labels, test", "SLM on gold labels, train", "top 15% by doubt",
                "P(right) < 0.5 and disputed", "ECE", "Span judgements", "peak RSS", "Random audits",
                "Command (from the repository root)"]:
        assert row in text, row
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["train_sentences"] == 40 and [a["size"] for a in data["noisy"]["audit"]] == [0, 20]


def test_word_shape_and_features() -> None:
    from freeal_backend.slm.tagger import FEATURE_KINDS, word_features, word_shape

    assert word_shape("L-Dopa2") == "X-Xxd" and word_shape("NaCl") == "XxXx" and word_shape("12.5") == "d.d"
    text = "Lithium caused LITHIUM-induced tremor"
    # tokens: [CLS] lith ##ium caused lithium - induced tremor [SEP] (word ids as a fast tokenizer gives them)
    offsets = [(0, 0), (0, 4), (4, 7), (8, 14), (15, 22), (22, 23), (23, 30), (31, 37), (0, 0)]
    word_ids = [None, 0, 0, 1, 2, 3, 4, 5, None]
    f = word_features(text, offsets, word_ids, buckets=1 << 12)
    assert f.shape == (9, len(FEATURE_KINDS)) and (f[0] == 0).all() and (f[-1] == 0).all()
    assert (f[1] == f[2]).all()  # sub-tokens share their word's features
    kinds = {k: i for i, k in enumerate(FEATURE_KINDS)}
    for k in ("word", "prefix3", "suffix3", "suffix4"):  # lower-cased: "Lithium" and "LITHIUM" agree ...
        assert f[1, kinds[k]] == f[4, kinds[k]], k
    assert f[1, kinds["shape"]] != f[4, kinds["shape"]]  # ... but not in shape
    assert f[4, kinds["chunk_shape"]] == f[6, kinds["chunk_shape"]] != f[7, kinds["chunk_shape"]]
    assert ((f[1:-1] > 0) & (f[1:-1] < 1 << 12)).all()
    assert (word_features(text, offsets, word_ids, buckets=1 << 12) == f).all()  # not salted per process


def test_constrained_decode_never_opens_with_inside() -> None:
    from freeal_backend.slm.tagger import decode, viterbi_bio

    # tags: O, B-Chemical, I-Chemical, B-Disease, I-Disease; four one-token words
    offsets, word_ids = [(0, 0), (0, 3), (4, 7), (8, 11), (12, 15), (0, 0)], [None, 0, 1, 2, 3, None]
    probs = np.full((6, 5), 0.01)
    probs[1:5] = [[0.6, 0.1, 0.28, 0.01, 0.01],  # argmax O; I-Chemical second
                  [0.05, 0.04, 0.5, 0.01, 0.4],  # argmax I-Chemical, after O
                  [0.05, 0.04, 0.3, 0.01, 0.6],  # argmax I-Disease, after I-Chemical
                  [0.9, 0.03, 0.03, 0.02, 0.02]]
    free = decode(probs, offsets, word_ids, TYPES, constrained=False)
    assert [(s.start, s.end, s.label) for s in free] == [(4, 7, "Chemical"), (8, 11, "Disease")]
    best = viterbi_bio(probs[1:5], 2)
    names = ["O", "B-C", "I-C", "B-D", "I-D"]
    for a, b in zip([0, *best[:-1]], best):  # valid: I-T only after B-T / I-T
        assert names[b][0] != "I" or names[a][1:] == names[b][1:] and names[a] != "O", [names[t] for t in best]
    got = decode(probs, offsets, word_ids, TYPES)
    # brute force over all 5^4 sequences agrees with Viterbi
    import itertools
    valid = [seq for seq in itertools.product(range(5), repeat=4)
             if all(names[b][0] != "I" or (names[a] != "O" and names[a][1:] == names[b][1:])
                    for a, b in zip((0,) + seq[:-1], seq))]
    brute = max(valid, key=lambda seq: sum(np.log(probs[1 + w, t]) for w, t in enumerate(seq)))
    assert list(best) == list(brute)
    assert all(s.score is not None and 0 < s.score <= 1 for s in got)
