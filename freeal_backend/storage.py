"""Durable FreeAL state in one SQLite file per run (WAL, one transaction per write)."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from freeal_backend.records import Item, ItemResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (item_id TEXT PRIMARY KEY, pos INTEGER NOT NULL, text TEXT NOT NULL,
    human_label TEXT, gold TEXT, augmented TEXT);
CREATE TABLE IF NOT EXISTS stages (name TEXT PRIMARY KEY, done_at REAL NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS demos (label TEXT NOT NULL, pos INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (label, pos));
CREATE TABLE IF NOT EXISTS annotations (stage TEXT NOT NULL, item_id TEXT NOT NULL, label TEXT,
    confidence REAL, probs TEXT NOT NULL, raw TEXT, error TEXT, PRIMARY KEY (stage, item_id));
CREATE TABLE IF NOT EXISTS slm (round INTEGER NOT NULL, item_id TEXT NOT NULL, probs TEXT NOT NULL,
    loss REAL, clean INTEGER NOT NULL, clean_prob REAL NOT NULL, PRIMARY KEY (round, item_id));
CREATE TABLE IF NOT EXISTS results (item_id TEXT PRIMARY KEY, record TEXT NOT NULL);
"""
# columns of ``results`` copied out of the JSON record, so the status page aggregates them in SQL
RESULT_COLUMNS = {"label": "TEXT", "confidence": "REAL", "suspicious": "INTEGER", "source": "TEXT"}


