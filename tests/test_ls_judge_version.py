"""Judge another model version's predictions in Label Studio (the project option ``judge_version``).

The backend runs against a real Label Studio and an LLM endpoint that records every request
(``tests/fake_openai.py``): a judge job must leave that log empty. The small model judges the other
version's labels, the job pushes its own FreeAL version and fills the review tab; a task without a
prediction of that version counts as unanswered, changed predictions are judged afresh, and a version no
task carries fails the job with the versions the project has.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from label_studio_sdk import LabelStudio

from freeal_backend.config import Settings
from freeal_backend.labelstudio.client import AUDIT_VIEW_TITLE, Connection, ProjectClient, version_labels
from freeal_backend.labelstudio.label_config import parse_task_config
from freeal_backend.labelstudio.label_results import FLAG_SUSPICIOUS, audit_marker
from freeal_backend.loop import IMPORTED, FreeALRun
from freeal_backend.records import Item
from freeal_backend.spans import Span, encode_spans
from freeal_backend.storage import Store
from tests.fake_openai import MODEL, FakeOpenAI
from tests.fixtures_llm import shared_rows
from tests.fixtures_ls import LabelStudioServer
from tests.test_ls_e2e import ROOT, BackendServer, choice_of, flag_of, review_view_ids, serve_backend, wait_job

OTHER, DECOY = "other-model-v1", "other-model-v2"
N_TASKS = 200
NO_PREDICTION = 4  # the last tasks have no prediction of OTHER
FLIP = {"subjective": "objective", "objective": "subjective"}
# review.xml with SUBJ's classes: a small model trained briefly on 200 of these texts judges their labels "ok"
# (on 60-100 SST-2 or 80 SUBJ texts it came out near chance, which flags every task: nothing kept to compare)
SUBJ_CONFIG = ((ROOT / "label_config/review.xml").read_text()
               .replace('"positive"', '"subjective"').replace('"negative"', '"objective"'))


def choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def span_regions(text: str, spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"from_name": "label", "to_name": "text", "type": "labels",
             "value": {"start": s["start"], "end": s["end"], "text": text[s["start"]:s["end"]], "labels": [s["label"]]}}
            for s in spans]


# parsing a prediction and keeping the run's round 0 in step (no Label Studio) --------------------------------
def test_version_labels_reads_the_latest_prediction_of_that_version_only() -> None:
    cfg = parse_task_config(SUBJ_CONFIG)
    preds = [{"id": 1, "model_version": OTHER, "created_at": "2025-01-01T10:00:00Z", "result": choice("subjective")},
             {"id": 3, "model_version": OTHER, "updated_at": "2025-01-02T10:00:00Z", "result": choice("objective")},
             {"id": 4, "model_version": DECOY, "created_at": "2025-01-03T10:00:00Z", "result": choice("subjective")}]
    assert version_labels(cfg, preds, OTHER) == ["objective"]
    assert version_labels(cfg, preds, "absent") is None
    assert version_labels(cfg, [{"model_version": OTHER, "result": choice("neutral")}], OTHER) == []  # not a label


def test_version_labels_parses_spans_like_an_annotation() -> None:
    cfg = parse_task_config((ROOT / "label_config/ner_review.xml").read_text())
    text = "Aspirin caused a rash."
    preds = [{"model_version": OTHER, "result": span_regions(text, [{"start": 0, "end": 7, "label": "Chemical"},
                                                                    {"start": 17, "end": 21, "label": "Disease"}])}]
    assert version_labels(cfg, preds, OTHER, text) == [encode_spans([Span(0, 7, "Chemical"), Span(17, 21, "Disease")])]
    assert version_labels(cfg, [{"model_version": OTHER, "result": []}], OTHER, text) == ["[]"]  # "no entity"


def test_round0_labels_of_the_other_kind_and_changed_imports_are_dropped(tmp_path: Path) -> None:
    """``FreeALRun.run(llm_labels=...)`` keeps stages whose inputs it does not hash: a project that switches
    between judging and asking the LLM, or whose judged predictions changed, must not keep the old round 0."""
    items = [Item(k, f"text {k}") for k in ("1", "2", "3")]
    with FreeALRun(Settings(data_dir=tmp_path), ["objective", "subjective"], tmp_path / "run") as run:
        store = run.store
        store.add_annotation("llm_r0", "1", "subjective", 0.9, {}, "subjective", None)  # asked of the LLM
        store.add_annotation("llm_r0", "2", "objective", None, {}, IMPORTED, None)
        store.add_annotation("llm_r0", "3", None, None, {}, IMPORTED, None)
        store.mark_stage("slm_r1")
        run._import_llm_labels(items, {"1": "subjective", "2": "objective", "3": None})  # judged: the LLM's goes
        assert store.annotations("llm_r0")["1"]["raw"] == IMPORTED and store.stage_done("slm_r1") is None
        store.mark_stage("slm_r1")
        run._import_llm_labels(items, {"1": "subjective", "2": "objective", "3": None})  # the same: verdict stands
        assert store.stage_done("slm_r1") is not None
        run._import_llm_labels(items, {"1": "subjective", "2": "subjective", "3": None})  # the prediction changed
        assert store.annotations("llm_r0")["2"]["label"] == "subjective" and store.stage_done("slm_r1") is None
        store.add_annotation("llm_r0", "4", "subjective", 0.9, {}, "subjective", None)
        store.mark_stage("slm_r1")
        run._import_llm_labels(items, None)  # back to asking the LLM: imported labels are no LLM answers
        assert sorted(store.annotations("llm_r0")) == ["4"] and store.stage_done("slm_r1") is None


# against a real Label Studio ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge_backend(label_studio: LabelStudioServer, fake_llm: FakeOpenAI,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    """The backend, its small model quick to train (2 folds, 2 layers, 4 epochs): a judge job on 200 SUBJ texts
    takes well under a minute here, and the verdict on their labels is "ok" (some flagged, most kept)."""
    with serve_backend(tmp_path_factory.mktemp("judge-backend"), label_studio, LLM_BASE_URL=fake_llm.base_url,
                       LLM_MODEL=MODEL, FREEAL_SLM_EPOCHS="4", FREEAL_SLM_WARMUP="1", FREEAL_SLM_FOLDS="2",
                       FREEAL_SLM_TRAIN_LAYERS="2", FREEAL_SLM_BATCH="16", WORKERS="1", THREADS="4") as server:
        yield server


def run_job(client: LabelStudio, ml_id: int, backend: BackendServer, pid: int) -> dict[str, Any]:
    """"Start Training" in Label Studio, then wait for the job it starts to end (done or failed)."""
    before = httpx.get(f"{backend.url}/status/{pid}", timeout=30)
    finished = (before.json().get("finished") or 0.0) if before.status_code == 200 else 0.0
    client.ml.train(id=ml_id)
    return wait_job(backend, pid, finished_after=finished)


def by_version(client: LabelStudio, pid: int) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Per task, its predictions by model version."""
    out: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for task in client.tasks.list(project=pid, fields="all", page_size=100):
        out[int(task.id)] = {}
        for pred in task.predictions or []:
            pred = pred if isinstance(pred, dict) else pred.model_dump()
            out[int(task.id)].setdefault(pred["model_version"], []).append(pred)
    return out


