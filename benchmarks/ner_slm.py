"""Issue 10, item 7(b): the span SLM on BC5CDR with LLM-like label noise vs the same SLM on gold labels.

One SLM round = lower states of the training sentences + K-fold cross-fitting (K taggers, each trained on
K-1 folds, predicting the held-out fold). Reported: entity F1 (seqeval) on train (out-of-fold predictions)
and test (mean of the fold taggers), the review flag's precision/recall for corrupted sentences and spans,
and the round's wall time and peak RSS.

Noise (per gold entity, seeded; rates are assumptions, not measurements): an LLM labelling biomedical
text mostly misses entities and gets boundaries wrong, less often the type, and adds a few spurious
spans. ``--miss 0.12``: dropped; ``--swap 0.05``: the other type; ``--shift 0.10``: one boundary moved by
one word (grow or shrink, never empty); ``--spurious 0.15``: expected spurious spans per sentence (1-2
words outside every entity, random type). The resulting noisy labels' own entity F1 is reported, so the
noise level is explicit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA, RESULTS, command_line, current_peak_mib, fmt_table, loadavg, read_jsonl,  # noqa: E402
                     reset_peak_rss, rss_mib, subsample, write_result)

from freeal_backend.span_eval import bio_tags, entity_scores, word_offsets  # noqa: E402
from freeal_backend.spans import Span, spans_from_dicts  # noqa: E402

TYPES = ["Chemical", "Disease"]


def corrupt(text: str, gold: list[Span], rng: np.random.Generator, args: argparse.Namespace) -> list[Span]:
    """LLM-like noisy spans made from gold ones (see the module docstring for the rates)."""
    words = word_offsets(text)
    out: list[Span] = []
    for s in gold:
        r = rng.random()
        if r < args.miss:
            continue
        if r < args.miss + args.swap:
            out.append(Span(s.start, s.end, TYPES[1 - TYPES.index(s.label)]))
            continue
        if r < args.miss + args.swap + args.shift:
            inside = [i for i, (a, b) in enumerate(words) if a >= s.start and b <= s.end]
            first, last = inside[0], inside[-1]
            moves = [(first - 1, last), (first, last + 1)] + ([(first + 1, last), (first, last - 1)]
                                                              if last > first else [])
            moves = [(a, b) for a, b in moves if 0 <= a <= b < len(words)]
            a, b = moves[int(rng.integers(len(moves)))]
            out.append(Span(words[a][0], words[b][1], s.label))
            continue
        out.append(s)
    for _ in range(int(rng.poisson(args.spurious))):
        free = [i for i, (a, b) in enumerate(words) if all(b <= s.start or a >= s.end for s in out + gold)]
        if not free:
            break
        i = free[int(rng.integers(len(free)))]
        j = i + 1 if i + 1 in free and rng.random() < 0.5 else i
        out.append(Span(words[i][0], words[j][1], TYPES[int(rng.integers(2))]))
    keep: list[Span] = []
    for s in sorted(out, key=lambda s: (s.start - s.end, s.start)):  # an entity grown into a neighbour
        if all(s.end <= k.start or k.end <= s.start for k in keep):
            keep.append(s)
    return sorted(keep)


def span_flag_scores(gold: list[list[Span]], noisy: list[list[Span]], judgements: list[list[Any]]) -> dict[str, float]:
    """Judgement precision/recall for corrupted spans (noisy spans not in gold, and gold spans missed)."""
    errors = caught = correct_judgements = total_judgements = 0
    for g, n, js in zip(gold, noisy, judgements):
        gset, nset = set(g), set(n)
        wrong = [s for s in n if s not in gset]
        covered = [s for s in g if not any(max(s.start, t.start) < min(s.end, t.end) for t in n)]
        judged_labels = {j.label for j in js if j.label is not None}
        missing = [j.predicted for j in js if j.kind == "missing"]
        errors += len(wrong) + len(covered)
        caught += sum(s in judged_labels for s in wrong)
        caught += sum(any(max(s.start, p.start) < min(s.end, p.end) for p in missing) for s in covered)
        total_judgements += len(js)
        correct_judgements += sum(1 for j in js if (j.label is not None and j.label not in gset)
                                  or (j.kind == "missing" and any(max(s.start, j.predicted.start) <
                                                                  min(s.end, j.predicted.end) for s in covered)))
    return {"span_errors": errors, "judgements": total_judgements,
            "precision": correct_judgements / total_judgements if total_judgements else float("nan"),
            "recall": caught / errors if errors else float("nan")}


def sentence_flag_scores(corrupted: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    hit = int((corrupted & flagged).sum())
    return {"flagged": float(flagged.mean()), "precision": hit / flagged.sum() if flagged.any() else float("nan"),
            "recall": hit / corrupted.sum() if corrupted.any() else float("nan"),
            "clean_flagged": float((flagged & ~corrupted).sum() / max(1, (~corrupted).sum()))}


def ece(prob: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of ``prob`` (P(event)) against the 0/1 ``truth``, equal-width bins."""
    which = np.minimum((np.asarray(prob) * bins).astype(int), bins - 1)
    return float(sum((which == b).mean() * abs(prob[which == b].mean() - truth[which == b].mean())
                     for b in range(bins) if (which == b).any()))


