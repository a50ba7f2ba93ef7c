"""Does the order of the demonstrations in the refinement's prompts move the refined labels?

    .venv/bin/python benchmarks/refinement_order.py RUN_DIR [RUN_DIR ...] --work DIR [--name trec_n300]

Each RUN_DIR is a finished one-round ``benchmarks/quality.py --data-dir`` loop run (its ``loop_result.json``
names the data set and seed). Per run and per order, a copy of it in ``DIR/<order>/`` keeps everything up
to the small model's round 1 (so the same clean pool and the same demonstrations per text) and asks the
refinement again with the demonstrations in that order, then trains the last small model and judges as the
loop does. Orders: ``drawn`` (the default: one seeded draw of the pool; the order before 705e6a9 and
again since the evening of 2026-12-06) and ``most_shared_first`` (the default in between: the demos most
prompts share first, the prompt cache's best, so the demos few prompts share, often the closest to the
text, come last). The run's LLM answers join the copies' cache (``DIR/<order>/llm_cache.sqlite``, kept),
so a prompt asked before is a cache hit; a finished copy's numbers are re-read (``order_result.json``; LLM
calls "—" where a stopped session finished a copy without it).
Reports per order the refined, rounds-averaged and final accuracy, fixed / broken labels and LLM calls,
mean ± sd over the runs of each data set, and the per-run difference from the first order. Writes
``benchmarks/results/refinement_order_<name>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LOOP_RECORD, RESULTS, TASKS, averaged_vote, cell, fmt_table, loadavg, loop_env, write_report  # noqa: E402

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.llm.cache import SCHEMA  # noqa: E402
from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.storage import Store  # noqa: E402

RESULT = "order_result.json"  # a finished copy's numbers, re-read by a later run of this benchmark
ORDERS = {"drawn": False, "most_shared_first": True}  # FreeALRun.refine_most_shared_first


def _take_answers(cache: Path, into: Path) -> None:
    """The LLM answers ``cache`` holds added to the cache ``into`` (its own answers kept)."""
    if not cache.exists():
        return
    db = sqlite3.connect(into)
    try:
        db.execute(SCHEMA)
        db.execute("ATTACH DATABASE ? AS src", (str(cache),))
        db.execute("INSERT OR IGNORE INTO responses SELECT * FROM src.responses")
        db.commit()
        db.execute("DETACH DATABASE src")
    finally:
        db.close()


def _fresh_copy(run_dir: Path, dest: Path) -> None:
    """``run_dir`` copied to ``dest``, its refinement and later rounds forgotten; its LLM cache's answers join
    the copies' cache."""
    shutil.copytree(run_dir, dest)
    _take_answers(run_dir.parent.parent / "llm_cache.sqlite", dest.parent.parent / "llm_cache.sqlite")
    store = Store(dest / "state.sqlite")
    store.reopen_rounds_after(1)  # the last small model, the results (a 1-round run: no later answers)
    store.forget_stage("llm_r1")  # the refinement itself; round 0 and the small model of round 1 stay
    store.close()


