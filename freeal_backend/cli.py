"""``freeal`` command line: run FreeAL on a file, evaluate or report on a run, serve the Label Studio backend,
run queue workers."""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from freeal_backend.config import Settings
from freeal_backend.dataio import read_rows, rows_to_items, write_results
from freeal_backend.llm.client import LLMUnavailable
from freeal_backend.loop import FreeALRun
from freeal_backend.metrics import flag_scores, label_scores, markdown_table
from freeal_backend.records import Item
from freeal_backend.status import RoundLLMStats, stage_title

log = logging.getLogger("freeal")

class ProgressBars:
    """One tqdm bar per stage, fed by the loop's ``on_progress(stage, done, total)`` callback."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, unit="it", dynamic_ncols=True, leave=True)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def evaluation_table(run: FreeALRun) -> str:
    """Per-stage accuracy against gold, and the review flag's precision/recall for wrong final labels."""
    items = run.store.items()
    gold = {it.item_id: it.gold for it in items if it.gold is not None}
    if not gold:
        return "(no gold labels in the input: nothing to evaluate)"
    rows = []
    for stage, pred in run.stage_labels().items():
        sc = label_scores(pred, gold, run.labels)
        rows.append([stage_title(stage), sc["accuracy"], sc["macro_f1"], sc["coverage"]])
    table = markdown_table(["stage", "accuracy", "macro-F1", "labelled"], rows)
    results = run.results()
    if results:
        fl = flag_scores({k: r.suspicious for k, r in results.items()}, {k: r.label for k, r in results.items()},
                         gold)
        table += (f"\n\nreview flag: {fl['flagged']:.1%} of items flagged; precision {fl['precision']:.4f}, "
                  f"recall {fl['recall']:.4f} for the {fl['errors']} wrong final labels")
    return table


def health_line(run: FreeALRun) -> str:
    """The run-health verdict in one line (without gold: how good the labels look to the small model)."""
    health = run.health()
    if not health:
        return "label health: not estimated (no SLM round ran)"
    shout = "WARNING: " if health["verdict"] != "ok" else ""
    return f"label health: {shout}{health['message']}"


def _labels(arg: str | None, items: Sequence[Item]) -> list[str]:
    if arg:
        labels = [x.strip() for x in arg.split(",") if x.strip()]
    else:
        labels = sorted({it.gold for it in items if it.gold})
        if not labels:
            raise SystemExit("error: give --labels (the input has no 'label' column to infer them from)")
        log.info("labels inferred from the input's gold column: %s", ", ".join(labels))
    return labels


