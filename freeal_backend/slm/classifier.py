"""The small model (SLM): robust self-training on noisy LLM labels (FreeAL step 2), cross-fitted.

Recipe (FREEAL.md, the authors' trainer ``mytrainer.py``): warm-up epochs of plain cross-entropy; then,
before each epoch, a 2-component GMM over each training text's loss under the model as the previous epoch
left it (a separate pass in eval mode, no dropout) splits clean from noisy; loss = CE(clean) + w * (mixup
on clean + consistency between a text and an augmented view: CE on clean, sharpened KL towards the other
view's detached prediction summed over the rest), w ramping up linearly from the start.
The texts are split into K folds and K such models are trained, each judging the fold it never saw:
the split, agreed pool, pseudo-labels and review score downstream all use these out-of-sample
probabilities, never a model's verdict on labels it memorised. Copies of a text (same text up to case
and whitespace) share a fold, and each fold model picks its epoch on an inner split of its own training
folds, never on the labels it judges. Only the top ``train_layers`` encoder layers and the head are
trained; the lower layers' output is cached once (see encoder.py).
"""
from __future__ import annotations

import copy
import logging
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import GroupKFold, GroupShuffleSplit
from torch import nn

from freeal_backend.slm.encoder import Encoder, LowerStates, mean_pool, run_layers
from freeal_backend.slm.selection import split_clean_noisy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SLMConfig:
    epochs: int = 2
    min_steps: int = 0  # at least this many optimiser steps per fold model (Settings.slm_min_steps: 50)
    warmup_epochs: int = 1  # epochs of plain cross-entropy on every label before the small-loss split
    ramp_epochs: int = 10  # the regulariser weight ramps linearly from 0 at the start over this many epochs
    folds: int = 3  # cross-fitting: each text is judged by a model that never trained on its label
    lr: float = 1e-4
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    batch_size: int = 32
    dropout: float = 0.1
    clean_threshold: float = 0.7
    mixup_alpha: float = 4.0
    temperature: float = 0.85  # consistency: the student's logits are divided by it (sharpened)
    token_drop: float = 0.15
    robust: bool = True  # False: plain cross-entropy on every label (the naive baseline)
    val_share: float = 0.1  # share of each fold model's training texts held out to pick its epoch
    seed: int = 0


@dataclass
class SLMOutput:
    """What the cross-fitted SLM says about every text.

    ``oof_probs`` come from the fold model that did not train on the text's label (out of sample: the
    evidence for detection); unlabelled and human-labelled texts get the mean of every fold model.
    """

    oof_probs: np.ndarray  # (n, classes)
    embeddings: np.ndarray  # (n, K*hidden) L2-normalised concatenation of the K fold models' pooled states
    losses: np.ndarray  # (n,) out-of-sample CE against the training label, NaN where unlabelled
    clean: np.ndarray  # (n,) bool, GMM small-loss split of the out-of-sample losses (human labels clean)
    clean_prob: np.ndarray  # (n,)
    fold: np.ndarray  # (n,) the fold whose model judged the text; -1: judged by every fold model (see above)
    best_epochs: list[int] = field(default_factory=list)  # per fold model: the epoch it stopped at, from 1
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def probs(self) -> np.ndarray:
        return self.oof_probs


