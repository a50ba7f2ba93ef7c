"""The Redis job queue (``FREEAL_QUEUE``) and resumable pushes, against a real redis-server and Label Studio.

Workers are real ``freeal worker`` processes; the LLM is the fake OpenAI-compatible server of
``tests/fake_openai.py``, whose request log proves that a job resumed after ``kill -9`` asks nothing twice.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk import LabelStudio

from freeal_backend.config import Settings
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.manager import Claim, JobManager
from freeal_backend.labelstudio.push import PushJournal, push_results
from freeal_backend.labelstudio.runs import RunRegistry
from freeal_backend.labelstudio.label_config import parse_label_config
from freeal_backend.labelstudio.client import IMPORT_BATCH, Connection, ProjectClient
from freeal_backend.records import ItemResult
from freeal_backend.labelstudio.backend import ServerSettings
from freeal_backend.labelstudio.server import create_app
from tests.fake_openai import MODEL, FakeOpenAI
from tests.fixtures_llm import shared_rows
from tests.fixtures_ls import BATCHED_IMPORT_FLAG, LabelStudioServer, feature_flags

redis = pytest.importorskip("redis")
from freeal_backend.labelstudio.jobqueue import QUEUE_NAME, Coordinator, QueueRunner, key  # noqa: E402  (needs redis, rq)

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = (ROOT / "label_config" / "sentiment.xml").read_text()
JOB_TIMEOUT_S = 300


# --- the coordination rules alone ---------------------------------------------------------------------

def test_one_job_per_project_reruns_and_orphans(queue_url: str) -> None:
    r = redis.Redis.from_url(queue_url)
    coord = Coordinator(r, lock_ttl=1.0)
    assert coord.request(7) is True  # enqueue
    assert coord.request(7) is False  # already queued: that job serves both requests
    lease = coord.lease(7)
    assert lease is not None and coord.lease(7) is None  # one job per project
    assert lease.settle() is True  # requests 1..2 are waiting: run
    assert coord.request(7) is True  # a trigger while it runs: a new RQ job (it will find the lock held) ...
    assert coord.lease(7) is None
    assert lease.settle() is True  # ... and the running job goes once more
    assert lease.settle() is False  # nothing newer: done, lock released
    assert int(r.get(key("done", 7))) == 3 and not r.exists(key("lock", 7))
    assert coord.orphans() == []

    coord.request(8)
    killed = coord.lease(8)  # its worker dies while running: the lock is never released
    assert killed is not None and killed.settle() is True
    assert coord.orphans() == []  # the lock is still alive
    time.sleep(1.3)
    assert coord.orphans() == [8]  # the lock expired with a request unserved
    again = coord.lease(8)
    assert again is not None and again.settle() is True and again.settle() is False

    coord.request(9)
    failing = coord.lease(9)
    assert failing is not None and failing.settle() is True
    coord.request(9)
    assert failing.settle(force=True) is False  # a failed run releases even with a request pending
    assert coord.orphans() == []


# --- Label Studio helpers -------------------------------------------------------------------------------

def make_project(ls: LabelStudioServer, n: int, title: str) -> tuple[int, list[int], list[str]]:
    client = LabelStudio(base_url=ls.url, api_key=ls.token)
    project = client.projects.create(title=title, label_config=SENTIMENT)
    texts = [r["text"] for r in shared_rows("sst2", n=n)]
    client.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
    ids = sorted(int(t.id) for t in client.tasks.list(project=project.id, fields="task_only", page_size=100))
    assert len(ids) == n
    return int(project.id), ids, texts


def predictions_by_task(ls: LabelStudioServer, project_id: int) -> dict[int, list[str]]:
    """Model versions of every task's predictions (a list per task, to see duplicates)."""
    client = LabelStudio(base_url=ls.url, api_key=ls.token)
    out = {}
    for task in client.tasks.list(project=project_id, fields="all", page_size=100):
        preds = [p if isinstance(p, dict) else p.model_dump() for p in task.predictions or []]
        out[int(task.id)] = [p["model_version"] for p in preds]
    return out