def check_judged(client: LabelStudio, backend: BackendServer, pid: int, status: dict[str, Any],
                 other: dict[int, str]) -> None:
    """The small model judged exactly ``other``'s labels (task -> label; a task without one unanswered). FreeAL's
    version holds one prediction per task; a kept label is ``other``'s, a task without one is flagged, and the
    review tab lists exactly the flagged tasks."""
    assert status["state"] == "done", status
    version = status["model_version"]
    assert re.fullmatch(r"freeal-r0-[0-9a-f]{8}(-[0-9a-f]{6})?", version), version
    preds = by_version(client, pid)
    flagged = {}
    for tid, versions in preds.items():
        assert len(versions.get(version, [])) == 1, (tid, versions)
        mine = versions[version][0]
        flagged[tid] = flag_of(mine) == FLAG_SUSPICIOUS
        notes = [t for r in mine["result"] if r["type"] == "textarea" for t in r["value"]["text"]]
        assert notes and "the LLM" not in notes[0], notes  # no LLM gave these labels: the note names who did
        if tid not in other:
            assert flagged[tid], (tid, mine)  # nothing to judge: unanswered, flagged
            assert f"model version {OTHER!r} gave no usable label" in notes[0], notes
        elif not flagged[tid]:
            assert choice_of(mine) == other[tid], (tid, mine, other[tid])
    assert any(not f for tid, f in flagged.items() if tid in other), status["message"]  # not all flagged
    assert review_view_ids(client, pid) == {tid for tid, f in flagged.items() if f}
    assert status["flagged"] == sum(flagged.values())
    assert client.projects.get(id=pid).model_version == version
    store = Store(backend.data_dir / f"project-{pid}" / "state.sqlite")
    try:
        assert {int(k): r.llm_label for k, r in store.results().items()} == {t: other.get(t) for t in preds}
    finally:
        store.close()


