"""Replay the FreeAL authors' gpt-3.5-turbo labels on MR: the SLM side alone (no second LLM pass).

Per seed and variant (the FreeAL robust SLM, and the naive one: plain cross-entropy), one cross-fitted
SLM is trained on the replayed labels and its verdict (freeal_backend/slm/detection.py) gives the final
labels, scores and review flags. Measured against gold, apart for the texts the LLM answered wrongly and
those it left unanswered:
  - final label accuracy (no LLM second pass) and the SLM's own out-of-sample accuracy, test accuracy;
  - the LLM's answered-but-wrong labels ranked by P(label right): AUROC and average precision;
  - the review tab (flagged tasks) and the first 5 % / 10 % of the review order: share of tasks,
    precision and recall for answered-but-wrong labels, recall of unanswered texts;
  - expected calibration error of the score (P(final label right)); the run-health estimate;
  - seconds and samples/s per phase.
Mean ± sd over seeds; Markdown and JSON with the same numbers.

    .venv/bin/python benchmarks/replay_mr.py --seeds 0,1,2            # all 8662 texts
    .venv/bin/python benchmarks/replay_mr.py --n 2000 --seeds 0       # a seeded subsample
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA, RESULTS, beside, current_peak_mib, fmt_table, loadavg, mean_sd, read_jsonl,  # noqa: E402
                     reset_peak_rss, subsample, write_result)

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.slm.detection import Judgement, judge  # noqa: E402
from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.metrics import expected_calibration_error, review_scores  # noqa: E402
from freeal_backend.records import Item  # noqa: E402

LABELS = ["negative", "positive"]
ROWS = [  # (key, title, percent?)
    ("llm_accuracy", "gpt-3.5 labels right (all texts; unanswered = wrong)", True),
    ("slm_oof_accuracy", "SLM right, out of sample (training texts)", True),
    ("slm_test_accuracy", "SLM right on the MR test split (ensemble)", True),
    ("final_accuracy", "final labels right (no LLM second pass)", True),
    ("switched", "labels changed from the LLM's", False),
    ("switched_right", "... of which now right", True),
    ("llm_auroc", "answered-but-wrong LLM labels ranked by P(label right): AUROC", False),
    ("llm_average_precision", "... average precision", False),
    ("review_auroc", "review order (score) vs wrong final labels: AUROC", False),
    ("flag_share", "review tab: share of all tasks", True),
    ("flag_answered_wrong_recall", "review tab: recall of the answered-but-wrong labels", True),
    ("flag_answered_wrong_precision", "review tab: answered flagged texts that are wrong", True),
    ("flag_unanswered_recall", "review tab: unanswered texts in it", True),
    ("top5pct_answered_wrong_recall", "first 5 % of the review order: answered-but-wrong recall", True),
    ("top5pct_answered_wrong_precision", "first 5 %: precision (answered texts)", True),
    ("top10pct_answered_wrong_recall", "first 10 % of the review order: answered-but-wrong recall", True),
    ("top10pct_answered_wrong_precision", "first 10 %: precision (answered texts)", True),
    ("top10pct_unanswered_recall", "first 10 %: unanswered texts in it", True),
    ("ece", "expected calibration error of the score", False),
    ("estimated_accuracy", "run health: estimated share of LLM labels right", True),
    ("kappa", "run health: kappa (SLM vs LLM labels)", False),
    ("train_s", "SLM training + scoring, seconds", False),
    ("train_sps", "SLM training samples/s (all fold epochs)", False),
    ("judge_s", "verdict (detection.py), seconds", False),
]


def verdict_metrics(oof_probs: np.ndarray, y: np.ndarray, gold: np.ndarray,
                    verdict: Judgement | None = None) -> dict[str, float]:
    """Everything measured on the SLM's verdict (detection.py) over its out-of-sample probabilities (or on
    ``verdict``, one judged otherwise)."""
    t1 = time.perf_counter()
    verdict = judge(oof_probs, y) if verdict is None else verdict
    judge_s = time.perf_counter() - t1
    unanswered = y < 0
    answered_wrong = ~unanswered & (y != gold)
    final_right = verdict.labels == gold
    quality = np.where(unanswered, 0.0, verdict.posterior[np.arange(len(y)), np.maximum(y, 0)])
    llm_rank = review_scores(quality, answered_wrong | unanswered, unanswered=unanswered)
    review = review_scores(verdict.scores, ~final_right | unanswered, unanswered=unanswered, flagged=verdict.flagged)
    review_llm = review_scores(verdict.scores, answered_wrong | unanswered, unanswered=unanswered,
                               flagged=verdict.flagged)
    switched = ~unanswered & (verdict.labels != y)
    return {
        "llm_accuracy": float((y == gold).mean()),
        "slm_oof_accuracy": float((oof_probs.argmax(1) == gold).mean()),
        "final_accuracy": float(final_right.mean()),
        "switched": float(switched.sum()),
        "switched_right": float(final_right[switched].mean()) if switched.any() else float("nan"),
        "llm_auroc": llm_rank["auroc"], "llm_average_precision": llm_rank["average_precision"],
        "review_auroc": review["auroc"],
        **{k: v for k, v in review_llm.items() if k.startswith(("flag_", "top"))},
        "ece": expected_calibration_error(verdict.scores, final_right),
        "estimated_accuracy": verdict.health.estimated_accuracy, "kappa": verdict.health.kappa,
        "answered_wrong": float(answered_wrong.sum()), "unanswered": float(unanswered.sum()), "judge_s": judge_s,
    }


def measure(run: FreeALRun, items: list[Item], llm: list[str | None], gold: np.ndarray, test_lower: object,
            test_gold: np.ndarray, *, robust: bool, seed: int, keep: dict[str, np.ndarray]) -> dict[str, float]:
    y = np.array([LABELS.index(x) if x else -1 for x in llm])
    t0 = time.perf_counter()
    model, out = run.train_slm(items, llm, robust=robust, seed_offset=seed)
    train_s = time.perf_counter() - t0
    keep[f"{'robust' if robust else 'naive'}_seed{seed}"] = out.oof_probs
    test_probs, _ = model.evaluate(test_lower)
    folds = run.settings.slm_folds
    return {**verdict_metrics(out.oof_probs, y, gold),
            "slm_test_accuracy": float((test_probs.argmax(1) == test_gold).mean()), "train_s": train_s,
            "train_sps": len(items) * (folds - 1) / folds * len(out.epoch_seconds) / train_s}


def rejudge(stem: Path) -> int:
    """Recompute the verdict's numbers from a run's saved out-of-sample probabilities (``stem``.npz) with
    the current detection.py; training-side numbers (test accuracy, seconds) stay those of the run."""
    saved = np.load(beside(stem, ".npz"))
    data = json.loads(beside(stem, ".json").read_text())
    for variant, runs in data["per_seed"].items():
        for seed, m in zip(data["seeds"], runs):
            m.update(verdict_metrics(saved[f"{variant}_seed{seed}"], saved["labels"], saved["gold"]))
    md = beside(stem, ".md").read_text()
    head, _, _ = md.partition("| measure (% where a share)")
    tail = md[md.index("\n\nEncoding the frozen lower layers"):]
    data["rejudged"] = "verdict numbers recomputed by --rejudge from the saved out-of-sample probabilities"
    variants = list(data["per_seed"])
    beside(stem, ".md").write_text(head + table(data["per_seed"], variants, len(data["seeds"])) + tail
                                   + "\n\nVerdict numbers recomputed with `--rejudge " + str(stem)
                                   + "` from the saved out-of-sample probabilities (detection.py as committed).\n")
    _write_json(stem, data)
    print(beside(stem, ".md").read_text())
    return 0


def table(per: dict[str, list[dict[str, float]]], variants: list[str], seeds: int) -> str:
    return fmt_table(["measure (% where a share)"] + [f"{v} SLM (mean ± sd, {seeds} seeds)" for v in variants],
                     [[title] + [mean_sd([m[key] for m in per[v]], pct) for v in variants] for key, title, pct in ROWS])


def _write_json(stem: Path, data: dict) -> None:
    per = data["per_seed"]
    data["mean"] = {v: {k: float(np.nanmean([m[k] for m in per[v]])) for k in per[v][0]} for v in per}
    data["sd"] = {v: {k: float(np.nanstd([m[k] for m in per[v]])) for k in per[v][0]} for v in per}
    beside(stem, ".json").write_text(json.dumps(data, indent=1), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=0, help="training texts: seeded subsample size (0 = all 8662)")
    ap.add_argument("--test-n", type=int, default=0, help="test texts: seeded subsample size (0 = all 2000)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (mean ± sd over them)")
    ap.add_argument("--variants", default="robust,naive", help="robust (FreeAL) and/or naive (plain CE)")
    ap.add_argument("--no-augment", action="store_true",
                    help="ignore the back-translations (token dropout is then the augmented view)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", help="result file stem (default benchmarks/results/replay_mr[_nN])")
    ap.add_argument("--rejudge", metavar="STEM", help="only recompute the verdict's numbers of a finished run "
                                                     "from its saved .npz (after a change to detection.py)")
    args = ap.parse_args(argv)
    if args.rejudge:
        return rejudge(Path(args.rejudge))
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    load_start = loadavg()
    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]

    rows = subsample(read_jsonl(DATA / "mr_freeal" / "train.jsonl"), args.n, 0)
    test = subsample(read_jsonl(DATA / "mr" / "test.jsonl"), args.test_n, 0)
    items = [Item(r["id"], r["text"], augmented=None if args.no_augment else (r.get("backtranslation") or None))
             for r in rows]
    llm = [r.get("llm_label") or None for r in rows]
    gold = np.array([LABELS.index(r["label"]) for r in rows])
    test_gold = np.array([LABELS.index(r["label"]) for r in test])
    settings = Settings.from_env()
    print(f"MR replay: {len(items)} training texts, {len(test)} test texts; seeds {seeds}; variants {variants}",
          flush=True)
    per: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    oof: dict[str, np.ndarray] = {}
    phases: dict[str, float] = {}
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="freeal-replay-") as tmp:
        run_dir = Path(tmp)
        with FreeALRun(settings.with_(data_dir=run_dir), LABELS, run_dir) as run:
            split = run.lower_split
            t = time.perf_counter()
            reset_peak_rss()
            run._lower_states(items, split, lambda *a: None)
            phases["encode_s"] = time.perf_counter() - t
            phases["encode_sps"] = len(items) * (2 if not args.no_augment else 1) / phases["encode_s"]
            test_lower = run.encoder.lower_states([r["text"] for r in test], split, max_length=settings.max_length)
            peaks["encode"] = current_peak_mib()
            for variant in variants:
                for seed in seeds:
                    reset_peak_rss()
                    m = measure(run, items, llm, gold, test_lower, test_gold, robust=variant == "robust", seed=seed,
                                keep=oof)
                    peaks[variant] = max(peaks.get(variant, 0.0), current_peak_mib())
                    per[variant].append(m)
                    print(f"  {variant} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), flush=True)
    total = time.perf_counter() - t_start

    table_md = table(per, variants, len(seeds))
    first = per[variants[0]][0]
    body = "\n".join([
        f"MR training texts: {len(items)}{' (seeded subsample)' if args.n else ' (all)'}, of which "
        f"{int(first['answered_wrong'])} answered wrongly and {int(first['unanswered'])} left unanswered by "
        f"gpt-3.5; test texts: {len(test)}. SLM: top {settings.slm_train_layers} MiniLM layers, "
        f"{settings.slm_folds} cross-fitted folds of {settings.slm_epochs} epochs ({settings.slm_warmup_epochs} "
        f"warm-up), lr {settings.slm_lr} with linear decay, batch {settings.slm_batch_size}; augmented view: "
        f"{'token dropout' if args.no_augment else 'the authors back-translations'}.",
        "",
        "Recall and precision of the review tab count the *answered-but-wrong* gpt-3.5 labels among the "
        "answered texts; unanswered texts are counted apart (they are always flagged). The review order is the "
        "review tab's: lowest score first.",
        "",
        table_md,
        "",
        f"Encoding the frozen lower layers: {phases['encode_s']:.1f} s ({phases['encode_sps']:.1f} texts/s, "
        "back-translations included). Peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        + f". Total wall time {total:.0f} s.",
    ])
    print("\n" + body)
    stem = Path(args.out) if args.out else RESULTS / (f"replay_mr_n{args.n}" if args.n else "replay_mr")
    write_result(beside(stem, ".md"), "MR replay of the FreeAL authors' gpt-3.5-turbo labels: the SLM's verdict",
                 body, load_start)
    _write_json(stem, {"texts": len(items), "test_texts": len(test), "seeds": seeds, "per_seed": per,
                       "phases": phases, "peak_rss_mib": peaks, "total_s": total, "load_start": load_start,
                       "load_end": loadavg()})
    np.savez_compressed(beside(stem, ".npz"), labels=np.array([LABELS.index(x) if x else -1 for x in llm]),
                        gold=gold, **oof)  # the SLM's out-of-sample probabilities: re-judge without retraining
    print(f"\nwrote {beside(stem, '.md')}, .json and .npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