def assert_exactly_one(ls: LabelStudioServer, project_id: int, task_ids: list[int], version: str) -> None:
    preds = predictions_by_task(ls, project_id)
    assert sorted(preds) == task_ids
    wrong = {t: v for t, v in preds.items() if v != [version]}
    assert not wrong, f"{len(wrong)} tasks without exactly one {version} prediction: {list(wrong.items())[:5]}"


# --- resumable push --------------------------------------------------------------------------------------

class Crash(Exception):
    pass


class CrashingClient(ProjectClient):
    """Counts import requests; the ``crash_at``-th raises, before or after Label Studio stored it."""

    def __init__(self, conn: Connection, project_id: int, *, crash_at: int = 0, landed: bool = False) -> None:
        super().__init__(conn, project_id)
        self.crash_at, self.landed, self.calls = crash_at, landed, 0

    def import_predictions(self, predictions: Sequence[dict[str, Any]], *, batch: int = IMPORT_BATCH) -> int:
        self.calls += 1
        if self.calls == self.crash_at and not self.landed:
            raise Crash("killed before the request")
        stored = super().import_predictions(predictions, batch=batch)
        if self.calls == self.crash_at:
            raise Crash("killed after Label Studio stored the batch")
        return stored


def results_for(task_ids: list[int]) -> list[ItemResult]:
    return [ItemResult(str(t), "positive" if t % 2 else "negative", 0.9, {"positive": 0.9, "negative": 0.1},
                       suspicious=t % 3 == 0) for t in task_ids]


@pytest.mark.ls
@pytest.mark.parametrize("server", ["label_studio", "label_studio_default_import"],
                         ids=["batched-import", "default-import"])
@pytest.mark.parametrize("landed", [False, True], ids=["crash-before-request", "crash-after-request"])
def test_push_resumes_without_duplicates_or_losses(request: pytest.FixtureRequest, tmp_path: Path,
                                                   server: str, landed: bool) -> None:
    """As shipped (Label Studio's batched prediction import on) and with Label Studio's default import."""
    label_studio: LabelStudioServer = request.getfixturevalue(server)
    flag = feature_flags(label_studio).get(BATCHED_IMPORT_FLAG)
    assert flag is label_studio.batched_import, f"{BATCHED_IMPORT_FLAG} is {flag} in that Label Studio"
    n, batch = 23, 5  # 5 batches; the 3rd one crashes
    pid, task_ids, _ = make_project(label_studio, n, f"push-resume-{landed}")
    conn = Connection(label_studio.url, label_studio.token)
    cfg = parse_label_config(SENTIMENT)
    journal = PushJournal(JobStore(tmp_path / "backend.sqlite"), pid)
    results = results_for(task_ids)
    push_results(ProjectClient(conn, pid), cfg, results, "freeal-r0-previous", journal, batch=batch)

    crashing = CrashingClient(conn, pid, crash_at=3, landed=landed)
    with pytest.raises(Crash):
        push_results(crashing, cfg, results, "freeal-r1-current", journal, batch=batch)
    in_ls = ProjectClient(conn, pid).model_versions()
    assert in_ls == {"freeal-r0-previous": n, "freeal-r1-current": 15 if landed else 10}

    resumed = CrashingClient(conn, pid)
    flagged = push_results(resumed, cfg, results, "freeal-r1-current", journal, batch=batch)
    assert resumed.calls == (2 if landed else 3)  # only the batches not yet stored
    assert flagged == sum(t % 3 == 0 for t in task_ids)
    assert resumed.model_versions() == {"freeal-r1-current": n}
    assert_exactly_one(label_studio, pid, task_ids, "freeal-r1-current")
    assert journal.store.pushed(pid, "freeal-r0-previous") == (set(), set())  # forgotten with the version

    again = CrashingClient(conn, pid)  # the same version once more: nothing to send
    push_results(again, cfg, results, "freeal-r1-current", journal, batch=batch)
    assert again.calls == 0 and again.model_versions() == {"freeal-r1-current": n}