class TopLayers(nn.Module):
    """Trainable copies of the encoder's top layers + dropout + a linear head of ``outputs``, fed with
    cached lower-layer states (the text classifier and the span tagger share it)."""

    def __init__(self, encoder: Encoder, train_layers: int, outputs: int, dropout: float) -> None:
        super().__init__()
        self.split = encoder.split_for(train_layers)
        self.top = nn.ModuleList(copy.deepcopy(layer) for layer in encoder.layers[self.split:])
        for p in self.top.parameters():
            p.requires_grad_(True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.hidden_size, outputs)
        self._layer_inputs = encoder.layer_inputs  # frozen (MPNet's position bias): not a trained parameter

    def hidden(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token hidden states after the trainable top layers."""
        return run_layers(self.top, states, self._layer_inputs(states, mask))


class SLMClassifier(TopLayers):
    """The text classifier: top layers, mean pooling, dropout, linear head over the classes."""

    def pooled(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(self.hidden(states, mask), mask)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooled(states, mask)
        return self.head(self.dropout(pooled)), pooled


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar lengths (little padding), in shuffled order."""
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _drop_tokens(mask: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving augmentation on cached states: hide a random share of tokens (never the first)."""
    keep = (torch.rand(mask.shape, generator=gen) >= rate).to(mask.device, mask.dtype)
    keep[:, 0] = 1.0
    return mask * keep


def _consistency(logits: torch.Tensor, aug_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The authors' consistency on noisy samples: each view's sharpened output (logits / T) is pulled
    towards the other view's detached prediction, symmetric KL *summed* over the noisy samples.

    ``mytrainer.py`` uses ``KLDivLoss(reduction='sum')`` here while its CE and mixup terms are means, so
    the term weighs as much as the batch holds noisy samples: with batch 32 and a third of it noisy, ~11x
    a per-sample mean (``batchmean``, used here before). Kept at the authors' scale.
    """
    def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.softmax(teacher.detach(), dim=-1),
                        reduction="sum")
    return 0.5 * (kl(logits, aug_logits) + kl(aug_logits, logits))


def epochs_for(n_train: int, epochs: int, min_steps: int, batch_size: int) -> int:
    """``epochs`` over ``n_train`` texts, or more when that would be fewer than ``min_steps`` optimiser steps of
    ``batch_size`` (a small project's judge stays near chance after a handful of steps)."""
    return max(epochs, -(-min_steps // max(1, -(-n_train // batch_size))))


def text_groups(texts: Sequence[str]) -> np.ndarray:
    """Group id per text: equal ids for texts identical after NFKC, case folding and collapsing whitespace."""
    keys: dict[str, int] = {}
    return np.array([keys.setdefault(" ".join(unicodedata.normalize("NFKC", t).casefold().split()), len(keys))
                     for t in texts], dtype=np.int64)


def group_folds(groups: np.ndarray, eligible: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold per text (-1 outside ``eligible``): the eligible texts' groups shuffled into ``folds`` folds
    (scikit-learn's GroupKFold), so the copies of a text share a fold. All -1 when fewer than 2 groups."""
    fold_of = np.full(len(groups), -1)
    eligible = np.asarray(eligible, dtype=int)
    k = min(folds, len(np.unique(groups[eligible])))
    if k < 2:
        return fold_of
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(splitter.split(eligible, groups=groups[eligible])):
        fold_of[eligible[test]] = f
    return fold_of


MIN_VALIDATION_GROUPS = 5  # fewer texts (groups) than this to hold out: no early stopping, last epoch kept


def inner_split(train: np.ndarray, groups: np.ndarray, gold: np.ndarray, share: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to train on, rows that pick the epoch): ``share`` of the training groups without a human label
    (scikit-learn's GroupShuffleSplit); human labels always train. No validation rows when too few."""
    human_groups = np.unique(groups[train[gold[train]]])
    candidates = train[~np.isin(groups[train], human_groups)]
    n_groups = len(np.unique(groups[candidates]))
    n_val = int(np.ceil(share * n_groups))
    if n_val < MIN_VALIDATION_GROUPS or n_val >= n_groups:
        return train, train[:0]
    _, val = next(GroupShuffleSplit(n_splits=1, test_size=share, random_state=seed)
                  .split(candidates, groups=groups[candidates]))
    val_rows = np.sort(candidates[val])
    return np.setdiff1d(train, val_rows), val_rows


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """AdamW groups: weight decay on weight matrices only, never on biases or LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


EpochCallback = Callable[[int, int, dict[str, float]], None]


class SmallModel:
    """The SLM: K fold models over cached lower states, trained by cross-fitting, applied as an ensemble.

    Fold model f trains on every label outside fold f (human labels in every fold) and judges fold f, so
    each LLM label is judged by a model that never saw it: detection evidence the SLM has not memorised.
    Each fold model stops early at the epoch with the lowest loss against the (noisy) labels of an inner
    validation split of its training folds (``val_share``), never against the fold it judges.
    """

    def __init__(self, encoder: Encoder, num_classes: int, *, train_layers: int = 4,
                 config: SLMConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config or SLMConfig()
        self.num_classes = num_classes
        self.train_layers = train_layers
        self.models: list[SLMClassifier] = []

    @property
    def split(self) -> int:
        return self.encoder.split_for(self.train_layers)

    def _new_model(self, seed: int) -> SLMClassifier:
        torch.manual_seed(seed)
        return SLMClassifier(self.encoder, self.train_layers, self.num_classes,
                             self.config.dropout).to(self.encoder.device)

    def save(self, path: Path) -> None:
        """Write the fold models' trained layers and heads (atomically: a crash never leaves half a file)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save([m.state_dict() for m in self.models], tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        states = torch.load(path, map_location=self.encoder.device, weights_only=True)
        self.models = []
        for i, state in enumerate(states):
            model = self._new_model(i)
            model.load_state_dict(state)
            self.models.append(model)

    @torch.no_grad()
    def _predict(self, model: SLMClassifier, lower: LowerStates, index: np.ndarray | None = None,
                 batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """(probs, normalised pooled embeddings) of one model for ``index`` (default: every text), in order."""
        model.eval()
        index = np.arange(len(lower)) if index is None else np.asarray(index, dtype=int)
        probs = np.zeros((len(index), self.num_classes), dtype=np.float32)
        emb = np.zeros((len(index), self.encoder.hidden_size), dtype=np.float32)
        lengths = lower.lengths[index]
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(index), batch_size):
            pos = order[start:start + batch_size]
            states, mask = lower.batch(index[pos], self.encoder.device)
            logits, pooled = model(states, mask)
            probs[pos] = F.softmax(logits, dim=-1).cpu().numpy()
            emb[pos] = F.normalize(pooled, dim=-1).cpu().numpy()
        return probs, emb

    def evaluate(self, lower: LowerStates) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble (mean probs, L2-normalised concatenated embeddings) for every text, in order."""
        if not self.models:
            raise RuntimeError("the SLM is not trained")
        outs = [self._predict(m, lower) for m in self.models]
        probs = np.mean([p for p, _ in outs], axis=0)
        emb = np.concatenate([e for _, e in outs], axis=1) / np.sqrt(len(outs))
        return probs, emb

    def fit(self, lower: LowerStates, labels: np.ndarray, *, gold: np.ndarray | None = None,
            augmented: LowerStates | None = None, groups: np.ndarray | None = None,
            on_epoch: EpochCallback | None = None) -> SLMOutput:
        """Cross-fit on ``labels`` (class index, -1 = unlabelled); ``gold`` marks human labels (always clean);
        ``groups`` (see :func:`text_groups`; default: every text its own) keeps copies of a text in one fold."""
        cfg = self.config
        labels = np.asarray(labels)
        n = len(labels)
        gold = np.zeros(n, dtype=bool) if gold is None else np.asarray(gold, dtype=bool)
        groups = np.arange(n) if groups is None else np.asarray(groups)
        labelled = labels >= 0
        fold_of = group_folds(groups, np.flatnonzero(labelled & ~gold), cfg.folds, cfg.seed)
        folds = max(1, int(fold_of.max()) + 1)  # 1: too few labels to hold any out, in-sample evidence
        oof = np.zeros((n, self.num_classes), dtype=np.float32)
        ensemble = np.zeros((n, self.num_classes), dtype=np.float32)
        hidden = self.encoder.hidden_size
        emb = np.zeros((n, folds * hidden), dtype=np.float32)  # filled per fold: no list + concatenate copy
        seconds: list[float] = []
        best_epochs: list[int] = []
        self.models = []
        for f in range(folds):
            held = np.flatnonzero(fold_of == f)
            train, val = inner_split(np.flatnonzero(labelled & (fold_of != f)), groups, gold, cfg.val_share,
                                     cfg.seed + f)
            model = self._new_model(cfg.seed * 1000 + f)
            best_epochs.append(self._train_one(model, lower, labels, gold, augmented, train, val, f, folds,
                                               on_epoch, seconds))
            probs, emb[:, f * hidden:(f + 1) * hidden] = self._predict(model, lower)
            oof[held] = probs[held]
            ensemble += probs / folds
            self.models.append(model)
        outside = fold_of < 0
        oof[outside] = ensemble[outside]
        losses = self._losses(oof, labels)
        clean, clean_prob = split_clean_noisy(np.where(gold, np.nan, losses), threshold=cfg.clean_threshold,
                                              seed=cfg.seed)
        clean |= gold
        clean_prob[gold] = 1.0
        emb /= np.sqrt(folds)
        return SLMOutput(oof, emb, losses, clean, clean_prob, fold_of, best_epochs, seconds)

    def epochs_for(self, n_train: int) -> int:
        """Epochs for a fold model that trains on ``n_train`` texts (:func:`epochs_for`; the inner split still
        picks the best epoch)."""
        cfg = self.config
        return epochs_for(n_train, cfg.epochs, cfg.min_steps, cfg.batch_size)

    def _train_one(self, model: SLMClassifier, lower: LowerStates, labels: np.ndarray, gold: np.ndarray,
                   augmented: LowerStates | None, train: np.ndarray, val: np.ndarray, fold: int, folds: int,
                   on_epoch: EpochCallback | None, seconds: list[float]) -> int:
        """Train one fold model on ``train``; leave it at the epoch with the lowest loss on ``val`` (the last
        epoch when ``val`` is empty) and return that epoch (from 1).

        Recipe: AdamW (no decay on biases/LayerNorm), linear lr decay to 0, warm-up epochs of plain CE;
        each robust epoch first scores every training text with the model as the last epoch left it, in
        eval mode (the authors' separate pass: no dropout, no half-trained early batches), and keeps CE on
        the small-loss side of a GMM over those losses; mixup and consistency ramp up from the start.
        """
        cfg = self.config
        device = self.encoder.device
        rng = np.random.default_rng(cfg.seed + 7919 * fold)
        gen = torch.Generator().manual_seed(cfg.seed + fold)
        lengths = lower.lengths
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
        steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
        epochs = self.epochs_for(len(train))
        total_steps = steps_per_epoch * epochs
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: max(0.0, 1.0 - step / total_steps))
        targets = torch.as_tensor(np.where(labels >= 0, labels, 0), dtype=torch.long)
        clean = np.ones(len(labels), dtype=bool)
        best_loss, best_state, best_epoch = np.inf, None, epochs
        step = 0
        for epoch in range(epochs):
            start = time.perf_counter()
            if cfg.robust and epoch >= cfg.warmup_epochs:
                seen = np.full(len(labels), np.nan)
                seen[train] = self._losses(self._predict(model, lower, train)[0], labels[train])
                clean, _ = split_clean_noisy(np.where(gold, np.nan, seen), threshold=cfg.clean_threshold,
                                             seed=cfg.seed)
                clean |= gold
            model.train()
            total = 0.0
            for index in _batches(lengths[train], cfg.batch_size, rng):
                index = train[index]
                states, mask = lower.batch(index, device)
                logits, pooled = model(states, mask)
                y = targets[index].to(device)
                ce = F.cross_entropy(logits, y, reduction="none")
                is_clean = torch.as_tensor(clean[index], device=device)
                loss = ce[is_clean].mean() if is_clean.any() else logits.sum() * 0
                if cfg.robust:
                    weight = min(1.0, (step / steps_per_epoch) / max(1, cfg.ramp_epochs))
                    loss = loss + weight * self._regularisers(model, index, logits, pooled, y, is_clean, lower,
                                                              augmented, mask, gen, rng)
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optim.step()
                sched.step()
                step += 1
                total += float(loss.detach())
            val_loss = float("nan")
            if len(val):
                val_loss = float(np.mean(self._losses(self._predict(model, lower, val)[0], labels[val])))
                if val_loss < best_loss:
                    best_loss, best_epoch = val_loss, epoch + 1
                    best_state = copy.deepcopy(model.state_dict()) if epoch + 1 < epochs else None
            seconds.append(time.perf_counter() - start)
            if on_epoch is not None:
                on_epoch(fold * epochs + epoch + 1, folds * epochs,
                         {"loss": total / steps_per_epoch, "val_loss": val_loss, "clean": float(clean[train].mean())})
        if best_state is not None and best_epoch < epochs:
            model.load_state_dict(best_state)
        return best_epoch

    def _regularisers(self, model: SLMClassifier, index: np.ndarray, logits: torch.Tensor, pooled: torch.Tensor,
                      y: torch.Tensor, is_clean: torch.Tensor, lower: LowerStates, augmented: LowerStates | None,
                      mask: torch.Tensor, gen: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
        """Mixup on clean samples + consistency with an augmented view (CE on clean, sharpened KL on the rest)."""
        cfg = self.config
        device = logits.device
        extra = logits.sum() * 0
        n_clean = int(is_clean.sum())
        if n_clean >= 2:
            lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            lam = max(lam, 1 - lam)
            p_clean = pooled[is_clean]
            y_clean = F.one_hot(y[is_clean], self.num_classes).float()
            perm = torch.randperm(n_clean, generator=gen).to(device)
            mixed = lam * p_clean + (1 - lam) * p_clean[perm]
            mixed_y = lam * y_clean + (1 - lam) * y_clean[perm]
            mix_logits = model.head(model.dropout(mixed))
            extra = extra + -(mixed_y * F.log_softmax(mix_logits, dim=-1)).sum(-1).mean()
        if augmented is not None:
            aug_states, aug_mask = augmented.batch(index, device)
        else:
            aug_states, aug_mask = lower.batch(index, device)[0], _drop_tokens(mask, cfg.token_drop, gen)
        aug_logits, _ = model(aug_states, aug_mask)
        if n_clean:
            extra = extra + F.cross_entropy(aug_logits[is_clean], y[is_clean])
        if n_clean < len(index):
            noisy = ~is_clean
            extra = extra + _consistency(logits[noisy], aug_logits[noisy], cfg.temperature)
        return extra

    @staticmethod
    def _losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        losses = np.full(len(labels), np.nan)
        ok = labels >= 0
        losses[ok] = -np.log(np.clip(probs[ok, labels[ok]], 1e-12, 1.0))
        return losses
