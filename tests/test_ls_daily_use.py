"""What people do in a real Label Studio 1.23 while FreeAL works on their project.

* The Data Manager's "Create Annotations From Predictions" (often used only to export) makes annotations in
  bulk, one ``ANNOTATIONS_CREATED`` webhook with lists; those untouched copies of predictions are no person's
  judgement and must not become gold (it would empty the review tab of flagged labels nobody checked), while a
  person's saved annotation, one started from a prediction included, is gold.
* A task deleted while a job runs must not make the job's push (and so the whole job) fail.
* The job retitling the review tab must keep the sort order and columns a reviewer set on it.
* Annotations saved or deleted while a job reads the project must not be undone by what it read.
* An annotation converted to a draft leaves an event with no project or ids (or none): answered, not refused.
* A label added to the config after a job ran: the next job starts over with the new labels.

Label Studio is real; the app is the real Flask app on a real socket; the LLM is the fake server."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from flask import Response, request
from label_studio_sdk import LabelStudio

from freeal_backend.labelstudio.client import Connection, ProjectClient, TaskRecord, review_view_title
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.label_config import parse_task_config
from freeal_backend.labelstudio.label_results import review_marker
from freeal_backend.labelstudio.push import push_results
from freeal_backend.labelstudio.runs import build_items
from freeal_backend.records import ItemResult
from freeal_backend.storage import Store
from tests.fake_openai import FakeOpenAI
from tests.fixtures_llm import shared_rows
from tests.fixtures_ls import LabelStudioServer
from tests.test_auth import SENTIMENT, make_app, serve


def choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


@pytest.mark.ls
def test_bulk_copies_of_predictions_are_not_gold_but_a_persons_annotation_is(
        label_studio: LabelStudioServer, tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    app = make_app(tmp_path, fake_llm)
    seen: list[tuple[str, int]] = []

    @app.after_request
    def _record(resp: Response) -> Response:
        if request.path == "/webhook":
            seen.append((str((request.get_json(silent=True) or {}).get("action")), resp.status_code))
        return resp

    backend = app.extensions["freeal"]
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    with serve(app) as client:
        pid = ls.projects.create(title="bulk copies", label_config=SENTIMENT).id
        ls.projects.import_tasks(id=pid, request=[
            {"data": {"text": text}, "predictions": [{"model_version": "freeal-r1-x", "score": 0.9,
                                                      "result": choice(label)}]}
            for text, label in (("a great film", "positive"), ("a dull film", "positive"),
                                ("a fine film", "positive"))])
        tasks = {int(t.id): t for t in ls.tasks.list(project=pid, fields="all", page_size=10)}
        first, *rest = sorted(tasks)
        assert ls.ml.create(url=f"http://127.0.0.1:{client.base_url.port}", project=pid, title="FreeAL").id

        # a person corrects the first task in the editor: it sends the time spent and the prediction it began from
        ls.annotations.create(id=first, result=choice("negative"), lead_time=4.2,
                              parent_prediction=tasks[first].predictions[0].id)
        # the Data Manager's bulk action copies the other two predictions into annotations
        ls.actions.create(id="predictions_to_annotations", project=pid,
                          selected_items={"all": False, "included": rest})
        deadline = time.monotonic() + 30
        while not any(a == "ANNOTATIONS_CREATED" for a, _ in seen) and time.monotonic() < deadline:
            time.sleep(0.2)

    assert ("ANNOTATIONS_CREATED", 200) in seen, seen  # the bulk event's lists were answered 400 before
    assert backend.store.gold(pid) == {first: ["negative"]}
    cfg = parse_task_config(SENTIMENT)
    read = {r.task_id: r.human_labels for r in ProjectClient(Connection(label_studio.url, label_studio.token),
                                                             pid).iter_tasks(cfg)}
    assert read == {first: ("negative",), rest[0]: (), rest[1]: ()}, read  # what a job reads as people's labels


@pytest.mark.ls
def test_a_task_deleted_while_a_job_runs_does_not_fail_its_push(label_studio: LabelStudioServer) -> None:
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    pid = ls.projects.create(title="deleted task", label_config=SENTIMENT).id
    ls.projects.import_tasks(id=pid, request=[{"text": t} for t in ("a great film", "a dull film", "a fine film")])
    ids = sorted(int(t.id) for t in ls.tasks.list(project=pid, fields="task_only", page_size=10))
    cfg = parse_task_config(SENTIMENT)
    results = [ItemResult(str(i), "positive", 0.9, {"positive": 0.9, "negative": 0.1}) for i in ids]
    ls.tasks.delete(id=ids[1])  # someone deletes a task after the job read the project
    client = ProjectClient(Connection(label_studio.url, label_studio.token), pid)
    push_results(client, cfg, results, "freeal-r1-deleted")  # raised ApiError 400 before, failing the job
    stored = {int(t.id): len(t.predictions or []) for t in ls.tasks.list(project=pid, fields="all", page_size=10)}
    assert stored == {ids[0]: 1, ids[2]: 1}, stored


@pytest.mark.ls
def test_the_review_tab_keeps_the_sort_and_columns_people_set(label_studio: LabelStudioServer) -> None:
    """A running job retitles the tab every few seconds (its live state); that rewrote the whole tab, undoing
    the sort order and columns a reviewer had just set on it. What FreeAL owns is its title and filters."""
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    pid = ls.projects.create(title="review tab", label_config=SENTIMENT).id
    client = ProjectClient(Connection(label_studio.url, label_studio.token), pid)
    view = client.upsert_review_view(review_view_title(3, "round 1/2, 10%"), "freeal-r1-a")
    theirs = {"ordering": ["-tasks:id"], "hiddenColumns": {"explore": ["tasks:data.text"], "labeling": []},
              "columnsWidth": {"tasks:id": 77}}
    ls.views.update(id=str(view), project=pid, data={**(ls.views.get(id=str(view)).data or {}), **theirs})
    assert client.upsert_review_view(review_view_title(3, "round 2/2, 50%"), "freeal-r2-b") == view
    data = ls.views.get(id=str(view)).data or {}
    assert {k: data.get(k) for k in theirs} == theirs, data
    assert data["title"] == review_view_title(3, "round 2/2, 50%")
    assert review_marker("freeal-r2-b") in str(data["filters"])  # what the tab holds follows the new version


def test_webhooks_during_a_jobs_read_of_the_project_are_not_undone(tmp_path: Path) -> None:
    """A job reads every task's annotations (minutes for a big project), then makes the backend's gold what
    it read. An annotation deleted while it read came back as gold, and one saved while it read was lost."""
    store = JobStore(tmp_path / "backend.sqlite")
    store.set_gold(5, 1, 10, ["positive"])
    read_since = time.time()
    time.sleep(0.01)
    store.delete_gold(5, [1])  # deleted after the read passed its task
    store.set_gold(5, 2, 11, ["negative"])  # saved after the read passed its task
    store.set_gold(5, 3, 12, ["positive"])
    store.set_gold(5, 3, 12, [])  # skipped (was_cancelled) after the read passed its task
    store.replace_gold(5, [(1, 10, ["positive"]), (3, 12, ["positive"]), (4, 13, ["negative"])], read_since)
    assert store.gold(5) == {11: ["negative"], 13: ["negative"]}
    store.set_gold(5, 1, 10, ["negative"])  # an annotation gone once may come back (updated) later
    store.replace_gold(5, [(1, 10, ["negative"]), (2, 11, ["negative"]), (4, 13, ["negative"])], time.time())
    assert store.gold(5) == {10: ["negative"], 11: ["negative"], 13: ["negative"]}
    records = [TaskRecord(10, "a", ("positive",), 1), TaskRecord(11, "b", (), None),
               TaskRecord(14, "c", ("positive",), 9)]
    items, _ = build_items(records, {10: ["negative"], 11: ["negative"]})  # the reconciled gold decides
    assert [(it.item_id, it.human_label) for it in items] == [("10", "negative"), ("11", "negative"), ("14", None)]



def test_a_deletion_event_without_annotations_is_answered(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """Converting an annotation to a draft deletes it before Label Studio 1.23 serialises the event, so where
    its webhook batching flag is off the ``ANNOTATIONS_DELETED`` event carries only its action (no project, no
    ids; with the flag on, the default, nothing is sent). The backend answered it 400. Nothing can be done
    with it but to say so: the next job's read of the project drops the label (``replace_gold``)."""
    with serve(make_app(tmp_path, fake_llm)) as client:
        resp = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED"})
        assert resp.status_code == 200, resp.text  # 400 before
        assert resp.json()["status"] == "ignored", resp.json()
        resp = client.post("/webhook", json={"action": "ANNOTATION_CREATED"})
        assert resp.status_code == 400, resp.text  # an event that must name its project still does


