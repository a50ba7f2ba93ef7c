"""Render time of the status page (``GET /projects/<id>``) and ``GET /status/<id>`` for a large project.

A synthetic run state of N tasks (default 100 000; 6 labels, two rounds, 20 % of the texts re-asked per
round, the second refinement round still running) is written to a temporary data dir; the Flask app
serves it in process (its test client: no network, no gunicorn). Timed: the first request (cold: every
round aggregated in SQL) and the median / p95 of the next ones (warm: finished rounds come from the
per-process memo, the running round is counted again each time, as on every page refresh).

    .venv/bin/python benchmarks/status_page.py                  # 100k tasks, 30 requests each
    .venv/bin/python benchmarks/status_page.py --n 1000 --repeat 5 --out /tmp/x.md
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fmt_table, loadavg, write_result  # noqa: E402

from flask.testing import FlaskClient  # noqa: E402

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.labelstudio.backend import ServerSettings  # noqa: E402
from freeal_backend.labelstudio.server import create_app  # noqa: E402
from freeal_backend.storage import Store  # noqa: E402

LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
PID = 1


def synthetic_run(path: Path, n: int, seed: int) -> None:
    """Two rounds over ``n`` texts; round 2's refinement is half done (the job is running)."""
    rng = random.Random(seed)
    store = Store(path)
    store.set_meta("labels", LABELS)
    store.set_meta("data_hash", "bench")
    store.set_meta("rounds_done", 1)
    probs = json.dumps({lab: round(1 / len(LABELS), 3) for lab in LABELS})
    with store.transaction() as db:
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                       [(str(i), i, f"synthetic question number {i} about something", LABELS[0] if i % 200 == 0
                         else None, None, None) for i in range(n)])
        db.executemany("INSERT INTO annotations VALUES ('llm_r0', ?, ?, 0.8, ?, 'raw', NULL)",
                       [(str(i), rng.choice(LABELS), probs) for i in range(n) if i % 200])
    for rnd in (1, 2):
        store.set_slm(rnd, [(str(i), [1 / len(LABELS)] * len(LABELS), 0.1, rng.random() > 0.2, 0.5) for i in range(n)])
        store.mark_stage(f"slm_r{rnd}", {"clean": int(0.8 * n), "labelled": n})
        redo = [str(i) for i in range(n) if i % 200 and rng.random() < 0.2]
        if rnd == 2:
            redo = redo[: len(redo) // 2]
        with store.transaction() as db:
            db.executemany(f"INSERT INTO annotations VALUES ('llm_r{rnd}', ?, ?, 0.9, ?, 'raw', NULL)",
                           [(i, rng.choice(LABELS), probs) for i in redo])
        if rnd == 1:
            store.mark_stage("llm_r1", {"reannotated": len(redo), "demo_pool": 40})
        store.set_meta(f"health_r{rnd}", {"estimated_accuracy": 0.8, "verdict": "ok", "message": "fine"})
        k = len(redo)
        llm = {"calls": k, "cache_hits": 0, "prompt_tokens": 900 * k, "completion_tokens": 3 * k}
        store.set_meta(f"round_stats_r{rnd}", {"llm": llm, "flagged": n // 10})
    with store.transaction() as db:
        rows = []
        for i in range(n):
            conf, flagged = rng.random(), rng.random() < 0.1
            record = {"item_id": str(i), "label": rng.choice(LABELS), "confidence": conf, "suspicious": flagged,
                      "reasons": ["high_loss"] if flagged else [], "source": "llm"}
            rows.append((str(i), json.dumps(record), record["label"], conf, int(flagged), "llm"))
        db.executemany("INSERT INTO results (item_id, record, label, confidence, suspicious, source) "
                       "VALUES (?, ?, ?, ?, ?, ?)", rows)
    store.mark_stage("final", {"rounds": 1, "version": "freeal-r1-bench000"})
    store.close()


def timed(client: FlaskClient, path: str, repeat: int) -> tuple[float, list[float]]:
    """Milliseconds of the first request and of ``repeat`` more."""
    def one() -> float:
        t = time.perf_counter()
        resp = client.get(path)
        assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
        return 1000 * (time.perf_counter() - t)

    first = one()
    return first, [one() for _ in range(repeat)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="tasks in the project")
    parser.add_argument("--repeat", type=int, default=30, help="warm requests per endpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "status_page.md"))
    args = parser.parse_args(argv)
    load_start = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        t = time.perf_counter()
        synthetic_run(data / f"project-{PID}" / "state.sqlite", args.n, args.seed)
        build_s = time.perf_counter() - t
        app = create_app(Settings(data_dir=data), ServerSettings(auto_job=False))
        jobs = app.extensions["freeal"].store
        jobs.claim(PID, "bench", stale_s=60)
        jobs.update(PID, "bench", state="running", round=2, rounds=2, tasks=args.n, flagged=args.n // 10)
        jobs.update(PID, "bench", stage="llm_r2", done=args.n // 20, total=args.n // 10)
        client = app.test_client()
        rows = []
        for path in (f"/projects/{PID}", f"/status/{PID}"):
            first, warm = timed(client, path, args.repeat)
            p95 = sorted(warm)[max(0, int(0.95 * len(warm)) - 1)]
            rows.append([path, first, statistics.median(warm), p95, max(warm)])
            print(f"{path}: first {first:.1f} ms, warm median {statistics.median(warm):.1f} ms, p95 {p95:.1f} ms")
        app.extensions["freeal"].runs.close()
    body = (f"{args.n:,} tasks, {len(LABELS)} labels, two rounds (the second refinement round running); "
            f"state written in {build_s:.1f} s; {args.repeat} warm requests per endpoint.\n\n"
            + fmt_table(["request", "first (cold) ms", "warm median ms", "warm p95 ms", "warm max ms"], rows))
    write_result(Path(args.out), "Status page render time", body, load_start)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
