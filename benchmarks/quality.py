"""FreeAL's whole loop (LLM <-> small model) with a live LLM, per shared data set, mean ± sd over seeds.

For each data set (../shared/data/<name>/train.jsonl, test.jsonl, read in place) it runs FreeAL on a
subsample of the training texts drawn with ``--sample-seed`` (the same texts for every seed) once per run
seed (``--seeds``: the seed of the demo sampling and of the SLM, ``Settings.seed``) and records per stage
(LLM zero-shot, LLM + self-generated demos = round 0, SLM round r, refined LLM round r, final): accuracy,
macro-F1, share answered, LLM calls / cache hits / tokens and wall time; for the final labels: ECE and
AUROC (wrong first) of the LLM's logprob confidence in its answer and of the final score, the review flag's
share / precision / recall for wrong final labels, the run-health estimate against the true accuracy of
the labels it judged, and the texts the LLM left unanswered apart from the wrong answers.

    .venv/bin/python benchmarks/quality.py --seeds 0,1,2 --data-dir ~/freeal-quality   # mr, sst2, subj, trec
    .venv/bin/python benchmarks/quality.py --datasets mr --n 1000 --base-url http://host:8000/v1 --model NAME

Writes ``benchmarks/results/loop_<name>_n<N>[_<model>].md`` and ``.json`` per data set (mean ± sd over the
seeds that finished, per-seed values in the JSON) and ``loop_summary_n<N>[_<model>].md/.json`` (round 0 vs
final, LLM calls per stage), rewritten as each seed finishes. ``--extras`` adds a naive SLM baseline (plain
cross-entropy on the round-0 LLM labels) and the SLMs' accuracy on a test subsample (inductive).

The embedded model (LLM_MODEL, by default Qwen2.5-Coder-1.5B) is slow on 2 cores: use --base-url/--model
(and LLM_API_KEY) for a hosted LLM. With ``--data-dir DIR`` every (data set, N, seed) run keeps its state
in DIR/runs/loop-<name>-n<N>-ss<sample seed>-s<seed>-<model> and the LLM cache in DIR: a re-run resumes an
unfinished run (finished stages are kept, stored answers are not asked again, and a request answered before is
a cache hit: the zero-shot answers are shared across seeds) and only re-reads the record
(``loop_result.json``) of a finished one. Without it everything starts afresh in a
temporary folder. ``--report-only`` rewrites the reports from the finished records in ``--data-dir`` and runs
nothing (the command a report shows is then that one; each seed's record names the session that ran it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA, LOOP_RECORD, RESULTS, TASKS, beside, cell, command_line, current_peak_mib,  # noqa: E402
                     fmt_table, loadavg, loop_env, mean_sd, pct, read_jsonl, reset_peak_rss, subsample, write_result)

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.metrics import expected_calibration_error, flag_scores, label_scores, review_scores  # noqa: E402
from freeal_backend.records import Item  # noqa: E402
from freeal_backend.slm.classifier import SmallModel  # noqa: E402

STAT_KEYS = ("calls", "cache_hits", "prompt_tokens", "completion_tokens", "failures", "unparsed")
COST_META = "bench_stage_cost"  # run-state meta key: LLM cost and wall time per stage, over all sessions
BOOK_EVERY_S = 30.0  # book the running stage's cost (and print progress) at most this often


class BenchRun(FreeALRun):
    """A FreeALRun that books the LLM cost and wall time of every stage in its run state, added up over the
    sessions that resumed it (a killed session loses at most ``BOOK_EVERY_S`` of it), and prints a line per
    stage."""

    def __init__(self, *args: Any, tag: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tag = tag
        self._stage = "setup"
        self._base: tuple[float, dict[str, int]] = (time.perf_counter(), self._counts())

    def _counts(self) -> dict[str, int]:
        llm = self.llm_started  # no server started just to read 0
        stats = llm.stats.as_dict() if llm is not None else {}
        return {k: int(stats.get(k, 0)) for k in STAT_KEYS}

    def book(self) -> None:
        """Add what the running stage spent since the last booking to the run state."""
        now, counts = time.perf_counter(), self._counts()
        (start, base), self._base = self._base, (now, counts)
        saved = self.store.get_meta(COST_META) or {}
        data_hash = self.store.get_meta("data_hash")
        if saved.get("data_hash") != data_hash:  # other texts or settings: the stages run again
            saved = {"data_hash": data_hash, "stages": {}}
        cost = saved["stages"].setdefault(self._stage, {**{k: 0 for k in STAT_KEYS}, "wall_s": 0.0})
        for k in STAT_KEYS:
            cost[k] += counts[k] - base.get(k, 0)
        cost["wall_s"] += now - start
        self.store.set_meta(COST_META, saved)

    def stage_cost(self) -> dict[str, dict[str, float]]:
        return (self.store.get_meta(COST_META) or {}).get("stages", {})

    def _timed(self, name: str, fn: Any) -> None:
        self._stage = name
        self._base = (time.perf_counter(), self._counts())
        try:
            super()._timed(name, fn)
        finally:
            self.book()
        c = self.stage_cost().get(name, {})
        print(f"  [{self.tag}] {name} done: {c.get('wall_s', 0):.0f} s, {c.get('calls', 0)} LLM calls "
              f"(+{c.get('cache_hits', 0)} cache hits) in all sessions", flush=True)

    def progress(self, stage: str, done: int, total: int) -> None:
        """The loop's progress callback: books the cost and prints a line every ``BOOK_EVERY_S``."""
        if time.perf_counter() - self._base[0] > BOOK_EVERY_S:
            self.book()
            print(f"  [{self.tag}] {self._stage}: {stage} {done}/{total}", flush=True)