@pytest.mark.ls
def test_a_label_added_to_the_config_relabels_the_project(label_studio: LabelStudioServer, tmp_path: Path,
                                                         fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """People add a class to a project's labels after FreeAL labelled it. Every job then failed for good (the
    run "holds a run with labels [...]"), Retrieve Predictions sent no task (each held FreeAL's version) and
    the README said to delete the backend's state by hand. Label Studio's next /setup must start a job that sets
    the old run aside (kept) and labels every task with the new label set."""
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    app = make_app(tmp_path, fake_llm, auto_job=True)
    store = app.extensions["freeal"].store
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    three = SENTIMENT.replace('<Choice value="negative"/>', '<Choice value="negative"/><Choice value="neutral"/>')
    texts = [r["text"] for r in shared_rows("sst2", n=12)]

    def retrieve_and_wait(pid: int) -> dict[str, Any]:
        after = time.time()
        ls.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            row = store.status(pid) or {}
            if row.get("state") in ("done", "failed") and (row.get("finished") or 0.0) > after:
                return row
            time.sleep(0.3)
        pytest.fail(f"no job of project {pid} ended within 240 s: {store.status(pid)}")

    with serve(app) as client:
        pid = ls.projects.create(title="label added", label_config=SENTIMENT).id
        ls.projects.import_tasks(id=pid, request=[{"text": t} for t in texts])
        ls.ml.create(url=f"http://127.0.0.1:{client.base_url.port}", project=pid, title="FreeAL",
                     extra_params={"rounds": 1})
        first = retrieve_and_wait(pid)
        assert first["state"] == "done", first["message"]
        ls.projects.update(id=pid, label_config=three)
        second = retrieve_and_wait(pid)
        shown = {int(t.id): [p if isinstance(p, dict) else p.model_dump() for p in t.predictions or []]
                 for t in ls.tasks.list(project=pid, fields="all", page_size=100)}
    assert second["state"] == "done", second["message"]
    assert "label set changed" in second["message"] and str(tmp_path) not in second["message"]
    state = Store(tmp_path / f"project-{pid}" / "state.sqlite")
    try:
        assert sorted(state.get_meta("labels")) == ["negative", "neutral", "positive"]
    finally:
        state.close()
    aside = list(tmp_path.glob(f"project-{pid}.*"))
    assert len(aside) == 1 and (aside[0] / "state.sqlite").exists()  # the earlier run is kept, not deleted
    versions = {p["model_version"] for preds in shown.values() for p in preds}
    assert versions == {second["model_version"]} != {first["model_version"]}, versions
    assert all(len(preds) == 1 for preds in shown.values()) and len(shown) == len(texts)
    labels = {c for preds in shown.values() for r in preds[0]["result"] if r["type"] == "choices"
              for c in r["value"]["choices"]}
    assert labels <= {"negative", "neutral", "positive"}, labels
