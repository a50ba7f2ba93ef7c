"""Spans (NER) end to end against a real Label Studio 1.23 and the real backend under gunicorn: connect,
"Retrieve predictions", the background FreeAL job, span regions whose offsets are checked against every
task's text, the review tab, a person's spans used as gold, and a headless-Chromium screenshot of a
flagged task with its highlighted spans.

The LLM is the deterministic OpenAI-compatible fake server (``tests/fake_openai.py``, over HTTP through
the real ``openai`` client): the embedded 135M model writes too few usable entity lists for a check of
the plumbing (its span quality is measured in ``benchmarks/ner_loop.py``).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from label_studio_sdk import LabelStudio

from freeal_backend.labelstudio.client import is_review_view_title
from freeal_backend.labelstudio.label_results import review_marker
from freeal_backend.storage import Store
from tests.fake_openai import MODEL, FakeOpenAI
from tests.fixtures_ls import LabelStudioServer
from tests.fixtures_llm import shared_rows
from tests.test_browser import CHROMIUM, logged_in_page
from tests.test_ls_e2e import ARTIFACTS, ROOT, BackendServer, serve_backend, wait_job

pytestmark = pytest.mark.ls

TYPES = {"Chemical", "Disease"}
# offsets must survive emoji (outside the BMP), CRLF, tabs, repeated spaces and combining marks
HARD_TEXTS = [
    "Patients on lidocaine \U0001F600 developed\r\nhepatitis\tand  anemia after cisplatin.",
    "Cafe\u0301 owners given haloperidol had neuropathy; nicotine\u00a0withdrawal worsened anemia.",
]


@pytest.fixture(scope="module")
def span_backend(label_studio: LabelStudioServer, fake_llm: FakeOpenAI,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    with serve_backend(tmp_path_factory.mktemp("span-backend"), label_studio, LLM_BASE_URL=fake_llm.base_url,
                       LLM_MODEL=MODEL, FREEAL_ROUNDS="1", FREEAL_SLM_EPOCHS="1", FREEAL_SLM_FOLDS="2",
                       FREEAL_SHOTS="4", FREEAL_DEMOS_PER_LABEL="2", WORKERS="1", THREADS="4",
                       FREEAL_PREDICT_BUDGET_S="15") as server:
        yield server


@pytest.fixture(scope="module")
def span_project(label_studio: LabelStudioServer, span_backend: BackendServer) -> dict[str, Any]:
    """A BC5CDR project labelled by the backend: project id, texts by task id, the first pushed version."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="FreeAL spans", label_config=(ROOT / "label_config/ner_review.xml").read_text())
    pid = project.id
    texts = HARD_TEXTS + [r["text"] for r in shared_rows("bc5cdr", n=40, stride=37)]
    client.projects.import_tasks(id=pid, request=[{"text": t} for t in texts])
    ml = client.ml.create(url=span_backend.url, project=pid, title="FreeAL NER")
    assert client.ml.get(id=ml.id).state == "CO"
    client.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
    status = wait_job(span_backend, pid)
    by_id = {int(t.id): t.data["text"] for t in client.tasks.list(project=pid, fields="all", page_size=100)}
    assert sorted(by_id.values()) == sorted(texts)
    return {"pid": pid, "texts": by_id, "status": status}


def predictions(client: LabelStudio, pid: int, texts: dict[int, str], version: str) -> dict[int, dict[str, Any]]:
    """Exactly one prediction per task, of ``version``; every region's offsets checked against the task text."""
    out = {}
    for task in client.tasks.list(project=pid, fields="all", page_size=100):
        preds = [p if isinstance(p, dict) else p.model_dump() for p in task.predictions or []]
        assert len(preds) == 1 and preds[0]["model_version"] == version, (task.id, preds)
        pred = preds[0]
        text = texts[int(task.id)]
        for region in pred["result"]:
            if region["type"] != "labels":
                continue
            value = region["value"]
            assert text[value["start"]:value["end"]] == value["text"], (task.id, value)
            assert value["labels"] and set(value["labels"]) <= TYPES
            assert "score" not in region or 0.0 < region["score"] <= 1.0
        assert pred["score"] is None or 0.0 <= pred["score"] <= 1.0
        out[int(task.id)] = pred
    assert sorted(out) == sorted(texts)
    return out


def regions(pred: dict[str, Any]) -> list[tuple[int, int, str]]:
    return sorted((r["value"]["start"], r["value"]["end"], r["value"]["labels"][0])
                  for r in pred["result"] if r["type"] == "labels")


