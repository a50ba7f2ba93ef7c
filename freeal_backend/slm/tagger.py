"""The small model for spans: a BIO token tagger on the split encoder, robust training, cross-fitted detection.

Training (FreeAL step 2 for spans) is plain cross-entropy by default; with ``SpanSLMConfig.robust`` (measured
no better on BC5CDR with made noise, and slower): warm-up epochs on every sentence; then, each epoch, the per-sentence
mean token loss goes through the same 2-component GMM small-loss split as texts
(:func:`freeal_backend.slm.selection.split_clean_noisy`). Clean sentences train on every tag; in a noisy
sentence only the tags the model already agrees with are trained on, so the doubtful tags (a missed or
spurious entity) are not memorised while the rest of the sentence still teaches. The classification
SLM's mixup and augmented-view consistency are left out: they double the cost per epoch, and mixing
two sentences' BIO tags has no clear meaning.

Detection (:func:`cross_fit`) uses out-of-sample evidence: the sentences are split into K folds (copies
of a sentence, up to case and whitespace, in the same fold), a tagger trained on K-1 folds predicts the
held-out fold, and its spans are compared with the noisy label's spans. Only the top ``train_layers``
encoder layers and the head are trained, over lower-layer states computed once for all folds.

The uncased sentence encoder sees a word only as lower-cased word pieces, so the head also reads hashed
embeddings of each word's lower-cased form, 3-prefix, 3-/4-suffixes and shape (chemical and disease
names have strong suffix and shape cues), and decoding takes the most probable BIO-valid tag sequence.
Measured on 4560 BC5CDR sentences with made LLM-like noise, 2 shared cores (benchmarks/results/
ner_slm.md): the defaults (top layer, 2 folds, 3 epochs, word features, Viterbi) reach 69.7 test F1 on
noisy labels and 73.2 on gold in a 260-620 s round (load 3-5); before them the same round gave 57.1 on
noisy labels (461 s); the head alone (3 folds, 8 epochs) 47.6.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from freeal_backend.slm.detection import (SPAN_FLAG_BELOW, SpanJudgement, judge_spans, span_clean_probability,
                                           span_judge_evidence, span_words_right)
from freeal_backend.slm.encoder import Encoder, LowerStates, mean_pool
from freeal_backend.slm.selection import split_clean_noisy
from freeal_backend.slm.classifier import TopLayers, _batches, epochs_for, group_folds, text_groups
from freeal_backend.spans import IGNORE, Span, bio_labels, bio_to_spans, spans_to_bio, token_words


@dataclass(frozen=True)
class SpanSLMConfig:
    """Defaults measured on all of BC5CDR (benchmarks/results/ner_slm.md). One fold trained on noisy labels,
    held-out / test F1: no word features, argmax decoding, lr 3e-4 / 3e-3: 58.8 / 54.3; word features and
    Viterbi: 68.3 / 61.1; and lr 6e-4 / 1e-2: 75.2 / 66.2 (argmax decoding of that model: 70.6 held out)."""

    epochs: int = 3
    min_steps: int = 0  # at least this many optimiser steps per tagger (Settings.slm_min_steps: more epochs)
    warmup_epochs: int = 1
    lr: float = 6e-4  # top encoder layers (when train_layers > 0)
    head_lr: float = 1e-2  # head and word-feature embeddings
    weight_decay: float = 0.01
    batch_size: int = 32
    dropout: float = 0.1
    clean_threshold: float = 0.7
    max_length: int = 128
    robust: bool = False  # True: small-loss split after warm-up (measured no better on BC5CDR, slower)
    seed: int = 0
    word_features: bool = True  # hashed word, prefix, suffixes and shape of each token's word (see word_features)
    feature_dim: int = 32  # per feature kind
    feature_buckets: int = 1 << 15
    constrained: bool = True  # decode the most probable valid BIO sequence (no I-T after O or another type)


@dataclass
class Tokenized:
    """A fast tokenizer's view of the texts, aligned with :meth:`Encoder.lower_states` (same call)."""

    offsets: list[list[tuple[int, int]]]
    word_ids: list[list[int | None]]
    features: list[np.ndarray] = field(default_factory=list)  # per text (tokens, FEATURE_KINDS) hashed ids