# scoring (shared with main_job.py) ----------------------------------------------------------------------
def final_metrics(results: Mapping[str, Mapping[str, Any]], gold: Mapping[str, str],
                  judged: Mapping[str, str | None] | None = None,
                  health: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Scores of a run's final results (``ItemResult`` fields by item id, as ``freeal run --out`` writes them).

    Wrong final labels are split into answered (the LLM gave a label) and unanswered (it gave none: the
    label is the small model's). The final score (``confidence``) is scored against the final label being
    right; the LLM's own confidence (``llm_confidence``) against its answer (``llm_label``) being right,
    over the answers that carry one. ``judged``: the labels the run's health judged (its true accuracy is
    reported beside the estimate). ``chance_sd``: how far chance alone moves the true accuracy of labels each
    right with the probability its score gives (the sd of a sum of independent Bernoullis, over the texts):
    the nearest any estimate from those scores can be sure to come to the truth on a run this size."""
    ids = [k for k in gold if k in results]
    res = [results[k] for k in ids]
    right = np.array([r["label"] == gold[k] for k, r in zip(ids, res)], dtype=bool)
    unanswered = np.array([r.get("llm_label") is None and r.get("source") != "human" for r in res], dtype=bool)
    score = np.array([r.get("confidence") if r.get("confidence") is not None else 0.0 for r in res], dtype=float)
    flagged = np.array([bool(r.get("suspicious")) for r in res], dtype=bool)
    fl = flag_scores(dict(zip(ids, flagged.tolist())), {k: r["label"] for k, r in zip(ids, res)}, gold)
    review = review_scores(score, ~right, flagged=flagged, shares=(0.10,))
    conf = np.array([r.get("llm_confidence") if r.get("llm_confidence") is not None else np.nan for r in res])
    has = ~np.isnan(conf) & ~unanswered
    llm_right = np.array([r.get("llm_label") == gold[k] for k, r in zip(ids, res)], dtype=bool)
    llm_rank = review_scores(conf[has], ~llm_right[has], shares=()) if has.any() else {"auroc": math.nan}
    return {
        "n": len(ids), "final_accuracy": float(right.mean()) if ids else math.nan,
        "answered_wrong": int((~right & ~unanswered).sum()), "unanswered": int(unanswered.sum()),
        "unanswered_wrong": int((~right & unanswered).sum()),
        "flagged_share": fl["flagged"], "flag_precision": fl["precision"], "flag_recall": fl["recall"],
        "flag_unanswered_share": float(flagged[unanswered].mean()) if unanswered.any() else math.nan,
        "top10pct_recall": review["top10pct_answered_wrong_recall"],
        "score_auroc_wrong": review["auroc"], "score_ece": expected_calibration_error(score, right),
        "llm_conf_n": int(has.sum()), "llm_conf_auroc_wrong": llm_rank["auroc"],
        "llm_conf_ece": expected_calibration_error(conf[has], llm_right[has]) if has.any() else math.nan,
        "health_estimate": float(health["estimated_accuracy"]) if health else math.nan,
        "health_verdict": str(health["verdict"]) if health else None,
        "health_llm_self_kappa": (float(health["llm_self_kappa"]) if health and health.get("llm_self_kappa") is not None
                                  else math.nan),
        "health_true_accuracy": label_scores(judged, gold, sorted(set(gold.values())))["accuracy"] if judged else math.nan,
        "chance_sd": float(np.sqrt(np.sum(score * (1 - score)))) / len(ids) if ids else math.nan,
    }


def judged_stage(stages: Mapping[str, Any], rounds: int, rejected: Iterable[int] = ()) -> str:
    """The stage whose labels the last SLM round judged (run health): the last refinement that was not set
    aside (``rejected``: its stage shows what it would have given), else round 0's."""
    aside = set(rejected)
    kept = [r for r in range(1, rounds + 1) if f"llm_r{r}" in stages and r not in aside]
    return f"llm_r{kept[-1]}" if kept else "llm_r0"


def rejected_rounds(run: FreeALRun, rounds: int) -> list[int]:
    """The refinement rounds ``run`` set aside."""
    return [r for r in range(1, rounds + 1) if run.store.get_meta(f"rejected_r{r}")]


def clean(obj: Any) -> Any:
    """JSON-safe: NaN and numpy scalars become None / Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=1), encoding="utf-8")
    tmp.replace(path)


# one run ------------------------------------------------------------------------------------------------
def run_record(run: BenchRun, gold: Mapping[str, str], rounds: int) -> dict[str, Any]:
    """Per stage and final scores of a finished run, with the LLM cost and wall time booked per stage."""
    stages = run.stage_labels()
    cost = run.stage_cost()
    zero = {**{k: 0 for k in STAT_KEYS}, "wall_s": 0.0}
    per_stage: dict[str, dict[str, Any]] = {}
    for stage, pred in stages.items():
        parts = ["demos", "llm_r0"] if stage == "llm_r0" else [stage]  # the demos belong to round 0
        c = {k: sum(cost.get(p, zero).get(k, 0) for p in parts) for k in zero}
        sc = label_scores(pred, gold, run.labels)
        entry = {"title": run.stage_title(stage), "accuracy": sc["accuracy"], "macro_f1": sc["macro_f1"],
                 "coverage": sc["coverage"], "unanswered": sum(pred.get(k) is None for k in gold), **c}
        if stage.startswith("llm_r") and stage != "llm_r0":  # what the refinement re-asked, against the truth
            before = stages[f"llm_r{int(stage[5:]) - 1}"]
            asked = set(run.store.annotations(stage))
            entry.update({f"reasked_{k}": v for k, v in flag_scores({k: k in asked for k in gold}, before, gold).items()
                          if k in ("flagged", "recall")})
        per_stage[stage] = entry
    total = {k: sum(c.get(k, 0) for c in cost.values()) for k in STAT_KEYS}
    results = {k: asdict(r) for k, r in run.results().items()}
    judged = judged_stage(stages, rounds, rejected_rounds(run, rounds))
    return {"labels": run.labels, "stage_order": list(stages), "stages": per_stage, "llm_total": total,
            "loop_wall_s": sum(c.get("wall_s", 0.0) for c in cost.values()),
            **final_metrics(results, gold, stages[judged], run.health()), "health_judged_stage": judged}


def extras(run: BenchRun, items: Sequence[Item], test: Sequence[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Naive SLM (plain cross-entropy on the round-0 LLM labels) and every SLM's accuracy on ``test``."""
    labels = run.labels
    gold = {it.item_id: str(it.gold) for it in items}
    start = time.perf_counter()
    r0 = run.stage_labels()["llm_r0"]
    naive, naive_out = run.train_slm(items, [r0.get(it.item_id) for it in items], robust=False, seed_offset=1)
    naive_train = {it.item_id: labels[int(np.argmax(p))] for it, p in zip(items, naive_out.probs)}
    lower = run.encoder.lower_states([r["text"] for r in test], naive.split, max_length=run.settings.max_length)
    test_gold = {str(i): r["label"] for i, r in enumerate(test)}

    def test_accuracy(model: SmallModel) -> float:
        probs, _ = model.evaluate(lower)
        return label_scores({str(i): labels[int(np.argmax(p))] for i, p in enumerate(probs)}, test_gold,
                            labels)["accuracy"]

    test_acc = {"naive": test_accuracy(naive)}
    for rnd in range(1, rounds + 2):
        path = run.run_dir / f"slm_r{rnd}.pt"
        if path.exists():  # a round that reused the previous one's output saved no model
            slm = SmallModel(run.encoder, len(labels), train_layers=run.settings.slm_train_layers,
                             config=run.slm_config(seed_offset=rnd))
            slm.load(path)
            test_acc[f"slm_r{rnd}"] = test_accuracy(slm)
    sc = label_scores(naive_train, gold, labels)
    return {"test_n": len(test), "naive": {"accuracy": sc["accuracy"], "macro_f1": sc["macro_f1"]},
            "test_accuracy": test_acc, "wall_s": time.perf_counter() - start}


def run_config(args: argparse.Namespace, name: str, n: int, seed: int, model: str, base_url: str | None
               ) -> dict[str, Any]:
    """What a run's record depends on: a saved record with another config is not reused."""
    return {"dataset": name, "n": n, "sample_seed": args.sample_seed, "seed": seed, "rounds": args.rounds,
            "model": model, "endpoint": base_url or "embedded", "env": loop_env()}


def run_one(name: str, seed: int, rows: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]],
            labels: Sequence[str], args: argparse.Namespace, data_dir: Path, model: str,
            base_url: str | None) -> dict[str, Any] | None:
    """Run (resume, or re-read) one seed's loop on ``rows``; its record is saved in its run folder.
    With ``--report-only``: re-read a finished record, else None (nothing runs)."""
    config = run_config(args, name, len(rows), seed, model, base_url)
    run_dir = data_dir / "runs" / f"loop-{name}-n{len(rows)}-ss{args.sample_seed}-s{seed}-{slug(model)}"
    saved_path = run_dir / LOOP_RECORD
    if saved_path.exists():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        if saved.get("config") == config and (not args.extras or (saved.get("extras") or {}).get("test_n") == len(test)):
            print(f"  [{name} s{seed}] finished earlier: re-read {saved_path}", flush=True)
            return saved
    if args.report_only:
        print(f"  [{name} s{seed}] not finished: left out of the report", flush=True)
        return None
    items = [Item(r["id"], r["text"], gold=r["label"]) for r in rows]
    gold = {r["id"]: r["label"] for r in rows}
    settings = Settings.from_env(data_dir=data_dir, llm_base_url=base_url, llm_model=model, rounds=args.rounds,
                                 seed=seed, task_description=TASKS.get(name), llm_concurrency=args.concurrency,
                                 llm_threads=args.llm_threads)
    tag = f"{name} s{seed}"
    print(f"  [{tag}] run folder {run_dir}", flush=True)
    reset_peak_rss()
    session_start, load_start = time.perf_counter(), loadavg()
    with BenchRun(settings, labels, run_dir, zero_shot_baseline=True, tag=tag) as run:
        run.run(items, rounds=args.rounds, on_progress=run.progress)
        record = run_record(run, gold, args.rounds)
        record["peak_rss_mib_loop"] = current_peak_mib()
        record["shots"] = run.shots
        if args.extras:
            print(f"  [{tag}] extras: naive SLM and test-set evaluation", flush=True)
            record["extras"] = extras(run, items, test, args.rounds)
    record.update(config=config, session_wall_s=time.perf_counter() - session_start,
                  peak_rss_mib=current_peak_mib(), finished=f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
                  load_start=load_start, load_end=loadavg())
    write_json(saved_path, record)
    print(f"  [{tag}] finished: round 0 {pct(record['stages']['llm_r0']['accuracy'])} %, "
          f"final {pct(record['final_accuracy'])} %; record {saved_path}", flush=True)
    return json.loads(saved_path.read_text(encoding="utf-8"))  # the same form as a re-read record


