"""Crash safety: a real process is SIGKILLed mid-stage, restarted, and the run completes.

The LLM is the fake OpenAI-compatible server of ``tests/fake_openai.py`` (real HTTP, a small delay per
answer, requests held on command so the kill lands exactly mid-stage); its request log proves that no
finished item is asked twice. The SQLite state must pass ``integrity_check`` after every kill.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fake_openai import MODEL, FakeOpenAI
from tests.fixtures_llm import DATA

ROOT = Path(__file__).resolve().parents[1]
FREEAL = [sys.executable, "-m", "freeal_backend.cli"]  # the `freeal` console script, same interpreter
SST2 = DATA / "sst2" / "train.jsonl"
LABELS = "positive,negative"


def _need_data() -> None:
    if not SST2.exists():
        pytest.skip(f"shared data set {SST2} is not available")


def _db_check(path: Path) -> sqlite3.Connection:
    """Open a state file read-only-ish and assert it is a consistent WAL database."""
    db = sqlite3.connect(str(path), timeout=30)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    return db


def _stage_done(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM stages WHERE name = ?", (name,)).fetchone() is not None


def _annotated(db: sqlite3.Connection, stage: str) -> int:
    return int(db.execute("SELECT COUNT(*) FROM annotations WHERE stage = ? AND error IS NULL",
                          (stage,)).fetchone()[0])


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _wait(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc is not None and proc.poll() is None:
        _kill(proc)
    pytest.fail(f"timed out waiting for {what}")


def _kill_once_stored(proc: subprocess.Popen, fake: FakeOpenAI, state: Path, stored: int, timeout: float) -> None:
    """Wait until ``proc`` has a request held by ``fake`` and ``stored`` round-0 answers in its state file
    (every answer is stored before more are asked for), SIGKILL it, then let the held requests go."""
    _wait(lambda: fake.held() >= 1, timeout, "the run to reach the held requests", proc)
    db = sqlite3.connect(str(state), timeout=30)
    _wait(lambda: _annotated(db, "llm_r0") >= stored, 30, "the answers to be stored", proc)
    db.close()
    _kill(proc)
    fake.release()


# --- fast: the annotation worker alone (no torch), killed mid-stage --------------------------------------

WORKER = r"""
import json, sys
from pathlib import Path
from freeal_backend.llm.annotate import annotate_items
from freeal_backend.llm.cache import ResponseCache
from freeal_backend.llm.client import LLMClient, label_parser
from freeal_backend.llm.prompts import label_messages
from freeal_backend.records import Item
from freeal_backend.storage import Store

base_url, run_dir, data, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rows = [json.loads(line) for _, line in zip(range(n), open(data, encoding="utf-8"))]
items = [Item(str(i), r["text"]) for i, r in enumerate(rows)]
labels = ["positive", "negative"]
client = LLMClient(base_url, "fake-gpt", ResponseCache(run_dir / "llm_cache.sqlite"), concurrency=4, timeout=10,
                   max_retries=2)
store = Store(run_dir / "state.sqlite")
annotate_items(client, store, "llm_r0", items, lambda i: label_messages(items[i].text, labels),
               lambda i: label_parser(labels))
store.mark_stage("llm_r0")
print(json.dumps(client.stats.as_dict()), flush=True)
"""


def test_sigkill_during_llm_annotation_resumes_without_repeated_calls(tmp_path: Path) -> None:
    _need_data()
    n, first_batch = 60, 25
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with FakeOpenAI(delay=0.01) as fake:
        fake.hold_after(first_batch)
        cmd = [sys.executable, str(script), fake.base_url, str(run_dir), str(SST2), str(n)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _kill_once_stored(proc, fake, run_dir / "state.sqlite", first_batch, 60)
        answered_first = fake.answered_keys()
        assert sum(answered_first.values()) == first_batch

        db = _db_check(run_dir / "state.sqlite")
        assert _annotated(db, "llm_r0") == first_batch and not _stage_done(db, "llm_r0")
        db.close()
        _db_check(run_dir / "llm_cache.sqlite").close()

        fake.reset_log()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        second = fake.records()
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    asked_again = {r.key for r in second} & set(answered_first)
    assert not asked_again, f"{len(asked_again)} finished items were requested again"
    assert stats["calls"] == n - first_batch and stats["failures"] == 0
    db = _db_check(run_dir / "state.sqlite")
    assert _annotated(db, "llm_r0") == n and _stage_done(db, "llm_r0")
    db.close()


# --- slow: the whole CLI, killed during LLM annotation, then during SLM training -------------------------

class StderrWatch:
    """Collects a subprocess's stderr (tqdm bars use \\r) in a thread, so the test can wait for a stage."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        while True:
            chunk = proc.stderr.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                return
            with self._lock:
                self.text += chunk.decode("utf-8", "replace")

    def seen(self, needle: str) -> bool:
        with self._lock:
            return needle in self.text


