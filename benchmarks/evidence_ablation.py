"""What each piece of evidence adds to the verdict, on finished runs with a live LLM (issue 23's ablation).

    .venv/bin/python benchmarks/evidence_ablation.py RUN_DIR [RUN_DIR ...] [--rounds 1] [--name main_job_sst2]

Each RUN_DIR is a finished classification run (``freeal run``'s ``FREEAL_DATA_DIR/runs/<name>``, or a
``benchmarks/quality.py --data-dir`` run) whose items carry gold. The stored answers and the last SLM round
are re-judged (``detection.judge``, no training, no LLM call) with:

- the small model alone (no LLM confidence);
- the LLM's confidence alone (its probability for the label, as it comes);
- the small model + the LLM's last answer's probabilities;
- the small model + the LLM's probabilities averaged over every round that asked the text (what runs use),
  the same with the LLM's last answer as the label where the LLM outranks the small model (as before
  2026-12-06; the label the averaged probabilities favour is what runs use), the same without the cap of the scores at the LLM's mean confidence (as before 2026-12-05), and without
  that cap and the linear pool of the posterior with the LLM's calibrated confidence (the product only, as
  before 2026-12-04);
- the same with a second judge (``second_judge.py``'s probe on the frozen encoder's embeddings) in place of
  the small model, and averaged with it;
- as a control, the small model with uniform noise in place of the LLM's probabilities (3 seeded draws: a
  random probability for each label, the rest spread over the other classes), weighed as runs weigh an
  endpoint's, and where the run's LLM is known to be calibrated (``FREEAL_LLM_CALIBRATED``) also as runs
  weigh that LLM's (its mean then sets the level: what a wrong ``FREEAL_LLM_CALIBRATED`` would do).

A span (NER) run is re-judged (``detection.judge_span_labels``) with the tagger alone, with the LLM's
agreement with itself across rounds, with that and its logprob confidence, and with those and the spans' own
scores assembled per sentence (what runs use where the LLM is known to be calibrated). Controls: uniform
noise in place of the LLM's evidence (3 seeded draws); where the run's LLM is known to be calibrated, span
confidences that carry nothing and run high (0.9–1, or 0.99 flat) in its place (what a wrong
``FREEAL_LLM_CALIBRATED`` would do). A sentence is right when its final entity list is exactly gold. Each
span's own score (the region score) is measured too, from the LLM's view (its confidence over rounds, or
without logprobs the share of rounds that named it), the tagger's, and both.

Per variant: AUROC for ranking wrong final labels first, ECE of the score, the run-health estimate against
the true accuracy, the flag (share, precision, recall) and the recall of the lowest-scored 10 % and 20 %.
Writes ``benchmarks/results/evidence_ablation_<name>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, finished_run, fmt_table, loadavg, mean_sd, write_report  # noqa: E402

from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.metrics import expected_calibration_error, review_scores  # noqa: E402
from freeal_backend.slm.detection import judge, span_region_scores  # noqa: E402
from freeal_backend.slm.second_judge import probe_oof  # noqa: E402
from freeal_backend.spans import decode_spans, encode_spans  # noqa: E402

VARIANTS = {  # name: (judge's probabilities, the LLM's, linear pool, cap at the LLM's mean confidence, label
    # an outranked judge leaves: the one the LLM's averaged probabilities favour, or its last answer);
    "SLM alone": ("SLM", None, True, True, True),  # None: the LLM's confidence as it comes
    "LLM confidence alone": None,
    "SLM + LLM last answer": ("SLM", "last", True, True, True),
    "SLM + LLM over rounds": ("SLM", "averaged", True, True, True),
    "SLM + LLM over rounds, last answer's label": ("SLM", "averaged", True, True, False),
    "SLM + LLM over rounds, no cap": ("SLM", "averaged", True, False, True),
    "SLM + LLM over rounds, product only": ("SLM", "averaged", False, False, True),
    "probe + LLM over rounds": ("probe", "averaged", True, True, True),
    "SLM and probe + LLM over rounds": ("SLM and probe", "averaged", True, True, True),
}


def last_answer_probs(run: FreeALRun, items: list[Any], rounds: int) -> np.ndarray:
    latest = run._latest_answers(items, rounds)
    out = np.zeros((len(items), len(run.labels)))
    for i, it in enumerate(items):
        given = (latest.get(it.item_id) or {}).get("probs") or {}
        out[i] = [float(given.get(x, 0.0)) for x in run.labels]
    return out


SPAN_VARIANTS = {  # name: (SpanRun.llm_evidence, SpanRun.pool_list_right)
    "tagger alone": ("", False), "tagger + LLM agreement over rounds": ("agreement", False),
    "tagger + LLM confidence and agreement over rounds (as before)": ("logprobs", False),
    "the same + the spans' own scores assembled per sentence (what runs use with a calibrated LLM)": (
        "logprobs", True)}
REGION_VARIANTS = {  # name: (the LLM's view: with its logprobs or the share of rounds that named the span;
    # the tagger's weight: 0 leaves it out, 1 the LLM's view left out, 0.5 both as runs combine them)
    "the LLM's confidence over rounds alone (as before)": (True, 0.0),
    "the tagger's score for the same span alone": (True, 1.0),
    "the LLM's confidence and the tagger (what runs use)": (True, 0.5),
    "without logprobs: the share of rounds that named it": (False, 0.0),
    "without logprobs: that share and the tagger (what runs use)": (False, 0.5),
}
OVERCONFIDENT: dict[str, Callable[[np.random.Generator], float]] = {  # controls: span confidences that carry
    # nothing and run high, taken as calibrated (a wrong FREEAL_LLM_CALIBRATED for an overconfident endpoint)
    "the same with each span's confidence drawn from U(0.9, 1) (control)": lambda rng: float(rng.uniform(0.9, 1.0)),
    "the same with each span's confidence 0.99 (control)": lambda rng: 0.99,
}
NOISE_DRAWS = 3  # controls: uniform noise in place of the LLM's evidence


def noise_probs(labels: np.ndarray, classes: int, rng: np.random.Generator) -> np.ndarray:
    """LLM probabilities that carry nothing: per answered text a uniform draw for its label, the rest spread
    evenly over the other classes; rows of zeros where there is no label."""
    label_p = rng.uniform(0.0, 1.0, len(labels))
    out = np.repeat(((1.0 - label_p) / max(1, classes - 1))[:, None], classes, axis=1)
    out[np.arange(len(labels)), np.maximum(labels, 0)] = label_p
    out[labels < 0] = 0.0
    return out


def _metrics(score: np.ndarray, wrong: np.ndarray, unanswered: np.ndarray, flagged: np.ndarray | None,
             est: float) -> dict[str, float]:
    rs = review_scores(score, wrong, unanswered=unanswered, flagged=flagged, shares=(0.10, 0.20))
    return {"final_accuracy": float(1 - wrong.mean()), "auroc": rs["auroc"],
            "ece": expected_calibration_error(score, ~wrong), "health_estimate": est,
            "flag_share": rs.get("flag_share", float("nan")),
            "flag_precision": rs.get("flag_answered_wrong_precision", float("nan")),
            "flag_recall": rs.get("flag_answered_wrong_recall", float("nan")),
            "top10_recall": rs["top10pct_answered_wrong_recall"], "top20_recall": rs["top20pct_answered_wrong_recall"]}


def ablate_spans(run: Any, items: list[Any], rounds: int, run_dir: Path) -> dict[str, Any]:
    """The span verdict of ``rounds`` re-judged with each of ``SPAN_VARIANTS``."""
    labels, _ = run._current(items, rounds)
    predicted, _, _ = run._predicted(items, rounds + 1)
    final = [lab if lab is not None else encode_spans(pred) for lab, pred in zip(labels, predicted)]
    wrong = np.array([f != it.gold for f, it in zip(final, items)])
    unanswered = np.array([lab is None for lab in labels])
    rows: dict[str, Any] = {"run_dir": str(run_dir), "rounds": rounds, "n": len(items), "task_type": "ner",
                            "label_accuracy": float(np.mean([lab == it.gold for lab, it in zip(labels, items)])),
                            "variants": {}}
    for name, (evidence, pool) in SPAN_VARIANTS.items():
        run.llm_evidence, run.pool_list_right = evidence, pool
        v = run._judge(items, rounds + 1)
        rows["variants"][name] = _metrics(v.scores, wrong, unanswered, v.flagged, v.health.estimated_accuracy)
    rows["regions"] = ablate_regions(run, items, rounds, predicted)
    views = run._region_views
    for name, draw in OVERCONFIDENT.items() if run.llm_calibrated else ():  # what a wrong FREEAL_LLM_CALIBRATED does
        rng = np.random.default_rng(0)
        run._region_views = lambda *a, draw=draw, rng=rng, **k: [
            (i, key, draw(rng) if sure else llm, tagger, sure) for i, key, llm, tagger, sure in views(*a, **k)]
        v = run._judge(items, rounds + 1)
        rows["variants"][name] = _metrics(v.scores, wrong, unanswered, v.flagged, v.health.estimated_accuracy)
    run._region_views = views
    has = ~np.isnan(run._rounds_confidence(items, rounds))
    rng = np.random.default_rng(0)
    run.llm_evidence, run.pool_list_right = "logprobs", False
    for draw in range(NOISE_DRAWS):  # a control: a confidence that carries nothing
        noise = np.where(has, rng.uniform(0.0, 1.0, len(items)), np.nan)
        run._rounds_confidence = lambda *_, noise=noise, **__: noise
        v = run._judge(items, rounds + 1)
        rows["variants"][f"tagger + uniform noise as the LLM's evidence (control, draw {draw})"] = _metrics(
            v.scores, wrong, unanswered, v.flagged, v.health.estimated_accuracy)
    return rows


def ablate_regions(run: Any, items: list[Any], rounds: int, predicted: list[Any]) -> dict[str, Any]:
    """Each span's own score (the region score) with each of ``REGION_VARIANTS``, over the spans of the LLM's
    final lists; a span is right when its start, end and type are a gold span's."""
    gold = {it.item_id: {(s.start, s.end, s.label) for s in decode_spans(it.gold)} for it in items}
    out: dict[str, Any] = {}
    for name, (logprobs, tagger_weight) in REGION_VARIANTS.items():
        views = run._region_views(items, rounds, predicted, logprobs=logprobs)
        llm, tagger = np.array([v[2] for v in views]), np.array([v[3] for v in views])
        confident = np.array([v[4] for v in views], dtype=bool)
        score = {0.0: llm, 1.0: tagger}.get(tagger_weight)
        if score is None:
            score = span_region_scores(llm, tagger, confident)
        spans = [(item_id, key.split(":", 2)) for item_id, key, *_ in views]  # span_key: start:end:type
        right = np.array([(int(start), int(end), kind) in gold[item_id] for item_id, (start, end, kind) in spans],
                         dtype=bool)
        out[name] = {"spans": len(views), "right_share": float(right.mean()),
                     "auroc": review_scores(score, ~right)["auroc"],
                     "ece": expected_calibration_error(score, right), "mean_score": float(score.mean())}
    return out