# reports ------------------------------------------------------------------------------------------------
def aggregate(values: Sequence[Any]) -> Any:
    """Mean, sd (population, ddof 0) and per-seed values of every number common to ``values`` (records of
    the same shape); None (NaN) entries are left out of mean and sd. Other leaves are dropped."""
    if values and all(isinstance(v, dict) for v in values):
        out = {k: aggregate([v[k] for v in values]) for k in values[0] if all(k in v for v in values)}
        return {k: v for k, v in out.items() if v is not None}
    numbers = [v for v in values if v is not None]
    if values and numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        arr = np.array(numbers, dtype=float)
        return {"mean": float(arr.mean()), "sd": float(arr.std()), "values": list(values)}
    return None


def dataset_report(name: str, records: Mapping[int, Mapping[str, Any]], seeds: Sequence[int],
                   args: argparse.Namespace, model: str, n_train: int, load_start: str) -> dict[str, Any]:
    """Write loop_<name>_n<N>[_<model>].md/.json over the finished seeds; return the JSON."""
    recs = [records[s] for s in seeds if s in records]
    first = recs[0]
    order = first["stage_order"]
    extra = all("extras" in r for r in recs)
    rows = []
    for stage in order:
        title = first["stages"][stage]["title"] + (" (round 0, incl. writing the demos)" if stage == "llm_r0" else "")
        row = [title, cell(recs, ["stages", stage, "accuracy"], True), cell(recs, ["stages", stage, "macro_f1"], True),
               cell(recs, ["stages", stage, "coverage"], True), cell(recs, ["stages", stage, "calls"], False),
               cell(recs, ["stages", stage, "cache_hits"], False),
               cell(recs, ["stages", stage, "prompt_tokens"], False), cell(recs, ["stages", stage, "wall_s"], False)]
        if extra:
            row.append(cell(recs, ["extras", "test_accuracy", stage], True))
        rows.append(row)
        if extra and stage == "llm_r0":
            rows.append(["naive SLM (plain CE on round-0 LLM labels)", cell(recs, ["extras", "naive", "accuracy"], True),
                         cell(recs, ["extras", "naive", "macro_f1"], True), "100.00", "0", "0", "0",
                         cell(recs, ["extras", "wall_s"], False), cell(recs, ["extras", "test_accuracy", "naive"], True)])
    header = ["stage", "accuracy %", "macro-F1 %", "answered %", "LLM calls", "cache hits", "prompt tokens", "wall s"]
    table = fmt_table(header + (["SLM test acc %"] if extra else []), rows)
    done = [s for s in seeds if s in records]

    def c(key: str, percent: bool = True) -> str:
        return cell(recs, [key], percent)

    lines = [
        f"- final labels: {c('final_accuracy')} % right; wrong answered by the LLM {c('answered_wrong', False)}, "
        f"left unanswered by the LLM {c('unanswered', False)} texts (their labels are the small model's; "
        f"{c('unanswered_wrong', False)} of them wrong).",
        f"- LLM's logprob confidence in its final answer ({c('llm_conf_n', False)} answers): ECE "
        f"{c('llm_conf_ece', False)}, AUROC for ranking wrong answers first {c('llm_conf_auroc_wrong', False)}.",
        f"- final score: ECE {c('score_ece', False)}, AUROC for ranking wrong final labels first "
        f"{c('score_auroc_wrong', False)}; the lowest-scored 10 % hold {c('top10pct_recall')} % of the wrong ones.",
        f"- review flag: {c('flagged_share')} % of the texts flagged; precision {c('flag_precision')} %, recall "
        f"{c('flag_recall')} % for wrong final labels; "
        + (f"{c('flag_unanswered_share')} % of the unanswered texts flagged." if any(r["unanswered"] for r in recs)
           else "no text was left unanswered."),
        f"- run health (no gold): estimated {c('health_estimate')} % of the judged labels right "
        f"({', '.join(sorted({str(r['health_verdict']) for r in recs}))}); true {c('health_true_accuracy')} % "
        f"(the labels of stage `{first['health_judged_stage']}`); chance alone moves the true accuracy of labels "
        f"right with their final scores by {c('chance_sd')} points (sd): no estimate on a run this size can promise to be nearer.",
        "- run health per seed (estimate, verdict; true; kappa between the LLM's round-0 and later answers to the "
        "texts asked again): " + "; ".join(
            f"seed {seed}: {pct(r['health_estimate'])} % ({r['health_verdict']}); {pct(r['health_true_accuracy'])} %; "
            f"{'—' if r.get('health_llm_self_kappa') is None else round(r['health_llm_self_kappa'], 2)}"
            for seed, r in zip(done, recs)) + ".",
    ]
    for stage in order:
        if "reasked_flagged" in first["stages"][stage]:
            lines.append(f"- {first['stages'][stage]['title']} re-asked {cell(recs, ['stages', stage, 'reasked_flagged'], True)} % "
                         f"of the texts, holding {cell(recs, ['stages', stage, 'reasked_recall'], True)} % of the "
                         "labels wrong before it.")
    lines += [
        f"- in all: {c('loop_wall_s', False)} s of loop wall time (all sessions); LLM "
        f"{cell(recs, ['llm_total', 'calls'], False)} calls (+{cell(recs, ['llm_total', 'cache_hits'], False)} cache hits), "
        f"{cell(recs, ['llm_total', 'prompt_tokens'], False)} prompt + "
        f"{cell(recs, ['llm_total', 'completion_tokens'], False)} completion tokens, "
        f"{cell(recs, ['llm_total', 'failures'], False)} failed, {cell(recs, ['llm_total', 'unparsed'], False)} unparsed.",
        "- per seed (the session that finished it): " + "; ".join(
            f"seed {s}: final {pct(records[s]['final_accuracy'])} %, finished {records[s]['finished']}, load "
            f"{records[s]['load_start']} at its start and {records[s]['load_end']} at its end, peak RSS "
            f"{records[s]['peak_rss_mib']:.0f} MiB" for s in done)
        + " (an embedded LLM server is a separate process, not included). The machine lines above describe "
        "the session that wrote this file, which may only have re-read finished runs.",
        "- cells are mean ± sd (population sd, ddof 0) over the seeds; one value where one seed finished. "
        "Cache hits are requests answered from the LLM cache: the zero-shot prompts are the same for every "
        "seed, so seeds after the first ask none of them again; a resumed run's earlier answers are not re-asked.",
    ]
    body = (f"Data set **{name}** ({len(first['labels'])} classes): {first['n']} training texts (subsample of "
            f"{n_train} drawn with sample seed {args.sample_seed}, the same for every seed); seeds finished "
            f"{', '.join(map(str, done))} of {', '.join(map(str, seeds))}; LLM `{model}` "
            f"({first['config']['endpoint']}), {first.get('shots')} demonstrations per prompt; "
            f"rounds {args.rounds}.\n\n{table}\n\n" + "\n".join(lines))
    stem = Path(args.out_dir) / f"loop_{name}_n{first['n']}{model_suffix(args, model)}"
    write_result(beside(stem, ".md"), f"FreeAL's whole loop with a live LLM: {name}", body, load_start)
    data = {"dataset": name, "command": command_line(), "model": model, "endpoint": first["config"]["endpoint"],
            "n": first["n"], "rounds": args.rounds, "sample_seed": args.sample_seed, "seeds": list(seeds),
            "seeds_finished": done, "stage_order": order,
            "titles": {s: first["stages"][s]["title"] for s in order}, "mean_sd": aggregate(recs),
            "per_seed": {str(s): records[s] for s in done}}
    write_json(beside(stem, ".json"), data)
    print(f"wrote {stem}.md and .json ({len(done)} seed(s))", flush=True)
    return data