def subj_project(client: LabelStudio, title: str) -> tuple[int, dict[int, str]]:
    """A project of ``N_TASKS`` SUBJ texts; its id and each task's gold label."""
    pid = client.projects.create(title=title, label_config=SUBJ_CONFIG).id
    rows = shared_rows("subj", n=N_TASKS)
    client.projects.import_tasks(id=pid, request=[{"text": r["text"]} for r in rows])
    label_of = {r["text"]: r["label"] for r in rows}
    return pid, {int(t.id): label_of[t.data["text"]]
                 for t in client.tasks.list(project=pid, fields="task_only", page_size=100)}


@pytest.mark.ls
def test_judge_version_judges_another_models_predictions_without_the_llm(
        label_studio: LabelStudioServer, judge_backend: BackendServer, fake_llm: FakeOpenAI) -> None:
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    pid, gold = subj_project(client, "judge a version")
    task_ids = sorted(gold)
    # the other model: right but for every 7th task; none for the last few; a decoy version says the opposite
    other = {tid: FLIP[gold[tid]] if i % 7 == 3 else gold[tid] for i, tid in enumerate(task_ids[:-NO_PREDICTION])}
    client.projects.import_predictions(id=pid, request=[{"task": t, "result": choice(lab), "model_version": OTHER,
                                                         "score": 0.9} for t, lab in other.items()])
    client.projects.import_predictions(id=pid, request=[{"task": t, "result": choice(FLIP[lab]), "model_version": DECOY}
                                                        for t, lab in other.items()])

    ml = client.ml.create(url=judge_backend.url, project=pid, title="FreeAL judge",
                          extra_params={"judge_version": OTHER, "rounds": 2})  # rounds do not apply: no LLM round
    # "Retrieve predictions" before any job: /predict must not ask the LLM about tasks it has not seen either
    client.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
    assert fake_llm.log == []
    status = run_job(client, ml.id, judge_backend, pid)
    check_judged(client, judge_backend, pid, status, other)
    assert status["message"].startswith(
        f"judged the predictions of model version {OTHER!r} with no LLM call: {N_TASKS} tasks, "
        f"{NO_PREDICTION} without one (counted as unanswered); {N_TASKS} tasks labelled"), status["message"]
    assert "requests failed" not in status["message"]
    counts = ProjectClient(Connection(label_studio.url, label_studio.token), pid).model_versions()
    assert counts[OTHER] == counts[DECOY] == N_TASKS - NO_PREDICTION  # the judged versions are left as they were
    assert fake_llm.log == []

    # the other model's predictions change (newer ones for a few tasks, one for a task that had none): judged afresh
    changed = {t: FLIP[other[t]] for t in task_ids[:5]}
    newly = task_ids[-NO_PREDICTION]
    changed[newly] = gold[newly]
    client.projects.import_predictions(id=pid, request=[{"task": t, "result": choice(lab), "model_version": OTHER}
                                                        for t, lab in changed.items()])
    other2 = {**other, **changed}
    status2 = run_job(client, ml.id, judge_backend, pid)
    assert status2["model_version"] != status["model_version"]  # the verdict on the new labels was pushed
    check_judged(client, judge_backend, pid, status2, other2)
    assert f"{N_TASKS} tasks, {NO_PREDICTION - 1} without one" in status2["message"], status2["message"]
    assert fake_llm.log == []

    # a version no task carries, and one of FreeAL's own: the job fails and says why
    # (Label Studio 1.23 answers 500 to an update without url and project: its health check and /setup want them)
    client.ml.update(id=ml.id, url=judge_backend.url, project=pid, extra_params={"judge_version": "no-such-model"})
    failed = run_job(client, ml.id, judge_backend, pid)
    assert failed["state"] == "failed", failed
    assert "'no-such-model'" in failed["message"] and repr(OTHER) in failed["message"], failed["message"]
    assert repr(DECOY) in failed["message"] and repr(status2["model_version"]) in failed["message"]
    client.ml.update(id=ml.id, url=judge_backend.url, project=pid,
                     extra_params={"judge_version": status2["model_version"]})
    failed2 = run_job(client, ml.id, judge_backend, pid)
    assert failed2["state"] == "failed" and "is a FreeAL version" in failed2["message"], failed2
    assert fake_llm.log == []