def ablate(run_dir: Path, rounds: int | None) -> dict[str, Any]:
    with finished_run(run_dir, ("classification", "ner")) as (run, items, done):
        rounds = done if rounds is None else rounds
        if run.task_type == "ner":
            return ablate_spans(run, items, rounds, run_dir)
        gold = np.array([run.labels.index(str(it.gold)) for it in items])
        slm = run.store.slm(rounds + 1)
        if not slm:
            raise SystemExit(f"error: {run_dir} has no SLM round {rounds + 1} (is the run finished?)")
        probs = np.array([slm[it.item_id]["probs"] for it in items])
        given, averaged = run._current(items, rounds)
        last = last_answer_probs(run, items, rounds)
        frozen = run._embeddings(items, lambda *a: None)
        calibrated = run.llm_calibrated
    y = np.array([run.labels.index(g) if g is not None else -1 for g in given])
    unanswered = y < 0
    probe = probe_oof(frozen, y, len(run.labels), [it.text for it in items], seed=run.settings.seed)
    judges = {"SLM": probs, "probe": probe, "SLM and probe": (probs + probe) / 2}
    rows: dict[str, Any] = {"run_dir": str(run_dir), "rounds": rounds, "n": len(items),
                            "label_accuracy": float((y == gold).mean()), "variants": {}}
    llms = {None: None, "last": last, "averaged": averaged}
    for name, spec in VARIANTS.items():
        if spec is None:
            total = last.sum(axis=1)
            has = ~unanswered & (total > 0)
            score = np.where(has, last[np.arange(len(y)), np.maximum(y, 0)] / np.where(has, total, 1), 0.0)
            final, flagged, est = y, None, float("nan")
        else:
            slm_side, llm_side, pool, cap, average_rounds = spec
            j = judge(judges[slm_side], y, None, llms[llm_side], pool=pool, cap=cap, llm_calibrated=calibrated,
                      average_rounds=average_rounds)
            score, final, flagged, est = j.scores, j.labels, j.flagged, j.health.estimated_accuracy
        rows["variants"][name] = _metrics(score, final != gold, unanswered, flagged, est)
    rng = np.random.default_rng(0)
    for draw in range(NOISE_DRAWS):  # a control: LLM probabilities that carry nothing, as runs weigh them
        noise = noise_probs(y, len(run.labels), rng)
        for known, said in ((False, ""), (True, ", taken as calibrated")) if calibrated else ((False, ""),):
            j = judge(probs, y, None, noise, llm_calibrated=known)
            rows["variants"][f"SLM + uniform noise as the LLM's probabilities{said} (control, draw {draw})"] = (
                _metrics(j.scores, j.labels != gold, unanswered, j.flagged, j.health.estimated_accuracy))
    return rows