def audit_draws(texts: list[str], noisy: list[list[Span]], gold: list[list[Span]], result: Any, sizes: list[int],
                draws: int, seed: int) -> list[dict[str, float]]:
    """Random audits of each size (gold as the person's spans, ``draws`` times): run health's error against
    the share of sentences exactly right, the Wilson interval's coverage and the ECE of the scores on the
    sentences not audited, through ``judge_span_labels`` as a run judges them."""
    from freeal_backend.slm.detection import judge_span_labels

    n = len(texts)
    right = np.array([sorted(a) == sorted(b) for a, b in zip(noisy, gold)])
    human = np.zeros(n, dtype=bool)

    def verdict(person: list[list[Span] | None]) -> Any:
        return judge_span_labels(noisy, result.predicted, result.doubt, human,
                                 lambda i, spans: bio_tags(texts[i], spans, TYPES), result.words_right, person)

    rng = np.random.default_rng(seed)
    out = []
    for k in [0, *sizes]:
        errors, covered, eces = [], [], []
        for _ in range(draws if k else 1):
            rows = set(rng.choice(n, k, replace=False).tolist()) if k else set()
            v = verdict([gold[i] if i in rows else None for i in range(n)])
            rest = np.array([i for i in range(n) if i not in rows])
            errors.append(100 * (v.health.estimated_accuracy - right.mean()))
            eces.append(ece(v.scores[rest], right[rest]))
            if v.audit is not None:
                covered.append(v.audit.low <= right.mean() <= v.audit.high)
        out.append({"size": k, "draws": len(errors), "mean_abs_error_points": float(np.mean(np.abs(errors))),
                    "p90_abs_error_points": float(np.quantile(np.abs(errors), 0.9)),
                    "interval_coverage": float(np.mean(covered)) if covered else None, "ece": float(np.mean(eces))})
        print(f"audit of {k}: {out[-1]}", flush=True)
    return out


