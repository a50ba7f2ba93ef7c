"""Background FreeAL jobs, one per Label Studio project, single-flight even across gunicorn workers.

A SQLite file under the data dir (``backend.sqlite``) holds per project: the job row (state, stage,
progress, heartbeat, owner, rerun request), the human labels that arrived by webhook, what ``/setup``
told us, and the push journal (which predictions of a version are already in Label Studio).

Where a job runs is the runner's business. :class:`ThreadRunner` (the default) runs it in a thread of
this process: a job is claimed in one ``BEGIN IMMEDIATE`` transaction; a claim whose heartbeat is older
than ``stale_s`` (a killed worker) may be taken over; a trigger while a job runs sets ``rerun`` so the
running job goes once more with the newest annotations instead of starting a second one. With
``FREEAL_QUEUE`` set, :class:`freeal_backend.labelstudio.jobqueue.QueueRunner` enqueues it to Redis for ``freeal
worker`` processes instead, with the same single-flight and rerun rules.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from freeal_backend.config import Settings
from freeal_backend.labelstudio.label_config import TaskConfig, parse_task_config, render_task_prediction
from freeal_backend.loop import FreeALRun
from freeal_backend.loop_spans import run_type
from freeal_backend.labelstudio.client import (IMPORT_BATCH, INITIAL_VERSION, Connection, ProjectClient, TaskRecord,
                                       connection_from_env, review_view_title)
from freeal_backend.records import Item, ItemResult
from freeal_backend.status import RoundLLMStats, job_summary, live_title_state, save_round_flagged
from freeal_backend.storage import Transactional

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    project_id INTEGER PRIMARY KEY, state TEXT NOT NULL, stage TEXT, done INTEGER, total INTEGER,
    round INTEGER, rounds INTEGER, message TEXT, model_version TEXT, flagged INTEGER, tasks INTEGER,
    owner TEXT, heartbeat REAL, rerun INTEGER NOT NULL DEFAULT 0, started REAL, finished REAL);
CREATE TABLE IF NOT EXISTS gold (
    project_id INTEGER NOT NULL, annotation_id INTEGER NOT NULL, task_id INTEGER NOT NULL, labels TEXT NOT NULL,
    updated REAL, PRIMARY KEY (project_id, annotation_id));
CREATE TABLE IF NOT EXISTS projects (
    project_id INTEGER PRIMARY KEY, label_config TEXT, extra_params TEXT, ls_url TEXT, ls_key TEXT, updated REAL);
CREATE TABLE IF NOT EXISTS pushed (
    project_id INTEGER NOT NULL, model_version TEXT NOT NULL, task_id INTEGER NOT NULL, confirmed INTEGER NOT NULL,
    PRIMARY KEY (project_id, model_version, task_id));
"""
STATUS_FIELDS = ("state", "stage", "done", "total", "round", "rounds", "message", "model_version", "flagged",
                 "tasks", "rerun", "started", "finished", "stage_started", "stage_done0", "view_id")
# added after the first release: when the current stage began (and its done count then) for the ETA,
# and the id of the project's review tab in Label Studio
LATER_COLUMNS = {"stage_started": "REAL", "stage_done0": "INTEGER", "view_id": "INTEGER"}