@pytest.mark.ls
def test_judge_version_judges_span_predictions(label_studio: LabelStudioServer, judge_backend: BackendServer,
                                               fake_llm: FakeOpenAI) -> None:
    """A span (NER) project: the other version's entities are kept as they are, each scored and flagged or
    not; a sentence without a prediction of that version is flagged with the small model's spans."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="judge spans",
                                     label_config=(ROOT / "label_config/ner_review.xml").read_text())
    pid = project.id
    rows = shared_rows("bc5cdr", n=40, stride=37)
    client.projects.import_tasks(id=pid, request=[{"text": r["text"]} for r in rows])
    tasks = {int(t.id): t.data["text"] for t in client.tasks.list(project=pid, fields="task_only", page_size=100)}
    spans_of = {r["text"]: r["spans"] for r in rows}
    judged = sorted(tasks)[:-2]
    other = {t: sorted((s["start"], s["end"], s["label"]) for s in spans_of[tasks[t]]) for t in judged}
    client.projects.import_predictions(id=pid, request=[{"task": t, "model_version": OTHER,
                                                         "result": span_regions(tasks[t], spans_of[tasks[t]])}
                                                        for t in judged])
    ml = client.ml.create(url=judge_backend.url, project=pid, title="FreeAL judge",
                          extra_params={"judge_version": OTHER})
    status = run_job(client, ml.id, judge_backend, pid)
    assert status["state"] == "done", status
    assert status["message"].startswith(f"judged the predictions of model version {OTHER!r} with no LLM call: "
                                        f"{len(tasks)} tasks, 2 without one"), status["message"]
    version = status["model_version"]
    flagged = set()
    for tid, versions in by_version(client, pid).items():
        assert len(versions.get(version, [])) == 1, (tid, versions)
        mine = versions[version][0]
        if flag_of(mine) == FLAG_SUSPICIOUS:
            flagged.add(tid)
        if tid in other:
            assert sorted((r["value"]["start"], r["value"]["end"], r["value"]["labels"][0])
                          for r in mine["result"] if r["type"] == "labels") == other[tid]
    assert set(tasks) - set(judged) <= flagged
    assert review_view_ids(client, pid) == flagged and status["flagged"] == len(flagged)
    assert fake_llm.log == []


def audit_view_ids(client: LabelStudio, pid: int) -> set[int]:
    views = [v for v in client.views.list(project=pid) if str((v.data or {}).get("title")).startswith(AUDIT_VIEW_TITLE)]
    assert len(views) == 1
    return {int(t.id) for t in client.tasks.list(project=pid, view=views[0].id, fields="task_only", page_size=100)}


def judge_with_audit(client: LabelStudio, backend: BackendServer, pid: int, size: int
                     ) -> tuple[int, dict[str, Any], set[int]]:
    """Connect the backend to judge ``OTHER`` with an audit of ``size`` tasks and run its first job: the ML
    backend's id, the job's status and the audit tab's tasks (exactly ``size`` of them)."""
    ml = client.ml.create(url=backend.url, project=pid, title="FreeAL judge",
                          extra_params={"judge_version": OTHER, "audit": size})
    status = run_job(client, ml.id, backend, pid)
    assert status["state"] == "done", status
    sample = audit_view_ids(client, pid)
    assert len(sample) == size
    return ml.id, status, sample


