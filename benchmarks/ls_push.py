"""Predictions per second pushed into a real Label Studio, and tasks per second read back, for N tasks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ls_push.py --tasks 10000 --batches 500,2000

It starts Label Studio from ``.venv-ls`` on 127.0.0.1 (SQLite, the test suite's cached migrated data
dir; with ``--postgres`` on a throwaway PostgreSQL started from the machine's ``initdb``/``postgres``,
see ``tests/fixtures_postgres.py``, which Label Studio migrates at its first start, minutes; or
``--ls-url``/``--ls-token`` for one you run), creates a project with N
tasks, reads them back page by page the way the background job does (``ProjectClient.iter_tasks``), and
pushes N predictions with ``push_results`` (the job's code: journalled batches, then the version
switch and the review view) once per batch size, each as a new model version (so each push after the
first also deletes the previous version's N predictions; that deletion is timed on its own). Writes
``ls_push_n<N>.md`` and ``.json`` (``ls_push_n<N>_postgres`` with ``--postgres``) under ``benchmarks/results/``.

``--postgres`` needs a PostgreSQL driver in ``.venv-ls`` (``psycopg[binary]``, installed by
scripts/setup.sh).

``LS_FAST_PREDICTION_IMPORT=1`` starts that Label Studio with its batched prediction import on (the
feature flag ``fflag_fix_back_4620_…``, off by default in 1.23; docker-compose.yml turns it on): without it
each import request recounts the predictions of every task in the project. Results then go to
``ls_push_n<N>[_postgres]_fastimport``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, beside, command_line, fmt_table, loadavg, write_result

from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.push import PushJournal, push_results
from freeal_backend.labelstudio.label_config import parse_label_config
from freeal_backend.labelstudio.client import PAGE_SIZE, TASK_FIELDS, Connection, ProjectClient
from freeal_backend.records import ItemResult
from tests.fixtures_ls import BATCHED_IMPORT_FLAG, LS_BIN, TOKEN, free_port, migrated_template, start_label_studio, stop
from tests.fixtures_postgres import PG_LS_START_TIMEOUT_S, throwaway_postgres

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "review.xml").read_text()
TASK_IMPORT_CHUNK = 5000


def synthetic_texts(n: int) -> list[str]:
    words = ["good", "bad", "film", "plot", "actors", "boring", "moving", "long", "funny", "script"]
    return [f"review {i}: " + " ".join(words[(i * k) % len(words)] for k in range(1, 12)) for i in range(n)]


def result(task_id: int) -> ItemResult:
    p = 0.55 + (task_id % 40) / 100
    flagged = task_id % 7 == 0
    return ItemResult(str(task_id), "positive", p, {"positive": p, "negative": 1 - p}, suspicious=flagged,
                      reasons=["llm_slm_disagree"] if flagged else [], suggested_label="negative" if flagged else None)


class TimedClient(ProjectClient):
    """``ProjectClient`` that records how long each ``delete_model_version`` call takes (the benchmark's only change)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deletes: list[tuple[str, float]] = []

    def delete_model_version(self, version: str, *, count: int = 0) -> None:
        t0 = time.perf_counter()
        super().delete_model_version(version, count=count)
        self.deletes.append((version, time.perf_counter() - t0))


class AnnotationProbe:
    """Saves an annotation every ``every_s`` seconds (on tasks from the end of the project, as a person
    reviewing would) while it runs: can people work while Label Studio deletes the previous version?"""

    def __init__(self, sdk: Any, task_ids: list[int], every_s: float = 2.0) -> None:
        self.sdk, self.task_ids, self.every_s = sdk, list(reversed(task_ids)), every_s
        self.saves: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["negative"]}}]
        for task_id in self.task_ids:
            if self._stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                self.sdk.annotations.create(id=task_id, result=result)
                ok, error = True, None
            except Exception as exc:  # noqa: BLE001 - what a person saving would see is the measurement
                ok, error = False, f"{type(exc).__name__}: {getattr(exc, 'status_code', '')}"
            self.saves.append({"ok": ok, "seconds": round(time.perf_counter() - t0, 2), "error": error})
            self._stop.wait(self.every_s)


