"""Issue 10, item 7(a): the whole FreeAL loop for spans on a BC5CDR slice, with the LLM you point it at.

    .venv/bin/python benchmarks/ner_loop.py --n 120 --rounds 1 --threads 1     # the embedded default LLM

Runs ``SpanRun`` (the same code as ``freeal run --task-type ner``) on the first ``--n`` sentences of a
BC5CDR split (``--stride`` apart), with the embedded offline LLM unless ``LLM_BASE_URL`` is set, and
reports per stage entity precision/recall/F1 (seqeval, exact spans) overall and per type, the share of
sentences the LLM answered (unanswered sentences are counted apart, never as wrong answers), the review
flag's precision/recall for sentences whose final spans are not exactly the gold ones, the ECE of the
sentence score, mentions dropped while locating the LLM's answers, LLM calls and tokens, stage times and
peak RSS, and how the score of each span the LLM gave ranks and matches the spans exactly in gold. Writes
``benchmarks/results/ner_loop_n<N>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, beside, current_peak_mib, fmt_table, loadavg, read_jsonl, write_result  # noqa: E402

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.dataio import rows_to_items  # noqa: E402
from freeal_backend.metrics import expected_calibration_error, review_scores  # noqa: E402
from freeal_backend.loop_spans import SpanRun  # noqa: E402
from freeal_backend.span_eval import entity_scores  # noqa: E402
from freeal_backend.spans import decode_spans  # noqa: E402

TYPES = ["Chemical", "Disease"]


def region_scores(results: list[Any], by_id: dict[str, Any]) -> dict[str, float]:
    """The score of each span the LLM gave in the final lists (not people's, not the tagger's) against gold:
    a region is right when its start, end and type are a gold span's."""
    score, right = [], []
    for r in results:
        if r.source != "llm":
            continue
        gold = {(s.start, s.end, s.label) for s in decode_spans(by_id[r.item_id].gold)}
        for s in r.spans or []:
            score.append(np.nan if s["score"] is None else float(s["score"]))
            right.append((s["start"], s["end"], s["label"]) in gold)
    sc, ok = np.array(score, dtype=float), np.array(right, dtype=bool)
    has = ~np.isnan(sc)
    return {"regions": len(sc), "right": int(ok.sum()), "scored": int(has.sum()),
            "auroc": review_scores(sc[has], ~ok[has])["auroc"],
            "ece": expected_calibration_error(sc[has], ok[has]) if has.any() else float("nan"),
            "mean_score": float(sc[has].mean()) if has.any() else float("nan"),
            "right_share_scored": float(ok[has].mean()) if has.any() else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--split", default="test")
    ap.add_argument("--stride", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the SLM")
    ap.add_argument("--run-dir", help="keep the run here (default: a temporary directory)")
    ap.add_argument("--out", help="output stem (default benchmarks/results/ner_loop_n<N>)")
    args = ap.parse_args()
    load_start = loadavg()
    rows = read_jsonl(DATA / "bc5cdr" / f"{args.split}.jsonl")[:: args.stride][: args.n]
    items = rows_to_items([{"id": i, "text": r["text"], "spans": r["spans"]} for i, r in enumerate(rows)],
                          task_type="ner")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        settings = Settings.from_env(data_dir=Path(tmp), torch_threads=args.threads)
        start = time.perf_counter()
        with SpanRun(settings, TYPES, run_dir) as run:
            results = run.run(items, rounds=args.rounds)
            wall = time.perf_counter() - start
            stages = run.stage_labels()
            llm = run.llm.stats.as_dict() if run.llm_started else {}
            model = run.llm.model if run.llm_started else None
            timings = dict(run.timings)
            health = run.health()
            dropped = {k: run.store.get_meta(f"dropped_mentions_{k}") for k in ("llm_r0", *(f"llm_r{r}" for r in
                                                                                         range(1, args.rounds + 1)))}
            demos = run.store.stage_done("demos")
    texts = [it.text for it in items]
    gold = [decode_spans(it.gold) for it in items]
    stage_rows, per_stage = [], {}
    for stage, pred in stages.items():
        given = [pred.get(it.item_id) for it in items]
        sc = entity_scores(texts, gold, [decode_spans(p) for p in given], TYPES)
        answered = sum(p is not None for p in given)
        exact = sum(p is not None and p == it.gold for p, it in zip(given, items))
        per_stage[stage] = {"scores": sc, "answered": answered, "exact_sentences": exact}
        stage_rows.append([stage, 100 * sc["overall"]["precision"], 100 * sc["overall"]["recall"],
                           100 * sc["overall"]["f1"], *(100 * sc[t]["f1"] for t in TYPES), answered,
                           f"{exact}/{len(items)}"])
    by_id = {it.item_id: it for it in items}
    unanswered = np.array([r.llm_label is None and r.source != "human" for r in results])
    wrong = np.array([r.label != by_id[r.item_id].gold for r in results])
    flagged = np.array([r.suspicious for r in results])
    score = np.array([r.confidence if r.confidence is not None else 0.0 for r in results])
    answered_wrong = wrong & ~unanswered
    flag = {
        "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
        "unanswered": int(unanswered.sum()), "unanswered_flagged": int((flagged & unanswered).sum()),
        "answered_wrong": int(answered_wrong.sum()),
        "answered_wrong_flagged": int((flagged & answered_wrong).sum()),
        "precision_answered": float((flagged & answered_wrong).sum() / max(1, (flagged & ~unanswered).sum())),
        "recall_answered": float((flagged & answered_wrong).sum() / max(1, answered_wrong.sum())),
        "ece_answered": (expected_calibration_error(score[~unanswered], (~wrong)[~unanswered])
                         if (~unanswered).any() else float("nan")),
    }
    regions = region_scores(results, by_id)
    out = {"n": len(items), "split": args.split, "stride": args.stride, "rounds": args.rounds, "model": model,
           "llm_base_url": "embedded" if not settings.llm_base_url else "set", "wall_s": wall, "timings": timings,
           "peak_rss_mib": current_peak_mib(), "llm": llm, "health": health, "demos": demos, "dropped": dropped,
           "stages": per_stage, "flag": flag, "regions": regions}
    stem = Path(args.out) if args.out else RESULTS / f"ner_loop_n{len(items)}"
    md = beside(stem, ".md")
    beside(stem, ".json").write_text(json.dumps(out, indent=2, default=float))
    body = (
        f"{len(items)} BC5CDR {args.split} sentences (every {args.stride}th), {args.rounds} refinement round(s), "
        f"LLM {model} ({'the embedded offline model' if not settings.llm_base_url else 'LLM_BASE_URL'}); "
        f"round-0 demos written by the LLM: {demos}.\n\n"
        "### Entities per stage (seqeval, exact spans, %)\n\n"
        + fmt_table(["stage", "P", "R", "F1", *(f"F1 {t}" for t in TYPES), "answered", "exact sentences"],
                    stage_rows)
        + "\n\nA sentence the LLM left unanswered counts as no entity in the scores above and is counted in "
        "'answered'; the flag numbers below keep it apart.\n\n### Review flag\n\n"
        f"- {flag['flagged']} of {len(items)} sentences flagged ({100 * flag['flagged_share']:.1f} %); "
        f"{flag['unanswered']} unanswered by the LLM, {flag['unanswered_flagged']} of them flagged\n"
        f"- answered but wrong (final spans not exactly gold): {flag['answered_wrong']}; flagged "
        f"{flag['answered_wrong_flagged']} (recall {100 * flag['recall_answered']:.1f} %, precision "
        f"{100 * flag['precision_answered']:.1f} % among flagged answered sentences)\n"
        f"- ECE of the sentence score as P(spans exactly right), answered sentences: {flag['ece_answered']:.3f}\n"
        f"- run health: {health['message'] if health else 'not estimated'}\n\n"
        "### Region scores\n\n"
        f"The LLM's spans in the final lists: {regions['regions']}, of them {regions['right']} exactly in gold "
        f"(start, end and type); {regions['scored']} carry a score: AUROC for wrong regions first "
        f"{regions['auroc']:.3f}, ECE {regions['ece']:.3f}, mean score {regions['mean_score']:.3f} against "
        f"{regions['right_share_scored']:.3f} right.\n\n"
        f"### Cost\n\nwall {wall:.0f} s; per stage (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; peak RSS {current_peak_mib():.0f} MiB; LLM {json.dumps(llm)}; mentions dropped while locating "
        f"answers: {json.dumps(dropped)}.\n"
    )
    write_result(md, f"FreeAL for spans on BC5CDR: {len(items)} sentences, whole loop", body,
                 load_start)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