@pytest.mark.ls
def test_audit_tab_and_blind_audit_labels_measure_the_judged_labels(
        label_studio: LabelStudioServer, judge_backend: BackendServer, fake_llm: FakeOpenAI) -> None:
    """The project option ``audit``: a tab of that many random tasks; people's labels on them are kept from the
    small model and say how many of the judged labels are right (here the other model is wrong on every 4th)."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    pid, gold = subj_project(client, "audit")
    other = {tid: FLIP[gold[tid]] if i % 4 == 1 else gold[tid] for i, tid in enumerate(sorted(gold))}
    client.projects.import_predictions(id=pid, request=[{"task": t, "result": choice(lab), "model_version": OTHER}
                                                        for t, lab in other.items()])
    ml_id, status, sample = judge_with_audit(client, judge_backend, pid, 30)
    mine = {tid: versions[status["model_version"]][0] for tid, versions in by_version(client, pid).items()}
    assert {tid for tid, pred in mine.items() if audit_marker(status["model_version"]) in str(pred["result"])} == sample
    assert all(pred["result"][0]["value"]["choices"] == [] for tid, pred in mine.items() if tid in sample)  # blind
    assert all(choice_of(pred) in FLIP for tid, pred in mine.items() if tid not in sample)

    audited = sorted(sample)[:24]  # a person labels 24 of them (the truth)
    for tid in audited:
        client.annotations.create(id=tid, result=choice(gold[tid]))
    status2 = run_job(client, ml_id, judge_backend, pid)
    assert status2["state"] == "done", status2
    right = sum(other[t] == gold[t] for t in audited)
    assert f"a random audit of 24 tasks found {right} of the LLM labels right" in status2["message"], status2
    assert audit_view_ids(client, pid) == sample - set(audited)  # the tab shrinks as people audit
    mine = {tid: versions[status2["model_version"]][0] for tid, versions in by_version(client, pid).items()}
    assert all(choice_of(mine[t]) == gold[t] for t in audited)  # once labelled, the person's label shows
    assert all(mine[t]["result"][0]["value"]["choices"] == [] for t in sample - set(audited))
    store = Store(judge_backend.data_dir / f"project-{pid}" / "state.sqlite")
    try:  # blind: the small model never trained on the audit labels; the output keeps the person's label
        assert not any(it.human_label for it in store.items())
        results = store.results()
        assert all(results[str(t)].source == "human" and results[str(t)].label == gold[t] for t in audited)
        assert store.get_meta("health_r1")["audit"]["audited"] == 24
    finally:
        store.close()
    assert fake_llm.log == []


@pytest.mark.ls
def test_audit_of_a_span_project(label_studio: LabelStudioServer, judge_backend: BackendServer,
                                 fake_llm: FakeOpenAI) -> None:
    """Spans through the same audit: the tab lists the audit sentences; once people give their entities, the
    job's message counts the judged entity lists that equal them."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    config = (ROOT / "label_config/ner_review.xml").read_text()
    pid = client.projects.create(title="audit spans", label_config=config).id
    rows = shared_rows("bc5cdr", n=40, stride=37)
    client.projects.import_tasks(id=pid, request=[{"text": r["text"]} for r in rows])
    tasks = {int(t.id): t.data["text"] for t in client.tasks.list(project=pid, fields="task_only", page_size=100)}
    spans_of = {r["text"]: r["spans"] for r in rows}
    other = {t: spans_of[tasks[t]][1:] if i % 3 == 0 else spans_of[tasks[t]] for i, t in enumerate(sorted(tasks))}
    client.projects.import_predictions(id=pid, request=[{"task": t, "model_version": OTHER, "result": span_regions(
        tasks[t], s)} for t, s in other.items()])
    ml_id, first, sample = judge_with_audit(client, judge_backend, pid, 20)
    version = first["model_version"]
    shown = {tid: [r for pred in versions.get(version, []) for r in pred["result"] if r["type"] == "labels"]
             for tid, versions in by_version(client, pid).items()}
    assert not any(shown[t] for t in sample) and any(shown.values())  # blind: no entity of the machine's
    for tid in sample:
        client.annotations.create(id=tid, result=span_regions(tasks[tid], spans_of[tasks[tid]]))
    status = run_job(client, ml_id, judge_backend, pid)
    right = sum(other[t] == spans_of[tasks[t]] for t in sample)
    assert f"a random audit of 20 tasks found {right} of the LLM entity lists right" in status["message"], status
    assert audit_view_ids(client, pid) == set()
    assert fake_llm.log == []