class JobStore(Transactional):
    """Durable per-project job state, shared by every worker process through SQLite (WAL)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)
        os.chmod(path, 0o600)  # may hold a Label Studio token handed over by /setup
        with self.transaction() as db:
            have = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in LATER_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    # jobs -----------------------------------------------------------------------------------------
    def claim(self, project_id: int, owner: str, *, stale_s: float) -> bool:
        """Take the project's job slot; when a live job holds it, ask that job to run again instead."""
        with self.transaction() as db:
            row = db.execute("SELECT state, heartbeat FROM jobs WHERE project_id = ?", (project_id,)).fetchone()
            if row and row[0] in ACTIVE and time.time() - (row[1] or 0) < stale_s:
                db.execute("UPDATE jobs SET rerun = 1 WHERE project_id = ?", (project_id,))
                return False
            self._queue_row(db, project_id, owner)
            return True

    def take(self, project_id: int, owner: str) -> None:
        """Make ``owner`` the job's owner unconditionally (the caller holds the project's queue lock)."""
        with self.transaction() as db:
            self._queue_row(db, project_id, owner)

    def mark_queued(self, project_id: int) -> None:
        """Show the job as queued unless one is queued or running already."""
        with self.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE project_id = ?", (project_id,)).fetchone()
            if row is None or row[0] not in ACTIVE:
                self._queue_row(db, project_id, None)

    @staticmethod
    def _queue_row(db: Any, project_id: int, owner: str | None) -> None:
        now = time.time()
        db.execute(
            "INSERT INTO jobs (project_id, state, stage, done, total, message, owner, heartbeat, rerun, started)"
            " VALUES (?, 'queued', 'queued', 0, 0, '', ?, ?, 0, ?)"
            " ON CONFLICT(project_id) DO UPDATE SET state='queued', stage='queued', done=0, total=0,"
            " message='', owner=excluded.owner, heartbeat=excluded.heartbeat, rerun=0, started=excluded.started,"
            " finished=NULL",
            (project_id, owner, now, now),
        )

    def update(self, project_id: int, owner: str, **fields: Any) -> bool:
        """Set job fields and the heartbeat; False when ``owner`` no longer holds the job.

        A new ``stage`` also records when it began and its ``done`` count then (the page's rate and ETA)."""
        allowed = {k: v for k, v in fields.items() if k in STATUS_FIELDS and k not in ("stage_started", "stage_done0")}
        sets = [f"{k} = ?" for k in allowed]
        args: list[Any] = list(allowed.values())
        now = time.time()
        if "stage" in allowed:  # the right-hand sides see the old row: compare with the stage before
            sets[:0] = ["stage_started = CASE WHEN stage IS ? THEN stage_started ELSE ? END",
                        "stage_done0 = CASE WHEN stage IS ? THEN stage_done0 ELSE COALESCE(?, done) END"]
            args[:0] = [allowed["stage"], now, allowed["stage"], allowed.get("done")]
        with self.transaction() as db:
            cur = db.execute(
                f"UPDATE jobs SET heartbeat = ?{''.join(', ' + x for x in sets)} WHERE project_id = ? AND owner = ?",
                (now, *args, project_id, owner),
            )
            return cur.rowcount == 1

    def finish(self, project_id: int, owner: str, state: str, message: str) -> bool:
        """End the job; returns True (and re-queues it) when a rerun was requested meanwhile."""
        with self.transaction() as db:
            row = db.execute("SELECT rerun FROM jobs WHERE project_id = ? AND owner = ?",
                             (project_id, owner)).fetchone()
            if row is None:
                return False
            if row[0] and state == "done":
                db.execute("UPDATE jobs SET state='queued', stage='queued', rerun=0, heartbeat=? "
                           "WHERE project_id = ?", (time.time(), project_id))
                return True
            db.execute("UPDATE jobs SET state=?, message=?, rerun=0, finished=?, heartbeat=? WHERE project_id = ?",
                       (state, message, time.time(), time.time(), project_id))
            return False

    def status(self, project_id: int) -> dict[str, Any] | None:
        """The job row as a dict, or None when the project never had a job."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(STATUS_FIELDS)} FROM jobs WHERE project_id = ?",
                                   (project_id,)).fetchone()
        return dict(zip(STATUS_FIELDS, row)) if row else None

    def statuses(self) -> dict[int, dict[str, Any] | None]:
        """Every project the backend knows (set up or with a job), with its job row or None."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT p.project_id, {', '.join('j.' + f for f in STATUS_FIELDS)} FROM "
                "(SELECT project_id FROM jobs UNION SELECT project_id FROM projects) p "
                "LEFT JOIN jobs j ON j.project_id = p.project_id ORDER BY p.project_id").fetchall()
        return {int(r[0]): dict(zip(STATUS_FIELDS, r[1:])) if r[1] is not None else None for r in rows}

    def model_version(self, project_id: int) -> str | None:
        """The last model version pushed to Label Studio for the project."""
        status = self.status(project_id)
        return status["model_version"] if status else None

    def versions(self) -> list[str]:
        """The last pushed version of every project, most recent first."""
        with self._lock:
            rows = self._db.execute("SELECT model_version FROM jobs WHERE model_version IS NOT NULL "
                                    "ORDER BY heartbeat DESC").fetchall()
        return [r[0] for r in rows]

    # human labels from webhooks -----------------------------------------------------------------------
    def set_gold(self, project_id: int, annotation_id: int, task_id: int, labels: list[str]) -> None:
        """Record (or, with no labels, forget) the labels one annotation gives its task."""
        with self.transaction() as db:
            if labels:
                db.execute("INSERT OR REPLACE INTO gold VALUES (?, ?, ?, ?, ?)",
                           (project_id, annotation_id, task_id, json.dumps(labels), time.time()))
            else:
                db.execute("DELETE FROM gold WHERE project_id = ? AND annotation_id = ?", (project_id, annotation_id))

    def delete_gold(self, project_id: int, annotation_ids: list[int]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM gold WHERE project_id = ? AND annotation_id = ?",
                           [(project_id, a) for a in annotation_ids])

    def replace_gold(self, project_id: int, rows: list[tuple[int, int, list[str]]]) -> None:
        """Make the project's gold exactly ``(annotation_id, task_id, labels)`` rows (what the API shows)."""
        with self.transaction() as db:
            db.execute("DELETE FROM gold WHERE project_id = ?", (project_id,))
            db.executemany("INSERT OR REPLACE INTO gold VALUES (?, ?, ?, ?, ?)",
                           [(project_id, a, t, json.dumps(labels), time.time()) for a, t, labels in rows])

    def gold(self, project_id: int) -> dict[int, list[str]]:
        """Human labels by task id (the most recently updated annotation wins)."""
        with self._lock:
            rows = self._db.execute("SELECT task_id, labels FROM gold WHERE project_id = ? ORDER BY updated",
                                    (project_id,)).fetchall()
        return {int(t): json.loads(labels) for t, labels in rows}

    # the push journal: per version, the task ids whose prediction was sent (confirmed once stored) --------
    def pushed(self, project_id: int, version: str) -> tuple[set[int], set[int]]:
        """Task ids of ``version`` confirmed in Label Studio, and those sent without confirmation."""
        with self._lock:
            rows = self._db.execute("SELECT task_id, confirmed FROM pushed WHERE project_id = ? AND model_version = ?",
                                    (project_id, version)).fetchall()
        return {t for t, c in rows if c}, {t for t, c in rows if not c}

    def record_push(self, project_id: int, version: str, task_ids: Sequence[int], *, confirmed: bool) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO pushed VALUES (?, ?, ?, ?)",
                           [(project_id, version, t, int(confirmed)) for t in task_ids])

    def forget_push(self, project_id: int, *, version: str | None = None, keep: str | None = None,
                    unconfirmed_only: bool = False) -> None:
        """Drop journal rows of ``version`` (or of every version but ``keep``)."""
        sql, args = "DELETE FROM pushed WHERE project_id = ?", [project_id]
        if version is not None:
            sql, args = sql + " AND model_version = ?", [*args, version]
        if keep is not None:
            sql, args = sql + " AND model_version != ?", [*args, keep]
        if unconfirmed_only:
            sql += " AND confirmed = 0"
        with self.transaction() as db:
            db.execute(sql, args)

    # what /setup told us ------------------------------------------------------------------------------
    def save_project(self, project_id: int, *, label_config: str, extra_params: dict[str, Any] | None,
                     ls_url: str | None, ls_key: str | None) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO projects VALUES (?, ?, ?, ?, ?, ?)",
                       (project_id, label_config, json.dumps(extra_params or {}), ls_url, ls_key, time.time()))

    def project(self, project_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT label_config, extra_params, ls_url, ls_key FROM projects "
                                   "WHERE project_id = ?", (project_id,)).fetchone()
        if row is None:
            return None
        return {"label_config": row[0], "extra_params": json.loads(row[1] or "{}"), "ls_url": row[2],
                "ls_key": row[3]}


