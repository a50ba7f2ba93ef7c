"""Why a refinement round helps or not: what it kept, what it re-asked, and with which demonstrations.

    .venv/bin/python benchmarks/refinement_why.py RUN_DIR [RUN_DIR ...] [--name loop_n300_1.5b]

Each RUN_DIR is a finished classification run with gold (a ``benchmarks/quality.py --data-dir`` loop run, or
``freeal run``'s ``FREEAL_DATA_DIR/runs/<name>``). From its stored state (no training, no LLM call) and per
refinement round: the small model's accuracy and its agreement with the labels it was trained on; the clean
agreed set (kept as labelled, not re-asked) and the demo pool drawn from it, with the share of their labels
that are right; the texts re-asked, how right the LLM was on them zero-shot, in round 0 (its own written
demonstrations) and after (demonstrations from the pool), and how many it fixed and broke; and how right the
label with the highest probability averaged over the rounds would have been, and (for runs with the
zero-shot baseline) that average with the zero-shot answer as one more vote. Runs of the same
data set are pooled as mean ± sd (population sd). Writes ``benchmarks/results/refinement_why_<name>.md`` and
``.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LOOP_RECORD, RESULTS, averaged_vote, cell, finished_run, fmt_table, loadavg, write_report  # noqa: E402


def _share(mask: np.ndarray, of: np.ndarray) -> float:
    return float(mask[of].mean()) if of.any() else float("nan")


def diagnose(run_dir: Path) -> dict[str, Any]:
    """Per refinement round of the run in ``run_dir``: the numbers of the module doc."""
    record = (json.loads((run_dir / LOOP_RECORD).read_text(encoding="utf-8"))
              if (run_dir / LOOP_RECORD).exists() else {})
    config = record.get("config", {})
    with finished_run(run_dir, **({"seed": config["seed"]} if "seed" in config else {})) as (run, items, rounds):
        out: dict[str, Any] = {"run_dir": str(run_dir), "dataset": config.get("dataset", run_dir.name),
                               "seed": run.settings.seed, "n": len(items), "rounds": []}
        gold = np.array([str(it.gold) for it in items])
        ids = [it.item_id for it in items]
        stages = run.stage_labels()

        def right(stage: str) -> np.ndarray:
            return np.array([stages[stage].get(i) for i in ids], dtype=object) == gold

        for rnd in range(1, rounds + 1):
            if f"llm_r{rnd}" not in stages:
                continue
            scope = run.refinement_scope(items, rnd)
            asked = np.zeros(len(items), dtype=bool)
            asked[scope.todo] = True
            stored = set(run.store.annotations(f"llm_r{rnd}"))
            before_ok, after_ok = right("llm_r0" if rnd == 1 else f"llm_r{rnd - 1}"), right(f"llm_r{rnd}")
            given, averaged = run._current(items, rnd)  # the rounds' per-class probabilities, averaged
            pooled = averaged_vote(run.labels, given, averaged) == gold
            y, pred, _ = run._slm_groups(items, rnd)
            answered = y >= 0
            pool_right = np.array([run.labels[c] for c in scope.pool_cls]) == gold[scope.pool_idx]
            entry = {
                "round": rnd, "slm_accuracy": float((np.array(run.labels)[pred] == gold).mean()),
                "slm_agreement": float((pred == y)[answered].mean()),
                "kept": int((~asked).sum()), "kept_right": _share(before_ok, ~asked),
                "pool": len(scope.pool_idx), "pool_right": float(pool_right.mean()) if len(pool_right) else None,
                "asked": int(asked.sum()), "asked_not_stored": len(set(np.array(ids)[asked]) ^ stored),
                "asked_right_r0": _share(right("llm_r0"), asked), "asked_right_before": _share(before_ok, asked),
                "asked_right_after": _share(after_ok, asked), "asked_right_averaged": _share(pooled, asked),
                "fixed": int((asked & ~before_ok & after_ok).sum()), "broken": int((asked & before_ok & ~after_ok).sum()),
                "before": float(before_ok.mean()), "after": float(after_ok.mean()), "averaged": float(pooled.mean()),
            }
            if "zero_shot" in stages:
                entry["asked_right_zero_shot"] = _share(right("zero_shot"), asked)
                _, with_zero_shot = run._current(items, rnd, sources=["zero_shot", *run._label_sources(rnd)])
                entry["with_zero_shot"] = float((averaged_vote(run.labels, given, with_zero_shot) == gold).mean())
            out["rounds"].append(entry)
    return out


COLUMNS = [("slm_accuracy", "SLM right %", True), ("slm_agreement", "SLM agrees with labels %", True),
           ("kept", "kept (clean agreed)", False), ("kept_right", "kept right %", True),
           ("pool", "demo pool", False), ("pool_right", "pool right %", True), ("asked", "re-asked", False),
           ("asked_right_zero_shot", "re-asked: zero-shot right %", True),
           ("asked_right_r0", "re-asked: round 0 right %", True),
           ("asked_right_after", "re-asked: refined right %", True),
           ("asked_right_averaged", "re-asked: rounds averaged right %", True), ("fixed", "fixed", False),
           ("broken", "broken", False), ("before", "all: before %", True), ("after", "all: after %", True),
           ("averaged", "all: rounds averaged %", True),
           ("with_zero_shot", "all: zero-shot + rounds averaged %", True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="finished classification run folders (items with gold)")
    ap.add_argument("--name", default="runs", help="result file name: refinement_why_<name>.md/.json")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    load_start = loadavg()
    runs = [diagnose(Path(d)) for d in args.run_dirs]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        for entry in r["rounds"]:
            groups[(r["dataset"], entry["round"])].append(entry)
    rows = []
    for (dataset, rnd), entries in sorted(groups.items()):
        rows.append([dataset, rnd, len(entries), *(cell(entries, [key], percent) for key, _, percent in COLUMNS)])
    mismatched = [f"{r['run_dir']} round {e['round']}: {e['asked_not_stored']}" for r in runs for e in r["rounds"]
                  if e["asked_not_stored"]]
    body = "\n".join([
        fmt_table(["data set", "round", "runs"] + [title for _, title, _ in COLUMNS], rows), "",
        "Per refinement round, from the stored runs (no LLM call, no training): the small model's accuracy against "
        "gold and its agreement with the labels it learnt; the clean agreed set the round kept as labelled and the "
        "demo pool drawn from it (share of their labels right); the texts re-asked and how right the LLM's labels "
        "of them were zero-shot, in round 0 (its own written demonstrations) and after this round (the pool's "
        "demonstrations, retrieved by the small model's embeddings); fixed = wrong before and right after, broken "
        "= the reverse; the whole set's accuracy before and after. 'Rounds averaged': the label with the highest "
        "probability averaged over every round that asked the text (what the verdict takes as the LLM's confidence), "
        "instead of the last round's answer; 'zero-shot + rounds averaged': the same with the zero-shot baseline's "
        "answer (no demonstrations) as one more vote, where the run asked it. Cells are mean ± sd over the runs.",
        "", "Re-asked texts recomputed here but not stored as asked by the run (or the reverse): "
        + ("; ".join(mismatched) if mismatched else "none (the recomputed scope is the one the runs used)."),
        "", "Runs: " + ", ".join(f"{r['dataset']} seed {r['seed']} ({r['n']} texts)" for r in runs),
    ])
    write_report(args.out_dir, f"refinement_why_{args.name}",
                 "Why refinement helps or not: what each round kept, re-asked, fixed and broke", body,
                 {"runs": runs}, load_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
