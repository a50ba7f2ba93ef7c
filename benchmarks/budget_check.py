"""The review budget against gold: predicted vs true accuracy after reviewing the k least-confident texts.

The budget (freeal_backend/slm/budget.py) predicts, from the calibrated scores alone, the share of all labels
right after people review the k lowest-scored texts (a reviewed text becomes right). Here gold says what that
share really is, at every k = 0..n: the largest gap (goal: within 1.5 points at every k), how often the true
share lies in the 90 % interval, and for a few target errors the review set chosen and the error it leaves.

Cases (no training, no LLM call):
  - ``benchmarks/results/replay_mr.npz`` (MR, the FreeAL authors' gpt-3.5 labels) and
    ``made_noise_n1000.npz`` (SST-2, SUBJ, TREC with made, text-dependent noise; 3 seeds): the final labels
    and scores are re-judged (``detection.judge``) from the saved out-of-sample SLM probabilities, as those
    scripts' own ``--rejudge`` does, so the scores are what the current detection.py gives (no LLM confidence:
    those runs have none);
  - ``--run RUN_DIR`` (any number): a finished ``freeal run`` whose items carry gold; its stored final
    scores are used as they are (people's labels are right and not reviewed);
  - ``--rejudge-run RUN_DIR`` (any number): the same, re-judged with the current detection.py from the run's
    stored evidence (the last SLM round's probabilities, the LLM's confidence averaged over rounds).

    .venv/bin/python benchmarks/budget_check.py [--run RUN_DIR ...] [--rejudge-run RUN_DIR ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import brentq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, beside, fmt_table, loadavg, run_evidence, write_result  # noqa: E402

from freeal_backend.slm.budget import (CALIBRATION_SD, SHARES, budget_curve, review_order, review_set,  # noqa: E402
                                       shift_logits)
from freeal_backend.slm.detection import judge  # noqa: E402

TARGETS = (0.01, 0.02, 0.05, 0.1)
CONFIDENCE = 0.9  # the review sets are also chosen to meet each target with this confidence (FREEAL_TARGET_CONFIDENCE)
GOAL_POINTS = 1.5


def truth_offset(scores: np.ndarray, true_accuracy: float) -> float:
    """The logit offset that, added to every score, would have made the mean score the true accuracy (people's
    labels and scores of 0 or 1 do not move); the budget's interval counts it as normal with sd CALIBRATION_SD."""
    def gap(delta: float) -> float:
        return float(shift_logits(scores, delta).mean() - true_accuracy)
    if gap(-20) > 0 or gap(20) < 0:  # out of reach: the fixed scores alone miss the truth
        return float("nan")
    return float(brentq(gap, -20, 20))


def check(name: str, scores: np.ndarray, right: np.ndarray, reviewable: np.ndarray,
          calibration_sd: float = CALIBRATION_SD) -> dict[str, Any]:
    """Predicted vs true accuracy after review at every k, the share of k whose interval (the budget's with
    ``calibration_sd``, and chance's alone) holds the truth, and the review sets of ``TARGETS``."""
    n = len(scores)
    curve = budget_curve(scores, reviewable, calibration_sd=calibration_sd)
    chance = budget_curve(scores, reviewable, calibration_sd=0.0)
    order = review_order(scores, reviewable)
    fixed_right = int(right[~reviewable].sum())
    # true share right after reviewing order[:k]: k reviewed + the right ones among order[k:] + the others
    tail_right = np.r_[np.cumsum(right[order][::-1])[::-1], 0]
    true = (np.arange(len(order) + 1) + tail_right + fixed_right) / n
    gap = 100 * (curve.accuracy - true)
    inside, inside_chance = ((c.low - 1e-12 <= true) & (true <= c.high + 1e-12) for c in (curve, chance))
    worst = int(np.argmax(np.abs(gap)))
    at = sorted({min(len(order), round(s * n)) for s in SHARES})
    targets = []
    for target in TARGETS:
        for confidence in (None, CONFIDENCE):
            try:
                _, est = review_set(scores, target, reviewable, confidence, calibration_sd=calibration_sd)
            except ValueError:
                continue
            targets.append({"target_error": target, "confidence": confidence, "k": est.k, "share": est.k / n,
                            "predicted_error": 1 - est.accuracy, "interval": [1 - est.high, 1 - est.low],
                            "true_error": float(1 - true[est.k])})
    return {"case": name, "texts": n, "reviewable": int(reviewable.sum()), "true_accuracy": float(true[0]),
            "predicted_accuracy": float(curve.accuracy[0]), "max_abs_gap_points": float(abs(gap[worst])),
            "max_gap_at_k": worst, "max_gap_signed_points": float(gap[worst]),
            "mean_abs_gap_points": float(np.abs(gap).mean()), "interval_coverage": float(inside.mean()),
            "interval_holds_at_k0": bool(inside[0]), "chance_interval_coverage": float(inside_chance.mean()),
            "calibration_sd": calibration_sd, "truth_offset_logits": truth_offset(scores, float(true[0])),
            "within_goal": bool(abs(gap[worst]) <= GOAL_POINTS),
            "points": [{"k": k, "share": k / n, "predicted": float(curve.accuracy[k]), "true": float(true[k]),
                        "low": float(curve.low[k]), "high": float(curve.high[k])} for k in at],
            "targets": targets}