def refine(run_dir: Path, work: Path, order: str) -> dict[str, Any]:
    """Round 1's refinement of ``run_dir`` asked again in a copy with the demos in ``order``."""
    record = json.loads((run_dir / LOOP_RECORD).read_text(encoding="utf-8"))
    config = record["config"]
    if config.get("rounds") != 1:
        raise SystemExit(f"error: {run_dir} ran {config.get('rounds')} rounds; this compares one-round runs")
    env = loop_env()
    if env != config.get("env", {}):
        raise SystemExit(f"error: {run_dir} ran with the settings {config.get('env', {})}, this with {env}; "
                         "set the same environment")
    dest = work / order / "runs" / run_dir.name
    if (dest / RESULT).exists():
        return json.loads((dest / RESULT).read_text(encoding="utf-8"))
    if not (dest / "state.sqlite").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fresh_copy(run_dir, dest)
    endpoint = None if config["endpoint"] == "embedded" else config["endpoint"]  # the run's own LLM
    settings = Settings.from_env(data_dir=dest.parent.parent, rounds=1, seed=config["seed"], llm_base_url=endpoint,
                                 llm_model=config["model"], task_description=TASKS.get(config["dataset"]),
                                 llm_concurrency=2)
    start = time.perf_counter()
    with FreeALRun(settings, record["labels"], dest) as run:
        run.refine_most_shared_first = ORDERS[order]
        items = run.store.items()
        run.run(items, rounds=1)
        gold = np.array([str(it.gold) for it in items], dtype=object)
        stages = run.stage_labels()

        def right(stage: str) -> np.ndarray:
            return np.array([stages[stage].get(it.item_id) for it in items], dtype=object) == gold

        given, averaged = run._current(items, 1)
        voted = averaged_vote(run.labels, given, averaged)
        results = run.results()
        final = np.array([results[it.item_id].label for it in items], dtype=object) == gold
        refined = run.store.annotations("llm_r1")
        asked = np.array([it.item_id in refined for it in items])
        before, after = right("llm_r0"), right("llm_r1")
        llm = run.llm_started.stats.as_dict() if run.llm_started is not None else None  # None: asked elsewhere
    result = {"run_dir": str(run_dir), "dataset": config["dataset"], "seed": config["seed"], "order": order,
              "round0": float(before.mean()), "refined": float(after.mean()),
              "averaged": float((voted == gold).mean()), "final": float(final.mean()), "asked": int(asked.sum()),
              "fixed": int((asked & ~before & after).sum()), "broken": int((asked & before & ~after).sum()),
              "calls": llm and int(llm.get("calls", 0)), "cache_hits": llm and int(llm.get("cache_hits", 0)),
              "seconds": time.perf_counter() - start}
    (dest / RESULT).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


COLUMNS = [("round0", "round 0 %", True), ("refined", "refined %", True), ("averaged", "rounds averaged %", True),
           ("final", "final %", True), ("fixed", "fixed", False), ("broken", "broken", False),
           ("calls", "LLM calls", False), ("cache_hits", "cache hits", False)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="finished one-round quality.py loop runs")
    ap.add_argument("--work", required=True, help="folder for the copies (kept: a re-run only re-reads them)")
    ap.add_argument("--orders", default=",".join(ORDERS), help=f"comma-separated, of {', '.join(ORDERS)}")
    ap.add_argument("--name", default="runs", help="result file name: refinement_order_<name>.md/.json")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    orders = args.orders.split(",")
    if unknown := set(orders) - set(ORDERS):
        raise SystemExit(f"error: unknown order(s) {sorted(unknown)}; choose from {', '.join(ORDERS)}")
    load_start = loadavg()
    runs = []
    for run_dir in map(Path, args.run_dirs):
        for order in orders:
            print(f"  {run_dir.name}: refinement with the demos {order}", flush=True)
            runs.append(refine(run_dir, Path(args.work), order))
    first = {(r["dataset"], r["seed"]): r for r in runs if r["order"] == orders[0]}
    for r in runs:
        base = first[(r["dataset"], r["seed"])]
        r["final_minus_first"] = r["final"] - base["final"]
        r["refined_minus_first"] = r["refined"] - base["refined"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["dataset"], r["order"])].append(r)
    rows = [[dataset, order, len(rs), *(cell(rs, [key], percent) for key, _, percent in COLUMNS),
             ", ".join(f"{100 * r['final_minus_first']:+.2f}" for r in rs)]
            for (dataset, order), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], orders.index(kv[0][1])))]
    body = "\n".join([
        fmt_table(["data set", "order", "runs"] + [title for _, title, _ in COLUMNS]
                  + [f"final minus {orders[0]}, per seed (points)"], rows), "",
        "Each row re-asks the refinement of the same stored runs (round 0, the small model of round 1 and so the "
        "clean pool and each text's demonstrations are the run's own) with the demonstrations in the order named: "
        "`drawn`, the default (one seeded draw of the pool), or `most_shared_first` (the demos most prompts share "
        "first, for the prompt cache). 'Refined': the refinement's answers where asked, else the label kept; "
        "'rounds averaged': the label the LLM's probabilities averaged over both rounds favour; 'final': the "
        "verdict's label after the last small model. Fixed / broken: re-asked labels wrong before and right after, "
        "or the reverse. Cache hits are prompts answered before (the run's own cache, or an earlier copy's). "
        "Cells are mean ± sd (population) over the runs.", "",
        "Runs: " + ", ".join(f"{r['dataset']} seed {r['seed']} ({r['run_dir']})" for r in runs
                             if r["order"] == orders[0]),
    ])
    write_report(args.out_dir, f"refinement_order_{args.name}",
                 "The refinement's demonstration order, on the same pools", body, {"runs": runs}, load_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