@pytest.mark.slow
def test_cli_sigkill_during_llm_annotation_and_during_slm_training(tmp_path: Path) -> None:
    _need_data()
    n, first_batch = 100, 40
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    out = run_dir / "labels.jsonl"
    cmd = [*FREEAL, "run", str(SST2), "--limit", str(n), "--labels", LABELS, "--rounds", "1",
           "--run-dir", str(run_dir), "--data-dir", str(data_dir)]
    with FakeOpenAI(delay=0.02) as fake:
        env = dict(os.environ, LLM_BASE_URL=fake.base_url, LLM_MODEL=MODEL, LLM_MAX_RETRIES="2", LLM_TIMEOUT="10",
                   LLM_CONCURRENCY="4", FREEAL_SLM_EPOCHS="2", FREEAL_DEMOS_PER_LABEL="3", FREEAL_SHOTS="2",
                   FREEAL_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

        # 1. kill during round-0 annotation: 2 demo requests + 40 labels answered, the rest held in flight
        fake.hold_after(2 + first_batch)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _kill_once_stored(proc, fake, run_dir / "state.sqlite", first_batch, 180)
        answered_1 = fake.answered_keys()
        assert sum(answered_1.values()) == 2 + first_batch
        db = _db_check(run_dir / "state.sqlite")
        assert _annotated(db, "llm_r0") == first_batch and _stage_done(db, "demos")
        assert not _stage_done(db, "slm_r1")
        db.close()
        _db_check(data_dir / "llm_cache.sqlite").close()

        # 2. resume; kill during SLM training (its per-epoch progress bar has appeared)
        fake.reset_log()
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        watch = StderrWatch(proc)
        _wait(lambda: watch.seen("slm:"), 240, "SLM training to start", proc)
        _kill(proc)
        run_2 = fake.records()
        answered_2 = fake.answered_keys()
        assert not {r.key for r in run_2} & set(answered_1), "finished items were requested again after kill 1"
        assert sum(answered_2.values()) == n - first_batch  # exactly the unfinished round-0 items
        db = _db_check(run_dir / "state.sqlite")
        assert _annotated(db, "llm_r0") == n
        assert not _stage_done(db, "slm_r1"), "the kill landed after SLM training had finished"
        db.close()
        assert not out.exists()

        # 3. resume to completion
        fake.reset_log()
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        run_3 = fake.records()
    repeated = {r.key for r in run_3} & (set(answered_1) | set(answered_2))
    assert not repeated, f"{len(repeated)} finished requests were asked again after kill 2"
    assert all(r.text is not None for r in run_3)  # only refinement labels: no demo was asked again

    db = _db_check(run_dir / "state.sqlite")
    stages = {r[0] for r in db.execute("SELECT name FROM stages")}
    assert {"demos", "slm_r1", "llm_r1", "final"} <= stages, stages  # llm_r0 lives in annotations
    assert _annotated(db, "llm_r0") == n
    assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == n
    assert db.execute("SELECT COUNT(*) FROM slm WHERE round = 1").fetchone()[0] == n
    item_ids = sorted(r[0] for r in db.execute("SELECT item_id FROM items"))
    db.close()
    _db_check(data_dir / "llm_cache.sqlite").close()
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == n
    assert len(item_ids) == len(set(item_ids)) == n
    assert sorted(str(x["id"]) for x in lines) == item_ids  # exactly one output line per item
    assert all(x["label"] in ("positive", "negative") for x in lines)