def npz_cases(path: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, SLM out-of-sample probabilities, labels judged (-1: none), gold) per saved run of a .npz."""
    saved = np.load(path)
    if "gold" in saved:  # replay_mr: one label/gold pair, probabilities per variant and seed
        return [(f"{path.stem} {key}", saved[key], saved["labels"], saved["gold"])
                for key in saved.files if key not in ("labels", "gold")]
    stems = sorted({key.rsplit("_", 1)[0] for key in saved.files})  # made_noise: <data set>_seed<s>_<what>
    return [(f"{path.stem} {stem}", saved[f"{stem}_probs"], saved[f"{stem}_labels"], saved[f"{stem}_gold"])
            for stem in stems]


def run_case(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored final scores, right-or-wrong against gold, and reviewable (not a person's) of a finished run.
    The state is copied first: the run's own files are only read."""
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in ("", "-wal"):
            if (run_dir / f"state.sqlite{suffix}").exists():
                shutil.copy(run_dir / f"state.sqlite{suffix}", Path(tmp) / f"state.sqlite{suffix}")
        db = sqlite3.connect(Path(tmp) / "state.sqlite")
        rows = db.execute("SELECT r.confidence, r.source, r.label = i.gold FROM results r JOIN items i "
                          "ON i.item_id = r.item_id WHERE i.gold IS NOT NULL").fetchall()
        db.close()
    if not rows:
        raise SystemExit(f"error: {run_dir} has no final results with gold")
    human = np.array([source == "human" for _, source, _ in rows])
    scores = np.where(human, 1.0, np.array([s if s is not None else 0.0 for s, _, _ in rows], dtype=float))
    return scores, np.array([bool(r) for _, _, r in rows]), ~human


