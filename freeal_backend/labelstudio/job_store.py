"""The backend's durable state in ``backend.sqlite`` (under the data dir), shared by every process through SQLite.

Per project: the job row (state, stage, progress, heartbeat, owner, rerun request), the human labels that
arrived by webhook, what ``/setup`` told us, and the push journal (which predictions of a version are
already in Label Studio). Nothing here talks to Label Studio or runs FreeAL.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from freeal_backend.storage import Transactional

ACTIVE = ("queued", "running")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    project_id INTEGER PRIMARY KEY, state TEXT NOT NULL, stage TEXT, done INTEGER, total INTEGER,
    round INTEGER, rounds INTEGER, message TEXT, model_version TEXT, flagged INTEGER, tasks INTEGER,
    owner TEXT, heartbeat REAL, rerun INTEGER NOT NULL DEFAULT 0, started REAL, finished REAL);
CREATE TABLE IF NOT EXISTS gold (
    project_id INTEGER NOT NULL, annotation_id INTEGER NOT NULL, task_id INTEGER NOT NULL, labels TEXT NOT NULL,
    updated REAL, PRIMARY KEY (project_id, annotation_id));
CREATE TABLE IF NOT EXISTS gold_gone (
    project_id INTEGER NOT NULL, annotation_id INTEGER NOT NULL, gone REAL NOT NULL,
    PRIMARY KEY (project_id, annotation_id));
CREATE TABLE IF NOT EXISTS projects (
    project_id INTEGER PRIMARY KEY, label_config TEXT, extra_params TEXT, ls_url TEXT, ls_key TEXT, updated REAL);
CREATE TABLE IF NOT EXISTS pushed (
    project_id INTEGER NOT NULL, model_version TEXT NOT NULL, task_id INTEGER NOT NULL, confirmed INTEGER NOT NULL,
    PRIMARY KEY (project_id, model_version, task_id));
"""
STATUS_FIELDS = ("state", "stage", "done", "total", "round", "rounds", "message", "model_version", "flagged",
                 "tasks", "rerun", "started", "finished", "stage_started", "stage_done0", "view_id")