@dataclass(frozen=True)
class ProjectOptions:
    """Per-project options from Label Studio's "extra params" of the model (all optional)."""

    from_name: str | None = None
    rounds: int | None = None
    task_description: str | None = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "ProjectOptions":
        extra = extra if isinstance(extra, dict) else {}
        rounds = extra.get("rounds")
        return cls(
            from_name=str(extra["from_name"]) if extra.get("from_name") else None,
            rounds=int(rounds) if isinstance(rounds, (int, str)) and str(rounds).isdigit() else None,
            task_description=str(extra["task_description"]) if extra.get("task_description") else None,
        )


class RunRegistry:
    """One :class:`FreeALRun` per project and label set per process (models are loaded once, not per request).

    All runs share one LLM client (one embedded LLM server per process) and one encoder.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._runs: dict[tuple[int, str, tuple[str, ...]], FreeALRun] = {}
        self._shared: FreeALRun | None = None

    def run_dir(self, project_id: int) -> Path:
        """Where the project's FreeAL state lives."""
        return self.settings.data_dir / f"project-{project_id}"

    def get(self, project_id: int, labels: tuple[str, ...], task_description: str | None = None, *,
            task_type: str = "classification") -> FreeALRun:
        with self._lock:
            key = (project_id, task_type, labels)
            run = self._runs.get(key)
            if run is None:
                run_dir = self.run_dir(project_id)
                shared = self._shared
                run = run_type(task_type)(self.settings, list(labels), run_dir, task_description,
                                          llm=shared.llm if shared else None,
                                          encoder=shared.encoder if shared else None)
                self._shared = self._shared or run
                self._runs[key] = run
            if task_description:
                run.task_description = task_description
            return run

    def close(self) -> None:
        with self._lock:
            for run in self._runs.values():
                run.close()
            self._runs.clear()
            self._shared = None