def pts(x: float) -> str:
    return f"{100 * x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npz", nargs="*", default=[str(RESULTS / "replay_mr.npz"),
                                                  str(RESULTS / "made_noise_n1000.npz")])
    ap.add_argument("--run", nargs="*", default=[], help="finished run directories with gold (stored scores)")
    ap.add_argument("--rejudge-run", nargs="*", default=[], help="finished run directories with gold, re-judged")
    ap.add_argument("--out", default=str(RESULTS / "budget_check"), help="result file stem")
    args = ap.parse_args(argv)
    load_start = loadavg()
    results = []
    for path in map(Path, args.npz):
        for name, probs, labels, gold in npz_cases(path):
            verdict = judge(probs, labels)
            results.append(check(name, verdict.scores, verdict.labels == gold, np.ones(len(gold), dtype=bool)))
            print(f"{name}: max |gap| {results[-1]['max_abs_gap_points']:.2f} points", flush=True)
    for run_dir in map(Path, args.run):
        scores, right, reviewable = run_case(run_dir)
        results.append(check(f"run {run_dir}", scores, right, reviewable))
        print(f"run {run_dir}: max |gap| {results[-1]['max_abs_gap_points']:.2f} points", flush=True)
    for run_dir in map(Path, args.rejudge_run):
        ev = run_evidence(run_dir)
        verdict = judge(ev["probs"], ev["labels"], ev["human"], ev["llm_probs"], llm_calibrated=ev["llm_calibrated"])
        results.append(check(f"re-judged run {run_dir}", verdict.scores, verdict.labels == ev["gold"],
                             ~ev["human"]))
        print(f"re-judged run {run_dir}: max |gap| {results[-1]['max_abs_gap_points']:.2f} points", flush=True)

    summary = fmt_table(
        ["case", "texts", "true acc. %", "predicted %", "max abs gap, points (at k)", "mean abs gap",
         "offset to the truth, logits", "90 % interval covers (k = 0)", "chance alone covers",
         f"within {GOAL_POINTS} points"],
        [[r["case"], r["texts"], pts(r["true_accuracy"]), pts(r["predicted_accuracy"]),
          f"{r['max_gap_signed_points']:+.2f} ({r['max_gap_at_k']})", f"{r['mean_abs_gap_points']:.2f}",
          f"{r['truth_offset_logits']:+.2f}",
          f"{100 * r['interval_coverage']:.1f} % ({'yes' if r['interval_holds_at_k0'] else 'no'})",
          f"{100 * r['chance_interval_coverage']:.1f} %", "yes" if r["within_goal"] else "no"] for r in results])
    offsets = np.array([r["truth_offset_logits"] for r in results])
    reach = 1.6448536 * CALIBRATION_SD
    spread = (f"Offsets to the truth over the {len(results)} cases: {np.nanmin(offsets):+.2f} to "
              f"{np.nanmax(offsets):+.2f} logits; |offset| within {reach:.2f} (the 90 % reach of sd "
              f"{CALIBRATION_SD}) in {int(np.sum(np.abs(offsets) <= reach))} of them; the interval held the "
              f"truth at k = 0 in {sum(r['interval_holds_at_k0'] for r in results)} of {len(results)}.")
    curves = fmt_table(
        ["case"] + [f"k = {s:.0%}" for s in SHARES],
        [[r["case"]] + [f"{pts(p['predicted'])} / {pts(p['true'])}" for p in r["points"]] for r in results])
    def target_cells(confidence: float | None) -> list[list[Any]]:
        return [[r["case"]] + [next((f"{t['k']}, {pts(t['predicted_error'])} / {pts(t['true_error'])}"
                                     for t in r["targets"] if t["target_error"] == target
                                     and t.get("confidence") == confidence), "unreachable")
                               for target in TARGETS] for r in results]

    header = ["case"] + [f"target {t:.0%}: k, predicted / true error %" for t in TARGETS]
    targets, sure_targets = fmt_table(header, target_cells(None)), fmt_table(header, target_cells(CONFIDENCE))
    target_met = {c: [t["true_error"] <= t["target_error"] + 1e-12 for r in results for t in r["targets"]
               if t.get("confidence") == c] for c in (None, CONFIDENCE)}
    met = sum(r["within_goal"] for r in results)
    body = "\n\n".join([
        "Predicted (from the scores alone, P(label right) calibrated without gold) vs true share of all labels "
        "right after reviewing the k lowest-scored texts, at every k from 0 to all texts; a reviewed text counts "
        "as right. Gap = predicted − true, in points (positive: the budget promises too much); its k is the "
        f"number of texts reviewed. {met} of {len(results)} cases stay within {GOAL_POINTS} points at every k. "
        "The 90 % interval (slm/budget.py) counts chance (independent labels, right with their scores) and a "
        f"logit offset shared by every score, normal with sd {CALIBRATION_SD} (`CALIBRATION_SD`; an audit narrows "
        "it, not used here); 'chance alone' is the interval without that offset. 'Offset to the truth' is the "
        "shared logit offset that would have made the mean score the true accuracy (negative: the scores were "
        "too high).",
        summary,
        spread,
        "Predicted / true accuracy % at a few review shares (the points the status page shows):",
        curves,
        "Review sets for a target error (`FREEAL_TARGET_ERROR`): texts to review, predicted / true error % "
        f"after their review; the true error met the target in {sum(target_met[None])} of {len(target_met[None])}:",
        targets,
        f"The same with `FREEAL_TARGET_CONFIDENCE={CONFIDENCE}` (the set whose review meets the target with "
        f"{CONFIDENCE:.0%} confidence, counting chance and the calibration offset): the true error met the target "
        f"in {sum(target_met[CONFIDENCE])} of {len(target_met[CONFIDENCE])}:",
        sure_targets,
        "The .npz cases are re-judged from the saved out-of-sample SLM probabilities with detection.py as in "
        "the working tree (no LLM confidence in those runs); `--run` cases use the run's stored scores; "
        "`--rejudge-run` cases are re-judged the same way from the run's stored evidence, with the LLM's confidence.",
    ])
    print("\n" + body)
    stem = Path(args.out)
    write_result(beside(stem, ".md"), "The review budget against gold", body, load_start)
    data = {"goal_points": GOAL_POINTS, "cases": results, "load_start": load_start, "load_end": loadavg()}
    beside(stem, ".json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(f"wrote {beside(stem, '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