def summary_report(reports: Sequence[Mapping[str, Any]], args: argparse.Namespace, model: str,
                   load_start: str) -> None:
    """loop_summary_n<N>[_<model>].md/.json: round 0 vs final per data set, LLM calls per stage."""
    rows, data = [], {"command": command_line(), "model": model, "rounds": args.rounds, "datasets": {}}
    for rep in reports:
        recs = [rep["per_seed"][str(s)] for s in rep["seeds_finished"]]
        gains = [r["final_accuracy"] - r["stages"]["llm_r0"]["accuracy"] for r in recs]
        gain = aggregate(gains)
        exceeds = None if len(recs) < 2 else bool(gain["mean"] > gain["sd"])
        calls = {s: aggregate([r["stages"][s]["calls"] + r["stages"][s]["cache_hits"] for r in recs])
                 for s in rep["stage_order"]}
        rows.append([rep["dataset"], len(recs), cell(recs, ["stages", "llm_r0", "accuracy"], True),
                     cell(recs, ["final_accuracy"], True), mean_sd(gains, True),
                     "n/a (1 seed)" if exceeds is None else ("yes" if exceeds else "no"),
                     ", ".join(f"{s} {calls[s]['mean']:.0f}" for s in rep["stage_order"] if calls[s]["mean"])])
        data["datasets"][rep["dataset"]] = {
            "seeds_finished": rep["seeds_finished"], "n": rep["n"],
            "round0_accuracy": aggregate([r["stages"]["llm_r0"]["accuracy"] for r in recs]),
            "final_accuracy": aggregate([r["final_accuracy"] for r in recs]),
            "gain": gain, "gain_exceeds_one_sd": exceeds, "llm_requests_per_stage": calls,
            "llm_calls_total": aggregate([r["llm_total"]["calls"] for r in recs])}
    body = (fmt_table(["data set", "seeds", "round 0 acc %", "final acc %", "gain (points)", "gain > 1 sd?",
                       "LLM requests per stage (mean; calls + cache hits)"], rows)
            + "\n\nRound 0 is the LLM with its self-written demonstrations; the gain is final minus round 0 per seed "
              "(mean ± population sd over the seeds); 'gain > 1 sd' compares the mean gain with that sd. "
              "Per data set tables: `loop_<name>_n<N>*.md`.")
    n = reports[0]["n"] if len({r["n"] for r in reports}) == 1 else "mixed"
    stem = Path(args.out_dir) / f"loop_summary_n{n}{model_suffix(args, model)}"
    write_result(beside(stem, ".md"), "FreeAL's whole loop with a live LLM: summary over data sets", body,
                 load_start)
    write_json(beside(stem, ".json"), data)
    print(f"wrote {stem}.md and .json", flush=True)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)[:40]


