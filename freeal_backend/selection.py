"""Pure selection functions: small-loss split, clean agreed pool, k-medoids demos, demo retrieval."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.mixture import GaussianMixture


def split_clean_noisy(losses: np.ndarray, *, threshold: float = 0.7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fit a 2-component GMM on min-max normalised per-sample losses.

    Returns ``(clean, clean_prob)``: the posterior of the low-mean component per sample and the mask
    ``clean_prob > threshold``. NaN losses (unlabelled samples) are never clean.
    """
    losses = np.asarray(losses, dtype=np.float64)
    clean_prob = np.zeros(len(losses))
    valid = ~np.isnan(losses)
    values = losses[valid]
    if values.size < 4 or np.ptp(values) < 1e-12:
        clean_prob[valid] = 1.0
        return clean_prob > threshold, clean_prob
    norm = (values - values.min()) / np.ptp(values)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
    gmm.fit(norm.reshape(-1, 1))
    low = int(np.argmin(gmm.means_.ravel()))
    clean_prob[valid] = gmm.predict_proba(norm.reshape(-1, 1))[:, low]
    return clean_prob > threshold, clean_prob


def clean_agreed_pool(llm_labels: np.ndarray, slm_pred: np.ndarray, slm_conf: np.ndarray, num_classes: int, *,
                      ratio: float = 0.2, gold: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Per class j: samples with LLM label == SLM prediction == j, the top ``ratio`` by SLM confidence.

    Gold (human) samples of class j are always included, first. Returns indices per class.
    """
    pool: dict[int, np.ndarray] = {}
    gold = np.zeros(len(llm_labels), dtype=bool) if gold is None else gold
    for j in range(num_classes):
        agreed = np.flatnonzero((llm_labels == j) & (slm_pred == j) & ~gold)
        keep = max(1, int(round(len(agreed) * ratio))) if len(agreed) else 0
        top = agreed[np.argsort(-slm_conf[agreed], kind="stable")[:keep]]
        pool[j] = np.concatenate([np.flatnonzero(gold & (llm_labels == j)), top]).astype(int)
    return pool


def k_medoids(embeddings: np.ndarray, k: int, *, seed: int = 0, iters: int = 20) -> np.ndarray:
    """Indices of ``k`` medoids (cosine distance, alternating assignment/update). Returns all if k >= n."""
    n = len(embeddings)
    if k >= n:
        return np.arange(n)
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    dist = 1.0 - x @ x.T
    rng = np.random.default_rng(seed)
    # k-means++ style seeding for spread-out starting medoids
    medoids = [int(rng.integers(n))]
    for _ in range(1, k):
        d = np.clip(dist[:, medoids].min(axis=1), 0.0, None)
        medoids.append(int(np.argmax(d)) if d.sum() <= 0 else int(rng.choice(n, p=d / d.sum())))
    med = np.array(sorted(set(medoids)))
    for _ in range(iters):
        assign = np.argmin(dist[:, med], axis=1)
        new = med.copy()
        for c in range(len(med)):
            members = np.flatnonzero(assign == c)
            if len(members):
                new[c] = members[np.argmin(dist[np.ix_(members, members)].sum(axis=1))]
        if np.array_equal(np.sort(new), np.sort(med)):
            break
        med = np.unique(new)
    return np.sort(med)


def demo_pool(pool: dict[int, np.ndarray], embeddings: np.ndarray, per_class: int, *, seed: int = 0,
              gold: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """A small, diverse demo pool per class: gold samples first, then k-medoids of the clean agreed pool."""
    gold = np.zeros(len(embeddings), dtype=bool) if gold is None else gold
    out: dict[int, np.ndarray] = {}
    for j, idx in pool.items():
        human = idx[gold[idx]][:per_class]
        rest = idx[~gold[idx]]
        need = per_class - len(human)
        picked = rest[k_medoids(embeddings[rest], need, seed=seed)] if need > 0 and len(rest) else rest[:0]
        out[j] = np.concatenate([human, picked]).astype(int)
    return out


def retrieve_demos(query: np.ndarray, pool_embeddings: np.ndarray, pool_classes: np.ndarray, shots: int,
                   num_classes: int, *, exclude: Sequence[int] | None = None) -> list[int]:
    """Indices into the pool: the most similar ``shots // num_classes`` demos of each class (at least 1).

    ``exclude`` lists pool positions never to return (e.g. the query item itself). The result is ordered
    from least to most similar, so the closest demo sits right before the query in the prompt.
    """
    sims = pool_embeddings @ query
    if exclude is not None and len(exclude):
        sims = sims.copy()
        sims[np.asarray(exclude, dtype=int)] = -np.inf
    per = max(1, shots // max(1, num_classes))
    chosen: list[int] = []
    for j in range(num_classes):
        members = np.flatnonzero((pool_classes == j) & np.isfinite(sims))
        chosen.extend(members[np.argsort(-sims[members], kind="stable")[:per]].tolist())
    return sorted(chosen, key=lambda i: sims[i])


def nearest_demos(query: np.ndarray, demo_embeddings: np.ndarray, k: int) -> list[int]:
    """The ``k`` most similar demos regardless of class (round 0), least similar first."""
    sims = demo_embeddings @ query
    top = np.argsort(-sims, kind="stable")[:k]
    return top[::-1].tolist()