def build_items(records: list[TaskRecord], gold: dict[int, list[str]]) -> tuple[list[Item], list[int]]:
    """Items for FreeAL (human labels = gold, the API's annotations first) and ids of tasks without text."""
    items, no_text = [], []
    for rec in records:
        if not rec.text or not rec.text.strip():
            no_text.append(rec.task_id)
            continue
        labels = list(rec.human_labels) or gold.get(rec.task_id, [])
        items.append(Item(str(rec.task_id), rec.text, human_label=labels[0] if labels else None))
    return items, no_text


def final_version(version: str, rounds: int) -> str:
    """The version the last round of the run that produced ``version`` (``freeal-r<k>-<hash>``) will have."""
    return f"freeal-r{rounds}-{version.rsplit('-', 1)[-1]}"


def flagged_ids(results: list[ItemResult]) -> list[int]:
    """Task ids FreeAL flags for review (never the human-labelled ones)."""
    return [int(r.item_id) for r in results if r.suspicious and r.source != "human"]


@contextmanager
def every(interval_s: float, fn: Callable[[], object]) -> Iterator[None]:
    """Call ``fn`` every ``interval_s`` seconds in a daemon thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            fn()

    thread = threading.Thread(target=loop, daemon=True, name="freeal-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Runner(Protocol):
    """Where project jobs run: :class:`ThreadRunner` here, or a queue (``freeal_backend.labelstudio.jobqueue``)."""

    def submit(self, manager: JobManager, project_id: int) -> bool:
        """Start or enqueue the project's job; False when a queued or running job will serve the request."""


class ThreadRunner:
    """Runs a project's job in a daemon thread of this process (the default, without ``FREEAL_QUEUE``)."""

    def __init__(self, *, stale_s: float = 120.0, heartbeat_s: float = 5.0) -> None:
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s

    def submit(self, manager: JobManager, project_id: int) -> bool:
        owner = manager.new_owner()
        if not manager.store.claim(project_id, owner, stale_s=self.stale_s):
            return False
        threading.Thread(target=self._main, args=(manager, project_id, owner), daemon=True,
                         name=f"freeal-job-{project_id}").start()
        return True

    def _main(self, manager: JobManager, project_id: int, owner: str) -> None:
        store = manager.store
        with every(self.heartbeat_s, lambda: store.update(project_id, owner)):
            manager.run_until_settled(project_id, owner,
                                      lambda state, message: store.finish(project_id, owner, state, message))


def runner_for(settings: Settings) -> Runner:
    """The Redis queue when ``FREEAL_QUEUE`` is set, else a thread of this process."""
    if settings.queue_url:
        from freeal_backend.labelstudio.jobqueue import QueueRunner  # needs rq and redis only when configured

        return QueueRunner(settings)
    return ThreadRunner()