@pytest.mark.ls
def test_kept_old_versions_stay_hidden_from_the_review_tab(label_studio: LabelStudioServer, tmp_path: Path) -> None:
    """FREEAL_KEEP_OLD_VERSIONS: the previous version stays in Label Studio, unselected, and the review tab
    lists only the new version's flagged tasks."""
    pid, task_ids, _ = make_project(label_studio, 9, "keep-old-versions")
    conn = Connection(label_studio.url, label_studio.token)
    cfg = parse_label_config(SENTIMENT)
    old = [ItemResult(str(t), "negative", 0.6, {"negative": 0.6, "positive": 0.4}, suspicious=t % 2 == 0)
           for t in task_ids]
    push_results(ProjectClient(conn, pid), cfg, old, "freeal-r0-old")
    flagged = push_results(ProjectClient(conn, pid), cfg, results_for(task_ids), "freeal-r1-new", delete_old=False)
    client = ProjectClient(conn, pid)
    assert client.model_versions() == {"freeal-r0-old": 9, "freeal-r1-new": 9}
    assert client.client.projects.get(id=pid).model_version == "freeal-r1-new"
    view = next(v for v in client.client.views.list(project=pid))
    assert sorted(client.view_task_ids(int(view.id))) == [t for t in task_ids if t % 3 == 0] and flagged == len(
        [t for t in task_ids if t % 3 == 0])


class PushRecorder(JobManager):
    """A job manager that records the version of every push."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pushed: list[str] = []

    def push(self, client: ProjectClient, *args: Any, **kwargs: Any) -> None:
        self.pushed.append(args[2])
        super().push(client, *args, **kwargs)

    def job(self, project_id: int) -> None:
        """One job of the project, run here."""
        assert self.store.claim(project_id, "test", stale_s=600)
        self.run_once(Claim(self.store, project_id, "test"))
        self.store.finish(project_id, "test", "done", "")


def push_recorder(ls: LabelStudioServer, tmp_path: Path, fake: FakeOpenAI, pid: int,
                  extra_params: dict[str, Any] | None = None, **settings: Any) -> PushRecorder:
    """A :class:`PushRecorder` for project ``pid``: one round, a fast small model, the fake LLM."""
    cfg = Settings(slm_min_steps=0, data_dir=tmp_path / "data", llm_base_url=fake.base_url, llm_model=MODEL, rounds=1,
                   shots=2, demos_per_label=3, slm_epochs=1, **settings)
    store = JobStore(tmp_path / "backend.sqlite")
    store.save_project(pid, label_config=SENTIMENT, extra_params=extra_params, ls_url=ls.url, ls_key=ls.token)
    return PushRecorder(cfg, store, RunRegistry(cfg))


@pytest.mark.ls
def test_a_big_project_gets_only_the_final_round_pushed(label_studio: LabelStudioServer, tmp_path: Path) -> None:
    """Above FREEAL_PUSH_EVERY_ROUND_MAX tasks, the job pushes the last round only (each replaced version
    would be deleted by Label Studio one prediction at a time); the review tab follows the pushed version."""
    n = 12
    pid, task_ids, _ = make_project(label_studio, n, "final-round-only")
    with FakeOpenAI() as fake:
        manager = push_recorder(label_studio, tmp_path, fake, pid, push_every_round_max_tasks=n - 1)
        manager.job(pid)
    pushed = manager.pushed
    assert len(pushed) == 1 and pushed[0].startswith("freeal-r1-")
    assert_exactly_one(label_studio, pid, task_ids, pushed[0])
    view = next(v for v in LabelStudio(base_url=label_studio.url, api_key=label_studio.token).views.list(project=pid))
    assert view.data["filters"]["items"][0]["value"] == f"freeal:needs-review[{pushed[0]}]"


@pytest.mark.ls
def test_a_persons_label_gets_the_final_round_pushed_only(label_studio: LabelStudioServer, tmp_path: Path) -> None:
    """Once Label Studio holds FreeAL's predictions, a job started by people's labels pushes its final round
    only: pushing every round again replaced each version twice more, and Label Studio deletes a replaced
    version one prediction at a time while people's saves wait (README, *Scaling*)."""
    pid, task_ids, _ = make_project(label_studio, 12, "annotated-rerun")
    with FakeOpenAI() as fake:
        manager = push_recorder(label_studio, tmp_path, fake, pid)
        manager.job(pid)
        assert [v[:10] for v in manager.pushed] == ["freeal-r0-", "freeal-r1-"]  # a first run shows each round
        LabelStudio(base_url=label_studio.url, api_key=label_studio.token).annotations.create(
            id=task_ids[0], result=[{"from_name": "sentiment", "to_name": "text", "type": "choices",
                                     "value": {"choices": ["negative"]}}])
        manager.pushed.clear()
        manager.job(pid)
    assert len(manager.pushed) == 1 and manager.pushed[0].startswith("freeal-r1-"), manager.pushed
    assert_exactly_one(label_studio, pid, task_ids, manager.pushed[0])


