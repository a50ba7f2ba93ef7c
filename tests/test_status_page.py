"""The status page, ``/status`` and ``freeal report``: numbers from the run's SQLite state, basic auth, no
server paths, HTML escaping, and headless-Chromium screenshots of the page (running and done) and the report.

The run state is written directly (the algorithm is tested elsewhere); its per-stage accuracy is checked
against the CLI's own evaluation (``FreeALRun.stage_labels`` + ``label_scores``).
"""
from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from freeal_backend.cli import main as cli_main
from freeal_backend.config import Settings
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.review_tab import ReviewTab
from freeal_backend.loop import FreeALRun
from freeal_backend.labelstudio.client import REVIEW_VIEW_TITLE
from freeal_backend.metrics import label_scores
from freeal_backend.records import Item, ItemResult
from freeal_backend.labelstudio.backend import ServerSettings
from freeal_backend.labelstudio.server import create_app
from freeal_backend.status import run_summary
from freeal_backend.storage import Store

USER, PASSWORD = "reviewer", "s3cret-pass"
EVIL_LABEL = '<script>window.__pwned=1</script>'
EVIL_TEXT = '<img src=x onerror="window.__pwned=1"> great film'
LABELS = ["positive", EVIL_LABEL]
N = 40
PID = 7


def write_run(path: Path, *, gold: bool = True) -> None:
    """A two-round run of N texts: known LLM answers per round, SLM outputs, results, health and LLM cost."""
    store = Store(path)
    store.set_meta("labels", LABELS)
    store.set_meta("data_hash", "hash0")
    store.set_meta("rounds_done", 2)
    items = [Item(str(i), EVIL_TEXT if i == 5 else f"text {i}", human_label=LABELS[0] if i == 0 else None,
                  gold=LABELS[i % 2] if gold else None) for i in range(N)]
    store.replace_items(items)
    for i in range(1, N):  # round 0: right except every 5th (wrong), item 3 unanswered
        label = None if i == 3 else (LABELS[(i + 1) % 2] if i % 5 == 1 else LABELS[i % 2])
        store.add_annotation("llm_r0", str(i), label, 0.8, {}, "raw", None)
    for rnd in (1, 2):
        store.set_slm(rnd, [(str(i), [0.7, 0.3] if i % 2 == 0 else [0.2, 0.8], 0.1, i % 5 != 1, 0.9)
                            for i in range(N)])
        store.mark_stage(f"slm_r{rnd}", {"clean": 30, "labelled": 39})
        redo = [i for i in range(1, N) if i % 5 == 1 or i == 3] if rnd == 1 else [1, 2]
        for i in redo:  # round 1 fixes its targets; round 2 breaks item 2 and leaves item 1 as it is
            store.add_annotation(f"llm_r{rnd}", str(i), LABELS[(i + (rnd == 2 and i == 2)) % 2], 0.9, {}, "raw",
                                 None)
        store.mark_stage(f"llm_r{rnd}", {"reannotated": len(redo), "demo_pool": 8})
        store.set_meta(f"health_r{rnd}", {"estimated_accuracy": 0.8 + rnd / 100, "verdict": "ok",
                                          "message": f"round {rnd} <b>looks</b> fine"})
        store.set_meta(f"round_stats_r{rnd}", {"llm": {"calls": 10 * rnd, "cache_hits": rnd, "prompt_tokens": 100,
                                                       "completion_tokens": 5}, "flagged": 4 + rnd})
    store.set_results([ItemResult(str(i), LABELS[i % 2], (i % 10) / 10 + 0.05, {}, suspicious=i % 4 == 1,
                                  reasons=["llm_slm_disagree"] if i % 4 == 1 else [], suggested_label=LABELS[0],
                                  round=2, source="human" if i == 0 else "llm") for i in range(N)])
    store.mark_stage("final", {"rounds": 2, "version": "freeal-r2-hash0000"})
    store.close()