class JobManager:
    """Starts project jobs through a :class:`Runner` and runs them (in whatever process the runner picks)."""

    def __init__(self, settings: Settings, store: JobStore, runs: RunRegistry, runner: Runner | None = None,
                 *, push_batch: int = IMPORT_BATCH, title_every_s: float = 5.0) -> None:
        self.settings = settings
        self.store = store
        self.runs = runs
        self.runner = runner if runner is not None else runner_for(settings)
        self.push_batch = push_batch
        self.title_every_s = title_every_s
        self.owner_prefix = f"{socket.gethostname()}:{os.getpid()}"

    def connection(self, project_id: int) -> Connection:
        """LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, else what Label Studio's /setup handed over."""
        saved = self.store.project(project_id) or {}
        return connection_from_env(url=saved.get("ls_url"), api_key=saved.get("ls_key"))

    def new_owner(self) -> str:
        return f"{self.owner_prefix}:{uuid.uuid4().hex[:8]}"

    def trigger(self, project_id: int, reason: str) -> bool:
        """Start the project's job unless one is queued or running (then it is asked to run once more)."""
        if not self.runner.submit(self, project_id):
            log.info("project %s: job already queued or running; rerun requested (%s)", project_id, reason)
            return False
        log.info("project %s: job queued (%s)", project_id, reason)
        return True

    def run_until_settled(self, project_id: int, owner: str, finish: Callable[[str, str], bool]) -> None:
        """Run the job; again for as long as ``finish(state, message)`` says a newer request came."""
        while True:
            try:
                message = self.run_once(project_id, owner)
                state = "done"
            except Exception as exc:  # noqa: BLE001 - a job must end in a visible state, never die silently
                log.exception("project %s: FreeAL job failed", project_id)
                message, state = f"{type(exc).__name__}: {exc}", "failed"
            if not finish(state, message):
                if state == "failed":
                    self._final_title(project_id)
                return
            log.info("project %s: running again with the newest annotations", project_id)

    def _final_title(self, project_id: int) -> None:
        """Leave the review tab's title with the job's end state (a failed job says so)."""
        try:
            client = ProjectClient(self.connection(project_id), project_id)
            ReviewTab(client, self.store, project_id, "", 0.0).show(force=True)
        except Exception as exc:  # noqa: BLE001 - Label Studio may be what failed; the job row says why
            log.warning("project %s: review tab title not updated: %s", project_id, exc)

    def run_once(self, project_id: int, owner: str) -> str:
        """Fetch every task, run the FreeAL rounds, push predictions and the review view after each round."""
        conn = self.connection(project_id)
        client = ProjectClient(conn, project_id)
        tab = ReviewTab(client, self.store, project_id, owner, self.title_every_s)
        saved = self.store.project(project_id) or {}
        opts = ProjectOptions.from_extra(saved.get("extra_params"))
        cfg = parse_task_config(client.label_config(), from_name=opts.from_name)
        self.store.update(project_id, owner, state="running", stage="fetching tasks", done=0, total=0)
        records = list(client.iter_tasks(cfg))
        self.store.replace_gold(project_id, [(r.annotation_id, r.task_id, list(r.human_labels))
                                             for r in records if r.human_labels and r.annotation_id is not None])
        items, no_text = build_items(records, self.store.gold(project_id))
        if not items:
            raise ValueError(f"no task has text in data[{cfg.data_key!r}] (the label config's <Text value>)")
        run = self.runs.get(project_id, cfg.labels, opts.task_description, task_type=cfg.task_type)
        texts = {it.item_id: it.text for it in items}
        rounds = opts.rounds if opts.rounds is not None else self.settings.rounds
        self.store.update(project_id, owner, rounds=rounds, tasks=len(items))
        results: list[ItemResult] = []
        pushed = self.store.model_version(project_id)
        cost = RoundLLMStats(run.store, lambda: run._llm)  # what the LLM cost, per round, for the status page
        for rnd in range(rounds + 1):
            def progress(stage: str, done: int, total: int, rnd: int = rnd) -> None:
                self.store.update(project_id, owner, stage=stage, done=done, total=total, round=rnd)
                tab.show()

            cost.switch(rnd)
            self.store.update(project_id, owner, round=rnd, stage=f"round {rnd} of {rounds}")
            results = run.run(items, rounds=rnd, on_progress=progress)
            cost.finish()
            save_round_flagged(run.store, rnd, len(flagged_ids(results)))
            version = run.model_version()
            if pushed == final_version(version, rounds):
                continue  # same data and settings as the last push: Label Studio already has these results
            if rnd < rounds and len(items) > self.settings.push_every_round_max_tasks:
                continue  # a big project gets the final round only: each replaced version is deleted slowly
            self.push(client, cfg, results, version, project_id, owner, texts)
            tab.show(force=True)
        self.store.update(project_id, owner, flagged=len(flagged_ids(results)))
        health = run.health()
        tab.show(force=True, final=True, note=health_note(health))
        skipped = f"; {len(no_text)} tasks without text skipped: {no_text[:20]}" if no_text else ""
        verdict = f"; label health: {health['message']}" if health else ""
        return f"{len(results)} tasks labelled, {len(flagged_ids(results))} flagged for review{skipped}{verdict}"

    def push(self, client: ProjectClient, cfg: TaskConfig, results: list[ItemResult], version: str,
             project_id: int, owner: str, texts: Mapping[str, str]) -> None:
        """Push one round's results (resuming an interrupted push) and record the version and flag count."""
        self.store.update(project_id, owner, stage=f"pushing {version}", done=0, total=len(results))

        def progress(done: int) -> None:
            self.store.update(project_id, owner, done=done)

        journal = PushJournal(self.store, project_id)
        keep = self.settings.keep_old_versions

        def cleanup() -> None:
            if not keep:
                self.store.update(project_id, owner, stage=f"pushed {version}; deleting the previous versions")

        flagged = push_results(client, cfg, results, version, journal, texts=texts, batch=self.push_batch,
                               on_progress=progress, on_cleanup=cleanup, delete_old=not keep)
        self.store.update(project_id, owner, model_version=version, flagged=flagged, done=len(results))
        log.info("project %s: pushed %d predictions (%s), %d flagged", project_id, len(results), version, flagged)