def bench(url: str, token: str, n: int, batches: list[int], page_size: int, probe: bool = False) -> dict[str, Any]:
    from label_studio_sdk import LabelStudio

    sdk = LabelStudio(base_url=url, api_key=token, timeout=600)
    project = sdk.projects.create(title=f"push benchmark {n}", label_config=CONFIG)
    texts = synthetic_texts(n)
    t0 = time.perf_counter()
    for start in range(0, n, TASK_IMPORT_CHUNK):
        chunk = texts[start : start + TASK_IMPORT_CHUNK]
        sdk.projects.import_tasks(id=project.id, request=[{"text": t} for t in chunk])
    import_s = time.perf_counter() - t0
    client = TimedClient(Connection(url, token), project.id, timeout=600)
    cfg = parse_label_config(client.label_config())
    t0 = time.perf_counter()
    records = list(client.iter_tasks(cfg, page_size=page_size))
    read_s = time.perf_counter() - t0
    assert len(records) == n, (len(records), n)
    results = [result(r.task_id) for r in records]
    pushes = []
    with tempfile.TemporaryDirectory() as tmp:
        journal = PushJournal(JobStore(Path(tmp) / "backend.sqlite"), project.id)
        for k, batch in enumerate(batches):
            version = f"freeal-r{k}-bench{batch}"
            marks: list[float] = []
            shown: list[float] = []
            client.deletes.clear()
            people = AnnotationProbe(LabelStudio(base_url=url, api_key=token, timeout=120),
                                     [r.task_id for r in records]) if probe and k > 0 else None

            def cleanup() -> None:
                shown.append(time.perf_counter())
                if people is not None:
                    people.start()

            t0 = time.perf_counter()
            push_results(client, cfg, results, version, journal, batch=batch,
                         on_progress=lambda done: marks.append(time.perf_counter()), on_cleanup=cleanup)
            total_s = time.perf_counter() - t0
            if people is not None:
                people.stop()
            assert client.model_versions() == {version: n}, client.model_versions()
            batches_s = marks[-1] - t0
            per_batch = [b - a for a, b in zip([t0, *marks], marks)]
            delete_s = sum(s for _, s in client.deletes)
            pushes.append({"batch": batch, "version": version, "push_s": round(total_s, 2),
                           "shown_s": round(shown[0] - t0, 2),
                           "batches_s": round(batches_s, 2), "predictions_per_s": round(n / batches_s, 1),
                           "end_to_end_per_s": round(n / total_s, 1), "replaced_previous": k > 0,
                           "delete_previous_s": round(delete_s, 2) if client.deletes else None,
                           "deleted_per_s": round(n / delete_s, 1) if client.deletes and delete_s else None,
                           "batch_s": [round(x, 3) for x in per_batch],
                           "annotations_during_delete": people.saves if people is not None else None})
            print(f"batch {batch}: {n / batches_s:.0f} predictions/s in batches, {total_s:.1f} s in all"
                  + (f", deleting the previous version {delete_s:.1f} s" if client.deletes else ""), flush=True)
    return {"tasks": n, "task_import_s": round(import_s, 2), "read_s": round(read_s, 2),
            "read_tasks_per_s": round(n / read_s, 1), "page_size": page_size, "pushes": pushes}


