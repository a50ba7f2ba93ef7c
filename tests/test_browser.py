"""Headless Chromium against the real Label Studio: the review tab lists the flagged tasks and a flagged
task shows the FreeAL cue in the labeling UI. Screenshots go to ``tests/artifacts/``.

FreeAL results are given here (the algorithm is tested elsewhere); they are pushed through the same
``push_results`` the background job uses, so what the browser shows is what users get.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk import LabelStudio

from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.push import push_results
from freeal_backend.labelstudio.review_tab import ReviewTab
from freeal_backend.labelstudio.label_config import parse_label_config
from freeal_backend.labelstudio.client import (AUDIT_VIEW_TITLE, REVIEW_VIEW_TITLE, Connection, ProjectClient,
                                              is_review_view_title)
from freeal_backend.records import ItemResult
from tests.fixtures_ls import LabelStudioServer

pytestmark = [pytest.mark.browser, pytest.mark.ls]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
N_TASKS = 12


def _results(task_ids: list[int]) -> list[ItemResult]:
    out = []
    for i, tid in enumerate(task_ids):
        flagged = i % 4 == 1
        out.append(ItemResult(
            str(tid), "positive", 0.55 if flagged else 0.9 + i / 1000,
            {"positive": 0.55 if flagged else 0.9, "negative": 0.45 if flagged else 0.1},
            suspicious=flagged, reasons=["slm_overrules_llm"] if flagged else [],
            suggested_label="negative" if flagged else None, llm_label="positive", slm_label="negative",
            round=1, source="llm", audit=i % 3 == 0))  # audit tasks, flagged (i = 9) and not
    return out


@pytest.fixture(scope="module")
def flagged_project(label_studio: LabelStudioServer) -> tuple[int, int, list[int]]:
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="FreeAL browser", label_config=(ROOT / "label_config/review.xml").read_text())
    rows = [json.loads(line) for _, line in zip(range(N_TASKS), (ROOT.parent / "shared/data/sst2/train.jsonl").open())]
    client.projects.import_tasks(id=project.id, request=[{"text": r["text"]} for r in rows])
    pc = ProjectClient(Connection(label_studio.url, label_studio.token), project.id)
    cfg = parse_label_config(pc.label_config())
    ids = sorted(t.task_id for t in pc.iter_tasks(cfg))
    results = _results(ids)
    push_results(pc, cfg, results, "freeal-r1-browser0")
    pc.upsert_audit_view("freeal-r1-browser0", sum(r.audit for r in results))
    view = next(v for v in client.views.list(project=project.id) if is_review_view_title(v.data.get("title")))
    return project.id, int(view.id), [int(r.item_id) for r in results if r.suspicious]


def test_review_view_and_flag_in_labeling_ui(label_studio: LabelStudioServer,
                                             flagged_project: tuple[int, int, list[int]]) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import expect

    pid, view_id, flagged = flagged_project
    ARTIFACTS.mkdir(exist_ok=True)
    with logged_in_page(label_studio) as page:

        page.goto(f"{label_studio.url}/projects/{pid}/data?tab={view_id}")
        expect(page.get_by_text(REVIEW_VIEW_TITLE).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text(f"Tasks: {len(flagged)} / {N_TASKS}")).to_be_visible(timeout=60_000)
        rows = page.locator(".lsf-table__row-wrapper")
        expect(rows).to_have_count(len(flagged))
        shown_ids = sorted(int(rows.nth(i).locator(".lsf-table__cell").nth(1).inner_text().strip())
                           for i in range(len(flagged)))
        assert shown_ids == sorted(flagged)
        page.screenshot(path=str(ARTIFACTS / "review_view.png"), full_page=True)

        page.goto(f"{label_studio.url}/projects/{pid}/data?tab={view_id}&task={flagged[0]}")
        expect(page.get_by_text("NEEDS REVIEW").first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Suggested label: negative").first).to_be_visible()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "flagged_task.png"), full_page=True)

    # the UI did not rewrite the tab: it still lists exactly the flagged tasks
    pc = ProjectClient(Connection(label_studio.url, label_studio.token), pid)
    assert sorted(pc.view_task_ids(view_id)) == sorted(flagged)


def test_audit_view_loads_in_the_data_manager(label_studio: LabelStudioServer,
                                              flagged_project: tuple[int, int, list[int]]) -> None:
    """The audit tab (its filter, order and hidden prediction columns) loads in Label Studio 1.23's UI and
    lists exactly the audit tasks, a flagged one among them (both markers in one prediction); an audit task
    opens blind: the note says why, and nothing is pre-filled where another task shows the model's choices."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import expect

    pid, review_tab, flagged = flagged_project
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    view = next(v for v in client.views.list(project=pid) if str(v.data.get("title")).startswith(AUDIT_VIEW_TITLE))
    pc = ProjectClient(Connection(label_studio.url, label_studio.token), pid)
    audit = pc.view_task_ids(int(view.id))
    ids = sorted(int(t.id) for t in client.tasks.list(project=pid, fields="task_only", page_size=100))
    assert audit == [tid for i, tid in enumerate(ids) if i % 3 == 0] and set(audit) & set(flagged)
    with logged_in_page(label_studio) as page:
        page.goto(f"{label_studio.url}/projects/{pid}/data?tab={view.id}")
        expect(page.get_by_text(AUDIT_VIEW_TITLE).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text(f"Tasks: {len(audit)} / {N_TASKS}")).to_be_visible(timeout=60_000)
        expect(page.locator(".lsf-table__row-wrapper")).to_have_count(len(audit))
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "audit_view.png"), full_page=True)
        def checked() -> list[str]:
            return [name for name in ("positive", "negative", "Needs review", "OK")
                    if page.get_by_role("checkbox", name=re.compile(f"^{name}")).is_checked()]

        other = next(tid for tid in flagged if tid not in audit)  # not audited: its prediction is pre-filled
        page.goto(f"{label_studio.url}/projects/{pid}/data?tab={review_tab}&task={other}")
        expect(page.get_by_text("NEEDS REVIEW").first).to_be_visible(timeout=60_000)
        # the choices render after the note: on a loaded machine they were not checked yet (seen failing)
        expect(page.get_by_role("checkbox", name=re.compile("^positive"))).to_be_checked(timeout=30_000)
        assert checked() == ["positive", "Needs review"]
        page.goto(f"{label_studio.url}/projects/{pid}/data?tab={view.id}&task={audit[0]}")
        expect(page.get_by_text("FreeAL: audit task").first).to_be_visible(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "audit_task.png"), full_page=True)
        assert checked() == []  # blind: neither the label nor the flag is pre-filled
    assert pc.view_task_ids(int(view.id)) == audit  # the UI did not rewrite the tab


