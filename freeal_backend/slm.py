"""The small model (SLM): robust self-training on noisy LLM labels (FreeAL step 2).

Recipe (FREEAL.md): warm-up on all labels; then, every epoch, a 2-component GMM over normalised
per-sample losses splits clean from noisy; loss = CE(clean) + w * (mixup on clean + consistency
between a text and an augmented view: CE on clean, symmetric KL on the rest), w ramping up linearly.
Only the top ``train_layers`` encoder layers and the head are trained; the lower layers' output is
cached once (see encoder.py). Mixup mixes pooled sentence representations (manifold mixup).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder, LowerStates, _layer_out, additive_mask, mean_pool
from .selection import split_clean_noisy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SLMConfig:
    epochs: int = 6
    warmup_epochs: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    dropout: float = 0.1
    clean_threshold: float = 0.7
    mixup_alpha: float = 4.0
    temperature: float = 2.0
    token_drop: float = 0.15
    robust: bool = True  # False: plain cross-entropy on every label (the naive baseline)
    seed: int = 0


@dataclass
class SLMOutput:
    """What the trained SLM says about every sample it was trained on."""

    probs: np.ndarray  # (n, classes)
    embeddings: np.ndarray  # (n, hidden) L2-normalised pooled representations
    losses: np.ndarray  # (n,) CE against the training label, NaN where unlabelled
    clean: np.ndarray  # (n,) bool, GMM small-loss split (human labels always clean)
    clean_prob: np.ndarray  # (n,)


class SLMClassifier(nn.Module):
    """Copies of the encoder's top layers + dropout + linear head, fed with cached lower-layer states."""

    def __init__(self, encoder: Encoder, train_layers: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.split = max(0, encoder.num_layers - train_layers)
        self.top = nn.ModuleList(copy.deepcopy(layer) for layer in encoder.layers[self.split:])
        for p in self.top.parameters():
            p.requires_grad_(True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.hidden_size, num_classes)

    def pooled(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = additive_mask(mask, states.dtype)
        hidden = states
        for layer in self.top:
            hidden = _layer_out(layer(hidden, attention_mask=attn))
        return mean_pool(hidden, mask)

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


def _sym_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float) -> torch.Tensor:
    pa = F.log_softmax(logits_a / temperature, dim=-1)
    pb = F.log_softmax(logits_b / temperature, dim=-1)
    return 0.5 * (F.kl_div(pa, pb, log_target=True, reduction="batchmean")
                  + F.kl_div(pb, pa, log_target=True, reduction="batchmean"))


class SmallModel:
    """Trains and applies one SLM over cached lower states."""

    def __init__(self, encoder: Encoder, num_classes: int, *, train_layers: int = 2,
                 config: SLMConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config or SLMConfig()
        self.num_classes = num_classes
        torch.manual_seed(self.config.seed)
        self.model = SLMClassifier(encoder, train_layers, num_classes, self.config.dropout).to(encoder.device)

    @property
    def split(self) -> int:
        return self.model.split

    def save(self, path: Path) -> None:
        """Write the trained top layers and head (atomically: a crash never leaves half a file)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.model.state_dict(), tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        self.model.load_state_dict(torch.load(path, map_location=self.encoder.device, weights_only=True))

    @torch.no_grad()
    def evaluate(self, lower: LowerStates, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """(probs, normalised pooled embeddings) for every text, in order."""
        self.model.eval()
        n = len(lower.states)
        probs = np.zeros((n, self.num_classes), dtype=np.float32)
        emb = np.zeros((n, self.encoder.hidden_size), dtype=np.float32)
        lengths = np.array([s.shape[0] for s in lower.states])
        order = np.argsort(lengths, kind="stable")
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            states, mask = lower.batch(index, self.encoder.device)
            logits, pooled = self.model(states, mask)
            probs[index] = F.softmax(logits, dim=-1).cpu().numpy()
            emb[index] = F.normalize(pooled, dim=-1).cpu().numpy()
        return probs, emb

    def fit(self, lower: LowerStates, labels: np.ndarray, *, gold: np.ndarray | None = None,
            augmented: LowerStates | None = None,
            on_epoch: Callable[[int, int, dict[str, float]], None] | None = None) -> SLMOutput:
        """Train on ``labels`` (class index, -1 = unlabelled); ``gold`` marks human labels (always clean)."""
        cfg = self.config
        device = self.encoder.device
        labels = np.asarray(labels)
        gold = np.zeros(len(labels), dtype=bool) if gold is None else np.asarray(gold, dtype=bool)
        labelled = labels >= 0
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        lengths = np.array([s.shape[0] for s in lower.states])
        params = [p for p in self.model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        targets = torch.as_tensor(np.where(labelled, labels, 0), dtype=torch.long)
        clean = labelled.copy()
        ramp = max(1, cfg.epochs - cfg.warmup_epochs)
        for epoch in range(cfg.epochs):
            robust_phase = cfg.robust and epoch >= cfg.warmup_epochs
            if robust_phase:
                clean, _ = self._split(lower, labels, gold)
            weight = min(1.0, (epoch - cfg.warmup_epochs + 1) / ramp) if robust_phase else 0.0
            pool = np.arange(len(labels)) if robust_phase else np.flatnonzero(labelled)
            self.model.train()
            total, steps = 0.0, 0
            for index in _batches(lengths[pool], cfg.batch_size, rng):
                index = pool[index]
                states, mask = lower.batch(index, device)
                logits, pooled = self.model(states, mask)
                y = targets[index].to(device)
                is_clean = torch.as_tensor(clean[index], device=device)
                loss = F.cross_entropy(logits[is_clean], y[is_clean]) if is_clean.any() else logits.sum() * 0
                if robust_phase:
                    loss = loss + weight * self._regularisers(index, logits, pooled, y, is_clean, lower,
                                                              augmented, mask, gen, rng)
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optim.step()
                total += float(loss.detach())
                steps += 1
            if on_epoch is not None:
                on_epoch(epoch + 1, cfg.epochs, {"loss": total / max(1, steps), "clean": float(clean[labelled].mean())
                                                 if labelled.any() else 0.0})
        probs, emb = self.evaluate(lower)
        losses = self._losses(probs, labels)
        if cfg.robust:
            clean_mask, clean_prob = split_clean_noisy(losses, threshold=cfg.clean_threshold, seed=cfg.seed)
        else:
            clean_mask, clean_prob = labelled.copy(), labelled.astype(float)
        clean_mask |= gold
        clean_prob[gold] = 1.0
        return SLMOutput(probs, emb, losses, clean_mask, clean_prob)

    def _regularisers(self, index: np.ndarray, logits: torch.Tensor, pooled: torch.Tensor, y: torch.Tensor,
                      is_clean: torch.Tensor, lower: LowerStates, augmented: LowerStates | None,
                      mask: torch.Tensor, gen: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
        """Mixup on clean samples + consistency with an augmented view (CE on clean, symmetric KL on the rest)."""
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
            mix_logits = self.model.head(self.model.dropout(mixed))
            extra = extra + -(mixed_y * F.log_softmax(mix_logits, dim=-1)).sum(-1).mean()
        if augmented is not None:
            aug_states, aug_mask = augmented.batch(index, device)
        else:
            aug_states, aug_mask = lower.batch(index, device)[0], _drop_tokens(mask, cfg.token_drop, gen)
        aug_logits, _ = self.model(aug_states, aug_mask)
        if n_clean:
            extra = extra + F.cross_entropy(aug_logits[is_clean], y[is_clean])
        if n_clean < len(index):
            noisy = ~is_clean
            extra = extra + _sym_kl(logits[noisy], aug_logits[noisy], cfg.temperature)
        return extra

    def _split(self, lower: LowerStates, labels: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, _ = self.evaluate(lower)
        clean, prob = split_clean_noisy(self._losses(probs, labels), threshold=self.config.clean_threshold,
                                        seed=self.config.seed)
        return clean | gold, prob

    @staticmethod
    def _losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        losses = np.full(len(labels), np.nan)
        ok = labels >= 0
        losses[ok] = -np.log(np.clip(probs[ok, labels[ok]], 1e-12, 1.0))
        return losses
