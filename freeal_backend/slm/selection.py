"""Pure selection functions: small-loss split, clean agreed pool, diverse (k-means) demos, demo retrieval."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
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
                      ratio: float = 0.2, gold: np.ndarray | None = None,
                      label_scores: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Per class j: samples with LLM label == SLM prediction == j, the top ``ratio`` by SLM confidence.

    Gold (human) samples of class j are always included, first. A class on which the SLM agrees with no
    label (a weak SLM that predicts one class) would give the LLM demos without it: with ``label_scores``
    (per sample, how likely its label is right) such a class takes the top ``ratio`` of the samples
    labelled j by that score instead. Returns indices per class.
    """
    pool: dict[int, np.ndarray] = {}
    gold = np.zeros(len(llm_labels), dtype=bool) if gold is None else gold
    for j in range(num_classes):
        agreed = np.flatnonzero((llm_labels == j) & (slm_pred == j) & ~gold)
        rank = slm_conf
        if not len(agreed) and label_scores is not None:
            agreed, rank = np.flatnonzero((llm_labels == j) & ~gold), label_scores
        keep = max(1, int(round(len(agreed) * ratio))) if len(agreed) else 0
        top = agreed[np.argsort(-rank[agreed], kind="stable")[:keep]]
        pool[j] = np.concatenate([np.flatnonzero(gold & (llm_labels == j)), top]).astype(int)
    return pool


def kmeans_representatives(embeddings: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Indices of ``k`` diverse representatives: k-means on the (normalised) embeddings, then the member
    closest to each centroid (the authors' choice). Memory is O(n·k), never n×n. Returns all if k >= n."""
    n = len(embeddings)
    if k >= n:
        return np.arange(n)
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    km = (KMeans(n_clusters=k, n_init=3, random_state=seed) if n <= 20000
          else MiniBatchKMeans(n_clusters=k, n_init=3, random_state=seed, batch_size=4096))
    assign = km.fit_predict(x)
    picks = []
    for c in range(k):
        members = np.flatnonzero(assign == c)
        if len(members):
            d = ((x[members] - km.cluster_centers_[c]) ** 2).sum(axis=1)
            picks.append(int(members[np.argmin(d)]))
    return np.unique(np.array(picks, dtype=int))


def demo_pool(pool: dict[int, np.ndarray], embeddings: np.ndarray, per_class: int, *, seed: int = 0,
              gold: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """A small, diverse demo pool per class: gold samples first, then k-means representatives of the clean
    agreed pool."""
    gold = np.zeros(len(embeddings), dtype=bool) if gold is None else gold
    out: dict[int, np.ndarray] = {}
    for j, idx in pool.items():
        human = idx[gold[idx]][:per_class]
        rest = idx[~gold[idx]]
        need = per_class - len(human)
        picked = rest[kmeans_representatives(embeddings[rest], need, seed=seed)] if need > 0 and len(rest) else rest[:0]
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


def shared_prefix_order(demo_sets: Sequence[Sequence[int]], pool_size: int, seed: int = 0, *,
                        most_shared_first: bool = True) -> tuple[list[int], list[list[int]]]:
    """An order for the requests, and each request's demos in one fixed order, such that consecutive
    prompts share the longest prefix: an endpoint's prompt cache (llama.cpp's, vLLM's, a provider's) then
    evaluates only what differs. Each text keeps its demo *set*; only the order of the demos in its prompt
    and the order of the requests change.

    The fixed order puts the demos that most texts share first (ties in a seeded random order), and the
    requests are sorted by their demos in that order, so each prompt shares with the one before it the
    longest prefix any earlier prompt offers. That also puts the demos few texts share, often those closest
    to the text, last, next to the question; ``most_shared_first=False`` orders the pool by the seeded draw
    alone (shorter shared prefixes, no demo placed by how close it is).
    """
    tie = np.random.default_rng(seed).permutation(pool_size)
    rank = tie
    if most_shared_first:
        count = np.bincount(np.fromiter((j for demos in demo_sets for j in demos), dtype=np.int64),
                            minlength=pool_size)
        rank = np.empty(pool_size, dtype=np.int64)
        rank[np.lexsort((tie, -count))] = np.arange(pool_size)
    canon = [sorted(demos, key=lambda j: rank[j]) for demos in demo_sets]
    order = sorted(range(len(canon)), key=lambda i: [rank[j] for j in canon[i]])
    return order, canon
