"""Several processes opening the same new SQLite file at once (gunicorn workers booting side by side, each
opening the job store): every one must get its connection. Before the fix, the losing process's
``PRAGMA journal_mode=WAL`` raised "database is locked" at once, the worker failed to boot and gunicorn shut
the whole backend down (a CI run's end-to-end tests found the backend gone)."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from freeal_backend.labelstudio.job_store import JobStore

PROCESSES = 4
FILES = 12


def _open(path: str, barrier: mp.synchronize.Barrier, errors: mp.Queue) -> None:
    barrier.wait()
    try:
        JobStore(Path(path)).close()
    except Exception as exc:  # reported to the parent, which fails the test
        errors.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_one_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    errors: mp.Queue = ctx.Queue()
    for n in range(FILES):
        path = tmp_path / f"store{n}" / "backend.sqlite"
        barrier = ctx.Barrier(PROCESSES)
        procs = [ctx.Process(target=_open, args=(str(path), barrier, errors)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