def test_run_summary_matches_the_cli_evaluation(tmp_path: Path) -> None:
    write_run(tmp_path / "run" / "state.sqlite")
    store = Store(tmp_path / "run" / "state.sqlite")
    summary = run_summary(store)
    store.close()
    assert summary["tasks"] == N and summary["human_labelled"] == 1 and summary["rounds_done"] == 2
    assert [r["labels_changed"] for r in summary["rounds"]] == [None, 9, 1]
    assert [r["reannotated"] for r in summary["rounds"]] == [39, 9, 2]
    assert [r["flagged"] for r in summary["rounds"]] == [None, 5, 6]
    assert summary["rounds"][0]["label_counts"] == {"positive": 20, EVIL_LABEL: 19, "(none)": 1}
    assert summary["rounds"][2]["label_counts"] == {"positive": 19, EVIL_LABEL: 21}
    assert summary["final"]["flagged"] == 10 and summary["final"]["human"] == 1
    assert sum(summary["final"]["histogram"]["flagged"]) == 10
    assert sum(summary["final"]["histogram"]["not_flagged"]) == N - 1 - 10
    with FreeALRun(Settings(slm_min_steps=0, data_dir=tmp_path / "data"), LABELS, tmp_path / "run") as run:
        gold = {it.item_id: it.gold for it in run.store.items()}
        expected = {stage: label_scores(pred, gold, LABELS)["accuracy"] for stage, pred in run.stage_labels().items()}
    got = {a["stage"]: a["accuracy"] for a in summary["accuracy"]}
    assert got == pytest.approx(expected)


def test_run_summary_carries_the_review_budget(tmp_path: Path) -> None:
    """The budget is that of the stored scores: people's labels count right (whatever score was stored) and are
    never reviewed; with a target error, the review set that meets it."""
    write_run(tmp_path / "state.sqlite")
    store = Store(tmp_path / "state.sqlite")
    budget = run_summary(store)["budget"]
    aimed = run_summary(store, target_error=0.3)["budget"]
    store.close()
    machine = [(i % 10) / 10 + 0.05 for i in range(1, N)]  # write_run's scores; item 0 is a person's
    assert budget["texts"] == N and budget["reviewable"] == N - 1 and budget["target"] is None
    points = {p["k"]: p["accuracy"] for p in budget["points"]}
    assert list(points) == [0, 1, 2, 4, 8, 12, 20]  # 0, 1, 2, 5, 10, 20, 30, 50 % of 40 texts
    assert points[0] == pytest.approx((1 + sum(machine)) / N)
    assert points[4] == pytest.approx((1 + 4 + sum(sorted(machine)[4:])) / N)  # the 4 lowest now right
    assert budget["sentence"].startswith("review the 4 least-confident tasks and about "
                                         f"{100 * points[4]:.1f} %")
    assert aimed["target"]["target_error"] == 0.3 and 1 - aimed["target"]["accuracy"] <= 0.3
    expected_k = next(k for k in range(N) if (1 + k + sum(sorted(machine)[k:])) / N >= 0.7)
    assert aimed["target"]["k"] == expected_k


def test_state_files_from_before_the_new_columns_are_upgraded(tmp_path: Path) -> None:
    import json
    import sqlite3

    old = sqlite3.connect(str(tmp_path / "state.sqlite"))
    old.execute("CREATE TABLE results (item_id TEXT PRIMARY KEY, record TEXT NOT NULL)")
    old.execute("INSERT INTO results VALUES ('1', ?)", (json.dumps(
        {"item_id": "1", "label": "positive", "confidence": 0.4, "suspicious": True, "source": "llm"}),))
    old.execute("CREATE TABLE jobs (project_id INTEGER PRIMARY KEY, state TEXT NOT NULL, stage TEXT, done INTEGER,"
                " total INTEGER, round INTEGER, rounds INTEGER, message TEXT, model_version TEXT, flagged INTEGER,"
                " tasks INTEGER, owner TEXT, heartbeat REAL, rerun INTEGER NOT NULL DEFAULT 0, started REAL,"
                " finished REAL)")
    old.commit()
    old.close()
    store = Store(tmp_path / "state.sqlite")
    assert store.query("SELECT label, confidence, suspicious, source FROM results") == [("positive", 0.4, 1, "llm")]
    store.close()
    jobs = JobStore(tmp_path / "state.sqlite")
    jobs.claim(1, "me", stale_s=60)
    jobs.update(1, "me", stage="llm_r0", done=1, total=2, view_id=4)
    assert jobs.status(1)["view_id"] == 4 and jobs.status(1)["stage_done0"] == 1
    jobs.close()