def test_span_predictions_review_tab_and_gold(label_studio: LabelStudioServer, span_backend: BackendServer,
                                              span_project: dict[str, Any]) -> None:
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    pid, texts, status = span_project["pid"], span_project["texts"], span_project["status"]
    version = status["model_version"]
    preds = predictions(client, pid, texts, version)
    assert sum(bool(regions(p)) for p in preds.values()) >= len(preds) // 2  # entities were found and pushed
    hard = {tid for tid, t in texts.items() if t in HARD_TEXTS}
    for tid in hard:  # the fake names these mentions; their offsets must be exact despite emoji and CRLF
        found = {texts[tid][s:e] for s, e, _ in regions(preds[tid])}
        assert {"lidocaine", "hepatitis", "cisplatin"} <= found or {"haloperidol", "neuropathy"} <= found, found

    # the review tab lists exactly the predictions carrying the flag marker (each flagged one has the note)
    marked = {tid for tid, p in preds.items() if p["result"] and p["result"][0].get("freeal") == review_marker(version)}
    views = [v for v in client.views.list(project=pid) if is_review_view_title((v.data or {}).get("title"))]
    assert len(views) == 1
    listed = {int(t.id) for t in client.tasks.list(project=pid, view=views[0].id, fields="task_only", page_size=100)}
    assert listed == marked and status["flagged"] == len(marked)
    for tid in marked:
        note = next(r["value"]["text"][0] for r in preds[tid]["result"] if r["from_name"] == "freeal_review")
        assert note.startswith("FreeAL: NEEDS REVIEW")

    page = httpx.get(f"{span_backend.url}/projects/{pid}", timeout=30)  # the status page knows span runs
    assert page.status_code == 200 and ("no entity" in page.text or "Chemical" in page.text)

    # a person's spans (a region in the emoji / CRLF text) arrive through the webhook as gold for the next run
    target = sorted(hard)[0]
    text = texts[target]
    start = text.index("hepatitis") if "hepatitis" in text else text.index("neuropathy")
    word = "hepatitis" if "hepatitis" in text else "neuropathy"
    human = [{"from_name": "label", "to_name": "text", "type": "labels",
              "value": {"start": start, "end": start + len(word), "text": word, "labels": ["Disease"]}}]
    client.annotations.create(id=target, result=human)
    status2 = wait_job(span_backend, pid, not_version=version)
    preds2 = predictions(client, pid, texts, status2["model_version"])
    assert regions(preds2[target]) == [(start, start + len(word), "Disease")] and preds2[target]["score"] == 1.0
    assert target not in {int(t.id) for t in client.tasks.list(project=pid, view=views[0].id, fields="task_only",
                                                                  page_size=100)}
    store = Store(span_backend.data_dir / f"project-{pid}" / "state.sqlite")
    try:
        assert json.loads(store.items()[[it.item_id for it in store.items()].index(str(target))].human_label) == \
            [[start, start + len(word), "Disease"]]
        assert store.get_meta("task_type") == "ner"
    finally:
        store.close()
    log = span_backend.log_path.read_text(errors="replace")
    assert "LS webhook action=ANNOTATION_CREATED" in log and "LS call POST /predict" in log


@pytest.mark.browser
def test_flagged_span_task_in_the_labeling_ui(label_studio: LabelStudioServer, span_project: dict[str, Any]) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import expect

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    pid = span_project["pid"]
    view = next(v for v in client.views.list(project=pid) if is_review_view_title((v.data or {}).get("title")))
    listed = [int(t.id) for t in client.tasks.list(project=pid, view=view.id, fields="all", page_size=100)]
    tasks = {int(t.id): t for t in client.tasks.list(project=pid, fields="all", page_size=100)}
    with_spans = [tid for tid in listed if any(r.get("type") == "labels" for p in tasks[tid].predictions or []
                                               for r in (p if isinstance(p, dict) else p.model_dump())["result"])]
    assert with_spans, "no flagged task with spans to show"
    tid = with_spans[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with logged_in_page(label_studio) as page:
        page.goto(f"{label_studio.url}/projects/{pid}/data?tab={view.id}&task={tid}")
        expect(page.get_by_text("NEEDS REVIEW").first).to_be_visible(timeout=60_000)
        highlighted = page.locator(".htx-highlight")
        expect(highlighted.first).to_be_visible(timeout=60_000)
        assert highlighted.count() >= 1
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "flagged_span_task.png"), full_page=True)