@pytest.mark.ls
def test_a_project_sets_its_own_target_error(label_studio: LabelStudioServer, tmp_path: Path) -> None:
    """One backend serves many projects; the target error of the review budget (FREEAL_TARGET_ERROR) is a
    project's choice too (extra params ``target_error``): its job's run flags toward its target."""
    pid, _, _ = make_project(label_studio, 12, "own-target")
    with FakeOpenAI() as fake:
        manager = push_recorder(label_studio, tmp_path, fake, pid, {"target_error": 0.05}, target_error=0.3)
        manager.job(pid)
    assert manager.runs.get(pid, ("positive", "negative")).target_error == 0.05


# --- workers ------------------------------------------------------------------------------------------------

def worker_env(queue_url: str, data_dir: Path, ls: LabelStudioServer, fake: FakeOpenAI) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FREEAL_", "LLM_", "LABEL_STUDIO_"))}
    env.update(FREEAL_QUEUE=queue_url, FREEAL_DATA_DIR=str(data_dir), FREEAL_QUEUE_LOCK_TTL="4", FREEAL_SLM_MIN_STEPS="0",
               LLM_BASE_URL=fake.base_url, LLM_MODEL=MODEL, LLM_CONCURRENCY="4", LLM_MAX_RETRIES="2",
               LLM_TIMEOUT="10", FREEAL_ROUNDS="0", FREEAL_DEMOS_PER_LABEL="3", FREEAL_SHOTS="2",
               LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token, HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def start_worker(env: dict[str, str], log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "freeal_backend.cli", "worker", *extra], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}; worker log:\n{log_path.read_text(errors='replace')[-3000:]}")


def job_state(store: JobStore, pid: int) -> str | None:
    return (store.status(pid) or {}).get("state")