BUSY_TIMEOUT_S = 30.0


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """A thread-shareable SQLite connection in WAL mode, autocommit (transactions are explicit).

    Switching a new file to WAL takes an exclusive lock and SQLite answers "database is locked" at once,
    without waiting, to a second process doing the same (gunicorn workers booting side by side), so that
    switch is retried for up to ``BUSY_TIMEOUT_S``; every later statement waits through the busy timeout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.05)
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at ``path`` as the file system tells files apart (device, inode); None where there is none."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Transactional:
    """A shared connection guarded by a lock; ``transaction()`` is one ``BEGIN IMMEDIATE`` … ``COMMIT``."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = connect(path, schema)
        self._file = _identity(path)

    def moved(self) -> bool:
        """Whether the file at this store's path is no longer the one it opened (another process renamed it
        away, e.g. a worker setting a project's run aside)."""
        return _identity(self.path) != self._file

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _read_ids(self, select: str, item_ids: Iterable[str]) -> list[tuple[Any, ...]]:
        """Rows of ``select`` (a query ending in ``WHERE item_id``) for each of ``item_ids``, 500 ids a query."""
        ids, rows = list(dict.fromkeys(item_ids)), []
        for start in range(0, len(ids), 500):
            chunk = tuple(ids[start : start + 500])
            rows += self._read(f"{select} IN ({','.join('?' * len(chunk))})", chunk)
        return rows

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read-only query (for aggregates computed in SQL, e.g. the status page)."""
        return self._read(sql, args)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Store(Transactional):
    """All state of one FreeAL run. Safe to share between threads; every write is its own transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)
        if not set(RESULT_COLUMNS) <= {r[1] for r in self._read("PRAGMA table_info(results)")}:
            with self.transaction() as db:  # a state file from before these columns: add and fill them
                have = {r[1] for r in db.execute("PRAGMA table_info(results)")}  # again, under the write lock
                for name in (n for n in RESULT_COLUMNS if n not in have):
                    db.execute(f"ALTER TABLE results ADD COLUMN {name} {RESULT_COLUMNS[name]}")
                    db.execute(f"UPDATE results SET {name} = json_extract(record, '$.{name}')")

    def _write(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        with self.transaction() as db:
            db.executemany(sql, rows)

    # meta -------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: Any) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(key, json.dumps(value))])

    # items ------------------------------------------------------------------------------------------
    def replace_items(self, items: list[Item]) -> None:
        """Store the run's items; LLM answers of items whose text changed (or that left) are forgotten."""
        with self.transaction() as db:
            old = dict(db.execute("SELECT item_id, text FROM items").fetchall())
            new = {it.item_id: it.text for it in items}
            stale = [(k,) for k, text in old.items() if new.get(k) != text]
            db.executemany("DELETE FROM annotations WHERE item_id = ?", stale)
            db.execute("DELETE FROM items")
            db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                           [(it.item_id, i, it.text, it.human_label, it.gold, it.augmented)
                            for i, it in enumerate(items)])

    def item_texts(self, item_ids: Iterable[str]) -> dict[str, str]:
        """The stored text of each of ``item_ids`` the run holds (cheap for a few)."""
        return {r[0]: r[1] for r in self._read_ids("SELECT item_id, text FROM items WHERE item_id", item_ids)}

    def items(self) -> list[Item]:
        return [Item(r[0], r[1], r[2], r[3], r[4]) for r in
                self._read("SELECT item_id, text, human_label, gold, augmented FROM items ORDER BY pos")]

    # stages -----------------------------------------------------------------------------------------
    def stage_done(self, name: str) -> dict[str, Any] | None:
        rows = self._read("SELECT info FROM stages WHERE name = ?", (name,))
        return json.loads(rows[0][0]) if rows else None

    def mark_stage(self, name: str, info: dict[str, Any] | None = None) -> None:
        self._write("INSERT OR REPLACE INTO stages VALUES (?, ?, ?)", [(name, time.time(), json.dumps(info or {}))])

    def stages(self) -> dict[str, dict[str, Any]]:
        return {r[0]: json.loads(r[1]) for r in self._read("SELECT name, info FROM stages ORDER BY done_at")}

    def forget_stage(self, name: str) -> None:
        """Forget one finished stage: its mark and, for an LLM stage, its answers (it is to run again)."""
        with self.transaction() as db:
            db.execute("DELETE FROM stages WHERE name = ?", (name,))
            db.execute("DELETE FROM annotations WHERE stage = ?", (name,))

    def reset_stages(self, keep: Iterable[str] = (), *, keep_answers: bool = False) -> None:
        """Forget finished stages (and their SLM/refinement outputs) except those named in ``keep``; with
        ``keep_answers`` every stage keeps its LLM answers, so the stages run again ask only the texts they have
        none for."""
        keep = list(keep)
        marks = ",".join("?" * len(keep)) or "''"
        with self.transaction() as db:
            db.execute(f"DELETE FROM stages WHERE name NOT IN ({marks})", keep)
            if not keep_answers:
                db.execute(f"DELETE FROM annotations WHERE stage NOT IN ({marks})", keep)
            db.execute("DELETE FROM slm")
            db.execute("DELETE FROM meta WHERE key LIKE 'health_r%' OR key LIKE 'rejected_r%'")

    # demos ------------------------------------------------------------------------------------------
    def set_demos(self, demos: list[tuple[str, str]]) -> None:
        """Replace the self-generated demonstrations with ``(text, label)`` pairs (for spans the label is
        the encoded span list, see ``spans.encode_spans``)."""
        with self.transaction() as db:
            db.execute("DELETE FROM demos")
            db.executemany("INSERT INTO demos VALUES (?, ?, ?)", [(label, i, text) for i, (text, label) in enumerate(demos)])

    def demos(self) -> list[tuple[str, str]]:
        """(text, label) pairs of the self-generated demonstrations."""
        return [(r[1], r[0]) for r in self._read("SELECT label, text FROM demos ORDER BY pos")]

    # LLM annotations ----------------------------------------------------------------------------------
    def add_annotation(self, stage: str, item_id: str, label: str | None, confidence: float | None,
                       probs: dict[str, float], raw: str | None, error: str | None) -> None:
        self._write("INSERT OR REPLACE INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(stage, item_id, label, confidence, json.dumps(probs), raw, error)])

    def forget_annotations(self, stage: str, item_ids: Iterable[str]) -> None:
        """Drop ``stage``'s answers for ``item_ids`` (they are to be asked again)."""
        self._write("DELETE FROM annotations WHERE stage = ? AND item_id = ?", [(stage, k) for k in item_ids])

    def annotations(self, stage: str) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT item_id, label, confidence, probs, raw, error FROM annotations WHERE stage = ?",
                          (stage,))
        return {r[0]: {"label": r[1], "confidence": r[2], "probs": json.loads(r[3]), "raw": r[4], "error": r[5]}
                for r in rows}

    # SLM outputs --------------------------------------------------------------------------------------
    def set_slm(self, rnd: int, rows: list[tuple[str, list[float], float | None, bool, float]]) -> None:
        self._write("INSERT OR REPLACE INTO slm VALUES (?, ?, ?, ?, ?, ?)",
                    [(rnd, i, json.dumps(p), loss, int(clean), cp) for i, p, loss, clean, cp in rows])

    def slm(self, rnd: int) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT item_id, probs, loss, clean, clean_prob FROM slm WHERE round = ?", (rnd,))
        return {r[0]: {"probs": json.loads(r[1]), "loss": r[2], "clean": bool(r[3]), "clean_prob": r[4]}
                for r in rows}

    def copy_slm(self, src: int, dst: int) -> None:
        """Make SLM round ``dst``'s rows those of round ``src`` (a rejected refinement reuses them)."""
        with self.transaction() as db:
            db.execute("DELETE FROM slm WHERE round = ?", (dst,))
            db.execute("INSERT INTO slm SELECT ?, item_id, probs, loss, clean, clean_prob FROM slm WHERE round = ?",
                       (dst, src))

    def reopen_rounds_after(self, rnd: int) -> None:
        """Reopen the SLM and refinement rounds after ``rnd`` (their inputs changed): their marks, SLM outputs,
        health and rejections go, and the results; their LLM answers stay, each one the LLM's answer to its
        text, so a reopened round asks only the texts it has no answer for."""
        with self.transaction() as db:
            later = [name for (name,) in db.execute("SELECT name FROM stages") if name[:5] in ("slm_r", "llm_r")
                     and name[5:].isdigit() and int(name[5:]) > rnd]
            later.append("final")
            db.executemany("DELETE FROM stages WHERE name = ?", [(n,) for n in later])
            db.execute("DELETE FROM slm WHERE round > ?", (rnd,))
            db.execute("DELETE FROM meta WHERE key LIKE 'health_r%' AND CAST(substr(key, 9) AS INTEGER) > ?", (rnd,))
            db.execute("DELETE FROM meta WHERE key LIKE 'slm_evidence_r%' AND CAST(substr(key, 15) AS INTEGER) > ?",
                       (rnd,))
            db.execute("DELETE FROM meta WHERE key LIKE 'rejected_r%' AND CAST(substr(key, 11) AS INTEGER) >= ?",
                       (rnd,))

    # results ----------------------------------------------------------------------------------------
    def set_results(self, results: list[ItemResult]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM results")
            db.executemany("INSERT INTO results (item_id, record, label, confidence, suspicious, source) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           [(r.item_id, json.dumps(asdict(r)), r.label, r.confidence, int(r.suspicious), r.source)
                            for r in results])

    def results(self, item_ids: Iterable[str] | None = None) -> dict[str, ItemResult]:
        """Stored results by item id: all of them, or only those of ``item_ids`` (cheap for a few)."""
        rows = (self._read("SELECT item_id, record FROM results") if item_ids is None
                else self._read_ids("SELECT item_id, record FROM results WHERE item_id", item_ids))
        return {r[0]: ItemResult(**json.loads(r[1])) for r in rows}