def report(data: dict[str, Any]) -> str:
    n = data["tasks"]
    rows = [[p["batch"], "yes" if p["replaced_previous"] else "no", p["batches_s"], p["predictions_per_s"],
             p["batch_s"][1] if len(p["batch_s"]) > 1 else p["batch_s"][0], p["batch_s"][-1],
             "-" if p.get("delete_previous_s") is None else p["delete_previous_s"],
             "-" if p.get("deleted_per_s") is None else p["deleted_per_s"],
             p["shown_s"], p["push_s"], p["end_to_end_per_s"], 100_000 / p["end_to_end_per_s"] / 60]
            for p in data["pushes"]]
    table = fmt_table(["batch size", "deletes previous version", "batches (s)", "predictions/s in batches",
                       "2nd batch (s)", "last batch (s)", "deleting previous version (s)", "deleted predictions/s",
                       "new version shown (s)", "whole push (s)", "predictions/s whole push", "100k extrapolated (min)"], rows)
    started = (f"- Label Studio started in {data['ls_start_s']} s (on an empty database: migrations included)\n"
               if "ls_start_s" in data else "")
    for p in data["pushes"]:
        saves = p.get("annotations_during_delete")
        if saves is not None:
            ok = [x["seconds"] for x in saves if x["ok"]]
            failed = [x for x in saves if not x["ok"]]
            started += (f"- while push {p['version']} deleted the previous version, a person saving an annotation "
                        f"every 2 s: {len(ok)} of {len(saves)} saved (slowest {max(ok, default=0):.1f} s), "
                        f"{len(failed)} failed" + (f" ({failed[0]['error']} after {failed[0]['seconds']} s)"
                                                   if failed else "") + "\n")
    return (f"{n} tasks; Label Studio {data['ls']}; batched prediction import "
            f"(`{BATCHED_IMPORT_FLAG}`): {data['fast_import']}.\n\n{started}"
            f"- tasks imported in {data['task_import_s']} s (chunks of {TASK_IMPORT_CHUNK}; not the job's work)\n"
            f"- read back page by page ({data['page_size']} a page, the fields the job reads: "
            f"`{TASK_FIELDS}`, annotations expanded; the job reads {PAGE_SIZE} a page): "
            f"{data['read_s']} s = {data['read_tasks_per_s']} tasks/s\n\n{table}\n\n"
            "Seconds of every batch are in the JSON file. \"whole push\" is `push_results` from start to end: the "
            "journalled batches, selecting the new version and switching the review view to it, then deleting the "
            "previous FreeAL version (when there is one); \"new version shown\" is when the new version is in, selected and the review tab "
            "switched to it (what people see), before the previous one is deleted; \"deleting previous version\" is the part of it spent in Label Studio's "
            "`DELETE /api/projects/<id>/model-versions/` for the previous version's N predictions. "
            + ("The 100k column is the measured whole push in minutes.\n" if n == 100_000 else
               f"The 100k column is an **extrapolation** from {n} tasks at the measured rate, not a measurement: "
               "Label Studio's per-request cost may grow with the project size.\n"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--batches", default="500,2000", help="comma-separated push batch sizes, one push each")
    ap.add_argument("--page-size", type=int, default=PAGE_SIZE, help="tasks per page when reading")
    ap.add_argument("--ls-url", help="an existing Label Studio (default: start one from .venv-ls)")
    ap.add_argument("--ls-token", help="its API token (legacy or personal access token)")
    ap.add_argument("--postgres", action="store_true",
                    help="start Label Studio on a throwaway PostgreSQL (the machine's initdb/postgres) instead of SQLite")
    ap.add_argument("--probe-annotations", action="store_true",
                    help="while a push deletes the previous version, save an annotation every 2 s and report how "
                         "those saves went (suffix _probe)")
    ap.add_argument("--out", help="result path without suffix (default benchmarks/results/ls_push_n<N>)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    load_start = loadavg()
    fast = os.environ.get("LS_FAST_PREDICTION_IMPORT") == "1"
    if args.ls_url and args.postgres:
        ap.error("--postgres starts its own Label Studio; it does not go with --ls-url")
    if args.ls_url:
        data = bench(args.ls_url, args.ls_token or "", args.tasks, batches, args.page_size, args.probe_annotations)
        data["ls"] = f"at {args.ls_url}"
        data["fast_import"] = "as that server is set up"
    elif args.postgres:
        with throwaway_postgres() as pg, tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "ls"
            data_dir.mkdir()
            port = free_port()
            log_path = Path(tmp) / "ls.log"
            print(f"{pg.describe()} on port {pg.port}; starting Label Studio on it (migrates first, minutes)",
                  flush=True)
            t0 = time.perf_counter()
            proc = start_label_studio(data_dir, port, log_path, batched_import=fast,
                                      extra_env=pg.label_studio_env(), timeout_s=PG_LS_START_TIMEOUT_S)
            ls_start_s = time.perf_counter() - t0
            print(f"Label Studio answered in {ls_start_s:.0f} s", flush=True)
            try:
                data = bench(f"http://127.0.0.1:{port}", TOKEN, args.tasks, batches, args.page_size, args.probe_annotations)
            finally:
                stop(proc)
        data["ls_start_s"] = round(ls_start_s, 1)
        data["ls"] = f"`{LS_BIN}` on {pg.describe()}"
        data["fast_import"] = "on" if fast else "off (Label Studio's default)"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "ls"
            shutil.copytree(migrated_template(Path(tmp)), data_dir)
            port = free_port()
            proc = start_label_studio(data_dir, port, Path(tmp) / "ls.log", batched_import=fast)
            try:
                data = bench(f"http://127.0.0.1:{port}", TOKEN, args.tasks, batches, args.page_size, args.probe_annotations)
            finally:
                stop(proc)
        data["ls"] = f"`{LS_BIN}` on SQLite, 127.0.0.1"
        data["fast_import"] = "on" if fast else "off (Label Studio's default)"
    data["command"] = command_line()
    suffix = ("_postgres" if args.postgres else "") + ("_fastimport" if fast else "") + (
        "_probe" if args.probe_annotations else "")
    out = Path(args.out) if args.out else RESULTS / f"ls_push_n{args.tasks}{suffix}"
    write_result(beside(out, ".md"), f"Pushing predictions into Label Studio: {args.tasks} tasks", report(data),
                 load_start)
    beside(out, ".json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {beside(out, '.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