def tokenize(encoder: Encoder, texts: Sequence[str], max_length: int, buckets: int = 1 << 15) -> Tokenized:
    """Offsets, word ids and hashed word features with the same truncation as ``encoder.lower_states``."""
    enc = encoder.tokenizer(list(texts), truncation=True, max_length=max_length, return_offsets_mapping=True)
    offsets = [[tuple(o) for o in offs] for offs in enc["offset_mapping"]]
    word_ids = [enc.word_ids(i) for i in range(len(texts))]
    return Tokenized(offsets, word_ids, [word_features(t, o, w, buckets) for t, o, w in zip(texts, offsets, word_ids)])


FEATURE_KINDS = ("word", "prefix3", "suffix3", "suffix4", "shape", "chunk_shape")


def word_shape(word: str) -> str:
    """``Xx``-style shape with runs collapsed (``"L-Dopa2"`` -> ``"X-Xxd"``), at most 8 characters."""
    out: list[str] = []
    for ch in word:
        c = ("X" if ch.isupper() else "x" if ch.islower() else "d" if ch.isdigit()
             else ch if len(ch.encode()) == 1 else "u")
        if not out or out[-1] != c:
            out.append(c)
    return "".join(out)[:8]


def _bucket(kind: str, value: str, buckets: int) -> int:
    return 1 + zlib.crc32(f"{kind}\x1f{value}".encode()) % (buckets - 1)  # 0 is padding


def word_features(text: str, offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None],
                  buckets: int = 1 << 15) -> np.ndarray:
    """Per token, hashed ids (1..buckets-1; 0 for special tokens) of what the uncased encoder cannot see
    or sees only in pieces: its word lower-cased, the word's lower-cased 3-prefix and 3-/4-suffixes, its
    shape (case, digits, punctuation) and the shape of the whitespace-delimited chunk holding it."""
    out = np.zeros((len(offsets), len(FEATURE_KINDS)), dtype=np.int64)
    spans: dict[int, list[int]] = {}
    for i, w in enumerate(word_ids):
        if w is not None and offsets[i][1] > offsets[i][0]:
            spans.setdefault(w, [offsets[i][0], offsets[i][1]])[1] = offsets[i][1]
    cache: dict[int, list[int]] = {}
    for i, w in enumerate(word_ids):
        if w is None or w not in spans:
            continue
        if w not in cache:
            a, b = spans[w]
            word = text[a:b]
            low = word.lower()
            ca, cb = a, b
            while ca > 0 and not text[ca - 1].isspace():
                ca -= 1
            while cb < len(text) and not text[cb].isspace():
                cb += 1
            values = (low, low[:3], low[-3:], low[-4:], word_shape(word), word_shape(text[ca:cb]))
            cache[w] = [_bucket(k, v, buckets) for k, v in zip(FEATURE_KINDS, values)]
        out[i] = cache[w]
    return out


def encode_tags(tok: Tokenized, spans: Sequence[Sequence[Span]], types: Sequence[str]) -> tuple[list[np.ndarray], int]:
    """Per-text tag ids (IGNORE on special tokens and later sub-tokens) and the count of spans lost to truncation."""
    out, lost = [], 0
    for offsets, word_ids, sp in zip(tok.offsets, tok.word_ids, spans):
        tags, n = spans_to_bio(offsets, word_ids, sp, types)
        out.append(np.asarray(tags, dtype=np.int64))
        lost += n
    return out, lost


class SpanTagger(TopLayers):
    """The span tagger: top layers, dropout and a linear head over the BIO tags of every token; with
    ``feature_dim`` the head also reads each token's hashed word features (see :func:`word_features`)."""

    def __init__(self, encoder: Encoder, train_layers: int, outputs: int, dropout: float, *,
                 feature_dim: int = 0, feature_buckets: int = 1 << 15) -> None:
        super().__init__(encoder, train_layers, outputs, dropout)
        self.feature_dim = feature_dim
        if feature_dim:
            self.features = nn.Embedding(feature_buckets, feature_dim, padding_idx=0)
            nn.init.normal_(self.features.weight, std=0.1)
            with torch.no_grad():
                self.features.weight[0].zero_()
            self.head = nn.Linear(encoder.hidden_size + len(FEATURE_KINDS) * feature_dim, outputs)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden(states, mask)
        if self.feature_dim:
            if feats is None:
                raise ValueError("this tagger reads word features: pass them (Tokenized.features)")
            hidden = torch.cat([hidden, self.features(feats).flatten(2)], dim=-1)
        return self.head(self.dropout(hidden))


