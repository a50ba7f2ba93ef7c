"""The SLM's verdict on realistic, instance-dependent label noise (no LLM needed, no second LLM pass).

gpt-3.5 answers for a second pass cannot be replayed, so this benchmark makes LLM-like noisy labels: a
bag-of-words classifier (TF-IDF unigrams + bigrams, logistic regression) is trained on ``--seed-n`` gold
texts of the training split and labels ``--n`` *other* training texts. Its errors depend on the text
(unseen words, negation, topic) like an LLM's, and it knows nothing of the SLM's encoder. Then one
cross-fitted SLM round judges those labels (freeal_backend/slm/detection.py), exactly as in a FreeAL run:
  - round-0 accuracy (the made labels) vs the final labels' accuracy;
  - the review flag and the first 15 % of the review order: share, precision, recall of wrong labels;
  - AUROC of the review order, expected calibration error of the score, the run-health estimate.
Mean ± sd over seeds (each seed draws other texts, another labeller and another SLM).

    .venv/bin/python benchmarks/made_noise.py --datasets sst2,subj,trec --n 1000 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, beside, fmt_table, loadavg, mean_sd, read_jsonl, write_result  # noqa: E402

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.slm.detection import Judgement, judge  # noqa: E402
from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.metrics import expected_calibration_error, review_scores  # noqa: E402
from freeal_backend.records import Item  # noqa: E402

ROWS = [
    ("noise", "made labels wrong (round 0)", True),
    ("round0_accuracy", "round-0 (made) labels right", True),
    ("final_accuracy", "final labels right", True),
    ("slm_oof_accuracy", "SLM right, out of sample", True),
    ("flag_share", "review tab: share of tasks", True),
    ("flag_answered_wrong_recall", "review tab: recall of wrong labels", True),
    ("flag_answered_wrong_precision", "review tab: precision", True),
    ("top15pct_answered_wrong_recall", "first 15 % of the review order: recall of wrong labels", True),
    ("top15pct_answered_wrong_precision", "first 15 %: precision", True),
    ("auroc", "review order vs wrong labels: AUROC", False),
    ("ece", "expected calibration error of the score", False),
    ("estimated_accuracy", "run health: estimated share of labels right", True),
    ("train_s", "SLM round, seconds", False),
]


def made_labels(rows: list[dict], labels: list[str], n: int, seed_n: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """``n`` texts and their labels from a TF-IDF classifier trained on ``seed_n`` other gold texts."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picked, trainers = [rows[i] for i in order[:n]], [rows[i] for i in order[n:n + seed_n]]
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit([r["text"] for r in trainers + picked])
    weak = LogisticRegression(C=10.0, max_iter=2000).fit(vec.transform([r["text"] for r in trainers]),
                                                           [labels.index(r["label"]) for r in trainers])
    return picked, weak.predict(vec.transform([r["text"] for r in picked]))


def measure(dataset: str, n: int, seed_n: int, seed: int, settings: Settings,
            keep: dict[str, np.ndarray]) -> dict[str, float]:
    rows = read_jsonl(DATA / dataset / "train.jsonl")
    labels = sorted({r["label"] for r in rows})
    picked, noisy = made_labels(rows, labels, n, seed_n, seed)
    gold = np.array([labels.index(r["label"]) for r in picked])
    items = [Item(str(i), r["text"]) for i, r in enumerate(picked)]
    with tempfile.TemporaryDirectory(prefix="freeal-noise-") as tmp:
        with FreeALRun(settings.with_(data_dir=Path(tmp)), labels, Path(tmp)) as run:
            t = time.perf_counter()
            _, out = run.train_slm(items, [labels[k] for k in noisy], seed_offset=seed)
            train_s = time.perf_counter() - t
    keep.update({f"{dataset}_seed{seed}_probs": out.oof_probs, f"{dataset}_seed{seed}_labels": noisy,
                 f"{dataset}_seed{seed}_gold": gold})
    return {**verdict_metrics(out.oof_probs, noisy, gold), "train_s": train_s}