def one_round(encoder: Any, texts: list[str], labels: list[list[Span]], lower: Any, t_lower: float,
              args: argparse.Namespace) -> tuple[Any, dict]:
    """Cross-fitting over precomputed lower states; the round's time adds the lower states' time."""
    from freeal_backend.slm.tagger import SpanSLMConfig, cross_fit

    cfg = SpanSLMConfig(epochs=args.epochs, min_steps=args.min_steps, warmup_epochs=args.warmup, lr=args.lr,
                        head_lr=args.head_lr, max_length=args.max_length, seed=args.seed,
                        robust=args.robust and not args.plain,
                        word_features=not args.no_word_features, constrained=not args.unconstrained)
    reset_peak_rss()
    t0 = time.perf_counter()
    result = cross_fit(encoder, texts, labels, TYPES, folds=args.folds, train_layers=args.train_layers, config=cfg,
                       lower=lower, on_fold=lambda k, n: print(f"  fold {k}/{n} at {time.perf_counter() - t0:.0f} s",
                                                               flush=True))
    fit_s = time.perf_counter() - t0
    return result, {"round_s": t_lower + fit_s, "lower_states_s": t_lower, "cross_fit_s": fit_s,
                    "peak_rss_mib": current_peak_mib()}


def main() -> None:
    from freeal_backend.config import Settings
    from freeal_backend.slm.tagger import SpanSLMConfig

    d = SpanSLMConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="training sentences (0: all 4560)")
    ap.add_argument("--test-limit", type=int, default=0, help="test sentences (0: all 4797)")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--train-layers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--warmup", type=int, default=d.warmup_epochs)
    ap.add_argument("--min-steps", type=int, default=Settings().slm_min_steps,
                    help="at least this many optimiser steps per fold tagger (FREEAL_SLM_MIN_STEPS; 0: off, as "
                         "before 2026-12-07)")
    ap.add_argument("--lr", type=float, default=d.lr, help="top encoder layers")
    ap.add_argument("--head-lr", type=float, default=d.head_lr, help="head and word-feature embeddings")
    ap.add_argument("--robust", action="store_true", default=d.robust,
                    help="small-loss split after warm-up (before 2026-11-25 23:55 the default)")
    ap.add_argument("--plain", action="store_true", help="plain cross-entropy (the default now; overrides --robust)")
    ap.add_argument("--no-word-features", action="store_true")
    ap.add_argument("--unconstrained", action="store_true", help="argmax decoding instead of BIO-valid Viterbi")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--miss", type=float, default=0.12)
    ap.add_argument("--swap", type=float, default=0.05)
    ap.add_argument("--shift", type=float, default=0.10)
    ap.add_argument("--spurious", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-gold", action="store_true", help="skip the gold-trained round")
    ap.add_argument("--audit-sizes", default="", help="e.g. 20,50,100: random audits of the noisy round's verdict")
    ap.add_argument("--audit-draws", type=int, default=50, help="random audits per size")
    ap.add_argument("--out", default=str(RESULTS / "ner_slm.md"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from freeal_backend.slm.encoder import Encoder

    torch.set_num_threads(args.threads)
    load_start = loadavg()
    train = subsample(read_jsonl(DATA / "bc5cdr" / "train.jsonl"), args.limit, args.seed)
    test = subsample(read_jsonl(DATA / "bc5cdr" / "test.jsonl"), args.test_limit, args.seed)
    texts = [r["text"] for r in train]
    gold = [spans_from_dicts(r["spans"]) for r in train]
    rng = np.random.default_rng(args.seed)
    noisy = [corrupt(t, g, rng, args) for t, g in zip(texts, gold)]
    corrupted = np.array([n != g for n, g in zip(noisy, gold)])
    test_texts = [r["text"] for r in test]
    test_gold = [spans_from_dicts(r["spans"]) for r in test]

    encoder = Encoder()
    from freeal_backend.slm.tagger import tokenize

    report: dict[str, Any] = {"command": command_line(), "args": vars(args), "load_start": load_start,
                              "train_sentences": len(texts), "test_sentences": len(test_texts),
                              "noisy_labels_vs_gold_train": entity_scores(texts, gold, noisy, TYPES),
                              "corrupted_sentences": float(corrupted.mean())}
    split = encoder.split_for(args.train_layers)
    reset_peak_rss()
    report["rss_before_mib"] = rss_mib()
    t0 = time.perf_counter()
    lower = encoder.lower_states(texts, split, max_length=args.max_length)
    t_lower = time.perf_counter() - t0
    print(f"lower states of {len(texts)} sentences: {t_lower:.0f} s (load {loadavg()})", flush=True)
    test_lower = encoder.lower_states(test_texts, split, max_length=args.max_length)
    test_tok = tokenize(encoder, test_texts, args.max_length)
    for name, labels in [("noisy", noisy)] + ([] if args.skip_gold else [("gold", gold)]):
        print(f"round on {name} labels (load {loadavg()})", flush=True)
        result, timing = one_round(encoder, texts, labels, lower, t_lower, args)
        test_pred = result.predict(test_lower, test_tok, TYPES)
        row: dict[str, Any] = {**timing, "truncated_label_spans": result.truncated_spans,
                               "train_oof": entity_scores(texts, gold, result.predicted, TYPES),
                               "test": entity_scores(test_texts, test_gold, test_pred, TYPES)}
        if name == "noisy":
            top = np.zeros(len(texts), dtype=bool)
            top[np.argsort(-result.doubt, kind="stable")[: int(0.15 * len(texts))]] = True
            kinds: dict[str, int] = {}
            for js in result.judgements:
                for j in js:
                    kinds[j.kind] = kinds.get(j.kind, 0) + 1
            disputed = np.array([bool(js) for js in result.judgements])
            assert result.clean_prob is not None
            row.update({"flag_rule": sentence_flag_scores(corrupted, result.flagged),
                        "flag_doubt_ge_0.5": sentence_flag_scores(corrupted, disputed & (result.doubt >= 0.5)),
                        "flag_top_15pct": sentence_flag_scores(corrupted, top),
                        "ece_clean_prob": ece(result.clean_prob, ~corrupted),
                        "ece_one_minus_doubt": ece(1.0 - result.doubt, ~corrupted),
                        "mean_clean_prob": float(result.clean_prob.mean()),
                        "judgements_by_kind": kinds,
                        "span_judgements": span_flag_scores(gold, noisy, result.judgements)})
            if args.audit_sizes:
                row["audit"] = audit_draws(texts, noisy, gold, result, [int(x) for x in args.audit_sizes.split(",")],
                                           args.audit_draws, args.seed)
        report[name] = row
        print(json.dumps({k: v for k, v in row.items() if k in ("round_s", "peak_rss_mib")}), flush=True)
    report["load_end"] = loadavg()
    out = Path(args.out)
    out.with_suffix(".json").parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_result(out, "Span SLM on BC5CDR: noisy (LLM-like) vs gold labels", render(report, args), load_start)
    print(out.read_text())


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    def f1_row(name: str, scores: dict[str, dict[str, float]]) -> list[object]:
        return [name] + [100 * scores[k][m] for k in ["overall", *TYPES] for m in ("precision", "recall", "f1")]

    header = ["labels / model"] + [f"{k} {m}" for k in ["all", *TYPES] for m in ("P", "R", "F1")]
    rows = [f1_row("noisy labels themselves (train)", report["noisy_labels_vs_gold_train"])]
    for name in ("noisy", "gold"):
        if name in report:
            rows.append(f1_row(f"SLM on {name} labels, train (out-of-fold)", report[name]["train_oof"]))
            rows.append(f1_row(f"SLM on {name} labels, test (fold ensemble)", report[name]["test"]))
    lines = [f"{report['train_sentences']} training and {report['test_sentences']} test sentences; "
             f"{args.folds}-fold cross-fitting, top {args.train_layers} encoder layer(s) + BIO head trained, "
             f"{args.epochs} epochs or more for at least {args.min_steps} optimiser steps ({args.warmup} warm-up"
             f"{', small-loss split' if args.robust and not args.plain else ', plain CE'}), "
             f"lr {args.lr} (layers) / {args.head_lr} (head), word features "
             f"{'off' if args.no_word_features else 'on'}, "
             f"{'argmax' if args.unconstrained else 'BIO-valid Viterbi'} decoding, max length {args.max_length}, "
             f"{args.threads} torch threads. Noise per gold entity: miss {args.miss}, type swap {args.swap}, "
             f"boundary shift "
             f"{args.shift}; {args.spurious} spurious spans per sentence on average; "
             f"{100 * report['corrupted_sentences']:.1f}% of training sentences corrupted.", "",
             "### Entity scores (seqeval, %)", "", fmt_table(header, rows), ""]
    if "noisy" in report:
        n = report["noisy"]
        flag_rows = [[rule, 100 * n[key]["flagged"], 100 * n[key]["precision"], 100 * n[key]["recall"],
                      100 * n[key].get("clean_flagged", float("nan"))]
                     for rule, key in [("the flag: P(right) < 0.5 and disputed", "flag_rule"),
                                       ("doubt >= 0.5 and disputed (old flag)", "flag_doubt_ge_0.5"),
                                       ("top 15% by doubt", "flag_top_15pct")]]
        sj = n["span_judgements"]
        ceiling = 100 * 0.15 / report["corrupted_sentences"]
        lines += ["### Review flag (noisy round): corrupted sentences", "",
                  fmt_table(["rule", "flagged %", "precision %", "recall %", "clean sentences flagged %"], flag_rows),
                  "",
                  f"With {100 * report['corrupted_sentences']:.1f}% of sentences corrupted, flagging 15% of all "
                  f"sentences can reach at most {min(100.0, ceiling):.1f}% recall. Calibration of the score "
                  f"P(spans right) against the corrupted/clean truth: ECE {n['ece_clean_prob']:.3f} (mean "
                  f"{n['mean_clean_prob']:.3f} vs {1 - report['corrupted_sentences']:.3f} clean); of 1 - doubt: ECE "
                  f"{n['ece_one_minus_doubt']:.3f}.", "",
                  f"Span judgements: {sj['judgements']} made ({n['judgements_by_kind']}); precision "
                  f"{100 * sj['precision']:.1f}% (a judgement names a corrupted span), recall "
                  f"{100 * sj['recall']:.1f}% of {sj['span_errors']} corrupted spans.", ""]
    if "noisy" in report and report["noisy"].get("audit"):
        audit_rows = [[a["size"] or "no audit", a["draws"], f"{a['mean_abs_error_points']:.1f}",
                       f"{a['p90_abs_error_points']:.1f}",
                       "—" if a["interval_coverage"] is None else f"{a['interval_coverage']:.2f}", f"{a['ece']:.3f}"]
                      for a in report["noisy"]["audit"]]
        lines += ["### Random audits of the noisy round's verdict (gold as a person's spans)", "",
                  "Run health (share of sentences whose entity list is exactly right) against the truth, the "
                  "audit's 90 % Wilson interval, and the ECE of the scores on the sentences not audited "
                  "(`detection.judge_span_labels` with `audit_labels`, as a run judges them):", "",
                  fmt_table(["audited sentences", "draws", "health mean abs error, points", "90th percentile",
                             "interval coverage", "ECE"], audit_rows), ""]
    time_rows = [[name, report[name]["round_s"], report[name]["lower_states_s"], report[name]["cross_fit_s"],
                  report[name]["peak_rss_mib"]] for name in ("noisy", "gold") if name in report]
    lines += ["### One SLM round (lower states of the training sentences + cross-fitting)", "",
              "The lower states are computed once and shared by both rounds; each round counts them. Peak RSS "
              f"is per round (reset before it; {report['rss_before_mib']:.0f} MiB before the lower states).", "",
              fmt_table(["labels", "round s", "lower states s", "cross-fitting s", "peak RSS MiB"], time_rows), "",
              f"Load average at start {report['load_start']}, at end {report['load_end']}. The JSON beside this "
              "file has every number."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
