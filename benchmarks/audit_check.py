"""The random audit against gold: how close run health and the scores' level come with k audited tasks.

Each case is a judged label set with gold. An audit of k tasks is drawn at random (among the texts without a
person's label) and given gold as the person's labels; the verdict (``detection.judge`` with
``audit_labels``) is taken again, many times per k. Measured per k over the draws:
  - run health's error against the true share of right LLM labels (unanswered = wrong), in points: mean
    absolute, root mean square and the 90th percentile of the absolute error;
  - how often the audit's 90 % Wilson interval holds the true share;
  - the final scores' calibration on the texts not audited (ECE, 10 bins), and the gap between their mean and
    the true share of right final labels;
  - the review budget's largest gap against the truth on the texts not audited (as budget_check.py), and how
    often its 90 % interval holds the truth over every k (its calibration sd as without an audit, as in the
    product; ``--narrow`` narrows it by the audit's own uncertainty, which held the truth less often);
  - "trust the rest": the true share right among the texts the flag leaves alone (JSON only).
Without an audit (k = 0) the same figures come from the verdict alone.

Cases (no training, no LLM call), as in budget_check.py: ``--npz`` files of saved out-of-sample SLM
probabilities (made noise, the MR replay), re-judged; ``--rejudge-run RUN_DIR`` finished runs with gold,
re-judged from their stored evidence (LLM confidence included).

    .venv/bin/python benchmarks/audit_check.py [--npz F ...] [--rejudge-run RUN_DIR ...] [--draws 200]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, beside, fmt_table, loadavg, run_evidence, write_report  # noqa: E402
from budget_check import check, npz_cases  # noqa: E402

from freeal_backend.metrics import expected_calibration_error  # noqa: E402
from freeal_backend.slm.audit import AUDIT_LEVEL, AUDIT_MIN, Audit  # noqa: E402
from freeal_backend.slm.budget import CALIBRATION_SD  # noqa: E402
from freeal_backend.slm.detection import judge  # noqa: E402

SIZES = (20, 30, 50, 100)


def narrowed_sd(audit: Audit, scores: np.ndarray) -> float:
    """The alternative the product does not take: the calibration offset's sd after an audit, the prior
    combined with the audit's binomial standard error of its share right (smoothed), turned into logits by how
    fast the mean score moves with an offset (the mean of p(1 - p))."""
    slope = float(np.mean(scores * (1 - scores)))
    if slope <= 0:
        return CALIBRATION_SD
    a = (audit.final_right + 1.0) / (audit.audited + 2.0)
    audit_sd = float(np.sqrt(a * (1 - a) / audit.audited)) / slope
    return float(1 / np.sqrt(1 / CALIBRATION_SD**2 + 1 / audit_sd**2))


def measure(name: str, probs: np.ndarray, labels: np.ndarray, gold: np.ndarray, human: np.ndarray | None,
            llm_probs: np.ndarray | None, sizes: tuple[int, ...], draws: int, seed: int,
            llm_calibrated: bool = False, narrow: bool = False) -> dict[str, Any]:
    """Run health, interval, calibration and the unflagged share over ``draws`` random audits per size."""
    n = len(labels)
    human = np.zeros(n, dtype=bool) if human is None else human
    free = np.flatnonzero(~human)
    true = float((labels[free] == gold[free]).mean())  # unanswered (-1) never equals gold

    def one(audit_rows: np.ndarray) -> dict[str, float]:
        audit = np.full(n, -1)
        audit[audit_rows] = gold[audit_rows]
        v = judge(probs, labels, human, llm_probs, audit_labels=audit, llm_calibrated=llm_calibrated)
        rest = np.setdiff1d(free, audit_rows)
        right = v.labels[rest] == gold[rest]
        unflagged = rest[~v.flagged[rest]]
        sd = narrowed_sd(v.audit, v.scores[rest]) if narrow and v.audit is not None and v.audit.decides \
            else CALIBRATION_SD
        budget = check(name, v.scores[rest], right, ~human[rest], sd)
        out = {"error": v.health.estimated_accuracy - true, "ece": expected_calibration_error(v.scores[rest], right),
               "budget_gap": budget["max_abs_gap_points"], "budget_covered": budget["interval_coverage"],
               "budget_k0": float(budget["interval_holds_at_k0"]),
               "level_gap": float(v.scores[rest].mean() - right.mean()),
               "unflagged_true": float((v.labels[unflagged] == gold[unflagged]).mean()) if len(unflagged) else np.nan,
               "covered": np.nan}
        if v.audit is not None:
            out["covered"] = float(v.audit.low <= true <= v.audit.high)
            out["unflagged_audit"] = (v.audit.unflagged_right / v.audit.unflagged if v.audit.unflagged else np.nan)
        return out

    rng = np.random.default_rng(seed)
    rows = [dict(size=0, **_summary([one(np.array([], dtype=int))]))]
    for k in sizes:
        if k > len(free):
            continue
        rows.append(dict(size=k, **_summary([one(rng.choice(free, k, replace=False)) for _ in range(draws)])))
    return {"case": name, "texts": n, "true_accuracy": true, "draws": draws, "sizes": rows}


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    err = 100 * np.array([r["error"] for r in runs])
    return {"mean_abs_error_points": float(np.abs(err).mean()), "rmse_points": float(np.sqrt((err ** 2).mean())),
            "p90_abs_error_points": float(np.quantile(np.abs(err), 0.9)), "mean_error_points": float(err.mean()),
            "interval_coverage": float(np.nanmean([r["covered"] for r in runs])) if len(runs) > 1 else None,
            "ece": float(np.mean([r["ece"] for r in runs])),
            "level_gap_points": float(100 * np.mean([r["level_gap"] for r in runs])),
            "budget_max_gap_points": float(np.mean([r["budget_gap"] for r in runs])),
            "budget_within_1_5": float(np.mean([r["budget_gap"] <= 1.5 for r in runs])),
            "budget_interval_coverage": float(np.mean([r["budget_covered"] for r in runs])),
            "budget_holds_at_k0": float(np.mean([r["budget_k0"] for r in runs])),
            "unflagged_true": float(np.nanmean([r["unflagged_true"] for r in runs]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npz", nargs="*", default=[str(RESULTS / "replay_mr_full_naive.npz"),
                                                  str(RESULTS / "made_noise_n1000_plain.npz")])
    ap.add_argument("--rejudge-run", nargs="*", default=[], help="finished run directories with gold, re-judged")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="audit sizes (comma-separated)")
    ap.add_argument("--draws", type=int, default=200, help="random audits per size and case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--narrow", action="store_true",
                    help="narrow the budget interval's calibration sd by the audit (not what the product does)")
    ap.add_argument("--out", default=str(RESULTS / "audit_check"), help="result file stem")
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    load_start = loadavg()
    cases = []
    for path in map(Path, args.npz):
        for name, probs, labels, gold in npz_cases(path):
            cases.append(measure(name, probs, labels, gold, None, None, sizes, args.draws, args.seed,
                                 narrow=args.narrow))
            print(f"{name}: done", flush=True)
    for run_dir in map(Path, args.rejudge_run):
        ev = run_evidence(run_dir)
        cases.append(measure(f"run {run_dir.parent.parent.parent.name}/{run_dir.name}", ev["probs"], ev["labels"],
                             ev["gold"], ev["human"], ev["llm_probs"], sizes, args.draws, args.seed,
                             ev["llm_calibrated"], args.narrow))
        print(f"{run_dir}: done", flush=True)

    def cell(case: dict[str, Any], k: int, key: str, fmt: str) -> str:
        row = next((r for r in case["sizes"] if r["size"] == k), None)
        return "—" if row is None or row[key] is None else format(row[key], fmt)

    ks = (0, *sizes)
    health = fmt_table(["case", "texts", "true %"] + [f"k = {k}" if k else "no audit" for k in ks],
                       [[c["case"], c["texts"], f"{100 * c['true_accuracy']:.1f}"]
                        + [f"{cell(c, k, 'mean_abs_error_points', '.1f')} / {cell(c, k, 'p90_abs_error_points', '.1f')}"
                           for k in ks] for c in cases])
    cover = fmt_table(["case"] + [f"k = {k}" for k in sizes],
                      [[c["case"]] + [cell(c, k, "interval_coverage", ".2f") for k in sizes] for c in cases])
    calib = fmt_table(["case"] + [f"k = {k}" if k else "no audit" for k in ks],
                      [[c["case"]] + [f"{cell(c, k, 'ece', '.3f')} ({cell(c, k, 'level_gap_points', '+.1f')})"
                                      for k in ks] for c in cases])
    budget = fmt_table(["case"] + [f"k = {k}" if k else "no audit" for k in ks],
                       [[c["case"]] + [f"{cell(c, k, 'budget_max_gap_points', '.1f')} "
                                       f"({cell(c, k, 'budget_within_1_5', '.0%')})" for k in ks] for c in cases])
    held = fmt_table(["case"] + [f"k = {k}" if k else "no audit" for k in ks],
                     [[c["case"]] + [f"{cell(c, k, 'budget_interval_coverage', '.0%')} "
                                     f"({cell(c, k, 'budget_holds_at_k0', '.0%')})" for k in ks] for c in cases])
    mean_abs = {k: float(np.mean([r["mean_abs_error_points"] for c in cases for r in c["sizes"] if r["size"] == k]))
                for k in ks}
    body = "\n\n".join([
        f"Random audits drawn {args.draws} times per size and case (k texts among those without a person's label, "
        "gold as the person's label); every draw re-judges the case with `detection.judge(..., audit_labels=...)`. "
        f"The audit sets run health and the scores' level from {AUDIT_MIN} audited tasks on (below that it is only "
        "reported). Mean over all cases of the mean absolute error of run health: "
        + ", ".join(f"{'no audit' if k == 0 else f'k = {k}'}: {v:.1f} points" for k, v in mean_abs.items()) + ".",
        "**Run health against the true share of right LLM labels**: mean / 90th percentile of the absolute "
        "error, in points, over the draws:",
        health,
        f"**The audit's {AUDIT_LEVEL:.0%} interval** (Wilson) holds the true share this often:",
        cover,
        "**The final scores on the texts not audited**: ECE (10 bins), and in brackets their mean minus the true "
        "share right, in points, averaged over the draws:",
        calib,
        "**The review budget on the texts not audited** (`budget_check.py`'s measure): the largest gap between "
        "predicted and true accuracy after reviewing the k lowest-scored texts, over every k, in points, mean "
        "over the draws; in brackets the share of draws within 1.5 points at every k:",
        budget,
        "**The review budget's 90 % interval** (chance and a shared logit offset of the scores, sd "
        + (f"narrowed by an audit of {AUDIT_MIN} or more: `narrowed_sd`" if args.narrow else
           f"{CALIBRATION_SD} with or without an audit") + "): share of k at which it holds the truth, "
        "mean over the draws; in brackets the share of draws in which it holds it at k = 0:",
        held,
        "The .npz cases have no LLM confidence; the `--rejudge-run` cases are judged with it, as the run was. "
        "The audited rows were never people's labels in these runs, so the small model's probabilities are "
        "exactly what a blind audit leaves them (it trains on the LLM's label there, as here).",
    ])
    stem = Path(args.out)
    write_report(stem.parent, stem.name, "The random audit against gold", body,
                 {"cases": cases, "load_start": load_start, "load_end": loadavg()}, load_start)
    print(f"wrote {beside(stem, '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
