"""Small-loss split on synthetic noisy labels, and the demo-selection invariants."""
import numpy as np

from freeal_backend.slm.selection import clean_agreed_pool, demo_pool, kmeans_representatives, retrieve_demos, split_clean_noisy


def synthetic_losses(n=2000, noise=0.25, seed=0):
    rng = np.random.default_rng(seed)
    flipped = rng.random(n) < noise
    # a model that fits clean labels well gives them small losses; flipped labels get large ones
    losses = np.where(flipped, rng.gamma(6.0, 0.5, n), rng.gamma(1.0, 0.15, n))
    return losses, flipped


def test_gmm_split_finds_injected_label_noise():
    losses, flipped = synthetic_losses()
    clean, prob = split_clean_noisy(losses, threshold=0.7)
    flagged = ~clean
    precision = (flagged & flipped).sum() / flagged.sum()
    recall = (flagged & flipped).sum() / flipped.sum()
    assert precision > 0.8 and recall > 0.8  # chance would be 0.25 precision
    assert np.all((prob >= 0) & (prob <= 1))


def test_gmm_split_ignores_unlabelled_and_degenerate_input():
    losses, _ = synthetic_losses(200)
    losses[:10] = np.nan
    clean, _ = split_clean_noisy(losses)
    assert not clean[:10].any()
    all_same, _ = split_clean_noisy(np.ones(50))
    assert all_same.all()


def test_clean_agreed_pool_fills_a_class_without_agreement_from_its_likeliest_labels():
    llm = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    slm = np.zeros(8, dtype=int)  # the SLM predicts class 0 everywhere
    conf = np.full(8, 0.9)
    right = np.array([0.9, 0.8, 0.7, 0.1, 0.4, 0.3, 0.2, 0.05])  # P(label right) per text
    assert len(clean_agreed_pool(llm, slm, conf, 2, ratio=0.4)[1]) == 0  # the paper's pool: no class 1
    pool = clean_agreed_pool(llm, slm, conf, 2, ratio=0.4, label_scores=right)
    assert pool[1].tolist() == [4, 5]  # the likeliest 40 % of the texts labelled 1
    assert pool[0].tolist() == clean_agreed_pool(llm, slm, conf, 2, ratio=0.4)[0].tolist()  # agreed: unchanged


def test_clean_agreed_pool_keeps_only_agreeing_top_share_and_gold():
    rng = np.random.default_rng(1)
    llm = rng.integers(0, 3, 300)
    slm = np.where(rng.random(300) < 0.7, llm, rng.integers(0, 3, 300))
    conf = rng.random(300)
    gold = np.zeros(300, dtype=bool)
    gold[[5, 6]] = True
    pool = clean_agreed_pool(llm, slm, conf, 3, ratio=0.2, gold=gold)
    for j, idx in pool.items():
        non_gold = idx[~gold[idx]]
        assert np.all(llm[non_gold] == j) and np.all(slm[non_gold] == j)
        agreed = np.flatnonzero((llm == j) & (slm == j) & ~gold)
        assert len(non_gold) == max(1, round(0.2 * len(agreed)))
        assert conf[non_gold].min() >= np.sort(conf[agreed])[::-1][len(non_gold) - 1]
    assert {5, 6} <= set(np.concatenate(list(pool.values())).tolist())


def test_kmeans_representatives_cover_every_cluster_once():
    rng = np.random.default_rng(2)
    centers = np.eye(4, 16) * 5
    x = np.concatenate([c + rng.normal(0, 0.1, (25, 16)) for c in centers])
    med = kmeans_representatives(x, 4)
    assert len(set(med.tolist())) == 4
    assert sorted({int(m) // 25 for m in med}) == [0, 1, 2, 3]  # one representative per cluster
    assert len(kmeans_representatives(x[:3], 10)) == 3


def test_demo_pool_puts_gold_first_and_respects_size():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(50, 8))
    gold = np.zeros(50, dtype=bool)
    gold[0] = True
    chosen = demo_pool({0: np.array([0, 1, 2, 3, 4, 5, 6]), 1: np.array([10, 11])}, emb, 3, gold=gold)
    assert chosen[0][0] == 0 and len(chosen[0]) == 3 and len(set(chosen[0].tolist())) == 3
    assert sorted(chosen[1].tolist()) == [10, 11]


def test_retrieve_demos_balances_classes_and_excludes_query():
    rng = np.random.default_rng(4)
    pool = rng.normal(size=(20, 8))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    classes = np.array([0] * 10 + [1] * 10)
    picks = retrieve_demos(pool[3], pool, classes, shots=4, num_classes=2, exclude=[3])
    assert 3 not in picks and len(picks) == 4
    assert sorted(classes[picks].tolist()) == [0, 0, 1, 1]
    sims = pool[picks] @ pool[3]
    assert np.all(np.diff(sims) >= 0)  # most similar demo last, right before the query


def _demos_evaluated(prompts: list[list[int]]) -> int:
    """Demos a single-slot prompt cache evaluates when ``prompts`` come in this order."""
    total, prev = 0, []
    for cur in prompts:
        same = next((n for n, (a, b) in enumerate(zip(prev, cur)) if a != b), min(len(prev), len(cur)))
        total += len(cur) - same
        prev = cur
    return total


def test_shared_prefix_order_puts_the_most_shared_demos_first():
    from freeal_backend.slm.selection import nearest_demos, shared_prefix_order

    rng = np.random.default_rng(1)
    texts, pool = rng.normal(size=(300, 16)), rng.normal(size=(12, 16))
    sets = [nearest_demos(t, pool, 4) for t in texts]
    counts = np.bincount([j for s in sets for j in s], minlength=len(pool))
    order, canon = shared_prefix_order(sets, len(pool), seed=0)
    top = int(np.argmax(counts))
    assert all(c[0] == top for c in canon if top in c)
    # a single-slot cache evaluates fewer demos than with the pool in any of 20 random orders (the rule before)
    new = _demos_evaluated([canon[i] for i in order])
    for seed in range(20):
        rank = np.random.default_rng(seed).permutation(len(pool))
        old = [sorted(s, key=lambda j: rank[j]) for s in sets]
        assert new < _demos_evaluated(sorted(old, key=lambda c: [rank[j] for j in c]))


def test_shared_prefix_order_keeps_each_texts_demos_and_lengthens_shared_prefixes():
    from freeal_backend.slm.selection import nearest_demos, shared_prefix_order

    rng = np.random.default_rng(0)
    texts, pool = rng.normal(size=(300, 16)), rng.normal(size=(12, 16))
    sets = [nearest_demos(t, pool, 4) for t in texts]
    order, canon = shared_prefix_order(sets, len(pool), seed=0)
    assert sorted(order) == list(range(len(sets)))
    assert all(sorted(c) == sorted(s) for c, s in zip(canon, sets))  # each text keeps its demonstrations

    def shared(prompts: list[list[int]]) -> float:
        total = 0
        for prev, cur in zip(prompts, prompts[1:]):
            total += next((n for n, (a, b) in enumerate(zip(prev, cur)) if a != b), min(len(prev), len(cur)))
        return total / len(prompts)

    assert shared([canon[i] for i in order]) > 2.0 > 5 * shared(sets)  # measured: 2.9 vs 0.16 on SST-2 texts
    # one fixed order for every prompt: no two demos appear in both orders across prompts
    before = {(a, b) for c in canon for n, a in enumerate(c) for b in c[n + 1:]}
    assert not any((b, a) in before for a, b in before)