@dataclass(frozen=True)
class PushJournal:
    """One project's push journal in the job store."""

    store: JobStore
    project_id: int

    def resume_point(self, client: ProjectClient, version: str) -> set[int]:
        """Task ids whose ``version`` prediction is in Label Studio exactly once; the rest must be sent.

        Batches go one at a time and each is journalled as sent before its request and confirmed after,
        so at most one batch is in doubt after a crash; Label Studio's count for the version tells
        whether it landed (Label Studio stores a request of up to 500 predictions in one transaction).
        A count that fits neither case (a bigger batch stored in part; predictions deleted meanwhile)
        makes the whole version go again: deleted, then pushed afresh.
        """
        confirmed, sent = self.store.pushed(self.project_id, version)
        in_ls = client.model_versions().get(version, 0)
        if confirmed or sent:
            if in_ls == len(confirmed):
                self.store.forget_push(self.project_id, version=version, unconfirmed_only=True)
                return confirmed
            if in_ls == len(confirmed) + len(sent):
                self.stored(version, sorted(sent))
                return confirmed | sent
            log.warning("project %s: Label Studio holds %d predictions of %s, the journal %d (+%d in doubt); "
                        "pushing the version afresh", self.project_id, in_ls, version, len(confirmed), len(sent))
        self.store.forget_push(self.project_id, version=version)
        if in_ls:
            client.delete_model_version(version)  # same data, same version, no journal: no duplicates
        return set()

    def sent(self, version: str, task_ids: Sequence[int]) -> None:
        self.store.record_push(self.project_id, version, task_ids, confirmed=False)

    def stored(self, version: str, task_ids: Sequence[int]) -> None:
        self.store.record_push(self.project_id, version, task_ids, confirmed=True)

    def keep_only(self, version: str) -> None:
        """Forget the other versions (Label Studio no longer has them)."""
        self.store.forget_push(self.project_id, keep=version)


