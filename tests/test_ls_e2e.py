"""End to end against a real Label Studio 1.23 (started by ``tests/fixtures_ls.py``) and the real backend
under gunicorn, with the embedded offline LLM: connect, "Retrieve predictions", background FreeAL job,
predictions with scores and model versions, the review view, and a human annotation used as gold.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from label_studio_sdk import LabelStudio

from freeal_backend.labelstudio.review_tab import health_note
from freeal_backend.labelstudio.label_config import parse_label_config
from freeal_backend.labelstudio.label_results import FLAG_SUSPICIOUS, render_prediction
from freeal_backend.labelstudio.client import (REVIEW_VIEW_TITLE, Connection, ProjectClient, connection_from_env,
                                      is_review_view_title)
from freeal_backend.records import ItemResult
from freeal_backend.storage import Store
from tests.fixtures_ls import LabelStudioServer, free_port

pytestmark = pytest.mark.ls

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.jsonl"
ARTIFACTS = ROOT / "tests" / "artifacts"
N_TASKS = 32
JOB_TIMEOUT_S = 480


def sst2_rows(n: int) -> list[dict[str, str]]:
    with SST2.open() as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


@dataclass(frozen=True)
class BackendServer:
    url: str
    data_dir: Path
    log_path: Path


@contextmanager
def serve_backend(root: Path, label_studio: LabelStudioServer, **settings: str) -> Iterator[BackendServer]:
    """The FreeAL backend under gunicorn on 127.0.0.1, talking to the test Label Studio; ``settings`` are
    environment variables on top of a clean environment (no inherited FREEAL_/LLM_/BASIC_AUTH_ variables)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FREEAL_", "LLM_", "BASIC_AUTH_"))}
    env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
               FREEAL_DATA_DIR=str(root / "data"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HOST="127.0.0.1", PORT=str(port), **{"FREEAL_SLM_MIN_STEPS": "0", **settings})
    log_path = root / "backend.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                                 "freeal_backend.labelstudio.wsgi:app"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 60, "backend /health")
        yield BackendServer(url, root / "data", log_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def backend(label_studio: LabelStudioServer, llm_base_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    """The backend with the embedded LLM; afterwards the Label Studio calls it saw go to an artifact."""
    root = tmp_path_factory.mktemp("backend")
    with serve_backend(root, label_studio, LLM_BASE_URL=llm_base_url, FREEAL_ROUNDS="1", FREEAL_SLM_EPOCHS="4",
                       FREEAL_SLM_WARMUP="1", FREEAL_DEMOS_PER_LABEL="3", FREEAL_SHOTS="4", WORKERS="2",
                       THREADS="4", FREEAL_PREDICT_BUDGET_S="15") as server:
        yield server
    ARTIFACTS.mkdir(exist_ok=True)
    calls = sorted({m.group(1) for m in re.finditer(r"(LS (?:call|webhook) \S+(?: \S+)?)",
                                                       server.log_path.read_text(errors="replace"))
                    if "/status/" not in m.group(1)})  # /status is the test's own polling
    (ARTIFACTS / "ls_protocol_calls.txt").write_text("\n".join(calls) + "\n")


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_job(backend: BackendServer, project_id: int, *, not_version: str | None = None,
             finished_after: float | None = None) -> dict[str, Any]:
    """Wait until the project's job is done (and pushed a version other than ``not_version``); with
    ``finished_after``, until a job that finished after that time has ended, done or failed."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{backend.url}/status/{project_id}", timeout=30)
        except httpx.HTTPError:  # a busy 2-core machine: ask again
            continue
        if resp.status_code == 200:
            status = resp.json()
            if finished_after is not None:
                if status["state"] in ("done", "failed") and (status.get("finished") or 0.0) > finished_after:
                    return status
            else:
                assert status["state"] != "failed", status
                if status["state"] == "done" and status["model_version"] != not_version:
                    return status
        time.sleep(2)
    log_tail = backend.log_path.read_text(errors="replace")[-3000:]
    raise AssertionError(f"job did not end in {JOB_TIMEOUT_S}s: {status}; the backend log ends:\n{log_tail}")


def test_ls_client_paging_versions_and_view(label_studio: LabelStudioServer) -> None:
    """Paging, bulk import, version replacement and the review view, with no model involved."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="ls-client", label_config=(ROOT / "label_config/sentiment.xml").read_text())
    client.projects.import_tasks(id=project.id, request=[{"text": r["text"]} for r in sst2_rows(7)])
    pc = ProjectClient(Connection(label_studio.url, label_studio.token), project.id)
    cfg = parse_label_config(pc.label_config())
    tasks = list(pc.iter_tasks(cfg, page_size=3))
    assert len(tasks) == 7 and all(t.text for t in tasks)
    flagged_before = {tasks[0].task_id, tasks[2].task_id}  # the previous version flagged other tasks
    flagged = {tasks[1].task_id, tasks[4].task_id}
    for version, marked in (("freeal-r0-a", flagged_before), ("freeal-r1-b", flagged)):
        preds = [{"task": t.task_id, **render_prediction(cfg, _result(t.task_id, t.task_id in marked), version)}
                 for t in tasks]
        assert pc.import_predictions(preds, batch=4) == 7
    pc.select_version("freeal-r1-b")
    assert client.projects.get(id=project.id).model_version == "freeal-r1-b"
    view = pc.upsert_review_view(version="freeal-r1-b")
    least_confident_first = sorted(flagged, key=lambda t: _result(t, True).confidence or 0.0)
    assert pc.view_task_ids(view) == least_confident_first  # before the previous version is deleted
    assert pc.delete_other_freeal_versions("freeal-r1-b") == ["freeal-r0-a"]
    assert pc.model_versions() == {"freeal-r1-b": 7}
    assert pc.upsert_review_view() == view  # found by its title; no version: any FreeAL version's flag
    assert pc.view_task_ids(view) == least_confident_first
    client.annotations.create(id=tasks[1].task_id, result=[{"from_name": "sentiment", "to_name": "text",
                                                             "type": "choices", "value": {"choices": ["negative"]}}])
    assert pc.view_task_ids(view) == [tasks[4].task_id]  # the queue shrinks as people review
    assert [t.human_labels for t in pc.iter_tasks(cfg) if t.task_id == tasks[1].task_id] == [("negative",)]


def _result(task_id: int, flagged: bool) -> ItemResult:
    conf = 0.5 + (task_id % 5) / 100 if flagged else 0.95
    return ItemResult(str(task_id), "positive", conf, {"positive": conf, "negative": 1 - conf}, suspicious=flagged,
                      reasons=["label_issue"] if flagged else [], suggested_label="negative" if flagged else None)


def test_personal_access_token_and_missing_variables(label_studio: LabelStudioServer) -> None:
    """A personal access token (JWT refresh token) works through the SDK; missing variables are named."""
    legacy = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    pat = legacy.tokens.create().token
    assert pat and pat.count(".") == 2
    conn = connection_from_env({"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": pat})
    assert ProjectClient(conn, 1).client.projects.list() is not None
    assert "***" in repr(conn) and pat not in repr(conn)
    with pytest.raises(RuntimeError, match="LABEL_STUDIO_API_KEY not set"):
        connection_from_env({"LABEL_STUDIO_URL": label_studio.url})
    with pytest.raises(RuntimeError, match="LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        connection_from_env({})


def test_retrieve_predictions_review_view_and_gold(label_studio: LabelStudioServer, backend: BackendServer) -> None:
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="FreeAL e2e", label_config=(ROOT / "label_config/review.xml").read_text())
    pid = project.id
    client.projects.import_tasks(id=pid, request=[{"text": r["text"]} for r in sst2_rows(N_TASKS)])
    task_ids = sorted(int(t.id) for t in client.tasks.list(project=pid, fields="task_only", page_size=100))
    assert len(task_ids) == N_TASKS

    # connect the model: Label Studio calls /health and /setup and adds the /webhook
    ml = client.ml.create(url=backend.url, project=pid, title="FreeAL")
    assert client.ml.get(id=ml.id).state == "CO"

    # Data Manager action "Retrieve predictions" on every task: Label Studio calls /setup and /predict
    client.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
    first = {int(t.id): t for t in client.tasks.list(project=pid, fields="all", page_size=100)}
    assert all(len(t.predictions or []) == 1 for t in first.values()), "one prediction per task at once"

    status = wait_job(backend, pid)
    version = status["model_version"]
    assert re.fullmatch(r"freeal-r1-[0-9a-f]{8}", version), version
    preds = check_predictions(client, pid, task_ids, version)
    assert client.projects.get(id=pid).model_version == version

    flagged = review_view_ids(client, pid)
    expected = {tid for tid, p in preds.items() if flag_of(p) == FLAG_SUSPICIOUS}
    assert flagged == expected and status["flagged"] == len(expected)
    # the ended job left its count and the run health in the tab title; the status page and /status show the run
    titles = [(v.data or {}).get("title") for v in client.views.list(project=pid)]
    assert f"{REVIEW_VIEW_TITLE} ({len(expected)}) · {health_note(status['health'])}" in titles, titles
    assert status["health"]["verdict"] in {"ok", "poor", "near_chance"}
    assert status["health"]["message"] in status["message"]
    run = status["run"]
    # rounds: 0 (LLM), 1 (SLM + refinement), 2 (the SLM's check of the final labels)
    assert run["tasks"] == N_TASKS and run["final"]["flagged"] == len(expected) and len(run["rounds"]) == 3
    assert run["rounds"][1]["flagged"] == len(expected) and run["rounds"][0]["llm"]["calls"] is not None
    assert status["review_tab"]["url"] == f"{label_studio.url}/projects/{pid}/data?tab={status['view_id']}"
    page = httpx.get(f"{backend.url}/projects/{pid}", timeout=30)
    assert page.status_code == 200 and "Texts per label after each round" in page.text

    # a person labels one task through the API; the webhook makes it gold for the next run
    target = sorted(expected)[0] if expected else task_ids[0]
    current = choice_of(preds[target])
    human = "negative" if current == "positive" else "positive"
    client.annotations.create(id=target, result=[{"from_name": "sentiment", "to_name": "text", "type": "choices",
                                                  "value": {"choices": [human]}}])
    status2 = wait_job(backend, pid, not_version=version)
    version2 = status2["model_version"]
    preds2 = check_predictions(client, pid, task_ids, version2)
    assert choice_of(preds2[target]) == human and preds2[target]["score"] == 1.0
    assert "1 new human label: " in status2["message"] and "(at most 2)" in status2["message"], status2["message"]
    store = Store(backend.data_dir / f"project-{pid}" / "state.sqlite")
    try:
        gold = {it.item_id: it.human_label for it in store.items()}
        assert gold[str(target)] == human
        assert store.results()[str(target)].source == "human"
    finally:
        store.close()
    assert target not in review_view_ids(client, pid)

    # "Start Training" in the model settings, and the model-version list
    client.ml.train(id=ml.id)
    versions = client.ml.list_model_versions(id=ml.id)
    assert version2 in str(versions)
    calls = backend.log_path.read_text(errors="replace")
    for call in ("LS call GET /health", "LS call POST /setup", "LS call POST /predict",
                 "LS webhook action=ANNOTATION_CREATED", "LS webhook action=START_TRAINING", "LS call GET /versions"):
        assert call in calls, call



def test_the_jobs_reads_do_not_make_label_studio_call_predict(label_studio: LabelStudioServer,
                                                               backend: BackendServer) -> None:
    """With "Retrieve predictions automatically" on, Label Studio calls the ML backend's /predict for each
    page a plain task-list read returns without predictions; the job's reads (``review=1``) must not."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="auto-retrieve", label_config=(ROOT / "label_config/review.xml").read_text())
    client.projects.import_tasks(id=project.id, request=[{"text": r["text"]} for r in sst2_rows(5)])
    client.ml.create(url=backend.url, project=project.id, title="FreeAL")
    client.projects.update(id=project.id, evaluate_predictions_automatically=True)
    pc = ProjectClient(Connection(label_studio.url, label_studio.token), project.id)

    def predict_calls() -> int:
        return backend.log_path.read_text(errors="replace").count("LS call POST /predict")

    before = predict_calls()
    cfg = parse_label_config(pc.label_config())
    assert len(list(pc.iter_tasks(cfg, page_size=2))) == 5
    assert pc.view_task_ids(pc.upsert_review_view()) == []
    assert predict_calls() == before and not any(pc.model_versions().values())  # no call, no prediction stored
    # the setting is live: a plain read of the same tasks does call /predict (the trap this test guards)
    list(client.tasks.list(project=project.id, page_size=2))
    assert predict_calls() > before

def check_predictions(client: LabelStudio, pid: int, task_ids: list[int], version: str) -> dict[int, dict[str, Any]]:
    """Every task has exactly one prediction, of ``version``, with a score in [0, 1] and a label."""
    out = {}
    for task in client.tasks.list(project=pid, fields="all", page_size=100):
        preds = [p if isinstance(p, dict) else p.model_dump() for p in task.predictions or []]
        assert len(preds) == 1, (task.id, [p.get("model_version") for p in preds])
        pred = preds[0]
        assert pred["model_version"] == version
        assert pred["score"] is not None and 0.0 <= pred["score"] <= 1.0
        assert choice_of(pred) in {"positive", "negative"}
        out[int(task.id)] = pred
    assert sorted(out) == task_ids
    return out


def choice_of(pred: dict[str, Any]) -> str | None:
    return next((r["value"]["choices"][0] for r in pred["result"] if r["from_name"] == "sentiment"), None)


def flag_of(pred: dict[str, Any]) -> str | None:
    return next((r["value"]["choices"][0] for r in pred["result"] if r["from_name"] == "freeal_flag"), None)


def review_view_ids(client: LabelStudio, pid: int) -> set[int]:
    views = [v for v in client.views.list(project=pid) if is_review_view_title((v.data or {}).get("title"))]
    assert len(views) == 1
    return {int(t.id) for t in client.tasks.list(project=pid, view=views[0].id, fields="task_only", page_size=100)}