def region_table(runs: list[dict[str, Any]]) -> str:
    """The region-score variants of span runs, mean ± sd over the runs, and per run."""
    rows = [[name, mean_sd([r["regions"][name]["auroc"] for r in runs], False),
             mean_sd([r["regions"][name]["ece"] for r in runs], False),
             " / ".join(f"{r['regions'][name]['auroc']:.3f}" for r in runs),
             " / ".join(f"{r['regions'][name]['ece']:.3f}" for r in runs),
             " / ".join(f"{r['regions'][name]['mean_score']:.3f}" for r in runs)] for name in REGION_VARIANTS]
    first = [r["regions"][next(iter(REGION_VARIANTS))] for r in runs]
    return ("\n\n### Each span's own score (the region score in Label Studio)\n\n"
            "Over the spans of the LLM's final lists (per run: " + " / ".join(str(f["spans"]) for f in first)
            + " spans, " + " / ".join(f"{100 * f['right_share']:.1f}" for f in first) + " % of them exactly in "
            "gold); a span is right when its start, end and type are a gold span's. The tagger's view is its "
            "held-out score for the same span, 0 where it predicts another.\n\n"
            + fmt_table(["region score", "AUROC wrong spans", "ECE", "AUROC per run", "ECE per run",
                         "mean score per run"], rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="finished classification run folders (items with gold)")
    ap.add_argument("--rounds", type=int, help="judge the labels after this many refinement rounds "
                                               "(default: the rounds the run finished)")
    ap.add_argument("--name", default="runs", help="result file name: evidence_ablation_<name>.md/.json")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    load_start = loadavg()
    runs = [ablate(Path(d), args.rounds) for d in args.run_dirs]
    kinds = {r.get("task_type", "classification") for r in runs}
    if len(kinds) > 1:
        raise SystemExit("error: give class runs or span runs, not both: their variants differ")
    variants = list(runs[0]["variants"])
    keys = [("final_accuracy", True), ("auroc", False), ("ece", False), ("health_estimate", True),
            ("flag_share", True), ("flag_precision", True), ("flag_recall", True), ("top10_recall", True),
            ("top20_recall", True)]
    table = [[name] + [mean_sd([r["variants"][name][k] for r in runs], pct) for k, pct in keys] for name in variants]
    truth = mean_sd([r["label_accuracy"] for r in runs], True)
    body = (f"{len(runs)} run(s); labels judged: {truth} % right (mean ± sd over runs where more than one); "
            "every variant re-judges the same stored answers and SLM output (no training, no LLM call).\n\n"
            + fmt_table(["evidence", "final acc %", "AUROC wrong", "ECE", "health est. %", "flag %",
                         "flag precision %", "flag recall %", "lowest 10 % recall", "lowest 20 % recall"], table)
            + ("\n\nA sentence is right when its final entity list is exactly gold. " if kinds == {"ner"} else
               "\n\n'LLM confidence alone' is the LLM's probability for its last answer, uncalibrated (no flag, "
               "no health). ")
            + "Recall counts wrong answered labels; texts the LLM left unanswered are apart.\n\n"
            + "\n".join(f"- {r['run_dir']}: {r['n']} texts, rounds {r['rounds']}" for r in runs)
            + (region_table(runs) if kinds == {"ner"} else ""))
    write_report(args.out_dir, f"evidence_ablation_{args.name}",
                 "Evidence ablation: what the LLM's confidence adds to the small model's verdict", body,
                 runs, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