@dataclass
class TaggerOutput:
    """What a trained tagger says about the sentences it was trained on."""

    losses: np.ndarray  # (n,) mean token CE against the training tags, NaN where no tag
    clean: np.ndarray  # (n,) bool, GMM small-loss split
    clean_prob: np.ndarray


def _pad_tags(tags: Sequence[np.ndarray], index: Sequence[int], length: int) -> torch.Tensor:
    out = torch.full((len(index), length), IGNORE, dtype=torch.long)
    for j, i in enumerate(index):
        out[j, : len(tags[i])] = torch.as_tensor(tags[i])
    return out


def _pad_features(features: Sequence[np.ndarray] | None, index: Sequence[int], length: int) -> torch.Tensor | None:
    if not features:
        return None
    out = torch.zeros((len(index), length, features[index[0]].shape[1]), dtype=torch.long)
    for j, i in enumerate(index):
        out[j, : len(features[i])] = torch.as_tensor(features[i])
    return out


class SpanModel:
    """Trains and applies one BIO tagger over cached lower states."""

    def __init__(self, encoder: Encoder, types: Sequence[str], *, train_layers: int = 1,
                 config: SpanSLMConfig | None = None) -> None:
        self.encoder = encoder
        self.types = list(types)
        self.config = config or SpanSLMConfig()
        self.num_tags = len(bio_labels(types))
        torch.manual_seed(self.config.seed)
        cfg = self.config
        self.model = SpanTagger(encoder, train_layers, self.num_tags, cfg.dropout,
                                feature_dim=cfg.feature_dim if cfg.word_features else 0,
                                feature_buckets=cfg.feature_buckets).to(encoder.device)

    @property
    def split(self) -> int:
        return self.model.split

    def _logits(self, lower: LowerStates, features: Sequence[np.ndarray] | None, rows: Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = lower.batch(rows, self.encoder.device)
        feats = _pad_features(features, rows, states.shape[1]) if self.model.feature_dim else None
        return self.model(states, mask, None if feats is None else feats.to(self.encoder.device)), states

    @torch.no_grad()
    def token_probs(self, lower: LowerStates, index: Sequence[int] | None = None, batch_size: int = 128, *,
                    features: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """(tokens, tags) probabilities for the texts in ``index`` (all by default), in that order;
        ``features``: every text's :attr:`Tokenized.features` (needed when the tagger reads them)."""
        self.model.eval()
        index = list(range(len(lower))) if index is None else list(index)
        out: list[np.ndarray] = [np.zeros(0)] * len(index)
        order = sorted(range(len(index)), key=lambda j: lower.lengths[index[j]])
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            logits, _ = self._logits(lower, features, [index[j] for j in chunk])
            probs = F.softmax(logits, dim=-1).cpu().numpy()
            for k, j in enumerate(chunk):
                out[j] = probs[k, : lower.lengths[index[j]]]
        return out

    def fit(self, lower: LowerStates, tags: Sequence[np.ndarray], index: Sequence[int] | None = None, *,
            gold: np.ndarray | None = None, score: bool = True, features: Sequence[np.ndarray] | None = None,
            on_epoch: Callable[[int, int, dict[str, float]], None] | None = None) -> TaggerOutput | None:
        """Train on the texts in ``index`` (all by default); ``gold`` marks human-labelled texts (always clean).

        With ``score`` (default) the trained tagger then scores its training texts (one more pass): losses
        and the final clean split. Cross-fitting skips that pass (it scores held-out texts instead).
        """
        cfg = self.config
        device = self.encoder.device
        index = np.arange(len(tags)) if index is None else np.asarray(index)
        gold = np.zeros(len(tags), dtype=bool) if gold is None else np.asarray(gold, dtype=bool)
        rng = np.random.default_rng(cfg.seed)
        lengths = lower.lengths[index]
        head = list(self.model.head.parameters())
        if self.model.feature_dim:
            head += list(self.model.features.parameters())
        top = [p for p in self.model.top.parameters() if p.requires_grad]
        optim = torch.optim.AdamW([{"params": top, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
                                  weight_decay=cfg.weight_decay)
        epochs = self.epochs_for(len(index))
        steps_total = epochs * ((len(index) + cfg.batch_size - 1) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: max(0.0, 1 - s / max(1, steps_total)))
        clean = np.ones(len(tags), dtype=bool)
        for epoch in range(epochs):
            robust_phase = cfg.robust and epoch >= cfg.warmup_epochs
            if robust_phase:
                clean = self._split(lower, tags, index, gold, features)[0]
            self.model.train()
            total, steps = 0.0, 0
            for batch in _batches(lengths, cfg.batch_size, rng):
                rows = index[batch]
                logits, states = self._logits(lower, features, rows)
                y = _pad_tags(tags, rows, states.shape[1]).to(device)
                if robust_phase:
                    noisy = torch.as_tensor(~clean[rows], device=device)[:, None]
                    disagree = logits.detach().argmax(-1) != y
                    y = y.masked_fill(noisy & disagree, IGNORE)
                if not (y != IGNORE).any():
                    continue
                loss = F.cross_entropy(logits.reshape(-1, self.num_tags), y.reshape(-1), ignore_index=IGNORE)
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(top + head, 1.0)
                optim.step()
                sched.step()
                total += float(loss.detach())
                steps += 1
            if on_epoch is not None:
                on_epoch(epoch + 1, epochs, {"loss": total / max(1, steps), "clean": float(clean[index].mean())})
        if not score:
            return None
        clean_mask, clean_prob, losses = self._split(lower, tags, index, gold, features)
        return TaggerOutput(losses, clean_mask[index], clean_prob[index])

    def epochs_for(self, n_train: int) -> int:
        """Epochs for a tagger that trains on ``n_train`` sentences (``classifier.epochs_for``)."""
        cfg = self.config
        return epochs_for(n_train, cfg.epochs, cfg.min_steps, cfg.batch_size)

    def _split(self, lower: LowerStates, tags: Sequence[np.ndarray], index: np.ndarray, gold: np.ndarray,
               features: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clean mask and clean probability over all texts (only ``index`` is scored; gold is always clean),
        and the sentence losses of ``index``."""
        losses = sentence_losses(self.token_probs(lower, index, features=features), [tags[i] for i in index])
        clean = np.ones(len(tags), dtype=bool)
        prob = np.ones(len(tags))
        clean[index], prob[index] = split_clean_noisy(losses, threshold=self.config.clean_threshold,
                                                      seed=self.config.seed)
        clean |= gold
        prob[gold] = 1.0
        return clean, prob, losses


def sentence_losses(probs: Sequence[np.ndarray], tags: Sequence[np.ndarray]) -> np.ndarray:
    """Mean token cross-entropy of each sentence's tags (IGNORE skipped); NaN for a sentence with no tag."""
    out = np.full(len(tags), np.nan)
    for i, (p, t) in enumerate(zip(probs, tags)):
        keep = t != IGNORE
        if keep.any():
            out[i] = float(-np.log(np.clip(p[np.flatnonzero(keep), t[keep]], 1e-12, 1.0)).mean())
    return out


# --- detection ---------------------------------------------------------------------------------------

def doubt_score(probs: np.ndarray, tags: np.ndarray) -> float:
    """How likely, under the held-out tagger, the label's most doubtful word tag is wrong: ``max_w 1 - p(tag_w)``.

    Over the tagged words (tokens whose tag is not IGNORE); 0 for no word. Above 0.5 the tagger prefers
    another tag for some word, which is when :func:`judge_spans` usually finds a disagreement. A maximum,
    not a product over words, so a long clean sentence does not look doubtful for its length alone.
    """
    keep = tags != IGNORE
    if not keep.any():
        return 0.0
    return float(1.0 - probs[np.flatnonzero(keep), tags[keep]].min())


@dataclass
class CrossFitResult:
    """Out-of-fold evidence for every sentence, and the fold taggers (to predict new texts as an ensemble)."""

    predicted: list[list[Span]]  # spans the held-out tagger predicts (score: lowest word-tag probability)
    judgements: list[list[SpanJudgement]]
    doubt: np.ndarray  # (n,) see doubt_score
    losses: np.ndarray  # (n,) held-out mean token loss of the noisy label
    flagged: np.ndarray  # (n,) bool: the tagger disagrees and clean_prob < SPAN_FLAG_BELOW
    truncated_spans: int  # label spans past the encoder's max_length, never seen by the tagger
    models: list[SpanModel] = field(default_factory=list)
    clean_prob: np.ndarray | None = None  # (n,) P(label spans right), detection.span_clean_probability
    words_right: np.ndarray | None = None  # (n,) detection.span_words_right (NaN: gold or unlabelled)
    embeddings: np.ndarray | None = None  # (n, K*hidden) pooled top-layer states of the K taggers (retrieval)
    fold: np.ndarray | None = None  # (n,) the fold whose tagger judged the sentence
    evidence: dict[str, float] | None = None  # detection.span_judge_evidence (run health)

    def predict(self, lower: LowerStates, tok: Tokenized, types: Sequence[str]) -> list[list[Span]]:
        """Spans for new texts from the mean of the fold taggers' tag probabilities."""
        return ensemble_predict(self.models, lower, tok, types)


def ensemble_predict(models: Sequence[SpanModel], lower: LowerStates, tok: Tokenized, types: Sequence[str]
                     ) -> list[list[Span]]:
    """Decode the mean tag probabilities of ``models`` into spans (score: the lowest word-tag probability)."""
    probs = [m.token_probs(lower, features=tok.features) for m in models]
    constrained = all(m.config.constrained for m in models)
    out = []
    for i in range(len(lower)):
        p = np.mean([pr[i] for pr in probs], axis=0)
        out.append(decode(p, tok.offsets[i], tok.word_ids[i], types, constrained=constrained))
    return out


def decode(probs: np.ndarray, offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None],
           types: Sequence[str], *, constrained: bool = True) -> list[Span]:
    """Spans from one text's (tokens, tags) probabilities; a span's score is its lowest word-tag probability.

    ``constrained``: the most probable tag sequence over the words (first sub-tokens) in which every
    ``I-T`` follows ``B-T`` or ``I-T`` (Viterbi over log-probabilities, no learnt transitions); otherwise
    each word's argmax tag (an ``I-T`` after ``O`` then opens a span).
    """
    firsts = [first for first, _, _ in token_words(offsets, word_ids)]
    tags = probs.argmax(-1)
    if constrained and firsts:
        tags = tags.copy()
        tags[firsts] = viterbi_bio(probs[firsts], len(types))
    chosen = probs[np.arange(len(tags)), tags]
    return bio_to_spans(tags.tolist(), offsets, word_ids, types, probs=chosen.tolist())


def _bio_allowed(num_types: int) -> np.ndarray:
    """(from, to) allowed transitions over ``bio_labels`` ids (O, B-T1, I-T1, B-T2, ...); row -1 ... start."""
    n = 1 + 2 * num_types
    allowed = np.ones((n, n), dtype=bool)
    for t in range(num_types):
        inside = 2 + 2 * t
        allowed[:, inside] = False
        allowed[inside - 1, inside] = allowed[inside, inside] = True
    return allowed


def viterbi_bio(probs: np.ndarray, num_types: int) -> np.ndarray:
    """The most probable valid BIO tag sequence for (words, tags) probabilities (no I-T opening a sequence
    or following O or another type)."""
    allowed = _bio_allowed(num_types)
    trans = np.where(allowed, 0.0, -np.inf)
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    start = np.where(allowed[0], 0.0, -np.inf)  # a sequence starts as if after O
    score = logp[0] + start
    back = np.zeros(probs.shape, dtype=np.int64)
    for w in range(1, len(probs)):
        cand = score[:, None] + trans
        back[w] = cand.argmax(0)
        score = cand.max(0) + logp[w]
    out = np.zeros(len(probs), dtype=np.int64)
    out[-1] = int(score.argmax())
    for w in range(len(probs) - 1, 0, -1):
        out[w - 1] = back[w, out[w]]
    return out


def cross_fit(encoder: Encoder, texts: Sequence[str], spans: Sequence[Sequence[Span]], types: Sequence[str], *,
              folds: int = 2, train_layers: int = 1, config: SpanSLMConfig | None = None,
              gold: np.ndarray | None = None, lower: LowerStates | None = None,
              labelled: np.ndarray | None = None, with_embeddings: bool = False,
              on_fold: Callable[[int, int], None] | None = None) -> CrossFitResult:
    """Train ``folds`` taggers, each on the other folds, and judge each held-out sentence's label spans.

    ``lower`` may pass precomputed lower states (split = ``encoder.split_for(train_layers)``, same max_length).
    ``labelled`` (default: all) marks the sentences with a label to train on; the others are only
    predicted. ``with_embeddings`` adds the taggers' pooled states (for demo retrieval).
    """
    cfg = config or SpanSLMConfig()
    n = len(texts)
    tok = tokenize(encoder, texts, cfg.max_length, cfg.feature_buckets)
    tags, lost = encode_tags(tok, spans, types)
    split = encoder.split_for(train_layers)
    if lower is None:
        lower = encoder.lower_states(texts, split, max_length=cfg.max_length)
    gold = np.zeros(n, dtype=bool) if gold is None else np.asarray(gold, dtype=bool)
    labelled = np.ones(n, dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
    # copies of a sentence share a fold: a tagger that trained on one copy would "confirm" the other
    assign = np.maximum(group_folds(text_groups(texts), np.arange(n), max(2, folds), cfg.seed), 0)
    probs: list[np.ndarray] = [np.zeros(0)] * n
    models: list[SpanModel] = []
    for k in range(max(2, folds)):
        held = np.flatnonzero(assign == k)
        model = SpanModel(encoder, types, train_layers=train_layers, config=cfg)
        model.fit(lower, tags, np.flatnonzero((assign != k) & labelled), gold=gold, score=False,
                  features=tok.features)
        for i, p in zip(held, model.token_probs(lower, held, features=tok.features)):
            probs[i] = p
        models.append(model)
        if on_fold is not None:
            on_fold(k + 1, max(2, folds))
    predicted = [decode(probs[i], tok.offsets[i], tok.word_ids[i], types, constrained=cfg.constrained)
                 for i in range(n)]
    visible = [[s for s in spans[i] if s.start < _last_end(tok.offsets[i])] for i in range(n)]
    judgements = [judge_spans(visible[i], predicted[i]) for i in range(n)]
    doubt = np.array([doubt_score(probs[i], tags[i]) for i in range(n)])
    doubt[gold] = 0.0
    words = [tags[i] != IGNORE for i in range(n)]
    word_probs, word_tags = [probs[i][words[i]] for i in range(n)], [tags[i][words[i]] for i in range(n)]
    words_right = span_words_right(word_probs, word_tags, labelled & ~gold)
    clean_prob = span_clean_probability(doubt, labelled & ~gold, words_right)
    clean_prob[gold] = 1.0
    flagged = np.array([bool(j) for j in judgements]) & (clean_prob < SPAN_FLAG_BELOW) & labelled & ~gold
    emb = pooled_embeddings(models, lower) if with_embeddings else None
    evidence = span_judge_evidence(word_probs, word_tags, labelled & ~gold)
    return CrossFitResult(predicted, judgements, doubt, sentence_losses(probs, tags), flagged, lost, models,
                          clean_prob, words_right, emb, assign, evidence)


@torch.no_grad()
def pooled_embeddings(models: Sequence[SpanModel], lower: LowerStates, batch_size: int = 128) -> np.ndarray:
    """Per text: the L2-normalised concatenation of each tagger's mean-pooled top-layer states."""
    n = len(lower)
    parts = []
    for m in models:
        m.model.eval()
        out = np.zeros((n, m.encoder.hidden_size), dtype=np.float32)
        for start in range(0, n, batch_size):
            index = list(range(start, min(start + batch_size, n)))
            states, mask = lower.batch(index, m.encoder.device)
            out[start:start + len(index)] = mean_pool(m.model.hidden(states, mask), mask).cpu().numpy()
        parts.append(out)
    emb = np.concatenate(parts, axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)


def _last_end(offsets: Sequence[tuple[int, int]]) -> int:
    return max((e for _, e in offsets), default=0)