def model_suffix(args: argparse.Namespace, model: str) -> str:
    """Result files of the embedded default model carry no suffix; any other model's name is appended."""
    return "" if args.embedded and model == Settings().llm_model else "_" + slug(model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mr,sst2,subj,trec", help="comma-separated folders of ../shared/data")
    ap.add_argument("--n", type=int, default=300, help="training texts per data set (subsample; 0 = all)")
    ap.add_argument("--test-n", type=int, default=500, help="test texts per data set with --extras (0 = all)")
    ap.add_argument("--rounds", type=int, default=2, help="FreeAL refinement rounds")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (demo sampling and SLM)")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the training/test subsample (every run)")
    ap.add_argument("--extras", action="store_true",
                    help="also train a naive SLM on the round-0 labels and evaluate the SLMs on test texts")
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint (default: LLM_BASE_URL, else the embedded model)")
    ap.add_argument("--model", help="model name at --base-url (default: LLM_MODEL)")
    ap.add_argument("--concurrency", type=int, help="requests in flight (default: LLM_CONCURRENCY or 4)")
    ap.add_argument("--llm-threads", type=int, help="CPU threads of the embedded LLM server (default: LLM_THREADS or 2)")
    ap.add_argument("--threads", type=int, help="torch CPU threads for the SLM (1 is faster on a busy machine)")
    ap.add_argument("--data-dir", help="keep run state and the LLM cache here, so re-runs resume (default: a "
                                       "fresh temporary folder)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the result files go")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite the reports from the finished seeds' records in --data-dir; run nothing")
    args = ap.parse_args(argv)
    if args.report_only and not args.data_dir:
        ap.error("--report-only reads the records in --data-dir")
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        ap.error("--seeds names no seed")
    env = Settings.from_env()
    base_url = args.base_url or env.llm_base_url
    model = args.model or env.llm_model
    args.embedded = not base_url
    load_start = loadavg()
    tmp = tempfile.TemporaryDirectory(prefix="freeal-quality-")
    data_dir = Path(args.data_dir).resolve() if args.data_dir else Path(tmp.name)
    reports = []
    try:
        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            train_all = read_jsonl(DATA / name / "train.jsonl")
            labels = sorted({r["label"] for r in train_all})
            rows = subsample(train_all, args.n, args.sample_seed)
            test = subsample(read_jsonl(DATA / name / "test.jsonl"), args.test_n, args.sample_seed) if args.extras else []
            print(f"\n== {name}: {len(rows)} training texts, labels {labels}, rounds {args.rounds}, seeds {seeds}, "
                  f"LLM {model} at {base_url or 'the embedded server'}", flush=True)
            records: dict[int, dict[str, Any]] = {}
            for seed in seeds:
                record = run_one(name, seed, rows, test, labels, args, data_dir, model, base_url)
                if record is not None:
                    records[seed] = record
                    report = dataset_report(name, records, seeds, args, model, len(train_all), load_start)
            if records:
                reports.append(report)
            summary_report(reports, args, model, load_start)
    finally:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