def verdict_metrics(probs: np.ndarray, noisy: np.ndarray, gold: np.ndarray,
                    verdict: Judgement | None = None) -> dict[str, float]:
    """Everything measured on the SLM's verdict over its out-of-sample probabilities (or on ``verdict``, one
    judged otherwise)."""
    verdict = judge(probs, noisy) if verdict is None else verdict
    right = verdict.labels == gold
    review = review_scores(verdict.scores, ~right, flagged=verdict.flagged, shares=(0.15,))
    return {"noise": float((noisy != gold).mean()), "round0_accuracy": float((noisy == gold).mean()),
            "final_accuracy": float(right.mean()), "slm_oof_accuracy": float((probs.argmax(1) == gold).mean()),
            **{k: v for k, v in review.items() if k.startswith(("flag_", "top15pct"))}, "auroc": review["auroc"],
            "ece": expected_calibration_error(verdict.scores, right),
            "estimated_accuracy": verdict.health.estimated_accuracy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="sst2,subj,trec")
    ap.add_argument("--n", type=int, default=1000, help="texts labelled and judged per data set and seed")
    ap.add_argument("--seed-n", type=int, default=3000, help="gold texts the made labeller is trained on")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="result file stem (default benchmarks/results/made_noise_nN)")
    ap.add_argument("--rejudge", metavar="STEM", help="only recompute the verdict's numbers of a finished run "
                                                     "from its saved .npz (after a change to detection.py)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    load_start = loadavg()
    settings = Settings.from_env()
    seeds = [int(s) for s in args.seeds.split(",")]
    per: dict[str, list[dict[str, float]]] = {}
    kept: dict[str, np.ndarray] = {}
    rejudged = json.loads(beside(Path(args.rejudge), ".json").read_text()) if args.rejudge else None
    saved = np.load(beside(Path(args.rejudge), ".npz")) if args.rejudge else None
    for dataset in args.datasets.split(","):
        per[dataset] = []
        for k, seed in enumerate(seeds):
            if saved is not None and rejudged is not None:  # the training-side number stays the run's
                m = {**verdict_metrics(*(saved[f"{dataset}_seed{seed}_{x}"] for x in ("probs", "labels", "gold"))),
                     "train_s": rejudged["per_seed"][dataset][k]["train_s"]}
                kept.update({f"{dataset}_seed{seed}_{x}": saved[f"{dataset}_seed{seed}_{x}"]
                             for x in ("probs", "labels", "gold")})
            else:
                m = measure(dataset, args.n, args.seed_n, seed, settings, kept)
            per[dataset].append(m)
            print(f"  {dataset} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), flush=True)

    table = fmt_table(["measure (% where a share)"] + [f"{d} (mean ± sd, {len(seeds)} seeds)" for d in per],
                      [[title] + [mean_sd([m[key] for m in per[d]], pct) for d in per] for key, title, pct in ROWS])
    body = (f"Per data set and seed: {args.n} training texts labelled by a TF-IDF logistic regression trained on "
            f"{args.seed_n} other gold training texts; one cross-fitted SLM round ({settings.slm_folds} folds of "
            f"{settings.slm_epochs} epochs, top {settings.slm_train_layers} MiniLM layers) judges the labels; no LLM.\n\n"
            + table + ("\n\nVerdict numbers recomputed with `--rejudge` from the run's saved out-of-sample "
                       "probabilities (detection.py as committed); SLM seconds are the run's." if args.rejudge else ""))
    print("\n" + body)
    stem = Path(args.out) if args.out else RESULTS / f"made_noise_n{args.n}"
    write_result(beside(stem, ".md"), "The SLM's verdict on made, instance-dependent label noise", body, load_start)
    beside(stem, ".json").write_text(json.dumps(
        {"n": args.n, "seed_n": args.seed_n, "seeds": seeds, "per_seed": per, "load_start": load_start,
         "load_end": loadavg(),
         "mean": {d: {k: float(np.mean([m[k] for m in per[d]])) for k in per[d][0]} for d in per}}, indent=1),
        encoding="utf-8")
    np.savez_compressed(beside(stem, ".npz"), **kept)  # out-of-sample probabilities: re-judge offline
    print(f"wrote {beside(stem, '.md')}, .json and .npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