# set by the job but not shown: a digest of the pushed predictions (a version is pushed again only when they change)
INTERNAL_FIELDS = ("pushed_digest",)
# added after the first release: when the current stage began (and its done count then) for the ETA, the id
# of the project's review tab in Label Studio, the pushed digest, and how often a dead process's job was resumed
LATER_COLUMNS = {"stage_started": "REAL", "stage_done0": "INTEGER", "view_id": "INTEGER", "pushed_digest": "TEXT",
                 "resumes": "INTEGER NOT NULL DEFAULT 0"}


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
        allowed = {k: v for k, v in fields.items()
                   if k in STATUS_FIELDS + INTERNAL_FIELDS and k not in ("stage_started", "stage_done0")}
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
            db.execute("UPDATE jobs SET state=?, message=?, rerun=0, resumes=0, finished=?, heartbeat=? "
                       "WHERE project_id = ?", (state, message, time.time(), time.time(), project_id))
            return False

    def active(self) -> list[tuple[int, str | None, float]]:
        """``(project_id, owner, heartbeat)`` of every job shown as queued or running."""
        with self._lock:
            rows = self._db.execute(f"SELECT project_id, owner, heartbeat FROM jobs WHERE state IN {ACTIVE}").fetchall()
        return [(int(p), o, float(h or 0)) for p, o, h in rows]

    def resume(self, project_id: int, dead_owner: str | None, owner: str, *, max_resumes: int) -> str | None:
        """Hand the job of a dead process (``dead_owner``) to ``owner``: "resumed", or "failed" once it was
        resumed ``max_resumes`` times in a row (the job itself may kill its process); None when that job is
        no longer ``dead_owner``'s."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(f"SELECT resumes FROM jobs WHERE project_id = ? AND owner IS ? AND state IN {ACTIVE}",
                             (project_id, dead_owner)).fetchone()
            if row is None:
                return None
            if row[0] >= max_resumes:
                db.execute("UPDATE jobs SET state='failed', message=?, rerun=0, resumes=0, finished=?, heartbeat=? "
                           "WHERE project_id = ?",
                           (f"the backend process running this job died {row[0] + 1} times in a row (out of memory? "
                            "see the backend log); it was not resumed again: start it again (e.g. Start Training)",
                            now, now, project_id))
                return "failed"
            db.execute("UPDATE jobs SET state='queued', stage='resuming: the process running it died', owner=?, "
                       "heartbeat=?, resumes=resumes+1, finished=NULL WHERE project_id = ?", (owner, now, project_id))
            return "resumed"

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

    def pushed_digest(self, project_id: int) -> str | None:
        """The digest of the predictions last pushed for the project (see :func:`.push.predictions_digest`)."""
        with self._lock:
            row = self._db.execute("SELECT pushed_digest FROM jobs WHERE project_id = ?", (project_id,)).fetchone()
        return row[0] if row else None

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
        if not labels:
            self.delete_gold(project_id, [annotation_id])
            return
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO gold VALUES (?, ?, ?, ?, ?)",
                       (project_id, annotation_id, task_id, json.dumps(labels), time.time()))
            db.execute("DELETE FROM gold_gone WHERE project_id = ? AND annotation_id = ?", (project_id, annotation_id))

    def delete_gold(self, project_id: int, annotation_ids: list[int]) -> None:
        """Forget these annotations' labels (deleted or skipped), and when: a job's read of the project that
        began earlier may still show them (:meth:`replace_gold`)."""
        now = time.time()
        with self.transaction() as db:
            db.executemany("DELETE FROM gold WHERE project_id = ? AND annotation_id = ?",
                           [(project_id, a) for a in annotation_ids])
            db.executemany("INSERT OR REPLACE INTO gold_gone VALUES (?, ?, ?)", [(project_id, a, now)
                                                                                 for a in annotation_ids])

    def replace_gold(self, project_id: int, rows: list[tuple[int, int, list[str]]], read_since: float) -> None:
        """Make the project's gold the ``(annotation_id, task_id, labels)`` rows a read of Label Studio's tasks
        that began at ``read_since`` (a ``time.time()``) showed, but for what webhooks said meanwhile: labels
        recorded after it stay, and annotations deleted or skipped after it stay gone."""
        with self.transaction() as db:
            newer = db.execute("SELECT annotation_id, task_id, labels, updated FROM gold WHERE project_id = ? AND "
                               "updated > ?", (project_id, read_since)).fetchall()
            gone = {int(a) for (a,) in db.execute("SELECT annotation_id FROM gold_gone WHERE project_id = ? AND "
                                                  "gone > ?", (project_id, read_since)).fetchall()}
            db.execute("DELETE FROM gold WHERE project_id = ?", (project_id,))
            db.execute("DELETE FROM gold_gone WHERE project_id = ? AND gone <= ?", (project_id, read_since))
            db.executemany("INSERT OR REPLACE INTO gold VALUES (?, ?, ?, ?, ?)",
                           [(project_id, a, t, json.dumps(labels), read_since) for a, t, labels in rows
                            if a not in gone])
            db.executemany("INSERT OR REPLACE INTO gold VALUES (?, ?, ?, ?, ?)",
                           [(project_id, a, t, labels, updated) for a, t, labels, updated in newer])

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



def progress_text(status: dict[str, Any]) -> str:
    """One line for people: "running round 1 of 2: slm 3/6" etc."""
    state = status.get("state") or "unknown"
    if state in ACTIVE:
        return f"{state}: {status.get('stage') or ''} {status.get('done') or 0}/{status.get('total') or 0}".strip()
    return f"{state}: {status.get('message') or ''}".strip()

