"""Can run health be told without gold? The run-health estimate against two alternatives, where gold is known.

    .venv/bin/python benchmarks/health_estimators.py [RUN_DIR ...] [--name all]

Re-judges stored out-of-sample SLM probabilities (no training, no LLM call) from:

- ``results/made_noise_n1000.npz``: SST-2, SUBJ, TREC labels made by a TF-IDF model (errors on hard texts), 3 seeds;
- ``results/replay_mr.npz``: the FreeAL authors' gpt-3.5 labels of MR (8662 texts);
- each RUN_DIR: a finished classification run with a live LLM and gold (``freeal run`` or ``quality.py``).

Per run, the share of labels right (unanswered = wrong) and three estimates of it made without gold:

- the run-health estimate (``detection.judge``, with the LLM's averaged probabilities where the run has them):
  the mean posterior of the label under cleanlab's noise estimate;
- the same posterior under the anchor-point noise estimate (``detection.anchor_transition``; top 3 % per class);
- the LLM's mean confidence in its label (its own probability, as it comes; live runs only).

Writes ``benchmarks/results/health_estimators_<name>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, fmt_table, loadavg, run_evidence, write_report  # noqa: E402

from freeal_backend.slm import detection  # noqa: E402


def estimates(name: str, probs: np.ndarray, labels: np.ndarray, gold: np.ndarray,
              llm_probs: np.ndarray | None = None, llm_calibrated: bool = False) -> dict[str, Any]:
    """The true accuracy of ``labels`` (-1: none) and the three estimates of it."""
    answered = labels >= 0
    verdict = detection.judge(probs, labels, None, llm_probs, llm_calibrated=llm_calibrated)
    calibrated, _ = detection.temperature_scale(probs, labels)
    anchor = detection.posterior_given_label(calibrated, labels, detection.anchor_transition(calibrated))
    rows = np.flatnonzero(answered)
    row: dict[str, Any] = {
        "run": name, "n": len(labels), "true": float((labels == gold).mean()),
        "health": verdict.health.estimated_accuracy, "verdict": verdict.health.verdict,
        "anchor": float(anchor[rows, labels[rows]].sum() / len(labels)), "llm_confidence": None}
    if llm_probs is not None:
        total = llm_probs.sum(axis=1)
        has = answered & (total > 0)
        if has.any():
            row["llm_confidence"] = float((llm_probs[has, labels[has]] / total[has]).sum() / len(labels))
    return row


def live_run(run_dir: Path) -> dict[str, Any]:
    ev = run_evidence(run_dir)
    return estimates(f"live: {run_dir.name}", ev["probs"], ev["labels"], ev["gold"], ev["llm_probs"],
                     ev["llm_calibrated"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="*", help="finished classification runs with a live LLM and gold")
    ap.add_argument("--name", default="all", help="result file name: health_estimators_<name>.md/.json")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    load_start = loadavg()
    rows = []
    made = np.load(RESULTS / "made_noise_n1000.npz")
    for data_set in ("sst2", "subj", "trec"):
        for seed in range(3):
            key = f"{data_set}_seed{seed}"
            rows.append(estimates(f"made noise: {key}", made[f"{key}_probs"], made[f"{key}_labels"],
                                  made[f"{key}_gold"]))
    replay = np.load(RESULTS / "replay_mr.npz")
    rows.append(estimates("MR replay (gpt-3.5)", replay["naive_seed0"], replay["labels"], replay["gold"]))
    rows += [live_run(Path(d)) for d in args.run_dirs]

    def p(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}"

    def off(x: float | None, true: float) -> str:
        return "n/a" if x is None else f"{100 * (x - true):+.1f}"

    table = [[r["run"], r["n"], p(r["true"]), f"{p(r['health'])} ({off(r['health'], r['true'])})", r["verdict"],
              f"{p(r['anchor'])} ({off(r['anchor'], r['true'])})",
              f"{p(r['llm_confidence'])} ({off(r['llm_confidence'], r['true'])})"] for r in rows]
    spread = []
    for key, what in (("health", "run health"), ("anchor", "anchor-point posterior"),
                      ("llm_confidence", "LLM confidence")):
        errors = [100 * (r[key] - r["true"]) for r in rows if r[key] is not None]
        if errors:
            spread.append(f"{what}: within 2 points on {sum(abs(e) <= 2 for e in errors)} of {len(errors)} runs, "
                          f"off by {min(errors):+.1f} to {max(errors):+.1f} points")
    body = (fmt_table(["run", "texts", "labels right %", "run health % (off by)", "verdict",
                       "anchor-point posterior % (off by)", "LLM mean confidence % (off by)"], table)
            + "\n\n" + "; ".join(spread) + ".")
    write_report(args.out_dir, f"health_estimators_{args.name}",
                 "Run health without gold: three estimates against the truth", body,
                 rows, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