@contextmanager
def logged_in_page(label_studio: LabelStudioServer) -> Iterator[Any]:
    """A headless Chromium page (1440 x 900) logged in to the test Label Studio; closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            _login(page, label_studio)
            yield page
        finally:
            browser.close()


def _login(page: Any, label_studio: LabelStudioServer) -> None:
    page.goto(f"{label_studio.url}/user/login/")
    page.fill("input[name=email]", label_studio.username)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url)


def test_review_tab_title_shows_the_running_job(label_studio: LabelStudioServer,
                                                flagged_project: tuple[int, int, list[int]], tmp_path: Path) -> None:
    """While a job runs the tab reads "FreeAL: needs review (3) · round 1/2, 43%"; when it ends, the count only.
    The backend keeps finding the same tab by its prefix (no second tab).

    Label Studio 1.23 cuts a tab's visible title at about 16 characters ("FreeAL: needs r…"); the whole title
    is the tab's tooltip (its ``title`` attribute), which is what is checked here."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import expect

    pid, view_id, flagged = flagged_project
    jobs = JobStore(tmp_path / "backend.sqlite")
    jobs.claim(pid, "me", stale_s=60)
    jobs.update(pid, "me", state="running", round=1, rounds=2, flagged=len(flagged), stage="llm_r1", done=43, total=100)
    pc = ProjectClient(Connection(label_studio.url, label_studio.token), pid)
    tab = ReviewTab(pc, jobs, pid, "me", every_s=5)
    running = f"{REVIEW_VIEW_TITLE} ({len(flagged)}) · round 1/2, 43%"
    tab.show(force=True)
    assert jobs.status(pid)["view_id"] == view_id
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    titles = [(v.data or {}).get("title") for v in client.views.list(project=pid)]
    assert titles.count(running) == 1 and sum(map(is_review_view_title, titles)) == 1
    with logged_in_page(label_studio) as page:
        page.goto(f"{label_studio.url}/projects/{pid}/data?tab={view_id}")
        expect(page.locator(f'[role=tab][title="{running}"]')).to_be_visible(timeout=60_000)
        page.screenshot(path=str(tmp_path / "review_tab_running.png"))
        jobs.update(pid, "me", state="done")
        tab.show(force=True, final=True)
        page.reload()
        final = f"{REVIEW_VIEW_TITLE} ({len(flagged)})"
        expect(page.locator(f'[role=tab][title="{final}"]')).to_be_visible(timeout=60_000)
        page.screenshot(path=str(tmp_path / "review_tab_done.png"))
    assert pc.upsert_review_view() == view_id  # found again by its prefix
    assert sorted(pc.view_task_ids(view_id)) == sorted(flagged)  # retitling kept the filters
    jobs.close()