@pytest.mark.ls
def test_http_trigger_enqueues_and_a_worker_runs_the_job(label_studio: LabelStudioServer, queue_url: str,
                                                        tmp_path: Path, workers: list) -> None:
    """/setup then "Start Training" on a backend with FREEAL_QUEUE: the web process only enqueues; a
    ``freeal worker --burst`` process (sharing the data dir) runs FreeAL and pushes to Label Studio."""
    n = 16
    pid, task_ids, _ = make_project(label_studio, n, "queue-http")
    data_dir = tmp_path / "data"
    with FakeOpenAI() as fake:
        settings = Settings(slm_min_steps=0, data_dir=data_dir, queue_url=queue_url, llm_base_url=fake.base_url, llm_model=MODEL)
        app = create_app(settings, ServerSettings())
        web = app.test_client()
        assert web.post("/setup", json={"project": f"{pid}.1", "schema": SENTIMENT, "hostname": label_studio.url,
                                        "access_token": label_studio.token}).status_code == 200
        for _ in range(3):  # three triggers, one queued job
            assert web.post("/webhook", json={"action": "START_TRAINING", "project": {"id": pid}}).status_code == 200
        assert web.get(f"/status/{pid}").get_json()["state"] == "queued"
        r = redis.Redis.from_url(queue_url)
        assert r.llen(f"rq:queue:{QUEUE_NAME}") == 1
        assert fake.answered() == 0  # nothing ran in the web process

        env = worker_env(queue_url, data_dir, label_studio, fake)
        for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
            env.pop(var)  # the worker finds Label Studio where /setup put it: the shared data dir
        log_path = tmp_path / "worker.log"
        proc = start_worker(env, log_path, "--burst")
        workers.append(proc)
        assert proc.wait(timeout=JOB_TIMEOUT_S) == 0, log_path.read_text(errors="replace")[-3000:]
        status = web.get(f"/status/{pid}").get_json()
        assert status["state"] == "done", (status, log_path.read_text(errors="replace")[-3000:])
        assert fake.label_requests() and max(fake.label_requests().values()) == 1
    version = status["model_version"]
    assert version.startswith("freeal-r0-")
    assert_exactly_one(label_studio, pid, task_ids, version)
    assert int(r.get(key("done", pid))) == 3 and not r.exists(key("lock", pid))


@pytest.mark.ls
@pytest.mark.slow
def test_worker_killed_mid_job_is_resumed_by_another_without_repeated_llm_calls(
        label_studio: LabelStudioServer, queue_url: str, tmp_path: Path, workers: list) -> None:
    n, first = 60, 25
    pid, task_ids, texts = make_project(label_studio, n, "queue-sigkill")
    data_dir = tmp_path / "data"
    store = JobStore(data_dir / "backend.sqlite")
    with FakeOpenAI(delay=0.01) as fake:
        env = worker_env(queue_url, data_dir, label_studio, fake)
        settings = Settings.from_env(data_dir=data_dir, queue_url=queue_url)
        manager = JobManager(settings, store, RunRegistry(settings), QueueRunner(settings))
        fake.hold_after(2 + first)  # 2 demo-writing requests, then `first` labels; the rest wait
        assert manager.trigger(pid, "test")
        log1, log2 = tmp_path / "worker1.log", tmp_path / "worker2.log"
        w1 = start_worker(env, log1)
        workers.append(w1)
        state = data_dir / f"project-{pid}" / "state.sqlite"
        wait_for(lambda: fake.held() >= 1, JOB_TIMEOUT_S, "the job to reach the held LLM requests", log1)
        wait_for(lambda: stored_answers(state) >= first, 30, "the answers to be stored", log1)
        w1.send_signal(signal.SIGKILL)
        assert w1.wait(timeout=30) == -signal.SIGKILL
        fake.release()
        answered_1, texts_1 = fake.answered_keys(), fake.answered_texts()
        assert sum(answered_1.values()) == 2 + first and sum(texts_1.values()) == first
        assert job_state(store, pid) == "running"  # as the dead worker left it
        fake.reset_log()

        w2 = start_worker(env, log2)
        workers.append(w2)
        wait_for(lambda: job_state(store, pid) == "done", JOB_TIMEOUT_S, "worker 2 to finish the job", log2)
        run_2, texts_2 = fake.records(), fake.answered_texts()
    repeated = {rec.key for rec in run_2} & set(answered_1)
    assert not repeated, f"{len(repeated)} LLM requests answered before the kill were sent again"
    assert texts_1 + texts_2 == Counter(texts)  # every text labelled exactly once over both workers
    assert "lost its worker; enqueued again" in log2.read_text()
    version = (store.status(pid) or {})["model_version"]
    assert_exactly_one(label_studio, pid, task_ids, version)


def stored_answers(state: Path) -> int:
    if not state.exists():
        return 0
    db = sqlite3.connect(str(state), timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM annotations WHERE stage = 'llm_r0' AND error IS NULL")
                   .fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not created yet
        return 0
    finally:
        db.close()
