"""Which rule should set a refinement aside: the small model's estimate, or the LLM's own confidence?

    .venv/bin/python benchmarks/refinement_rule.py RUN_DIR [RUN_DIR ...] [--name loop_n300]

Each RUN_DIR is a finished classification run with gold and a refinement round (``freeal run``'s
``FREEAL_DATA_DIR/runs/<name>``, or a ``benchmarks/quality.py --data-dir`` run). Per run and refinement round,
on the texts whose answer the refinement changed: how often the previous answer and the refined one are
right; which one the small model prefers (the SLM round trained on the previous labels, and the one trained
on the refined labels); which one the LLM is surer of; and what each rule decides:

- the small model's estimate (the rule until 2026-12-04): set aside when the run-health estimate of the refined
  labels (next SLM round) is more than a point below the previous labels';
- the LLM's confidence (``FreeALRun._refinement_worse``, the default on 2026-12-04 and 05, an option since,
  ``FREEAL_SET_ASIDE_LESS_SURE``): set aside when the LLM is on average less sure of its changed answers than
  of the answers they would replace.

The right call (gold) is the better of the two label sets; keeping every refinement is the paper's rule.

Nothing is trained or asked: the stored answers, SLM outputs and health records are read.
Writes ``benchmarks/results/refinement_rule_<name>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, finished_run, fmt_table, loadavg, write_report  # noqa: E402

from freeal_backend.loop import REJECT_MARGIN  # noqa: E402


def accuracy(labels: dict[str, Any], gold: dict[str, str]) -> float:
    return float(np.mean([labels.get(k) == g for k, g in gold.items()]))


def check(run_dir: Path) -> list[dict[str, Any]]:
    """One row per refinement round of the run in ``run_dir``."""
    rows = []
    with finished_run(run_dir) as (run, items, _):
        gold = {it.item_id: str(it.gold) for it in items}
        rnd = 1
        while run.store.stage_done(f"llm_r{rnd}") and run.store.slm(rnd + 1):
            prev_ans = run._latest_answers(items, rnd - 1)
            before = {k: a["label"] for k, a in prev_ans.items()}
            refined = run.store.annotations(f"llm_r{rnd}")
            after = {**before, **{k: a["label"] for k, a in refined.items() if a["label"] is not None}}
            changed = [k for k, a in refined.items() if a["label"] is not None and k in before
                       and before[k] is not None and a["label"] != before[k]]
            old_slm, new_slm = run.store.slm(rnd), run.store.slm(rnd + 1)

            def prefers_new(slm: dict[str, Any]) -> float:
                return float(np.mean([slm[k]["probs"][run.labels.index(after[k])]
                                      > slm[k]["probs"][run.labels.index(before[k])] for k in changed]))

            conf_old = [prev_ans[k]["confidence"] for k in changed if prev_ans[k]["confidence"] is not None]
            conf_new = [refined[k]["confidence"] for k in changed if refined[k]["confidence"] is not None]
            h_old, h_new = run.store.get_meta(f"health_r{rnd}"), run.store.get_meta(f"health_r{rnd + 1}")
            slm_rule = bool(h_old and h_new
                            and h_new["estimated_accuracy"] < h_old["estimated_accuracy"] - REJECT_MARGIN)
            gain = accuracy(after, gold) - accuracy(before, gold)
            rows.append({
                "run_dir": str(run_dir), "round": rnd, "n": len(items), "asked": len(refined),
                "changed": len(changed),
                "accuracy_before": accuracy(before, gold), "accuracy_after": accuracy(after, gold), "gain": gain,
                "changed_right_before": float(np.mean([before[k] == gold[k] for k in changed])) if changed else None,
                "changed_right_after": float(np.mean([after[k] == gold[k] for k in changed])) if changed else None,
                "slm_before_prefers_refined": prefers_new(old_slm) if changed else None,
                "slm_after_prefers_refined": prefers_new(new_slm) if changed else None,
                "llm_conf_before": float(np.mean(conf_old)) if conf_old else None,
                "llm_conf_after": float(np.mean(conf_new)) if conf_new else None,
                "health_before": h_old and h_old["estimated_accuracy"],
                "health_after": h_new and h_new["estimated_accuracy"],
                "slm_rule_sets_aside": slm_rule, "llm_rule_sets_aside": bool(run._refinement_worse(items, rnd)),
                "right_to_set_aside": gain < 0})
            rnd += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="finished classification run folders (items with gold)")
    ap.add_argument("--name", default="runs", help="result file name: refinement_rule_<name>.md/.json")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    load_start = loadavg()
    rows = [row for d in args.run_dirs for row in check(Path(d))]

    def p(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}"

    def yes(x: bool) -> str:
        return "set aside" if x else "kept"

    table = [[Path(r["run_dir"]).name, r["round"], f"{r['changed']} of {r['asked']}", p(r["accuracy_before"]),
              p(r["accuracy_after"]), p(r["changed_right_before"]), p(r["changed_right_after"]),
              p(r["slm_before_prefers_refined"]), p(r["slm_after_prefers_refined"]),
              f"{p(r['llm_conf_before'])} → {p(r['llm_conf_after'])}",
              f"{p(r['health_before'])} → {p(r['health_after'])}", yes(r["slm_rule_sets_aside"]),
              yes(r["llm_rule_sets_aside"]), yes(r["right_to_set_aside"])] for r in rows]
    right = {k: sum(r[k] == r["right_to_set_aside"] for r in rows)
             for k in ("slm_rule_sets_aside", "llm_rule_sets_aside")}
    body = (fmt_table(["run", "round", "changed of re-asked", "acc before %", "acc after %", "changed: right before %",
                       "changed: right after %", "SLM (before) prefers refined %", "SLM (after) prefers refined %",
                       "LLM mean confidence on changed %", "health estimate %", "SLM-estimate rule",
                       "LLM-confidence rule", "right call (gold)"], table)
            + f"\n\nRight calls: the small model's estimate {right['slm_rule_sets_aside']} of {len(rows)}, the LLM's "
              f"confidence {right['llm_rule_sets_aside']} of {len(rows)}. 'Before' is the labels the refinement "
              "would replace, 'after' the labels with it; 'SLM (before)' is the SLM round trained on the labels "
              "before, 'SLM (after)' the one trained on the refined labels (out-of-sample probabilities).\n\n"
            + "\n".join(f"- {r['run_dir']}" for r in rows))
    write_report(args.out_dir, f"refinement_rule_{args.name}",
                 "Setting a refinement aside: the small model's estimate or the LLM's confidence", body,
                 rows, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