def push_results(client: ProjectClient, cfg: TaskConfig, results: list[ItemResult], version: str,
                 journal: PushJournal | None = None, *, texts: Mapping[str, str] | None = None,
                 batch: int = IMPORT_BATCH, on_progress: Callable[[int], None] | None = None,
                 on_cleanup: Callable[[], None] | None = None, delete_old: bool = True) -> int:
    """Make ``version`` the project's only FreeAL predictions, refresh the review view; returns #flagged.

    The new version is selected and the review view switched to it before the previous versions are
    deleted, which Label Studio does one prediction at a time (tens a second).

    Predictions go in batches of ``batch``. With a ``journal``, a push interrupted by a crash resumes
    where it stopped, with no duplicate and no lost prediction; without one, the version is pushed whole.
    ``texts`` (task id -> text) are needed for span tasks: every region's offsets are checked against them.
    ``on_cleanup`` is called once the new version is in and shown, before the old ones are deleted;
    ``delete_old=False`` leaves them in Label Studio (not selected, so neither shown nor in the review tab).
    """
    if texts is None and cfg.task_type != "classification":
        raise ValueError("span predictions need the task texts to check their offsets")
    texts = texts or {}
    preds = [{"task": int(r.item_id), **render_task_prediction(cfg, r, texts.get(r.item_id, ""), version)}
             for r in results]
    if journal is not None:
        done = journal.resume_point(client, version)
    else:
        done = set()
        if version in client.model_versions():
            client.delete_model_version(version)
    todo = [p for p in preds if p["task"] not in done]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        ids = [p["task"] for p in chunk]
        if journal is not None:
            journal.sent(version, ids)
        client.import_predictions(chunk, batch=batch)
        if journal is not None:
            journal.stored(version, ids)
        if on_progress is not None:
            on_progress(len(done) + start + len(chunk))
    client.select_version(version)
    flagged = len(flagged_ids(results))
    client.upsert_review_view(review_view_title(flagged), version)  # right now, whatever is deleted below
    if on_cleanup is not None:
        on_cleanup()
    if delete_old:
        client.delete_other_freeal_versions(keep=version)
    if journal is not None:
        journal.keep_only(version)
    return flagged


class ReviewTab:
    """Keeps the review tab's title on the job's live state (``… (412) · round 2/2, 43%``), throttled."""

    def __init__(self, client: ProjectClient, store: JobStore, project_id: int, owner: str, every_s: float) -> None:
        self.client, self.store, self.project_id, self.owner, self.every_s = client, store, project_id, owner, every_s
        self._last = 0.0
        self._lock = threading.Lock()

    def show(self, *, force: bool = False, final: bool = False, note: str | None = None) -> None:
        """Retitle the tab from the job row (at most every ``every_s`` unless ``force``); ``final`` replaces the
        live part with ``note`` (the job ended well). Failures are logged: a title never fails the job."""
        if not force and time.monotonic() - self._last < self.every_s:
            return
        if not self._lock.acquire(blocking=force):
            return  # another thread is retitling right now
        try:
            self._last = time.monotonic()
            row = self.store.status(self.project_id) or {}
            job = job_summary(row)
            live = note if final else live_title_state(job)
            version = row.get("model_version") or INITIAL_VERSION
            view_id = self.client.upsert_review_view(review_view_title(job["flagged"], live), version)
            if self.owner:
                self.store.update(self.project_id, self.owner, view_id=view_id)
        except Exception as exc:  # noqa: BLE001 - Label Studio unreachable for a moment: the next call retries
            log.warning("project %s: review tab title not updated: %s", self.project_id, exc)
        finally:
            self._lock.release()


def health_note(health: dict[str, Any] | None) -> str | None:
    """The run health in a few words for the review tab's title ("labels look near chance", ...)."""
    if not health:
        return None
    if health["verdict"] == "near_chance":
        return "LLM labels look near chance: use a stronger LLM"
    return f"about {float(health['estimated_accuracy']):.0%} of LLM labels right" + (
        " (poor)" if health["verdict"] == "poor" else "")


def progress_text(status: dict[str, Any]) -> str:
    """One line for people: "running round 1 of 2: slm 3/6" etc."""
    state = status.get("state") or "unknown"
    if state in ACTIVE:
        return f"{state}: {status.get('stage') or ''} {status.get('done') or 0}/{status.get('total') or 0}".strip()
    return f"{state}: {status.get('message') or ''}".strip()