# the HTTP side ----------------------------------------------------------------------------------------------
def auth(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def make_backend(tmp_path: Path, *, state: str, target_error: float | None = None,
                 extra_params: dict[str, Any] | None = None, target_confidence: float | None = None) -> Flask:
    """A backend with one project whose job is ``running`` (round 2 of 2, 43/100) or ``done``."""
    data = tmp_path / "data"
    write_run(data / f"project-{PID}" / "state.sqlite", gold=False)
    app = create_app(Settings(slm_min_steps=0, data_dir=data, target_error=target_error,
                              target_confidence=target_confidence),
                     ServerSettings(basic_auth_user=USER, basic_auth_pass=PASSWORD, auto_job=False))
    jobs: JobStore = app.extensions["freeal"].store
    jobs.save_project(PID, label_config="<View/>", extra_params=extra_params or {}, ls_url="http://ls.example:8080",
                      ls_key="k")
    jobs.claim(PID, "me", stale_s=60)
    jobs.update(PID, "me", state="running", rounds=2, round=2, tasks=N, flagged=10, view_id=3)
    jobs.update(PID, "me", stage="llm_r2", done=10, total=100)
    jobs._db.execute("UPDATE jobs SET stage_started = stage_started - 30")  # 30 s into the stage
    jobs.update(PID, "me", stage="llm_r2", done=43, total=100)
    if state == "done":
        jobs.finish(PID, "me", "done", f"{N} tasks labelled, 10 flagged for review")
    return app


class _Cells(HTMLParser):
    """Text of elements by id, and the cells of the table inside ``#rounds``."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.rows: list[list[str]] = []
        self._open: list[str | None] = []
        self._in_rounds = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        ident = dict(attrs).get("id")
        self._open.append(ident)
        if ident == "rounds":
            self._in_rounds = True
        if self._in_rounds and tag == "tr":
            self.rows.append([])
        if self._in_rounds and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            ident = self._open.pop()
            if ident == "rounds":
                self._in_rounds = False
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        for ident in self._open:
            if ident:
                self.by_id[ident] = self.by_id.get(ident, "") + data
        if self._cell is not None:
            self._cell.append(data)


def dash(value: Any) -> str:
    return "—" if value is None else f"{value:,}"


def test_page_numbers_equal_status_json_and_auth_is_required(tmp_path: Path) -> None:
    app = make_backend(tmp_path, state="running")
    client = app.test_client()
    for path in ("/", f"/projects/{PID}", f"/status/{PID}"):
        resp = client.get(path)
        assert resp.status_code == 401 and "Basic" in resp.headers["WWW-Authenticate"], path
        assert client.get(path, headers=auth(password="wrong")).status_code == 401
    status = client.get(f"/status/{PID}", headers=auth()).get_json()
    page = client.get(f"/projects/{PID}", headers=auth())
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'none': no script runs
    html = page.get_data(as_text=True)
    assert '<meta http-equiv="refresh"' in html  # the job runs: the page reloads itself
    cells = _Cells()
    cells.feed(html)
    job, run = status["job"], status["run"]
    assert job["state"] == "running" and job["done"] == 43 and job["total"] == 100 and job["percent"] == 43.0
    assert job["rate_per_s"] == pytest.approx(33 / 30, rel=0.1)  # 33 done in the 30 s since the stage began
    assert job["eta_s"] == pytest.approx(57 / (33 / 30), rel=0.1)
    assert cells.by_id["job-state"] == "running" and cells.by_id["job-round"] == "round 2 of 2"
    assert cells.by_id["job-progress"] == f"{job['done']} / {job['total']}"
    assert cells.by_id["run-tasks"] == dash(run["tasks"])
    assert cells.by_id["run-flagged"] == dash(run["final"]["flagged"])
    rows = [r for r in cells.rows if r]  # the header row has no <td>
    assert len(rows) == len(run["rounds"]) == 3
    for row, r in zip(rows, run["rounds"]):
        assert row[:4] == [dash(r["round"]), dash(r["labels_changed"]), dash(r["reannotated"]), dash(r["flagged"])]
        assert row[5] == dash(r["llm"]["calls"]) and row[7] == dash(r["llm"]["cache_hits"])
    assert status["review_tab"]["title"] == f"{REVIEW_VIEW_TITLE} (10) · round 2/2, 43%"
    assert status["review_tab"]["url"] == f"http://ls.example:8080/projects/{PID}/data?tab=3"
    assert f'href="http://ls.example:8080/projects/{PID}/data?tab=3"' in html
    assert status["progress"] == "running: llm_r2 43/100"  # the old fields stay
    index = client.get("/", headers=auth()).get_data(as_text=True)
    assert f'href="projects/{PID}"' in index and "43 / 100" in index
    assert client.get("/projects/999", headers=auth()).status_code == 404


def test_page_and_status_show_the_review_budget_for_the_target_error(tmp_path: Path) -> None:
    app = make_backend(tmp_path, state="done", target_error=0.3)
    client = app.test_client()
    budget = client.get(f"/status/{PID}", headers=auth()).get_json()["run"]["budget"]
    assert budget["target"]["target_error"] == 0.3
    assert budget["sentence"].startswith(f"to bring the estimated error to at most 30.0 %, review the "
                                         f"{budget['target']['k']} least-confident tasks")
    cells = _Cells()
    cells.feed(client.get(f"/projects/{PID}", headers=auth()).get_data(as_text=True))
    assert cells.by_id["budget-sentence"] == budget["sentence"][0].upper() + budget["sentence"][1:] + "."
    assert f"{budget['target']['k']} (target)" in cells.by_id["budget"]


def test_the_project_page_lists_the_flagged_tasks_with_suggestion_and_reason(tmp_path: Path) -> None:
    """With a plain <Choices> config Label Studio shows a flagged task's marker and score, never why it was
    flagged nor what the small model suggests (those need the review controls); the project's page now lists
    the flagged tasks, least confident first, with both (escaped: a task's text is the user's data)."""
    app = make_backend(tmp_path, state="done")
    html = app.test_client().get(f"/projects/{PID}", headers=auth()).get_data(as_text=True)
    flagged = [i for i in range(1, N) if i % 4 == 1]  # write_run's flagged texts; item 0 is a person's
    assert f"<h2>Flagged for review ({len(flagged)})</h2>" in html
    table = html[html.index("Flagged for review"):]
    assert table.count("<tr>") == len(flagged) + 1 and "llm_slm_disagree" in table
    by_score = sorted(flagged, key=lambda i: ((i % 10) / 10 + 0.05, str(i)))
    order = [table.index(f'<td class="l">{i}</td>') for i in by_score]
    assert order == sorted(order)  # least confident first
    assert EVIL_TEXT not in html and "&lt;img src=x" in table


def test_the_target_confidence_reaches_the_status(tmp_path: Path) -> None:
    """FREEAL_TARGET_CONFIDENCE: /status names the review set that meets the target with that confidence."""
    plain = make_backend(tmp_path / "a", state="done", target_error=0.3)
    sure = make_backend(tmp_path / "b", state="done", target_error=0.3, target_confidence=0.9)
    expected, confident = (app.test_client().get(f"/status/{PID}", headers=auth()).get_json()["run"]["budget"]
                           for app in (plain, sure))
    assert confident["target"]["confidence"] == 0.9 and expected["target"]["confidence"] is None
    assert confident["target"]["k"] > expected["target"]["k"]
    assert confident["sentence"].startswith("to bring the error to at most 30.0 % with 90 % confidence, review the ")


def test_a_projects_own_target_error_sets_its_review_budget(tmp_path: Path) -> None:
    """One backend serves many projects: extra params ``target_error`` outranks FREEAL_TARGET_ERROR."""
    app = make_backend(tmp_path, state="done", target_error=0.3, extra_params={"target_error": "0.2"})
    budget = app.test_client().get(f"/status/{PID}", headers=auth()).get_json()["run"]["budget"]
    assert budget["target"]["target_error"] == 0.2


def test_no_answer_shows_a_server_path(tmp_path: Path) -> None:
    app = make_backend(tmp_path, state="done")
    client = app.test_client()
    health = client.get("/health", headers=auth()).get_json()
    assert health == {"status": "UP"}
    for path in ("/", "/health", f"/projects/{PID}", f"/status/{PID}", "/versions", "/projects/999", "/status/999"):
        body = client.get(path, headers=auth()).get_data(as_text=True)
        assert str(tmp_path) not in body and "state.sqlite" not in body, path


def test_task_text_and_label_names_are_escaped(tmp_path: Path) -> None:
    app = make_backend(tmp_path, state="done")
    html = app.test_client().get(f"/projects/{PID}", headers=auth()).get_data(as_text=True)
    assert "<script" not in html.lower() and "<b>looks</b>" not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html and "&lt;b&gt;looks&lt;/b&gt;" in html
    report = tmp_path / "report.html"
    run_dir = tmp_path / "data" / f"project-{PID}"
    assert cli_main(["report", str(run_dir), "--out", str(report)]) == 0
    text = report.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and "<img" not in text.lower() and "&lt;img src=x" in text
    assert str(tmp_path) not in text


def test_review_tab_title_is_throttled_and_final() -> None:
    class FakeClient:
        def __init__(self) -> None:
            self.titles: list[str] = []

            self.versions: list[str | None] = []

        def upsert_review_view(self, title: str, version: str | None = None) -> int:
            self.titles.append(title)
            self.versions.append(version)
            return 11

    class Jobs:
        def __init__(self) -> None:
            self.row = {"state": "running", "round": 1, "rounds": 2, "done": 5, "total": 20, "flagged": 412}
            self.updates: list[dict[str, Any]] = []

        def status(self, project_id: int) -> dict[str, Any]:
            return self.row

        def update(self, project_id: int, owner: str, **fields: Any) -> bool:
            self.updates.append(fields)
            return True

    client, jobs = FakeClient(), Jobs()
    tab = ReviewTab(client, jobs, 1, "me", every_s=60)  # type: ignore[arg-type]
    tab.show()
    tab.show()  # within the minute: skipped
    assert client.titles == [f"{REVIEW_VIEW_TITLE} (412) · round 1/2, 25%"] and jobs.updates == [{"view_id": 11}]
    assert client.versions == ["freeal-llm-only"]  # nothing pushed yet: the flags of /predict's answers
    jobs.row["model_version"] = "freeal-r1-abc"
    tab.show(force=True, final=True)
    assert client.titles[-1] == f"{REVIEW_VIEW_TITLE} (412)" and client.versions[-1] == "freeal-r1-abc"


def test_job_store_records_when_a_stage_began(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "backend.sqlite")
    jobs.claim(1, "me", stale_s=60)
    jobs.update(1, "me", stage="llm_r0", done=5, total=10)
    first = jobs.status(1)
    jobs.update(1, "me", stage="llm_r0", done=8, total=10)
    same = jobs.status(1)
    assert same["stage_started"] == first["stage_started"] and same["stage_done0"] == 5
    jobs.update(1, "me", stage="slm", done=0, total=6)
    assert jobs.status(1)["stage_done0"] == 0 and jobs.status(1)["stage_started"] >= first["stage_started"]
    jobs.close()


# headless Chromium ---------------------------------------------------------------------------------------
@pytest.fixture
def browser() -> Iterator[Any]:
    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def serve(app: Flask) -> tuple[str, Any]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


@pytest.mark.browser
@pytest.mark.parametrize("state", ["running", "done"])
def test_status_page_in_chromium(tmp_path: Path, browser: Any, state: str) -> None:
    app = make_backend(tmp_path, state=state)
    url, server = serve(app)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        ctx = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                  viewport={"width": 1200, "height": 900})
        page = ctx.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{url}/projects/{PID}")
        assert page.locator("#job-state").inner_text() == state
        assert page.locator("svg").count() == 2  # score histogram, labels per round (no gold: no accuracy plot)
        assert page.evaluate("window.__pwned") is None and not dialogs
        page.screenshot(path=str(shots / f"status_{state}.png"), full_page=True)
        page.goto(url + "/")
        assert page.get_by_text(f"project {PID}").count() == 1
        page.screenshot(path=str(shots / f"index_{state}.png"), full_page=True)
        ctx.close()
    finally:
        server.shutdown()
    assert (shots / f"status_{state}.png").stat().st_size > 10_000


@pytest.mark.browser
def test_report_in_chromium(tmp_path: Path, browser: Any) -> None:
    write_run(tmp_path / "run" / "state.sqlite")
    assert cli_main(["report", str(tmp_path / "run")]) == 0
    report = tmp_path / "run" / "report.html"
    assert not re.search(r"(src|href)=\"(https?:)?//", report.read_text(encoding="utf-8"))  # self-contained
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(report.as_uri())
    assert page.locator("svg").count() == 3  # histogram, labels per round, accuracy per stage (gold exists)
    assert page.get_by_text("Flagged for review (10)").count() == 1
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    page.close()


def test_freeal_run_books_llm_calls_per_round_for_the_report(tmp_path: Path) -> None:
    """``freeal run`` records round 0's LLM calls in the run state; ``freeal report`` shows them."""
    import subprocess

    from tests.fake_openai import FakeOpenAI
    from tests.test_llm_faults import FREEAL, _cli_env, _rows

    data = _rows(tmp_path, 12)
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    with FakeOpenAI() as fake:
        done = subprocess.run([*FREEAL, "run", str(data), "--labels", "positive,negative", "--rounds", "0",
                               "--run-dir", str(run_dir), "--data-dir", str(data_dir)],
                              cwd=tmp_path, env=_cli_env(fake.port, data_dir), capture_output=True, text=True,
                              timeout=180)
        asked = len(fake.records())
    assert done.returncode == 0, done.stderr[-2000:]
    store = Store(run_dir / "state.sqlite")
    summary = run_summary(store)
    store.close()
    assert summary["rounds"][0]["llm"]["calls"] == asked > 0  # demos + labels, all in round 0
    assert summary["rounds"][0]["reannotated"] == 12 and summary["final"]["results"] == 12
    assert cli_main(["report", str(run_dir)]) == 0
    cells = _Cells()
    cells.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    assert [r for r in cells.rows if r][0][5] == str(asked)