def cmd_run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(data_dir=args.data_dir, rounds=args.rounds, seed=args.seed,
                                 task_description=args.task)
    rows = read_rows(Path(args.input))
    for n, row in enumerate(rows):
        row.setdefault("id", n)  # ids are the original row numbers, also after --limit sampling
    if args.limit:
        random.Random(settings.seed).shuffle(rows)
        rows = rows[: args.limit]
    items = rows_to_items(rows)
    labels = _labels(args.labels, items)
    llm_labels = None
    if args.llm_labels:
        given = read_rows(Path(args.llm_labels)) if args.llm_labels != "input" else rows
        llm_labels = {str(r.get("id", n)): (r.get("llm_label") or None) for n, r in enumerate(given)}
    source = Path(args.input).resolve()
    run_dir = (Path(args.run_dir) if args.run_dir
               else settings.data_dir / "runs" / f"{source.parent.name}-{source.stem}")
    start = time.perf_counter()
    bars = ProgressBars()
    with FreeALRun(settings, labels, run_dir, zero_shot_baseline=args.zero_shot_baseline) as run:
        cost = RoundLLMStats(run.store, lambda: run._llm)  # LLM calls per round, for `freeal report`

        def progress(stage: str, done: int, total: int) -> None:
            bars(stage, done, total)
            cost(stage, done, total)

        try:
            results = run.run(items, on_progress=progress, llm_labels=llm_labels)
        except LLMUnavailable as exc:
            cost.finish()
            bars.close()
            print(f"\nerror: {exc}\nstate is saved in {run_dir}; run the same command again to resume.",
                  file=sys.stderr)
            return 3
        cost.finish()
        bars.close()
        out = Path(args.out) if args.out else run_dir / "labels.jsonl"
        write_results(out, items, results)
        missing = [r.item_id for r in results if r.label is None]
        flagged = sum(r.suspicious for r in results)
        print(f"\nwrote {len(results)} labels to {out}; {flagged} flagged for review"
              + (f"; {len(missing)} without a label (ids: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''})"
                 if missing else ""))
        print(f"model version {run.model_version()}; wall time {time.perf_counter() - start:.1f} s; "
              f"LLM: {json.dumps(run.llm.stats.as_dict()) if run._llm else 'not used'}")
        print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in run.timings.items()))
        print(health_line(run))
        print()
        print(evaluation_table(run))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "state.sqlite").exists():
        raise SystemExit(f"error: {run_dir} holds no FreeAL run (no state.sqlite)")
    from freeal_backend.storage import Store
    labels = Store(run_dir / "state.sqlite").get_meta("labels")
    with FreeALRun(Settings.from_env(data_dir=args.data_dir), labels, run_dir) as run:
        print(health_line(run))
        print(evaluation_table(run))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write one self-contained HTML file: tables, plots, per-stage accuracy (with gold), flagged texts."""
    from freeal_backend.html_report import report_page
    from freeal_backend.status import flagged_items, run_summary
    from freeal_backend.storage import Store

    run_dir = Path(args.run_dir)
    if not (run_dir / "state.sqlite").exists():
        raise SystemExit(f"error: {run_dir} holds no FreeAL run (no state.sqlite)")
    store = Store(run_dir / "state.sqlite")
    try:
        html = report_page(run_dir.resolve().name, run_summary(store), flagged_items(store, args.max_flagged))
    finally:
        store.close()
    out = Path(args.out) if args.out else run_dir / "report.html"
    out.write_text(html, encoding="utf-8")
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the Label Studio ML backend under gunicorn (threads; one FreeAL job per project)."""
    from gunicorn.app.wsgiapp import run as gunicorn_run
    sys.argv = ["gunicorn", "--bind", f"{args.host}:{args.port}", "--workers", str(args.workers),
                "--threads", str(args.threads), "--timeout", os.environ.get("GUNICORN_TIMEOUT", "300"),
                "--access-logfile", "-", "freeal_backend.labelstudio.wsgi:app"]
    gunicorn_run()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a worker process for the Redis job queue (FREEAL_QUEUE) until SIGTERM (or, with --burst, until idle)."""
    settings = Settings.from_env(queue_url=args.queue)
    if not settings.queue_url:
        raise SystemExit("error: set FREEAL_QUEUE=redis://host:6379/0 (or --queue): the queue the backend fills")
    from freeal_backend.labelstudio.jobqueue import work
    work(settings, burst=args.burst, name=args.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="label a JSONL/CSV file with FreeAL")
    run.add_argument("input", help="JSONL or CSV with a 'text' column (optional 'label' = gold, for evaluation)")
    run.add_argument("--labels", help="comma-separated label set (default: the gold labels found in the input)")
    run.add_argument("--task", help="one sentence telling the LLM what to classify")
    run.add_argument("--rounds", type=int, help="FreeAL rounds (default FREEAL_ROUNDS or 2)")
    run.add_argument("--out", help="output JSONL (default RUN_DIR/labels.jsonl)")
    run.add_argument("--run-dir", help="state directory (default DATA_DIR/runs/<input name>)")
    run.add_argument("--data-dir", help="FREEAL_DATA_DIR (caches, runs)")
    run.add_argument("--limit", type=int, help="label a seeded random subsample of this many rows")
    run.add_argument("--seed", type=int)
    run.add_argument("--llm-labels", help="precomputed round-0 LLM labels: a JSONL/CSV with 'llm_label' "
                                          "(aligned by 'id' or row), or 'input' to use the input's column")
    run.add_argument("--zero-shot-baseline", action="store_true",
                     help="also label everything zero-shot, to report that stage (costs one more LLM pass)")
    run.set_defaults(func=cmd_run)
    ev = sub.add_parser("eval", help="print per-stage accuracy of a finished run against its gold labels")
    ev.add_argument("run_dir")
    ev.add_argument("--data-dir")
    ev.set_defaults(func=cmd_eval)
    rep = sub.add_parser("report", help="write a self-contained HTML report of a run (tables, plots, flagged texts)")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="output HTML file (default RUN_DIR/report.html)")
    rep.add_argument("--max-flagged", type=int, default=2000, help="list at most this many flagged texts")
    rep.set_defaults(func=cmd_report)
    serve = sub.add_parser("serve", help="run the Label Studio ML backend (gunicorn)")
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    serve.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    serve.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "8")))
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run project jobs from the Redis queue (FREEAL_QUEUE); start as many "
                                           "as wanted on the host that holds FREEAL_DATA_DIR (README: Scaling)")
    worker.add_argument("--queue", help="Redis URL (default FREEAL_QUEUE)")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument("--name", help="worker name shown by `rq info` (default freeal-<random>)")
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
